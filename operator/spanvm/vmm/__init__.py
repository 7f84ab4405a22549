"""The fragment VMM: a small KVM monitor that runs guest payloads at CPL3 in long mode."""
