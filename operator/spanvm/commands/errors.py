"""Errors of the `spanvm` command as one line each, with kubectl's exit statuses: 2 for a
usage error, 1 for anything the cluster says (NotFound, Forbidden, unreachable)."""

import json
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:  # light at run time: `spanvm run` and `spanvm fragment` import this module
    from kubernetes.client.exceptions import ApiException

EXIT_FAILURE = 1  # kubectl's status for NotFound, Forbidden, an unreachable server, a timeout


class CliError(Exception):
    """A failure to print as `spanvm: error: <message>` and exit with `status`."""

    status = EXIT_FAILURE


class NotFound(CliError):  # noqa: N818 - kubectl's word
    """The object asked for does not exist (exit 1, as kubectl)."""


def api_failure(err: "ApiException", what: str) -> CliError:
    """One line for an API error about `what` (e.g. `spanningvms.spanvm.io "vm1"`), in the
    API server's words, as kubectl prints them."""
    reason, message = err.reason or "", ""
    try:
        body = json.loads(err.body or "{}")
        reason = str(body.get("reason") or reason)
        message = str(body.get("message") or "")
    except (ValueError, AttributeError):
        pass
    if err.status == 404:
        return NotFound(f"{what} not found")
    if err.status in (401, 403):
        hint = "; ask for RBAC on spanningvms.spanvm.io" if err.status == 403 else ""
        return CliError(f"{reason or 'Forbidden'}: {message or err.reason}{hint}")
    return CliError(f"the API server refused: {reason} ({err.status}): {message or err.reason}")


def unreachable(err: Exception, host: str) -> CliError:
    """One line for an API server that cannot be reached (refused, no route, timed out, TLS)."""
    import urllib3.exceptions  # noqa: PLC0415 - see above

    cause: object = err
    if isinstance(err, urllib3.exceptions.MaxRetryError) and err.reason is not None:
        cause = err.reason
    text = str(cause)
    for marker in ("Connection refused", "timed out", "Name or service not known", "No route"):
        if marker in text:
            text = marker.lower()
            break
    where = urlsplit(host).netloc or host
    return CliError(
        f"cannot reach the API server at {where} ({text}): is the cluster up, and is the"
        " kubeconfig's context the right one?"
    )
