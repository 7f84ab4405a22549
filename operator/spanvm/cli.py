"""The `spanvm` command line (click): run a guest locally (`run`, `fragment`), probe KVM
(`kvm-info`), run the operator and the agent, and act on SpanningVMs through the API server
with kubectl's habits (`status`, `console`, `start`, `stop`, `restart`, `pause`, `unpause`,
`wait`; `spanvm.commands`). Also installed as the kubectl plugin `kubectl spanvm`.

Exit statuses: a guest's own for `run` (`spanvm.exitstatus`), 2 for a usage error, 1 for a
failure the cluster reports (NotFound, Forbidden, unreachable), 141 when the reader of the
output went away (`spanvm kvm-info | head`); every error is one line on stderr.
"""

import argparse
import dataclasses
import importlib
import math
import os
import sys
import threading
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import click

from spanvm.agent.capabilities import discover
from spanvm.api.quantity import parse_memory
from spanvm.commands.errors import CliError
from spanvm.contract import CpuFeatures, Finished, MultibootKernel, last_of
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
from spanvm.vmm.boot import BootError, BootSource, GuestShape
from spanvm.vmm.boot.linux import LinuxBoot
from spanvm.vmm.boot.multiboot import MultibootBoot
from spanvm.vmm.boot.payload import PayloadBoot
from spanvm.vmm.cpuid import CpuidOptions
from spanvm.vmm.layout import MAX_VCPUS
from spanvm.vmm.machine import Machine, VmConfig, VmError

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a C program killed by it would report
EXIT_INTERRUPTED = 130  # 128 + SIGINT


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


def cmd_run(args: argparse.Namespace) -> int:
    """Run one guest in this process and stream its console; exit with the guest's code.
    An unusable kernel, module, initrd or image (BootError, raised before any vCPU runs) is
    a usage error (2); `spanvm fragment` keeps 70 for it (the agent reports a failed VM)."""
    try:
        return _cmd_run(args)
    except BootError as err:
        raise UsageError(str(err)) from None


def _cmd_run(args: argparse.Namespace) -> int:
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
    if not math.isfinite(args.timeout) or args.timeout <= 0:
        raise UsageError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    info = PAYLOADS.get(args.payload)
    if info and args.vcpus < info.min_vcpus:
        raise UsageError(f"payload {info.name} needs --vcpus >= {info.min_vcpus}")
    if args.arg is not None and not 0 <= args.arg < 1 << 64:
        raise UsageError(f"--arg must be >= 0 and < 2**64 (one 64-bit register), got {args.arg}")
    boot = _boot_source(args)
    if isinstance(boot, MultibootBoot) and (args.fragments > 1 or args.netns):
        with StopSignals() as stops:
            return _run_fragments(args, boot, memory, stops)
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
                return _run_fragments(args, PayloadBoot(image, arg), memory, stops, payload)
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
    return CpuidOptions(cx16=not args.no_cx16, x2apic=not args.no_x2apic)


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
    args: argparse.Namespace,
    boot: MultibootBoot | PayloadBoot,
    memory: int,
    stops: StopSignals,
    payload: str = "",
) -> int:
    """The guest split over local fragment processes joined by the fabric (`--fragments`
    already checked by cmd_run). `payload`: what the fragments name a PayloadBoot's image by
    (a catalog name or a path). The boot source is checked here, in this process, so bad
    input is refused naming the file (as in one process), not by a child."""
    boot.check(GuestShape(memory, args.vcpus))
    multiboot, arg = None, 0
    if isinstance(boot, MultibootBoot):
        multiboot = MultibootKernel(
            kernel=str(boot.kernel), modules=[str(m) for m in boot.modules], cmdline=boot.cmdline
        )
    else:
        arg = boot.arg
    try:
        with launch(
            payload,
            args.vcpus,
            memory,
            args.fragments,
            arg=arg,
            idle_timeout=args.timeout,
            netns=args.netns,
            multiboot=multiboot,
            cpu=CpuFeatures(**dataclasses.asdict(_cpuid(args))),
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


def spanvm_version() -> str:
    """This package's version."""
    try:
        return package_version("spanvm")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


# Commands whose modules load the Kubernetes client or Kopf (a second or more on a busy
# machine): imported only when named, so `spanvm run` and `spanvm fragment` (one per guest
# fragment) start as fast as before and install their signal handlers at once.
LAZY_COMMANDS = {
    **{
        name: f"spanvm.commands.vm:{name}"
        for name in ("status", "console", "wait", "start", "stop", "restart", "pause", "unpause")
    },
    "operator": "spanvm.commands.daemons:operator",
    "agent": "spanvm.commands.daemons:agent",
    "uninstall": "spanvm.commands.daemons:uninstall",
}


class ReaderGone(Exception):  # noqa: N818 - an event, not an error
    """stdout's reader went away (EPIPE). Not an OSError, so click's own handling of EPIPE
    (exit 1) does not apply: main() exits 141 as a program killed by SIGPIPE would."""


class LazyGroup(click.Group):
    """A group whose LAZY_COMMANDS are imported when used (click's documented pattern)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise ReaderGone from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in LAZY_COMMANDS:
            return super().get_command(ctx, cmd_name)
        module, attribute = LAZY_COMMANDS[cmd_name].split(":")
        command = getattr(importlib.import_module(module), attribute)
        assert isinstance(command, click.Command)
        return command


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    no_args_is_help=True,
)
@click.version_option(
    spanvm_version(), "--version", prog_name="spanvm", message="%(prog)s %(version)s"
)
def cli() -> None:
    """spanvm: KVM virtual machines spanning several nodes."""


@cli.command(
    epilog="Exit status: the guest's exit code; 2 bad arguments (also a kernel, module or"
    " image that is missing, unusable or does not fit), 70 the VM stopped on an"
    " error, 124 --timeout, 125 a guest exit code above 255 (printed in full on stderr),"
    " 128+N stopped by signal N (SIGTERM, SIGINT, SIGHUP: every fragment ends within 6 s)."
)
@click.argument("payload", required=False)
@click.option(
    "--multiboot",
    metavar="KERNEL",
    help="boot a Multiboot kernel (ELF, e.g. a kvm-unit-tests .flat) instead of a payload",
)
@click.option(
    "--module",
    multiple=True,
    metavar="FILE",
    help="a Multiboot module (repeatable; kvm-unit-tests: its environment file)",
)
@click.option("--kernel", help="boot this Linux kernel (vmlinux or bzImage) instead")
@click.option("--initrd", help="with --kernel: the initrd (e.g. a cpio archive)")
@click.option("--cmdline", default="", help="the kernel command line")
@click.option(
    "--no-cx16",
    is_flag=True,
    help="hide CMPXCHG16B in CPUID (this machine's KVM cannot emulate it at CPL0)",
)
@click.option("--no-x2apic", is_flag=True, help="hide x2APIC in CPUID (the guest uses xAPIC)")
@click.option("--vcpus", type=int, default=1, show_default=True, help="virtual CPUs")
@click.option("--memory", default="256Mi", show_default=True, help="guest memory quantity")
@click.option("--arg", type=int, default=None, help="payload argument (default: the payload's)")
@click.option(
    "--timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="stop a guest idle for this many seconds, exit status 124; idle: no console output"
    " and no exit to the monitor (doorbell, port I/O) from its vCPUs (with --fragments:"
    " fragment 0's vCPUs; console output from any vCPU counts)",
)
@click.option(
    "--fragments",
    type=int,
    default=1,
    show_default=True,
    help="split the guest over this many local fragment processes (1: in process)",
)
@click.option(
    "--netns",
    is_flag=True,
    help="run each fragment in its own network namespace (veth + bridge); needs root",
)
def run(**options: Any) -> int:
    # cmd_run and its helpers read the options as attributes, as they always have.
    return cmd_run(argparse.Namespace(**options))


run.help = (
    "Run a guest payload locally under KVM and exit with its exit code.\n\nPAYLOAD is a"
    f" payload name ({', '.join(PAYLOAD_NAMES)}) or the path of a flat binary."
)


@cli.command()
@click.option("--status-fd", type=int, default=None, help="write JSON progress lines here")
@click.option(
    "--parent-pid",
    type=int,
    default=None,
    help="die (SIGKILL) when this parent process ends; exit at once if it already has",
)
def fragment(status_fd: int | None, parent_pid: int | None) -> int:
    """Run one fragment (configuration as JSON on stdin)."""
    return cmd_fragment(argparse.Namespace(status_fd=status_fd, parent_pid=parent_pid))


@cli.command(name="kvm-info")
@click.option("--device", default="/dev/kvm", show_default=True, help="KVM device to probe")
@click.option("--json", "as_json", is_flag=True, help="print the full report as JSON")
def kvm_info(device: str, as_json: bool) -> int:
    """Probe KVM and this node as the agent would."""
    return cmd_kvm_info(argparse.Namespace(device=device, json=as_json))


@cli.command()
def version() -> None:
    """Print spanvm's version."""
    click.echo(f"spanvm {spanvm_version()}")


@cli.command()
@click.argument("shell", type=click.Choice(("bash", "zsh", "fish")))
def completion(shell: str) -> None:
    """Print the shell completion script (bash: `source <(spanvm completion bash)`)."""
    from click.shell_completion import get_completion_class  # noqa: PLC0415

    completer = get_completion_class(shell)
    assert completer is not None
    prog = _prog_name()
    variable = "_" + prog.replace("-", "_").replace(" ", "_").upper() + "_COMPLETE"
    click.echo(completer(cli, {}, prog.replace(" ", "-"), variable).source())


def _prog_name() -> str:
    """`spanvm`, or `kubectl spanvm` when run as the kubectl plugin."""
    return "kubectl spanvm" if Path(sys.argv[0]).name == "kubectl-spanvm" else "spanvm"


def _usage_line(err: click.UsageError) -> str:
    if isinstance(err, click.exceptions.NoArgsIsHelpError) and err.ctx is not None:
        return err.ctx.get_help()
    where = err.ctx.command_path if err.ctx is not None else _prog_name()
    return f"spanvm: error: {err.format_message()} (see '{where} --help')"


def _reader_gone() -> int:
    """stdout's reader went away: no traceback, and nothing more to write at exit either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `spanvm` and `kubectl-spanvm` console scripts."""
    try:
        code = cli.main(args=argv, prog_name=_prog_name(), standalone_mode=False)
        sys.stdout.flush()
    except click.UsageError as err:
        print(_usage_line(err), file=sys.stderr)
        return EXIT_USAGE
    except click.ClickException as err:
        print(f"spanvm: error: {err.format_message()}", file=sys.stderr)
        return err.exit_code
    except UsageError as err:
        print(f"spanvm: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except CliError as err:
        print(f"spanvm: error: {err}", file=sys.stderr)
        return err.status
    except (VmError, PayloadBuildError) as err:
        print(f"spanvm: error: {err}", file=sys.stderr)
        return EXIT_VM_ERROR
    except (BrokenPipeError, ReaderGone):
        return _reader_gone()
    except (click.Abort, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
