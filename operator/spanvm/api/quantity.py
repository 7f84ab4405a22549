"""Guest memory quantities: Kubernetes quantities parsed exactly as the API server parses them,
and the guest memory rules shared by the CRD's CEL, the pydantic model and the CLI.

The limits come from the VMM (`spanvm.vmm.layout`): one source of truth. The rules are checked
in one order everywhere (a quantity, at least the minimum, at most the maximum, aligned) and
each refusal names only the rule actually broken, with the same words as the CEL messages.
"""

import re
from decimal import Decimal, InvalidOperation, localcontext

from spanvm.vmm.memmap import LARGE_PAGE, MAX_MEMORY

MEMORY_ALIGNMENT = LARGE_PAGE  # guest memory is mapped in 2 MiB pages
MIN_GUEST_MEMORY_BYTES = 16 * 1024 * 1024
MAX_GUEST_MEMORY_BYTES = MAX_MEMORY

# apimachinery's grammar (resource.ParseQuantity): a signed decimal number, then a binary SI
# suffix, a decimal SI suffix or a decimal exponent.
_QUANTITY = re.compile(
    r"^(?P<number>[+-]?[0-9]*(?:\.[0-9]*)?)"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
)
_BINARY = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_NANO = Decimal("1e-9")


def format_memory(size: int) -> str:
    """The shortest binary-suffixed quantity for a byte count (exact)."""
    for suffix, unit in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if size and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


MIN_GUEST_MEMORY = format_memory(MIN_GUEST_MEMORY_BYTES)
MAX_GUEST_MEMORY = format_memory(MAX_GUEST_MEMORY_BYTES)
ALIGNMENT_TEXT = format_memory(MEMORY_ALIGNMENT)

# The refusals, word for word the CEL messages of spec.memory.
NOT_A_QUANTITY = "memory must be a quantity such as 256Mi or 8Gi"
BELOW_MINIMUM = f"memory must be at least {MIN_GUEST_MEMORY}"
ABOVE_MAXIMUM = f"memory must be at most {MAX_GUEST_MEMORY} (the most this VMM can map)"
NOT_ALIGNED = (
    f"memory must be a whole multiple of {ALIGNMENT_TEXT}"
    f" (guest memory is mapped in {MEMORY_ALIGNMENT >> 20} MiB pages)"
)


def parse_quantity(text: str) -> Decimal:
    """The exact value of a Kubernetes quantity, as the API server reads it (fractions below
    a nano-unit round up, as resource.ParseQuantity does); ValueError if it is not one."""
    match = _QUANTITY.match(text) if text else None
    if match is None:
        raise ValueError(f"{text!r} is not a quantity (examples: 256Mi, 2Gi)")
    with localcontext() as ctx:
        ctx.prec = 200
        digits = match["number"].lstrip("+-").strip(".")
        try:
            value = Decimal(match["number"] if digits else 0)
        except InvalidOperation:
            raise ValueError(f"{text!r} is not a quantity (examples: 256Mi, 2Gi)") from None
        suffix = match["suffix"] or ""
        if suffix in _BINARY:
            value *= Decimal(2) ** _BINARY[suffix]
        elif suffix in _DECIMAL:
            value = value.scaleb(_DECIMAL[suffix])
        elif suffix:
            exponent = int(suffix[1:])
            if abs(exponent) > 1000:
                raise ValueError(f"{text!r} is not a quantity (exponent out of range)")
            value = value.scaleb(exponent)
        if value != 0:
            sign = 1 if value > 0 else -1
            value = sign * abs(value).quantize(_NANO, rounding="ROUND_UP")
    return value


def parse_quantity_bytes(text: str) -> int:
    """Bytes of any whole-byte quantity (`0`, `1536Mi`, `8Gi`); ValueError otherwise."""
    value = parse_quantity(text)
    if value != value.to_integral_value():
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)


def parse_memory(text: str) -> int:
    """Bytes of a guest memory quantity such as `256Mi`, `0.5Gi` or `536870912`; ValueError
    naming the one rule it breaks (the same rule, in the same words, as the API server)."""
    try:
        value = parse_quantity(text)
    except ValueError:
        raise ValueError(f"{NOT_A_QUANTITY}, got {text!r}") from None
    if value < MIN_GUEST_MEMORY_BYTES:
        raise ValueError(f"{BELOW_MINIMUM}, got {text!r}")
    if value > MAX_GUEST_MEMORY_BYTES:
        raise ValueError(f"{ABOVE_MAXIMUM}, got {text!r}")
    if value != value.to_integral_value() or int(value) % MEMORY_ALIGNMENT:
        raise ValueError(f"{NOT_ALIGNED}, got {text!r}")
    return int(value)


def memory_cel_rules() -> list[tuple[str, str]]:
    """(rule, message) for spec.memory, in the order parse_memory checks them. Each rule
    holds vacuously when an earlier one fails, so a refusal names the true reason only.

    Alignment cannot use asInteger(): the API server keeps 0.5Gi, 1Ei or 67108864000m in a
    form asInteger() refuses although the value is whole. Instead the approximate value picks
    the nearest multiple of 2Mi, and exact quantity arithmetic decides (within 64Gi a double is
    far closer than 1 MiB, so a multiple is always found when there is one)."""
    q = "quantity(self)"
    in_range = (
        f"!isQuantity(self) || {q}.compareTo(quantity('{MIN_GUEST_MEMORY}')) < 0"
        f" || {q}.compareTo(quantity('{MAX_GUEST_MEMORY}')) > 0"
    )
    nearest = f"int({q}.asApproximateFloat() / {MEMORY_ALIGNMENT}.0 + 0.5) * {MEMORY_ALIGNMENT}"
    return [
        ("isQuantity(self)", NOT_A_QUANTITY),
        (
            f"!isQuantity(self) || {q}.compareTo(quantity('{MIN_GUEST_MEMORY}')) >= 0",
            BELOW_MINIMUM,
        ),
        (
            f"!isQuantity(self) || {q}.compareTo(quantity('{MAX_GUEST_MEMORY}')) <= 0",
            ABOVE_MAXIMUM,
        ),
        (f"{in_range} || {q}.sub({nearest}).compareTo(quantity('0')) == 0", NOT_ALIGNED),
    ]
