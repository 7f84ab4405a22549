"""The spanvm.io/v1alpha1 API: pydantic models for SpanningVM and VMFragment, and the CRDs."""

from spanvm.api.constants import GROUP, VERSION
from spanvm.api.spanningvm import SpanningVM, SpanningVMSpec, SpanningVMStatus
from spanvm.api.vmfragment import VMFragment, VMFragmentSpec, VMFragmentStatus

__all__ = [
    "GROUP",
    "VERSION",
    "SpanningVM",
    "SpanningVMSpec",
    "SpanningVMStatus",
    "VMFragment",
    "VMFragmentSpec",
    "VMFragmentStatus",
]
