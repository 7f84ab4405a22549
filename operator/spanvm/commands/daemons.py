"""`spanvm operator` and `spanvm agent`: the long-running commands the chart's Deployment and
DaemonSet run. Their options come from flags or the environment the chart sets."""

import argparse
from typing import TYPE_CHECKING, Any

import click

from spanvm.api.constants import (
    DNS_LABEL,
    MAX_DNS_LABEL_LENGTH,
    OPERATOR_LEASE,
    SYSTEM_NAMESPACE,
)
from spanvm.api.quantity import parse_quantity_bytes
from spanvm.controller.run_strategy import BACKOFF_BASE

if TYPE_CHECKING:
    from spanvm.controller.reconcile import Hooks

POSITIVE = click.FloatRange(min=0, min_open=True)


def _setup_logging(log_format: str) -> None:
    import logging  # noqa: PLC0415

    import kopf  # noqa: PLC0415 - heavy: only the long-running commands load it

    kopf.configure(
        verbose=False,
        log_format=kopf.LogFormat.JSON if log_format == "json" else kopf.LogFormat.PLAIN,
    )
    logging.getLogger("spanvm").setLevel(logging.INFO)
    # Kopf reports every timer tick and handler success per object at INFO: keep warnings.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)


def _cluster_options(leases: str) -> list[Any]:
    """Options both share: where the API is, the system namespace, the log format."""
    return [
        click.option("--kubeconfig", help="kubeconfig file (default: in-cluster, then ~/.kube)"),
        click.option(
            "--system-namespace",
            envvar="SPANVM_NAMESPACE",
            default=SYSTEM_NAMESPACE,
            show_default=True,
            help=f"namespace of {leases} (env SPANVM_NAMESPACE)",
        ),
        click.option(
            "--log-format", type=click.Choice(("plain", "json")), default="plain", show_default=True
        ),
    ]


def _namespace_names(values: tuple[str, ...]) -> tuple[str, ...]:
    """Namespace names (RFC 1123 labels, as the API server requires of a Namespace's name),
    not Kopf's patterns: the periodic recheck and the gauges select the handled VMs by exact
    name (`cache.in_namespaces`), so a pattern, or a name Kopf would trim, would silently
    match none."""
    for value in values:
        if not value:
            raise click.BadParameter(
                "an empty namespace (leave --namespace out to watch every namespace)"
            )
        if any(c in value for c in "*?[]!,"):
            raise click.BadParameter(
                f"{value!r} is not a namespace name (patterns are not supported: repeat"
                " --namespace once per namespace)"
            )
        if len(value) > MAX_DNS_LABEL_LENGTH or not DNS_LABEL.fullmatch(value):
            raise click.BadParameter(
                f"{value!r} is not a namespace name (lower-case letters, digits and '-',"
                f" starting and ending with a letter or digit, at most {MAX_DNS_LABEL_LENGTH})"
            )
    return values


def _with(options: list[Any], command: Any) -> Any:
    for option in reversed(options):
        command = option(command)
    return command


@click.command()
@click.option(
    "--namespace",
    "namespaces",
    multiple=True,
    callback=lambda _ctx, _param, value: _namespace_names(value),
    help="watch only this namespace (a name, not a pattern; repeatable; default: all)",
)
@click.option("--lease-name", default=OPERATOR_LEASE, show_default=True, help="leader Lease")
@click.option("--lease-duration", type=int, default=15, show_default=True, help="Lease seconds")
@click.option(
    "--timer-interval",
    type=POSITIVE,
    default=5.0,
    show_default=True,
    help="seconds between re-checks of a VM",
)
@click.option(
    "--deletion-grace",
    type=POSITIVE,
    default=60.0,
    show_default=True,
    help="seconds a deletion waits for fragments to stop before forcing",
)
@click.option(
    "--node-loss-grace",
    type=POSITIVE,
    default=40.0,
    show_default=True,
    help="seconds a node must stay NotReady or silent before an Always VM is restarted",
)
@click.option(
    "--restart-backoff",
    type=POSITIVE,
    default=BACKOFF_BASE,
    show_default=True,
    help="seconds before restarting a guest that failed twice in a row (CrashLoopBackOff),"
    " doubling per further failure up to 5 minutes",
)
@click.option("--metrics-port", type=int, help="serve Prometheus metrics on this port")
@click.option(
    "--health-port",
    type=int,
    help="serve /healthz on this port (Kopf's liveness endpoint while leading)",
)
def operator(**options: Any) -> None:
    """Run the operator (Kopf handlers behind a leader Lease) until SIGTERM/SIGINT."""
    start_operator(argparse.Namespace(**options))


def start_operator(args: argparse.Namespace, hooks: "Hooks | None" = None) -> None:
    """The operator with `operator`'s options; `hooks`: fault injection (tests)."""
    import asyncio  # noqa: PLC0415
    import os  # noqa: PLC0415

    from spanvm.controller.main import run as run_operator  # noqa: PLC0415
    from spanvm.controller.reconcile import OperatorConfig  # noqa: PLC0415
    from spanvm.kube import Kube  # noqa: PLC0415

    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig  # Kopf's login reads it
    _setup_logging(args.log_format)
    config = OperatorConfig(
        system_namespace=args.system_namespace,
        namespaces=list(args.namespaces),
        timer_interval=args.timer_interval,
        deletion_grace=args.deletion_grace,
        node_loss_grace=args.node_loss_grace,
        restart_backoff=args.restart_backoff,
    )
    asyncio.run(
        run_operator(
            Kube.connect(args.kubeconfig),
            config,
            lease_name=args.lease_name,
            lease_duration=args.lease_duration,
            metrics_port=args.metrics_port,
            health_port=args.health_port,
            hooks=hooks,
        )
    )


operator = _with(_cluster_options("the agents' heartbeat Leases and the operator Lease"), operator)


@click.command()
@click.option("--node-name", envvar="NODE_NAME", help="this node (env NODE_NAME)")
@click.option(
    "--fabric-address",
    envvar="FABRIC_ADDRESS",
    default="127.0.0.1",
    show_default=True,
    help="address fragment fabric listeners bind to (env FABRIC_ADDRESS, e.g. the host IP)",
)
@click.option("--kvm-device", default="/dev/kvm", show_default=True, help="KVM device")
@click.option(
    "--state-dir",
    envvar="SPANVM_STATE_DIR",
    default="/var/lib/spanvm",
    show_default=True,
    help="where fragment state lives (per node subdirectory); must survive agent restarts",
)
@click.option("--guest-vcpus", type=int, help="offer at most this many vCPUs")
@click.option("--guest-memory", help="offer at most this much guest memory (quantity)")
@click.option("--lease-duration", type=int, default=20, show_default=True, help="Lease seconds")
@click.option(
    "--renew-interval", type=POSITIVE, default=5.0, show_default=True, help="Lease renewals"
)
@click.option(
    "--capability-interval",
    type=POSITIVE,
    default=60.0,
    show_default=True,
    help="seconds between capability re-checks",
)
@click.option(
    "--metrics-port", type=int, help="serve /metrics (per fragment) and /healthz on this port"
)
@click.option(
    "--stop-fragments-on-exit",
    is_flag=True,
    envvar="SPANVM_STOP_FRAGMENTS_ON_EXIT",
    help="on SIGTERM/SIGINT stop this node's fragments too (SIGTERM, SIGKILL after 8 s)"
    " instead of leaving them for the next agent to adopt (env SPANVM_STOP_FRAGMENTS_ON_EXIT)",
)
def agent(**options: Any) -> None:
    """Run the node agent (what the DaemonSet runs) until stopped."""
    from pathlib import Path  # noqa: PLC0415

    from spanvm.agent.main import run as run_agent  # noqa: PLC0415
    from spanvm.agent.node_publisher import NodePublisher, Offer  # noqa: PLC0415
    from spanvm.kube import Kube  # noqa: PLC0415
    from spanvm.sealing import load_or_create  # noqa: PLC0415

    args = argparse.Namespace(**options)
    if not args.node_name:
        raise click.UsageError("--node-name (or NODE_NAME) is required")
    try:  # a node's offer, not one guest's size: any whole number of bytes
        offer_memory = parse_quantity_bytes(args.guest_memory) if args.guest_memory else None
    except ValueError as err:
        raise click.UsageError(f"--guest-memory: {err}") from None
    _setup_logging(args.log_format)
    kube = Kube.connect(args.kubeconfig)
    publisher = NodePublisher(
        kube,
        args.node_name,
        args.system_namespace,
        kvm_device=args.kvm_device,
        offer=Offer(vcpus=args.guest_vcpus, memory=offer_memory),
        lease_duration=args.lease_duration,
        # beside the node's fragment directory (which holds only fragments' directories)
        node_key=load_or_create(Path(args.state_dir) / f"{args.node_name}.fabric.key"),
    )
    run_agent(
        kube,
        publisher,
        state_dir=Path(args.state_dir) / args.node_name,
        listen_host=args.fabric_address,
        renew_interval=args.renew_interval,
        capability_interval=args.capability_interval,
        stop_fragments_on_exit=args.stop_fragments_on_exit,
        metrics_port=args.metrics_port,
    )


agent = _with(_cluster_options("the heartbeat Lease"), agent)


@click.command()
@click.option("--kubeconfig", help="kubeconfig file (default: in-cluster, then ~/.kube)")
@click.option(
    "--log-format", type=click.Choice(("plain", "json")), default="plain", show_default=True
)
@click.option(
    "--namespace",
    "namespaces",
    multiple=True,
    help="only this namespace (repeatable; default: all)",
)
@click.option(
    "--timeout",
    type=POSITIVE,
    default=90.0,
    show_default=True,
    help="seconds to wait for the operator before removing finalizers itself",
)
def uninstall(
    kubeconfig: str | None, log_format: str, namespaces: tuple[str, ...], timeout: float
) -> None:
    """Delete every SpanningVM so none is stuck once the operator is gone (the chart's
    pre-delete hook)."""
    from spanvm.controller.uninstall import delete_all  # noqa: PLC0415
    from spanvm.kube import Kube  # noqa: PLC0415

    _setup_logging(log_format)
    forced = delete_all(Kube.connect(kubeconfig), list(namespaces), timeout=timeout)
    click.echo(f"every SpanningVM deleted; {len(forced)} had their finalizer removed")
