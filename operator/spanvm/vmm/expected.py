"""Host-side computations of what the payloads must report (the tests' ground truth)."""

MASK64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """splitmix64's finaliser; mirrors mix64() in payloads/src/spanvm.h."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def smp_sum(words: int) -> int:
    """Sum (mod 2^64) of mix64(i) for i < words: what smp-sum must print."""
    total = 0
    for i in range(words):
        total += mix64(i)
    return total & MASK64
