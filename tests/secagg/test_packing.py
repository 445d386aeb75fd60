"""Bit-packed field words: round trip, the plain-dtype equivalence, canonical padding, sizes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.secagg import messages as msg
from fedpeft.secagg.errors import MalformedMessageError, SecAggConfigError
from fedpeft.secagg.packing import pack_words, packed_size, unpack_words


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 32), length=st.integers(0, 300), seed=st.integers(0, 2**32 - 1))
def test_round_trip_any_width(bits: int, length: int, seed: int) -> None:
    words = np.random.default_rng(seed).integers(0, 1 << bits, size=length, dtype=np.uint64)
    words = words.astype(np.uint32)
    blob = pack_words(words, bits)
    assert len(blob) == packed_size(length, bits)
    np.testing.assert_array_equal(unpack_words(blob, length, bits), words)


@pytest.mark.parametrize("bits", [8, 16, 32])
def test_byte_widths_equal_the_plain_little_endian_words(bits: int) -> None:
    words = np.arange(0, 1 << 8, dtype=np.uint32) * ((1 << bits) // 256 or 1)
    assert pack_words(words, bits) == words.astype(f"<u{bits // 8}").tobytes()


def test_twenty_bits_pack_to_five_eighths_of_uint32() -> None:
    words = np.full(1024, (1 << 20) - 1, dtype=np.uint32)
    assert len(pack_words(words, 20)) == 1024 * 20 // 8


def test_word_out_of_range_and_bad_width_are_typed_errors() -> None:
    with pytest.raises(SecAggConfigError, match="2\\^bits=20"):
        pack_words(np.array([1 << 20], dtype=np.uint32), 20)
    with pytest.raises(SecAggConfigError, match="bits"):
        pack_words(np.zeros(3, dtype=np.uint32), 33)


def test_nonzero_padding_and_wrong_sizes_are_malformed() -> None:
    blob = bytearray(pack_words(np.array([1, 2, 3], dtype=np.uint32), 20))  # 60 of 64 bits
    blob[-1] |= 0x80
    with pytest.raises(MalformedMessageError, match="padding"):
        unpack_words(bytes(blob), 3, 20)
    with pytest.raises(MalformedMessageError, match="bytes"):
        unpack_words(bytes(blob[:-1]), 3, 20)


def test_masked_message_carries_its_width_and_refuses_another() -> None:
    sid = b"packing-test-session"
    words = np.array([5, (1 << 18) - 1, 0, 77], dtype=np.uint32)
    data = msg.encode_masked(sid, 9, words, 18)
    np.testing.assert_array_equal(msg.decode_masked(data, sid, 9, 4, 18), words)
    with pytest.raises(MalformedMessageError, match="bits=18"):
        msg.decode_masked(data, sid, 9, 4, 20)
