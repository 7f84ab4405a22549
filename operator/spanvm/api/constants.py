"""Names of the spanvm API group, its version and its kinds."""

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
FABRIC_SECRET_KEY = "fabric-key"

# Where the agents' heartbeat Leases and the operator's leader Lease live.
SYSTEM_NAMESPACE = "spanvm-system"
AGENT_LEASE_PREFIX = "spanvm-agent-"
OPERATOR_LEASE = "spanvm-operator"


def agent_lease_name(node: str) -> str:
    """The heartbeat Lease of the agent on `node`."""
    return f"{AGENT_LEASE_PREFIX}{node}"


def fragment_name(vm: str, index: int) -> str:
    """VMFragment names are deterministic, so creating one twice is a no-op (409)."""
    return f"{vm}-{index}"


def fabric_secret_name(vm: str) -> str:
    """The Secret holding a VM's fabric key."""
    return f"{vm}-fabric"
