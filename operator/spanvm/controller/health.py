"""/healthz of a standby operator replica: healthy while its leader-election loop keeps
trying (it beats on every attempt). Once the replica leads, the port is closed and Kopf's
liveness endpoint serves /healthz there instead."""

import time

from spanvm.observability import exposition


class StandbyHealth:
    """Serves /healthz on `port` until closed; unhealthy once the loop is silent too long."""

    def __init__(self, port: int, lease_duration: float) -> None:
        self.limit = max(10.0, 2 * lease_duration)
        self.last = time.monotonic()
        self.server = exposition.serve(port, self.healthy)

    def beat(self) -> None:
        self.last = time.monotonic()

    def healthy(self) -> tuple[bool, str]:
        silent = time.monotonic() - self.last
        if silent > self.limit:
            return False, f"leader election made no attempt for {silent:.0f}s"
        return True, "standby: waiting for the operator Lease"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
