"""BitFit: train only the bias terms (Ben Zaken, Ravfogel, Goldberg, ACL 2022).

Every bias the frozen transformer's output depends on (linear layers and layer norms;
with ``bitfit-modules``, only those of the named modules) becomes trainable, plus the
classification head. The biases are
parameters of ``nn.Linear`` and ``nn.LayerNorm``, whose per-example gradient rules Opacus
already has (the bias gradient is the output gradient summed over positions), so record-level
DP-SGD is exact without a custom layer.

PEFT has no BitFit, so the export is this project's own format (docs/methods.md):
``adapter_model.safetensors`` holding the trained tensors under their names in the base model,
and ``fedpeft_adapter.json`` (``{"format": 1, "method": "bitfit", "base_model": ...,
"task": ..., "tensors": {name: [shape, dtype]}}``). :func:`load_bitfit` applies it to a base
model after checking every name, shape and dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
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
from fedpeft.peft_methods.own_format import (
    check_tensors,
    copy_into,
    head_parameters,
    read_export,
    write_export,
)


@dataclass(frozen=True)
class BitFitSettings:
    """BitFit settings. ``modules=None`` trains every bias; otherwise only the biases of
    modules whose name ends with one of ``modules`` (e.g. ``("query", "intermediate.dense")``,
    the subset BitFit's authors found nearly as good)."""

    modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.modules is not None and not self.modules:
            raise ConfigError("bitfit modules is empty: name at least one module or leave "
                              "bitfit-modules unset to train every bias")


def _reach_the_output(model: nn.Module, biases: list[tuple[str, nn.Parameter]]
                      ) -> list[tuple[str, nn.Parameter]]:
    """The biases the model's output depends on (one probe forward and backward). A bias of a
    module whose output is unused (BERT's pooler under mean pooling runs but is discarded) would
    get no gradient and only add noisy coordinates."""
    for _, p in biases:
        p.requires_grad_(True)
        p.grad = None
    ids = torch.tensor([[1, 2, 3, 4]])
    try:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        out.logits.float().sum().backward()
        return [(n, p) for n, p in biases if p.grad is not None]
    finally:
        for _, p in biases:
            p.requires_grad_(False)
            p.grad = None


def _bias_modules(model: nn.Module, head: str | None,
                  modules: tuple[str, ...] | None) -> list[tuple[str, nn.Parameter]]:
    out = []
    for name, module in model.named_modules():
        if head and (name == head or name.startswith(f"{head}.")):
            continue
        bias = getattr(module, "bias", None)
        if not isinstance(bias, nn.Parameter):
            continue
        if modules is not None and not any(name == m or name.endswith(f".{m}") for m in modules):
            continue
        out.append((f"{name}.bias" if name else "bias", bias))
    return _reach_the_output(model, out) if out else out


class BitFitModel(InPlaceAdaptedModel):
    """A frozen base model whose bias terms (and head, for classification) train."""

    method: ClassVar[str] = "bitfit"

    def __init__(self, base: BaseModel, settings: BitFitSettings) -> None:
        super().__init__(base)
        self.settings = settings
        head = head_name(self.model) if self.task == "classification" else None
        biases = _bias_modules(self.model, head, settings.modules)
        if not biases:
            which = "" if settings.modules is None else f" among modules {list(settings.modules)}"
            raise ModelError(
                f"BitFit needs bias terms, and {base.config.name!r} ({base.architecture}) has "
                f"none{which}: its linear layers and norms are bias-free. Use a model with "
                "biases (e.g. minilm-l6) or another method (lora, ia3, prompt)")
        for _, p in biases:
            p.requires_grad_(True)
        self.train_head()

    def export_peft(self, directory: str | Path) -> Path:
        """BitFit is not a PEFT method: write this project's format (module docstring)."""
        tensors = {n.removeprefix("model."): p for n, p in self.adapter_parameters().items()}
        return write_export(directory, method=self.method, base_model=self.base_info.source,
                            task=self.task, tensors=tensors,
                            fields={"modules": list(self.settings.modules or [])})


def load_bitfit(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply a BitFit export to ``model`` (a fresh base model, as ``load_fresh`` gives) in place.

    Raises :class:`PayloadError` when the export is not BitFit, is malformed, or names a tensor
    the model lacks or with another shape or dtype; nothing is changed then.
    """
    _config, tensors = read_export(directory, "bitfit", "BitFit")
    # only biases and the head: an export cannot overwrite the base model's weights
    params: dict[str, torch.Tensor] = {n: p for n, p in model.named_parameters()
                                       if n.endswith(".bias") or n == "bias"}
    params.update(head_parameters(model))
    check_tensors(tensors, params, f"BitFit export {directory}")
    copy_into(tensors, params)
    return model


def build_bitfit(base_config: ModelConfig, settings: BitFitSettings, seed: int = 0) -> AdaptedModel:
    """Build a BitFit model on a fresh copy of the base (its biases become trainable)."""
    return build_on_fresh_base(BitFitModel, base_config, settings, seed)


#: The run-config knobs BitFit reads (comma-separated module names; empty: every bias).
KNOBS: dict[str, Scalar] = {"bitfit-modules": ""}


def parse_knobs(v: Mapping[str, Scalar]) -> BitFitSettings:
    """BitFit settings from the typed flat run config."""
    names = tuple(t.strip() for t in str(v["bitfit-modules"]).split(",") if t.strip())
    return BitFitSettings(modules=names or None)


register_method(MethodEntry("bitfit", BitFitSettings, build_bitfit,
                            "BitFit: bias terms only (own export format)", KNOBS, parse_knobs,
                            batchable=False))
