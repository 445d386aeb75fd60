"""Fuzzing the fedpeft export reader (``peft_methods/own_format.py``) through both loaders.

Inputs are mutations of a real export of MiniLM-L6 cut to 2 layers (BitFit and serial
bottleneck adapters): random JSON values in place of the config or of one of its fields,
nesting far deeper than the reader allows, random or truncated bytes in place of either
file. The only exception allowed is :class:`PayloadError`, and a refused export changes
nothing in the model it was loaded into (no module put in, no tensor written). Fast tier:
40 cases a loader; derandomised, so a failure reproduces.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from fedpeft.core.errors import PayloadError
from fedpeft.core.models import ModelConfig, load_fresh
from fedpeft.peft_methods import AdapterConfig, BitFitSettings, BottleneckSettings, build
from fedpeft.peft_methods.bitfit import load_bitfit
from fedpeft.peft_methods.bottleneck import load_bottleneck
from fedpeft.peft_methods.own_format import CONFIG_FILE, TENSORS_FILE

MODEL = ModelConfig("minilm-l6", task="classification", num_hidden_layers=2)
LOADERS: dict[str, tuple[AdapterConfig, Callable[[nn.Module, Path], nn.Module]]] = {
    "bitfit": (AdapterConfig("bitfit", BitFitSettings()), load_bitfit),
    "bottleneck": (AdapterConfig("bottleneck", BottleneckSettings(size=2)), load_bottleneck),
}
_EXPORTS: dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]] = {}
_TARGET: dict[str, nn.Module] = {}

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12)


def _export(method: str, tmp: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if method not in _EXPORTS:
        adapted = build(MODEL, LOADERS[method][0])
        adapted.export_peft(tmp / f"valid-{method}")
        _EXPORTS[method] = (json.loads((tmp / f"valid-{method}" / CONFIG_FILE).read_text()),
                            load_file(str(tmp / f"valid-{method}" / TENSORS_FILE)))
    return _EXPORTS[method]


def _target() -> nn.Module:
    if "model" not in _TARGET:
        _TARGET["model"] = load_fresh(MODEL, seed=0).model
    return _TARGET["model"]


def _fingerprint(model: nn.Module) -> tuple[list[str], float]:
    return ([n for n, _ in model.named_modules()],
            float(sum(p.double().sum() for p in model.parameters())))


def _mutations(config: dict[str, Any]) -> st.SearchStrategy[tuple[str, Any]]:
    field = st.sampled_from(sorted(config))
    return st.one_of(
        st.tuples(st.just("config"), JSON),
        st.tuples(st.just("field"), st.tuples(field, JSON)),
        st.tuples(st.just("deep"), st.integers(5, 20_000)),
        st.tuples(st.just("config-bytes"), st.binary(max_size=200)),
        st.tuples(st.just("tensor-bytes"), st.binary(max_size=200)),
        st.tuples(st.just("truncate"), st.integers(0, 400)),
        st.tuples(st.just("overwrite-base"), st.sampled_from([
            "encoder.embeddings.word_embeddings.weight",
            "encoder.encoder.layer.0.attention.self.query.weight"])),
    )


def _write(d: Path, kind: str, value: Any, config: dict[str, Any],
           tensors: dict[str, torch.Tensor]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    cfg_text = json.dumps(config)
    if kind == "config":
        cfg_text = json.dumps(value)
    elif kind == "field":
        cfg_text = json.dumps({**config, value[0]: value[1]})
    elif kind == "deep":
        cfg_text = json.dumps({**config, "targets": "X"}).replace('"X"', "[" * value + "]" * value)
    save_file(tensors, str(d / TENSORS_FILE))
    if kind == "overwrite-base":
        base = dict(_target().named_parameters())[value]
        save_file({**tensors, value: torch.zeros_like(base)}, str(d / TENSORS_FILE))
    if kind == "tensor-bytes":
        (d / TENSORS_FILE).write_bytes(value)
    if kind == "truncate":
        raw = (d / TENSORS_FILE).read_bytes()
        (d / TENSORS_FILE).write_bytes(raw[:value])
    (d / CONFIG_FILE).write_bytes(value if kind == "config-bytes" else cfg_text.encode())


@pytest.mark.parametrize("method", sorted(LOADERS))
def test_the_export_reader_raises_only_payload_errors_and_changes_nothing(
        method: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp(f"fuzz-{method}")
    config, tensors = _export(method, tmp)
    loader = LOADERS[method][1]
    seen = {"refused": 0, "case": 0}

    @settings(max_examples=40, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_mutations(config))
    def check(mutation: tuple[str, Any]) -> None:
        kind, value = mutation
        seen["case"] += 1
        d = tmp / f"case-{seen['case']}"
        _write(d, kind, value, config, tensors)
        model = _target()
        before = _fingerprint(model)
        try:
            loader(model, d)
        except PayloadError:
            seen["refused"] += 1
            assert _fingerprint(model) == before
            return
        # accepted: only a mutation that left a valid export may load; undo it for the next
        assert kind in ("field", "truncate"), (kind, str(value)[:80])
        _TARGET.pop("model")

    check()
    assert seen["refused"] > 25  # the mutations mostly break the export


@pytest.mark.parametrize("method", sorted(LOADERS))
def test_an_export_cannot_overwrite_the_base_weights(method: str, tmp_path: Path) -> None:
    config, tensors = _export(method, tmp_path)
    name = "encoder.embeddings.word_embeddings.weight"
    _write(tmp_path / "bad", "overwrite-base", name, config, tensors)
    model = load_fresh(MODEL, seed=0).model
    before = dict(model.named_parameters())[name].clone()
    with pytest.raises(PayloadError, match=f"{name}: no such parameter"):
        LOADERS[method][1](model, tmp_path / "bad")
    assert torch.equal(dict(model.named_parameters())[name], before)
