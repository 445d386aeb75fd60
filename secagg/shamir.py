"""t-of-k Shamir secret sharing over GF(p), p = 2^521 - 1 (Shamir, CACM 1979).

A 32-byte secret is read as an integer < 2^256 < p, so one field element holds it. Share
``(x, y)`` has ``x`` in ``[1, p)`` (the holder's 1-based index) and ``y`` encoded as 66 bytes.
Coefficients are drawn with :mod:`secrets` (os.urandom). Fewer than ``t`` shares are
information-theoretically independent of the secret.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from fedpeft.secagg.errors import InsufficientSharesError, ShamirError

PRIME = (1 << 521) - 1  # Mersenne prime M521
SHARE_BYTES = 66  # ceil(521 / 8)
#: Length of a shared secret (a self-mask seed or an X25519 private key).
SECRET_BYTES = 32


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, bytes]:
    """Share ``secret`` (32 B) so that any ``threshold`` of the points ``xs`` recover it."""
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"secret length={len(secret)} must be {SECRET_BYTES} bytes")
    if len(set(xs)) != len(xs) or any(not 1 <= x < PRIME for x in xs):
        raise ShamirError(f"xs={list(xs)[:8]}... must be distinct integers in [1, p)")
    if not 1 <= threshold <= len(xs):
        raise ShamirError(f"threshold={threshold} must be in [1, len(xs)={len(xs)}]")
    # security: random coefficients from the OS CSPRNG; coefficient 0 is the secret.
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out: dict[int, bytes] = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % PRIME
        out[x] = acc.to_bytes(SHARE_BYTES, "big")
    return out


def lagrange_at_zero(points: Mapping[int, int]) -> int:
    """Value at 0 of the unique polynomial of degree < len(points) through ``points``."""
    xs = list(points)
    total = 0
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        total = (total + points[xi] * num * pow(den, -1, PRIME)) % PRIME
    return total


def reconstruct(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """Recover the 32-byte secret from at least ``threshold`` shares ``{x: y_bytes}``.

    Uses the first ``threshold`` shares (sorted by x). Raises :class:`InsufficientSharesError`
    for fewer shares and :class:`ShamirError` if the result is not a 32-byte secret (which
    happens with overwhelming probability when shares are inconsistent or too few).
    """
    if threshold < 1:
        raise ShamirError(f"threshold={threshold} must be >= 1")
    if len(shares) < threshold:
        raise InsufficientSharesError(
            f"got {len(shares)} shares, need threshold={threshold}; wait for more holders or abort"
        )
    points: dict[int, int] = {}
    for x in sorted(shares)[:threshold]:
        y = shares[x]
        if len(y) != SHARE_BYTES or not 1 <= x < PRIME:
            raise ShamirError(f"share x={x} has length={len(y)}; expected {SHARE_BYTES} bytes")
        value = int.from_bytes(y, "big")
        if value >= PRIME:
            raise ShamirError(f"share x={x} is not a field element (>= p)")
        points[x] = value
    secret = lagrange_at_zero(points)
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ShamirError("reconstructed value exceeds 256 bits: shares are inconsistent")
    return secret.to_bytes(SECRET_BYTES, "big")
