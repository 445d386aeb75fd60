"""Pure epsilon computation for compositions of Poisson-subsampled Gaussian events.

Two accountants, both from Opacus (imported lazily so that importing this package stays
cheap):

* ``"prv"`` (default): numerical composition of privacy loss random variables (Gopi, Lee
  and Wutschitz 2021, "Numerical Composition of Differential Privacy"). Reports
  ``eps_low <= eps_estimate <= eps_upper``; the conservative value is ``eps_upper``.
* ``"rdp"``: Renyi DP of the sampled Gaussian mechanism (Mironov 2017; Mironov, Talwar and
  Zhang 2019) converted to (epsilon, delta) with Balle et al. 2020, Theorem 21.

Each accountant works under either neighbouring relation (:data:`Adjacency`):
``"add_remove"`` (Opacus' PRV and RDP of the add/remove pair) or ``"replace_one"``
(substitution; the pair, its PRV and its RDP are in :mod:`fedpeft.privacy.accounting.replace_one`,
used with the same Opacus PRV discretisation/composition and the same RDP conversion). The
pure functions here default to ``"add_remove"``; callers that release the dataset size n
(through q = B/n or a calibrated sigma) must pass ``"replace_one"``.

Accounting is cumulative over every event given (all rounds of one client). Events with the
same (q, sigma) are grouped by summing their steps (composition of identical mechanisms is
order-independent), and results are cached.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np

from fedpeft.privacy.accounting.errors import EventValidationError
from fedpeft.privacy.accounting.events import (
    ADJACENCIES,
    Adjacency,
    PoissonSampledGaussianEvent,
    validate_adjacency,
    validate_delta,
)

__all__ = [
    "ACCOUNTANTS", "ADJACENCIES", "DEFAULT_ACCOUNTANT", "DEFAULT_ADJACENCY", "PRV_EPS_ERROR",
    "PRV_MAX_GRID_POINTS", "RDP_ORDERS", "AccountantName", "Adjacency", "EpsilonResult",
    "GroupedEvents", "compute_epsilon", "epsilon", "epsilon_side_by_side", "group_events",
    "validate_accountant", "validate_adjacency",
]

AccountantName = Literal["prv", "rdp"]
ACCOUNTANTS: tuple[AccountantName, ...] = ("prv", "rdp")
DEFAULT_ACCOUNTANT: AccountantName = "prv"
#: Default of the pure functions in this package (kept so that add/remove cross-checks keep
#: their meaning); fedpeft's callers pass the adjacency explicitly (DPConfig: replace-one).
DEFAULT_ADJACENCY: Adjacency = "add_remove"

#: RDP orders: Opacus' defaults extended with large orders (as in Google dp_accounting), so
#: the optimum is interior for small epsilons.
RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(11, 64)]
    + [128.0, 256.0, 512.0, 1024.0]
)

#: Additive epsilon error of the PRV accountant (Opacus' default); delta error is delta/1000.
PRV_EPS_ERROR = 0.01
#: Largest PRV discretisation grid evaluated; beyond it (epsilon in the hundreds) the RDP
#: bound is reported instead (still a valid upper bound).
PRV_MAX_GRID_POINTS = 4_000_000

GroupedEvents = tuple[tuple[float, float, int], ...]


@dataclass(frozen=True)
class EpsilonResult:
    """Epsilon of a composition at a given delta.

    ``epsilon`` is the conservative value to act on (PRV: ``eps_upper``; RDP: the RDP bound).
    ``eps_low``/``eps_estimate``/``eps_upper`` are the PRV error bounds (None for RDP);
    ``rdp_order`` is the optimal Renyi order (None for PRV). ``note`` explains fallbacks.
    ``adjacency`` is the neighbouring relation the guarantee holds for.
    """

    accountant: AccountantName
    delta: float
    epsilon: float
    eps_low: float | None = None
    eps_estimate: float | None = None
    eps_upper: float | None = None
    rdp_order: float | None = None
    note: str = ""
    adjacency: Adjacency = DEFAULT_ADJACENCY


def validate_accountant(accountant: str) -> AccountantName:
    """Return ``accountant`` if it is ``"prv"`` or ``"rdp"``."""
    if accountant == "prv":
        return "prv"
    if accountant == "rdp":
        return "rdp"
    raise EventValidationError(
        f"accountant={accountant!r} is not supported; use one of {list(ACCOUNTANTS)}."
    )


def group_events(events: Iterable[PoissonSampledGaussianEvent]) -> GroupedEvents:
    """Canonical form of a composition: ``((q, sigma, total_steps), ...)`` sorted by (q, sigma)."""
    totals: dict[tuple[float, float], int] = {}
    for event in events:
        if not isinstance(event, PoissonSampledGaussianEvent):
            raise EventValidationError(
                f"event={event!r} must be a PoissonSampledGaussianEvent."
            )
        key = (event.sample_rate, event.noise_multiplier)
        totals[key] = totals.get(key, 0) + event.steps
    return tuple((q, s, n) for (q, s), n in sorted(totals.items()))


@lru_cache(maxsize=4096)
def _rdp_curve(sample_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    from opacus.accountants.analysis import rdp as opacus_rdp  # type: ignore[import-untyped]

    curve = opacus_rdp.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(RDP_ORDERS)
    )
    return tuple(float(v) for v in np.atleast_1d(curve))


def _rdp_epsilon(groups: GroupedEvents, delta: float,
                 adjacency: Adjacency = DEFAULT_ADJACENCY) -> EpsilonResult:
    from opacus.accountants.analysis import rdp as opacus_rdp

    from fedpeft.privacy.accounting import replace_one  # lazy: scipy.special

    total = np.zeros(len(RDP_ORDERS))
    for q, sigma, steps in groups:
        curve = (replace_one.rdp_curve(q, sigma, RDP_ORDERS) if adjacency == "replace_one"
                 else _rdp_curve(q, sigma))
        total = total + steps * np.asarray(curve)
    orders = np.asarray(RDP_ORDERS)
    notes: list[str] = []
    dropped = int(np.sum(~np.isfinite(total)))
    if dropped:
        # Orders whose replace-one integral was not reliable are dropped (inf); the minimum
        # over the remaining orders is still a valid bound.
        notes.append(f"{dropped} of {len(RDP_ORDERS)} RDP orders dropped (integral not "
                     "computed reliably)")
    # Balle et al. 2020, Thm 21 (opacus get_privacy_spent). Its warning about an optimum at
    # the edge of the order grid is captured here (scoped, not filtered) and put in ``note``.
    with warnings.catch_warnings(record=True) as caught, np.errstate(invalid="ignore"):
        warnings.simplefilter("always", UserWarning)
        eps_raw, order = opacus_rdp.get_privacy_spent(orders=orders, rdp=total, delta=delta)
    eps = max(0.0, float(eps_raw)) if not math.isnan(float(eps_raw)) else math.inf
    notes.extend(str(w.message) for w in caught)
    return EpsilonResult("rdp", delta, eps, rdp_order=float(order), note="; ".join(notes),
                         adjacency=adjacency)


class _PRVTooExpensive(ArithmeticError):
    """The PRV discretisation grid would exceed :data:`PRV_MAX_GRID_POINTS`."""


def _prv_epsilon(groups: GroupedEvents, delta: float,
                 adjacency: Adjacency = DEFAULT_ADJACENCY) -> EpsilonResult:
    from opacus.accountants import PRVAccountant  # type: ignore[import-untyped]
    from opacus.accountants.analysis.prv import (  # type: ignore[import-untyped]
        PoissonSubsampledGaussianPRV,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        discretize,
    )

    from fedpeft.privacy.accounting import replace_one  # lazy: scipy.special

    delta_error = delta / 1000
    counts = [steps for _, _, steps in groups]
    # Same steps as opacus PRVAccountant._get_dprv, with a guard on the grid size: for very
    # large epsilons (tiny noise) the grid explodes (tens of millions of points, minutes).
    # Opacus' domain sizing runs its RDP accountant, which may warn about the order grid;
    # capture (scoped) and report in ``note`` instead of letting it reach the user.
    with warnings.catch_warnings(record=True) as caught, np.errstate(
        over="ignore", divide="ignore", invalid="ignore", under="ignore"
    ):
        warnings.simplefilter("always", UserWarning)
        prvs: list[Any]
        if adjacency == "replace_one":
            # Domain sized from the replace-one RDP bound (Opacus' sizing uses add/remove RDP).
            prvs = [replace_one.ReplaceOnePoissonSubsampledGaussianPRV(q, sigma)
                    for q, sigma, _ in groups]
            domain = replace_one.prv_domain(groups, PRV_EPS_ERROR, delta_error, RDP_ORDERS)
        else:
            prvs = [PoissonSubsampledGaussianPRV(q, sigma) for q, sigma, _ in groups]
            domain = PRVAccountant()._get_domain(prvs=prvs, num_self_compositions=counts,
                                                 eps_error=PRV_EPS_ERROR,
                                                 delta_error=delta_error)
        if domain.size > PRV_MAX_GRID_POINTS:
            raise _PRVTooExpensive(
                f"PRV grid of {domain.size} points exceeds {PRV_MAX_GRID_POINTS}"
            )
        tprvs = [TruncatedPrivacyRandomVariable(p, domain.t_min, domain.t_max) for p in prvs]
        dprv = compose_heterogeneous(dprvs=[discretize(t, domain) for t in tprvs],
                                     num_self_compositions=counts)
        low, est, up = dprv.compute_epsilon(delta, delta_error, PRV_EPS_ERROR)
    low_f, est_f, up_f = float(low), float(est), float(up)
    if not all(math.isfinite(v) for v in (low_f, est_f, up_f)):
        raise ArithmeticError(f"PRV accountant returned non-finite bounds {(low_f, est_f, up_f)}")
    note = "; ".join(sorted({f"domain sizing: {w.message}" for w in caught}))
    return EpsilonResult("prv", delta, max(0.0, up_f), eps_low=low_f, eps_estimate=est_f,
                         eps_upper=up_f, note=note, adjacency=adjacency)


@lru_cache(maxsize=8192)
def _epsilon_cached(groups: GroupedEvents, delta: float, accountant: AccountantName,
                    adjacency: Adjacency) -> EpsilonResult:
    if not groups:
        if accountant == "prv":
            return EpsilonResult("prv", delta, 0.0, eps_low=0.0, eps_estimate=0.0, eps_upper=0.0,
                                 adjacency=adjacency)
        return EpsilonResult("rdp", delta, 0.0, adjacency=adjacency)
    if any(sigma == 0.0 for _, sigma, _ in groups):
        return EpsilonResult(accountant, delta, math.inf,
                             note="noise_multiplier 0 in the composition: no privacy",
                             adjacency=adjacency)
    if accountant == "rdp":
        return _rdp_epsilon(groups, delta, adjacency)
    try:
        return _prv_epsilon(groups, delta, adjacency)
    except (ArithmeticError, RuntimeError, ValueError, MemoryError) as exc:
        # The RDP bound is also a valid upper bound on epsilon; fall back to it (conservative,
        # never silently optimistic) and say so.
        rdp = _rdp_epsilon(groups, delta, adjacency)
        return EpsilonResult("prv", delta, rdp.epsilon, rdp_order=rdp.rdp_order,
                             note=f"PRV accountant failed ({exc}); reporting the RDP bound",
                             adjacency=adjacency)


def compute_epsilon(events: Iterable[PoissonSampledGaussianEvent], delta: float,
                    accountant: str = DEFAULT_ACCOUNTANT,
                    adjacency: str = DEFAULT_ADJACENCY) -> EpsilonResult:
    """Cumulative epsilon of all ``events`` at ``delta`` with the chosen accountant, under
    the neighbouring relation ``adjacency`` (``"add_remove"`` or ``"replace_one"``)."""
    name = validate_accountant(accountant)
    adj = validate_adjacency(adjacency)
    d = validate_delta(delta)
    return _epsilon_cached(group_events(events), d, name, adj)


def epsilon(events: Iterable[PoissonSampledGaussianEvent], delta: float,
            accountant: str = DEFAULT_ACCOUNTANT, adjacency: str = DEFAULT_ADJACENCY) -> float:
    """Conservative cumulative epsilon (PRV upper bound, or RDP bound); ``inf`` if sigma = 0."""
    return compute_epsilon(events, delta, accountant, adjacency).epsilon


def epsilon_side_by_side(events: Iterable[PoissonSampledGaussianEvent], delta: float,
                         adjacency: str = DEFAULT_ADJACENCY,
                         ) -> dict[AccountantName, EpsilonResult]:
    """PRV and RDP results for the same events (and adjacency), keyed by accountant name."""
    materialised = tuple(events)
    return {name: compute_epsilon(materialised, delta, name, adjacency) for name in ACCOUNTANTS}
