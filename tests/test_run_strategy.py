"""KubeVirt's run strategies, the verbs' requests, the back-off and printableStatus as pure
rules: a table each."""

from datetime import UTC, datetime, timedelta

import pytest

from spanvm.api.constants import REQUEST_ANNOTATION
from spanvm.commands.verbs import plan
from spanvm.controller.printable import printable_status
from spanvm.controller.run_strategy import (
    BACKOFF_MAX,
    backoff,
    pending_request,
    restarts_after,
    retry_after,
    wants_running,
)
from spanvm.kube import JsonObject


def vm(strategy: str, request: str | None = None, last: str | None = None) -> JsonObject:
    annotations = {REQUEST_ANNOTATION: request} if request else {}
    return {
        "metadata": {"name": "vm", "namespace": "ns", "annotations": annotations},
        "spec": {"runStrategy": strategy},
        "status": {"lastRequest": last} if last else {},
    }


@pytest.mark.parametrize(
    ("strategy", "failed", "restarts"),
    [
        ("Always", False, True),  # KubeVirt's Always: after any end, exit 0 included
        ("Always", True, True),
        ("RerunOnFailure", False, False),
        ("RerunOnFailure", True, True),
        ("Once", False, False),
        ("Once", True, False),
        ("Manual", False, False),
        ("Manual", True, False),
        ("Halted", True, False),
    ],
)
def test_which_ends_restart_the_guest(strategy: str, failed: bool, restarts: bool) -> None:
    assert restarts_after(strategy, failed) is restarts


@pytest.mark.parametrize(
    ("strategy", "asked", "runs"),
    [
        ("Always", None, True),
        ("Once", None, True),
        ("RerunOnFailure", "stop/1", False),
        ("RerunOnFailure", "start/2", True),
        ("Manual", None, False),  # a Manual VM waits for spanvm start
        ("Manual", "start/1", True),
        ("Manual", "restart/1", True),
        ("Manual", "stop/3", False),
        ("Halted", "start/1", False),  # start on Halted switches the strategy, no request
    ],
)
def test_whether_the_guest_should_run(strategy: str, asked: str | None, runs: bool) -> None:
    assert wants_running(strategy, vm(strategy, asked))[0] is runs


def test_a_request_is_acted_on_once() -> None:
    pending = pending_request(vm("Manual", "restart/abc"))
    assert pending is not None and pending.verb == "restart"
    assert pending_request(vm("Manual", "restart/abc", last="restart/abc")) is None
    assert pending_request(vm("Manual", "bogus/1")) is None


def test_backoff_doubles_from_the_second_failure_up_to_five_minutes() -> None:
    assert [backoff(n) for n in range(1, 6)] == [0.0, 10.0, 20.0, 40.0, 80.0]
    assert backoff(50) == BACKOFF_MAX == 300.0
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert retry_after(now, 3) == now + timedelta(seconds=20)


@pytest.mark.parametrize(
    ("verb", "strategy", "patch", "says"),
    [
        ("start", "Halted", {"spec": {"runStrategy": "Always"}}, "runStrategy Halted -> Always"),
        ("stop", "Always", {"spec": {"runStrategy": "Halted"}}, "runStrategy Always -> Halted"),
        ("start", "Always", None, "already started"),
        ("stop", "Halted", None, "already stopped"),
        ("start", "Manual", "start/", "start requested (runStrategy Manual stays)"),
        ("stop", "RerunOnFailure", "stop/", "stop requested (runStrategy RerunOnFailure stays)"),
        ("restart", "Once", "restart/", "restart requested (runStrategy Once)"),
    ],
)
def test_verbs_as_virtctl(verb: str, strategy: str, patch: object, says: str) -> None:
    change = plan(verb, vm(strategy))
    assert change.says.startswith(says)
    if isinstance(patch, str):
        assert change.patch is not None
        assert change.patch["metadata"]["annotations"][REQUEST_ANNOTATION].startswith(patch)
    else:
        assert change.patch == patch


@pytest.mark.parametrize(
    ("strategy", "status", "word"),
    [
        ("Once", {"phase": "Pending"}, "Provisioning"),
        (
            "Once",
            {"phase": "Pending", "conditions": [{"type": "Scheduled", "reason": "Unschedulable"}]},
            "ErrorUnschedulable",
        ),
        ("Once", {"phase": "Starting"}, "Starting"),
        ("Once", {"phase": "Running", "fragments": [{"phase": "Running"}]}, "Running"),
        (
            "Once",
            {"phase": "Running", "fragments": [{"phase": "Paused"}, {"phase": "Paused"}]},
            "Paused",
        ),
        ("Halted", {"phase": "Running"}, "Stopping"),
        ("Halted", {"phase": "Stopped"}, "Stopped"),
        ("Once", {"phase": "Succeeded"}, "Succeeded"),
        (
            "Always",
            {"phase": "Failed", "startFailure": {"retryAfterTimestamp": "x"}},
            "CrashLoopBackOff",
        ),
        ("Once", {"phase": "Terminating"}, "Terminating"),
    ],
)
def test_printable_status(strategy: str, status: JsonObject, word: str) -> None:
    assert printable_status(vm(strategy), status) == word
