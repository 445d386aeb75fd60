"""Known-answer vectors: ChaCha20 keystream, X25519, KDF labels, mask expansion, graph shuffle."""

from __future__ import annotations

import hashlib
import hmac
import struct

import numpy as np

from fedpeft.secagg.graph import neighbour_graph, public_permutation
from fedpeft.secagg.kdf import (
    LABEL_PAIRWISE_MASK,
    LABEL_SHARE_KEY,
    agree,
    pair_info,
    pairwise_mask_seed,
    public_from_private,
    self_mask_commitment,
    share_key,
)
from fedpeft.secagg.prg import expand_mask, keystream

SK_A = bytes(range(32))
SK_B = bytes(range(32, 64))
SID = b"kat-session-0001"


def _hkdf_reference(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    """RFC 5869 written out with hmac (independent of `cryptography`)."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def test_chacha20_zero_key_keystream_matches_published_vector() -> None:
    # ChaCha20 block, key = 0, nonce = 0, counter = 0 (RFC 8439 appendix A.1, test vector #1)
    expected = bytes.fromhex(
        "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
        "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
    )
    assert keystream(bytes(32), 64) == expected
    words = expand_mask(bytes(32), 4)
    assert words.tolist() == list(struct.unpack("<4I", expected[:16]))


def test_x25519_rfc7748_vector() -> None:
    alice_sk = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob_pk = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    assert public_from_private(alice_sk).hex() == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
    assert agree(alice_sk, bob_pk).hex() == (
        "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    )


def test_labels_are_fixed_and_distinct() -> None:
    assert LABEL_PAIRWISE_MASK == b"fedpeft/secagg/v1/pairwise-mask-seed"
    assert LABEL_SHARE_KEY == b"fedpeft/secagg/v1/share-encryption-key"
    assert pair_info(LABEL_PAIRWISE_MASK, 9, 5) == LABEL_PAIRWISE_MASK + b"\x00" + struct.pack(">QQ", 5, 9)


def test_pairwise_seed_known_answer_and_symmetry() -> None:
    pk_a, pk_b = public_from_private(SK_A), public_from_private(SK_B)
    assert pk_a.hex() == "8f40c5adb68f25624ae5b214ea767a6ec94d829d3d7b5e1ad1ba6f3e2138285f"
    seed = pairwise_mask_seed(SK_A, pk_b, SID, 5, 9)
    assert seed == pairwise_mask_seed(SK_B, pk_a, SID, 9, 5)  # both ends agree
    assert seed.hex() == "a243eed099402d0c94fd94ea6780376e91980ad44851ab3d3578086f1358703a"
    ikm = agree(SK_A, pk_b)
    assert seed == _hkdf_reference(ikm, SID, pair_info(LABEL_PAIRWISE_MASK, 5, 9))
    key = share_key(SK_A, pk_b, SID, 5, 9)
    assert key.hex() == "3734422105d8994f1965b02d35a964a3dd16019195192d0cc8455c5c3539de37"
    assert key == _hkdf_reference(ikm, SID, pair_info(LABEL_SHARE_KEY, 5, 9))
    # domain separation: other session / pair / label gives another key
    assert pairwise_mask_seed(SK_A, pk_b, SID + b"x", 5, 9) != seed
    assert pairwise_mask_seed(SK_A, pk_b, SID, 5, 10) != seed
    assert key != seed


def test_mask_expansion_known_answer() -> None:
    seed = bytes.fromhex("a243eed099402d0c94fd94ea6780376e91980ad44851ab3d3578086f1358703a")
    assert expand_mask(seed, 8).tolist() == [
        1606474693, 425339741, 1829753580, 457654738, 1109232381, 1940602706, 622447449, 4061443522
    ]
    long = expand_mask(seed, 1000)
    assert long.dtype == np.dtype("<u4") and long[:8].tolist() == expand_mask(seed, 8).tolist()


def test_commitment_and_graph_known_answers() -> None:
    assert self_mask_commitment(SID, 5, bytes(32)).hex() == (
        "c6e6bd3a185ff97aff35469a85522711055f24cf1620df7c71dd0c345b555691"
    )
    assert public_permutation(list(range(10)), bytes(32)) == [9, 3, 4, 8, 0, 1, 5, 6, 7, 2]
    g = neighbour_graph(list(range(10)), 4, bytes(32))
    assert all(len(v) == 4 for v in g.values())
    assert all(a in g[b] for a in g for b in g[a])  # symmetric
