"""Renyi DP of the Poisson-sampled distributed discrete Gaussian (user-level DP, issue 15).

The mechanism (Kairouz, Liu and Steinke, "The Distributed Discrete Gaussian Mechanism for
Federated Learning with Secure Aggregation", ICML 2021): each sampled client clips its update
to L2 norm ``c``, scales it to the integer grid of granularity ``gamma`` (conditional
randomised rounding with parameter ``beta``), adds integer noise N_Z(0, sigma^2) (integer
scale) and sends it masked; the coordinator learns only the sum over the survivors.

Bounds used (all conservative, every step rounds toward more epsilon):

* L2 sensitivity after rounding (KLS 2021, Theorem 1 with conditional rounding, Prop. 22):
  ``Delta^2 = min((c + gamma sqrt(d))^2, c^2 + gamma^2 d / 4 + sqrt(2 ln(1/beta)) gamma
  (c + gamma sqrt(d) / 2))`` in the update's units; ``beta = 0`` keeps the first term.
* The sum of ``n`` discrete Gaussians of integer-scale variance ``s2`` is within ``tau`` of
  N_Z(0, n s2), ``tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 s2 k / (k+1))`` (KLS 2021, Thm. 1),
  and the mechanism satisfies, at every order ``alpha >= 1`` (KLS 2021, Prop. 14 / Eq. 17,
  the L1 term omitted as in their accounting code):
  ``eps(alpha) = min(alpha s^2 / 2 + tau d, alpha / 2 (s + tau sqrt(d))^2)`` with the scale
  ``s = Delta / (gamma sqrt(n s2))``.
* Poisson sampling of users at rate ``q``: the general upper bound for any mechanism's RDP
  curve (Zhu and Wang, ICML 2019: their general upper bound, the one KLS' accounting code
  uses), at integer orders, and never more than the unsampled ``eps(alpha)``.
* RDP -> (epsilon, delta) by Balle et al. 2020, Theorem 21 (Opacus' ``get_privacy_spent``,
  the same conversion as the record-level RDP accountant).

``contributors`` is the number of noise shares that protect the user being accounted: the
noise **actually present** in the released sum. Callers count the survivors of the round
(never the planned clients) and subtract any clients who may collude with the coordinator
(their shares are known to it); the user's own share is not counted (add/remove of a user
also adds or removes that user's noise).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import special

from fedpeft.core.checks import is_real
from fedpeft.privacy.accounting.errors import EventValidationError
from fedpeft.privacy.accounting.events import validate_delta

#: Integer RDP orders (the subsampling bound needs integers); as dense as the record-level
#: grid where optima usually fall, up to 1024 for tiny epsilons.
DDG_ORDERS: tuple[int, ...] = tuple(range(2, 65)) + (80, 96, 128, 192, 256, 384, 512, 1024)
#: Smallest integer-scale per-client variance accepted: the sum-of-discrete-Gaussians bound
#: of KLS 2021 is stated for sigma >= 1/2; we ask for sigma >= 1.
MIN_LOCAL_VARIANCE = 1.0


@dataclass(frozen=True)
class DistributedDiscreteGaussianEvent:
    """One release of the noisy sum (one round), as the user-level ledger records it.

    Attributes:
        sample_rate: Poisson rate ``q`` at which users are sampled into the round.
        clip: L2 clip norm ``c`` of a user's whole update (update units).
        granularity: ``gamma``, the integer grid's step (update units per integer).
        local_variance: each client's noise variance on the integer grid (``sigma^2``).
        contributors: noise shares that protect the accounted user (see the module docstring).
        dimension: coordinates ``d`` of the (padded, rotated) vector.
        beta: conditional randomised rounding parameter in [0, 1); 0 = plain rounding bound.
        steps: identical releases this event stands for.
    """

    sample_rate: float
    clip: float
    granularity: float
    local_variance: float
    contributors: int
    dimension: int
    beta: float = 0.0
    steps: int = 1

    def __post_init__(self) -> None:
        if not is_real(self.sample_rate) or not 0.0 < self.sample_rate <= 1.0:
            raise EventValidationError(f"sample_rate={self.sample_rate!r} must be in (0, 1]")
        for name in ("clip", "granularity"):
            v = getattr(self, name)
            if not is_real(v) or not math.isfinite(v) or v <= 0:
                raise EventValidationError(f"{name}={v!r} must be a finite number > 0")
        if (not is_real(self.local_variance) or not math.isfinite(self.local_variance)
                or self.local_variance < MIN_LOCAL_VARIANCE):
            raise EventValidationError(
                f"local_variance={self.local_variance!r} must be >= {MIN_LOCAL_VARIANCE} on the "
                "integer grid (a finer granularity or more noise)")
        for name in ("contributors", "dimension", "steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise EventValidationError(f"{name}={v!r} must be an integer >= 1")
        if not is_real(self.beta) or not 0.0 <= self.beta < 1.0:
            raise EventValidationError(f"beta={self.beta!r} must be in [0, 1)")


def l2_sensitivity_squared(clip: float, granularity: float, dimension: int, beta: float) -> float:
    """``Delta^2`` of one user's rounded update (KLS 2021, Thm. 1 / Prop. 22), update units."""
    plain = (clip + granularity * math.sqrt(dimension)) ** 2
    if beta == 0.0:
        return plain
    conditional = (clip ** 2 + granularity ** 2 * dimension / 4.0
                   + math.sqrt(2.0 * math.log(1.0 / beta)) * granularity
                   * (clip + granularity * math.sqrt(dimension) / 2.0))
    return min(plain, conditional)


def sum_tau(contributors: int, local_variance: float) -> float:
    """KLS 2021, Thm. 1: how far the sum of ``contributors`` N_Z(0, local_variance) is from
    N_Z(0, contributors * local_variance); 0 for one contributor."""
    return 10.0 * math.fsum(
        math.exp(-2.0 * math.pi ** 2 * local_variance * k / (k + 1))
        for k in range(1, contributors))


def _scale_and_tau(event: DistributedDiscreteGaussianEvent) -> tuple[float, float]:
    """``(s^2, tau)`` of one release: the squared L2 scale and the sum-of-DGs distance."""
    delta2 = l2_sensitivity_squared(event.clip, event.granularity, event.dimension, event.beta)
    scale2 = delta2 / (event.granularity ** 2 * event.contributors * event.local_variance)
    return scale2, sum_tau(event.contributors, event.local_variance)


def _unsampled(alpha: npt.NDArray[np.float64], scale2: float, tau: float,
               d: int) -> npt.NDArray[np.float64]:
    first = alpha * scale2 / 2.0 + tau * d
    second = alpha / 2.0 * (math.sqrt(scale2) + tau * math.sqrt(d)) ** 2
    return np.minimum(first, second)


def unsampled_rdp(event: DistributedDiscreteGaussianEvent, alpha: float) -> float:
    """RDP at order ``alpha`` of one unsampled release (KLS 2021, Prop. 14 / Eq. 17)."""
    scale2, tau = _scale_and_tau(event)
    return float(_unsampled(np.asarray([alpha], dtype=np.float64), scale2, tau,
                            event.dimension)[0])


def poisson_subsampled_rdp(alpha: int, q: float,
                           rdp: Sequence[float] | npt.NDArray[np.float64]) -> float:
    """Zhu and Wang (ICML 2019) general upper bound on the RDP at integer order ``alpha`` of a
    mechanism Poisson-subsampled at rate ``q``; ``rdp[j]`` is the base mechanism's RDP at order
    ``j`` (entries 0 and 1 unused). Never above ``rdp[alpha]``."""
    if isinstance(alpha, bool) or not isinstance(alpha, int) or alpha < 2:
        raise EventValidationError(f"alpha={alpha!r} must be an integer >= 2")
    if q >= 1.0:
        return float(rdp[alpha])
    log_q, log_1q = math.log(q), math.log1p(-q)
    ell = np.arange(3, alpha + 1, dtype=np.float64)
    base = np.asarray(rdp[3: alpha + 1], dtype=np.float64)
    log_comb_l = (special.gammaln(alpha + 1) - special.gammaln(ell + 1)
                  - special.gammaln(alpha - ell + 1))
    terms = np.concatenate((
        [(alpha - 1) * log_1q + math.log1p(alpha * q - q),
         math.log(alpha * (alpha - 1) / 2.0) + 2 * log_q + (alpha - 2) * log_1q + rdp[2]],
        log_comb_l + ell * log_q + (alpha - ell) * log_1q + (ell - 1) * base))
    coeffs = np.concatenate(([1.0, 1.0], np.full(ell.shape[0], 3.0)))
    bound = float(special.logsumexp(terms, b=coeffs)) / (alpha - 1)
    return min(bound, float(rdp[alpha]))


def rdp_curve(event: DistributedDiscreteGaussianEvent,
              orders: Sequence[int] = DDG_ORDERS) -> tuple[float, ...]:
    """The RDP of ``event`` (all its steps) at each of ``orders``."""
    top = max(orders)
    scale2, tau = _scale_and_tau(event)
    base = np.concatenate(([math.inf, math.inf], _unsampled(
        np.arange(2, top + 1, dtype=np.float64), scale2, tau, event.dimension)))
    return tuple(event.steps * poisson_subsampled_rdp(a, event.sample_rate, base)
                 for a in orders)


@dataclass(frozen=True)
class DDGEpsilon:
    """Epsilon of a composition of distributed discrete Gaussian releases."""

    epsilon: float
    delta: float
    order: int
    note: str = ""


def epsilon(events: Iterable[DistributedDiscreteGaussianEvent], delta: float,
            orders: Sequence[int] = DDG_ORDERS) -> DDGEpsilon:
    """User-level epsilon at ``delta`` after every release in ``events`` (RDP composition)."""
    from opacus.accountants.analysis import rdp as opacus_rdp  # type: ignore[import-untyped]

    delta = validate_delta(delta)
    evs = list(events)
    if not evs:
        return DDGEpsilon(0.0, delta, int(orders[0]), "no releases")
    total = np.zeros(len(orders))
    for ev in evs:
        total = total + np.asarray(rdp_curve(ev, orders))
    with warnings.catch_warnings(record=True) as caught, np.errstate(invalid="ignore"):
        warnings.simplefilter("always", UserWarning)
        eps, order = opacus_rdp.get_privacy_spent(orders=np.asarray(orders, dtype=float),
                                                  rdp=total, delta=delta)
    value = math.inf if math.isnan(float(eps)) else max(0.0, float(eps))
    return DDGEpsilon(value, delta, int(order), "; ".join(str(w.message) for w in caught))
