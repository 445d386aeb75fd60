"""One registry of adapter methods: name -> (settings type, builder).

:func:`get_adapted` returns the process-wide adapted model for a (model, adapter) config, built
once and shared by every virtual client the process runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fedpeft.errors import ConfigError, UnknownNameError
from fedpeft.models import ModelConfig
from peft_methods.base import AdaptedModel
from peft_methods.lora import LoraSettings, build_lora
from peft_methods.prompt import PromptSettings, build_prompt

Settings = LoraSettings | PromptSettings


@dataclass(frozen=True)
class MethodEntry:
    name: str
    settings_type: type[Any]
    build: Callable[[ModelConfig, Any, int], AdaptedModel]
    description: str


METHODS: dict[str, MethodEntry] = {
    "lora": MethodEntry("lora", LoraSettings, build_lora, "LoRA via Hugging Face peft"),
    "ffa-lora": MethodEntry("ffa-lora", LoraSettings, build_lora,
                            "LoRA with A frozen, only B trained (FFA-LoRA)"),
    "prompt": MethodEntry("prompt", PromptSettings, build_prompt,
                          "soft prompt tuning with per-example gradients"),
}


@dataclass(frozen=True)
class AdapterConfig:
    """Which adapter method and its settings."""

    method: str = "lora"
    settings: Settings = LoraSettings()

    def __post_init__(self) -> None:
        entry = METHODS.get(self.method)
        if entry is None:
            raise UnknownNameError(f"unknown adapter method {self.method!r}; "
                                   f"known methods: {sorted(METHODS)}")
        if not isinstance(self.settings, entry.settings_type):
            raise ConfigError(f"method {self.method!r} takes {entry.settings_type.__name__}, "
                              f"got {type(self.settings).__name__}")
        if self.method == "ffa-lora" and not getattr(self.settings, "freeze_a", False):
            object.__setattr__(self, "settings", LoraSettings(
                **{**self.settings.__dict__, "freeze_a": True}))


def build(model: ModelConfig, adapter: AdapterConfig, seed: int = 0) -> AdaptedModel:
    """Build a new adapted model (a fresh copy of the base with adapter tensors)."""
    return METHODS[adapter.method].build(model, adapter.settings, seed)


_CACHE: dict[tuple[ModelConfig, AdapterConfig, int], AdaptedModel] = {}
_INITIAL: dict[tuple[ModelConfig, AdapterConfig, int], dict[str, torch.Tensor]] = {}
_LOCK = threading.Lock()


def get_adapted(model: ModelConfig, adapter: AdapterConfig, seed: int = 0) -> AdaptedModel:
    """The process-wide adapted model for this config: built once, shared by all clients."""
    key = (model, adapter, seed)
    with _LOCK:
        adapted = _CACHE.get(key)
        if adapted is None:
            adapted = build(model, adapter, seed)
            _CACHE[key] = adapted
            _INITIAL[key] = adapted.adapter_state()
        return adapted


def initial_adapter_state(model: ModelConfig, adapter: AdapterConfig,
                          seed: int = 0) -> dict[str, torch.Tensor]:
    """The adapter tensors as built from ``seed`` (the shared model's may have moved since)."""
    get_adapted(model, adapter, seed)
    return {k: v.clone() for k, v in _INITIAL[(model, adapter, seed)].items()}


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()
        _INITIAL.clear()
