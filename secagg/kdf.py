"""Key agreement (X25519), key derivation (HKDF-SHA256) and share encryption (ChaCha20-Poly1305).

Bonawitz et al. (CCS 2017, sec. 4): each client holds two key pairs, ``c`` for authenticated
encryption of Shamir shares and ``s`` for pairwise mask agreement. Every derived key is
``HKDF-SHA256(ikm=X25519(sk_a, pk_b), salt=session_id, info=label || 0x00 || u64(min) ||
u64(max))``, so keys are bound to the session, the unordered pair and their purpose.
"""

from __future__ import annotations

import hashlib
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedpeft.secagg.errors import ProtocolError, ShareDecryptionError
from fedpeft.secagg.shamir import SHARE_BYTES

#: HKDF ``info`` label of the pairwise mask seeds (domain separation; fixed, see test_kat.py).
LABEL_PAIRWISE_MASK = b"fedpeft/secagg/v1/pairwise-mask-seed"
#: HKDF ``info`` label of the share-encryption keys.
LABEL_SHARE_KEY = b"fedpeft/secagg/v1/share-encryption-key"
#: Prefix of the associated data of an encrypted share.
LABEL_SHARE_AD = b"fedpeft/secagg/v1/share-associated-data"
#: Prefix of the self-mask seed commitment.
LABEL_SELF_COMMIT = b"fedpeft/secagg/v1/self-mask-commitment"

#: Raw X25519 key length (private and public) and derived key length.
KEY_BYTES = 32
#: ChaCha20-Poly1305 nonce length (random per ciphertext).
NONCE_BYTES = 12
#: Poly1305 tag length.
TAG_BYTES = 16
#: Plaintext of one encrypted share pair: ``u64 sender | u64 receiver | self-mask share | key share``.
SHARE_PLAINTEXT_BYTES = 8 + 8 + 2 * SHARE_BYTES
#: ``nonce | ciphertext | tag`` of one share pair, as carried in SHARES and FORWARD_SHARES.
SHARE_CIPHERTEXT_BYTES = NONCE_BYTES + SHARE_PLAINTEXT_BYTES + TAG_BYTES


def generate_keypair() -> tuple[bytes, bytes]:
    """Fresh X25519 key pair ``(private_raw, public_raw)`` from the OS CSPRNG."""
    sk = X25519PrivateKey.generate()  # security: OpenSSL CSPRNG
    return private_raw(sk), public_raw(sk.public_key())


def private_raw(sk: X25519PrivateKey) -> bytes:
    """Raw 32-byte private key."""
    return sk.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def public_raw(pk: X25519PublicKey) -> bytes:
    """Raw 32-byte public key."""
    return pk.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_from_private(private: bytes) -> bytes:
    """Public key of a raw private key."""
    return public_raw(X25519PrivateKey.from_private_bytes(private).public_key())


def agree(private: bytes, peer_public: bytes) -> bytes:
    """X25519 shared secret; raises :class:`ProtocolError` for a low-order peer key."""
    try:
        sk = X25519PrivateKey.from_private_bytes(private)
        return sk.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # security: all-zero shared secret (small-order point) rejected
        raise ProtocolError(f"invalid X25519 public key {peer_public.hex()[:16]}...: {exc}") from exc


def pair_info(label: bytes, a: int, b: int) -> bytes:
    """HKDF ``info``: label, separator and the unordered pair as two big-endian u64."""
    lo, hi = min(a, b), max(a, b)
    return label + b"\x00" + struct.pack(">QQ", lo, hi)


def hkdf(ikm: bytes, session_id: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869) to 32 bytes with ``salt=session_id``."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=session_id, info=info).derive(ikm)


def pairwise_mask_seed(private: bytes, peer_public: bytes, session_id: bytes, a: int, b: int) -> bytes:
    """Seed of the pairwise mask between clients ``a`` and ``b`` (same on both sides)."""
    return hkdf(agree(private, peer_public), session_id, pair_info(LABEL_PAIRWISE_MASK, a, b))


def share_key(private: bytes, peer_public: bytes, session_id: bytes, a: int, b: int) -> bytes:
    """AEAD key for shares exchanged between clients ``a`` and ``b``."""
    return hkdf(agree(private, peer_public), session_id, pair_info(LABEL_SHARE_KEY, a, b))


def self_mask_commitment(session_id: bytes, client_id: int, seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed (lets the server verify its reconstruction)."""
    h = hashlib.sha256()
    for part in (LABEL_SELF_COMMIT, struct.pack(">H", len(session_id)), session_id,
                 struct.pack(">Q", client_id), seed):
        h.update(part)
    return h.digest()


def key_view_digest(sender_keys: bytes, receiver_keys: bytes) -> bytes:
    """SHA-256 of both parties' advertised key material as one side sees it (key confirmation)."""
    return hashlib.sha256(struct.pack(">HH", len(sender_keys), len(receiver_keys)) + sender_keys
                          + receiver_keys).digest()


def _share_ad(session_id: bytes, sender: int, receiver: int, view: bytes) -> bytes:
    # security: associated data binds the ciphertext to session, direction, both parties and both
    # parties' views of the advertised keys (a corrupted or inconsistent key list fails the AEAD).
    return LABEL_SHARE_AD + struct.pack(">H", len(session_id)) + session_id + struct.pack(
        ">QQ", sender, receiver
    ) + view


def encrypt_shares(
    key: bytes, session_id: bytes, sender: int, receiver: int, b_share: bytes, sk_share: bytes,
    view: bytes = b"",
) -> bytes:
    """``nonce || ChaCha20-Poly1305(key, nonce, sender || receiver || b_share || sk_share)``."""
    if len(b_share) != SHARE_BYTES or len(sk_share) != SHARE_BYTES:
        raise ProtocolError(f"share lengths ({len(b_share)}, {len(sk_share)}) must be {SHARE_BYTES}")
    nonce = os.urandom(NONCE_BYTES)  # security: random 96-bit nonce; each key encrypts <= 2 messages
    plaintext = struct.pack(">QQ", sender, receiver) + b_share + sk_share
    ad = _share_ad(session_id, sender, receiver, view)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, ad)


def decrypt_shares(
    key: bytes, session_id: bytes, sender: int, receiver: int, ciphertext: bytes, view: bytes = b""
) -> tuple[bytes, bytes]:
    """Inverse of :func:`encrypt_shares`; raises :class:`ShareDecryptionError` on any mismatch."""
    if len(ciphertext) != SHARE_CIPHERTEXT_BYTES:
        raise ShareDecryptionError(
            f"share ciphertext from sender={sender} has length={len(ciphertext)}, "
            f"expected {SHARE_CIPHERTEXT_BYTES}"
        )
    nonce, body = ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:]
    try:
        plaintext = ChaCha20Poly1305(key).decrypt(nonce, body, _share_ad(session_id, sender, receiver, view))
    except InvalidTag as exc:  # security: tampered, misrouted or replayed share
        raise ShareDecryptionError(
            f"share from sender={sender} to receiver={receiver} failed authentication; "
            "the round must abort (tampering or wrong keys)"
        ) from exc
    got_sender, got_receiver = struct.unpack(">QQ", plaintext[:16])
    if (got_sender, got_receiver) != (sender, receiver):  # security: defence in depth over the AD
        raise ShareDecryptionError(
            f"share names sender={got_sender}, receiver={got_receiver}; expected ({sender}, {receiver})"
        )
    return plaintext[16 : 16 + SHARE_BYTES], plaintext[16 + SHARE_BYTES :]
