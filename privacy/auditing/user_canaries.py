"""User-level canary clients (Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, *One-shot
Empirical Privacy Estimation for Federated Learning*, ICLR 2024).

Canary client ``i`` holds no data. Its "update" is ``C u_i``: the round's clip times a
random unit direction ``u_i`` of the flattened adapter (the vector user-level DP clips), drawn
from the run seed. A secret fair coin makes it an **in** canary (it sends ``C u_i`` every
round it is asked) or an **out** canary (it sends the zero update). Both kinds join rounds
like any client, add their share of the noise and run SecAgg+, so who is asked and how much
noise the sum carries never depend on the coins: the two worlds differ by one user's update
replaced by zero, which the user-level accounting (sensitivity ``C`` for one user's whole
contribution, its own noise share never counted) covers.

The score of a canary is the cosine between ``u_i`` and the final model's change
``theta_final - theta_initial`` (post-processing of the released noisy sums). Out canaries'
cosines are those of random directions, about ``N(0, 1/D)``; in canaries' are shifted by
what their updates left in the model. The one-run bound
(:func:`fedpeft.privacy.auditing.one_run.audit_scores`) turns the two groups into an epsilon
lower bound. :func:`gaussian_epsilon_estimate` adds the paper's estimate: the epsilon of the
Gaussian mechanism whose mean shift over standard deviation matches the cosines (an
estimate, not a bound).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import optimize, stats

from fedpeft.core.errors import ConfigError

#: Seed domain of the canary clients (never another audit's stream or the split's).
USER_CANARY_DOMAIN = 0x7573_6572


@dataclass(frozen=True)
class UserCanarySet:
    """``m`` canary clients' secret coins; their directions are drawn on demand."""

    included: tuple[bool, ...]
    dimension: int
    seed: int

    def __len__(self) -> int:
        return len(self.included)

    def direction(self, i: int) -> npt.NDArray[np.float64]:
        """Canary ``i``'s unit direction in the flattened adapter (``dimension`` values)."""
        if not 0 <= i < len(self.included):
            raise ConfigError(f"canary {i} is outside the {len(self.included)} canary clients")
        v = np.random.default_rng([USER_CANARY_DOMAIN, self.seed, 1, i]).standard_normal(
            self.dimension)
        return v / float(np.linalg.norm(v))


@functools.lru_cache(maxsize=8)
def plan_user_canaries(m: int, dimension: int, seed: int) -> UserCanarySet:
    """``m`` canary clients for an adapter of ``dimension`` coordinates."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ConfigError(f"audit-user-canaries={m!r} must be an integer >= 1 (0: none)")
    if dimension < 2:
        raise ConfigError(f"an adapter of {dimension} coordinates cannot hold a random direction")
    coins = np.random.default_rng([USER_CANARY_DOMAIN, seed, 0]).random(m) < 0.5
    return UserCanarySet(tuple(bool(c) for c in coins), dimension, seed)


def cosine_scores(canaries: UserCanarySet, change: npt.NDArray[np.floating]
                  ) -> npt.NDArray[np.float64]:
    """The cosine of each canary's direction with the model's change (0 for no change)."""
    delta = np.asarray(change, dtype=np.float64).reshape(-1)
    if delta.size != canaries.dimension:
        raise ConfigError(f"the model change has {delta.size} coordinates; the canaries were "
                          f"drawn for {canaries.dimension}")
    norm = float(np.linalg.norm(delta))
    if norm == 0.0:
        return np.zeros(len(canaries))
    return np.array([float(canaries.direction(i) @ delta) / norm for i in range(len(canaries))])


def gaussian_epsilon_estimate(in_scores: Sequence[float], out_scores: Sequence[float], *,
                              delta: float) -> float:
    """Andrew et al.'s estimate: fit a Gaussian to each group and return the epsilon at
    ``delta`` of the Gaussian mechanism with ``mu = |mean_in - mean_out| / std_out`` (their
    Theorem 3.2 with the out canaries' spread measured rather than assumed ``1/sqrt(D)``)."""
    ins, outs = np.asarray(in_scores, dtype=np.float64), np.asarray(out_scores, np.float64)
    if ins.size < 2 or outs.size < 2:
        raise ConfigError("the estimate needs at least two in and two out canaries")
    sd = float(outs.std(ddof=1))
    if sd == 0.0:
        return math.inf
    return gaussian_mechanism_epsilon(abs(float(ins.mean() - outs.mean())) / sd, delta)


def gaussian_mechanism_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon with ``delta(epsilon) <= delta`` for the Gaussian mechanism of
    sensitivity over noise std ``mu`` (Balle and Wang, ICML 2018, Theorem 8)."""
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"delta={delta!r} must be in (0, 1)")
    if mu <= 0.0:
        return 0.0

    def delta_of(eps: float) -> float:
        return float(stats.norm.cdf(-eps / mu + mu / 2)
                     - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2))

    if delta_of(0.0) <= delta:
        return 0.0
    high = 1.0
    while delta_of(high) > delta:
        high *= 2.0
        if high > 1e4:
            return math.inf
    return float(optimize.brentq(lambda e: delta_of(e) - delta, 0.0, high, xtol=1e-10))
