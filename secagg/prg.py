"""ChaCha20 keystream expansion: masks, uniforms and public-randomness draws.

Masks in SecAgg (Bonawitz et al., CCS 2017, sec. 4) are ``PRG(seed)`` vectors; here the PRG is
the ChaCha20 keystream (RFC 8439) from ``cryptography``, keyed by a 32-byte seed, read as
little-endian ``uint32`` words. Each word is uniform mod 2^32, hence its low ``b`` bits are
uniform mod 2^b for any ``b <= 32`` (2^b divides 2^32): no modulo bias, no rejection needed.
Never NumPy's or the standard library's PRNGs (security: those are not CSPRNGs).

:class:`ChaCha20Stream` is the one place in fedpeft that builds a ChaCha20 keystream cipher:
the masks, rounding uniforms and graph shuffle here and the DP-SGD randomness of
``fedpeft.privacy.csprng`` all read their keystream through it (the ChaCha20-Poly1305 AEAD of
:mod:`fedpeft.secagg.kdf` is a separate primitive).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedpeft.secagg.errors import SecAggConfigError

#: ChaCha20 key (= mask seed) length.
SEED_BYTES = 32
#: ChaCha20 "nonce" argument of ``cryptography``: 4-byte little-endian block counter + 12-byte
#: nonce. Distinct constants domain-separate the uses of one key; all start the counter at 0.
NONCE_BYTES = 16
#: Nonce of the masks (:func:`expand_mask`).
NONCE_MASK = bytes(16)
#: Nonce of the stochastic-rounding uniforms (:func:`uniform01`).
NONCE_ROUNDING = bytes(4) + b"fpsa-round\x00\x00"
#: Nonce of the public graph shuffle (:class:`KeystreamReader`).
NONCE_GRAPH = bytes(4) + b"fpsa-graph\x00\x00"
#: ChaCha20 block size; the 32-bit block counter bounds one stream to 2^32 blocks (256 GiB).
BLOCK_BYTES = 64
#: Longest stream from counter 0 (a stream starting at counter ``c`` gets ``64 * (2^32 - c)``).
MAX_KEYSTREAM_BYTES = BLOCK_BYTES * (1 << 32)


def _fixed_bytes(value: object, size: int, what: str) -> bytes:
    """``value`` as ``bytes`` if it is bytes-like of exactly ``size`` bytes, else a typed error."""
    raw = bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None
    if raw is None or len(raw) != size:
        got = type(value).__name__ if raw is None else f"length={len(raw)}"
        raise SecAggConfigError(f"{what} must be {size} bytes, got {got}")
    return raw


class ChaCha20Stream:
    """Sequential reader of the ChaCha20 keystream (RFC 8439) of ``key`` (32 B) and ``nonce``.

    ``nonce`` is ``cryptography``'s 16-byte argument: the initial 32-bit block counter
    (little-endian) followed by the 12-byte RFC 8439 nonce. :meth:`read` continues where the
    last read stopped (reading ``a`` then ``b`` bytes equals reading ``a + b``) and refuses to
    pass the end of the block counter (it never wraps into the nonce). The key is not kept as
    an attribute and never appears in ``repr`` or error messages. Not thread-safe.
    """

    def __init__(self, key: bytes, nonce: bytes) -> None:
        key = _fixed_bytes(key, SEED_BYTES, "ChaCha20 key")
        nonce = _fixed_bytes(nonce, NONCE_BYTES, "ChaCha20 nonce (4-byte block counter + 12-byte nonce)")
        counter = int.from_bytes(nonce[:4], "little")
        self._limit = BLOCK_BYTES * ((1 << 32) - counter)  # bytes left before the counter wraps
        # security: the one ChaCha20 construction; keystream = ChaCha20(key, nonce) XOR 0
        self._enc = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
        self._position = 0

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}(position={self._position})"

    @property
    def position(self) -> int:
        """Keystream bytes read so far."""
        return self._position

    @property
    def remaining(self) -> int:
        """Keystream bytes left before the 32-bit block counter would wrap."""
        return self._limit - self._position

    def read(self, nbytes: int) -> bytes:
        """The next ``nbytes`` bytes of the keystream (``nbytes >= 0``)."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise SecAggConfigError(f"nbytes={nbytes!r} must be an integer >= 0")
        if nbytes > self.remaining:  # security: the block counter never wraps
            raise SecAggConfigError(f"ChaCha20 keystream exhausted: reading {nbytes} bytes at position "
                                    f"{self._position} passes the 32-bit block counter")
        self._position += nbytes
        return self._enc.update(bytes(nbytes))  # security: keystream = ChaCha20(key) XOR 0


def keystream(key: bytes, nbytes: int, nonce: bytes = NONCE_MASK) -> bytes:
    """Return the first ``nbytes`` of the ChaCha20 keystream for ``key`` (32 B) and ``nonce``."""
    if len(key) != SEED_BYTES:
        raise SecAggConfigError(f"key length={len(key)} must be {SEED_BYTES} bytes")
    if nbytes < 0:
        raise SecAggConfigError(f"nbytes={nbytes} must be >= 0")
    return ChaCha20Stream(key, nonce).read(nbytes)


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
        self._stream = ChaCha20Stream(key, nonce)
        self._buf = b""
        self._pos = 0

    def _u32(self) -> int:
        if self._pos + 4 > len(self._buf):
            self._buf = self._stream.read(self._CHUNK)
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
