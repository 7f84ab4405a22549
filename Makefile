# spanvm developer entry points. Everything built or run lives under .cache/ (git-ignored).
#   make demo   the main job: local control plane + the 2-fragment example (see README)
#   make test   the whole test suite (what .ci/run runs)
SHELL := /bin/bash
PY ?= python3
VENV := .cache/venv
PYTHON := $(VENV)/bin/python
export PATH := $(CURDIR)/.cache/bin:$(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: all deps venv tools payloads crds check-crds test lint fmt typecheck demo cluster-up cluster-down bench clean

all: test

deps:
	hack/install-deps

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $@

tools: deps
	hack/build-tools
	hack/build-helm

payloads: venv
	$(PYTHON) -m spanvm.payloads.build

crds: venv
	$(PYTHON) -m spanvm.api.crd crds charts/spanvm/files/crds

check-crds: venv
	$(PYTHON) -m spanvm.api.crd --check crds charts/spanvm/files/crds

test: deps venv tools payloads
	$(PYTHON) -m pytest

lint: venv
	$(VENV)/bin/ruff check operator tests
	$(VENV)/bin/ruff format --check operator tests
	$(VENV)/bin/mypy
	hadolint Dockerfile

fmt: venv
	$(VENV)/bin/ruff format operator tests
	$(VENV)/bin/ruff check --fix operator tests

typecheck: venv
	$(VENV)/bin/mypy

demo: deps venv tools payloads
	hack/demo

cluster-up: venv tools
	hack/control-plane up

cluster-down: venv
	hack/control-plane down

bench: venv payloads tools
	$(PYTHON) hack/bench/vmm.py
	$(PYTHON) hack/bench/fabric.py
	$(PYTHON) hack/bench/fault_floor.py
	$(PYTHON) hack/bench/ipi.py
	$(PYTHON) hack/bench/scheduler.py
	$(PYTHON) hack/bench/apply.py
	$(PYTHON) hack/bench/load.py

clean:
	-hack/control-plane purge
	rm -rf $(VENV) .cache/payloads
