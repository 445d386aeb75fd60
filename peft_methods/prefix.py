"""Prefix tuning (Li and Liang, ACL 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation") through Hugging Face ``peft``.

Every attention layer attends to ``num_virtual_tokens`` trained key and value vectors before the
real tokens. PEFT keeps them in one ``nn.Embedding`` (``PrefixEncoder``, no reparameterisation
MLP) and, in training mode, looks them up with indices expanded over the batch, so each example
has its own activation and Opacus computes true per-example gradients (the path our soft prompt
had to add, since PEFT broadcasts a soft prompt; checked here against batches of one in every
engine). The export is PEFT's format, loaded with ``PeftModel.from_pretrained``.

A decoder method: the prefix enters through the model's key/value cache, which the project's
classification models (a mean-pooling head over BERT) do not take; on them the method is a
:class:`ModelError`.

``init="vocab"`` starts from the keys and values the frozen model computes for random
vocabulary tokens (Li and Liang: initialising with real words' activations beats random
initialisation, most of all with little data); ``init="random"`` keeps PEFT's normal init.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from torch import nn

from fedpeft.core.errors import ConfigError, ModelError
from fedpeft.core.models import BaseModel, ModelConfig
from fedpeft.core.protocol import Scalar
from fedpeft.peft_methods.base import (
    AdaptedModel,
    MethodEntry,
    PeftAdaptedModel,
    build_on_fresh_base,
    register_method,
)

INITS = ("vocab", "random")
#: Most virtual tokens accepted (a bound for the settings).
MAX_TOKENS = 512


@dataclass(frozen=True)
class PrefixSettings:
    """Prefix tuning settings: the prefix length and how it starts."""

    num_virtual_tokens: int = 16
    init: str = "vocab"

    def __post_init__(self) -> None:
        if not 1 <= self.num_virtual_tokens <= MAX_TOKENS:
            raise ConfigError(f"prefix-tokens={self.num_virtual_tokens}: the prefix length must "
                              f"be in [1, {MAX_TOKENS}]")
        if self.init not in INITS:
            raise ConfigError(f"prefix-init={self.init!r}: choose one of {list(INITS)}")


def _encoder(peft_model: PeftModel) -> nn.Embedding:
    encoder = peft_model.prompt_encoder[peft_model.active_adapter]
    embedding = getattr(encoder, "embedding", None)
    if not isinstance(embedding, nn.Embedding) or getattr(encoder, "prefix_projection", False):
        raise ModelError("PEFT's prefix encoder is not a plain nn.Embedding; per-example "
                         "gradients would not be exact")
    return embedding


def _vocab_init(base: BaseModel, config: PrefixTuningConfig, ids: torch.Tensor) -> torch.Tensor:
    """The prefix weight that reproduces the frozen model's own keys and values for the
    tokens ``ids`` (``(1, tokens)``), in PEFT's layout ``(tokens, layers * 2 * kv heads *
    head dim)``."""
    model = base.model
    was_training = model.training
    model.train(False)
    try:
        with torch.no_grad():
            cache = model(input_ids=ids, use_cache=True).past_key_values
    finally:
        model.train(was_training)
    layers = getattr(cache, "layers", None)
    if layers is None or len(layers) != config.num_layers:
        raise ModelError(f"{base.config.name!r} returned no per-layer key/value cache for the "
                         "prefix init; use prefix-init = random")
    parts = []
    for layer in layers:
        for t in (layer.keys, layer.values):  # (1, kv heads, tokens, head dim)
            parts.append(t[0].permute(1, 0, 2))  # (tokens, kv heads, head dim)
    # PEFT views the weight as (tokens, layers * 2, heads, head dim): keys of layer l at 2l,
    # values at 2l + 1
    return torch.stack(parts, dim=1).reshape(config.num_virtual_tokens, -1)


class PrefixModel(PeftAdaptedModel):
    """A causal LM with trained prefix keys and values in every attention layer (PEFT)."""

    method: ClassVar[str] = "prefix"

    def __init__(self, base: BaseModel, settings: PrefixSettings) -> None:
        super().__init__(base)
        self.settings = settings
        if base.config.task != "causal_lm":
            raise ModelError(
                f"prefix tuning needs a causal language model (a decoder whose attention "
                f"takes a key/value cache); {base.config.name!r} is set up for "
                f"{base.config.task!r} ({type(base.model).__name__}). Use prompt, lora, ia3, "
                "bitfit or bottleneck for classification")
        config = PrefixTuningConfig(task_type="CAUSAL_LM",
                                    num_virtual_tokens=settings.num_virtual_tokens,
                                    base_model_name_or_path=base.source)
        #: the random vocabulary tokens whose keys and values start the prefix (``vocab``)
        self.init_token_ids: torch.Tensor | None = None
        initial = None
        if settings.init == "vocab":
            embeddings = base.model.get_input_embeddings()
            if not isinstance(embeddings, nn.Embedding):
                raise ModelError(f"{base.config.name!r} has no nn.Embedding input embeddings "
                                 "for the prefix init; use prefix-init = random")
            vocab = int(embeddings.num_embeddings)
            self.init_token_ids = torch.randint(0, vocab, (1, settings.num_virtual_tokens))
            initial = _vocab_init(base, config_for(base, config), self.init_token_ids)
        self.peft_model: PeftModel = get_peft_model(base.model, config)
        embedding = _encoder(self.peft_model)
        if initial is not None:
            with torch.no_grad():
                embedding.weight.copy_(initial.to(embedding.weight.dtype))


def config_for(base: BaseModel, config: PrefixTuningConfig) -> PrefixTuningConfig:
    """``config`` with the layer and head counts PEFT fills in from the model (the layout of
    the prefix weight), without building a PEFT model."""
    cfg = base.model.config
    heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=config.num_virtual_tokens,
                              num_layers=int(cfg.num_hidden_layers), num_attention_heads=heads,
                              token_dim=heads * head_dim)


def build_prefix(base_config: ModelConfig, settings: PrefixSettings, seed: int = 0) -> AdaptedModel:
    """Build a prefix-tuned model on a fresh copy of the base (PEFT wraps the model)."""
    return build_on_fresh_base(PrefixModel, base_config, settings, seed)


_DEFAULT = PrefixSettings()
#: The run-config knobs prefix tuning reads.
KNOBS: dict[str, Scalar] = {"prefix-tokens": _DEFAULT.num_virtual_tokens,
                            "prefix-init": _DEFAULT.init}


def parse_knobs(v: Mapping[str, Scalar]) -> PrefixSettings:
    """Prefix tuning settings from the typed flat run config."""
    return PrefixSettings(num_virtual_tokens=int(v["prefix-tokens"]), init=str(v["prefix-init"]))


register_method(MethodEntry("prefix", PrefixSettings, build_prefix,
                            "prefix tuning (decoders) via Hugging Face peft", KNOBS, parse_knobs))
