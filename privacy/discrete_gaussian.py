"""Exact sampling of the discrete Gaussian from a CSPRNG (user-level DP noise, issue 15).

The discrete Gaussian N_Z(0, sigma^2) puts mass proportional to ``exp(-x^2 / (2 sigma^2))`` on
every integer x. Distributed DP under secure aggregation (Kairouz, Liu and Steinke, ICML 2021)
has each client add integer noise of this law to its integer-coded update before masking, so
that the coordinator only ever sees the noisy sum.

Sampling follows Canonne, Kamath and Steinke ("The Discrete Gaussian for Differential Privacy",
NeurIPS 2020), Algorithms 1-3, in exact rational arithmetic: Bernoulli(exp(-gamma)) by the
alternating-series trick, the discrete Laplace by a geometric count, the discrete Gaussian by
rejection from the discrete Laplace. Every random choice is a uniform integer drawn by
rejection from a ChaCha20 keystream (:class:`ExactIntegers`); there is no floating point
anywhere, so the attacks on floating-point noise (Mironov, CCS 2012) that Opacus' secure mode
mitigates for the continuous Gaussian do not apply. ``sigma^2`` is a :class:`fractions.Fraction`
(or an integer); a float is refused unless it is exactly representable, so the variance a
client was asked for is exactly the variance it samples.

Costs (``benchmarks/ddg_bench.py``): the scalar path, pure Python, about 40 microseconds per
sample; :func:`discrete_gaussian_batch`, the same algorithms over NumPy int64 arrays (batched
rejection), about 2. The expected number of loop iterations is a small constant (CKS 2020,
Sec. 5).
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np
import numpy.typing as npt

from fedpeft.core.checks import is_real
from fedpeft.core.errors import ConfigError
from fedpeft.secagg.prg import SEED_BYTES, ChaCha20Stream

#: ChaCha20 nonce (4-byte block counter 0 + 12 bytes) of the integer stream: domain-separates
#: it from every other use of a key (secagg masks, DP-SGD noise and sampling).
NONCE_DISCRETE_GAUSSIAN = bytes(4) + b"fp-ddg-noise"
#: Largest variance accepted (integer scale). Far beyond any useful plan; keeps the exact
#: arithmetic's integers small.
MAX_SIGMA2 = Fraction(10) ** 18


class DiscreteGaussianError(ConfigError):
    """A discrete Gaussian parameter is invalid (the message names it and the valid range)."""


class ExactIntegers:
    """Uniform integers in ``[0, n)`` for any ``n >= 1``, from a ChaCha20 keystream.

    Each draw reads ``ceil(bits(n) / 8)`` bytes, masks them to ``bits(n)`` bits and rejects
    values ``>= n`` (expected fewer than 2 reads): exactly uniform, no modulo bias.
    """

    def __init__(self, key: bytes, nonce: bytes = NONCE_DISCRETE_GAUSSIAN) -> None:
        if not isinstance(key, bytes) or len(key) != SEED_BYTES:
            raise DiscreteGaussianError(f"key must be {SEED_BYTES} bytes from a CSPRNG")
        self._stream = ChaCha20Stream(key, nonce)

    @classmethod
    def from_os(cls) -> ExactIntegers:
        """A fresh 256-bit key from the operating system's CSPRNG (never stored)."""
        return cls(os.urandom(SEED_BYTES))  # security: noise key only from the OS CSPRNG

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}(position={self._stream.position})"

    def randbelow(self, n: int) -> int:
        """A uniform integer in ``[0, n)``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DiscreteGaussianError(f"randbelow bound n={n!r} must be an integer >= 1")
        if n == 1:
            return 0
        bits = (n - 1).bit_length()
        nbytes, mask = (bits + 7) // 8, (1 << bits) - 1
        while True:
            x = int.from_bytes(self._stream.read(nbytes), "little") & mask
            if x < n:  # security: rejection, no modulo bias
                return x


def _bernoulli(p: Fraction, rng: ExactIntegers) -> bool:
    """Bernoulli(p) for a rational ``p`` in [0, 1]: one uniform integer below its denominator."""
    return rng.randbelow(p.denominator) < p.numerator


def bernoulli_exp_neg(gamma: Fraction, rng: ExactIntegers) -> bool:
    """Bernoulli(exp(-gamma)) for a rational ``gamma >= 0`` (CKS 2020, Algorithm 1).

    For gamma in [0, 1]: draw A_k ~ Bernoulli(gamma / k) for k = 1, 2, ... until one is 0;
    the result is 1 when that k is odd (P = sum of the alternating series of exp(-gamma)).
    Larger gamma: exp(-gamma) = exp(-1)^floor(gamma) * exp(-(gamma - floor(gamma))).
    """
    if gamma < 0:
        raise DiscreteGaussianError(f"gamma={gamma} must be >= 0")
    if gamma > 1:
        for _ in range(math.floor(gamma)):
            if not bernoulli_exp_neg(Fraction(1), rng):
                return False
        return bernoulli_exp_neg(gamma - math.floor(gamma), rng)
    k = 1
    while _bernoulli(gamma / k, rng):
        k += 1
    return k % 2 == 1


def discrete_laplace(t: int, rng: ExactIntegers) -> int:
    """One draw of the discrete Laplace with scale ``t`` (an integer >= 1): mass proportional to
    ``exp(-|x| / t)`` (CKS 2020, Algorithm 2)."""
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise DiscreteGaussianError(f"discrete Laplace scale t={t!r} must be an integer >= 1")
    while True:
        u = rng.randbelow(t)
        if not bernoulli_exp_neg(Fraction(u, t), rng):
            continue
        v = 0
        while bernoulli_exp_neg(Fraction(1), rng):
            v += 1
        x = u + t * v
        negative = rng.randbelow(2) == 1
        if negative and x == 0:
            continue  # zero would otherwise be counted twice
        return -x if negative else x


def as_variance(sigma2: Fraction | int | float) -> Fraction:
    """``sigma^2`` as an exact positive rational; a float only if exactly representable
    (every float is a dyadic rational: it is taken as exactly that number)."""
    if isinstance(sigma2, bool) or not (isinstance(sigma2, Fraction) or is_real(sigma2)):
        raise DiscreteGaussianError(f"sigma2={sigma2!r} must be a Fraction, int or float")
    if isinstance(sigma2, float) and not math.isfinite(sigma2):
        raise DiscreteGaussianError(f"sigma2={sigma2!r} must be finite")
    value = Fraction(sigma2)
    if not 0 < value <= MAX_SIGMA2:
        raise DiscreteGaussianError(f"sigma2={sigma2!r} must be in (0, {MAX_SIGMA2}]")
    return value


def discrete_gaussian(sigma2: Fraction | int | float, rng: ExactIntegers) -> int:
    """One exact draw of N_Z(0, sigma^2) (CKS 2020, Algorithm 3).

    Rejection from the discrete Laplace of scale ``t = floor(sigma) + 1``: accept ``y`` with
    probability ``exp(-(|y| - sigma^2/t)^2 / (2 sigma^2))``.
    """
    s2 = as_variance(sigma2)
    t = math.isqrt(math.floor(s2)) + 1  # floor(sqrt(s2)) + 1, exactly
    while True:
        y = discrete_laplace(t, rng)
        gamma = (abs(y) - s2 / t) ** 2 / (2 * s2)
        if bernoulli_exp_neg(gamma, rng):
            return y


def discrete_gaussian_vector(n: int, sigma2: Fraction | int | float,
                             rng: ExactIntegers) -> npt.NDArray[np.int64]:
    """``n`` independent exact draws of N_Z(0, sigma^2) as int64."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DiscreteGaussianError(f"n={n!r} must be an integer >= 0")
    s2 = as_variance(sigma2)
    return np.fromiter((discrete_gaussian(s2, rng) for _ in range(n)), dtype=np.int64, count=n)


def discrete_gaussian_pmf(x: int, sigma2: Fraction | int | float, *, terms: int = 0) -> float:
    """P[N_Z(0, sigma^2) = x] (floating point; for tests and plots, not for sampling).

    The normaliser sums ``exp(-k^2 / (2 sigma^2))`` over ``|k| <= terms`` (default: 40 sigma,
    beyond which the tail is below 1e-300 relative).
    """
    s2 = float(as_variance(sigma2))
    span = terms or int(40 * math.sqrt(s2)) + 40
    norm = math.fsum(math.exp(-k * k / (2 * s2)) for k in range(-span, span + 1))
    return math.exp(-x * x / (2 * s2)) / norm


def discrete_gaussian_variance(sigma2: Fraction | int | float) -> float:
    """Var[N_Z(0, sigma^2)], which is below sigma^2 (CKS 2020, Proposition 19)."""
    s2 = float(as_variance(sigma2))
    span = int(40 * math.sqrt(s2)) + 40
    weights = [math.exp(-k * k / (2 * s2)) for k in range(-span, span + 1)]
    norm = math.fsum(weights)
    return math.fsum(w * k * k for w, k in zip(weights, range(-span, span + 1), strict=True)) / norm


# -- vectorised exact sampling ----------------------------------------------------------------
#: Largest integer the vectorised path handles in int64 arithmetic; elements whose exact
#: arithmetic would pass it are drawn by the scalar path (same law, Python integers).
_INT64_SAFE = 1 << 62


class _BatchIntegers:
    """Uniform integers below per-element bounds (each < 2^62), many at once, exactly: 8
    keystream bytes per element, masked to the bound's bit length, rejected when >= bound."""

    def __init__(self, rng: ExactIntegers) -> None:
        self.rng = rng
        self._stream = rng._stream  # the same keystream: one key, one stream

    def below(self, bounds: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        out = np.empty(bounds.shape[0], dtype=np.int64)
        todo = np.arange(bounds.shape[0])
        bits = np.zeros(bounds.shape[0], dtype=np.int64)
        # bit length of (bound - 1), vectorised: floor(log2) by float is exact below 2^53
        # only, so count with integer shifts
        v = bounds - 1
        while np.any(v > 0):
            bits += v > 0
            v = v >> 1
        masks = ((np.ones_like(bits) << bits) - 1).astype(np.uint64)
        while todo.size:
            words = np.frombuffer(self._stream.read(8 * todo.size), dtype="<u8")
            x = (words & masks[todo]).astype(np.int64)
            ok = x < bounds[todo]  # security: rejection, no modulo bias
            out[todo[ok]] = x[ok]
            todo = todo[~ok]
        return out


def _bernoulli_exp_neg_fraction(num: npt.NDArray[np.int64], den: npt.NDArray[np.int64],
                                ints: _BatchIntegers) -> npt.NDArray[np.bool_]:
    """Bernoulli(exp(-num/den)) per element for ``0 <= num <= den`` (CKS Algorithm 1,
    vectorised: each round draws A_k ~ Bernoulli(gamma / k) for the elements still running)."""
    result = np.zeros(num.shape[0], dtype=bool)
    k = np.ones(num.shape[0], dtype=np.int64)
    running = np.arange(num.shape[0])
    while running.size:
        # den * k must stay below 2^62: an element whose k grew that far (probability below
        # 1/k! each) continues the same loop with Python integers
        big = k[running] > _INT64_SAFE // den[running]
        for j in running[big]:
            kk = int(k[j])
            while ints.rng.randbelow(int(den[j]) * kk) < int(num[j]):
                kk += 1
            result[j] = kk % 2 == 1
        running = running[~big]
        a = ints.below(den[running] * k[running]) < num[running]
        stopped = running[~a]
        result[stopped] = k[stopped] % 2 == 1
        running = running[a]
        k[running] += 1
    return result


def _bernoulli_exp_neg_batch(num: npt.NDArray[np.int64], den: npt.NDArray[np.int64],
                             ints: _BatchIntegers) -> npt.NDArray[np.bool_]:
    """Bernoulli(exp(-num/den)) per element for any ``num >= 0``: floor(gamma) draws of
    Bernoulli(exp(-1)), all of which must succeed, then one of the fractional part."""
    whole, frac = num // den, num % den
    alive = np.ones(num.shape[0], dtype=bool)
    for j in range(int(whole.max(initial=0))):
        idx = np.flatnonzero(alive & (whole > j))
        if idx.size:
            ones = np.ones(idx.size, dtype=np.int64)
            alive[idx] = _bernoulli_exp_neg_fraction(ones, ones, ints)
    idx = np.flatnonzero(alive)
    alive[idx] = _bernoulli_exp_neg_fraction(frac[idx], den[idx], ints)
    return alive


def _discrete_laplace_batch(t: int, n: int, ints: _BatchIntegers) -> npt.NDArray[np.int64]:
    """``n`` draws of the discrete Laplace of integer scale ``t`` (CKS Algorithm 2, batched
    rejection: the rejected elements are drawn again)."""
    out = np.empty(n, dtype=np.int64)
    todo = np.arange(n)
    ones_cache: dict[int, npt.NDArray[np.int64]] = {}
    while todo.size:
        m = todo.size
        tt = np.full(m, t, dtype=np.int64)
        u = ints.below(tt)
        keep = _bernoulli_exp_neg_fraction(u, tt, ints)
        # V = number of successes of Bernoulli(exp(-1)) before the first failure
        v = np.zeros(m, dtype=np.int64)
        counting = np.flatnonzero(keep)
        while counting.size:
            ones = ones_cache.setdefault(counting.size, np.ones(counting.size, dtype=np.int64))
            hit = _bernoulli_exp_neg_fraction(ones, ones, ints)
            v[counting[hit]] += 1
            counting = counting[hit]
        x = u + t * v
        negative = ints.below(np.full(m, 2, dtype=np.int64)) == 1
        accept = keep & ~(negative & (x == 0))
        out[todo[accept]] = np.where(negative, -x, x)[accept]
        todo = todo[~accept]
    return out


def discrete_gaussian_batch(n: int, sigma2: Fraction | int | float,
                            rng: ExactIntegers) -> npt.NDArray[np.int64]:
    """``n`` independent exact draws of N_Z(0, sigma^2), vectorised (same law as
    :func:`discrete_gaussian_vector`, not the same stream of draws).

    CKS Algorithm 3 in int64 arithmetic over arrays: with ``sigma^2 = p / q`` and ``t =
    floor(sigma) + 1``, a discrete Laplace candidate ``y`` is accepted with probability
    ``exp(-(|y| t q - p)^2 / (2 p q t^2))``; an element whose numerator or denominator would
    pass 2^62 is drawn by the scalar path instead (Python integers, exact).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DiscreteGaussianError(f"n={n!r} must be an integer >= 0")
    s2 = as_variance(sigma2)
    p, q = s2.numerator, s2.denominator
    t = math.isqrt(math.floor(s2)) + 1
    den = 2 * p * q * t * t
    if den * 4 >= _INT64_SAFE:  # the batch arithmetic would overflow: exact scalar path
        return discrete_gaussian_vector(n, s2, rng)
    ints = _BatchIntegers(rng)
    out = np.empty(n, dtype=np.int64)
    todo = np.arange(n)
    while todo.size:
        y = _discrete_laplace_batch(t, todo.size, ints)
        a = np.abs(y)
        # |y| t q - p must square below 2^62 and (num, den * k) stay in int64: else scalar
        safe = a <= (math.isqrt(_INT64_SAFE // 4) + p) // (t * q)
        centred = a * (t * q) - p
        num = np.where(safe, centred * centred, 0)
        ok = np.zeros(todo.size, dtype=bool)
        idx = np.flatnonzero(safe)
        ok[idx] = _bernoulli_exp_neg_batch(num[idx], np.full(idx.size, den, dtype=np.int64),
                                           ints)
        for j in np.flatnonzero(~safe):  # astronomically rare tails: exact Python integers
            gamma = (int(a[j]) - s2 / t) ** 2 / (2 * s2)
            ok[j] = bernoulli_exp_neg(gamma, rng)
        out[todo[ok]] = y[ok]
        todo = todo[~ok]
    return out
