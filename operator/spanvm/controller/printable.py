"""`status.printableStatus`: the VM's state in one word for people, as KubeVirt's
printableStatus (`kubectl get svm` STATUS), from the status the operator is writing."""

from spanvm.controller.run_strategy import wants_running
from spanvm.kube import JsonObject


def printable_status(vm: JsonObject, status: JsonObject) -> str | None:
    """The word for `status` (the VM's status as it is about to be written)."""
    phase = status.get("phase")
    strategy = str((vm.get("spec") or {}).get("runStrategy") or "Once")
    reasons = {c.get("type"): c.get("reason") for c in status.get("conditions") or []}
    if phase == "Terminating":
        return "Terminating"
    if (status.get("startFailure") or {}).get("retryAfterTimestamp"):
        return "CrashLoopBackOff"
    if phase == "Stopped":
        return "Stopped"
    if not wants_running(strategy, vm)[0]:
        return "Stopping"  # asked to stop; fragments still stopping
    if phase == "Pending" and reasons.get("Scheduled") == "Unschedulable":
        return "ErrorUnschedulable"
    if phase in ("Pending", "Scheduling"):
        return "Provisioning"
    if phase == "Running":
        fragments = [f.get("phase") for f in status.get("fragments") or []]
        return "Paused" if fragments and all(p == "Paused" for p in fragments) else "Running"
    if phase in ("Starting", "Degraded", "Succeeded", "Failed"):
        return str(phase)
    return None
