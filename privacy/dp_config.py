"""Configuration and typed errors of record-level DP-SGD on the adapter (``fedpeft.privacy.dp_sgd``).

:class:`DPConfig` is validated at construction; every message names the parameter and its
value. The noise multiplier is either given or calibrated (:meth:`DPConfig.resolve_noise_multiplier`)
so that ``planned_rounds`` rounds of ``local_steps`` steps reach ``target_epsilon`` at ``delta``
(Abadi et al., CCS 2016; accounting in ``fedpeft.privacy.accounting``). This module does not import
torch or Opacus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from fedpeft.core.checks import is_real
from fedpeft.core.errors import ConfigError, FedPeftError, ModelError
from fedpeft.privacy.accounting.calibrate import calibrate_noise_multiplier
from fedpeft.privacy.accounting.events import ADJACENCIES, Adjacency, sample_rate_from

GradSampleMode = Literal["hooks", "functorch", "ew", "ghost"]
GRAD_SAMPLE_MODES: tuple[str, ...] = get_args(GradSampleMode)
AccountantName = Literal["prv", "rdp"]
ACCOUNTANT_NAMES: tuple[str, ...] = get_args(AccountantName)


class DPConfigError(ConfigError):
    """A DP-SGD setting is invalid (the message names the parameter and its value)."""


class DPTrainingError(FedPeftError):
    """DP-SGD training cannot run as asked (model state, data, ...)."""


class UnsupportedLayerError(DPTrainingError, ModelError):
    """A trainable layer has no exact per-example gradient under Opacus (the message names it)."""


def _positive(name: str, value: object, hint: str) -> None:
    if not is_real(value) or not math.isfinite(float(value)) or float(value) <= 0:  # type: ignore[arg-type]
        raise DPConfigError(f"{name}={value!r} must be a finite number > 0 ({hint})")


def _positive_int(name: str, value: object, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DPConfigError(f"{name}={value!r} must be an integer >= 1 ({hint})")


@dataclass(frozen=True)
class DPConfig:
    """Record-level DP-SGD settings of one client.

    Attributes:
        enabled: train with DP-SGD (``fedpeft.privacy.dp_sgd.dp_local_train``) instead of plain SGD.
        noise_multiplier: sigma (noise std / clip norm); ``None`` calibrates it from
            ``target_epsilon``. Exactly one of the two is set when ``enabled``.
        target_epsilon: epsilon to reach after ``planned_rounds`` rounds (calibration target).
        delta: the delta of the (epsilon, delta) guarantee, in (0, 1); keep it well below 1/n.
        max_grad_norm: per-example L2 clip norm C.
        expected_batch_size: logical (expected) batch size B; Poisson rate q = B / n.
        physical_batch_size: largest batch actually run through the model (virtual steps
            split a larger logical batch); ``None`` means no splitting.
        grad_sample_mode: Opacus per-example gradient engine: ``"hooks"`` (default here, exact;
            the run config defaults to ``"ew"``, the fastest in docs/benchmarks.md),
            ``"functorch"``, ``"ew"`` (PyTorch expanded weights) or ``"ghost"`` (ghost
            clipping: per-example norms only, no per-example gradients materialised).
        accountant: ``"prv"`` (default) or ``"rdp"``, used for calibration.
        planned_rounds: rounds the client may join; calibration spends the budget over them.
        epsilon_max: optional hard budget enforced by the ledger (``fedpeft.privacy.accounting``).
        gradient_canaries: white-box audit canaries (``audit-gradient-canaries``).
        adjacency: neighbouring relation of the guarantee, used for calibration:
            ``"replace_one"`` (default) or ``"add_remove"``. Replace-one because the client's
            local dataset size n is public: it is released through q = B/n and through sigma
            (calibrated from q), and under add/remove n would change with the record.
    """

    enabled: bool = False
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    expected_batch_size: int = 8
    physical_batch_size: int | None = None
    grad_sample_mode: GradSampleMode = "hooks"
    accountant: AccountantName = "prv"
    planned_rounds: int = 1
    epsilon_max: float | None = None
    adjacency: Adjacency = "replace_one"
    #: white-box audit: gradient canaries injected into DP-SGD's summed gradient
    #: (fedpeft.privacy.auditing.gradient_canaries; 0: none)
    gradient_canaries: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise DPConfigError(f"enabled={self.enabled!r} must be True or False")
        gc = self.gradient_canaries
        if isinstance(gc, bool) or not isinstance(gc, int) or gc < 0:
            raise DPConfigError(f"audit-gradient-canaries={gc!r} must be an integer >= 0 "
                                "(0: no white-box audit)")
        if gc and not self.enabled:
            raise DPConfigError(f"audit-gradient-canaries={gc} audits DP-SGD, which is off: "
                                "set dp = true with dp-level = 'record' or 'both', or 0")
        if self.noise_multiplier is not None:
            nm = self.noise_multiplier
            if not is_real(nm) or not math.isfinite(float(nm)) or float(nm) < 0:
                raise DPConfigError(f"noise_multiplier={nm!r} must be a finite number >= 0 "
                                    "(0 adds no noise: epsilon = inf); or leave it unset and "
                                    "give target_epsilon")
        if self.target_epsilon is not None:
            _positive("target_epsilon", self.target_epsilon, "e.g. 8.0")
        if self.epsilon_max is not None:
            _positive("epsilon_max", self.epsilon_max, "the client's total privacy budget")
        if (not is_real(self.delta) or not math.isfinite(float(self.delta))
                or not 0.0 < float(self.delta) < 1.0):
            raise DPConfigError(f"delta={self.delta!r} must be in (0, 1); choose it well below "
                                "1/(local dataset size), e.g. 1e-5")
        _positive("max_grad_norm", self.max_grad_norm, "the per-example clip norm C, e.g. 1.0")
        _positive_int("expected_batch_size", self.expected_batch_size,
                      "the logical batch size B; sample rate q = B / dataset size")
        if self.physical_batch_size is not None:
            _positive_int("physical_batch_size", self.physical_batch_size,
                          "the largest batch run at once; leave unset for no splitting")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise DPConfigError(f"grad_sample_mode={self.grad_sample_mode!r} must be one of "
                                f"{GRAD_SAMPLE_MODES}")
        if self.accountant not in ACCOUNTANT_NAMES:
            raise DPConfigError(f"accountant={self.accountant!r} must be one of "
                                f"{ACCOUNTANT_NAMES}")
        if self.adjacency not in ADJACENCIES:
            raise DPConfigError(f"adjacency={self.adjacency!r} must be one of {ADJACENCIES} "
                                "('replace_one' when the dataset size is released, as here)")
        _positive_int("planned_rounds", self.planned_rounds,
                      "the number of rounds this client may join")
        if self.enabled and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise DPConfigError(
                f"noise_multiplier={self.noise_multiplier!r}, target_epsilon="
                f"{self.target_epsilon!r}: with enabled=True set exactly one of them "
                "(target_epsilon calibrates the noise multiplier)")
        if (self.target_epsilon is not None and self.epsilon_max is not None
                and self.target_epsilon > self.epsilon_max):
            raise DPConfigError(f"target_epsilon={self.target_epsilon!r} exceeds epsilon_max="
                                f"{self.epsilon_max!r}; lower the target or raise the budget")

    def sample_rate(self, dataset_size: int) -> float:
        """Poisson rate ``q = expected_batch_size / dataset_size``; raises unless q in (0, 1)."""
        return sample_rate_from(self.expected_batch_size, dataset_size)

    def resolve_noise_multiplier(self, dataset_size: int, steps_per_round: int) -> float:
        """The given noise multiplier, or the calibrated one for ``target_epsilon`` over
        ``planned_rounds * steps_per_round`` steps at rate ``q`` under ``adjacency`` (rounded
        toward privacy)."""
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        if self.target_epsilon is None:
            raise DPConfigError("noise_multiplier=None and target_epsilon=None: set one of them")
        return calibrate_noise_multiplier(
            self.target_epsilon, self.delta, self.sample_rate(dataset_size), steps_per_round,
            self.planned_rounds, self.accountant, self.adjacency)
