"""Guest memory quantities: parsing Kubernetes quantities into bytes with the API's rules."""

from decimal import Decimal, InvalidOperation

from kubernetes.utils.quantity import parse_quantity

MEMORY_ALIGNMENT = 2 * 1024 * 1024
MIN_GUEST_MEMORY_BYTES = 16 * 1024 * 1024


def parse_quantity_bytes(text: str) -> int:
    """Bytes of any whole-byte quantity (`0`, `1536Mi`, `8Gi`); ValueError otherwise."""
    try:
        value = parse_quantity(text)  # type: ignore[no-untyped-call]
    except (ValueError, InvalidOperation, TypeError):
        raise ValueError(f"{text!r} is not a quantity (examples: 256Mi, 2Gi)") from None
    if value != value.to_integral_value():
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(Decimal(value))


def parse_memory(text: str) -> int:
    """Bytes of a guest memory quantity such as `256Mi`; ValueError naming the rule it breaks."""
    size = parse_quantity_bytes(text)
    if size < MIN_GUEST_MEMORY_BYTES:
        raise ValueError(f"{text!r} is below the minimum of 16Mi")
    if size % MEMORY_ALIGNMENT:
        raise ValueError(
            f"{text!r} is not a multiple of 2Mi (guest memory is mapped in 2 MiB pages)"
        )
    return size


def format_memory(size: int) -> str:
    """The shortest binary-suffixed quantity for a byte count (exact)."""
    for suffix, unit in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if size and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)
