"""RFC 3339 times as the Kubernetes API writes them: Time (seconds, `Z`) and MicroTime."""

from datetime import UTC, datetime


def format_time(moment: datetime | None = None) -> str:
    """A Kubernetes Time (e.g. a condition's lastTransitionTime): whole seconds, UTC, `Z`."""
    return (moment or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_time(moment: datetime | None = None) -> str:
    """A Kubernetes MicroTime (a Lease's renewTime): microseconds, UTC, `Z`."""
    return (moment or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str | None) -> datetime | None:
    """A Time or MicroTime from the API (None stays None)."""
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
