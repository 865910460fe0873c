"""Key agreement and authenticated encryption: X25519, HKDF-SHA256 and AES-256-GCM.

Each client holds two X25519 key pairs per round (Bonawitz et al. 2017, §4): the c pair, whose
agreed secrets key the AES-GCM channel that carries shares through the server, and the s pair,
whose agreed secrets seed the pairwise masks. HKDF binds every derived key to its purpose, the
round's session id and the unordered pair of client ids, so keys of different rounds, pairs or
purposes never coincide, and both ends of a pair derive the same one.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from worldlm.secagg.errors import SecAggProtocolError

KEY_BYTES = 32
NONCE_BYTES = 12
CHANNEL = b"channel"  # purpose of c-key agreements: AES-GCM keys for shares
MASK = b"mask"  # purpose of s-key agreements: pairwise mask seeds


def new_private_key() -> X25519PrivateKey:
    """A fresh X25519 private key from the OS CSPRNG."""
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of `key`'s public key, as advertised."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def private_to_int(key: X25519PrivateKey) -> int:
    """`key`'s 32 raw private bytes as an integer < 2^256, the form Shamir shares."""
    return int.from_bytes(key.private_bytes_raw(), "big")


def private_from_int(value: int) -> X25519PrivateKey:
    """The private key `private_to_int` turned into `value`."""
    return X25519PrivateKey.from_private_bytes(value.to_bytes(KEY_BYTES, "big"))


def agree(
    private: X25519PrivateKey,
    peer_public: bytes,
    *,
    purpose: bytes,
    session: bytes,
    pair: tuple[str, str],
) -> bytes:
    """A 32-byte key both ends of `pair` derive alike, bound to `purpose` and `session`."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as e:  # malformed or low-order public key
        raise SecAggProtocolError(f"unusable public key from a peer of {pair}: {e}") from e
    info = b"worldlm-secagg/" + purpose + b"/" + _label(session, *sorted(pair))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def seal(key: bytes, plaintext: bytes, *, session: bytes, sender: str, receiver: str) -> bytes:
    """nonce || AES-GCM(plaintext), authenticated with the session and the direction."""
    nonce = os.urandom(NONCE_BYTES)
    aad = _label(session, sender, receiver)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, sealed: bytes, *, session: bytes, sender: str, receiver: str) -> bytes:
    """The plaintext of `seal`; a forged, swapped or replayed ciphertext is refused."""
    nonce, body = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:]
    try:
        return AESGCM(key).decrypt(nonce, body, _label(session, sender, receiver))
    except (InvalidTag, ValueError) as e:
        raise SecAggProtocolError(f"shares from {sender!r} to {receiver!r} fail to decrypt") from e


def _label(session: bytes, *ids: str) -> bytes:
    # Length prefixes keep ("ab", "c") and ("a", "bc") apart.
    parts = [session, *(i.encode() for i in ids)]
    return b"".join(len(p).to_bytes(2, "big") + p for p in parts)
