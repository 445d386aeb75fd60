"""Adapter tensors on the wire: safetensors bytes, checked against the expected spec.

Only adapter tensors travel between coordinator and clients. They are serialised with
safetensors (a flat header plus raw little-endian buffers; nothing is ever unpickled) and every
payload received is checked against the expected names, shapes and dtypes *before* its buffers
are interpreted.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedpeft.core.errors import PayloadError

_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
MAX_HEADER_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class TensorSpec:
    """Name-independent description of one tensor: shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    @staticmethod
    def of(tensor: torch.Tensor) -> TensorSpec:
        return TensorSpec(tuple(int(d) for d in tensor.shape), tensor.dtype)


Spec = Mapping[str, TensorSpec]


def spec_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """The spec of a tensor dict."""
    return {name: TensorSpec.of(t) for name, t in tensors.items()}


def encode(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise a name -> tensor dict as safetensors bytes (contiguous CPU copies)."""
    return bytes(st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}))


def _read_header(payload: bytes) -> dict[str, dict[str, object]]:
    if len(payload) < 8:
        raise PayloadError(f"payload of {len(payload)} bytes is too short for a safetensors "
                           "header; the sender did not send adapter tensors")
    (header_len,) = struct.unpack("<Q", payload[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(payload):
        raise PayloadError(f"safetensors header length {header_len} does not fit a payload of "
                           f"{len(payload)} bytes; the payload is truncated or not safetensors")
    try:
        header = json.loads(payload[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise PayloadError("safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    return header


def decode(payload: bytes, expected: Spec) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes and check them against ``expected`` before use.

    Raises :class:`PayloadError` naming every missing, unexpected or mismatched tensor.
    """
    header = _read_header(payload)
    problems: list[str] = []
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing:
        problems.append(f"missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"unexpected tensors {extra[:5]}{'...' if len(extra) > 5 else ''}")
    for name in sorted(set(expected) & set(header)):
        entry = header[name]
        want = expected[name]
        if not isinstance(entry, dict):
            problems.append(f"{name}: malformed header entry")
            continue
        raw_shape = entry.get("shape")
        if not isinstance(raw_shape, list) or not all(isinstance(d, int) for d in raw_shape):
            problems.append(f"{name}: malformed shape {raw_shape!r}")
            continue
        shape: tuple[int, ...] = tuple(raw_shape)
        dtype = _DTYPES.get(str(entry.get("dtype")))
        if shape != want.shape:
            problems.append(f"{name}: shape {shape} != expected {want.shape}")
        if dtype != want.dtype:
            problems.append(f"{name}: dtype {entry.get('dtype')} != expected "
                            f"{_DTYPE_NAMES.get(want.dtype, want.dtype)}")
    if problems:
        raise PayloadError("adapter payload does not match the global adapter: "
                           + "; ".join(problems)
                           + ". Client and coordinator must use the same model and adapter config")
    try:
        tensors = st_load(payload)
    except Exception as exc:  # safetensors raises its own error types
        raise PayloadError(f"adapter payload is corrupt: {exc}") from exc
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise PayloadError(f"tensor {name!r} holds NaN or infinite values; the sender's "
                               "training diverged (lower the learning rate)")
    return tensors
