#!/usr/bin/env python3
"""Scheduler benchmark: placement decisions per second on generated clusters.

1,000 and 5,000 nodes in 3 zones, 10% of them occupied; requests of 16-64 vCPUs. Decisions
reuse one ClusterIndex (as the operator does while no Node changes); the baseline in the same
run is the filter pass alone (every node looked at once), so the ratio says what choosing
costs beyond looking. `index build/s` is how often the index itself could be rebuilt.
"""

import random
import sys
import time

from spanvm.scheduler.placement import ClusterIndex
from spanvm.scheduler.snapshot import ZONE_LABEL, NodeInfo, Request, Usage

GiB = 1 << 30


def cluster(size: int, rnd: random.Random) -> tuple[list[NodeInfo], dict[str, Usage]]:
    nodes, usage = [], {}
    for i in range(size):
        node = NodeInfo(
            f"node-{i:05d}", True, True, True, 32, 128 * GiB, {ZONE_LABEL: "abc"[i % 3]}
        )
        nodes.append(node)
        if rnd.random() < 0.10:
            usage[node.name] = Usage(rnd.randint(1, 32), rnd.randint(1, 128) * GiB)
    return nodes, usage


def rate(fn: object, seconds: float = 2.0) -> float:
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()  # type: ignore[operator]
        count += 1
    return count / (time.perf_counter() - started)


def measure(
    nodes: list[NodeInfo], usage: dict[str, Usage], request: Request
) -> tuple[float, float]:
    """Decisions/s for a whole placement and for its filter pass alone."""
    index = ClusterIndex(nodes)
    return (
        rate(lambda: index.schedule(usage, request)),
        rate(lambda: index.filter(usage, request)),
    )


def main() -> int:
    rnd = random.Random(7)
    header = ("nodes", "request", "decisions/s", "filter-only/s", "ratio", "fragments")
    print("{:>6}  {:>16}  {:>12}  {:>13}  {:>6}  {}".format(*header))
    for size in (1000, 5000):
        nodes, usage = cluster(size, rnd)
        builds = rate(lambda n=nodes: ClusterIndex(n), 1.0)  # type: ignore[misc]
        print(f"{size:>6}  index build/s {builds:,.1f}")
        for vcpus in (16, 64):
            request = Request(vcpus, vcpus * 4 * GiB, max_fragments=8)
            result = ClusterIndex(nodes).schedule(usage, request)
            fragments = len(getattr(result, "fragments", ()))
            decide, look = measure(nodes, usage, request)
            label = f"{vcpus} vCPU/{vcpus * 4}Gi"
            print(
                f"{size:>6}  {label:>16}  {decide:>12,.1f}  {look:>13,.1f}"
                f"  {look / decide:>6.2f}  {fragments}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
