"""spanvm: a Kubernetes operator that runs KVM virtual machines spanning several nodes."""

__version__ = "0.1.0"
