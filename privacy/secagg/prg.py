"""ChaCha20 keystream expansion: masks, uniforms and public-randomness draws.

Masks in SecAgg (Bonawitz et al., CCS 2017, sec. 4) are ``PRG(seed)`` vectors; here the PRG is
the ChaCha20 keystream (RFC 8439) from ``cryptography``, keyed by a 32-byte seed, read as
little-endian ``uint32`` words. Each word is uniform mod 2^32, hence its low ``b`` bits are
uniform mod 2^b for any ``b <= 32`` (2^b divides 2^32): no modulo bias, no rejection needed.
Never NumPy's or the standard library's PRNGs (security: those are not CSPRNGs).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from privacy.secagg.errors import SecAggConfigError

SEED_BYTES = 32
#: ChaCha20 "nonce" argument of ``cryptography``: 4-byte little-endian block counter + 12-byte
#: nonce. Distinct constants domain-separate the uses of one key.
NONCE_MASK = bytes(16)
NONCE_ROUNDING = bytes(4) + b"fpsa-round\x00\x00"
NONCE_GRAPH = bytes(4) + b"fpsa-graph\x00\x00"


def keystream(key: bytes, nbytes: int, nonce: bytes = NONCE_MASK) -> bytes:
    """Return the first ``nbytes`` of the ChaCha20 keystream for ``key`` (32 B) and ``nonce``."""
    if len(key) != SEED_BYTES:
        raise SecAggConfigError(f"key length={len(key)} must be {SEED_BYTES} bytes")
    if nbytes < 0:
        raise SecAggConfigError(f"nbytes={nbytes} must be >= 0")
    encryptor = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    return encryptor.update(bytes(nbytes))  # security: keystream = ChaCha20(key) XOR 0


def expand_mask(seed: bytes, length: int) -> npt.NDArray[np.uint32]:
    """Expand ``seed`` into ``length`` uniform ``uint32`` words (one ChaCha20 call).

    Callers reduce mod 2^b after summing; the result is read-only (a view of the keystream).
    """
    return np.frombuffer(keystream(seed, 4 * length), dtype="<u4")


def uniform01(seed: bytes, length: int) -> npt.NDArray[np.float64]:
    """``length`` floats in [0, 1) on the 2^-32 grid from the keystream (for stochastic rounding)."""
    words = np.frombuffer(keystream(seed, 4 * length, NONCE_ROUNDING), dtype="<u4")
    return words.astype(np.float64) * (1.0 / 4294967296.0)


class KeystreamReader:
    """Sequential reader of a ChaCha20 keystream giving unbiased integers (public randomness)."""

    _CHUNK = 4096

    def __init__(self, key: bytes, nonce: bytes = NONCE_GRAPH) -> None:
        if len(key) != SEED_BYTES:
            raise SecAggConfigError(f"key length={len(key)} must be {SEED_BYTES} bytes")
        self._enc = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
        self._buf = b""
        self._pos = 0

    def _u32(self) -> int:
        if self._pos + 4 > len(self._buf):
            self._buf = self._enc.update(bytes(self._CHUNK))
            self._pos = 0
        word = int.from_bytes(self._buf[self._pos : self._pos + 4], "little")
        self._pos += 4
        return word

    def randbelow(self, bound: int) -> int:
        """Uniform integer in ``[0, bound)`` by rejection sampling (``1 <= bound <= 2^32``)."""
        if not 1 <= bound <= 1 << 32:
            raise SecAggConfigError(f"bound={bound} must be in [1, 2^32]")
        limit = (1 << 32) - ((1 << 32) % bound)  # largest multiple of bound <= 2^32
        while True:
            word = self._u32()
            if word < limit:  # security: rejection removes modulo bias
                return word % bound
