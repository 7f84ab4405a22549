"""What `spanvm start|stop|restart|pause|unpause` change on a SpanningVM: pure, from the VM
as read, so every rule is testable without a cluster.

As `virtctl`: start and stop switch runStrategy between Halted and Always; under
RerunOnFailure, Once and Manual the strategy stays and the verb is a request the operator
acts on once (the annotation `spanvm.io/request`, KubeVirt's start/stop/restart
subresources); restart is always a request. Pause is the annotation `spanvm.io/paused`.
"""

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from spanvm.api.constants import PAUSED_ANNOTATION, REQUEST_ANNOTATION
from spanvm.commands.errors import CliError
from spanvm.kube import JsonObject

VERBS = ("start", "stop", "restart", "pause", "unpause")
FINISHED = frozenset({"Succeeded", "Failed", "Stopped"})


@dataclass(frozen=True)
class Plan:
    """A merge patch for the VM (None: nothing to change) and what to tell the user."""

    patch: JsonObject | None
    says: str


def request_id(now: datetime | None = None) -> str:
    """A fresh request id: when (readable) and a random part (unique)."""
    moment = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{moment}-{secrets.token_hex(3)}"


def _request(verb: str, why: str) -> Plan:
    patch = {"metadata": {"annotations": {REQUEST_ANNOTATION: f"{verb}/{request_id()}"}}}
    return Plan(patch, f"{verb} requested ({why})")


def _strategy(patch_to: str, was: str) -> Plan:
    return Plan({"spec": {"runStrategy": patch_to}}, f"runStrategy {was} -> {patch_to}")


def plan(verb: str, vm: JsonObject) -> Plan:
    """The change `verb` makes to `vm`; CliError when it cannot apply to the VM as it is."""
    strategy = str((vm.get("spec") or {}).get("runStrategy") or "Once")
    status = vm.get("status") or {}
    phase = status.get("phase")
    paused = ((vm["metadata"].get("annotations") or {}).get(PAUSED_ANNOTATION)) == "true"
    if verb == "start":
        if strategy == "Halted":
            return _strategy("Always", strategy)
        if strategy == "Always":
            return Plan(None, "already started (runStrategy Always): nothing to do")
        return _request("start", f"runStrategy {strategy} stays")
    if verb == "stop":
        if strategy == "Always":
            return _strategy("Halted", strategy)
        if strategy == "Halted":
            return Plan(None, "already stopped (runStrategy Halted): nothing to do")
        return _request("stop", f"runStrategy {strategy} stays")
    if verb == "restart":
        if strategy == "Halted":
            raise CliError("it is stopped (runStrategy Halted): start it with `spanvm start`")
        return _request("restart", f"runStrategy {strategy}")
    if verb == "pause":
        if paused:
            return Plan(None, "already paused: nothing to do")
        if strategy == "Halted" or phase in FINISHED:
            raise CliError(f"it is not running (phase {phase}, runStrategy {strategy})")
        return Plan({"metadata": {"annotations": {PAUSED_ANNOTATION: "true"}}}, "pause requested")
    if verb == "unpause":
        if not paused:
            return Plan(None, "not paused: nothing to do")
        return Plan({"metadata": {"annotations": {PAUSED_ANNOTATION: None}}}, "unpause requested")
    raise ValueError(f"unknown verb {verb}")
