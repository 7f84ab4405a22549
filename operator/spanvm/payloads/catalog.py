"""The catalogue of built-in guest payloads: names, what each does, its default argument.

This is the one list the API (enum of `spec.boot.payload.name`), the build and the CLI share.
The litmus-* payloads (litmus.h) play their roles on the highest-numbered vCPUs; with more vCPUs
than roles the others (fragment 0, home of the image's pages) only join the per-round barriers,
so requester, owner and home of each shared page are three different fragments.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class PayloadInfo:
    """One built-in payload: its name, a one-line description and its default argument."""

    name: str
    description: str
    default_arg: int
    min_vcpus: int = 1
    arg_bytes: int = 0  # bytes of low guest heap the payload needs per unit of its argument


MAX_ARG = 1 << 40  # the largest payload argument the API accepts
MAX_IMAGE_SIZE = 1 << 20  # every payload image, .bss included, fits in this (a test checks)


PAYLOADS: dict[str, PayloadInfo] = {
    p.name: p
    for p in (
        PayloadInfo("hello", "every vCPU greets on the console; exits 0", 0),
        PayloadInfo(
            "memtest",
            "writes an address-derived pattern over all free guest RAM and verifies every byte"
            " (arg: passes, 0 means 1)",
            1,
        ),
        PayloadInfo(
            "smp-counter",
            "every vCPU does `lock xadd` on one shared counter arg times; reports the total",
            100_000,
        ),
        PayloadInfo(
            "smp-sum",
            "vCPUs fill an array of arg 64-bit words, each sums another vCPU's slice, then they"
            " combine; reports the sum",
            1 << 20,
            arg_bytes=8,
        ),
        PayloadInfo(
            "mp-litmus",
            "message passing: vCPU 0 writes data then a flag, vCPU 1 checks the data once it"
            " sees the flag, for arg rounds",
            10_000,
            min_vcpus=2,
        ),
        PayloadInfo(
            "exit-now",
            "vCPU 0 exits at once with code arg; the other vCPUs spin until the VM stops",
            0,
        ),
        PayloadInfo(
            "fault-now",
            "vCPU arg takes an invalid-opcode exception at once; the other vCPUs spin",
            0,
        ),
        PayloadInfo(
            "console-remote",
            "the last vCPU writes a 32-letter line, vCPU 0 has the monitor print it while the"
            " writer's fragment holds the page (arg: rounds)",
            3,
            min_vcpus=2,
        ),
        PayloadInfo(
            "litmus-mp",
            "message passing: the writer stores data then flag, the reader loads flag then data;"
            " flag=r with data=r-1 is forbidden (arg: rounds)",
            1000,
            min_vcpus=2,
        ),
        PayloadInfo(
            "litmus-sb",
            "store buffering with mfence: both loads returning 0 is forbidden (arg: rounds)",
            1000,
            min_vcpus=2,
        ),
        PayloadInfo(
            "litmus-2p2w",
            "2+2W: x=1;y=2 against y=1;x=2, a final x=1,y=1 is forbidden (arg: rounds)",
            1000,
            min_vcpus=2,
        ),
        PayloadInfo(
            "litmus-iriw",
            "IRIW: two writers, two readers in opposite orders must agree on one store order"
            " (arg: rounds)",
            1000,
            min_vcpus=4,
        ),
        PayloadInfo(
            "litmus-lock",
            "every vCPU increments a plain counter under an xchg spinlock; it must be exact"
            " (arg: rounds)",
            1000,
        ),
        PayloadInfo(
            "stream",
            "vCPU 0 writes every heap page and parks, then the last vCPU reads one word of each,"
            " prints their sum and exits; phases timed by doorbell marks (measures page-fault"
            " service)",
            0,
        ),
        PayloadInfo(
            "spin",
            "every vCPU meets the others, vCPU 0 prints one line, then all spin forever without"
            " an exit (stop and timeout tests)",
            0,
        ),
    )
}

PAYLOAD_NAMES: tuple[str, ...] = tuple(PAYLOADS)
