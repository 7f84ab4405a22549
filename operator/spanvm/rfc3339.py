"""RFC 3339 times as the Kubernetes API writes them: Time (seconds, `Z`) and MicroTime."""

from datetime import UTC, datetime, timedelta


def format_time(moment: datetime | None = None) -> str:
    """A Kubernetes Time (e.g. a condition's lastTransitionTime): whole seconds, UTC, `Z`."""
    return (moment or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_time(moment: datetime | None = None) -> str:
    """A Kubernetes MicroTime (a Lease's renewTime): microseconds, UTC, `Z`.

    A moment on a whole second is written 1 µs later: the Kubernetes Python client (37.x)
    turns a dict body into its model (a V1Lease), parsing the times, and writes them back
    with `datetime.isoformat()`, which leaves the fraction out on a whole second; the API
    server refuses a MicroTime without one (`cannot parse "+00:00" as ".000000"`), about
    one Lease write in a million."""
    moment = (moment or datetime.now(UTC)).astimezone(UTC)
    if moment.microsecond == 0:
        moment += timedelta(microseconds=1)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str | None) -> datetime | None:
    """A Time or MicroTime from the API (None stays None)."""
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
