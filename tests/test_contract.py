"""The agent/launcher <-> fragment contract: one builder, one command line, typed events, and
a configuration of another version refused by a real `spanvm fragment` naming both."""

import dataclasses
import io
import json
import secrets
import subprocess
from pathlib import Path

import pytest

from spanvm.contract import (
    CONTRACT_VERSION,
    Connected,
    ContractError,
    Counters,
    CpuFeatures,
    EventWriter,
    Failed,
    Finished,
    Listening,
    MultibootKernel,
    fragment_command,
    fragment_config,
    last_of,
    parse_event,
    parse_events,
    read_config,
)
from spanvm.exitstatus import EXIT_VM_ERROR
from spanvm.vmm.cpuid import CpuidOptions

MiB = 1 << 20


def config(index: int = 1, **kw: object) -> bytes:
    args: dict[str, object] = {
        "index": index,
        "vcpu_ids": [index],
        "vcpu_count": 2,
        "fragment_count": 2,
        "memory": 32 * MiB,
        "payload": "spin",
        "arg": 0,
        "homes": [(16 * MiB, 32 * MiB, 1), (2 * MiB, 16 * MiB, 0)],
        "peers": {0: "10.0.0.1:7000", 1: "10.0.0.2:7000"},
        "secret": secrets.token_hex(32),
        "listen_host": "10.0.0.2",
        "node_name": "n",
        "idle_timeout": 9.0,
    }
    args.update(kw)
    return fragment_config(**args).to_json()  # type: ignore[arg-type]


def test_the_builder_keeps_lower_peers_sorted_homes_and_idle_timeout_on_fragment_0() -> None:
    one = read_config(config(1))
    assert one.peers == {0: "10.0.0.1:7000"}
    assert one.homes == [(2 * MiB, 16 * MiB, 0), (16 * MiB, 32 * MiB, 1)]
    assert one.idle_timeout is None
    assert read_config(config(0)).idle_timeout == 9.0
    assert read_config(config(0)).peers == {}


@pytest.mark.parametrize("version", [CONTRACT_VERSION + 1, 0, None])
def test_a_configuration_of_another_version_is_refused_naming_both(version: int | None) -> None:
    raw = json.loads(config())
    if version is None:
        del raw["version"]
    else:
        raw["version"] = version
    with pytest.raises(ContractError) as err:
        read_config(json.dumps(raw))
    assert f"contract version {CONTRACT_VERSION}" in str(err.value)
    assert f"configuration of version {version}" in str(err.value)


def test_a_real_fragment_refuses_another_version_before_doing_anything() -> None:
    raw = json.loads(config(0))
    raw["version"] = CONTRACT_VERSION + 1
    done = subprocess.run(
        fragment_command(1),
        input=json.dumps(raw).encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == EXIT_VM_ERROR
    assert f"of version {CONTRACT_VERSION + 1}" in done.stderr.decode()


def test_events_round_trip_through_the_one_emitter_and_parser() -> None:
    stream = io.StringIO()
    emit = EventWriter(stream)
    sent = [
        Listening(index=0, endpoint="127.0.0.1:7000"),
        Connected(index=0),
        Finished(
            exit_code=3, counters=Counters(page_faults=5, invalidations=2), marks=[(0, 1, 0.5)]
        ),
        Failed(error="fragment 1 lost"),
    ]
    for event in sent:
        emit(event)
    text = stream.getvalue()
    assert parse_events(text) == sent
    assert parse_events(text + '{"event": "fin') == sent  # a line being written is left out
    finished = last_of(parse_events(text), Finished)
    assert finished is not None and finished.counters.invalidations == 2


def test_an_unknown_event_is_refused_by_name() -> None:
    with pytest.raises(ContractError, match="not a fragment event"):
        parse_event('{"event": "exploded"}')


def test_cpu_features_name_the_vmms_cpuid_options() -> None:
    """The contract's CPU features and the VMM's CpuidOptions are built from each other by
    field name (cli.py, fabric/fragment.py): a feature added to one only must fail here."""
    assert set(CpuFeatures.model_fields) == {f.name for f in dataclasses.fields(CpuidOptions)}


def test_a_fragment_given_an_unusable_kernel_reports_failed_and_exits_70(tmp_path: Path) -> None:
    """Not exit 2 (that is `spanvm run`'s usage error): the agent reports the fragment's
    status as the VM's, so a bad kernel is a failed VM, said in a Failed event."""
    junk = tmp_path / "kernel.flat"
    junk.write_bytes(b"not a kernel" * 100)
    raw = config(
        0,
        vcpu_ids=[0],
        vcpu_count=1,
        fragment_count=1,
        payload="",
        peers={},
        homes=[(0, 32 * MiB, 0)],
        listen_host="127.0.0.1",
        multiboot=MultibootKernel(kernel=str(junk), modules=[], cmdline=""),
    )
    done = subprocess.run(
        fragment_command(1), input=raw, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == EXIT_VM_ERROR, done.stderr.decode()
    failed = last_of(parse_events(done.stdout.decode()), Failed)
    assert failed is not None and f"multiboot kernel {junk}: no Multiboot header" in failed.error
