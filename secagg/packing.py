"""Bit-packing of field words: ``b`` bits a coordinate on the wire, not a whole machine word.

Word ``j`` occupies bits ``j*b .. j*b + b - 1`` of a little-endian bit stream, so ``b = 16`` and
``b = 32`` give exactly the little-endian ``uint16`` / ``uint32`` bytes. The unused high bits of
the last byte must be zero (one canonical encoding per vector). Pure functions on NumPy arrays.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedpeft.secagg.errors import MalformedMessageError, SecAggConfigError

#: Widest word (the masks are ``uint32``).
MAX_WORD_BITS = 32


def packed_size(length: int, bits: int) -> int:
    """Bytes of ``length`` words of ``bits`` bits."""
    return (length * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_WORD_BITS:
        raise SecAggConfigError(f"bits={bits!r} must be an integer in [1, {MAX_WORD_BITS}]")


def pack_words(words: npt.NDArray[np.uint32], bits: int) -> bytes:
    """``words`` (each ``< 2^bits``) as a packed bit stream."""
    _check_bits(bits)
    w = np.ascontiguousarray(words, dtype="<u4")
    if bits < MAX_WORD_BITS and bool(np.any(w >> np.uint32(bits))):
        raise SecAggConfigError(f"a word is >= 2^bits={bits}; reduce it mod 2^bits first")
    if bits in (8, 16, 32):
        return w.astype(f"<u{bits // 8}").tobytes()
    stream = np.unpackbits(w.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
    return np.packbits(stream[:, :bits].reshape(-1), bitorder="little").tobytes()


def unpack_words(data: bytes | memoryview, length: int, bits: int) -> npt.NDArray[np.uint32]:
    """Inverse of :func:`pack_words`: exactly ``length`` words; raises
    :class:`MalformedMessageError` for a wrong size or non-zero padding bits."""
    _check_bits(bits)
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.shape[0] != packed_size(length, bits):
        raise MalformedMessageError(f"packed vector has {raw.shape[0]} bytes; {length} words of "
                                    f"{bits} bits take {packed_size(length, bits)}")
    if bits in (8, 16, 32):
        return np.frombuffer(raw.tobytes(), dtype=f"<u{bits // 8}").astype(np.uint32)
    stream = np.unpackbits(raw, bitorder="little")
    if bool(np.any(stream[length * bits:])):  # security: one canonical encoding
        raise MalformedMessageError("packed vector has non-zero padding bits")
    table = np.zeros((length, MAX_WORD_BITS), dtype=np.uint8)
    table[:, :bits] = stream[: length * bits].reshape(length, bits)
    return np.packbits(table, axis=1, bitorder="little").view("<u4").reshape(-1).astype(np.uint32)
