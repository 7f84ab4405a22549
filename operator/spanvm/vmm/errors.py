"""The VMM's error type and the process exit status that reports it."""

EXIT_VM_ERROR = 70  # process exit status of a VM (or fragment) stopped on an error


class VmError(RuntimeError):
    """The VM could not be built or stopped on an error; the message says why and where."""
