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
    return {x: _evaluate(coeffs, x).to_bytes(SHARE_BYTES, "big") for x in xs}


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


def _solve_mod_p(rows: list[list[int]], rhs: list[int], unknowns: int) -> list[int] | None:
    """One solution of ``rows @ v = rhs`` over GF(p) (free variables 0), or None if none."""
    a = [list(r) + [b] for r, b in zip(rows, rhs, strict=True)]
    pivots: list[int] = []
    row = 0
    for col in range(unknowns):
        piv = next((i for i in range(row, len(a)) if a[i][col] % PRIME), None)
        if piv is None:
            continue
        a[row], a[piv] = a[piv], a[row]
        inv = pow(a[row][col], -1, PRIME)
        a[row] = [v * inv % PRIME for v in a[row]]
        for i in range(len(a)):
            if i != row and a[i][col]:
                f = a[i][col]
                a[i] = [(v - f * w) % PRIME for v, w in zip(a[i], a[row], strict=True)]
        pivots.append(col)
        row += 1
    if any(r[-1] % PRIME for r in a[row:]):  # 0 = nonzero: inconsistent
        return None
    out = [0] * unknowns
    for i, col in enumerate(pivots):
        out[col] = a[i][-1]
    return out


def _poly_divide(num: list[int], den: list[int]) -> tuple[list[int], bool]:
    """``num / den`` over GF(p) (coefficients lowest first); returns (quotient, exact)."""
    num = list(num)
    while len(den) > 1 and den[-1] == 0:
        den = den[:-1]
    inv = pow(den[-1], -1, PRIME)
    quot = [0] * max(len(num) - len(den) + 1, 1)
    for i in range(len(num) - len(den), -1, -1):
        coef = num[i + len(den) - 1] * inv % PRIME
        quot[i] = coef
        for j, d in enumerate(den):
            num[i + j] = (num[i + j] - coef * d) % PRIME
    return quot, not any(num[: len(den) - 1])


def _evaluate(coeffs: Sequence[int], x: int) -> int:
    """The polynomial with ``coeffs`` (lowest first) at ``x`` over GF(p) (Horner)."""
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % PRIME
    return acc


def robust_reconstruct(shares: Mapping[int, bytes], threshold: int) -> tuple[bytes, frozenset[int]]:
    """Recover the secret from ``m >= threshold`` shares of which up to ``(m - threshold) // 2``
    are wrong, and name the wrong ones (their ``x``).

    Shamir shares are a Reed-Solomon codeword; Berlekamp-Welch decoding (Welch and Berlekamp,
    US patent 4,633,470, 1986; Gemmell and Sudan, IPL 1992) finds an error locator ``E`` (degree
    ``e``) and ``Q = P E`` with ``Q(x_i) = y_i E(x_i)`` by linear algebra over GF(p), then
    ``P = Q / E``. Malformed shares (wrong length, not a field element) are erasures and are
    named too. Raises :class:`ShamirError` when there are too many errors to decode (the
    caller must then abort) and :class:`InsufficientSharesError` for fewer than ``threshold``
    usable shares. Cost ``O(m^3)`` field operations: call it only when :func:`reconstruct`
    failed its check.
    """
    if threshold < 1:
        raise ShamirError(f"threshold={threshold} must be >= 1")
    bad: set[int] = set()
    points: dict[int, int] = {}
    for x in sorted(shares):
        y = shares[x]
        value = int.from_bytes(y, "big") if len(y) == SHARE_BYTES else PRIME
        if not 1 <= x < PRIME or value >= PRIME:
            bad.add(x)
        else:
            points[x] = value
    m = len(points)
    if m < threshold:
        raise InsufficientSharesError(
            f"got {m} well-formed shares, need threshold={threshold}; too few holders answered"
        )
    xs = sorted(points)
    for e in range((m - threshold) // 2, -1, -1):
        # unknowns: E_0..E_{e-1} (E monic of degree e), Q_0..Q_{e+t-1}
        n_q = e + threshold
        rows, rhs = [], []
        for x in xs:
            yx = points[x]
            row = [(-yx * pow(x, j, PRIME)) % PRIME for j in range(e)]
            row += [pow(x, j, PRIME) for j in range(n_q)]
            rows.append(row)
            rhs.append(yx * pow(x, e, PRIME) % PRIME)
        sol = _solve_mod_p(rows, rhs, e + n_q)
        if sol is None:
            continue
        locator = sol[:e] + [1]
        poly, exact = _poly_divide(sol[e:], locator)
        if not exact or len(poly) > threshold and any(poly[threshold:]):
            continue
        wrong = {x for x in xs if _evaluate(poly, x) != points[x]}
        if len(wrong) > e:
            continue
        secret = poly[0] if poly else 0
        if secret >= 1 << (8 * SECRET_BYTES):
            break
        return secret.to_bytes(SECRET_BYTES, "big"), frozenset(bad | wrong)
    raise ShamirError(
        f"shares do not decode: more than {(m - threshold) // 2} of {m} are wrong (or the dealer "
        "shared inconsistently)"
    )
