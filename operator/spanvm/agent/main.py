"""`spanvm agent`: the DaemonSet's process. Publishes the node's capabilities, keeps its
heartbeat Lease fresh and runs the node's fragments until SIGTERM. Its fragments outlive it
(the next agent adopts them) unless it was started with `--stop-fragments-on-exit`. With a
metrics port it serves /metrics (per fragment) and /healthz (see `health`)."""

import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client.registry import REGISTRY

from spanvm.agent.controller import Agent
from spanvm.agent.fragment_process import STOP_GRACE, stop_all
from spanvm.agent.metrics import FragmentCollector
from spanvm.agent.node_publisher import NodePublisher
from spanvm.kube import Kube
from spanvm.observability import exposition

log = logging.getLogger("spanvm.agent")


def _every(period: float, stop: threading.Event, what: str, action: Callable[[], None]) -> None:
    while not stop.is_set():
        try:
            action()
        except Exception as err:
            log.warning("%s failed: %s", what, err)
        stop.wait(period)


class Liveness:
    """/healthz of the agent: the control loop completes passes and the heartbeat Lease is
    renewed, each within a bound; either stuck is a reason for the kubelet to restart it."""

    def __init__(self, agent: Agent, lease_duration: float, resync: float) -> None:
        self.agent, self.lease_duration = agent, lease_duration
        self.loop_limit = max(30.0, 5 * resync)
        self.renewed = time.monotonic()

    def heartbeat(self, renew: Callable[[], None]) -> Callable[[], None]:
        def renew_and_note() -> None:
            renew()
            self.renewed = time.monotonic()

        return renew_and_note

    def healthy(self) -> tuple[bool, str]:
        now = time.monotonic()
        if now - self.agent.last_pass > self.loop_limit:
            return False, f"no control loop pass for {now - self.agent.last_pass:.0f}s"
        if now - self.renewed > self.lease_duration:
            return False, f"heartbeat Lease not renewed for {now - self.renewed:.0f}s"
        return True, f"agent on {self.agent.node}: loop and heartbeat live"


def run(
    kube: Kube,
    publisher: NodePublisher,
    *,
    state_dir: Path,
    listen_host: str,
    renew_interval: float,
    capability_interval: float,
    stop_fragments_on_exit: bool = False,
    metrics_port: int | None = None,
) -> None:
    """Run until SIGTERM/SIGINT. Fragment processes are left running for the next agent, or,
    with `stop_fragments_on_exit`, stopped (SIGTERM, SIGKILL after STOP_GRACE seconds) before
    this returns."""
    agent = Agent(kube, publisher.node, publisher, state_dir=state_dir, listen_host=listen_host)
    liveness = Liveness(agent, publisher.lease_duration, agent.resync)
    if metrics_port is not None:
        REGISTRY.register(FragmentCollector(agent))
        exposition.serve(metrics_port, liveness.healthy)
        log.info("metrics and /healthz on :%d", metrics_port)
    publisher.publish_capabilities()
    threads = [
        threading.Thread(
            target=_every,
            args=(
                renew_interval,
                agent.stopping,
                "renewing the heartbeat Lease",
                liveness.heartbeat(publisher.renew_lease),
            ),
            name="heartbeat",
            daemon=True,
        ),
        threading.Thread(
            target=_every,
            args=(
                capability_interval,
                agent.stopping,
                "publishing capabilities",
                publisher.publish_capabilities,
            ),
            name="capabilities",
            daemon=True,
        ),
    ]
    for t in threads:
        t.start()

    def stop(signum: int, _frame: object) -> None:
        log.info(
            "agent on %s stopping (%s); %s",
            publisher.node,
            signal.Signals(signum).name,
            "stopping its fragments" if stop_fragments_on_exit else "fragments keep running",
        )
        agent.stopping.set()
        agent.wake.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info(
        "agent on node %s: fabric address %s, state in %s", publisher.node, listen_host, state_dir
    )
    agent.run()
    if stop_fragments_on_exit:
        left = stop_all(list(agent.processes.values()), STOP_GRACE)
        for proc in left:
            log.error("fragment %s did not stop (pids %s)", proc.dir.name, proc.pids())
