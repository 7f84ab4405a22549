"""The agent's control loop: the VMFragments bound to this node on one side, fragment
processes on the other; every pass makes them agree and reports status.

A fragment starts once the operator has filled its peers and every lower-index peer has an
endpoint (fragments connect to the ones before them). Processes outlive the agent; on start
the agent adopts those still running (no second launch) and reports those that ended while
it was away. A fragment object that is deleted or asks to stop has its process stopped.
"""

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

from kubernetes import watch
from nacl.public import PrivateKey

from spanvm import contract
from spanvm.agent.fragment_process import FragmentProcess
from spanvm.agent.node_publisher import NodePublisher
from spanvm.api.constants import (
    GROUP,
    NODE_LABEL,
    SEALED_FABRIC_KEY_ANNOTATION,
    VERSION,
    VMFRAGMENT_PLURAL,
    label_value,
)
from spanvm.api.phases import TERMINAL_FRAGMENT_PHASES, DesiredState, FragmentPhase
from spanvm.api.quantity import parse_memory
from spanvm.api.vmfragment import VMFragmentSpec, VMFragmentStatus
from spanvm.kube import JsonObject, Kube
from spanvm.payloads.catalog import PAYLOADS
from spanvm.sealing import SealedForAnotherKey, open_sealed

log = logging.getLogger("spanvm.agent")
STARTING_RESYNC = 0.2
LIVE_PHASES = frozenset({FragmentPhase.STARTING, FragmentPhase.RUNNING, FragmentPhase.STOPPING})
EVENT_COMPONENT = "spanvm-agent"
# The Event (reason, type) for each phase a fragment enters: why, in one CamelCase word.
PHASE_EVENTS = {
    "Pending": ("Waiting", "Normal"),
    "Starting": ("Started", "Normal"),
    "Running": ("FabricConnected", "Normal"),
    "Paused": ("Paused", "Normal"),
    "Succeeded": ("GuestFinished", "Normal"),
    "Failed": ("FragmentFailed", "Warning"),
    "Stopping": ("Stopping", "Normal"),
    "Stopped": ("Stopped", "Normal"),
}


MAX_DIR_NAME_PART = 180  # namespace (63) + name part + uid prefix stay within NAME_MAX (255)


def state_dir_name(meta: JsonObject) -> str:
    """`<namespace>_<name>_<uid prefix>`: readable, unique, and a valid file name for any
    legal fragment name (up to 253 characters: too long for one path component with the
    rest, so a long name is cut and a hash of it added)."""
    name = str(meta["name"])
    if len(name) > MAX_DIR_NAME_PART:
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        name = f"{name[: MAX_DIR_NAME_PART - 11]}-{digest}"
    return f"{meta['namespace']}_{name}_{str(meta['uid'])[:8]}"


class NotReadyToStart(Exception):  # noqa: N818 - a state, not an error
    """The fragment cannot start yet (peers or secret missing); retried next pass."""


class FragmentConfigError(Exception):
    """The fragment can never start as specified (reported Failed)."""


def fragment_config(
    fragment: JsonObject, secret: bytes, listen_host: str, node: str
) -> contract.FragmentConfig:
    """The fragment process's configuration from its VMFragment."""
    spec = VMFragmentSpec.model_validate(fragment["spec"])
    if spec.fabric.transport == "rdma":
        raise FragmentConfigError("fabric.transport rdma: this node has no RDMA devices")
    linux = _linux_kernel(spec, node)
    payload = spec.boot.payload
    arg = 0
    if payload is not None:
        arg = payload.arg if payload.arg is not None else PAYLOADS[payload.name].default_arg
    if spec.peers is None:
        raise NotReadyToStart("waiting for the operator to place every fragment")
    peers = {p.index: p.endpoint for p in spec.peers if p.index < spec.index}
    missing = [i for i, e in peers.items() if not e]
    if missing:
        raise NotReadyToStart(f"waiting for the fabric endpoints of fragments {missing}")
    return contract.fragment_config(
        index=spec.index,
        vcpu_ids=spec.vcpu_ids,
        vcpu_count=spec.vcpu_count,
        fragment_count=spec.fragment_count,
        memory=parse_memory(spec.memory),
        payload=payload.name if payload is not None else "",
        linux=linux,
        arg=arg,
        homes=[(r.start, r.start + r.size, p.index) for p in spec.peers for r in p.home_memory],
        peers={i: str(e) for i, e in peers.items()},
        secret=secret.decode(),
        listen_host=listen_host,
        node_name=node,
    )


def fabric_key(fragment: JsonObject, node_key: PrivateKey | None) -> bytes:
    """The VM's fabric key, sealed by the operator to this node's key (the agent reads no
    Secrets: see spanvm.sealing)."""
    annotations = fragment["metadata"].get("annotations") or {}
    sealed = annotations.get(SEALED_FABRIC_KEY_ANNOTATION)
    if node_key is None or not sealed:
        secret = (fragment["spec"].get("secretRef") or {}).get("name")
        raise NotReadyToStart(
            f"waiting for the operator to seal the fabric key of Secret {secret} to this node"
        )
    try:
        return open_sealed(sealed, node_key)
    except SealedForAnotherKey as err:
        raise NotReadyToStart(
            f"waiting for the operator to reseal the fabric key ({err})"
        ) from None


def _linux_kernel(spec: VMFragmentSpec, node: str) -> contract.LinuxKernel | None:
    """The Linux kernel the fragment boots, after checking its files are on this node (a
    missing or unreadable file fails the fragment naming the node, the field and the path)."""
    linux = spec.boot.linux
    if linux is None:
        return None
    if spec.fragment_count > 1:
        raise FragmentConfigError(
            f"boot.linux over {spec.fragment_count} fragments: a Linux guest runs on one node"
            " until logical-destination IPIs cross fragments"
        )
    for field, path in (("kernel", linux.kernel), ("initrd", linux.initrd)):
        if path is not None and not os.access(path, os.R_OK):
            reason = "not readable" if os.path.exists(path) else "no such file"
            raise FragmentConfigError(f"boot.linux.{field} {path}: {reason} on node {node}")
    return contract.LinuxKernel(kernel=linux.kernel, initrd=linux.initrd, cmdline=linux.cmdline)


def _said(phase: FragmentPhase, message: str) -> VMFragmentStatus:
    return VMFragmentStatus(phase=phase, message=message)


class Agent:
    """Runs the fragments of one node."""

    def __init__(
        self,
        kube: Kube,
        node: str,
        publisher: NodePublisher,
        *,
        state_dir: Path,
        listen_host: str,
        resync: float = 2.0,
    ) -> None:
        self.kube, self.node, self.publisher = kube, node, publisher
        self.state_dir, self.listen_host, self.resync = state_dir, listen_host, resync
        self.processes: dict[str, FragmentProcess] = {}  # by VMFragment uid
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self._starting = False
        # What metrics and /healthz read: this node's VMFragments at the last pass, the status
        # last reported for each (by uid), and when a pass last completed.
        self.fragments_seen: dict[str, JsonObject] = {}
        self.reported: dict[str, JsonObject] = {}
        self.last_pass = time.monotonic()

    # -- start-up ----------------------------------------------------------------------------
    def adopt(self) -> None:
        """Find the fragment processes a previous agent started."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for directory in sorted(self.state_dir.iterdir()):
            proc = FragmentProcess(directory)
            if not proc.uid:
                continue
            self.processes[proc.uid] = proc
            state = "running" if proc.running() else "ended"
            log.info("adopted fragment %s (%s, pid %s)", directory.name, state, proc.pids())

    # -- the loop ----------------------------------------------------------------------------
    def _watch(self) -> None:
        """Wake the loop on any change to this node's fragments."""
        while not self.stopping.is_set():
            try:
                stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
                    self.kube.custom.list_cluster_custom_object,
                    GROUP,
                    VERSION,
                    VMFRAGMENT_PLURAL,
                    label_selector=f"{NODE_LABEL}={label_value(self.node)}",
                    timeout_seconds=30,
                )
                for _ in stream:
                    self.wake.set()
                    if self.stopping.is_set():
                        break
            except Exception as err:
                log.debug("fragment watch ended: %s", err)
                self.stopping.wait(1.0)

    def run(self) -> None:
        """Until stopped: publish, heartbeat, and sync fragments."""
        self.adopt()
        threading.Thread(target=self._watch, name="watch", daemon=True).start()
        while not self.stopping.is_set():
            try:
                self.sync()
                self.last_pass = time.monotonic()
            except Exception:
                log.exception("sync failed; retrying")
            # While a fragment starts, its endpoint and "connected" appear in its status file
            # within moments and peers wait on them: look often. Otherwise rest.
            self.wake.wait(STARTING_RESYNC if self._starting else self.resync)
            self.wake.clear()

    def sync(self) -> None:
        """One pass: start, stop, forget and report fragments."""
        items = self.kube.list_fragments(None, f"{NODE_LABEL}={label_value(self.node)}")
        fragments = {
            f["metadata"]["uid"]: f for f in items if f["spec"].get("nodeName") == self.node
        }
        self.fragments_seen = fragments
        self.reported = {uid: s for uid, s in self.reported.items() if uid in fragments}
        for uid, proc in list(self.processes.items()):
            if uid not in fragments:
                self._forget(uid, proc)
        self._starting = False
        for uid, fragment in fragments.items():
            self._sync_one(uid, fragment)

    def _forget(self, uid: str, proc: FragmentProcess) -> None:
        """The VMFragment is gone: stop its process, then drop its state."""
        if proc.running():
            proc.stop()
            return
        log.info("fragment %s deleted; removing its state", proc.dir.name)
        proc.remove()
        del self.processes[uid]

    def _sync_one(self, uid: str, fragment: JsonObject) -> None:
        spec = fragment["spec"]
        status = fragment.get("status") or {}
        proc = self.processes.get(uid)
        if spec.get("desiredState") == DesiredState.STOPPED:
            if proc is not None:
                proc.stop()
            elif status.get("phase") not in TERMINAL_FRAGMENT_PHASES:
                self._report(fragment, _said(FragmentPhase.STOPPED, "stopped before it started"))
                return
        if proc is None:
            if status.get("phase") in LIVE_PHASES:
                lost = f"the agent on {self.node} has no process for this fragment"
                self._report(fragment, _said(FragmentPhase.FAILED, lost + " (its state was lost)"))
                return
            if status.get("phase") in TERMINAL_FRAGMENT_PHASES:
                return
            proc = self._start(fragment)
            if proc is None:
                return
        proc.set_paused(spec.get("desiredState") == "Paused")
        new_status = proc.status(int(spec["index"]))
        self._starting |= new_status.phase == FragmentPhase.STARTING
        self._report(fragment, new_status)

    def _start(self, fragment: JsonObject) -> FragmentProcess | None:
        meta, spec = fragment["metadata"], fragment["spec"]
        try:
            secret = fabric_key(fragment, self.publisher.node_key)
            config = fragment_config(fragment, secret, self.listen_host, self.node)
        except NotReadyToStart as wait:
            self._report(fragment, _said(FragmentPhase.PENDING, str(wait)))
            return None
        except (FragmentConfigError, ValueError) as err:
            self._report(fragment, _said(FragmentPhase.FAILED, str(err)))
            return None
        if not self.publisher.kvm_usable:
            self._report(fragment, _said(FragmentPhase.FAILED, f"KVM is not usable on {self.node}"))
            return None
        directory = self.state_dir / state_dir_name(meta)
        proc = FragmentProcess.launch(directory, fragment, config.to_json())
        self.processes[meta["uid"]] = proc
        log.info(
            "started fragment %s/%s (vCPUs %s)", meta["namespace"], meta["name"], spec["vcpuIds"]
        )
        return proc

    def _report(self, fragment: JsonObject, new: VMFragmentStatus) -> None:
        meta = fragment["metadata"]
        current = fragment.get("status") or {}
        new.observed_generation = meta.get("generation")
        status = new.to_api()
        self.reported[meta["uid"]] = status
        if all(current.get(k) == v for k, v in status.items()):
            return
        changed = status.get("phase") != current.get("phase")
        if changed:
            log.info(
                "fragment %s/%s: %s (%s)",
                meta["namespace"],
                meta["name"],
                status.get("phase"),
                status.get("message", ""),
            )
        self.kube.patch_fragment_status(meta["namespace"], meta["name"], status)
        if changed and status.get("phase"):
            self._event(fragment, str(status["phase"]), str(status.get("message") or ""))

    def _event(self, fragment: JsonObject, phase: str, message: str) -> None:
        """An Event on the VMFragment for each phase it enters (`kubectl describe vmf`),
        from `spanvm-agent` on this node; never a reason for the pass to fail."""
        reason, type_ = PHASE_EVENTS.get(phase, (phase, "Normal"))
        try:
            self.kube.post_event(
                fragment, type_, reason, message or phase, EVENT_COMPONENT, self.node
            )
        except Exception as err:  # an Event is a courtesy: report it, carry on
            log.warning("cannot post an Event on %s: %s", fragment["metadata"]["name"], err)
