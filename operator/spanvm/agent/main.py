"""`spanvm agent`: the DaemonSet's process. Publishes the node's capabilities, keeps its
heartbeat Lease fresh and runs the node's fragments until SIGTERM. Its fragments outlive it
(the next agent adopts them) unless it was started with `--stop-fragments-on-exit`."""

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from spanvm.agent.controller import Agent
from spanvm.agent.fragment_process import STOP_GRACE, stop_all
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
    stop_fragments_on_exit: bool = False,
) -> None:
    """Run until SIGTERM/SIGINT. Fragment processes are left running for the next agent, or,
    with `stop_fragments_on_exit`, stopped (SIGTERM, SIGKILL after STOP_GRACE seconds) before
    this returns."""
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
