"""User-level DP for a run: the settings, the round's plan, and what each side does with it.

The mechanism is the distributed discrete Gaussian under secure aggregation (Kairouz, Liu and
Steinke, ICML 2021; :mod:`fedpeft.privacy.ddg_mechanism`): each client clips its whole adapter
update to L2 norm ``clip``, adds exact integer noise and sends it masked; the coordinator learns
only the noisy sum of the survivors.

One plan, computed by both sides from the same run configuration (:func:`round_plan`), so the
coordinator never tells a client how much noise to add: the noise is sized for the smallest
surviving set a round accepts, ``threshold - 1 - colluders`` noise shares besides the accounted
user's own (the SecAgg threshold of the planned round size), over at most ``participations``
releases per user. Sampling is not counted as amplification (``sample_rate`` 1): the
coordinator chooses who joins a round, so against it a user's guarantee is the composition of
the releases that user was in (docs/privacy.md, "User-level DP").
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedpeft.core.checks import is_real
from fedpeft.core.errors import ConfigError
from fedpeft.privacy.accounting.ddg import DistributedDiscreteGaussianEvent
from fedpeft.privacy.accounting.events import validate_delta
from fedpeft.privacy.adaptive_clip import (
    AdaptiveClipError,
    append_count,
    count_coordinate_weight,
    mechanism_clip,
    split_count,
)
from fedpeft.privacy.adaptive_clip import validate as validate_adaptive
from fedpeft.privacy.csprng import DPRandomness
from fedpeft.privacy.ddg_mechanism import (
    DDGPlan,
    Provisioned,
    client_encode,
    provision,
    server_decode,
    verify_provisioning,
)
from fedpeft.privacy.discrete_gaussian import ExactIntegers

#: Rotation-key domain: the key is the hash of the round's session id (public to the round).
ROTATION_DOMAIN = b"fedpeft-ddg-rotation-v1"
#: Sample rate accounted per release against the coordinator (it knows who joined).
COORDINATOR_SAMPLE_RATE = 1.0


class UserDPError(ConfigError):
    """A user-level DP setting or round cannot meet its guarantee (the message names the knob)."""


@dataclass(frozen=True)
class UserDPConfig:
    """User-level DP settings of a run (the ``dp-user-*`` knobs).

    Attributes:
        enabled: clients add distributed discrete Gaussian noise to their clipped updates.
        target_epsilon: user-level epsilon after ``participations`` releases a user joins.
        delta: the delta of that guarantee; keep it below 1 / (10 x the number of users).
        clip: L2 norm bound of one user's whole adapter update per round.
        participations: most releases (rounds) one user may be part of; the coordinator stops
            selecting a user who reached it and the budget refuses one more.
        colluders: clients that may collude with the coordinator (their noise shares are known
            to it and are not counted).
        wrap_probability: chance the sum wraps the SecAgg field (utility only, never privacy).
        epsilon_max: hard per-user budget the coordinator's user-level ledger enforces
            (``None``: the target).
        beta: conditional randomised rounding parameter (KLS 2021, Prop. 22).
        clip_quantile: adaptive clipping's target quantile of update norms (Andrew et al.
            2021; :mod:`fedpeft.privacy.adaptive_clip`); 0 keeps ``clip`` fixed.
        clip_lr: the geometric update's learning rate (``dp-user-clip-lr``).
        clip_count_std: noise std of the released count of unclipped updates, in clients
            (0: clients-per-round / 20, Andrew et al.'s choice).
    """

    enabled: bool = False
    target_epsilon: float = 8.0
    delta: float = 1e-5
    clip: float = 1.0
    participations: int = 1
    colluders: int = 0
    wrap_probability: float = 1e-9
    epsilon_max: float | None = None
    beta: float = math.exp(-0.5)
    clip_quantile: float = 0.0
    clip_lr: float = 0.2
    clip_count_std: float = 0.0
    #: audit: canary clients whose update is a random direction (Andrew et al. 2024;
    #: fedpeft.privacy.auditing.user_canaries), added to the population; 0: none
    canaries: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.canaries, bool) or not isinstance(self.canaries, int) or (
                self.canaries < 0):
            raise UserDPError(f"audit-user-canaries={self.canaries!r} must be an integer >= 0 "
                              "(0: no user-level audit)")
        for knob, v in (("dp-user-epsilon", self.target_epsilon), ("dp-user-clip", self.clip)):
            if not is_real(v) or not math.isfinite(v) or v <= 0:
                raise UserDPError(f"{knob}={v!r} must be a finite number > 0")
        try:
            validate_delta(self.delta)
        except ConfigError as exc:
            raise UserDPError(f"dp-user-delta: {exc}") from exc
        for name, low in (("participations", 1), ("colluders", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise UserDPError(f"dp-user-{name}={v!r} must be an integer >= {low}")
        if not is_real(self.wrap_probability) or not 0.0 < self.wrap_probability < 1.0:
            raise UserDPError(f"wrap_probability={self.wrap_probability!r} must be in (0, 1)")
        if self.epsilon_max is not None and (not is_real(self.epsilon_max)
                                             or self.epsilon_max < self.target_epsilon):
            raise UserDPError(f"dp-user-budget={self.epsilon_max!r} must be >= "
                              f"dp-user-epsilon={self.target_epsilon} (or 0: the target)")
        try:
            validate_adaptive(self.clip_quantile, self.clip_lr, self.clip_count_std)
        except AdaptiveClipError as exc:
            raise UserDPError(str(exc)) from exc

    @property
    def adaptive(self) -> bool:
        """Whether the clip follows a target quantile (``dp-user-clip-quantile`` > 0)."""
        return self.clip_quantile > 0

    @property
    def budget(self) -> float:
        """The per-user epsilon the ledger enforces."""
        return self.target_epsilon if self.epsilon_max is None else float(self.epsilon_max)


def min_contributors(threshold: int, colluders: int) -> int:
    """Noise shares that protect a user in the smallest sum the round accepts: the other
    ``threshold - 1`` survivors, less the ``colluders``. Raises :class:`UserDPError` below 1."""
    got = threshold - 1 - colluders
    if got < 1:
        raise UserDPError(f"a SecAgg threshold of {threshold} with dp-user-colluders={colluders} "
                          "leaves no noise share the coordinator does not know; raise "
                          "clients-per-round (the threshold grows with it) or lower colluders")
    return got


@dataclass(frozen=True)
class RoundPlan:
    """The user-level plan of every round of a run, as both sides compute it."""

    provisioned: Provisioned
    min_contributors: int
    planned_clients: int
    config: UserDPConfig
    #: adaptive clipping: the weight of the appended count coordinate (0: a fixed clip, no
    #: count; :mod:`fedpeft.privacy.adaptive_clip`)
    count_weight: float = 0.0

    @property
    def update_dimension(self) -> int:
        """Coordinates of the adapter update (the plan's dimension less the count)."""
        return self.ddg.dimension - (1 if self.count_weight else 0)

    def count_std(self, survivors: int) -> float:
        """Noise std of the released count of unclipped updates in a sum of ``survivors``."""
        if not self.count_weight:
            raise UserDPError("this plan has no count (dp-user-clip-quantile = 0)")
        return (math.sqrt(survivors) * self.provisioned.noise_std
                / (2.0 * self.count_weight * self.config.clip))

    @property
    def ddg(self) -> DDGPlan:
        return self.provisioned.plan

    def worst_case_event(self) -> DistributedDiscreteGaussianEvent:
        """A release with only the planned (fewest accepted) noise shares: what a device, which
        cannot count the survivors, records for itself."""
        return self.ddg.accounting_event(COORDINATOR_SAMPLE_RATE, self.min_contributors)

    def release_event(self, survivors: int) -> DistributedDiscreteGaussianEvent:
        """What one release spends for each of its users, counting the noise actually in the
        sum: the other ``survivors - 1`` shares less the colluders (never the planned amount)."""
        return self.ddg.accounting_event(COORDINATOR_SAMPLE_RATE,
                                         min_contributors(survivors, self.config.colluders))


@functools.lru_cache(maxsize=32)
def round_plan(config: UserDPConfig, *, planned_clients: int, threshold: int, dimension: int,
               bits: int) -> RoundPlan:
    """Provision the least per-client noise whose release, with only the round's smallest
    accepted set of noise shares present, meets ``config.target_epsilon`` after
    ``config.participations`` releases; the field is planned for ``planned_clients`` summands.

    With adaptive clipping the plan is for the update plus one count coordinate at the clip
    ``C_0 sqrt(1 + w^2)`` (:mod:`fedpeft.privacy.adaptive_clip`); ``w`` comes from the plan
    without the count and ``config.clip_count_std``.

    Raises a typed error naming the knob (``secagg-bits``, ``dp-user-*``) when no plan fits.
    """
    contributors = min_contributors(threshold, config.colluders)

    def plan_for(clip: float, dim: int) -> Provisioned:
        return provision(
            target_epsilon=config.target_epsilon, delta=config.delta,
            rounds=config.participations, sample_rate=COORDINATOR_SAMPLE_RATE, clip=clip,
            min_contributors=contributors, clients_per_round=max(planned_clients, contributors),
            dimension=dim, bits=bits, wrap_probability=config.wrap_probability,
            beta=config.beta)

    provisioned = plan_for(config.clip, dimension)
    if not config.adaptive:
        return RoundPlan(provisioned, contributors, planned_clients, config)
    weight = count_coordinate_weight(
        planned_clients=planned_clients, noise_std=provisioned.noise_std, base_clip=config.clip,
        count_std=config.clip_count_std or planned_clients / 20.0)
    return RoundPlan(plan_for(mechanism_clip(config.clip, weight), dimension + 1), contributors,
                     planned_clients, config, weight)


def rotation_key(session_id: bytes) -> bytes:
    """The round's rotation key: public to the round (any rotation keeps the guarantee; it
    only spreads the update so the field does not wrap)."""
    return hashlib.sha256(ROTATION_DOMAIN + session_id).digest()


def check_round(plan: RoundPlan, *, threshold: int) -> float:
    """The client's check before it adds noise: the round's SecAgg threshold (from the SETUP it
    accepted) must guarantee the planned noise shares, and the plan must meet this client's
    budget recomputed from its own numbers. Returns the epsilon after the planned releases."""
    if min_contributors(threshold, plan.config.colluders) < plan.min_contributors:
        raise UserDPError(
            f"refused: the round's SecAgg threshold {threshold} guarantees only "
            f"{threshold - 1 - plan.config.colluders} noise shares, the plan needs "
            f"{plan.min_contributors} (too few clients to carry the planned noise)")
    return verify_provisioning(plan.ddg, sample_rate=COORDINATOR_SAMPLE_RATE,
                               min_contributors=plan.min_contributors,
                               rounds=plan.config.participations, delta=plan.config.delta,
                               epsilon_max=plan.config.budget)


def encode_update(update: npt.NDArray[np.float64], plan: RoundPlan, session_id: bytes,
                  round_clip: float | None = None) -> npt.NDArray[np.uint32]:
    """A client's field words: clip, rotate, round, add exact N_Z noise; fresh OS keys.

    With adaptive clipping ``round_clip`` is this round's clip (checked by the caller) and the
    count coordinate is appended (:func:`fedpeft.privacy.adaptive_clip.append_count`)."""
    if plan.count_weight:
        if round_clip is None:
            raise UserDPError("adaptive clipping needs this round's clip")
        update = append_count(update, round_clip=round_clip, base_clip=plan.config.clip,
                              weight=plan.count_weight)
    return client_encode(update, plan.ddg, rotation_key(session_id),
                         rounding=DPRandomness.from_os().sampling.uniform,  # security: CSPRNG
                         noise=ExactIntegers.from_os())  # security: fresh OS key per round


def decode_sum(field_sum: npt.NDArray[np.uint32], plan: RoundPlan,
               session_id: bytes, *, survivors: int | None = None) -> npt.NDArray[np.float64]:
    """The noisy sum of the survivors' clipped updates from their modular sum (a fixed clip;
    with adaptive clipping use :func:`decode_release`); ``survivors`` checks its norm
    (:func:`fedpeft.privacy.ddg_mechanism.sum_norm_bound`)."""
    if plan.count_weight:
        raise UserDPError("this plan appends a count: decode it with decode_release")
    return server_decode(field_sum, plan.ddg, rotation_key(session_id), survivors=survivors)


@dataclass(frozen=True)
class Release:
    """One decoded user-level release: the noisy sum of the survivors' clipped updates and,
    with adaptive clipping, the noisy fraction of them that were not clipped."""

    total: npt.NDArray[np.float64]
    unclipped_fraction: float | None = None


def decode_release(field_sum: npt.NDArray[np.uint32], plan: RoundPlan, session_id: bytes, *,
                   survivors: int, round_clip: float | None = None) -> Release:
    """The release of a round's modular sum of ``survivors`` field vectors (``round_clip``:
    the clip the round asked for, with adaptive clipping)."""
    noisy = server_decode(field_sum, plan.ddg, rotation_key(session_id), survivors=survivors)
    if not plan.count_weight:
        return Release(noisy)
    if round_clip is None:
        raise UserDPError("adaptive clipping needs the round's clip to decode its sum")
    total, fraction = split_count(noisy, round_clip=round_clip, base_clip=plan.config.clip,
                                  weight=plan.count_weight, survivors=survivors)
    return Release(total, fraction)
