"""One fragment process: a KVM VM running some of the guest's vCPUs, its memory kept coherent
with the other fragments through the fabric.

Started as `spanvm fragment` with its configuration (including the VM's secret) as JSON on
standard input, never on the command line (the contract: `spanvm.contract`). Fragment 0
holds vCPU 0 and reports for the whole VM: it prints the console of every vCPU and exits
with the guest's exit code; the others exit 0 when the VM ends. A lost peer stops every
fragment with an error naming it (exit 70). Its events (`spanvm.contract.FragmentEvent`) go
one per line to the file descriptor `--status-fd` (the launcher or agent reads the fabric
endpoint from there).

Exit status (fragment 0 reports for the VM; see spanvm/exitstatus.py): the guest's exit code
(125 if above 255), 70 on an error, 124 when `idle_timeout` stopped the guest, 128+N when
signal N (SIGTERM, SIGINT, SIGHUP) stopped it. A stop signal stops this fragment quietly: its
launcher or agent asked, and says so itself.

PAUSE_SIGNAL holds this fragment's vCPUs outside the guest and RESUME_SIGNAL lets them run
again (`spanvm pause`, through the agent; spanvm.contract); the fabric keeps serving pages
and heartbeats meanwhile, so the other fragments neither stall on its pages nor take it for
lost. Each is acknowledged with a Paused or Resumed event.
"""

import contextlib
import logging
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from spanvm.contract import (
    PAUSE_SIGNAL,
    RESUME_SIGNAL,
    Connected,
    ContractError,
    Counters,
    CpuFeatures,
    Emit,
    EventWriter,
    Failed,
    FaultHistogram,
    Finished,
    FragmentConfig,
    Listening,
    Paused,
    Resumed,
    read_config,
)
from spanvm.exitstatus import EXIT_TIMEOUT, guest_status, signal_status
from spanvm.fabric.coherence import (
    MAX_SAMPLES,
    READAHEAD,
    Coherence,
    migrates,
    nearest_rank,
    readahead_count,
)
from spanvm.fabric.heap import keep_message_buffers
from spanvm.fabric.homes import HomeMap, HomeRange
from spanvm.fabric.shape import image_sha256, vm_shape
from spanvm.fabric.transport import FabricError, Handlers, PeerGoneError, Transport
from spanvm.fabric.uffd import Fault, UffdError, Userfault
from spanvm.fabric.wire import Frame, Kind
from spanvm.payloads.build import resolve_image
from spanvm.stopsignals import Interrupted, StopSignals
from spanvm.vmm.boot import BootSource
from spanvm.vmm.boot.linux import LinuxBoot
from spanvm.vmm.boot.multiboot import MultibootBoot
from spanvm.vmm.boot.payload import PayloadBoot
from spanvm.vmm.cpuid import CpuidOptions
from spanvm.vmm.interrupts import Interrupt
from spanvm.vmm.machine import EXIT_VM_ERROR, Machine, VmConfig, VmError, VmResult
from spanvm.vmm.platform_shape import NumaNode

log = logging.getLogger("spanvm.fragment")
CAUGHT_AT = struct.Struct("<Q")  # an INTERRUPT frame's payload: time.monotonic_ns() of the catch


class InterruptLatency:
    """Catch-to-delivery times of the interrupts delivered here (the proxy's exit in the
    sending fragment to KVM_SIGNAL_MSI returning here), in µs. CLOCK_MONOTONIC is one clock
    only on one host: across hosts the figures say nothing (the log line says "same host")."""

    def __init__(self) -> None:
        self.delivered = 0
        self.micros: list[float] = []

    def record(self, payload: bytes) -> None:
        (caught_ns,) = CAUGHT_AT.unpack(payload)
        self.delivered += 1
        if len(self.micros) < MAX_SAMPLES:
            self.micros.append((time.monotonic_ns() - caught_ns) / 1000)

    def summary(self) -> str:
        """`interrupts delivered here: N; catch-to-delivery p50 X µs, p99 Y µs (same host)`."""
        ordered = sorted(self.micros)
        p50, p99 = nearest_rank(ordered, 50), nearest_rank(ordered, 99)
        return (
            f"interrupts delivered here: {self.delivered}; catch-to-delivery p50 {p50:.0f} µs,"
            f" p99 {p99:.0f} µs (same host)"
        )


STOP_GRACE_SECONDS = 5.0
FAILED_GRACE_SECONDS = 1.0


def unwired(*_args: object) -> NoReturn:
    raise RuntimeError("fabric traffic before the fragment was built")


def protocol_handlers(
    coherence: Coherence,
    on_event: Callable[[int, Frame], None],
    on_failure: Callable[[str], None],
) -> Handlers:
    """What a transport does with each incoming frame: coherence traffic goes to `coherence`
    (requests for pages homed here, directives, grants), events and failures to the caller."""
    return Handlers(
        on_request=lambda peer, frame: coherence.serve(
            peer, frame.kind, frame.page, frame.request, readahead_count(frame), migrates(frame)
        ),
        try_inline=coherence.try_serve_inline,
        on_directive=coherence.on_directive,
        on_grant=coherence.on_grant,
        on_event=on_event,
        on_failure=on_failure,
    )


def _boot_source(config: FragmentConfig) -> BootSource:
    """The payload, or the Linux or Multiboot kernel the configuration names."""
    if config.multiboot is not None:
        modules = tuple(Path(m) for m in config.multiboot.modules)
        return MultibootBoot(Path(config.multiboot.kernel), config.multiboot.cmdline, modules)
    if config.linux is None:
        return PayloadBoot(resolve_image(config.payload), config.arg)
    initrd = Path(config.linux.initrd) if config.linux.initrd else None
    return LinuxBoot(Path(config.linux.kernel), initrd, config.linux.cmdline)


def _numa_nodes(config: FragmentConfig) -> tuple[NumaNode, ...]:
    """One NUMA node per fragment (its vCPUs, the memory it is home for), for the firmware
    tables of a platform guest; one node for everything when the vCPUs' places are not given."""
    if config.vcpu_fragments is None:
        return ()
    return tuple(
        NumaNode(
            index,
            tuple(v for v, f in enumerate(config.vcpu_fragments) if f == index),
            tuple((start, end) for start, end, home in config.homes if home == index),
        )
        for index in range(config.fragment_count)
    )


def _boot_identity(config: FragmentConfig, boot: BootSource) -> dict[str, Any]:
    """What of the boot source the fabric handshake compares (vm_shape's image and extras):
    the image; for a Multiboot kernel its command line, modules and where each vCPU runs;
    CPUID features when not the defaults."""
    extras = [] if config.cpu == CpuFeatures() else [f"cpu={config.cpu.model_dump_json()}"]
    if isinstance(boot, PayloadBoot):
        size = boot.loaded_end - boot.image.load_address
        return {"image": boot.image.path, "image_size": size, "boot": tuple(extras)}
    if isinstance(boot, MultibootBoot):
        extras += [f"cmdline={boot.cmdline}", f"vcpu_fragments={config.vcpu_fragments}"]
        extras += [f"module={image_sha256(m, m.stat().st_size)}" for m in boot.modules]
        return {"image": boot.kernel, "image_size": boot.kernel.stat().st_size, "boot": extras}
    assert config.linux is not None
    kernel = Path(config.linux.kernel)
    return {"image": kernel, "image_size": kernel.stat().st_size, "boot": tuple(extras)}


class Fragment:
    """Builds and runs one fragment."""

    def __init__(
        self,
        config: FragmentConfig,
        console_sink: Callable[[bytes], None] | None,
        status: Emit,
    ) -> None:
        self.config = config
        self.status = status
        self.stopping = threading.Event()
        self.running = False  # the vCPUs were started: a stop request can now stop them
        self.end_known = False  # a STOP or FAILED was sent or received
        self._vcpus_stopped = threading.Event()  # Machine.run returned (for the watchdog)
        self.interrupt_latency = InterruptLatency()
        if config.linux is not None and config.fragment_count > 1:
            raise VmError(
                f"a Linux guest runs in one fragment, not {config.fragment_count}, until"
                " logical-destination IPIs cross fragments"
            )
        self.homes = HomeMap([HomeRange(*h) for h in config.homes])
        self.transport = Transport(
            config.index,
            config.fragment_count,
            bytes.fromhex(config.secret),
            Handlers(*(unwired,) * 6),  # set below, once the coherence exists
        )
        sink = console_sink if config.index == 0 else self._forward_console
        boot = _boot_source(config)
        coherent_from = min(h.start for h in self.homes.homes)
        if boot.platform and coherent_from != 0:
            raise VmError(
                f"{boot.description}: a platform guest's memory must be coherent from"
                f" guest-physical 0, but its homes start at {coherent_from:#x}"
            )
        self.machine = Machine(
            VmConfig(
                config.memory,
                config.vcpu_count,
                boot=boot,
                local_vcpus=tuple(config.vcpu_ids),
                vcpu_nice=config.vcpu_nice,
                cpuid=CpuidOptions(**config.cpu.model_dump()),
                nodes=_numa_nodes(config) if boot.platform else (),
            ),
            console_sink=sink,
            exit_handler=self._on_guest_exit,
            interrupt_sink=self._forward_interrupt,
        )
        # Peers must run the same VM: the handshake compares this (the image is read only now
        # that the machine has checked its size fits).
        self.transport.shape = vm_shape(
            fragment_count=config.fragment_count,
            vcpu_count=config.vcpu_count,
            memory=config.memory,
            arg=config.arg,
            homes=config.homes,
            **_boot_identity(config, boot),
        )
        assert self.machine.memory is not None
        memory = self.machine.memory
        start = memory.host_address + memory.host_offset(coherent_from, 4096)
        self.uffd = Userfault(start, memory.host_address + memory.size - start)
        self.coherence = Coherence(
            config.index,
            memory=memory,
            uffd=self.uffd,
            homes=self.homes,
            send=self.transport.send,
            request=self.transport.request,
            readahead=config.readahead or READAHEAD,
            submit=self.transport.submit,
        )
        self.coherence.adopt_initial_contents(memory.written)
        self.transport.handlers = protocol_handlers(
            self.coherence, self._on_event, self._on_failure
        )
        self._fault_thread = threading.Thread(target=self._fault_loop, name="uffd", daemon=True)

    # -- events ------------------------------------------------------------------------------
    def _forward_console(self, data: bytes) -> None:
        # If fragment 0 is gone, its connection's reader reports how (a failed send does not).
        with contextlib.suppress(PeerGoneError):
            self.transport.send(0, Frame(Kind.CONSOLE, payload=data))

    def _forward_interrupt(self, apic_id: int, interrupt: Interrupt, caught_ns: int) -> None:
        """A local vCPU sent `interrupt` to vCPU `apic_id`, run elsewhere: to its fragment
        (or, when the places of vCPUs are not given, to every peer: only its own takes it),
        with when its proxy caught it (for the latency the receiver logs). A peer gone is
        not decided here: its connection's reader reports it lost."""
        frame = Frame(
            Kind.INTERRUPT,
            page=apic_id,
            request=interrupt.encode(),
            payload=CAUGHT_AT.pack(caught_ns),
        )
        log.debug("interrupt %s for vCPU %d: to its fragment", interrupt, apic_id)
        places = self.config.vcpu_fragments
        if places is not None:
            targets = [places[apic_id]]
        else:
            targets = [i for i in range(self.config.fragment_count) if i != self.config.index]
        for target in targets:
            with contextlib.suppress(PeerGoneError):
                self.transport.send(target, frame)

    def _on_guest_exit(self, code: int) -> None:
        if self.config.index == 0:
            self.machine.finish(code)
        else:
            with contextlib.suppress(PeerGoneError):
                self.transport.send(0, Frame(Kind.EXIT, page=code))

    def _on_event(self, peer: int, frame: Frame) -> None:
        if frame.kind == Kind.INTERRUPT:
            try:
                interrupt = Interrupt.decode(frame.request)
                delivered = self.machine.deliver(frame.page, interrupt)
            except ValueError as err:
                self._on_failure(f"fragment {peer} sent a malformed interrupt: {err}")
                return
            except OSError as err:
                self._on_failure(f"cannot deliver an interrupt to vCPU {frame.page}: {err}")
                return
            if delivered and len(frame.payload) == CAUGHT_AT.size:
                self.interrupt_latency.record(frame.payload)
            elif not delivered and self.config.vcpu_fragments is not None:
                self._on_failure(
                    f"fragment {peer} sent an interrupt for vCPU {frame.page}, which fragment"
                    f" {self.config.index} does not run"
                )
            log.debug("interrupt %s for vCPU %d: delivered %s", interrupt, frame.page, delivered)
        elif frame.kind == Kind.CONSOLE:
            self.machine.console.write(frame.payload)
        elif frame.kind == Kind.EXIT:
            self.machine.finish(frame.page)
        elif frame.kind == Kind.STOP:
            # Forward it first: every link then carries the STOP ahead of this fragment's
            # departure, so no peer mistakes the closing connection for a lost fragment.
            self._end(frame)
            self.machine.finish(frame.page)
        elif frame.kind == Kind.STARTED:
            log.info("%s", frame.payload.decode(errors="replace"))
        elif frame.kind == Kind.FAILED:
            # Relayed as it came: `page` names the fragment where the failure was seen first.
            self._end(frame)
            reason = frame.payload.decode(errors="replace")
            self.machine.fail(f"fragment {frame.page} reports: {reason}")

    def _end(self, frame: Frame) -> None:
        """This fragment learnt or decided that the VM is over (STOP or FAILED)."""
        self.end_known = True
        self.stopping.set()
        self.transport.announce_end(frame)

    def _on_failure(self, message: str) -> None:
        log.error("fragment %d: %s", self.config.index, message)
        self.machine.fail(message)  # first: a blocked send below must not delay the stop
        self._end(Frame(Kind.FAILED, page=self.config.index, payload=message.encode()))

    def stop_quietly(self, reason: str) -> bool:
        """A stop signal: end the VM with `reason` as its error, treating closing connections
        as expected. False before the vCPUs run (the caller then aborts start-up instead).
        Signal-handler safe: sets flags and kicks threads."""
        if not self.running:
            return False
        self.end_known = True  # every fragment is being stopped the same way: no FAILED
        self.stopping.set()
        self.transport.stopping()
        self.machine.fail(reason)
        return True

    def _fault_loop(self) -> None:
        """Serve guest faults until the vCPUs have stopped: a vCPU (or the monitor on its
        thread, reading guest memory) may be waiting on a page while the VM ends. Once the
        VM is ending, a fault the fabric cannot serve gets a zero page: only to let that
        thread run on to its stop, never as guest data the VM goes on with."""
        while not self._vcpus_stopped.is_set():
            for fault in self.uffd.read_faults(0.1):
                if not self.stopping.is_set():
                    try:
                        self.coherence.handle_fault(fault)
                        continue
                    except Exception as err:
                        if not self.stopping.is_set():
                            self.machine.fail(f"page fault service failed: {err}")
                            self.stopping.set()
                # Only once the VM's outcome is recorded (a STOP or FAILED is forwarded
                # first, then recorded): a zeroed page may make a vCPU fault, and that
                # error must not become the VM's.
                self.machine.stop_requested.wait(STOP_GRACE_SECONDS)
                self._release(fault)

    def _release(self, fault: Fault) -> None:
        with contextlib.suppress(UffdError):
            if not self.uffd.install(fault.address, None, writable=True):
                self.uffd.unprotect(fault.address)  # present: a write-protect fault

    # -- running -----------------------------------------------------------------------------
    def run(self) -> VmResult:
        cfg = self.config
        endpoint = self.transport.listen(cfg.listen_host)
        self.status(Listening(index=cfg.index, endpoint=endpoint))
        self.transport.connect(cfg.peers)
        self.transport.wait_connected()
        self.status(Connected(index=cfg.index))
        self._fault_thread.start()
        started = f"fragment {cfg.index} on {cfg.node_name} ({endpoint}) runs vCPUs {cfg.vcpu_ids}"
        if cfg.index == 0:
            log.info("%s", started)
        else:
            # If fragment 0 is already gone, its reader says whether it ended the VM (STOP
            # came first) or was lost; this send failing decides nothing.
            with contextlib.suppress(FabricError):
                self.transport.send(0, Frame(Kind.STARTED, payload=started.encode()))
        watchdog = threading.Thread(target=self._watchdog, daemon=True)
        watchdog.start()
        self.running = True
        result = self.machine.run(idle_timeout=cfg.idle_timeout if cfg.index == 0 else None)
        self._vcpus_stopped.set()
        if self.interrupt_latency.micros:
            log.info("fragment %d: %s", cfg.index, self.interrupt_latency.summary())
        self.stopping.set()
        failed = bool(result.error) and not result.timed_out  # a timeout ends it like an exit
        if cfg.index == 0 or (failed and not self.end_known):
            # The VM's end is an orderly exchange: every peer reads STOP (or FAILED, carrying
            # where it began) before any connection closes, so none takes the closing for a
            # lost fragment. A failure here that nobody was told of yet is told now.
            if failed:
                error = (result.error or "").encode()
                self._end(Frame(Kind.FAILED, page=cfg.index, payload=error))
            elif not self.end_known:
                self._end(Frame(Kind.STOP, page=result.exit_code or 0))
            # Closing with their frames unread would reset the connections under them. After
            # a failure, one of them may be the frozen or lost cause: wait less for them.
            grace = FAILED_GRACE_SECONDS if failed else STOP_GRACE_SECONDS
            if staying := self.transport.wait_departed(grace):
                log.warning("fragments %s did not close within %.0fs", staying, grace)
        return result

    def _watchdog(self) -> None:
        """Never hang: once the VM is told to stop, the process ends within the grace period."""
        self.machine.stop_requested.wait()
        # Not `stopping`: a STOP, FAILED or stop signal sets that at once, before the vCPUs
        # have stopped; this waits for Machine.run itself to return.
        if not self._vcpus_stopped.wait(STOP_GRACE_SECONDS):
            print(
                f"spanvm fragment {self.config.index}: vCPUs did not stop within"
                f" {STOP_GRACE_SECONDS:.0f}s; exiting",
                file=sys.stderr,
            )
            os._exit(EXIT_VM_ERROR)

    def close(self) -> None:
        """Tear down in dependency order: nothing may touch guest RAM once it is unmapped."""
        self.stopping.set()
        self._vcpus_stopped.set()  # also when run() never started them
        alive = self.transport.close()
        if self._fault_thread.is_alive():
            self._fault_thread.join(5.0)
            if self._fault_thread.is_alive():
                alive.append(self._fault_thread.name)
        if alive:  # they may still read guest RAM or use the VM: leave both to the exit
            log.warning("threads %s did not end; guest memory stays mapped until exit", alive)
            return
        self.machine.close()
        self.uffd.close()


def main(status_fd: int | None) -> int:
    """`spanvm fragment`: read the configuration from stdin, run, exit with the outcome."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    keep_message_buffers()
    try:
        config = read_config(sys.stdin.read())
    except ContractError as err:
        print(f"spanvm fragment: {err}", file=sys.stderr)
        return EXIT_VM_ERROR
    status = EventWriter(os.fdopen(status_fd, "w") if status_fd is not None else None)

    def sink(data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    with StopSignals() as stops:
        try:
            return _run(config, sink, status, stops)
        except Interrupted as stop:
            status(Failed(error=f"{stop} during start-up"))
            return signal_status(stop.signal)


def _run(
    config: FragmentConfig,
    sink: Callable[[bytes], None],
    status: Emit,
    stops: StopSignals,
) -> int:
    try:
        fragment = Fragment(config, sink, status)
    except VmError as err:  # e.g. an unusable kernel: a Failed event, not only a log line
        status(Failed(error=str(err)))
        print(f"spanvm fragment {config.index}: {err}", file=sys.stderr)
        return EXIT_VM_ERROR
    _pausable(fragment.machine, status)
    try:
        stops.action = fragment.stop_quietly
        try:
            result = fragment.run()
        except FabricError as err:
            status(Failed(error=str(err)))
            if stops.received is not None:
                return signal_status(stops.received)
            print(f"spanvm fragment {config.index}: {err}", file=sys.stderr)
            return EXIT_VM_ERROR
        counters = fragment.coherence.counters
        histogram = counters.fault_histogram()
        status(
            Finished(
                exit_code=result.exit_code,
                error=result.error,
                counters=Counters(
                    page_faults=counters.page_faults,
                    pages_in=counters.pages_in,
                    pages_out=counters.pages_out,
                    invalidations=counters.invalidations,
                    remote_faults=counters.remote_faults,
                ),
                fault_percentiles=counters.fault_percentiles(),
                fault_histogram=FaultHistogram(
                    buckets=histogram["remote_fault_buckets"],
                    seconds_sum=histogram["remote_fault_seconds_sum"],
                    samples=histogram["remote_fault_samples"],
                ),
                marks=list(result.marks),
            )
        )
        if stops.received is not None:  # whoever sent it reports the stop
            return signal_status(stops.received)
        if result.error:
            print(f"spanvm fragment {config.index}: {result.error}", file=sys.stderr)
            return EXIT_TIMEOUT if result.timed_out else EXIT_VM_ERROR
        if config.index != 0:
            return 0
        if result.exit_code is None:  # never report success for a VM that did not exit
            print(
                f"spanvm fragment 0: the VM stopped without an exit code or an error"
                f" ({fragment.machine.where_vcpus_were()})",
                file=sys.stderr,
            )
            return EXIT_VM_ERROR
        return guest_status(result.exit_code)
    finally:
        fragment.close()


def _pausable(machine: Machine, status: Emit) -> None:
    """PAUSE_SIGNAL and RESUME_SIGNAL pause and resume the vCPUs. The handler only flips the
    machine's flag and kicks its vCPUs; the status line is written from a thread of its own,
    never from inside a handler that may have interrupted another status write."""

    def handle(signum: int, _frame: object) -> None:
        if signum == PAUSE_SIGNAL:
            machine.pause()
        else:
            machine.resume()
        event = Paused() if machine.paused else Resumed()
        threading.Thread(target=status, args=(event,), daemon=True).start()

    signal.signal(PAUSE_SIGNAL, handle)
    signal.signal(RESUME_SIGNAL, handle)
