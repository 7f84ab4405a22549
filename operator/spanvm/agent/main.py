"""`spanvm agent`: the DaemonSet's process. Publishes the node's capabilities, keeps its
heartbeat Lease fresh and runs the node's fragments until SIGTERM."""

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from spanvm.agent.controller import Agent
from spanvm.agent.node_publisher import NodePublisher
from spanvm.kube import Kube

log = logging.getLogger("spanvm.agent")


def _every(period: float, stop: threading.Event, what: str, action: Callable[[], None]) -> None:
    while not stop.is_set():
        try:
            action()
        except Exception as err:
            log.warning("%s failed: %s", what, err)
        stop.wait(period)


def run(
    kube: Kube,
    publisher: NodePublisher,
    *,
    state_dir: Path,
    listen_host: str,
    renew_interval: float,
    capability_interval: float,
) -> None:
    """Run until SIGTERM/SIGINT. Fragment processes are left running for the next agent."""
    agent = Agent(kube, publisher.node, publisher, state_dir=state_dir, listen_host=listen_host)
    publisher.publish_capabilities()
    threads = [
        threading.Thread(
            target=_every,
            args=(
                renew_interval,
                agent.stopping,
                "renewing the heartbeat Lease",
                publisher.renew_lease,
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
            "agent on %s stopping (%s); fragments keep running",
            publisher.node,
            signal.Signals(signum).name,
        )
        agent.stopping.set()
        agent.wake.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info(
        "agent on node %s: fabric address %s, state in %s", publisher.node, listen_host, state_dir
    )
    agent.run()
