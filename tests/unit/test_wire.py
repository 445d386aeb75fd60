from __future__ import annotations

import struct

import pytest
import torch

from fedpeft.core.errors import PayloadError
from fedpeft.core.wire import TensorSpec, decode, encode, spec_of


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.lora_A": torch.randn(4, 8, generator=g), "a.lora_B": torch.randn(8, 4, generator=g)}


def test_round_trip_is_exact() -> None:
    t = _tensors()
    back = decode(encode(t), spec_of(t))
    assert set(back) == set(t)
    for k in t:
        assert torch.equal(back[k], t[k])


def test_payload_is_safetensors_not_pickle() -> None:
    blob = encode(_tensors())
    (n,) = struct.unpack("<Q", blob[:8])
    assert blob[8:9] == b"{" and n < len(blob)
    assert b"\x80\x04" not in blob[:2]  # no pickle protocol header


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda s: {**s, "extra": TensorSpec((1,), torch.float32)}, "missing tensors ['extra']"),
        (lambda s: {k: v for k, v in s.items() if k != "a.lora_B"}, "unexpected tensors ['a.lora_B']"),
        (lambda s: {**s, "a.lora_A": TensorSpec((8, 4), torch.float32)}, "shape (4, 8) != expected (8, 4)"),
        (lambda s: {**s, "a.lora_A": TensorSpec((4, 8), torch.float16)}, "dtype F32"),
    ],
)
def test_mismatch_is_named(mutate: object, needle: str) -> None:
    t = _tensors()
    with pytest.raises(PayloadError, match=r"adapter payload does not match") as err:
        decode(encode(t), mutate(spec_of(t)))  # type: ignore[operator]
    assert needle in str(err.value)


@pytest.mark.parametrize("blob", [b"", b"\x01\x02", struct.pack("<Q", 10**9) + b"{}",
                                  struct.pack("<Q", 4) + b"nope", struct.pack("<Q", 2) + b"[]"])
def test_garbage_is_rejected(blob: bytes) -> None:
    with pytest.raises(PayloadError):
        decode(blob, spec_of(_tensors()))


def test_truncated_buffer_is_rejected() -> None:
    t = _tensors()
    blob = encode(t)
    with pytest.raises(PayloadError):
        decode(blob[:-16], spec_of(t))


def test_non_finite_values_are_rejected() -> None:
    t = _tensors()
    t["a.lora_A"][0, 0] = float("nan")
    with pytest.raises(PayloadError, match="NaN"):
        decode(encode(t), spec_of(t))
