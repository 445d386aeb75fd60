"""LoRA through Hugging Face ``peft`` (Hu et al., ICLR 2022).

Low-rank updates ``B @ A`` on chosen linear layers; with classification the head is trained too
(PEFT's ``modules_to_save``). The option ``freeze_a`` trains only ``B`` (FFA-LoRA, Sun et al.,
ICLR 2024), which keeps the aggregate of client updates an exact update of the product.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

from fedpeft.core.errors import ConfigError, ModelError
from fedpeft.core.models import BaseModel
from fedpeft.core.protocol import Scalar
from fedpeft.peft_methods.base import (
    AdaptedModel,
    MethodEntry,
    PeftAdaptedModel,
    build_on_fresh_base,
    register_method,
)

# Sensible defaults per architecture: attention query and value projections.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "roberta": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
}


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters. ``target_modules=None`` picks the architecture default."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    freeze_a: bool = False

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"lora rank r={self.r} must be a positive integer (try 4, 8 or 16)")
        if self.alpha <= 0:
            raise ConfigError(f"lora alpha={self.alpha} must be positive (commonly 2 * r)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora dropout={self.dropout} must be in [0, 1)")
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("lora target_modules is empty: name at least one linear layer "
                              "or leave it unset for the architecture default")


def _linear_suffixes(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, nn.Linear)})


class LoraModel(PeftAdaptedModel):
    """A base model with LoRA adapters injected by ``peft``."""

    method: ClassVar[str] = "lora"

    def __init__(self, base: BaseModel, settings: LoraSettings) -> None:
        super().__init__(base)
        self.settings = settings
        arch = base.architecture
        targets = settings.target_modules or DEFAULT_TARGETS.get(arch)
        if targets is None:
            raise ConfigError(f"no default LoRA target modules for architecture {arch!r}; set "
                              f"target_modules to some of {_linear_suffixes(base.model)}")
        suffixes = set(_linear_suffixes(base.model))
        absent = [t for t in targets if t not in suffixes]
        if absent:
            raise ModelError(f"LoRA target modules {absent} are not linear layers of "
                             f"{base.config.name!r} ({arch}); available: {sorted(suffixes)}")
        task_type = "CAUSAL_LM" if base.config.task == "causal_lm" else "SEQ_CLS"
        config = PeftLoraConfig(
            task_type=task_type,
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=list(targets),
        )
        self.peft_model: PeftModel = get_peft_model(base.model, config)
        if settings.freeze_a:
            for name, p in self.peft_model.named_parameters():
                if ".lora_A." in name:
                    p.requires_grad_(False)


def build_lora(base_config: Any, settings: LoraSettings, seed: int = 0) -> AdaptedModel:
    """Build a LoRA model on a fresh copy of the base (LoRA rewrites the module tree)."""
    return build_on_fresh_base(LoraModel, base_config, settings, seed)


_DEFAULT = LoraSettings()
#: The run-config knobs LoRA and FFA-LoRA read, defaults from :class:`LoraSettings`.
KNOBS: dict[str, Scalar] = {"lora-r": _DEFAULT.r, "lora-alpha": _DEFAULT.alpha,
                            "lora-dropout": _DEFAULT.dropout, "lora-targets": ""}


def parse_knobs(v: Mapping[str, Scalar], *, freeze_a: bool = False) -> LoraSettings:
    """LoRA settings from the typed flat run config (``lora-targets``: comma-separated)."""
    targets = tuple(t.strip() for t in str(v["lora-targets"]).split(",") if t.strip())
    return LoraSettings(r=int(v["lora-r"]), alpha=int(v["lora-alpha"]),
                        dropout=float(v["lora-dropout"]), target_modules=targets or None,
                        freeze_a=freeze_a)


def _freeze_a(settings: LoraSettings) -> LoraSettings:
    return settings if settings.freeze_a else replace(settings, freeze_a=True)


register_method(MethodEntry("lora", LoraSettings, build_lora, "LoRA via Hugging Face peft",
                            KNOBS, parse_knobs))
register_method(MethodEntry("ffa-lora", LoraSettings, build_lora,
                            "LoRA with A frozen, only B trained (FFA-LoRA)", KNOBS,
                            lambda v: parse_knobs(v, freeze_a=True), canonical=_freeze_a))
