"""The catalogue of built-in guest payloads: names, what each does, its default argument.

This is the one list the API (enum of `spec.boot.payload.name`), the build and the CLI share.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class PayloadInfo:
    """One built-in payload: its name, a one-line description and its default argument."""

    name: str
    description: str
    default_arg: int
    min_vcpus: int = 1


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
        ),
        PayloadInfo(
            "mp-litmus",
            "message passing: vCPU 0 writes data then a flag, vCPU 1 checks the data once it"
            " sees the flag, for arg rounds",
            10_000,
            min_vcpus=2,
        ),
        PayloadInfo(
            "stream",
            "vCPU 0 writes every heap page, then the last vCPU reads one word of each and prints"
            " their sum, phases timed by doorbell marks (measures page-fault service)",
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
