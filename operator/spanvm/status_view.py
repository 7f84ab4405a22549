"""A SpanningVM's status as people read it (`spanvm status`, the demo)."""

from spanvm.api.constants import PAUSED_ANNOTATION
from spanvm.kube import JsonObject


def describe(vm: JsonObject, *, wide: bool = False) -> str:
    """State, why, conditions and where each vCPU runs (wide: each fragment's endpoint and
    message too)."""
    meta = vm["metadata"]
    status = vm.get("status") or {}
    spec = vm.get("spec") or {}
    shown = status.get("printableStatus") or status.get("phase") or "Unknown"
    if status.get("phase") and status.get("phase") != shown:
        shown += f" (phase {status['phase']})"
    lines = [
        f"{meta['namespace']}/{meta['name']}: {shown}"
        f" ({spec.get('cpu', {}).get('vcpus')} vCPUs, {spec.get('memory')},"
        f" runStrategy {spec.get('runStrategy', 'Once')})",
    ]
    if (meta.get("annotations") or {}).get(PAUSED_ANNOTATION) == "true":
        lines.append(f"  paused on request ({PAUSED_ANNOTATION})")
    if status.get("message"):
        lines.append(f"  {status['message']}")
    if status.get("exitCode") is not None:
        lines.append(f"  guest exit code: {status['exitCode']}")
    if status.get("restarts"):
        lines.append(f"  restarts: {status['restarts']}")
    conditions = status.get("conditions") or []
    if conditions:
        lines.append("  conditions:")
        for c in sorted(conditions, key=lambda c: str(c.get("type"))):
            lines.append(
                f"    {c['type']:<12} {c['status']:<6} {c.get('reason', ''):<20} "
                f"{c.get('message', '')}"
            )
    fragments = status.get("fragments") or []
    if fragments:
        lines.append("  fragments:")
        for f in fragments:
            vcpus = ",".join(str(v) for v in f.get("vcpuIds", []))
            lines.append(
                f"    {f['name']:<24} node {f['nodeName']:<14} vCPUs {vcpus:<10} "
                f"home memory {f.get('memory', '?'):<8} {f.get('phase', '')}"
            )
    if wide:
        lines.append(f"  observedGeneration: {status.get('observedGeneration')}")
    return "\n".join(lines)


def console(vm: JsonObject) -> str:
    """The last lines of the guest console, as fragment 0 reported them."""
    return str((vm.get("status") or {}).get("consoleTail") or "")
