"""Names of the spanvm API group, its version and its kinds."""

GROUP = "spanvm.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
SPANNINGVM_PLURAL = "spanningvms"
VMFRAGMENT_PLURAL = "vmfragments"
