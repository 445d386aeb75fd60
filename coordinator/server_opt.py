"""Server optimisers applied to the averaged client update (pure functions).

The averaged update ``delta`` (mean of client ``local - global``) is a pseudo-gradient step.
FedAvg applies it (scaled by the server learning rate); FedAvgM adds server momentum (Hsu et
al., 2019); FedAdam and FedYogi use adaptive moments (Reddi et al., ICLR 2021, Algorithm 2).
Flower's strategies implement the same rules but operate on per-client ``ArrayRecord``s; under
secure aggregation the server only ever sees the sum, so the rules are applied here to that.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedpeft.core.errors import ConfigError

Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class ServerOptConfig:
    kind: str = "fedavg"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in ("fedavg", "fedavgm", "fedadam", "fedyogi"):
            raise ConfigError(f"server optimiser {self.kind!r} is not one of fedavg, fedavgm, "
                              "fedadam, fedyogi")
        if not self.lr > 0:
            raise ConfigError(f"server lr={self.lr} must be > 0")


def server_step(
    params: Tensors, delta: Tensors, state: Tensors, cfg: ServerOptConfig
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One server step. Returns new parameters and new optimiser state (inputs untouched).

    State keys are ``m/<name>`` (first moment or momentum) and ``v/<name>`` (second moment).
    """
    if set(params) != set(delta):
        raise ConfigError("server step: update and global adapter have different tensors")
    new_params: dict[str, torch.Tensor] = {}
    new_state: dict[str, torch.Tensor] = {}
    for name, x in params.items():
        d = delta[name].to(x.dtype)
        if cfg.kind == "fedavg":
            new_params[name] = x + cfg.lr * d
        elif cfg.kind == "fedavgm":
            v = state.get(f"m/{name}", torch.zeros_like(x))
            v = cfg.momentum * v + d
            new_state[f"m/{name}"] = v
            new_params[name] = x + cfg.lr * v
        else:
            m = state.get(f"m/{name}", torch.zeros_like(x))
            v = state.get(f"v/{name}", torch.zeros_like(x))
            m = cfg.beta1 * m + (1 - cfg.beta1) * d
            d2 = d * d
            if cfg.kind == "fedadam":
                v = cfg.beta2 * v + (1 - cfg.beta2) * d2
            else:  # fedyogi
                v = v - (1 - cfg.beta2) * d2 * torch.sign(v - d2)
            new_state[f"m/{name}"] = m
            new_state[f"v/{name}"] = v
            new_params[name] = x + cfg.lr * m / (torch.sqrt(v) + cfg.tau)
    return new_params, new_state
