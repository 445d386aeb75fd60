"""Noise calibration: the smallest (up to a tolerance) sigma whose epsilon meets a target.

Rounding is always toward more privacy: the bisection keeps an upper end ``hi`` with
``epsilon(hi) <= target`` verified by the same accountant that will later account the run,
and returns ``hi``. Total steps = rounds * steps per round (cumulative accounting across
rounds, unlike a fresh Opacus PrivacyEngine per round). The neighbouring relation
(``adjacency``) is part of the calibration: replace-one needs more noise than add/remove.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedpeft.privacy.accounting.accountant import (
    DEFAULT_ACCOUNTANT,
    DEFAULT_ADJACENCY,
    AccountantName,
    Adjacency,
    compute_epsilon,
    validate_accountant,
    validate_adjacency,
)
from fedpeft.privacy.accounting.errors import CalibrationError, EventValidationError
from fedpeft.privacy.accounting.events import (
    PoissonSampledGaussianEvent,
    validate_delta,
    validate_epsilon,
    validate_sample_rate,
    validate_steps,
)

#: Default largest noise multiplier considered before declaring a target unreachable.
DEFAULT_SIGMA_MAX = 1000.0
#: Default relative width of the final bisection bracket.
DEFAULT_RELATIVE_TOLERANCE = 1e-3


def _eps(sample_rate: float, sigma: float, steps: int, delta: float,
         accountant: AccountantName, adjacency: Adjacency) -> float:
    return compute_epsilon(
        (PoissonSampledGaussianEvent(sample_rate, sigma, steps),), delta, accountant, adjacency
    ).epsilon


def _check_positive(value: float, name: str) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value <= 0):
        raise EventValidationError(f"{name}={value!r} must be a finite number > 0.")
    return float(value)


def _narrow(bracket: tuple[float, float, float, float], x: float, e_x: float,
            target: float) -> tuple[float, float, float, float]:
    """``(lo, eps(lo), hi, eps(hi))`` with ``x`` replacing the end that keeps the invariant
    ``eps(hi) <= target < eps(lo)`` (x becomes hi when its epsilon meets the target)."""
    lo, e_lo, hi, e_hi = bracket
    return (lo, e_lo, x, e_x) if e_x <= target else (x, e_x, hi, e_hi)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps_per_round: int,
    rounds: int = 1,
    accountant: str = DEFAULT_ACCOUNTANT,
    adjacency: str = DEFAULT_ADJACENCY,
    *,
    sigma_max: float = DEFAULT_SIGMA_MAX,
    relative_tolerance: float = DEFAULT_RELATIVE_TOLERANCE,
) -> float:
    """Noise multiplier sigma so that ``rounds * steps_per_round`` DP-SGD steps at rate
    ``sample_rate`` reach epsilon <= ``target_epsilon`` at ``delta`` under ``adjacency``
    (``"add_remove"`` or ``"replace_one"``).

    The result is within ``relative_tolerance`` of the smallest such sigma (as seen by the
    accountant) and never below it. Raises :class:`CalibrationError` if even ``sigma_max``
    does not reach the target.
    """
    target = validate_epsilon(target_epsilon, name="target_epsilon")
    d = validate_delta(delta)
    q = validate_sample_rate(sample_rate)
    validate_steps(steps_per_round, name="steps_per_round")
    validate_steps(rounds, name="rounds")
    name = validate_accountant(accountant)
    adj = validate_adjacency(adjacency)
    sigma_cap = _check_positive(sigma_max, "sigma_max")
    tol = _check_positive(relative_tolerance, "relative_tolerance")
    if tol >= 0.5:
        raise EventValidationError(f"relative_tolerance={tol!r} must be < 0.5.")
    steps = steps_per_round * rounds

    def eps_at(sigma: float) -> float:
        return _eps(q, sigma, steps, d, name, adj)

    unreachable = CalibrationError(
        f"target_epsilon={target!r} at delta={d!r} is unreachable with "
        f"noise_multiplier <= sigma_max={sigma_cap!r} for sample_rate={q!r} and "
        f"{steps} total steps ({rounds} rounds x {steps_per_round}) under adjacency "
        f"{adj!r}; lower the "
        "sample rate, steps or rounds, or raise the target epsilon."
    )
    # 1. Initial guess. For PRV: the (looser) RDP answer. Otherwise the larger of the
    #    moments-accountant asymptote q*sqrt(2 T log(1/delta))/eps and the single Gaussian
    #    mechanism sqrt(2 log(1.25/delta))/eps scaled by q (any guess works, this saves steps).
    if name == "prv":
        guess = calibrate_noise_multiplier(target, d, q, steps_per_round, rounds, "rdp", adj,
                                           sigma_max=sigma_cap, relative_tolerance=0.02)
    else:
        guess = max(q * math.sqrt(2.0 * steps * math.log(1.0 / d)) / target,
                    q * math.sqrt(2.0 * math.log(1.25 / d)) / target, 0.3)
    guess = min(guess, sigma_cap)
    # 2. Bracket: eps(lo) > target >= eps(hi), with step factor 1.25.
    factor = 1.25
    e_guess = eps_at(guess)
    if e_guess <= target:
        hi, e_hi = guess, e_guess
        lo, e_lo = hi / factor, eps_at(hi / factor)
        while e_lo <= target:
            if lo < 1e-6:  # absurdly little noise suffices; stop shrinking
                break
            hi, e_hi = lo, e_lo
            lo = lo / factor
            e_lo = eps_at(lo)
    else:
        lo, e_lo = guess, e_guess
        if lo >= sigma_cap:
            raise unreachable
        hi = min(lo * factor, sigma_cap)
        e_hi = eps_at(hi)
        while e_hi > target:
            if hi >= sigma_cap:
                raise unreachable
            lo, e_lo = hi, e_hi
            hi = min(hi * factor, sigma_cap)
            e_hi = eps_at(hi)
    # 3. Shrink the bracket keeping eps(hi) <= target: secant on (log sigma, log eps), aimed
    #    alternately just above and just below the predicted root, with bisection as a
    #    safeguard when the bracket does not halve.
    aim_above = True
    for _ in range(200):
        if hi - lo <= tol * hi:
            break
        width = hi - lo
        x = math.sqrt(lo * hi)
        if 0.0 < e_hi < e_lo and math.isfinite(e_lo):
            xl, xh = math.log(lo), math.log(hi)
            yl, yh = math.log(e_lo / target), math.log(e_hi / target)
            root = math.exp(xh - yh * (xh - xl) / (yh - yl))
            x = root * (1.0 + tol / 3.0) if aim_above else root * (1.0 - tol / 3.0)
            aim_above = not aim_above
        margin = 0.01 * width
        if not lo + margin < x < hi - margin:
            x = 0.5 * (lo + hi)
        lo, e_lo, hi, e_hi = _narrow((lo, e_lo, hi, e_hi), x, eps_at(x), target)
        if hi - lo > 0.5 * width:  # poor progress: bisect once
            mid = 0.5 * (lo + hi)
            lo, e_lo, hi, e_hi = _narrow((lo, e_lo, hi, e_hi), mid, eps_at(mid), target)
    # Verify (the invariant guarantees it; re-check explicitly so the contract is visible).
    reached = _eps(q, hi, steps, d, name, adj)
    if not reached <= target:
        raise CalibrationError(
            f"calibration verification failed: noise_multiplier={hi!r} gives epsilon="
            f"{reached!r} > target_epsilon={target!r} (adjacency {adj!r}); report this as a "
            "bug."
        )
    return hi


@dataclass(frozen=True)
class PrivacyPlan:
    """Result of :func:`plan`: sigma and cumulative epsilon after each round (1-based)."""

    target_epsilon: float
    delta: float
    rounds: int
    sample_rate: float
    local_steps: int
    accountant: AccountantName
    noise_multiplier: float
    epsilon_per_round: tuple[float, ...]
    adjacency: Adjacency = DEFAULT_ADJACENCY

    @property
    def total_steps(self) -> int:
        """Total DP-SGD steps over all rounds."""
        return self.rounds * self.local_steps

    @property
    def final_epsilon(self) -> float:
        """Cumulative epsilon after the last round (<= target_epsilon)."""
        return self.epsilon_per_round[-1]


def plan(target_epsilon: float, delta: float, rounds: int, sample_rate: float,
         local_steps: int, accountant: str = DEFAULT_ACCOUNTANT,
         adjacency: str = DEFAULT_ADJACENCY) -> PrivacyPlan:
    """Calibrate sigma for the whole run and list the cumulative epsilon after each round
    (all under ``adjacency``)."""
    name = validate_accountant(accountant)
    adj = validate_adjacency(adjacency)
    sigma = calibrate_noise_multiplier(target_epsilon, delta, sample_rate, local_steps,
                                       rounds, name, adj)
    per_round = tuple(
        _eps(float(sample_rate), sigma, local_steps * r, float(delta), name, adj)
        for r in range(1, rounds + 1)
    )
    return PrivacyPlan(float(target_epsilon), float(delta), rounds, float(sample_rate),
                       local_steps, name, sigma, per_round, adj)
