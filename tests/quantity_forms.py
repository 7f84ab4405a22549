"""One table of spec.memory forms, tried against the real API server (CEL), the pydantic model
and the CLI's parser: all three must accept the same forms and refuse the others for the same
reason (the key of the message in spanvm.api.quantity)."""

from spanvm.api import quantity

ACCEPT = None
MEMORY_FORMS: list[tuple[str, str | None]] = [
    ("16Mi", ACCEPT),
    ("256Mi", ACCEPT),
    ("0.5Gi", ACCEPT),
    (".5Gi", ACCEPT),
    ("0.0625Gi", ACCEPT),
    ("67108864000m", ACCEPT),
    ("536870912", ACCEPT),
    ("+512Mi", ACCEPT),
    ("2097152e1", ACCEPT),
    ("1.5Gi", ACCEPT),
    ("64Gi", ACCEPT),
    ("65536Mi", ACCEPT),
    ("0.015625Ti", ACCEPT),
    ("100M", quantity.NOT_ALIGNED),
    ("1.000001Gi", quantity.NOT_ALIGNED),
    ("33554432001m", quantity.NOT_ALIGNED),
    ("17Mi", quantity.NOT_ALIGNED),
    ("15Mi", quantity.BELOW_MINIMUM),
    ("0", quantity.BELOW_MINIMUM),
    ("1m", quantity.BELOW_MINIMUM),
    (".", quantity.BELOW_MINIMUM),
    ("65Gi", quantity.ABOVE_MAXIMUM),
    ("66Gi", quantity.ABOVE_MAXIMUM),
    ("100Gi", quantity.ABOVE_MAXIMUM),
    ("64.5Gi", quantity.ABOVE_MAXIMUM),
    ("1Ti", quantity.ABOVE_MAXIMUM),
    ("1Ei", quantity.ABOVE_MAXIMUM),
    ("5Ei", quantity.ABOVE_MAXIMUM),
    ("9Ei", quantity.ABOVE_MAXIMUM),
    ("1E", quantity.ABOVE_MAXIMUM),
    ("1e30", quantity.ABOVE_MAXIMUM),
    ("1K", quantity.NOT_A_QUANTITY),
    ("1.2.3Gi", quantity.NOT_A_QUANTITY),
    ("1Gii", quantity.NOT_A_QUANTITY),
    ("1ki", quantity.NOT_A_QUANTITY),
    ("1e", quantity.NOT_A_QUANTITY),
]
