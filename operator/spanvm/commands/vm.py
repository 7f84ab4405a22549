"""The commands that act on SpanningVMs through the API server: status, console, wait and
the verbs start, stop, restart, pause and unpause. Every one takes kubectl's `--kubeconfig`,
`--context` and `-n`; NotFound exits 1, a usage error 2, and any failure is one line."""

import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from typing import Any, TypeVar

import click
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from spanvm.api.constants import GROUP, SPANNINGVM_PLURAL, VERSION
from spanvm.api.phases import ConditionType, PrintableStatus, VMPhase
from spanvm.commands import output
from spanvm.commands.errors import CliError, NotFound, api_failure, unreachable
from spanvm.commands.follow import Follower
from spanvm.commands.target import Target, connect
from spanvm.commands.verbs import FINISHED, VERBS, plan
from spanvm.kube import JsonObject
from spanvm.status_view import describe

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
POLL = 0.5  # seconds between looks while waiting or following
RESTARTING = frozenset({"Always", "RerunOnFailure"})


def kube_options(command: F) -> F:
    """kubectl's connection options."""
    for option in (
        click.option("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube)"),
        click.option("--context", help="kubeconfig context (default: the current one)"),
        click.option(
            "-n",
            "--namespace",
            help="namespace (default: the context's, else default)",
            shell_complete=_complete_namespaces,
        ),
    ):
        command = option(command)
    return command


def _complete_namespaces(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[str]:
    try:
        target = connect(ctx.params.get("kubeconfig"), ctx.params.get("context"), None)
        items = target.kube.core.list_namespace().items
    except Exception:  # completion never fails loudly
        return []
    names = [str(n.metadata.name) for n in items if n.metadata is not None]
    return [n for n in names if n.startswith(incomplete)]


def _complete_vms(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[str]:
    try:
        target = connect(
            ctx.params.get("kubeconfig"), ctx.params.get("context"), ctx.params.get("namespace")
        )
        vms = target.kube.list_vms(target.namespace)
    except Exception:  # completion never fails loudly
        return []
    return [v["metadata"]["name"] for v in vms if v["metadata"]["name"].startswith(incomplete)]


NAME = click.argument("name", shell_complete=_complete_vms)


@contextmanager
def guarded(target: Target, what: str) -> Iterator[None]:
    """API errors and an unreachable server as one-line CliErrors about `what`."""
    try:
        yield
    except ApiException as err:
        raise api_failure(err, what) from None
    except (urllib3.exceptions.HTTPError, OSError) as err:
        raise unreachable(err, target.host) from None


def _what(target: Target, name: str) -> str:
    return f'{output.RESOURCE} "{name}" in namespace "{target.namespace}"'


def read_vm(target: Target, name: str) -> JsonObject:
    """The VM, or NotFound."""
    with guarded(target, _what(target, name)):
        vm = target.kube.get_vm(target.namespace, name)
    if vm is None:
        raise NotFound(f"{_what(target, name)} not found")
    return vm


def _echo(text: str) -> None:
    click.echo(text.rstrip("\n"))


@click.command()
@click.argument("name", required=False, shell_complete=_complete_vms)
@kube_options
@click.option("-A", "--all-namespaces", is_flag=True, help="list VMs of every namespace")
@click.option("-o", "--output", "fmt", type=click.Choice(output.FORMATS), help="output format")
def status(
    *,
    name: str | None,
    kubeconfig: str | None,
    context: str | None,
    namespace: str | None,
    all_namespaces: bool,
    fmt: str | None,
) -> None:
    """Show a SpanningVM's state, conditions and where its vCPUs run (without NAME: list)."""
    target = connect(kubeconfig, context, namespace)
    if name is not None:
        if all_namespaces:
            raise click.UsageError("a NAME and -A do not go together")
        vm = read_vm(target, name)
        if fmt in ("json", "yaml", "name"):
            _echo(output.serialise([vm], fmt, single=True))
        else:
            _echo(describe(vm, wide=fmt == "wide"))
        return
    scope = None if all_namespaces else target.namespace
    with guarded(target, "spanningvms.spanvm.io"):
        vms = sorted(
            target.kube.list_vms(scope),
            key=lambda v: (v["metadata"]["namespace"], v["metadata"]["name"]),
        )
    if fmt in ("json", "yaml", "name"):
        _echo(output.serialise(vms, fmt, single=False))
    elif not vms:
        where = "any namespace" if all_namespaces else f"namespace {target.namespace}"
        click.echo(f"No resources found in {where}.", err=True)
    else:
        _echo(output.table(vms, wide=fmt == "wide", namespaced=all_namespaces))


@click.command()
@NAME
@kube_options
@click.option("-f", "--follow", is_flag=True, help="keep printing the console as the guest runs")
def console(
    name: str, kubeconfig: str | None, context: str | None, namespace: str | None, follow: bool
) -> None:
    """Print the guest console of fragment 0 (its last lines; --follow: as it runs)."""
    target = connect(kubeconfig, context, namespace)
    vm = read_vm(target, name)
    follower = Follower()
    while True:
        status = vm.get("status") or {}
        text = follower.update(str(status.get("consoleTail") or ""), status.get("consoleBytes"))
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
        strategy = (vm.get("spec") or {}).get("runStrategy")
        if not follow or (status.get("phase") in FINISHED and strategy not in RESTARTING):
            return
        time.sleep(POLL)
        vm = read_vm(target, name)


def _verb(verb: str) -> click.Command:
    helps = {
        "start": "Start a SpanningVM (runStrategy Halted -> Always; otherwise a start request).",
        "stop": "Stop a SpanningVM (runStrategy Always -> Halted; otherwise a stop request).",
        "restart": "Restart a SpanningVM's guest from the beginning, on a new placement.",
        "pause": "Pause every vCPU of a SpanningVM; its memory and fabric stay.",
        "unpause": "Let a paused SpanningVM's vCPUs run again.",
    }

    @click.command(name=verb, help=helps[verb])
    @NAME
    @kube_options
    def command(
        name: str, kubeconfig: str | None, context: str | None, namespace: str | None
    ) -> None:
        target = connect(kubeconfig, context, namespace)
        vm = read_vm(target, name)
        try:
            change = plan(verb, vm)
        except CliError as err:
            raise CliError(f"cannot {verb} {output.RESOURCE}/{name}: {err}") from None
        if change.patch is not None:
            with guarded(target, _what(target, name)):
                target.kube.custom.patch_namespaced_custom_object(
                    GROUP, VERSION, target.namespace, SPANNINGVM_PLURAL, name, change.patch
                )
        click.echo(f"{output.RESOURCE}/{name}: {change.says}")

    return command


start, stop, restart, pause, unpause = (_verb(verb) for verb in VERBS)

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """kubectl's durations: 30s, 1m30s, 2h, 500ms, or plain seconds."""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise click.BadParameter(f"{text!r} is not a duration such as 30s, 2m or 1h30m")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _condition_met(vm: JsonObject, kind: str, want: str) -> bool:
    status = vm.get("status") or {}
    if kind == "phase":
        return bool(status.get("phase") == want)
    if kind == "status":
        return bool(status.get("printableStatus") == want)
    cond_type, _, cond_status = want.partition("=")
    found = [c for c in status.get("conditions") or [] if c.get("type") == cond_type]
    return bool(found) and found[0].get("status") == (cond_status or "True")


def _parse_for(text: str) -> tuple[str, str]:
    """(kind, wanted value) of a --for; a value that can never match is refused up front.
    Condition types and statuses match without regard to case, as in `kubectl wait`; the
    value returned is the canonical spelling (`condition=ready=true` -> `Ready=True`)."""
    if text == "delete":
        return "delete", ""
    kind, _, want = text.partition("=")
    if kind not in ("phase", "status", "condition") or not want:
        raise click.BadParameter(
            f"{text!r}: use phase=PHASE, status=STATUS, condition=TYPE[=STATUS] or delete"
        )
    if kind == "condition":
        cond_type, _, cond_status = want.partition("=")
        canonical_type = _one_of(text, kind, cond_type, list(ConditionType), fold=True)
        statuses = {s.lower(): s for s in ("True", "False", "Unknown")}
        if cond_status.lower() not in statuses and cond_status:
            raise click.BadParameter(f"{text!r}: a condition's status is True, False or Unknown")
        return kind, f"{canonical_type}={statuses.get(cond_status.lower(), 'True')}"
    values: list[str] = list(VMPhase) if kind == "phase" else list(PrintableStatus)
    return kind, _one_of(text, kind, want, values)


def _one_of(text: str, kind: str, value: str, values: list[str], *, fold: bool = False) -> str:
    """`value` as `values` spell it (matched without regard to case if `fold`); a
    BadParameter naming every value otherwise."""
    for known in values:
        if known == value or (fold and known.lower() == value.lower()):
            return str(known)
    raise click.BadParameter(
        f"{text!r}: no SpanningVM {kind} {value!r} (one of {', '.join(values)})"
    )


@click.command()
@NAME
@kube_options
@click.option(
    "--for",
    "for_",
    required=True,
    callback=lambda _ctx, _param, value: _parse_for(value),
    help="phase=Running, status=Stopped, condition=Ready[=False] or delete",
)
@click.option(
    "--timeout",
    default="30s",
    show_default=True,
    callback=lambda _ctx, _param, value: (value, parse_duration(value)),
    help="give up after (30s, 5m, 1h)",
)
def wait(
    *,
    name: str,
    kubeconfig: str | None,
    context: str | None,
    namespace: str | None,
    for_: tuple[str, str],
    timeout: tuple[str, float],
) -> None:
    """Wait until a SpanningVM is in a phase, a status, has a condition, or is deleted."""
    kind, want = for_
    shown, seconds = timeout
    target = connect(kubeconfig, context, namespace)
    deadline = time.monotonic() + seconds
    vm: JsonObject | None = None
    with suppress(NotFound) if kind == "delete" else nullcontext():
        vm = read_vm(target, name)
    while True:
        if kind == "delete" and vm is None:
            click.echo(f"{output.RESOURCE}/{name} deleted")
            return
        if vm is not None and kind != "delete" and _condition_met(vm, kind, want):
            click.echo(f"{output.RESOURCE}/{name} condition met")
            return
        if time.monotonic() >= deadline:
            status = (vm or {}).get("status") or {}
            now = f"phase {status.get('phase')}: {status.get('message') or 'no message'}"
            raise CliError(
                f"timed out after {shown} waiting for {kind}{'=' if want else ''}{want} on"
                f" {output.RESOURCE}/{name} ({now})"
            )
        time.sleep(min(POLL, max(deadline - time.monotonic(), 0.0)))
        try:
            vm = read_vm(target, name)
        except NotFound:
            if kind != "delete":
                raise
            vm = None
