"""KubeVirt's run strategies and the verbs' requests, as pure rules the lifecycle asks.

| runStrategy | runs when created | restarted after | start / stop / restart |
| --- | --- | --- | --- |
| Always | yes | any end: exit 0, a failure, a lost node or fragment | stop sets Halted |
| RerunOnFailure | yes | a failure (non-zero exit, lost node or fragment), not exit 0 | requests |
| Once | yes | never | requests (start runs it once more) |
| Manual | no: `spanvm start` (a running one runs on) | never (only by the verbs) | requests |
| Halted | no | never | start sets Always |

A request is the annotation `spanvm.io/request: <verb>/<id>`; the operator acts on an id
once and records it in `status.lastRequest`. A stop request holds until a later start or
restart request, as KubeVirt's stop holds a Manual VM stopped.

Restarts after a failure back off as KubeVirt's CrashLoopBackOff: none after the first
failure in a row, then `base` seconds doubling up to `BACKOFF_MAX` (5 minutes); a guest that
finishes with exit 0, or a start or restart by request, starts the count again.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from spanvm.api.constants import REQUEST_ANNOTATION, REQUEST_VERBS
from spanvm.kube import JsonObject

BACKOFF_BASE = 10.0  # seconds before the restart after the 2nd failure in a row
BACKOFF_MAX = 300.0
RESTARTS_AFTER_FAILURE = frozenset({"Always", "RerunOnFailure"})
RESTARTS_AFTER_SUCCESS = frozenset({"Always"})


@dataclass(frozen=True)
class Request:
    """A verb's request not acted on yet."""

    verb: str  # start, stop or restart
    value: str  # the whole annotation value, recorded in status.lastRequest once acted on


def request_of(vm: JsonObject) -> Request | None:
    """The VM's latest request (acted on or not), or None."""
    value = (vm["metadata"].get("annotations") or {}).get(REQUEST_ANNOTATION)
    verb = str(value or "").partition("/")[0]
    return Request(verb, str(value)) if verb in REQUEST_VERBS else None


def pending_request(vm: JsonObject) -> Request | None:
    """The latest request if it was not acted on yet."""
    request = request_of(vm)
    handled = (vm.get("status") or {}).get("lastRequest")
    return request if request is not None and request.value != handled else None


def wants_running(strategy: str, vm: JsonObject) -> tuple[bool, str]:
    """Whether the guest should run at all now, and why not when it should not."""
    request = request_of(vm)
    if strategy == "Halted":
        return False, "runStrategy is Halted"
    if request is not None and request.verb == "stop":
        return False, "stopped by request (spanvm stop)"
    placed = bool((vm.get("status") or {}).get("fragments"))
    if strategy == "Manual" and request is None and not placed:
        # never started: a Manual VM waits for spanvm start (one already running when its
        # strategy became Manual runs on, and is not restarted)
        return False, "runStrategy is Manual: waiting for spanvm start"
    return True, ""


def restarts_after(strategy: str, failed: bool) -> bool:
    """Whether the strategy restarts a guest that ended (failed or exited 0)."""
    return strategy in (RESTARTS_AFTER_FAILURE if failed else RESTARTS_AFTER_SUCCESS)


def backoff(failures_in_a_row: int, base: float = BACKOFF_BASE) -> float:
    """Seconds to wait before restarting after this many failures in a row."""
    if failures_in_a_row <= 1:
        return 0.0
    return float(min(base * 2.0 ** (failures_in_a_row - 2), BACKOFF_MAX))


def retry_after(now: datetime, failures_in_a_row: int, base: float = BACKOFF_BASE) -> datetime:
    """When the next restart may happen."""
    return now + timedelta(seconds=backoff(failures_in_a_row, base))
