"""Aggregation of adapter updates: pure functions on name -> tensor dicts (no I/O, no Flower).

FedAvg (McMahan et al., AISTATS 2017) averages client updates, uniformly or weighted by the
number of local examples (:func:`weighted_mean`, the plain rounds' aggregate). Secure rounds
never see the updates: their mean comes from the SecAgg+ server's unmasked sum
(``fedpeft.secagg.server``, used by ``fedpeft.coordinator.secure_round``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedpeft.core.errors import ConfigError

Tensors = Mapping[str, torch.Tensor]


def _check_same_keys(updates: Sequence[Tensors]) -> None:
    if not updates:
        raise ConfigError("no updates to aggregate; at least one client must reply")
    keys = set(updates[0])
    for i, u in enumerate(updates[1:], start=1):
        if set(u) != keys:
            raise ConfigError(f"update {i} has tensors {sorted(set(u) ^ keys)[:3]} that update 0 "
                              "lacks or has: all updates must share one adapter spec")


def weighted_sum(updates: Sequence[Tensors], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Sum of ``w_i * u_i`` per tensor, accumulated in float64 for stability."""
    _check_same_keys(updates)
    if len(weights) != len(updates):
        raise ConfigError(f"{len(weights)} weights for {len(updates)} updates")
    if any(w < 0 for w in weights):
        raise ConfigError(f"weights must be non-negative, got {list(weights)}")
    out: dict[str, torch.Tensor] = {}
    for name in updates[0]:
        acc = torch.zeros_like(updates[0][name], dtype=torch.float64)
        for u, w in zip(updates, weights, strict=True):
            acc.add_(u[name].to(torch.float64), alpha=float(w))
        out[name] = acc
    return out


def weighted_mean(updates: Sequence[Tensors], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """FedAvg: sum_i w_i u_i / sum_i w_i, returned in each update's dtype."""
    _check_same_keys(updates)
    if any(w < 0 for w in weights):
        raise ConfigError(f"weights must be non-negative, got {list(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ConfigError(f"weights sum to {total}; at least one must be positive")
    return mean_from_sum(weighted_sum(updates, weights), total, updates[0])


def mean_from_sum(total: Tensors, count: float, like: Tensors) -> dict[str, torch.Tensor]:
    """``total / count`` per tensor, in float64, returned in the dtype of ``like``'s tensors:
    :func:`weighted_mean`'s last step (``total`` its weighted sum, ``count`` the weights' sum)."""
    if count <= 0:
        raise ConfigError(f"cannot average over a weight of {count}")
    return {k: (v.to(torch.float64) / count).to(like[k].dtype) for k, v in total.items()}
