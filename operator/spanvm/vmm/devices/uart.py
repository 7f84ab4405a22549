"""An 8250/16550A UART (COM1: ports 0x3f8-0x3ff, ISA IRQ 4): transmitted bytes go to the VM's
console at once, received bytes come from `feed()`.

Source: the National Semiconductor PC16550D data sheet (register map, Table II; LSR, IIR and
MCR/MSR bit meanings; loopback, §8.6) and Linux drivers/tty/serial/8250 (what its probe
checks: scratch register, IER read-back, FIFO bits in IIR, loopback MSR = 0x90). The
transmitter is always empty (THRE and TEMT set): there is no baud-rate pacing.
"""

import threading

from spanvm.vmm.devices import DeviceHost
from spanvm.vmm.vcpu import Vcpu

COM1_PORT = 0x3F8
SIZE = 8
IRQ = 4

RBR_THR_DLL, IER_DLM, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
LCR_DLAB = 0x80
IER_RDA, IER_THRE = 0x01, 0x02
IIR_NONE, IIR_THRE, IIR_RDA, IIR_FIFO = 0x01, 0x02, 0x04, 0xC0
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
FCR_ENABLE, FCR_CLEAR_RX = 0x01, 0x02


class Uart:
    """One 16550A. Thread-safe: vCPU threads access registers, an input thread feeds bytes."""

    def __init__(self, host: DeviceHost, irq: int = IRQ) -> None:
        self.host = host
        self.irq = irq
        self._lock = threading.Lock()
        self._rx = bytearray()
        self.ier = self.lcr = self.mcr = self.scr = self.fcr = 0
        self.dll, self.dlm = 12, 0  # 9600 baud, as a BIOS leaves it
        self._thre_pending = False  # THRE interrupt: set by a write, cleared by reading IIR
        self._irq_level = False

    # -- guest side --------------------------------------------------------------------------
    def read(self, vcpu: Vcpu, offset: int, size: int) -> int:
        with self._lock:
            value = self._read(offset)
            self._update_irq()
        return value

    def write(self, vcpu: Vcpu, offset: int, size: int, value: int) -> None:
        out = b""
        with self._lock:
            value &= 0xFF
            dlab = self.lcr & LCR_DLAB
            if offset == RBR_THR_DLL and dlab:
                self.dll = value
            elif offset == RBR_THR_DLL:
                if not self.mcr & MCR_LOOP:
                    out = bytes([value])
                self._thre_pending = True
            elif offset == IER_DLM and dlab:
                self.dlm = value
            elif offset == IER_DLM:
                if value & IER_THRE and not self.ier & IER_THRE:
                    self._thre_pending = True  # enabling THRE interrupts raises one at once
                self.ier = value & 0x0F
            elif offset == IIR_FCR:
                self.fcr = value & 0xC9
                if value & FCR_CLEAR_RX:
                    self._rx.clear()
            elif offset == LCR:
                self.lcr = value
            elif offset == MCR:
                self.mcr = value & 0x1F
            elif offset == SCR:
                self.scr = value
            self._update_irq()
        if out:
            self.host.console.write(out)

    def _read(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                return self.dll
            return self._rx.pop(0) if self._rx else 0
        if offset == IER_DLM:
            return self.dlm if dlab else self.ier
        if offset == IIR_FCR:
            fifo = IIR_FIFO if self.fcr & FCR_ENABLE else 0
            if self.ier & IER_RDA and self._rx:
                return IIR_RDA | fifo
            if self.ier & IER_THRE and self._thre_pending:
                self._thre_pending = False  # reading IIR clears a THRE interrupt (Table IV)
                return IIR_THRE | fifo
            return IIR_NONE | fifo
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)
        if offset == MSR:
            if self.mcr & MCR_LOOP:  # §8.6: outputs looped back to the modem inputs
                m = self.mcr
                return (
                    (MSR_CTS if m & MCR_RTS else 0)
                    | (MSR_DSR if m & MCR_DTR else 0)
                    | (MSR_RI if m & MCR_OUT1 else 0)
                    | (MSR_DCD if m & MCR_OUT2 else 0)
                )
            return MSR_DCD | MSR_DSR | MSR_CTS
        return self.scr

    def _update_irq(self) -> None:
        pending = bool(
            (self.ier & IER_RDA and self._rx) or (self.ier & IER_THRE and self._thre_pending)
        )
        if pending != self._irq_level:
            self._irq_level = pending
            self.host.set_irq_line(self.irq, pending)

    # -- host side ---------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Bytes typed at the console: received by the guest in order."""
        with self._lock:
            self._rx.extend(data)
            self._update_irq()
