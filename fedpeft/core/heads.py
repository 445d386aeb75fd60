"""A mean-pooling classification head for sentence encoders.

Sentence encoders such as all-MiniLM-L6-v2 were trained (Reimers & Gurevych, EMNLP 2019) to
represent a sentence by the attention-masked *mean* of their last hidden states; their ``[CLS]``
token and BERT pooler were never trained for that. ``AutoModelForSequenceClassification`` puts
its head on the pooler, which leaves a DP-trained head with a poor starting feature.

:class:`MeanPoolingClassifier` puts a linear head on the masked mean instead, optionally
L2-normalised as in the sentence-transformers pipeline (``pooling="mean-norm"``): a bounded
feature bounds the head's per-example gradient, which suits DP-SGD's clipping.

The class is a :class:`~transformers.PreTrainedModel` so that ``peft`` treats it like any
sequence-classification model (its head ``classifier`` is trained and saved with the adapter).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from fedpeft.core.errors import ModelError


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, H) over the positions where ``attention_mask`` (B, T) is 1."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class MeanPoolingClassifier(PreTrainedModel):  # type: ignore[no-untyped-call]
    """An encoder, the masked mean of its last hidden states, dropout, a linear head."""

    base_model_prefix = "encoder"

    def __init__(self, config: PretrainedConfig, encoder: PreTrainedModel | None = None,
                 normalize: bool = False) -> None:
        super().__init__(config)
        self.normalize = normalize
        self.encoder = (encoder if encoder is not None
                        else AutoModel.from_config(config))  # type: ignore[no-untyped-call]
        hidden = getattr(config, "hidden_size", None)
        if not isinstance(hidden, int):
            raise ModelError(f"model type {config.model_type!r} has no integer hidden_size; "
                             "use pooling='model' (the architecture's own head)")
        self.num_labels = int(config.num_labels or 2)
        self.dropout = nn.Dropout(float(getattr(config, "hidden_dropout_prob", 0.1) or 0.0))
        self.classifier = nn.Linear(hidden, self.num_labels)
        nn.init.normal_(self.classifier.weight, std=float(getattr(config, "initializer_range",
                                                                  0.02)))
        nn.init.zeros_(self.classifier.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        kw: dict[str, Any] = {"attention_mask": attention_mask}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        if inputs_embeds is not None:
            kw["inputs_embeds"] = inputs_embeds
        else:
            kw["input_ids"] = input_ids
        hidden = self.encoder(**kw).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        elif attention_mask.shape[1] != hidden.shape[1]:
            # Virtual tokens (prompt tuning) were prepended: they count as attended positions.
            extra = hidden.shape[1] - attention_mask.shape[1]
            attention_mask = torch.cat([attention_mask.new_ones((hidden.shape[0], extra)),
                                        attention_mask], dim=1)
        pooled = masked_mean(hidden, attention_mask)
        if self.normalize:  # the sentence-transformers pipeline's final Normalize layer
            pooled = nn.functional.normalize(pooled, dim=-1)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
