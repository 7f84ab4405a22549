"""RFC 3339 times as the API server takes them, through the Kubernetes client as it sends a
dict body (turned into the client's model and written back with isoformat)."""

import contextlib
import re
from datetime import UTC, datetime
from typing import Any

from kubernetes import client

from spanvm.rfc3339 import micro_time, parse_time

MICRO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)$")


def sent_renew_time(renew_time: str) -> Any:
    """The renewTime the client would put on the wire for a Lease created from a dict."""
    api = client.CoordinationV1Api()
    sent: dict[str, Any] = {}
    serialize = api.api_client.param_serialize

    def capture(*args: Any, **kwargs: Any) -> Any:
        sent["body"] = api.api_client.sanitize_for_serialization(kwargs.get("body"))
        return serialize(*args, **kwargs)

    def no_network(*_args: Any, **_kwargs: Any) -> Any:
        raise ConnectionAbortedError

    api.api_client.param_serialize = capture  # type: ignore[method-assign]
    api.api_client.call_api = no_network  # type: ignore[method-assign]
    body = {"metadata": {"name": "l"}, "spec": {"renewTime": renew_time}}
    with contextlib.suppress(ConnectionAbortedError):
        api.create_namespaced_lease("ns", body)  # type: ignore[arg-type]
    return sent["body"]["spec"]["renewTime"]


def test_a_whole_second_keeps_its_fraction_through_the_client() -> None:
    whole = datetime(2026, 11, 30, 2, 58, 26, tzinfo=UTC)
    assert MICRO_TIME.match(sent_renew_time(micro_time(whole)))
    assert parse_time(micro_time(whole)) == whole.replace(microsecond=1)


def test_other_moments_are_written_as_they_are() -> None:
    moment = datetime(2026, 11, 30, 2, 58, 26, 123456, tzinfo=UTC)
    assert micro_time(moment) == "2026-11-30T02:58:26.123456Z"
    assert MICRO_TIME.match(sent_renew_time(micro_time(moment)))
