#!/usr/bin/env python3
"""Load benchmark: N simulated nodes, M SpanningVMs applied at once, the operator places them.

A control plane of its own (in a temporary directory), N Node objects as the agent labels and
annotates them (8 vCPUs, 32Gi each, a fabric public key: the operator seals each fragment's
key to it, one more write a fragment) with heartbeat Leases renewed by a thread pool (no
agents, no fragment processes), the operator, then M SpanningVMs created from 16 threads at
once: every other one 12 vCPUs / 24Gi (bigger than a node: two fragments), the rest 4 vCPUs /
8Gi (one). Half the cluster's vCPUs for 500 VMs on 1,000 nodes: room to spare, so a VM left
unplaced is the operator's doing, not the cluster's. Prints apply->Scheduled p50/p99 (from a
watch), end-to-end placements/s, API requests per VM by verb from the apiserver's own metrics
(apiserver_request_total for spanningvms, vmfragments, secrets and events, less the bench's
own creates; requests the API server refused are counted apart, not as writes), and the
operator's RSS. The floors, measured in the same run before the
operator starts: the time this machine's API server takes for plain ConfigMap creates, from
the same 16 threads of the Python Kubernetes client the operator uses and from an async
client with 64 requests in flight (aiohttp: enough that the API server and etcd, not the
client, set the rate), each scaled to the writes the run made (the applies plus the
operator's): the run's write volume in seconds. Since placements first, most of a VM's
writes come after it is Scheduled, so they no longer bound the burst (first apply to last
Scheduled). M creates and M status patches of SpanningVMs (schema, CEL rules, managed fields)
are timed too, after the run, not before (created and deleted before it, they kept the
garbage collector and etcd busy during it), in a namespace Kopf does not handle (the
operator's cluster-wide SpanningVM cache still receives their events). Then it
checks that every VM was placed exactly once (spanvm_placements_total, fragments per VM) and
that no node is over-committed.

    make venv tools   # once: the venv and the control-plane binaries
    .cache/venv/bin/python hack/bench/load.py [--nodes 1000] [--vms 500] [--timeout 600]
        [--floor-writes 1000] [--show-vm]      # a few minutes; wants a quiet machine
"""

import argparse
import asyncio
import json
import os
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp  # Kopf's own HTTP client, so installed with the operator's dependencies
from kubernetes import watch
from nacl.public import PrivateKey

from spanvm.api.constants import (
    ALLOCATABLE_MEMORY_ANNOTATION,
    ALLOCATABLE_VCPUS_ANNOTATION,
    FABRIC_PUBLIC_KEY_ANNOTATION,
    GROUP,
    KVM_LABEL,
    SEALED_FABRIC_KEY_ANNOTATION,
    SPANNINGVM_PLURAL,
    SYSTEM_NAMESPACE,
    VERSION,
    agent_lease_name,
)
from spanvm.api.quantity import parse_quantity_bytes
from spanvm.devcluster.controlplane import ControlPlane
from spanvm.devcluster.nodes import set_node_ready
from spanvm.devcluster.operator_proc import operator_command, start, stop
from spanvm.devcluster.paths import kubectl, repo_root
from spanvm.kube import CONFLICT, Kube, unless_status
from spanvm.rfc3339 import micro_time
from spanvm.sealing import public_text

NS = "bench-load"
FLOOR_NS = "bench-load-floor"  # not watched by the operator
NODE_VCPUS, NODE_MEMORY = 8, "32Gi"
BIG, SMALL = (12, "24Gi", 2), (4, "8Gi", 1)  # vCPUs, memory, fragments
LEASE_SECONDS, RENEW_EVERY = 120, 30.0
COUNTED = ("spanningvms", "vmfragments", "secrets", "events")
NODE_KEY = public_text(PrivateKey.generate())  # one for all: the operator seals to each node
WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE", "APPLY")
REQUEST_LINE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")


def node_body(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {KVM_LABEL: "true", "topology.kubernetes.io/zone": f"z{hash(name) % 3}"},
            "annotations": {
                ALLOCATABLE_VCPUS_ANNOTATION: str(NODE_VCPUS),
                ALLOCATABLE_MEMORY_ANNOTATION: NODE_MEMORY,
                FABRIC_PUBLIC_KEY_ANNOTATION: NODE_KEY,
            },
        },
    }


def lease_body(node: str) -> dict[str, Any]:
    return {
        "metadata": {"name": agent_lease_name(node), "namespace": SYSTEM_NAMESPACE},
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": micro_time(),
        },
    }


def add_node(kube: Kube, name: str) -> None:
    unless_status(lambda: kube.core.create_node(node_body(name)), CONFLICT)
    set_node_ready(kube, name, ready=True)
    kube.create_lease(SYSTEM_NAMESPACE, lease_body(name))


def heartbeat(kube: Kube, nodes: list[str], stop_flag: threading.Event) -> None:
    """Renew every node's Lease every RENEW_EVERY seconds, from 8 threads (a loaded API
    server takes tens of milliseconds a renewal: one thread could not keep 1,000 fresh)."""

    def renew(node: str) -> None:
        patch = {"spec": {"renewTime": micro_time()}}
        try:
            kube.coordination.patch_namespaced_lease(
                agent_lease_name(node), SYSTEM_NAMESPACE, patch
            )
        except Exception as err:
            print(f"heartbeat of {node} failed: {err}", file=sys.stderr)

    with ThreadPoolExecutor(8) as pool:
        while not stop_flag.is_set():
            started = time.monotonic()
            list(pool.map(renew, nodes))
            late = time.monotonic() - started - RENEW_EVERY
            if late > 0:
                print(f"heartbeats {late:.1f}s late", file=sys.stderr)
            stop_flag.wait(max(0.0, RENEW_EVERY - (time.monotonic() - started)))


def shape(name: str) -> tuple[int, str, int]:
    return BIG if int(name.rsplit("-", 1)[1]) % 2 == 0 else SMALL


def vm_body(name: str) -> dict[str, Any]:
    vcpus, memory, _ = shape(name)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SpanningVM",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "cpu": {"vcpus": vcpus},
            "memory": memory,
            "boot": {"payload": {"name": "spin"}},
            "placement": {"maxFragments": 2},
        },
    }


def request_counts(kube: Kube) -> Counter[tuple[str, str, bool]]:
    """apiserver_request_total summed by (resource, verb, accepted: a 2xx code) over the
    resources counted."""
    response = kube.api.call_api("GET", f"{kube.api.configuration.host}/metrics")
    out: Counter[tuple[str, str, bool]] = Counter()
    for line in response.read().decode().splitlines():
        match = REQUEST_LINE.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        if labels.get("resource") in COUNTED:
            accepted = labels.get("code", "").startswith("2")
            out[(labels["resource"], labels["verb"], accepted)] += int(float(match["value"]))
    return out


def timed_in_threads(step: Callable[[Any], object], items: Iterable[Any]) -> float:
    """Seconds `step` takes over `items` from 16 threads (the bench's one client pattern)."""
    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(step, items))
    return time.monotonic() - started


def api_floor(kube: Kube, count: int) -> float:
    """Seconds for `count` ConfigMap creates in NS from 16 threads of the Python client: what
    a write costs the operator's client, the API server and etcd together on this machine."""

    def create(i: int) -> None:
        kube.core.create_namespaced_config_map(
            NS, {"metadata": {"name": f"floor-{i:05d}"}, "data": {"n": str(i)}}
        )

    return timed_in_threads(create, range(count))


def async_floor(kube: Kube, count: int, in_flight: int = 64) -> float:
    """Seconds for `count` ConfigMap creates from one aiohttp session with `in_flight`
    requests outstanding: enough that the API server and etcd set the rate, little client cost."""
    conf = kube.api.configuration
    tls = ssl.create_default_context(cafile=conf.ssl_ca_cert)
    tls.load_cert_chain(conf.cert_file, conf.key_file)
    url = f"{conf.host}/api/v1/namespaces/{NS}/configmaps"

    async def run() -> float:
        gate = asyncio.Semaphore(in_flight)
        connector = aiohttp.TCPConnector(ssl=tls, limit=in_flight)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def create(i: int) -> None:
                body = {"metadata": {"name": f"async-floor-{i:05d}"}, "data": {"n": str(i)}}
                async with gate, session.post(url, json=body) as reply:
                    if reply.status != 201:
                        raise RuntimeError(f"create {i}: {reply.status} {await reply.text()}")

            started = time.monotonic()
            await asyncio.gather(*(create(i) for i in range(count)))
            return time.monotonic() - started

    return asyncio.run(run())


def vm_floor(kube: Kube, count: int) -> tuple[float, float]:
    """Seconds for `count` SpanningVM creates, then as many status merge patches (a
    placement's write), from 16 threads of the Python client, in a namespace Kopf does not
    handle; the VMs are deleted after (one request). What the API server's schema
    validation, CEL rules and managedFields add to a write of this resource."""
    names = [f"floor-{i:04d}" for i in range(count)]

    def create(name: str) -> None:
        body = vm_body("floor-1")  # a one-fragment shape
        body["metadata"] = {"name": name, "namespace": FLOOR_NS}
        kube.custom.create_namespaced_custom_object(
            GROUP, VERSION, FLOOR_NS, SPANNINGVM_PLURAL, body
        )

    def write_status(name: str) -> None:
        kube.patch_vm_status(FLOOR_NS, name, {"phase": "Pending", "message": f"{name} waits"})

    unless_status(lambda: kube.core.create_namespace({"metadata": {"name": FLOOR_NS}}), CONFLICT)
    seconds = [timed_in_threads(step, names) for step in (create, write_status)]
    kube.custom.delete_collection_namespaced_custom_object(
        GROUP, VERSION, FLOOR_NS, SPANNINGVM_PLURAL
    )
    return seconds[0], seconds[1]


def scheduled(vm: dict[str, Any]) -> bool:
    conditions = (vm.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Scheduled" and c["status"] == "True" for c in conditions)


def operator_metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)]
    return sum(values)


def rss_mib(pid: int) -> tuple[float, float]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000, help="simulated nodes (default 1000)")
    parser.add_argument("--vms", type=int, default=500, help="SpanningVMs applied (default 500)")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for all Scheduled (600)"
    )
    parser.add_argument("--floor-writes", type=int, default=1000, help="ConfigMap creates timed")
    parser.add_argument("--show-vm", action="store_true", help="print one VM as it ends up")
    args = parser.parse_args()
    if args.floor_writes < 1:
        parser.error("--floor-writes must be at least 1")

    state = Path(tempfile.mkdtemp(prefix="spanvm-load-"))
    plane = ControlPlane(state / "cluster")
    plane.up()
    operator = None
    stop_flag = threading.Event()
    try:
        kube = Kube.connect(str(plane.kubeconfig))
        env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig)}
        subprocess.run(
            [kubectl(), "apply", "-f", str(repo_root() / "crds")],
            env=env,
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [kubectl(), "wait", "--for=condition=Established", "crd", "--all"],
            env=env,
            check=True,
            capture_output=True,
        )
        for ns in (NS, SYSTEM_NAMESPACE):
            unless_status(
                lambda n=ns: kube.core.create_namespace({"metadata": {"name": n}}), CONFLICT
            )
        nodes = [f"load-{i:05d}" for i in range(args.nodes)]
        took = timed_in_threads(lambda n: add_node(kube, n), nodes)
        print(f"{args.nodes} nodes registered in {took:.1f}s")
        threading.Thread(target=heartbeat, args=(kube, nodes, stop_flag), daemon=True).start()
        floor_seconds = api_floor(kube, args.floor_writes)
        per_write = floor_seconds / args.floor_writes
        fastest = async_floor(kube, args.floor_writes) / args.floor_writes
        print(
            f"API server floor: {args.floor_writes} ConfigMap creates from 16 threads of the"
            f" Python client in {floor_seconds:.2f}s ({1 / per_write:.0f} writes/s); from"
            f" aiohttp, 64 in flight, {fastest * args.floor_writes:.2f}s ({1 / fastest:.0f}/s)"
        )

        port = 18000 + (hash(str(state)) % 1000)
        log = state / "operator.log"
        operator = start(
            operator_command(
                plane.kubeconfig,
                system_namespace=SYSTEM_NAMESPACE,
                lease_name="load-operator",
                namespaces=(NS,),
                timer_interval=5.0,
                node_loss_grace=40.0,
                metrics_port=port,
            ),
            log,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                operator_metric(port, "spanvm_operator_leader")
                break
            except OSError:
                if time.monotonic() > deadline or operator.poll() is not None:
                    why = "the operator did not start:\n" + log.read_text()[-3000:]
                    raise RuntimeError(why) from None
                time.sleep(0.5)
        time.sleep(2.0)  # caches synced, Kopf watching

        seen: dict[str, float] = {}
        done = threading.Event()

        def follow() -> None:
            """Note when each VM is first seen Scheduled (a watch, watched again if it ends:
            it starts with every object as it is)."""
            while not done.is_set():
                try:
                    stream = watch.Watch().stream(
                        kube.custom.list_namespaced_custom_object,
                        GROUP,
                        VERSION,
                        NS,
                        SPANNINGVM_PLURAL,
                        timeout_seconds=60,
                    )
                    for event in stream:
                        obj = event["object"]
                        name = obj["metadata"]["name"]
                        if name not in seen and scheduled(obj):
                            seen[name] = time.monotonic()
                            if len(seen) == args.vms:
                                done.set()
                                return
                except Exception:
                    time.sleep(0.2)

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        time.sleep(1.0)
        before = request_counts(kube)
        applied: dict[str, float] = {}

        def apply(name: str) -> None:
            kube.custom.create_namespaced_custom_object(
                GROUP, VERSION, NS, SPANNINGVM_PLURAL, vm_body(name)
            )
            applied[name] = time.monotonic()

        names = [f"vm-{i:04d}" for i in range(args.vms)]
        first = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(apply, names))
        if not done.wait(args.timeout):
            print(f"only {len(seen)} of {args.vms} VMs Scheduled in {args.timeout:.0f}s")
        last = max(seen.values(), default=first)
        # let the fragments be created, peers written and keys sealed: the VMs' other writes
        expected = sum(shape(n)[2] for n in seen)
        settle, own_lists = time.monotonic() + 120, 0
        while time.monotonic() < settle:
            own_lists += 1
            fragments = kube.list_fragments(NS)
            if len(fragments) >= expected and all(
                f["spec"].get("peers")
                and (f["metadata"].get("annotations") or {}).get(SEALED_FABRIC_KEY_ANNOTATION)
                for f in fragments
            ):
                break
            time.sleep(2.0)
        time.sleep(6.0)  # a periodic recheck pass of every VM
        after = request_counts(kube)
        rss, peak = rss_mib(operator.pid)
        # after the run: 500 more SpanningVMs created and deleted before it would leave the
        # garbage collector and etcd busy with them while the operator is measured
        creates, patches = vm_floor(kube, args.vms)

        latencies = [seen[n] - applied[n] for n in seen]
        delta = after - before
        delta[("spanningvms", "POST", True)] -= args.vms  # the bench's own creates and lists
        delta[("vmfragments", "LIST", True)] -= own_lists
        by_verb: Counter[str] = Counter()
        for (_, verb, accepted), count in delta.items():
            by_verb[verb if accepted else "refused"] += count
        writes = sum(c for v, c in by_verb.items() if v in WRITE_VERBS)
        placements = operator_metric(port, "spanvm_placements_total")

        print(
            f"SpanningVM floor (timed after the run), 16 threads of the Python client:"
            f" {args.vms} creates in {creates:.2f}s ({args.vms / creates:.0f}/s), {args.vms}"
            f" status patches in {patches:.2f}s ({args.vms / patches:.0f}/s)"
        )
        print(f"nodes {args.nodes}  VMs {args.vms}  scheduled {len(seen)}")
        print(
            f"apply->Scheduled  p50 {statistics.median(latencies):.2f}s"
            f"  p99 {pct(latencies, 0.99):.2f}s  max {max(latencies):.2f}s"
        )
        print(f"placements/s (first apply to last Scheduled): {len(seen) / (last - first):.1f}")
        print(
            f"API requests per VM: writes {writes / args.vms:.1f}  "
            + "  ".join(f"{v} {c / args.vms:.2f}" for v, c in sorted(by_verb.items()))
        )
        for (resource, verb, accepted), count in sorted(delta.items()):
            if count:
                refused = "" if accepted else " refused (4xx/5xx)"
                print(f"    {resource:<12} {verb:<7} {count / args.vms:.2f}/VM{refused}")
        print(f"operator RSS {rss:.0f} MiB (peak {peak:.0f} MiB)")
        burst, total = last - first, args.vms + writes
        print(
            f"first apply to last Scheduled {burst:.2f}s; the run's {total} writes ({args.vms}"
            f" applies + {writes} by the operator) take {per_write * total:.2f}s at the Python"
            f" client's rate (burst / that {burst / (per_write * total):.2f}),"
            f" {fastest * total:.2f}s at aiohttp's"
        )

        vms = kube.list_vms(NS)
        if args.show_vm:
            print(json.dumps(vms[0], indent=1)[:6000])
        fragments = kube.list_fragments(NS)
        per_vm = Counter(f["spec"]["vmName"] for f in fragments)
        used: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for vm in vms:
            for entry in (vm.get("status") or {}).get("fragments") or []:
                used[entry["nodeName"]][0] += len(entry["vcpuIds"])
                used[entry["nodeName"]][1] += parse_quantity_bytes(entry["memory"])
        over = [
            n
            for n, (v, m) in used.items()
            if v > NODE_VCPUS or m > parse_quantity_bytes(NODE_MEMORY)
        ]
        twice = [n for n in seen if per_vm.get(n) != shape(n)[2]]
        print(
            f"placed exactly once: {placements:.0f} placements for {len(seen)} VMs;"
            f" VMs without their fragments: {len(twice)}; over-committed nodes: {len(over)}"
        )
        ok = placements == len(seen) == args.vms and not twice and not over
        print("OK" if ok else "NOT OK")
        return 0 if ok else 1
    finally:
        stop_flag.set()
        if operator is not None:
            stop(operator)
        plane.down()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
