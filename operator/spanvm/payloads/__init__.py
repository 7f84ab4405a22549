"""Guest test payloads: freestanding C programs the fragment VMM runs at CPL3."""
