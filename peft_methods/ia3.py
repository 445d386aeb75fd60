"""(IA)3: learned rescaling vectors (Liu et al., NeurIPS 2022, "Few-Shot Parameter-Efficient
Fine-Tuning is Better and Cheaper than In-Context Learning").

Chosen linear layers have their output (attention keys and values) or, for feed-forward layers,
their input multiplied elementwise by a trained vector ``l`` that starts at one. The module
matching, the defaults per architecture and the on-disk format are PEFT's (``IA3Config``), so an
exported adapter loads with ``PeftModel.from_pretrained``.

Why not PEFT's layer: PEFT keeps ``l`` in an ``nn.ParameterDict`` child, which never runs a
forward pass, so Opacus cannot hook it and per-example gradients could not be computed. Here
:class:`ScaledLinear` owns ``l`` directly; its per-example gradient rule lives with the DP-SGD
mechanism (``fedpeft.privacy.layer_rules``, the only layer that imports Opacus).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from peft import IA3Config
from peft.tuners.ia3.model import IA3Model
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
)
from safetensors.torch import save_file
from torch import nn

from fedpeft.core.errors import ConfigError, ModelError
from fedpeft.core.models import BaseModel, ModelConfig
from fedpeft.core.protocol import Scalar
from fedpeft.peft_methods.base import (
    AdaptedModel,
    InPlaceAdaptedModel,
    MethodEntry,
    build_on_fresh_base,
    head_name,
    register_method,
)


@dataclass(frozen=True)
class IA3Settings:
    """(IA)3 settings. ``None`` picks PEFT's default modules for the architecture; the
    feed-forward modules (input scaling) must be among the targets."""

    target_modules: tuple[str, ...] | None = None
    feedforward_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("ia3 target_modules is empty: name at least one linear layer or "
                              "leave ia3-targets unset for the architecture default")
        if self.feedforward_modules is not None and self.target_modules is None:
            raise ConfigError("ia3-feedforward needs ia3-targets: name the target modules too "
                              "(the feed-forward ones must be among them)")
        if self.feedforward_modules and self.target_modules:
            stray = [f for f in self.feedforward_modules
                     if not any(f.endswith(t) or t.endswith(f) for t in self.target_modules)]
            if stray:
                raise ConfigError(f"ia3-feedforward {stray} are not among ia3-targets "
                                  f"{list(self.target_modules)}; add them to ia3-targets")


class ScaledLinear(nn.Module):
    """A frozen ``nn.Linear`` with an (IA)3 vector on its output (or, feed-forward, its input)."""

    def __init__(self, base_layer: nn.Linear, *, is_feedforward: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.is_feedforward = is_feedforward
        shape = (1, base_layer.in_features) if is_feedforward else (base_layer.out_features, 1)
        # PEFT's shapes, so the exported tensor is PEFT's ia3_l as it is
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=base_layer.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.ia3_l.flatten()
        if self.is_feedforward:
            out: torch.Tensor = self.base_layer(x * scale.to(x.dtype))
            return out
        y: torch.Tensor = self.base_layer(x)
        return y * scale.to(y.dtype)


def _peft_config(base: BaseModel, settings: IA3Settings, heads: list[str] | None) -> IA3Config:
    arch = base.architecture
    targets = settings.target_modules or TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(arch)
    if targets is None:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in base.model.named_modules()
                         if isinstance(m, nn.Linear)})
        raise ConfigError(f"(IA)3 has no default target modules for architecture {arch!r} "
                          f"(model {base.config.name!r}); set ia3-targets to some of {linear}")
    if settings.target_modules is None:
        ff = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(arch, [])
    else:
        ff = list(settings.feedforward_modules or ())
    return IA3Config(task_type="CAUSAL_LM" if base.config.task == "causal_lm" else "SEQ_CLS",
                     target_modules=list(targets), feedforward_modules=list(ff),
                     modules_to_save=heads, base_model_name_or_path=base.source)


class IA3AdaptedModel(InPlaceAdaptedModel):
    """A frozen base model with (IA)3 vectors (and the head, for classification)."""

    method: ClassVar[str] = "ia3"

    def __init__(self, base: BaseModel, settings: IA3Settings) -> None:
        super().__init__(base)
        self.settings = settings
        heads = [head_name(self.model)] if self.task == "classification" else None
        self.peft_config = _peft_config(base, settings, heads)
        self.scaled: list[str] = []
        for name, module in list(self.model.named_modules()):
            if not name or not check_target_module_exists(self.peft_config, name):
                continue
            if not isinstance(module, nn.Linear):
                raise ModelError(f"(IA)3 target {name!r} of {base.config.name!r} is a "
                                 f"{type(module).__name__}, not nn.Linear; (IA)3 here scales "
                                 "linear layers only: choose other ia3-targets")
            ff = IA3Model._check_target_module_feedforward(self.peft_config, name)
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, ScaledLinear(module, is_feedforward=bool(ff)))
            self.scaled.append(name)
        if not self.scaled:
            raise ModelError(f"(IA)3 targets {sorted(self.peft_config.target_modules or [])} "
                             f"match no module of {base.config.name!r}; choose other ia3-targets")
        self.train_head()

    def export_peft(self, directory: str | Path) -> Path:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.peft_config.save_pretrained(str(path))
        tensors: dict[str, torch.Tensor] = {}
        for name in self.scaled:
            layer = self.model.get_submodule(name)
            if not isinstance(layer, ScaledLinear):
                raise ModelError(f"(IA)3 layer {name!r} was replaced after the adapter was built")
            tensors[f"base_model.model.{name}.ia3_l"] = layer.ia3_l.detach().clone().contiguous()
        if self.head:
            for pname, p in getattr(self.model, self.head).named_parameters():
                tensors[f"base_model.model.{self.head}.{pname}"] = p.detach().clone().contiguous()
        save_file(tensors, str(path / "adapter_model.safetensors"))
        return path


def build_ia3(base_config: ModelConfig, settings: IA3Settings, seed: int = 0) -> AdaptedModel:
    """Build an (IA)3 model on a fresh copy of the base ((IA)3 rewrites the module tree)."""
    return build_on_fresh_base(IA3AdaptedModel, base_config, settings, seed)


#: The run-config knobs (IA)3 reads (comma-separated module names; empty: PEFT's defaults).
KNOBS: dict[str, Scalar] = {"ia3-targets": "", "ia3-feedforward": ""}


def _names(text: Scalar) -> tuple[str, ...] | None:
    names = tuple(t.strip() for t in str(text).split(",") if t.strip())
    return names or None


def parse_knobs(v: Mapping[str, Scalar]) -> IA3Settings:
    """(IA)3 settings from the typed flat run config."""
    return IA3Settings(target_modules=_names(v["ia3-targets"]),
                       feedforward_modules=_names(v["ia3-feedforward"]))


register_method(MethodEntry("ia3", IA3Settings, build_ia3,
                            "(IA)3 rescaling vectors with per-example gradients", KNOBS,
                            parse_knobs, grad_sample_modes=("hooks", "functorch", "ghost"),
                            batchable=False))
