"""Flatten adapter tensors into one float vector (in spec order) and back."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
import torch

from fedpeft.errors import PayloadError
from fedpeft.wire import TensorSpec


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
