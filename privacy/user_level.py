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

    def __post_init__(self) -> None:
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

    Raises a typed error naming the knob (``secagg-bits``, ``dp-user-*``) when no plan fits.
    """
    contributors = min_contributors(threshold, config.colluders)
    provisioned = provision(
        target_epsilon=config.target_epsilon, delta=config.delta,
        rounds=config.participations, sample_rate=COORDINATOR_SAMPLE_RATE, clip=config.clip,
        min_contributors=contributors, clients_per_round=max(planned_clients, contributors),
        dimension=dimension, bits=bits, wrap_probability=config.wrap_probability,
        beta=config.beta)
    return RoundPlan(provisioned, contributors, planned_clients, config)


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


def encode_update(update: npt.NDArray[np.float64], plan: RoundPlan,
                  session_id: bytes) -> npt.NDArray[np.uint32]:
    """A client's field words: clip, rotate, round, add exact N_Z noise; fresh OS keys."""
    return client_encode(update, plan.ddg, rotation_key(session_id),
                         rounding=DPRandomness.from_os().sampling.uniform,  # security: CSPRNG
                         noise=ExactIntegers.from_os())  # security: fresh OS key per round


def decode_sum(field_sum: npt.NDArray[np.uint32], plan: RoundPlan,
               session_id: bytes) -> npt.NDArray[np.float64]:
    """The noisy sum of the survivors' clipped updates from their modular sum."""
    return server_decode(field_sum, plan.ddg, rotation_key(session_id))
