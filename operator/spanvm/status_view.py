"""A SpanningVM's status as people read it (`spanvm status`, the demo)."""

from spanvm.kube import JsonObject


def describe(vm: JsonObject) -> str:
    """Phase, message, conditions and where each vCPU runs."""
    meta = vm["metadata"]
    status = vm.get("status") or {}
    spec = vm.get("spec") or {}
    lines = [
        f"{meta['namespace']}/{meta['name']}: {status.get('phase', 'Unknown')}"
        f" ({spec.get('cpu', {}).get('vcpus')} vCPUs, {spec.get('memory')})",
    ]
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
    return "\n".join(lines)


def console(vm: JsonObject) -> str:
    """The last lines of the guest console, as fragment 0 reported them."""
    return str((vm.get("status") or {}).get("consoleTail") or "")
