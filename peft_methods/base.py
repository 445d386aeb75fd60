"""The small interface every adapter method implements.

An :class:`AdaptedModel` wraps a frozen base model with a few trainable tensors. Only those
tensors are ever extracted, sent, aggregated and loaded back; their names, shapes and dtypes
form the adapter's :func:`spec`, which every received payload is checked against.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from fedpeft.core.errors import ConfigError, PayloadError
from fedpeft.core.models import BaseModel, load_fresh
from fedpeft.core.protocol import Scalar
from fedpeft.core.wire import TensorSpec, spec_of

CLASSIFIER_HEADS = ("classifier", "score")


def head_name(model: nn.Module) -> str:
    """Name of the classification head of a Hugging Face sequence-classification model."""
    for name in CLASSIFIER_HEADS:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise PayloadError(f"model {type(model).__name__} has none of the heads {CLASSIFIER_HEADS}")


class AdaptedModel(nn.Module, ABC):
    """A frozen base model plus trainable adapter tensors."""

    method: ClassVar[str]

    def __init__(self, base: BaseModel) -> None:
        super().__init__()
        self.base_info = base

    @property
    def task(self) -> str:
        return self.base_info.config.task

    @abstractmethod
    def forward(  # noqa: D102 - same contract as a Hugging Face model's forward
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> Any: ...

    @abstractmethod
    def export_peft(self, directory: str | Path) -> Path:
        """Write the adapter in the Hugging Face PEFT on-disk format and return the directory."""

    @abstractmethod
    def frozen_module(self) -> nn.Module:
        """The frozen base model inside (its weights never change)."""

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable tensors, by name (the only tensors that ever travel)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Detached copies of the trainable tensors."""
        return {n: p.detach().clone() for n, p in self.adapter_parameters().items()}

    def spec(self) -> dict[str, TensorSpec]:
        """Names, shapes and dtypes of the trainable tensors."""
        return spec_of(self.adapter_parameters())

    def load_adapter_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy ``tensors`` into the trainable parameters after checking names, shapes, dtypes."""
        params = self.adapter_parameters()
        problems = []
        if set(tensors) != set(params):
            missing = sorted(set(params) - set(tensors))[:3]
            extra = sorted(set(tensors) - set(params))[:3]
            problems.append(f"missing {missing}, unexpected {extra}")
        for name in set(tensors) & set(params):
            t, p = tensors[name], params[name]
            if tuple(t.shape) != tuple(p.shape) or t.dtype != p.dtype:
                problems.append(f"{name}: got {tuple(t.shape)} {t.dtype}, "
                                f"expected {tuple(p.shape)} {p.dtype}")
        if problems:
            raise PayloadError("adapter tensors do not match this model's adapter: "
                               + "; ".join(problems))
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.adapter_parameters().values())

    def num_total(self) -> int:
        return sum(p.numel() for p in self.parameters())


def model_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None) -> dict[str, Any]:
    """The keyword arguments of a Hugging Face model's forward (absent ones left out)."""
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if labels is not None:
        kwargs["labels"] = labels
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids
    return kwargs


def train_head(model: nn.Module, task: str) -> str | None:
    """With classification, make the head trainable and return its name; else ``None``."""
    if task != "classification":
        return None
    name = head_name(model)
    for p in getattr(model, name).parameters():
        p.requires_grad_(True)
    return name


class PeftAdaptedModel(AdaptedModel):
    """A method whose model is a Hugging Face ``PeftModel`` (LoRA, prefix tuning): it is
    called as it is, its frozen base is PEFT's base model and the export is PEFT's own.
    Subclasses set ``self.peft_model``."""

    peft_model: Any

    def forward(  # noqa: D102 - same contract as a Hugging Face model's forward
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> Any:
        return self.peft_model(**model_inputs(input_ids, attention_mask, labels, token_type_ids))

    def frozen_module(self) -> nn.Module:
        base: nn.Module = self.peft_model.get_base_model()
        return base

    def export_peft(self, directory: str | Path) -> Path:
        path = Path(directory)
        self.peft_model.save_pretrained(str(path))
        return path


class InPlaceAdaptedModel(AdaptedModel):
    """A method whose tensors live inside the base model's own modules ((IA)3's scaled layers,
    BitFit's biases): the model is called as it is, and its head trains with classification.
    Subclasses make their tensors trainable and then call :meth:`train_head`."""

    def __init__(self, base: BaseModel) -> None:
        super().__init__(base)
        self.model = base.model
        self.head: str | None = None

    def train_head(self) -> None:
        self.head = train_head(self.model, self.task)

    def forward(  # noqa: D102 - same contract as a Hugging Face model's forward
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> Any:
        return self.model(**model_inputs(input_ids, attention_mask, labels, token_type_ids))

    def frozen_module(self) -> nn.Module:
        return self.model


# -- the method registry (each method module registers itself, as PEFT's register_peft_method) --
@dataclass(frozen=True)
class MethodEntry:
    """One adapter method: its settings type, how it reads its run-config knobs, its builder.

    ``knobs`` are the ``[tool.flwr.app.config]`` keys the method reads, with their defaults (the
    one source for them: taken from the settings dataclass' own defaults). ``parse`` turns the
    typed flat run config into the method's settings (validated by the settings dataclass).
    """

    name: str
    settings_type: type[Any]
    build: Callable[[Any, Any, int], AdaptedModel]
    description: str
    knobs: Mapping[str, Scalar]
    parse: Callable[[Mapping[str, Scalar]], Any]
    #: settings -> the canonical settings of this method (e.g. FFA-LoRA forces ``freeze_a``)
    canonical: Callable[[Any], Any] = lambda settings: settings
    #: Opacus per-example gradient engines that are exact for this method's layers, fastest
    #: first (``dp-grad-sample-mode = "auto"`` takes the first). A custom layer with its own
    #: Opacus rule has no Expanded Weights rule, so ``ew`` is left out there.
    grad_sample_modes: tuple[str, ...] = ("ew", "hooks", "functorch", "ghost")
    #: whether batched multi-client training (``batch-clients > 1``) can route this method's
    #: tensors per row (it routes ``nn.Linear`` and ``nn.Embedding`` owners only)
    batchable: bool = True


#: name -> method; filled by the method modules when :mod:`fedpeft.peft_methods` is imported.
METHODS: dict[str, MethodEntry] = {}


def register_method(entry: MethodEntry) -> MethodEntry:
    """Add a method under ``entry.name``; a second method of the same name is an error."""
    if entry.name in METHODS:
        raise ConfigError(f"adapter method {entry.name!r} is registered twice")
    METHODS[entry.name] = entry
    return entry


def method_knobs() -> dict[str, Scalar]:
    """Every registered method's run-config knobs with their defaults (first definition wins
    where methods share a knob, as LoRA and FFA-LoRA do; they must agree on its default)."""
    out: dict[str, Scalar] = {}
    for entry in METHODS.values():
        for key, default in entry.knobs.items():
            if key in out and out[key] != default:
                raise ConfigError(f"methods disagree on the default of {key!r}")
            out.setdefault(key, default)
    return out


def build_on_fresh_base(model_type: Callable[[BaseModel, Any], AdaptedModel], base_config: Any,
                        settings: Any, seed: int = 0) -> AdaptedModel:
    """Build ``model_type(base, settings)`` on a fresh copy of the base model (an adapter may
    rewrite the module tree), with torch's global RNG seeded by ``seed`` and restored after."""
    base = load_fresh(base_config, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_type(base, settings)
