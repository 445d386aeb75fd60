"""Adapter configs over the method registry (methods register themselves in
:data:`fedpeft.peft_methods.base.METHODS` when :mod:`fedpeft.peft_methods` is imported).

:func:`get_adapted` returns the process-wide adapted model for a (model, adapter) config, built
once and shared by every virtual client the process runs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from fedpeft.core.errors import ConfigError, UnknownNameError
from fedpeft.core.models import ModelConfig
from fedpeft.peft_methods.base import METHODS, AdaptedModel, method_knobs
from fedpeft.peft_methods.bitfit import BitFitSettings
from fedpeft.peft_methods.bottleneck import BottleneckSettings
from fedpeft.peft_methods.ia3 import IA3Settings
from fedpeft.peft_methods.lora import LoraSettings
from fedpeft.peft_methods.prefix import PrefixSettings
from fedpeft.peft_methods.prompt import PromptSettings

Settings = (LoraSettings | PromptSettings | IA3Settings | BitFitSettings | BottleneckSettings
            | PrefixSettings)
__all__ = ["METHODS", "AdapterConfig", "Settings", "build", "clear_cache", "get_adapted",
           "initial_adapter_state", "method_knobs"]


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
        canonical = entry.canonical(self.settings)
        if canonical != self.settings:
            object.__setattr__(self, "settings", canonical)


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
