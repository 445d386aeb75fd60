"""The one ChaCha20 keystream primitive (``fedpeft.secagg.prg.ChaCha20Stream``) and its users."""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
import pytest

from fedpeft.secagg.errors import SecAggConfigError
from fedpeft.secagg.prg import (
    MAX_KEYSTREAM_BYTES,
    NONCE_GRAPH,
    NONCE_MASK,
    NONCE_ROUNDING,
    ChaCha20Stream,
    KeystreamReader,
    expand_mask,
    keystream,
    uniform01,
)

KEY = bytes(range(32))


def test_rfc8439_section_2_4_2_encryption_vector() -> None:
    """RFC 8439 sec. 2.4.2: key 00..1f, nonce 00:00:00:00:00:00:00:4a:00:00:00:00, counter 1."""
    nonce = struct.pack("<I", 1) + bytes.fromhex("000000000000004a00000000")
    plaintext = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the "
                 b"future, sunscreen would be it.")
    stream = ChaCha20Stream(KEY, nonce).read(len(plaintext))
    ciphertext = bytes(a ^ b for a, b in zip(plaintext, stream, strict=True))
    assert ciphertext.hex() == (
        "6e2e359a2568f98041ba0728dd0d6981e97e7aec1d4360c20a27afccfd9fae0bf91b65c5524733ab8f593dab"
        "cd62b3571639d624e65152ab8f530c359f0861d807ca0dbf500d6a6156a38e088a22b65e52bc514d16ccf806"
        "818ce91ab77937365af90bbf74a35be6b40b8eedf2785e42874d"
    )


def test_rfc8439_appendix_a1_block_and_counter() -> None:
    block0 = bytes.fromhex(
        "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
        "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
    )
    two = ChaCha20Stream(bytes(32), bytes(16)).read(128)
    assert two[:64] == block0
    assert ChaCha20Stream(bytes(32), struct.pack("<I", 1) + bytes(12)).read(64) == two[64:]


@pytest.mark.parametrize("split", [0, 1, 63, 64, 65, 4095, 5000])
def test_reading_in_parts_equals_reading_at_once(split: int) -> None:
    whole = ChaCha20Stream(KEY, NONCE_MASK).read(5000)
    s = ChaCha20Stream(KEY, NONCE_MASK)
    first = s.read(split)
    assert s.position == split
    assert first + s.read(5000 - split) == whole and s.position == 5000


def test_every_user_reads_the_same_primitive() -> None:
    assert keystream(KEY, 300) == ChaCha20Stream(KEY, NONCE_MASK).read(300)
    assert keystream(KEY, 300, NONCE_GRAPH) == ChaCha20Stream(KEY, NONCE_GRAPH).read(300)
    words = np.frombuffer(ChaCha20Stream(KEY, NONCE_MASK).read(4 * 50), dtype="<u4")
    assert np.array_equal(expand_mask(KEY, 50), words)
    rounding = np.frombuffer(ChaCha20Stream(KEY, NONCE_ROUNDING).read(4 * 50), dtype="<u4")
    assert np.array_equal(uniform01(KEY, 50), rounding.astype(np.float64) / 2.0 ** 32)
    # randbelow(2^32) accepts every word: the reader's words in order, across its 4 KiB refills
    reader = KeystreamReader(KEY)
    graph = np.frombuffer(ChaCha20Stream(KEY, NONCE_GRAPH).read(4 * 2100), dtype="<u4")
    assert [reader.randbelow(1 << 32) for _ in range(2100)] == graph.tolist()


def test_stream_stops_at_the_end_of_the_block_counter() -> None:
    assert ChaCha20Stream(KEY, NONCE_MASK).remaining == MAX_KEYSTREAM_BYTES == 64 << 32
    last = ChaCha20Stream(KEY, b"\xff\xff\xff\xff" + bytes(12))
    assert last.remaining == 64
    last.read(60)
    with pytest.raises(SecAggConfigError, match="keystream exhausted: reading 5 bytes at position 60"):
        last.read(5)
    assert last.position == 60  # a refused read consumes nothing
    assert len(last.read(4)) == 4 and last.remaining == 0
    assert last.read(0) == b""


@pytest.mark.parametrize("call", [
    lambda: ChaCha20Stream(bytes(31), NONCE_MASK),
    lambda: ChaCha20Stream(bytes(33), NONCE_MASK),
    lambda: ChaCha20Stream("k" * 32, NONCE_MASK),  # type: ignore[arg-type]
    lambda: ChaCha20Stream(KEY, bytes(12)),
    lambda: ChaCha20Stream(KEY, None),  # type: ignore[arg-type]
    lambda: ChaCha20Stream(KEY, NONCE_MASK).read(-1),
    lambda: ChaCha20Stream(KEY, NONCE_MASK).read(1.5),  # type: ignore[arg-type]
    lambda: ChaCha20Stream(KEY, NONCE_MASK).read(True),
])
def test_bad_input_raises_a_typed_error(call: Callable[[], object]) -> None:
    with pytest.raises(SecAggConfigError) as info:
        call()
    assert isinstance(info.value, ValueError)
    assert KEY.hex() not in str(info.value)


def test_repr_never_shows_the_key() -> None:
    s = ChaCha20Stream(KEY, NONCE_MASK)
    s.read(3)
    assert repr(s) == "ChaCha20Stream(position=3)"
    assert not any(v == KEY or (isinstance(v, bytes) and KEY in v) for v in vars(s).values())
