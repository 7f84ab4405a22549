"""`spanvm operator`: wait for the leader Lease, then run the Kopf handlers until stopped.

A replica that loses the Lease (cannot renew it for a whole lease duration) stops its
handlers and exits non-zero, so its Deployment restarts it as a follower.

Metrics are served from the start (the cluster gauges only while leading); the health port
answers /healthz for the standby's election loop, then is handed to Kopf's own liveness
endpoint once this replica leads.
"""

import asyncio
import gc
import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import kopf
from prometheus_client.registry import REGISTRY

from spanvm.controller import metrics
from spanvm.controller.cache import ClusterCache
from spanvm.controller.handlers import build_registry, post_event
from spanvm.controller.health import StandbyHealth
from spanvm.controller.leader import LeaderLease
from spanvm.controller.reconcile import Hooks, OperatorConfig, Reconciler
from spanvm.kube import Kube
from spanvm.observability import exposition

log = logging.getLogger("spanvm.operator")
EXIT_LOST_LEADERSHIP = 4
API_THREADS = 32
GC_THRESHOLD = 20_000  # allocations between young-generation passes (Python's default: 700)


def settle_heap() -> None:
    """Keep the garbage collector off what the caches hold. The operator holds every Node,
    Lease, SpanningVM and VMFragment as parsed JSON (hundreds of thousands of objects at a
    thousand nodes); its garbage is freed by reference counting (JSON has no cycles), yet
    the collector's full passes walked all of it, stalling the event loop for ~0.2 s each
    while 150 VMs were being placed. The objects listed at start are frozen out of its view,
    and it runs an order of magnitude less often."""
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)


async def _keep_lease(lease: LeaderLease, stop: asyncio.Event, renew: float) -> None:
    last_renewed = time.monotonic()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), renew)
            return
        except TimeoutError:
            pass
        try:
            held = await asyncio.to_thread(lease.try_acquire)
        except Exception as err:
            log.warning("renewing the operator Lease failed: %s", err)
            held = False
        if held:
            last_renewed = time.monotonic()
        elif lease.holder not in (None, lease.identity) or (
            time.monotonic() - last_renewed > lease.duration
        ):
            log.error("lost the operator Lease (now held by %s); stopping", lease.holder)
            metrics.LEADER.set(0)
            stop.set()
            raise SystemExit(EXIT_LOST_LEADERSHIP)


async def run(
    kube: Kube,
    config: OperatorConfig,
    *,
    lease_name: str,
    lease_duration: int = 15,
    identity: str | None = None,
    metrics_port: int | None = None,
    health_port: int | None = None,
    hooks: Hooks | None = None,
) -> None:
    """The operator's main coroutine."""
    if metrics_port is not None:
        exposition.serve(metrics_port, lambda: (True, "serving metrics"))
        log.info("metrics on :%d/metrics", metrics_port)
    standby = StandbyHealth(health_port, lease_duration) if health_port is not None else None
    identity = identity or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    lease = LeaderLease(
        kube, config.system_namespace, lease_name, identity, duration=lease_duration
    )
    renew = max(1.0, lease_duration / 3)
    seen_holder: str | None = None
    while not await asyncio.to_thread(lease.try_acquire):
        if standby is not None:
            standby.beat()
        if lease.holder != seen_holder:
            log.info("waiting for the operator Lease (held by %s)", lease.holder)
            seen_holder = lease.holder
        await asyncio.sleep(renew)
    log.info(
        "holding the operator Lease %s/%s as %s", config.system_namespace, lease_name, identity
    )
    metrics.LEADER.set(1)
    liveness = None
    if standby is not None:
        standby.close()  # Kopf's liveness endpoint takes the port over
        liveness = f"http://0.0.0.0:{health_port}/healthz"
    stop = asyncio.Event()
    keeper = asyncio.create_task(_keep_lease(lease, stop, renew))
    # Blocking API calls run in threads: enough of them that hundreds of VMs placed at once
    # do not queue behind the default pool's few.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(API_THREADS))
    cache = ClusterCache(kube, config.system_namespace)
    await asyncio.to_thread(cache.start)
    settle_heap()
    cluster_gauges = metrics.ClusterCollector(cache, config.namespaces)
    REGISTRY.register(cluster_gauges)
    reconciler = Reconciler(kube, config, post_event, cache, hooks)
    try:
        await kopf.operator(
            registry=build_registry(reconciler, config),
            standalone=True,
            clusterwide=not config.namespaces,
            namespaces=config.namespaces,
            stop_flag=stop,
            liveness_endpoint=liveness,
        )
    finally:
        REGISTRY.unregister(cluster_gauges)
        stop.set()
        if keeper.done() and keeper.exception() is not None:
            raise keeper.exception()  # type: ignore[misc]
        keeper.cancel()
        cache.stop()
        await asyncio.to_thread(lease.release)
        metrics.LEADER.set(0)
