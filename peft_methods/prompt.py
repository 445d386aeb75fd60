"""Soft prompt tuning (Lester et al., EMNLP 2021) with a per-example gradient path.

PEFT's ``PromptEmbedding`` computes the prompt once and broadcasts it over the batch; under
Opacus that yields one gradient for the whole batch instead of one per example, which would void
per-example clipping. Here the prompt is an ``nn.Embedding`` looked up with batch-expanded
indices, so each example has its own activation and Opacus computes true per-example gradients.

The forward pass mirrors ``peft.PeftModel`` for prompt tuning exactly (prompt prepended to the
input embeddings, attention mask extended with ones, labels with -100, token type ids with
zeros), so an exported adapter gives the same logits under ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

import torch
from peft import PromptTuningConfig
from safetensors.torch import save_file
from torch import nn

from fedpeft.core.errors import ConfigError
from fedpeft.core.models import BaseModel, ModelConfig
from fedpeft.core.protocol import Scalar
from fedpeft.peft_methods.base import (
    AdaptedModel,
    MethodEntry,
    build_on_fresh_base,
    register_method,
    train_head,
)


@dataclass(frozen=True)
class PromptSettings:
    """Soft prompt hyper-parameters.

    ``init="vocab"`` starts from the embeddings of random vocabulary tokens (Lester et al.
    found this better than uniform noise); ``init="random"`` uses PEFT's default normal init.
    """

    num_virtual_tokens: int = 16
    init: Literal["vocab", "random"] = "vocab"

    def __post_init__(self) -> None:
        if self.num_virtual_tokens <= 0:
            raise ConfigError(f"num_virtual_tokens={self.num_virtual_tokens} must be a "
                              "positive integer (try 8 to 32)")
        if self.init not in ("vocab", "random"):
            raise ConfigError(f"prompt init={self.init!r} must be 'vocab' or 'random'")


class PromptModel(AdaptedModel):
    """A frozen base model with a trainable soft prompt (and head, for classification)."""

    method: ClassVar[str] = "prompt"

    def __init__(self, base: BaseModel, settings: PromptSettings) -> None:
        super().__init__(base)
        self.settings = settings
        self.model = base.model
        vocab = cast(torch.Tensor, self.model.get_input_embeddings().weight)
        hidden = int(vocab.shape[1])
        n = settings.num_virtual_tokens
        self.prompt = nn.Embedding(n, hidden)
        with torch.no_grad():
            if settings.init == "vocab":
                ids = torch.randint(0, int(vocab.shape[0]), (n,))
                self.prompt.weight.copy_(vocab[ids])
        self.prompt_ids: torch.Tensor
        self.register_buffer("prompt_ids", torch.arange(n), persistent=False)
        self.head: str | None = train_head(self.model, base.config.task)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> Any:
        batch = input_ids.shape[0]
        n = self.settings.num_virtual_tokens
        # One lookup per example: Opacus sees a (batch, n) index tensor and per-example grads.
        prompts = self.prompt(self.prompt_ids.unsqueeze(0).expand(batch, n).contiguous())
        embed: nn.Module = self.model.get_input_embeddings()
        embeds = embed(input_ids)
        inputs_embeds = torch.cat((prompts.to(embeds.dtype), embeds), dim=1)
        prefix_mask = torch.ones(batch, n).to(attention_mask.device)
        kwargs: dict[str, Any] = {
            "inputs_embeds": inputs_embeds,
            "attention_mask": torch.cat((prefix_mask, attention_mask), dim=1),
        }
        if labels is not None:
            if self.task == "causal_lm":
                prefix = torch.full((batch, n), -100, dtype=labels.dtype, device=labels.device)
                kwargs["labels"] = torch.cat((prefix, labels), dim=1)
            else:
                kwargs["labels"] = labels
        if token_type_ids is not None:
            zeros = torch.zeros(batch, n, device=token_type_ids.device)
            kwargs["token_type_ids"] = torch.cat((zeros, token_type_ids), dim=1).long()
        return self.model(**kwargs)

    def frozen_module(self) -> nn.Module:
        return self.model

    def export_peft(self, directory: str | Path) -> Path:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        cfg = self.model.config
        heads: list[str] | None = [self.head] if self.head else None
        config = PromptTuningConfig(
            task_type="CAUSAL_LM" if self.task == "causal_lm" else "SEQ_CLS",
            num_virtual_tokens=self.settings.num_virtual_tokens,
            token_dim=int(self.prompt.weight.shape[1]),
            num_transformer_submodules=1,
            num_attention_heads=int(cfg.num_attention_heads),
            num_layers=int(cfg.num_hidden_layers),
            base_model_name_or_path=self.base_info.source,
            modules_to_save=heads,
        )
        config.save_pretrained(str(path))
        tensors = {"prompt_embeddings": self.prompt.weight.detach().clone().contiguous()}
        if self.head:
            for name, p in getattr(self.model, self.head).named_parameters():
                tensors[f"base_model.{self.head}.{name}"] = p.detach().clone().contiguous()
        save_file(tensors, str(path / "adapter_model.safetensors"))
        return path


def build_prompt(base_config: ModelConfig, settings: PromptSettings, seed: int = 0) -> AdaptedModel:
    """Build a prompt-tuning model on a fresh copy of the base (the head may become trainable)."""
    return build_on_fresh_base(PromptModel, base_config, settings, seed)


_DEFAULT = PromptSettings()
#: The run-config knobs soft prompts read, defaults from :class:`PromptSettings`.
KNOBS: dict[str, Scalar] = {"prompt-tokens": _DEFAULT.num_virtual_tokens,
                            "prompt-init": _DEFAULT.init}


def parse_knobs(v: Mapping[str, Scalar]) -> PromptSettings:
    """Soft-prompt settings from the typed flat run config."""
    return PromptSettings(num_virtual_tokens=int(v["prompt-tokens"]),
                          init=str(v["prompt-init"]))  # type: ignore[arg-type]  # validated


register_method(MethodEntry("prompt", PromptSettings, build_prompt,
                            "soft prompt tuning with per-example gradients", KNOBS, parse_knobs))
