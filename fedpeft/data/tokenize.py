"""Turn a corpus into right-padded tensors of at most ``max_length`` tokens.

Batches are cut to their longest row (:meth:`Encoded.rows`), so memory is bounded by
``max_length`` and short-sentence batches compute on fewer positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from fedpeft.core.errors import DataError
from fedpeft.data.examples import Corpus


@dataclass(frozen=True)
class Encoded:
    """Tensors of one corpus: ``input_ids``, ``attention_mask``, ``labels`` (N rows each)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    token_type_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def lengths(self) -> list[int]:
        """Number of real (non-padding) tokens of each row."""
        return [int(x) for x in self.attention_mask.sum(dim=1).tolist()]

    def rows(self, index: torch.Tensor) -> Encoded:
        """The rows ``index``, cut to the longest sequence among them.

        Padding is on the right, so the dropped columns are padding in every selected row
        (attention mask 0, causal-LM label -100): the result is the same computation on fewer
        positions.
        """
        mask = self.attention_mask[index]
        labels = self.labels[index]
        width = max(int(mask.sum(dim=1).max()) if len(mask) else 1, 1)
        if labels.dim() == 2:  # causal LM: never drop a column that still carries a label
            if len(labels):
                width = max(width, int((labels != -100).sum(dim=1).max()))
            labels = labels[:, :width]
        tti = None if self.token_type_ids is None else self.token_type_ids[index][:, :width]
        return Encoded(self.input_ids[index][:, :width], mask[:, :width], labels, tti)


def encode(corpus: Corpus, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded:
    """Tokenise, pad right and truncate to ``max_length``.

    Causal LM: labels are the input ids with padding set to -100 (the model shifts them).
    Classification: labels are the class ids.
    """
    if len(corpus) == 0:
        raise DataError(f"corpus {corpus.name!r} has zero examples; a client needs at least one")
    batch = tokenizer(list(corpus.texts), padding="max_length", padding_side="right", truncation=True,
                      max_length=max_length, return_tensors="pt")
    ids = batch["input_ids"]
    mask = batch["attention_mask"]
    if corpus.task == "causal_lm":
        labels = ids.masked_fill(mask == 0, -100)
    else:
        labels = torch.tensor(corpus.labels, dtype=torch.long)
    tti = batch.get("token_type_ids")
    return Encoded(ids, mask, labels, tti)


def count_too_long(corpus: Corpus, tokenizer: PreTrainedTokenizerBase, max_length: int) -> int:
    """Rows of ``corpus`` with more than ``max_length`` tokens (``encode`` truncates them)."""
    ids = tokenizer(list(corpus.texts), truncation=False)["input_ids"]
    return sum(len(row) > max_length for row in ids)
