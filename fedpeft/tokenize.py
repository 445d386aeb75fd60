"""Turn a corpus into fixed-length tensors (fixed length keeps DP-SGD memory predictable)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from fedpeft.data.examples import Corpus
from fedpeft.errors import DataError


@dataclass(frozen=True)
class Encoded:
    """Tensors of one corpus: ``input_ids``, ``attention_mask``, ``labels`` (N rows each)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    token_type_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, index: torch.Tensor) -> Encoded:
        return Encoded(self.input_ids[index], self.attention_mask[index], self.labels[index],
                       None if self.token_type_ids is None else self.token_type_ids[index])


def encode(corpus: Corpus, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded:
    """Tokenise, pad right and truncate to ``max_length``.

    Causal LM: labels are the input ids with padding set to -100 (the model shifts them).
    Classification: labels are the class ids.
    """
    if len(corpus) == 0:
        raise DataError(f"corpus {corpus.name!r} has zero examples; a client needs at least one")
    batch = tokenizer(list(corpus.texts), padding="max_length", truncation=True,
                      max_length=max_length, return_tensors="pt")
    ids = batch["input_ids"]
    mask = batch["attention_mask"]
    if corpus.task == "causal_lm":
        labels = ids.masked_fill(mask == 0, -100)
    else:
        labels = torch.tensor(corpus.labels, dtype=torch.long)
    tti = batch.get("token_type_ids")
    return Encoded(ids, mask, labels, tti)
