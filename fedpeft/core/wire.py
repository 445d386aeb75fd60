"""Adapter tensors on the wire: safetensors bytes, checked against the expected spec.

Only adapter tensors travel between coordinator and clients. They are serialised with
safetensors (a flat header plus raw little-endian buffers; nothing is ever unpickled) and every
payload received is checked against the expected names, shapes and dtypes *before* its buffers
are interpreted.
"""

from __future__ import annotations

import json
import math
import re
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
#: Deepest JSON nesting a header may have: header object -> entry object -> shape list (3);
#: one level of slack. Checked before ``json.loads`` (no recursion on hostile headers).
MAX_HEADER_DEPTH = 4
#: Most dimensions one tensor may declare.
MAX_NDIM = 64
_ESCAPE = re.compile(r"\\.", re.DOTALL)  # a backslash escape inside a JSON string
_STRING = re.compile(r'"[^"]*"')  # a JSON string once its escapes are removed
_INNERMOST = re.compile(r"\[[^\[\]{}]*\]|\{[^\[\]{}]*\}")  # a list/object with no nested one


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


def _as_bytes(payload: object) -> bytes:
    """``payload`` as ``bytes`` (a non-contiguous memoryview is copied); else :class:`PayloadError`."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, bytearray):
        return bytes(payload)
    if isinstance(payload, memoryview):
        return payload.tobytes()
    raise PayloadError(f"payload type={type(payload).__name__} must be bytes, bytearray or "
                       "memoryview (safetensors bytes from encode)")


def check_json_depth(text: str, what: str = "safetensors header",
                     limit: int = MAX_HEADER_DEPTH) -> None:
    """Reject JSON nested deeper than ``limit`` before parsing it (linear regex passes, no
    recursion: Python's ``json`` would recurse and raise ``RecursionError`` on deep input)."""
    flat = _STRING.sub('""', _ESCAPE.sub("", text))  # brackets inside strings do not nest
    for _ in range(limit):
        flat, count = _INNERMOST.subn("0", flat)
        if not count:
            break
    if any(c in flat for c in "[]{}"):
        raise PayloadError(f"{what} nests deeper than {limit} levels (or its brackets do not "
                           "balance); it is not what this reader expects")


def _check_depth(text: str) -> None:
    check_json_depth(text)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise PayloadError("safetensors header has duplicate keys; the payload is ambiguous")
    return out


def _read_header(payload: bytes) -> dict[str, object]:
    if len(payload) < 8:
        raise PayloadError(f"payload of {len(payload)} bytes is too short for a safetensors "
                           "header; the sender did not send adapter tensors")
    (header_len,) = struct.unpack("<Q", payload[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(payload):
        raise PayloadError(f"safetensors header length {header_len} does not fit a payload of "
                           f"{len(payload)} bytes; the payload is truncated or not safetensors")
    try:
        text = payload[8 : 8 + header_len].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(f"safetensors header is not valid UTF-8: {exc}") from exc
    _check_depth(text)
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys)
    except PayloadError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, int digit limit
        raise PayloadError(f"safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise PayloadError("safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict)
                                 and all(isinstance(v, str) for v in meta.values())):
        raise PayloadError("safetensors __metadata__ must map strings to strings")
    return header


def _is_index(value: object) -> bool:
    """A non-negative JSON integer (``bool`` excluded) that fits a u64."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64


def _entry_problem(name: str, entry: object, data_bytes: int) -> str | None:
    """Why one header entry is malformed (None if its shape, dtype and offsets are usable)."""
    if not isinstance(entry, dict):
        return f"{name}: malformed header entry"
    raw_shape = entry.get("shape")
    if (not isinstance(raw_shape, list) or len(raw_shape) > MAX_NDIM
            or not all(_is_index(d) for d in raw_shape)):
        return f"{name}: malformed shape {str(raw_shape)[:80]}"
    offsets = entry.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_index(o) for o in offsets)
            or not offsets[0] <= offsets[1] <= data_bytes):
        return f"{name}: malformed data_offsets {str(offsets)[:80]} for {data_bytes} data bytes"
    dtype = _DTYPES.get(str(entry.get("dtype")))
    if dtype is not None:
        # Python ints (at most MAX_NDIM factors below 2^64): the product cannot overflow
        size = math.prod(raw_shape) * torch.empty((), dtype=dtype).element_size()
        if size != offsets[1] - offsets[0]:
            return f"{name}: shape {tuple(raw_shape)} needs {size} bytes, data_offsets give " \
                   f"{offsets[1] - offsets[0]}"
    return None


def decode(payload: bytes | bytearray | memoryview, expected: Spec) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes and check them against ``expected`` before use.

    Raises :class:`PayloadError` naming every missing, unexpected or mismatched tensor, and for
    any malformed payload (wrong type, bad or deeply nested header, bad shapes or offsets).
    """
    payload = _as_bytes(payload)
    header = _read_header(payload)
    data_bytes = len(payload) - 8 - struct.unpack("<Q", payload[:8])[0]
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
        problem = _entry_problem(name, entry, data_bytes)
        if problem is not None or not isinstance(entry, dict):
            problems.append(problem or f"{name}: malformed header entry")
            continue
        shape: tuple[int, ...] = tuple(entry["shape"])
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
