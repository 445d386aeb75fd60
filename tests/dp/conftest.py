"""Shared fixtures of the DP-SGD tests: the real models cut to 2 layers, built once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from fedpeft.core.models import ModelConfig
from fedpeft.data.tokenize import Encoded
from fedpeft.peft_methods.base import AdaptedModel
from fedpeft.peft_methods.bitfit import BitFitSettings
from fedpeft.peft_methods.bottleneck import BottleneckSettings
from fedpeft.peft_methods.ia3 import IA3Settings
from fedpeft.peft_methods.lora import LoraSettings
from fedpeft.peft_methods.prefix import PrefixSettings
from fedpeft.peft_methods.prompt import PromptSettings
from fedpeft.peft_methods.registry import AdapterConfig, build
from fedpeft.privacy.csprng import DPRandomness

MODELS = {
    "smollm": ModelConfig("smollm2-135m", task="causal_lm", num_hidden_layers=2),
    "minilm": ModelConfig("minilm-l6", task="classification", num_hidden_layers=2),
}
ADAPTERS = {
    "lora": AdapterConfig("lora", LoraSettings(r=4)),
    "prompt": AdapterConfig("prompt", PromptSettings(num_virtual_tokens=4)),
    "ffa-lora": AdapterConfig("ffa-lora", LoraSettings(r=4)),
    "ia3": AdapterConfig("ia3", IA3Settings()),
    "bitfit": AdapterConfig("bitfit", BitFitSettings()),
    "bottleneck": AdapterConfig("bottleneck", BottleneckSettings(size=4)),
    "bottleneck-par": AdapterConfig("bottleneck", BottleneckSettings(placement="parallel",
                                                                     size=4, scaling=2.0)),
    "prefix": AdapterConfig("prefix", PrefixSettings(num_virtual_tokens=4)),
}
PAIRS = [(m, a) for m in MODELS for a in ("lora", "prompt")]
#: The further methods (issue 18): SmolLM2 has no bias terms, so BitFit runs on MiniLM only.
METHOD_PAIRS = [("smollm", "ia3"), ("minilm", "ia3"), ("minilm", "bitfit"),
                *[(m, a) for m in MODELS for a in ("bottleneck", "bottleneck-par")],
                ("smollm", "prefix")]  # a decoder method
SEQ = 16

_BUILT: dict[tuple[str, str], tuple[AdaptedModel, dict[str, torch.Tensor]]] = {}


def get_model(model: str, adapter: str) -> AdaptedModel:
    """A cached model in train mode with dropout off and its initial adapter state restored."""
    key = (model, adapter)
    if key not in _BUILT:
        m = build(MODELS[model], ADAPTERS[adapter], seed=0)
        for module in m.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0  # exactness tests compare against separate forward passes
        if adapter in ("lora", "ffa-lora"):
            # PEFT initialises LoRA B to zero, which makes the gradient of A zero; perturb B
            # so every adapter tensor has a non-trivial per-example gradient.
            with torch.no_grad():
                gen = torch.Generator().manual_seed(3)
                for name, p in m.adapter_parameters().items():
                    if ".lora_B." in name:
                        p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        if adapter.startswith("bottleneck"):
            # the up projection starts at zero (near-identity), which makes the gradient of
            # the down projection zero; perturb it for the same reason
            with torch.no_grad():
                gen = torch.Generator().manual_seed(4)
                for name, p in m.adapter_parameters().items():
                    if ".adapter.up." in name:
                        p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        _BUILT[key] = (m, m.adapter_state())
    m, state = _BUILT[key]
    m.load_adapter_state(state)
    m.train()
    return m


def make_data(model: str, n: int, seed: int = 0, *, pad: bool = True) -> Encoded:
    """``n`` random rows of length 16; some rows end in padding when ``pad``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 2000, (n, SEQ), generator=gen)
    mask = torch.ones_like(ids)
    if pad:
        for i in range(0, n, 2):
            mask[i, SEQ - 1 - (i % 5):] = 0
    if MODELS[model].task == "causal_lm":
        labels = ids.masked_fill(mask == 0, -100)
        tti = None
    else:
        labels = torch.randint(0, 2, (n,), generator=gen)
        tti = torch.zeros_like(ids)
    return Encoded(ids, mask, labels, tti)


@pytest.fixture
def model_factory() -> Callable[[str, str], AdaptedModel]:
    return get_model


def seeded(seed: int) -> DPRandomness:
    """Reproducible DP randomness (tests only: the coordinator could rebuild it from ``seed``)."""
    return DPRandomness.from_seed(seed)


@contextmanager
def swapped(model: nn.Module, suffix: str, new: nn.Module) -> Iterator[str]:
    """Replace the first submodule whose name ends with ``suffix`` by ``new``; restore it after.

    Yields the replaced module's full name. The cached models are shared between tests, so
    the original is always put back.
    """
    name = next(n for n, _ in model.named_modules() if n.endswith(suffix))
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    try:
        yield name
    finally:
        setattr(parent, attr, old)


class OverHidden(nn.Module):
    """Applies a frozen ``(N, C, L)`` layer (BatchNorm1d, InstanceNorm1d) to ``(B, T, H)``."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.norm(x.transpose(1, 2)).transpose(1, 2)
        return out


class CountsRows(nn.Module):
    """A frozen identity layer that counts the rows it saw in train mode (hidden state)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen += x.shape[0]
        return x
