"""Simulated hosts: one network namespace per fragment, joined by a bridge in its own namespace.

Addresses live only inside the namespaces made here (10.231.N.0/24 for a random N); nothing is
routed from the root namespace, and everything is deleted afterwards.
"""

import secrets
import subprocess


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


class NamespaceNet:
    """`count` namespaces svm-<tag>-<i> with veth links to a bridge in svm-<tag>-br."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.tag = secrets.token_hex(3)
        self.subnet = 1 + secrets.randbelow(250)
        self.created: list[str] = []

    def namespace(self, index: int) -> str:
        return f"svm-{self.tag}-{index}"

    def address(self, index: int) -> str:
        return f"10.231.{self.subnet}.{index + 1}"

    def create(self) -> None:
        bridge_ns = f"svm-{self.tag}-br"
        _ip("netns", "add", bridge_ns)
        self.created.append(bridge_ns)
        _ip("-n", bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge_ns, "link", "set", "br0", "up")
        for i in range(self.count):
            ns = self.namespace(i)
            _ip("netns", "add", ns)
            self.created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip(
                "-n",
                ns,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                f"p{i}",
                "netns",
                bridge_ns,
            )
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", bridge_ns, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", bridge_ns, "link", "set", f"p{i}", "up")

    def destroy(self) -> None:
        """Delete every namespace made (their veth ends go with them)."""
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)
        self.created.clear()
