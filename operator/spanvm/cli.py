"""The `spanvm` command line: run a guest locally, report KVM capabilities, write the CRDs."""

import argparse
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from spanvm.agent.capabilities import discover
from spanvm.api.quantity import parse_memory, parse_quantity_bytes
from spanvm.contract import Finished, last_of
from spanvm.exitstatus import (
    EXIT_TIMEOUT,
    EXIT_USAGE,
    EXIT_VM_ERROR,
    guest_status,
    signal_status,
    too_large_message,
)
from spanvm.fabric.fragment import main as fragment_main
from spanvm.fabric.launcher import STOP_GRACE, LaunchError, LocalVm, launch, split_vcpus
from spanvm.payloads.build import PayloadBuildError, resolve_image
from spanvm.payloads.catalog import PAYLOAD_NAMES, PAYLOADS
from spanvm.procs import die_with_parent
from spanvm.stopsignals import Interrupted, StopSignals
from spanvm.vmm.boot import BootSource
from spanvm.vmm.boot.linux import LinuxBoot
from spanvm.vmm.boot.multiboot import MultibootBoot
from spanvm.vmm.cpuid import CpuidOptions
from spanvm.vmm.layout import MAX_VCPUS
from spanvm.vmm.machine import Machine, VmConfig, VmError

if TYPE_CHECKING:
    from spanvm.controller.reconcile import Hooks


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def cmd_run(args: argparse.Namespace) -> int:
    """Run one guest in this process and stream its console; exit with the guest's code."""
    try:
        memory = parse_memory(args.memory)
    except ValueError as err:
        raise UsageError(f"--memory: {err}") from None
    if not 1 <= args.vcpus <= MAX_VCPUS:
        raise UsageError(f"--vcpus must be between 1 and {MAX_VCPUS}, got {args.vcpus}")
    try:
        split_vcpus(args.vcpus, args.fragments)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {args.timeout}")
    info = PAYLOADS.get(args.payload)
    if info and args.vcpus < info.min_vcpus:
        raise UsageError(f"payload {info.name} needs --vcpus >= {info.min_vcpus}")
    if args.arg is not None and args.arg < 0:
        raise UsageError(f"--arg must be >= 0, got {args.arg}")
    boot = _boot_source(args)
    if boot is not None:
        if args.fragments > 1 or args.netns:
            raise UsageError(
                f"{boot.description} runs in one process for now (--fragments 1, no --netns)"
            )
        with StopSignals() as stops:
            return _run_here(
                args, VmConfig(memory, args.vcpus, boot=boot, cpuid=_cpuid(args)), stops
            )
    try:
        image = resolve_image(args.payload)
    except ValueError as err:
        raise UsageError(str(err)) from None
    arg = args.arg if args.arg is not None else (info.default_arg if info else 0)
    with StopSignals() as stops:
        try:
            if args.fragments > 1 or args.netns:
                payload = args.payload if info else str(image.path)
                return _run_fragments(args, payload, memory, arg, stops)
            config = VmConfig(memory, args.vcpus, image, arg, cpuid=_cpuid(args))
            return _run_here(args, config, stops)
        except Interrupted as stop:
            print(f"spanvm: {stop} while starting; nothing left running", file=sys.stderr)
            return signal_status(stop.signal)


def _boot_source(args: argparse.Namespace) -> BootSource | None:
    """The boot source the options name, or None for a payload (exactly one must be given)."""
    if args.kernel:
        if args.payload or args.multiboot or args.module:
            raise UsageError("--kernel boots Linux alone: no payload, --multiboot or --module")
        initrd = Path(args.initrd) if args.initrd else None
        return LinuxBoot(Path(args.kernel), initrd, args.cmdline)
    if args.initrd:
        raise UsageError("--initrd needs --kernel")
    if args.multiboot:
        if args.payload:
            raise UsageError(f"give a payload or --multiboot, not both (got {args.payload!r})")
        modules = tuple(Path(m) for m in args.module)
        return MultibootBoot(Path(args.multiboot), args.cmdline, modules)
    if args.module or args.cmdline:
        raise UsageError("--module and --cmdline need a kernel (--kernel or --multiboot)")
    if not args.payload:
        raise UsageError("give a payload name or file, --kernel KERNEL or --multiboot KERNEL")
    return None


def _cpuid(args: argparse.Namespace) -> CpuidOptions:
    return CpuidOptions(cx16=not args.no_cx16)


def _run_here(args: argparse.Namespace, config: VmConfig, stops: StopSignals) -> int:
    """The guest in this process. A stop signal stops the vCPUs; if they have not stopped
    within STOP_GRACE seconds (a console write blocked on a full pipe, say), the process
    exits anyway."""

    def sink(data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    with Machine(config, console_sink=sink) as machine:
        bound = threading.Thread(target=_exit_unless_stopped, args=(stops,), daemon=True)

        def stop(reason: str) -> bool:
            if not bound.is_alive():
                bound.start()
            machine.fail(reason)
            return True

        stops.action = stop
        result = machine.run(idle_timeout=args.timeout)
    if stops.received is not None:
        print(f"spanvm: stopped by {stops.received.name}; the VM ended", file=sys.stderr)
        return signal_status(stops.received)
    if result.error:
        print(
            f"spanvm: {'timeout' if result.timed_out else 'vm error'}: {result.error}",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT if result.timed_out else EXIT_VM_ERROR
    assert result.exit_code is not None
    return _guest_status(result.exit_code)


def _exit_unless_stopped(stops: StopSignals) -> None:
    """The bound on a signalled stop of an in-process VM: gone within STOP_GRACE seconds."""
    threading.Event().wait(STOP_GRACE)
    assert stops.received is not None
    print(
        f"spanvm: stopped by {stops.received.name}; the vCPUs did not stop within"
        f" {STOP_GRACE:g}s, exiting without them",
        file=sys.stderr,
    )
    os._exit(signal_status(stops.received))


def _guest_status(code: int) -> int:
    """The exit status for the guest's code, saying so on stderr if it does not fit."""
    message = too_large_message(code)
    if message:
        print(message, file=sys.stderr)
    return guest_status(code)


def _run_fragments(
    args: argparse.Namespace, payload: str, memory: int, arg: int, stops: StopSignals
) -> int:
    """The guest split over local fragment processes joined by the fabric (`--fragments`
    already checked by cmd_run)."""
    try:
        with launch(
            payload,
            args.vcpus,
            memory,
            args.fragments,
            arg=arg,
            idle_timeout=args.timeout,
            netns=args.netns,
        ) as vm:
            stops.action = vm.request_stop
            code = vm.wait()
    except (LaunchError, RuntimeError) as err:
        raise VmError(str(err)) from None
    if stops.received is not None:
        ended = "every fragment ended" + (" (some killed)" if vm.killed else "")
        print(f"spanvm: stopped by {stops.received.name}; {ended}", file=sys.stderr)
        return signal_status(stops.received)
    return _fragments_status(vm, code)


def _fragments_status(vm: LocalVm, code: int) -> int:
    """Fragment 0 exits with guest_status() of the guest's code: say the full code if it
    did not fit (fragment 0's `finished` event carries it)."""
    finished = last_of(vm.fragments[0].events, Finished)
    if finished is not None and finished.exit_code is not None and not finished.error:
        message = too_large_message(finished.exit_code)
        if message:
            print(message, file=sys.stderr)
    return code


def cmd_fragment(args: argparse.Namespace) -> int:
    """One fragment process (started by `spanvm run --fragments` or the node agent)."""
    if args.parent_pid is not None and not die_with_parent(args.parent_pid):
        print(f"spanvm fragment: parent {args.parent_pid} ended before it started", file=sys.stderr)
        return EXIT_VM_ERROR
    return fragment_main(args.status_fd)


def cmd_kvm_info(args: argparse.Namespace) -> int:
    """Print what the node agent would find and publish about this machine."""
    found = discover(args.device)
    if args.json:
        print(found.details())
        return 0 if found.kvm.usable else 1
    kvm = found.kvm
    print(f"KVM usable       {'yes' if kvm.usable else 'no: ' + (kvm.error or '')}")
    for name, value in kvm.capabilities.items():
        print(f"  {name:14} {value}")
    print(f"flavour          {found.flavour} (cpu flags: {', '.join(found.cpu_flags) or 'none'})")
    print(f"allocatable      {found.allocatable_vcpus} vCPUs, {found.allocatable_memory >> 20} MiB")
    for key, label in found.labels().items():
        print(f"label            {key}={label}")
    return 0 if kvm.usable else 1


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


def cmd_operator(args: argparse.Namespace, hooks: "Hooks | None" = None) -> int:
    """Run the operator until stopped (SIGTERM/SIGINT); `hooks`: fault injection (tests)."""
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
        namespaces=args.namespace or [],
        timer_interval=args.timer_interval,
        deletion_grace=args.deletion_grace,
        node_loss_grace=args.node_loss_grace,
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
    return 0


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _add_cluster_args(parser: argparse.ArgumentParser, leases: str) -> None:
    """Options the long-running commands share: where the API is, the system namespace, logs."""
    import os  # noqa: PLC0415

    from spanvm.api.constants import SYSTEM_NAMESPACE  # noqa: PLC0415

    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then ~/.kube)")
    parser.add_argument(
        "--system-namespace",
        default=os.environ.get("SPANVM_NAMESPACE", SYSTEM_NAMESPACE),
        help=f"namespace of {leases} (env SPANVM_NAMESPACE)",
    )
    parser.add_argument("--log-format", choices=("plain", "json"), default="plain")


def _add_operator_parser(sub: "argparse._SubParsersAction[_Parser]") -> None:

    from spanvm.api.constants import OPERATOR_LEASE  # noqa: PLC0415

    op = sub.add_parser("operator", help="run the operator (Kopf handlers behind a leader Lease)")
    _add_cluster_args(op, "the agents' heartbeat Leases and the operator Lease")
    op.add_argument(
        "--namespace",
        action="append",
        help="watch only this namespace (repeatable; default: all namespaces)",
    )
    op.add_argument("--lease-name", default=OPERATOR_LEASE, help="the leader-election Lease")
    op.add_argument("--lease-duration", type=int, default=15, help="leader Lease seconds")
    op.add_argument(
        "--timer-interval", type=_positive, default=5.0, help="seconds between re-checks of a VM"
    )
    op.add_argument(
        "--deletion-grace",
        type=_positive,
        default=60.0,
        help="seconds a deletion waits for fragments to stop before forcing",
    )
    op.add_argument(
        "--node-loss-grace",
        type=_positive,
        default=40.0,
        help="seconds a node must stay NotReady or silent before an Always VM is restarted",
    )
    op.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    op.add_argument(
        "--health-port",
        type=int,
        help="serve /healthz on this port (Kopf's liveness endpoint while leading)",
    )
    op.set_defaults(func=cmd_operator)


def cmd_agent(args: argparse.Namespace) -> int:
    """Run the node agent until stopped."""
    from pathlib import Path  # noqa: PLC0415

    from spanvm.agent.main import run as run_agent  # noqa: PLC0415
    from spanvm.agent.node_publisher import NodePublisher, Offer  # noqa: PLC0415
    from spanvm.kube import Kube  # noqa: PLC0415
    from spanvm.sealing import load_or_create  # noqa: PLC0415

    if not args.node_name:
        raise UsageError("--node-name (or NODE_NAME) is required")
    _setup_logging(args.log_format)
    try:  # a node's offer, not one guest's size: any whole number of bytes
        offer_memory = parse_quantity_bytes(args.guest_memory) if args.guest_memory else None
    except ValueError as err:
        raise UsageError(f"--guest-memory: {err}") from None
    kube = Kube.connect(args.kubeconfig)
    offer = Offer(
        vcpus=args.guest_vcpus,
        memory=offer_memory,
    )
    publisher = NodePublisher(
        kube,
        args.node_name,
        args.system_namespace,
        kvm_device=args.kvm_device,
        offer=offer,
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
    return 0


def _add_agent_parser(sub: "argparse._SubParsersAction[_Parser]") -> None:
    import os  # noqa: PLC0415

    agent = sub.add_parser("agent", help="run the node agent (what the DaemonSet runs)")
    agent.add_argument(
        "--node-name", default=os.environ.get("NODE_NAME"), help="this node (env NODE_NAME)"
    )
    _add_cluster_args(agent, "the heartbeat Lease")
    agent.add_argument(
        "--fabric-address",
        default=os.environ.get("FABRIC_ADDRESS", "127.0.0.1"),
        help="address fragment fabric listeners bind to (env FABRIC_ADDRESS, e.g. the host IP)",
    )
    agent.add_argument("--kvm-device", default="/dev/kvm", help="KVM device to probe and use")
    agent.add_argument(
        "--state-dir",
        default=os.environ.get("SPANVM_STATE_DIR", "/var/lib/spanvm"),
        help="where fragment state lives (per node subdirectory); must survive agent restarts",
    )
    agent.add_argument("--guest-vcpus", type=int, help="offer at most this many vCPUs")
    agent.add_argument("--guest-memory", help="offer at most this much guest memory (quantity)")
    agent.add_argument("--lease-duration", type=int, default=20, help="heartbeat Lease seconds")
    agent.add_argument(
        "--renew-interval", type=_positive, default=5.0, help="seconds between Lease renewals"
    )
    agent.add_argument(
        "--capability-interval",
        type=_positive,
        default=60.0,
        help="seconds between capability re-checks",
    )
    agent.add_argument(
        "--metrics-port", type=int, help="serve /metrics (per fragment) and /healthz on this port"
    )
    agent.add_argument(
        "--stop-fragments-on-exit",
        action="store_true",
        default=os.environ.get("SPANVM_STOP_FRAGMENTS_ON_EXIT", "") not in ("", "0", "false"),
        help="on SIGTERM/SIGINT stop this node's fragments too (SIGTERM, SIGKILL after 8 s)"
        " instead of leaving them for the next agent to adopt (env SPANVM_STOP_FRAGMENTS_ON_EXIT)",
    )
    agent.set_defaults(func=cmd_agent)


def cmd_uninstall(args: argparse.Namespace) -> int:
    """Delete every SpanningVM before the operator goes (the chart's pre-delete hook)."""
    from spanvm.controller.uninstall import delete_all  # noqa: PLC0415
    from spanvm.kube import Kube  # noqa: PLC0415

    _setup_logging(args.log_format)
    kube = Kube.connect(args.kubeconfig)
    forced = delete_all(kube, args.namespace or [], timeout=args.timeout)
    print(f"every SpanningVM deleted; {len(forced)} had their finalizer removed")
    return 0


def _add_uninstall_parser(sub: "argparse._SubParsersAction[_Parser]") -> None:
    hook = sub.add_parser(
        "uninstall", help="delete every SpanningVM so none is stuck once the operator is gone"
    )
    hook.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then ~/.kube)")
    hook.add_argument("--log-format", choices=("plain", "json"), default="plain")
    hook.add_argument(
        "--namespace", action="append", help="only this namespace (repeatable; default: all)"
    )
    hook.add_argument(
        "--timeout",
        type=_positive,
        default=90.0,
        help="seconds to wait for the operator before removing finalizers itself",
    )
    hook.set_defaults(func=cmd_uninstall)


def cmd_status(args: argparse.Namespace) -> int:
    """Print a SpanningVM's phase, conditions and placement (or its console tail)."""
    from spanvm.kube import Kube  # noqa: PLC0415
    from spanvm.status_view import console, describe  # noqa: PLC0415

    vm = Kube.connect(args.kubeconfig).get_vm(args.namespace, args.name)
    if vm is None:
        raise UsageError(f"SpanningVM {args.namespace}/{args.name} not found")
    text = console(vm) if args.command == "console" else describe(vm)
    print(text, end="" if text.endswith("\n") else "\n")
    return 0


def _add_status_parsers(sub: "argparse._SubParsersAction[_Parser]") -> None:
    for name, text in (
        ("status", "show a SpanningVM's phase, conditions and where its vCPUs run"),
        ("console", "show the last lines of a SpanningVM's guest console"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("name", help="SpanningVM name")
        cmd.add_argument("-n", "--namespace", default="default", help="its namespace")
        cmd.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG, ~/.kube)")
        cmd.set_defaults(func=cmd_status)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="spanvm", description="spanvm: KVM virtual machines spanning several nodes"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser(
        "run",
        help="run a guest payload locally under KVM",
        description="Run a guest and exit with its exit code: 2 bad arguments, 70 the VM"
        " stopped on an error, 124 --timeout, 125 a guest exit code above 255 (printed in full"
        " on stderr), 128+N stopped by signal N (SIGTERM, SIGINT, SIGHUP: every fragment ends"
        " within 6 s).",
    )
    run.add_argument(
        "payload",
        nargs="?",
        help=f"payload name ({', '.join(PAYLOAD_NAMES)}) or path of a flat binary",
    )
    run.add_argument(
        "--multiboot",
        metavar="KERNEL",
        help="boot a Multiboot kernel (ELF, e.g. a kvm-unit-tests .flat) instead of a payload",
    )
    run.add_argument(
        "--module",
        action="append",
        default=[],
        metavar="FILE",
        help="a Multiboot module (repeatable; kvm-unit-tests: its environment file)",
    )
    run.add_argument("--kernel", help="boot this Linux kernel (vmlinux or bzImage) instead")
    run.add_argument("--initrd", help="with --kernel: the initrd (e.g. a cpio archive)")
    run.add_argument("--cmdline", default="", help="the kernel command line")
    run.add_argument(
        "--no-cx16",
        action="store_true",
        help="hide CMPXCHG16B in CPUID (this machine's KVM cannot emulate it at CPL0)",
    )
    run.add_argument("--vcpus", type=int, default=1, help="virtual CPUs (default 1)")
    run.add_argument("--memory", default="256Mi", help="guest memory quantity (default 256Mi)")
    run.add_argument(
        "--arg", type=int, default=None, help="payload argument (default: the payload's)"
    )
    run.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="stop a guest idle for this many seconds (default 30), exit status 124; idle: no"
        " console output and no exit to the monitor (doorbell, port I/O) from its vCPUs (with"
        " --fragments: fragment 0's vCPUs; console output from any vCPU counts)",
    )
    run.add_argument(
        "--fragments",
        type=int,
        default=1,
        help="split the guest over this many local fragment processes (default 1: in process)",
    )
    run.add_argument(
        "--netns",
        action="store_true",
        help="run each fragment in its own network namespace (veth + bridge); needs root",
    )
    run.set_defaults(func=cmd_run)
    frag = sub.add_parser("fragment", help="run one fragment (configuration as JSON on stdin)")
    frag.add_argument("--status-fd", type=int, default=None, help="write JSON progress lines here")
    frag.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="die (SIGKILL) when this parent process ends; exit at once if it already has",
    )
    frag.set_defaults(func=cmd_fragment)
    info = sub.add_parser("kvm-info", help="probe KVM and this node as the agent would")
    info.add_argument("--device", default="/dev/kvm", help="KVM device to probe")
    info.add_argument("--json", action="store_true", help="print the full report as JSON")
    info.set_defaults(func=cmd_kvm_info)
    _add_operator_parser(sub)
    _add_agent_parser(sub)
    _add_status_parsers(sub)
    _add_uninstall_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `spanvm` console script."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except UsageError as err:
        print(f"spanvm: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (VmError, PayloadBuildError) as err:
        print(f"spanvm: error: {err}", file=sys.stderr)
        return EXIT_VM_ERROR


if __name__ == "__main__":
    sys.exit(main())
