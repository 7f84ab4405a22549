"""Fabric keys sealed to one node: how an agent gets the key of exactly the VMs placed on it.

Each agent keeps an X25519 key pair in its state directory and publishes the public half on
its Node (only that node's agent may write it: the admission policy). The operator seals a
VM's fabric key to the public key of each fragment's node (libsodium's sealed box: anonymous
sender, authenticated encryption) and writes it on the VMFragment. Every agent can read every
VMFragment, but only the agent of its node can open the key, so agents need no Secret access.
"""

import base64
import hashlib
import os
from pathlib import Path

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox


class SealedForAnotherKey(Exception):  # noqa: N818 - a state: the operator reseals
    """The key was sealed to another key of this node (its state was lost and regenerated)."""


def fingerprint(public_key: str) -> str:
    """A short, stable name of a published public key."""
    return hashlib.sha256(public_key.encode()).hexdigest()[:16]


def load_or_create(path: Path) -> PrivateKey:
    """The key pair in `path`, made there (0600) the first time."""
    if path.exists():
        return PrivateKey(path.read_bytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    key = PrivateKey.generate()
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(bytes(key))
    path.with_suffix(".tmp").replace(path)
    return key


def public_text(key: PrivateKey) -> str:
    """The public half as published on the Node."""
    return base64.b64encode(bytes(key.public_key)).decode()


def seal(secret: bytes, public_key: str) -> str:
    """`<fingerprint>:<base64 sealed box>` of `secret` for the holder of `public_key`."""
    box = SealedBox(PublicKey(base64.b64decode(public_key)))
    return f"{fingerprint(public_key)}:{base64.b64encode(box.encrypt(secret)).decode()}"


def sealed_to(sealed: str) -> str:
    """The fingerprint of the key `sealed` was sealed to."""
    return sealed.split(":", 1)[0]


def open_sealed(sealed: str, key: PrivateKey) -> bytes:
    """The secret, if `sealed` was sealed to `key`; SealedForAnotherKey otherwise."""
    mark, _, data = sealed.partition(":")
    if mark != fingerprint(public_text(key)):
        raise SealedForAnotherKey(f"sealed to key {mark}, this node's is another")
    try:
        opened: bytes = SealedBox(key).decrypt(base64.b64decode(data))
    except CryptoError as err:
        raise SealedForAnotherKey(f"cannot open the sealed key: {err}") from None
    return opened
