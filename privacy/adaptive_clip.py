"""Adaptive clipping of user-level updates inside the secure sum (issue 15).

Andrew, Thakkar, McMahan and Ramaswamy, "Differentially Private Learning with Adaptive
Clipping" (NeurIPS 2021), Algorithm 1, with the clipped-count released by the same distributed
discrete Gaussian as the update instead of a server-side Gaussian:

client  clip the update to this round's ``C_t``, scale it to the run's base clip ``C_0``
        (its norm is then at most ``C_0`` whatever ``C_t`` is) and append one coordinate,
        ``+w C_0`` when the update's norm was at most ``C_t`` and ``-w C_0`` when it was
        clipped. The appended vector has L2 norm at most ``C_0 sqrt(1 + w^2)``: the plan's
        clip, so the count costs no separate accounting; it only raises the sensitivity by
        ``sqrt(1 + w^2)`` (1.0025 at 100 clients a round, epsilon 8).
server  the noisy sum's last coordinate ``S`` gives the noisy count of unclipped updates
        ``(S / (w C_0) + n) / 2`` of the ``n`` survivors; the next clip is
        ``C_{t+1} = C_t exp(-lr (b_t - gamma))`` with ``b_t`` that fraction (clamped to
        [0, 1]) and ``gamma`` the target quantile (Andrew et al., geometric update).

Why ``C_t`` is not a privacy parameter: every released vector is scaled to the base clip, so the
mechanism, its noise and its epsilon are the same for every ``C_t``; ``C_t`` is a function of
earlier releases only (post-processing). A coordinator that sends a wrong ``C_t`` can hurt
utility, never the guarantee; clients still refuse a ``C_t`` that the update rule cannot reach
from ``C_0`` in that many rounds (:func:`check_round_clip`), which catches a lying or broken
coordinator early.

The weight ``w`` is chosen so that the count's noise has standard deviation ``count_std``
(Andrew et al. suggest clients-per-round / 20) at the planned round size:
``w = sqrt(n) sigma / (2 C_0 count_std)`` with ``sigma`` each client's noise without the count
(:func:`count_coordinate_weight`); the plan with the count adds slightly more noise, so the count's actual
noise is a little above ``count_std``, never below.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from fedpeft.core.checks import is_real
from fedpeft.core.errors import ConfigError

FloatArray = npt.NDArray[np.float64]
#: Relative slack of the client's range check (floating-point exp/log, never privacy).
CLIP_RANGE_SLACK = 1e-9


class AdaptiveClipError(ConfigError):
    """An adaptive-clipping setting or a round's clip is invalid (the message names the knob)."""


def _positive(name: str, v: float) -> float:
    if not is_real(v) or not math.isfinite(v) or v <= 0:
        raise AdaptiveClipError(f"{name}={v!r} must be a finite number > 0")
    return float(v)


def validate(target_quantile: float, lr: float, count_std: float) -> None:
    """Check the ``dp-user-clip-*`` knobs (``target_quantile`` 0 = a fixed clip)."""
    if not is_real(target_quantile) or not 0.0 <= target_quantile < 1.0:
        raise AdaptiveClipError(f"dp-user-clip-quantile={target_quantile!r} must be in (0, 1), "
                                "or 0 for a fixed clip")
    if not is_real(lr) or not math.isfinite(lr) or not 0.0 < lr <= 2.0:
        raise AdaptiveClipError(f"dp-user-clip-lr={lr!r} must be in (0, 2] (Andrew et al. "
                                "use 0.2)")
    if not is_real(count_std) or not math.isfinite(count_std) or count_std < 0:
        raise AdaptiveClipError(f"dp-user-clip-count-std={count_std!r} must be a finite "
                                "number >= 0 (0: clients-per-round / 20)")


def count_coordinate_weight(*, planned_clients: int, noise_std: float, base_clip: float,
                 count_std: float) -> float:
    """The appended coordinate's weight ``w`` that gives the noisy count of unclipped updates a
    standard deviation of ``count_std`` in a round of ``planned_clients``, each adding
    ``noise_std`` (update units, the plan without the count)."""
    if isinstance(planned_clients, bool) or not isinstance(planned_clients, int) or (
            planned_clients < 1):
        raise AdaptiveClipError(f"planned_clients={planned_clients!r} must be an integer >= 1")
    for name, v in (("noise_std", noise_std), ("base_clip", base_clip),
                    ("dp-user-clip-count-std", count_std)):
        _positive(name, v)
    return math.sqrt(planned_clients) * noise_std / (2.0 * base_clip * count_std)


def mechanism_clip(base_clip: float, weight: float) -> float:
    """L2 bound of the appended vector: ``C_0 sqrt(1 + w^2)`` (the plan's clip)."""
    return _positive("dp-user-clip", base_clip) * math.sqrt(1.0 + _positive("weight", weight) ** 2)


def append_count(update: FloatArray, *, round_clip: float, base_clip: float,
                 weight: float) -> FloatArray:
    """The client's vector: ``update`` clipped to ``round_clip`` and scaled to ``base_clip``,
    then ``+w C_0`` (not clipped) or ``-w C_0`` (clipped) appended."""
    x = np.asarray(update, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(x))
    if not math.isfinite(norm):
        raise AdaptiveClipError("update has a non-finite coordinate")
    c_t, c_0 = _positive("round clip", round_clip), _positive("dp-user-clip", base_clip)
    unclipped = norm <= c_t
    scaled = x * (c_0 / c_t) if unclipped else x * (c_0 / norm)
    mark = weight * c_0 if unclipped else -weight * c_0
    return np.concatenate([scaled, np.array([mark])])


def split_count(noisy: FloatArray, *, round_clip: float, base_clip: float, weight: float,
                survivors: int) -> tuple[FloatArray, float]:
    """From the decoded noisy sum of appended vectors: (the noisy sum of the updates clipped to
    ``round_clip``, the noisy fraction of unclipped updates among ``survivors``, unclamped)."""
    if isinstance(survivors, bool) or not isinstance(survivors, int) or survivors < 1:
        raise AdaptiveClipError(f"survivors={survivors!r} must be an integer >= 1")
    c_t, c_0 = _positive("round clip", round_clip), _positive("dp-user-clip", base_clip)
    total = np.asarray(noisy, dtype=np.float64)
    unclipped = (float(total[-1]) / (_positive("weight", weight) * c_0) + survivors) / 2.0
    return total[:-1] * (c_t / c_0), unclipped / survivors


def next_clip(clip: float, unclipped_fraction: float, *, target_quantile: float,
              lr: float) -> float:
    """Andrew et al.'s geometric update: ``C exp(-lr (b - gamma))``, ``b`` clamped to [0, 1]
    (so one round moves ``log C`` by at most ``lr``)."""
    if not is_real(unclipped_fraction) or not math.isfinite(unclipped_fraction):
        raise AdaptiveClipError(f"unclipped fraction {unclipped_fraction!r} is not finite")
    b = min(1.0, max(0.0, float(unclipped_fraction)))
    return _positive("clip", clip) * math.exp(-lr * (b - target_quantile))


def clip_range(base_clip: float, *, lr: float, target_quantile: float,
               updates: int) -> tuple[float, float]:
    """The clips the update rule can reach from ``base_clip`` after ``updates`` updates."""
    if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
        raise AdaptiveClipError(f"updates={updates!r} must be an integer >= 0")
    c_0 = _positive("dp-user-clip", base_clip)
    return (c_0 * math.exp(-lr * (1.0 - target_quantile) * updates),
            c_0 * math.exp(lr * target_quantile * updates))


def check_round_clip(round_clip: object, *, base_clip: float, lr: float,
                     target_quantile: float, server_round: int) -> float:
    """The client's check of the clip the coordinator sent for ``server_round`` (rounds count
    from 1, whose clip is ``base_clip``): a finite number the rule can reach in
    ``server_round - 1`` updates, else :class:`AdaptiveClipError`. Returns it as a float."""
    if isinstance(round_clip, bool) or not isinstance(round_clip, (int, float)) or (
            not math.isfinite(round_clip) or round_clip <= 0):
        raise AdaptiveClipError(f"refused: the coordinator's round clip {round_clip!r} is not "
                                "a finite number > 0")
    lo, hi = clip_range(base_clip, lr=lr, target_quantile=target_quantile,
                        updates=max(0, server_round - 1))
    c = float(round_clip)
    if not lo * (1 - CLIP_RANGE_SLACK) <= c <= hi * (1 + CLIP_RANGE_SLACK):
        raise AdaptiveClipError(
            f"refused: the coordinator's clip {c:.6g} for round {server_round} is outside "
            f"[{lo:.6g}, {hi:.6g}], what dp-user-clip={base_clip} can reach with "
            f"dp-user-clip-lr={lr} in {server_round - 1} updates (a lying coordinator or "
            "mismatched run configs)")
    return c
