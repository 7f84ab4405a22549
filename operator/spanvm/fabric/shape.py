"""The VM's shape digest: what every fragment of one VM must agree on before it shares memory.

SHA-256 over a canonical JSON of the fragment count, vCPU count, guest memory (bytes), the
payload argument, the home ranges and the payload image's size and SHA-256 (its content, not
its path: fragments on other nodes have other paths), and for a Multiboot kernel its command
line, its modules' digests and where each vCPU runs; CPUID features when not the defaults.
The fabric handshake carries it (see wire.py), so a fragment started with the VM's secret
but for another VM, or another payload build, is refused with a message naming both
fragments instead of corrupting the guest.
"""

import hashlib
import json
from pathlib import Path

CHUNK = 1 << 20


def image_sha256(path: Path, size: int) -> str:
    """SHA-256 (hex) of the first `size` bytes of `path`, read in 1 MiB chunks (the caller has
    already checked that `size` fits in guest memory)."""
    digest, left = hashlib.sha256(), size
    with path.open("rb") as f:
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def vm_shape(
    *,
    fragment_count: int,
    vcpu_count: int,
    memory: int,
    arg: int,
    homes: list[tuple[int, int, int]],
    image: Path,
    image_size: int,
    boot: tuple[str, ...] = (),
) -> bytes:
    """The 32-byte shape digest of a VM (memory in bytes; homes as (start, end, fragment));
    `boot`: more of the boot source that must agree (a command line, module digests)."""
    doc = {
        "fragments": fragment_count,
        "vcpus": vcpu_count,
        "memory": memory,
        "arg": arg,
        "homes": sorted([list(h) for h in homes]),
        "payload_size": image_size,
        "payload_sha256": image_sha256(image, image_size),
    }
    if boot:
        doc["boot"] = list(boot)
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(b"spanvm-vm-shape/1\n" + text.encode()).digest()
