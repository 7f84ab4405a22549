"""SpanningVM status from its fragments: phase, conditions, placement summary, guest result.

Pure: fragment objects, node health and the previous conditions in, the status out. The
phase is the most serious thing true of the fragments: a failed fragment fails the VM, a
fragment on a lost node degrades it, all finished is Succeeded, all running is Running.
"""

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from spanvm.api.base import Condition
from spanvm.api.phases import (
    STARTED_FRAGMENT_PHASES,
    TERMINAL_FRAGMENT_PHASES,
    FragmentPhase,
    Reason,
    VMPhase,
)
from spanvm.api.spanningvm import FragmentSummary
from spanvm.controller.cluster_view import NodeHealth, health_of
from spanvm.kube import JsonObject
from spanvm.rfc3339 import format_time, parse_time


def set_condition(  # noqa: PLR0917 - the fields of a condition
    conditions: list[JsonObject],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> list[JsonObject]:
    """conditions with `type_` set; lastTransitionTime kept unless the status flips."""
    value = "True" if status else "False"
    previous = next((c for c in conditions if c.get("type") == type_), None)
    since = now
    if previous and previous.get("status") == value and previous.get("lastTransitionTime"):
        since = parse_time(str(previous["lastTransitionTime"])) or now
    cond = Condition(
        type=type_,
        status=value,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    ).to_api()
    cond["lastTransitionTime"] = format_time(since)
    return [c for c in conditions if c.get("type") != type_] + [cond]


@dataclass(frozen=True)
class Aggregate:
    """What the fragments say about the VM."""

    phase: VMPhase
    message: str
    fabric_ready: bool
    fabric_reason: Reason
    exit_code: int | None = None
    console_tail: str | None = None
    console_bytes: int | None = None
    lost_nodes: tuple[str, ...] = ()
    failed: bool = False
    paused: bool = False  # every fragment's vCPUs are held (spanvm pause)

    @property
    def ready_reason(self) -> Reason:
        """Why the VM is (not) Ready, in one CamelCase word: never just the phase's name."""
        if self.paused:
            return Reason.PAUSED
        return READY_REASONS.get(self.phase, self.fabric_reason)


# The Ready condition's reason for each phase the fragments give: why, not the phase again.
READY_REASONS = {
    VMPhase.RUNNING: Reason.GUEST_RUNNING,
    VMPhase.STARTING: Reason.WAITING_FOR_FRAGMENTS,
    VMPhase.SUCCEEDED: Reason.GUEST_FINISHED,
    VMPhase.FAILED: Reason.FRAGMENT_FAILED,
    VMPhase.DEGRADED: Reason.NODE_LOST,
    VMPhase.STOPPED: Reason.FRAGMENTS_STOPPED,
}


def _fragment_phase(fragment: JsonObject | None) -> str:
    return str(((fragment or {}).get("status") or {}).get("phase") or FragmentPhase.PENDING)


def aggregate(
    placed: list[FragmentSummary],
    fragments: dict[int, JsonObject],
    health: dict[str, NodeHealth],
) -> Aggregate:
    """The VM's phase from its fragments (all of which exist)."""
    phases = [_fragment_phase(fragments.get(i)) for i in range(len(placed))]
    status0 = (fragments.get(0) or {}).get("status") or {}
    result: dict[str, Any] = {
        "exit_code": status0.get("exitCode"),
        "console_tail": status0.get("consoleTail"),
        "console_bytes": status0.get("consoleBytes"),
    }
    failed = [
        f"fragment {i} on {placed[i].node_name} failed: "
        + str((fragments[i].get("status") or {}).get("message") or "no reason given")
        for i, p in enumerate(phases)
        if p == FragmentPhase.FAILED
    ]
    if failed:
        return Aggregate(
            VMPhase.FAILED, "; ".join(failed), False, Reason.FRAGMENT_FAILED, failed=True, **result
        )
    if all(p in (FragmentPhase.SUCCEEDED, FragmentPhase.STOPPED) for p in phases) and (
        phases[0] == FragmentPhase.SUCCEEDED
    ):
        return Aggregate(
            VMPhase.SUCCEEDED,
            f"the guest finished with exit code {result['exit_code']}",
            False,
            Reason.GUEST_FINISHED,
            **result,
        )
    live_nodes = {
        placed[i].node_name for i, p in enumerate(phases) if p not in TERMINAL_FRAGMENT_PHASES
    }
    lost = [h for h in (health_of(health, n) for n in live_nodes) if not h.healthy]
    if lost:
        return Aggregate(
            VMPhase.DEGRADED,
            "; ".join(sorted({h.reason for h in lost})),
            False,
            Reason.NODE_LOST,
            lost_nodes=tuple(sorted({h.name for h in lost})),
            **result,
        )
    if all(p in (FragmentPhase.STOPPED, FragmentPhase.STOPPING) for p in phases):
        message = "every fragment is stopped"
        return Aggregate(VMPhase.STOPPED, message, False, Reason.STOPPED, **result)
    running = {FragmentPhase.RUNNING, FragmentPhase.PAUSED}
    if running & set(phases) and all(p in STARTED_FRAGMENT_PHASES for p in phases):
        # Every fragment got going; some may have finished first (fragment 0 ends the guest
        # before the others hear of it): still Running, never back to Starting.
        nodes = ", ".join(p.node_name for p in placed)
        ended = [f"{i} ({p})" for i, p in enumerate(phases) if p not in running]
        if all(p == FragmentPhase.PAUSED for p in phases):
            return Aggregate(
                VMPhase.RUNNING,
                f"paused on request (spanvm pause): the vCPUs of {len(placed)} fragment(s) on"
                f" {nodes} are held; memory and fabric stay",
                True,
                Reason.FABRIC_CONNECTED,
                paused=True,
                **result,
            )
        return Aggregate(
            VMPhase.RUNNING,
            f"the guest runs on {len(placed)} fragment(s): {nodes}"
            + (f"; finished: fragments {', '.join(ended)}" if ended else ""),
            True,
            Reason.FABRIC_CONNECTED,
            **result,
        )
    waiting = []
    for i, p in enumerate(phases):
        if p == FragmentPhase.RUNNING:
            continue
        # A fragment held back says why (its agent's words: a missing Secret, a peer's
        # endpoint not known yet), so the VM names what it waits for.
        why = ((fragments.get(i) or {}).get("status") or {}).get("message")
        waiting.append(f"{i} ({p}: {why})" if p == FragmentPhase.PENDING and why else f"{i} ({p})")
    return Aggregate(
        VMPhase.STARTING,
        "waiting for fragments " + ", ".join(waiting) + " to connect their fabric",
        False,
        Reason.WAITING_FOR_FRAGMENTS,
        **result,
    )
