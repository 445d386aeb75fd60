"""Local training settings (``[tool.flwr.app.config]`` keys ``local-steps`` ... ``lr-final-fraction``)
and the one table of optimiser names."""

from __future__ import annotations

from dataclasses import dataclass

from fedpeft.core.errors import ConfigError, UnknownNameError

#: The optimisers local training can build (``fedpeft.training.trainer.make_optimizer``); DP-SGD
#: wraps the same ones. The one list of names: the run config, the CLI and the benchmarks read it.
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each client."""

    local_steps: int = 4
    batch_size: int = 8
    lr: float = 1e-3
    head_lr: float = 0.0  # classification head's own learning rate; 0 = lr
    optimizer: str = "adamw"
    momentum: float = 0.0
    weight_decay: float = 0.0
    #: lr (and head-lr) in the last round, as a fraction of round 1's; 1 = constant, < 1 =
    #: cosine decay across rounds (``fedpeft.training.trainer.round_lr_scale``)
    lr_final_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.local_steps < 1:
            raise ConfigError(f"local-steps={self.local_steps} must be >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"batch-size={self.batch_size} must be >= 1")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        if not self.head_lr >= 0:
            raise ConfigError(f"head-lr={self.head_lr} must be >= 0 (0 means the same as lr)")
        if self.optimizer not in OPTIMIZERS:
            raise UnknownNameError(f"unknown optimizer {self.optimizer!r}; known: {OPTIMIZERS}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum={self.momentum} must be in [0, 1)")
        if self.weight_decay < 0:
            raise ConfigError(f"weight-decay={self.weight_decay} must be >= 0")
        if not 0 < self.lr_final_fraction <= 1:
            raise ConfigError(f"lr-final-fraction={self.lr_final_fraction} must be in (0, 1] "
                              "(1 keeps lr constant; 0.1 decays it to a tenth by the last round)")


@dataclass(frozen=True)
class CohortConfig:
    """How a process that holds many virtual clients trains them (``batch-clients``,
    ``batch-rows``): ``clients`` at a time in one forward/backward per ``rows`` rows
    (``fedpeft.training.batched``); 1 trains them one by one."""

    clients: int = 1
    rows: int = 64

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ConfigError(f"batch-clients={self.clients} must be >= 1 (1: one by one)")
        if self.rows < 1:
            raise ConfigError(f"batch-rows={self.rows} must be >= 1 (rows per forward pass "
                              "across the batched clients)")
