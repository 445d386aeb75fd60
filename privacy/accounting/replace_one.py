"""Replace-one (substitution) accounting of the Poisson-subsampled Gaussian mechanism.

Pure maths, no Opacus import at module level. With sensitivity 1 (the clip norm) and noise
multiplier ``s``, the pair of output distributions of one Poisson-subsampled (rate ``q``)
Gaussian step under replace-one adjacency is

    P = q N(-1, s^2) + (1-q) N(0, s^2),    Q = q N(+1, s^2) + (1-q) N(0, s^2),

the pair Google ``dp_accounting`` uses for ``REPLACE_ONE`` (``GaussianPrivacyLoss`` with
``AdjacencyType.REPLACE``; Doroshenko et al. 2022, "Connect the Dots"); on dominating pairs of
subsampled mechanisms under substitution see Zhu, Dong and Wang 2022 ("Optimal Accounting of
Differential Privacy via Characteristic Function") and Lebeda, Regehr, Kamath and Steinke 2024
("Avoiding Pitfalls for Privacy Accounting of Subsampled Mechanisms under Composition"). The
pair is symmetric (x -> -x swaps P and Q), so one direction covers both. At ``q = 1`` it is the
Gaussian mechanism with sensitivity 2.

* :class:`ReplaceOnePoissonSubsampledGaussianPRV`: its privacy loss random variable
  L(X) = log(P(X)/Q(X)), X ~ P, for Opacus' PRV accountant (Gopi, Lee and Wutschitz 2021,
  "Numerical Composition of Differential Privacy"), with a closed-form inverse loss.
* :func:`renyi_divergence` / :func:`rdp_curve`: Renyi DP D_alpha(P || Q) (Mironov 2017) by
  log-space numerical integration, rounded toward more privacy loss (see there).
* :func:`prv_domain`: the PRV discretisation domain, sized (Gopi et al. 2021, Remark 5.6, as
  Opacus' ``compute_safe_domain_size``) from the *replace-one* RDP bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from scipy.special import log_ndtr, logsumexp, ndtr

if TYPE_CHECKING:
    from opacus.accountants.analysis.prv import Domain  # type: ignore[import-untyped]

FloatArray = npt.NDArray[np.float64]

_LOG2 = math.log(2.0)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
#: Relative step-halving difference above which the RDP quadrature is refined again.
_RDP_REL_TOL = 1e-9
#: Extra relative margin on the RDP integral for floating-point rounding of the sum.
_RDP_ROUNDING_MARGIN = 1e-10
#: The analytic tail bounds outside the integration window must be below exp(-this) times
#: the integral (else the window is widened).
_RDP_TAIL_LOG_MARGIN = 35.0
_SERIES_TERMS = 26


def _check_q_sigma(sample_rate: float, noise_multiplier: float) -> tuple[float, float]:
    q, s = float(sample_rate), float(noise_multiplier)
    if not (math.isfinite(q) and 0.0 < q <= 1.0):
        raise ValueError(f"sample_rate={sample_rate!r} must be in (0, 1].")
    if not (math.isfinite(s) and s > 0.0):
        raise ValueError(f"noise_multiplier={noise_multiplier!r} must be a finite number > 0.")
    return q, s


def _log1m(q: float) -> float:
    """log(1 - q), -inf at q = 1."""
    return math.log1p(-q) if q < 1.0 else -math.inf


def _log_a(q: float, s: float) -> float:
    """log a with a = q exp(-1/(2 s^2)) / (1 - q): P/Q = (1 + a/z) / (1 + a z), z = e^{x/s^2}."""
    return math.log(q) - _log1m(q) - 0.5 / (s * s)


def privacy_loss(x: npt.ArrayLike, sample_rate: float, noise_multiplier: float) -> FloatArray:
    """L(x) = log(P(x) / Q(x)) of the replace-one pair; strictly decreasing, L(-x) = -L(x)."""
    q, s = _check_q_sigma(sample_rate, noise_multiplier)
    u = np.asarray(x, dtype=np.float64) / (s * s)
    if q == 1.0:
        return np.asarray(-2.0 * u, dtype=np.float64)
    la = _log_a(q, s)
    with np.errstate(over="ignore", invalid="ignore"):
        # softplus(la - u) - softplus(la + u), exact in floating point away from u = 0 ...
        far = np.logaddexp(0.0, la - u) - np.logaddexp(0.0, la + u)
        # ... and log1p(-2 a sinh(u) / (1 + a e^u)) near u = 0 (no cancellation).
        uc = np.clip(u, -1.0, 1.0)
        a = math.exp(la)
        near = np.log1p(-2.0 * a * np.sinh(uc) / (1.0 + a * np.exp(uc)))
    return np.asarray(np.where(np.abs(u) < 1.0, near, far), dtype=np.float64)


def _log_sinh_abs(v: FloatArray) -> FloatArray:
    """log|sinh(v)| (-inf at 0), stable for all v."""
    w = np.abs(v)
    with np.errstate(divide="ignore"):
        return np.asarray(w + np.log(-np.expm1(-2.0 * w)) - _LOG2, dtype=np.float64)


def inverse_privacy_loss(t: npt.ArrayLike, sample_rate: float,
                         noise_multiplier: float) -> FloatArray:
    """x with L(x) = t (closed form).

    With z = e^{x/s^2} and c = e^{-1/(2 s^2)}, e^t = (qc/z + 1-q)/(qcz + 1-q) is the quadratic
    qc e^t z^2 + (1-q)(e^t - 1) z - qc = 0; substituting w = z e^{t/2} gives
    qc w^2 + 2(1-q) sinh(t/2) w - qc = 0, so log w = -asinh(b), b = (1-q) sinh(t/2)/(qc), and
    x = s^2 (-t/2 - asinh(b)) (as dp_accounting's ``_inverse_privacy_loss_replace``).
    """
    q, s = _check_q_sigma(sample_rate, noise_multiplier)
    tt = np.asarray(t, dtype=np.float64)
    half = 0.5 * tt
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        log_b = _log1m(q) - math.log(q) + 0.5 / (s * s) + _log_sinh_abs(half)
        small = np.arcsinh(np.exp(np.minimum(log_b, 30.0)))
        asinh_abs = np.where(log_b > 30.0, log_b + _LOG2, small)  # asinh(y) = log 2y + O(y^-2)
        asinh_b = np.sign(tt) * np.nan_to_num(asinh_abs, nan=0.0)
    return np.asarray(s * s * (-half - asinh_b), dtype=np.float64)


class ReplaceOnePoissonSubsampledGaussianPRV:
    """Privacy loss random variable of the Poisson-subsampled Gaussian under replace-one.

    Drop-in for Opacus' ``PoissonSubsampledGaussianPRV`` (``pdf``, ``cdf``, ``rdp``) in its
    truncation/discretisation/composition machinery. Y = L(X), X ~ P. Since L is decreasing,
    cdf(t) = Pr[X >= L^{-1}(t)] = q ndtr(-(x_t + 1)/s) + (1-q) ndtr(-x_t/s), x_t = L^{-1}(t);
    Y has no atoms and unbounded support on both sides (for q < 1).
    """

    def __init__(self, sample_rate: float, noise_multiplier: float) -> None:
        self.sample_rate, self.noise_multiplier = _check_q_sigma(sample_rate, noise_multiplier)

    def cdf(self, t: npt.ArrayLike) -> FloatArray:
        """Pr[Y <= t]."""
        q, s = self.sample_rate, self.noise_multiplier
        x = inverse_privacy_loss(t, q, s)
        return np.asarray(q * ndtr(-(x + 1.0) / s) + (1.0 - q) * ndtr(-x / s),
                          dtype=np.float64)

    def pdf(self, t: npt.ArrayLike) -> FloatArray:
        """Density of Y: P(x_t) |dx_t/dt| with |dx_t/dt| = (s^2/2)(1 + 1/sqrt(1/(k cosh)^2
        + tanh^2)) at t/2, k = (1-q)/(qc)."""
        q, s = self.sample_rate, self.noise_multiplier
        tt = np.asarray(t, dtype=np.float64)
        x = inverse_privacy_loss(tt, q, s)
        half = np.abs(0.5 * tt)
        log_k = _log1m(q) - math.log(q) + 0.5 / (s * s)
        with np.errstate(over="ignore", divide="ignore"):
            log_cosh = half + np.log1p(np.exp(-2.0 * half)) - _LOG2
            inv_sq = np.exp(-2.0 * (log_k + log_cosh))
            dxdt = 0.5 * s * s * (1.0 + 1.0 / np.sqrt(inv_sq + np.tanh(half) ** 2))
            log_p = np.logaddexp(math.log(q) - 0.5 * ((x + 1.0) / s) ** 2,
                                 _log1m(q) - 0.5 * (x / s) ** 2) - math.log(s) - _LOG_SQRT_2PI
        return np.asarray(np.exp(log_p) * dxdt, dtype=np.float64)

    def rdp(self, alpha: float) -> float:
        """Renyi DP of order ``alpha`` (:func:`renyi_divergence`)."""
        return renyi_divergence(self.sample_rate, self.noise_multiplier, alpha)


# --------------------------------------------------------------------------------------------
# Renyi DP
# --------------------------------------------------------------------------------------------


def _log_psi(loss: FloatArray, alpha: float) -> FloatArray:
    """log psi(L), psi(L) = e^{aL} - 1 - a(e^L - 1) >= 0 (a = alpha), stable for all L."""
    a = alpha
    al = a * loss
    out = np.full(loss.shape, -np.inf)
    small = np.abs(al) < 0.5
    if small.any():
        # Taylor series psi = sum_{n>=2} (a^n - a) L^n / n! (truncation error < 1e-30 rel.).
        ls = loss[small]
        coeffs = [a * math.expm1((n - 1) * math.log(a)) / math.factorial(n)
                  for n in range(2, _SERIES_TERMS + 2)]
        poly = np.zeros_like(ls)
        for c in reversed(coeffs):
            poly = poly * ls + c
        with np.errstate(divide="ignore"):
            out[small] = 2.0 * np.log(np.abs(ls)) + np.log(poly)
    big = al > 700.0
    if big.any():
        lb = loss[big]
        out[big] = a * lb + np.log1p(-a * np.exp(-(a - 1.0) * lb) + (a - 1.0) * np.exp(-a * lb))
    mid = ~small & ~big
    if mid.any():
        lm = loss[mid]
        out[mid] = np.log(np.expm1(a * lm) - a * np.expm1(lm))
    return out


def _log_q_density(x: FloatArray, q: float, s: float) -> FloatArray:
    return np.asarray(np.logaddexp(math.log(q) - 0.5 * ((x - 1.0) / s) ** 2,
                                   _log1m(q) - 0.5 * (x / s) ** 2)
                      - math.log(s) - _LOG_SQRT_2PI, dtype=np.float64)


def _log_left_tail_bound(lo: float, q: float, s: float, alpha: float) -> float:
    """Upper bound on log of the integrand's integral over (-inf, lo], lo <= 0.

    There L >= 0, so Q psi(L) <= Q e^{alpha L} = P^alpha Q^{1-alpha}, bounded twice (the
    smaller is returned; Gaussian integrals in closed form):

    1. P/Q <= 1 + a/z and (1 + y)^m <= max(1, 2^{m-1}) (1 + y^m), m = alpha - 1, so
       P^alpha Q^{1-alpha} <= max(1, 2^{m-1}) P (1 + a^m e^{-m x/s^2}) (tight for small q);
    2. joint convexity of (p, r) -> p^alpha r^{1-alpha} over the coupling
       (P, Q) = q (N(-1), N(1)) + (1-q) (N(0), N(0)):
       P^alpha Q^{1-alpha} <= q e^{2 alpha m / s^2} N(1 - 2 alpha, s^2) + (1-q) N(0, s^2)
       (tight for q near 1).
    """
    m = alpha - 1.0
    beta = m / (s * s)
    log_c = max(0.0, (m - 1.0) * _LOG2)
    lq, l1q = math.log(q), _log1m(q)
    p_below = np.logaddexp(lq + log_ndtr((lo + 1.0) / s), l1q + log_ndtr(lo / s))
    shift = 0.5 * beta * beta * s * s
    tilted = m * _log_a(q, s) + np.logaddexp(
        lq + beta + shift + log_ndtr((lo + 1.0 + beta * s * s) / s),
        l1q + shift + log_ndtr((lo + beta * s * s) / s))
    bound_small_q = log_c + np.logaddexp(p_below, tilted)
    bound_convex = np.logaddexp(
        lq + 2.0 * alpha * m / (s * s) + log_ndtr((lo + 2.0 * alpha - 1.0) / s),
        l1q + log_ndtr(lo / s))
    return float(min(bound_small_q, bound_convex))


def _log_right_tail_bound(hi: float, q: float, s: float, alpha: float) -> float:
    """Upper bound on log of the integrand's integral over [hi, inf), hi >= 0.

    There L <= 0, where psi(L) <= alpha - 1; what remains is the Q-mass above ``hi``.
    """
    mass = np.logaddexp(math.log(q) + log_ndtr(-(hi - 1.0) / s),
                        _log1m(q) + log_ndtr(-hi / s))
    return float(math.log(alpha - 1.0) + mass)


def _log_trapezoid(lo: float, hi: float, h: float, q: float, s: float,
                   alpha: float) -> tuple[float, float]:
    """log of the trapezoid sums (all weights 1, i.e. >= trapezoid) with steps h/2 and h."""
    n = int(math.ceil((hi - lo) / (0.5 * h)))
    n += n % 2
    x = lo + 0.5 * h * np.arange(n + 1, dtype=np.float64)
    log_f = _log_q_density(x, q, s) + _log_psi(privacy_loss(x, q, s), alpha)
    fine = float(logsumexp(log_f)) + math.log(0.5 * h)
    coarse = float(logsumexp(log_f[::2])) + math.log(h)
    return fine, coarse


def _log_renyi_integral(q: float, s: float, alpha: float) -> float:
    """log of an upper estimate of I = int P^alpha Q^{1-alpha} - 1 = int Q psi(L) dx, or nan."""
    h = min(0.25 * s, math.pi * s * s / 8.0)  # resolves both scales s and s^2 of the integrand
    k_left, k_right = 20.0, 15.0
    for _ in range(8):
        # P^alpha Q^{1-alpha} is a sum of Gaussian-like bumps (width s) at
        # alpha mu_P + (1 - alpha) mu_Q over the components mu_P in {-1, 0}, mu_Q in {1, 0}:
        # the leftmost is at 1 - 2 alpha, the rightmost at 0.
        lo = 1.0 - 2.0 * alpha - k_left * s
        hi = 1.0 + k_right * s
        if (hi - lo) / h > 2e7:
            return math.nan
        with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
            fine, coarse = _log_trapezoid(lo, hi, h, q, s, alpha)
        if not math.isfinite(fine):
            return math.nan
        rel = abs(math.expm1(coarse - fine))
        if rel > _RDP_REL_TOL:
            h *= 0.5
            continue
        left = _log_left_tail_bound(lo, q, s, alpha)
        right = _log_right_tail_bound(hi, q, s, alpha)
        widen = False
        if left > fine - _RDP_TAIL_LOG_MARGIN:
            k_left *= 1.5
            widen = True
        if right > fine - _RDP_TAIL_LOG_MARGIN:
            k_right *= 1.5
            widen = True
        if widen:
            continue
        body = fine + math.log1p(rel + _RDP_ROUNDING_MARGIN)
        return float(logsumexp([body, left, right]))
    return math.nan


def renyi_divergence(sample_rate: float, noise_multiplier: float, alpha: float) -> float:
    """Renyi divergence D_alpha(P || Q) of the replace-one pair (its RDP at order ``alpha``).

    q = 1 is exact (Gaussian, sensitivity 2: 2 alpha / s^2). Otherwise
    D_alpha = log(1 + I) / (alpha - 1) with I = int Q psi(L) dx >= 0,
    psi(L) = e^{alpha L} - 1 - alpha (e^L - 1) (no cancellation: I is computed, not 1 + I),
    integrated in log-space by the trapezoid rule on [lo, hi]. It rounds toward MORE privacy
    loss but is not a formal proof: the integrand is analytic in a strip of half-width
    pi s^2 and Gaussian-decaying, where the trapezoid rule converges geometrically in 1/h
    (Trefethen and Weideman 2014, "The Exponentially Convergent Trapezoidal Rule"); the step
    is halved until two successive sums agree to 1e-9 relative and the finer sum is inflated
    by that difference (which bounds the coarser sum's error, far above the finer one's) plus
    1e-10 for rounding. The mass outside [lo, hi] is added as proven analytic upper bounds
    (window widened until they are below e^-35 of the body). Returns ``inf`` (the order is
    to be dropped: the minimum over the remaining orders is still a valid bound) when the
    integral cannot be computed reliably.
    """
    q, s = _check_q_sigma(sample_rate, noise_multiplier)
    a = float(alpha)
    if not (math.isfinite(a) and a > 1.0):
        raise ValueError(f"alpha={alpha!r} must be a finite number > 1.")
    if q == 1.0:
        return 2.0 * a / (s * s)
    log_i = _log_renyi_integral(q, s, a)
    if not math.isfinite(log_i):
        return math.inf
    return float(np.logaddexp(0.0, log_i)) / (a - 1.0)


@lru_cache(maxsize=4096)
def rdp_curve(sample_rate: float, noise_multiplier: float,
              orders: tuple[float, ...]) -> tuple[float, ...]:
    """Replace-one RDP of one step at each order (``inf`` for orders that were dropped)."""
    return tuple(renyi_divergence(sample_rate, noise_multiplier, a) for a in orders)


# --------------------------------------------------------------------------------------------
# PRV domain
# --------------------------------------------------------------------------------------------


def _rdp_to_epsilon(rdp: Sequence[float], orders: Sequence[float], delta: float) -> float:
    """Balle et al. 2020, Thm 21 (as ``opacus...rdp.get_privacy_spent``), min over orders."""
    r = np.asarray(rdp, dtype=np.float64)
    o = np.asarray(orders, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        eps = r - (math.log(delta) + np.log(o)) / (o - 1.0) + np.log((o - 1.0) / o)
    eps = np.where(np.isnan(eps), np.inf, eps)
    return float(np.min(eps))


def safe_domain_half_width(groups: Sequence[tuple[float, float, int]], eps_error: float,
                           delta_error: float, orders: tuple[float, ...]) -> float:
    """Half-width L of the PRV domain [-L, L] as Opacus' ``compute_safe_domain_size``
    (Gopi et al. 2021, Remark 5.6), but from the replace-one RDP of each (q, sigma, steps)."""
    total_steps = sum(n for _, _, n in groups)
    curves = [np.asarray(rdp_curve(q, s, orders)) for q, s, _ in groups]
    composed = sum((n * c for (_, _, n), c in zip(groups, curves, strict=True)),
                   np.zeros(len(orders)))
    l_max = _rdp_to_epsilon(list(composed), orders, delta_error / 4.0)
    for c in curves:
        l_max = max(l_max, _rdp_to_epsilon(list(c), orders, delta_error / (8.0 * total_steps)))
    if not math.isfinite(l_max):
        raise ArithmeticError("replace-one RDP bound is infinite; cannot size the PRV domain")
    return max(l_max, eps_error) + 3.0


def prv_domain(groups: Sequence[tuple[float, float, int]], eps_error: float,
               delta_error: float, orders: tuple[float, ...]) -> Domain:
    """Opacus ``Domain`` for replace-one PRVs (same mesh as ``PRVAccountant._get_domain``)."""
    from opacus.accountants.analysis.prv import Domain

    half = safe_domain_half_width(groups, eps_error, delta_error, orders)
    total_steps = sum(n for _, _, n in groups)
    mesh = eps_error / math.sqrt(total_steps * math.log(12.0 / delta_error) / 2.0)
    domain: Any = Domain.create_aligned(-half, half, mesh)
    return domain
