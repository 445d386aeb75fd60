"""Shamir secret sharing over GF(2^521 - 1)."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.secagg.errors import InsufficientSharesError, ShamirError
from fedpeft.secagg.shamir import PRIME, SHARE_BYTES, lagrange_at_zero, reconstruct, split


def test_every_t_subset_reconstructs_and_no_t_minus_1_subset_does() -> None:
    secret = os.urandom(32)
    t, xs = 3, [1, 2, 3, 4, 6, 9]
    shares = split(secret, t, xs)
    assert all(len(y) == SHARE_BYTES for y in shares.values())
    for subset in itertools.combinations(xs, t):
        assert reconstruct({x: shares[x] for x in subset}, t) == secret
    for subset in itertools.combinations(xs, t - 1):
        points = {x: int.from_bytes(shares[x], "big") for x in subset}
        # the degree-(t-2) interpolation is unrelated to the secret (equality has prob. 1/p)
        assert lagrange_at_zero(points) != int.from_bytes(secret, "big")
        with pytest.raises(InsufficientSharesError):
            reconstruct({x: shares[x] for x in subset}, t)


def test_fewer_than_t_shares_are_consistent_with_any_secret() -> None:
    """Perfect secrecy: for t-1 shares and any candidate secret, a consistent polynomial exists."""
    t, xs = 3, [1, 2, 3, 4]
    shares = split(bytes(32), t, xs)
    pts = {x: int.from_bytes(shares[x], "big") for x in (2, 4)}
    for candidate in (1, 12345, PRIME - 1):
        # interpolate through (0, candidate) and the two shares; it must pass through them (degree 2)
        full = {0: candidate, **pts}
        xs3 = list(full)

        def poly(z: int, xs3: list[int] = xs3, full: dict[int, int] = full) -> int:
            total = 0
            for i, xi in enumerate(xs3):
                num, den = 1, 1
                for j, xj in enumerate(xs3):
                    if i != j:
                        num = num * (z - xj) % PRIME
                        den = den * (xi - xj) % PRIME
                total = (total + full[xi] * num * pow(den, -1, PRIME)) % PRIME
            return total

        assert all(poly(x) == y for x, y in pts.items()) and poly(0) == candidate


@settings(max_examples=40, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), n=st.integers(2, 12), data=st.data())
def test_property_random_t_subset_reconstructs(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    xs = data.draw(st.lists(st.integers(1, 2**64), min_size=n, max_size=n, unique=True))
    shares = split(secret, t, xs)
    subset = data.draw(st.lists(st.sampled_from(xs), min_size=t, max_size=n, unique=True))
    assert reconstruct({x: shares[x] for x in subset}, t) == secret


def test_split_rejects_bad_arguments() -> None:
    with pytest.raises(ShamirError, match="secret length"):
        split(b"short", 2, [1, 2])
    with pytest.raises(ShamirError, match="threshold"):
        split(bytes(32), 3, [1, 2])
    with pytest.raises(ShamirError, match="distinct"):
        split(bytes(32), 2, [1, 1, 2])
    with pytest.raises(ShamirError, match="distinct"):
        split(bytes(32), 2, [0, 1])
    with pytest.raises(ShamirError):
        reconstruct({1: b"\x00" * 3, 2: b"\x00" * 3}, 2)


def test_inconsistent_shares_detected_or_give_wrong_secret() -> None:
    secret = os.urandom(32)
    shares = split(secret, 2, [1, 2, 3])
    bad = dict(shares)
    bad[1] = (int.from_bytes(bad[1], "big") ^ 1).to_bytes(SHARE_BYTES, "big")
    try:
        assert reconstruct({1: bad[1], 2: bad[2]}, 2) != secret
    except ShamirError:
        pass  # value outside 256 bits: detected
