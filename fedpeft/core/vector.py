"""Flatten adapter tensors into one float vector (in spec order) and back."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
import torch

from fedpeft.core.errors import PayloadError
from fedpeft.core.wire import TensorSpec


def flatten(tensors: Mapping[str, torch.Tensor], spec: Mapping[str, TensorSpec]) -> npt.NDArray[np.float32]:
    """Concatenate the tensors named in ``spec`` (sorted by name) into a float32 vector."""
    if set(tensors) != set(spec):
        raise PayloadError("tensors do not match the adapter spec; cannot flatten")
    parts = [tensors[k].detach().to(torch.float32).reshape(-1).cpu().numpy() for k in sorted(spec)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def vector_length(spec: Mapping[str, TensorSpec]) -> int:
    return sum(s.numel for s in spec.values())


def unflatten(vec: npt.NDArray[np.floating], spec: Mapping[str, TensorSpec]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten`; checks the length."""
    if vec.ndim != 1 or vec.shape[0] != vector_length(spec):
        raise PayloadError(f"vector of shape {vec.shape} does not fit the adapter spec "
                           f"({vector_length(spec)} values)")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name in sorted(spec):
        s = spec[name]
        chunk = np.asarray(vec[offset : offset + s.numel], dtype=np.float64)
        out[name] = torch.from_numpy(chunk.copy()).reshape(s.shape).to(s.dtype)
        offset += s.numel
    return out


#: Coordinates appended to a masked SecAgg vector for round statistics that must be summed,
#: never sent per client: [clip * 1{any coordinate clamped}, clip * clamped / length].
CLIP_STATS = 2


def with_clip_stats(vec: npt.NDArray[np.float32], clamped: int,
                    clip: float) -> npt.NDArray[np.float32]:
    """``vec`` with :data:`CLIP_STATS` coordinates appended that carry, inside the masked sum,
    whether this client's update had coordinates beyond ``clip`` and what fraction.

    Both values lie in [0, clip], so SecAgg's quantiser carries them unclamped.
    """
    length = int(vec.shape[0])
    if not 0 <= clamped <= length:
        raise PayloadError(f"clamped={clamped} must be in [0, {length}]")
    frac = clamped / length if length else 0.0
    stats = np.array([clip if clamped else 0.0, clip * frac], dtype=np.float32)
    return np.concatenate([vec.astype(np.float32, copy=False), stats])


def split_clip_stats(mean: npt.NDArray[np.floating], survivors: int, clip: float
                     ) -> tuple[npt.NDArray[np.floating], int, int]:
    """Inverse of :func:`with_clip_stats` on the survivors' *mean*: returns (the update part,
    the number of clients that clamped, the total of clamped coordinates, rounded).

    The counts come from the quantised sum. The number of clients is exact after rounding
    (its error is about survivors**2 / 2**(bits - 1)); the total of clamped coordinates is
    approximate, off by up to about survivors**2 * length / 2**(bits - 1) (exact at 32 bits
    for n = 10 and length 5e5; at 16 bits and length 1e5 only its order of magnitude holds).
    """
    if mean.ndim != 1 or mean.shape[0] < CLIP_STATS:
        raise PayloadError(f"aggregate of shape {mean.shape} lacks the {CLIP_STATS} "
                           "statistics coordinates")
    update = mean[:-CLIP_STATS]
    length = int(update.shape[0])
    clients = float(mean[-2]) * survivors / clip
    total = float(mean[-1]) * survivors * length / clip
    return update, max(0, int(round(clients))), max(0, int(round(total)))
