"""Names of the spanvm API group, its version and its kinds, and every name or label value
spanvm derives from another object's name.

Derived names must be valid for any legal input: a SpanningVM or Node name may be up to 253
characters (a DNS subdomain), a label value at most 63. So a derived label value or child name
that would be too long is shortened to a prefix plus a hash of the whole name: still readable,
still deterministic (creating twice is a 409, never a duplicate), and distinct for distinct
inputs. Nothing is ever looked up by parsing a derived name back.
"""

import hashlib
import re

GROUP = "spanvm.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
SPANNINGVM_PLURAL = "spanningvms"
VMFRAGMENT_PLURAL = "vmfragments"

# Labels and annotations shared by the operator, the agent and the CLI.
VM_LABEL = "spanvm.io/vm"  # on VMFragments and Secrets: the SpanningVM they belong to
NODE_LABEL = "spanvm.io/node"  # on VMFragments: the node whose agent runs it
INDEX_LABEL = "spanvm.io/fragment-index"
KVM_LABEL = "spanvm.io/kvm"  # on Nodes: "true" when the agent found a working /dev/kvm
ALLOCATABLE_VCPUS_ANNOTATION = "spanvm.io/allocatable-vcpus"  # on Nodes, set by the agent
ALLOCATABLE_MEMORY_ANNOTATION = "spanvm.io/allocatable-memory"  # on Nodes (quantity)
FINALIZER = "spanvm.io/finalizer"
# On Nodes, by the agent: its public key for sealing fabric keys (see spanvm.sealing).
FABRIC_PUBLIC_KEY_ANNOTATION = "spanvm.io/fabric-public-key"
# On VMFragments, by the operator: the VM's fabric key sealed to the fragment's node.
SEALED_FABRIC_KEY_ANNOTATION = "spanvm.io/sealed-fabric-key"
# On SpanningVMs, written by `spanvm start|stop|restart` (and anyone allowed to patch the VM):
# "<verb>/<id>" with verb start, stop or restart; the operator acts once per id and records
# it in status.lastRequest (KubeVirt's start/stop/restart subresources, as an annotation).
REQUEST_ANNOTATION = "spanvm.io/request"
REQUEST_VERBS = ("start", "stop", "restart")
# On SpanningVMs: "true" while `spanvm pause` holds the guest's vCPUs (the fabric keeps
# serving); the operator asks every fragment for desiredState Paused.
PAUSED_ANNOTATION = "spanvm.io/paused"
FABRIC_SECRET_KEY = "fabric-key"

# Where the agents' heartbeat Leases and the operator's leader Lease live.
SYSTEM_NAMESPACE = "spanvm-system"
AGENT_LEASE_PREFIX = "spanvm-agent-"
OPERATOR_LEASE = "spanvm-operator"


MAX_NAME_LENGTH = 253  # object names: DNS-1123 subdomains
MAX_LABEL_VALUE_LENGTH = 63
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
MAX_DNS_LABEL_LENGTH = 63
# An RFC 1123 label, what a Namespace's name must be (Kubernetes docs, "Object Names and IDs")
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_HASH_LENGTH = 10


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:_HASH_LENGTH]


def label_value(value: str) -> str:
    """A valid label value standing for `value` (a name up to 253 characters): the value itself
    when it is one, else its first characters and a hash of all of it."""
    if len(value) <= MAX_LABEL_VALUE_LENGTH and _LABEL_VALUE.match(value):
        return value
    head = re.sub(r"[^-A-Za-z0-9_.]", "-", value)[: MAX_LABEL_VALUE_LENGTH - _HASH_LENGTH - 1]
    head = head.strip("-_.")
    return f"{head}-{_digest(value)}" if head else _digest(value)


def child_name(parent: str, suffix: str, prefix: str = "") -> str:
    """`<prefix><parent>-<suffix>`, a valid object name for any valid name `parent`: when too
    long, the parent is cut and a hash of it added before the suffix."""
    name = f"{prefix}{parent}-{suffix}"
    if len(name) <= MAX_NAME_LENGTH:
        return name
    room = MAX_NAME_LENGTH - len(prefix) - len(suffix) - _HASH_LENGTH - 2
    head = parent[:room].rstrip("-.")
    return f"{prefix}{head}-{_digest(parent)}-{suffix}"


def agent_lease_name(node: str) -> str:
    """The heartbeat Lease of the agent on `node` (its holderIdentity is the node's name)."""
    name = f"{AGENT_LEASE_PREFIX}{node}"
    if len(name) <= MAX_NAME_LENGTH:
        return name
    return child_name(node[: MAX_NAME_LENGTH // 2].rstrip("-."), _digest(node), AGENT_LEASE_PREFIX)


def fragment_name(vm: str, index: int) -> str:
    """VMFragment names are deterministic, so creating one twice is a no-op (409)."""
    return child_name(vm, str(index))


def fabric_secret_name(vm: str, uid: str) -> str:
    """The Secret holding a VM's fabric key: named after the VM *and its uid*, so a VM
    deleted and re-created under the same name never meets its predecessor's Secret (still
    there until the garbage collector removes it), and the operator needs no right to read
    Secrets to tell them apart."""
    return child_name(vm, f"fabric-{uid[:8]}")
