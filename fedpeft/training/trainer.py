"""Local training of the adapter (framework-free; the DP variant lives in ``fedpeft.privacy.dp_sgd``).

The loss is a mean over examples of each example's own mean token loss, so every example
contributes a self-contained term: the form that per-example clipping (DP-SGD) expects.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedpeft.core.errors import ClientFault, DataError
from fedpeft.data.tokenize import Encoded
from fedpeft.peft_methods.base import CLASSIFIER_HEADS, AdaptedModel
from fedpeft.training.config import TrainConfig


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Loss of each example: mean next-token cross-entropy (causal LM) or cross-entropy."""
    if task == "classification":
        return F.cross_entropy(logits.float(), labels, reduction="none")
    # Causal LM: predict token t+1 from prefix <= t; the model saw any prompt tokens first,
    # so align the label sequence with the last len(labels) logits.
    logits = logits[:, -labels.shape[1]:, :]
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    tok = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100,
                          reduction="none")
    counts = (shift_labels != -100).sum(dim=1).clamp(min=1)
    return tok.sum(dim=1) / counts


def round_lr_scale(server_round: int, num_rounds: int, final_fraction: float) -> float:
    """Learning-rate factor of a round: cosine decay from 1 (round 1) to ``final_fraction``.

    Cosine annealing without restarts (Loshchilov & Hutter, ICLR 2017) stepped once per round;
    rounds after ``num_rounds`` (a resumed, extended run) keep ``final_fraction``. Under DP the
    decay is post-processing of noised gradients: it changes no privacy guarantee, only how far
    the last rounds' noise moves the adapter.
    """
    if server_round < 1 or num_rounds < 1:
        raise ValueError(f"server_round={server_round} and num_rounds={num_rounds} must be >= 1")
    if not 0 < final_fraction <= 1:
        raise ValueError(f"final_fraction={final_fraction} must be in (0, 1]")
    if num_rounds == 1 or final_fraction == 1:
        return 1.0
    progress = min(server_round - 1, num_rounds - 1) / (num_rounds - 1)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def for_round(cfg: TrainConfig, server_round: int, num_rounds: int) -> TrainConfig:
    """``cfg`` with lr and head-lr scaled by :func:`round_lr_scale` for ``server_round``."""
    scale = round_lr_scale(server_round, num_rounds, cfg.lr_final_fraction)
    if scale == 1.0:
        return cfg
    return replace(cfg, lr=cfg.lr * scale, head_lr=cfg.head_lr * scale)


def is_head_parameter(name: str) -> bool:
    """Whether an adapter tensor belongs to the classification head (``classifier``/``score``)."""
    return any(part in CLASSIFIER_HEADS for part in name.split("."))


def make_optimizer(named: Mapping[str, nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The local optimiser; the classification head gets ``cfg.head_lr`` when that is set."""
    head = [p for n, p in named.items() if is_head_parameter(n)]
    rest = [p for n, p in named.items() if not is_head_parameter(n)]
    groups: list[dict[str, Any]] = [{"params": rest, "lr": cfg.lr}] if rest else []
    if head:
        groups.append({"params": head, "lr": cfg.head_lr or cfg.lr})
    return _OPTIMIZER_BUILDERS[cfg.optimizer](groups, cfg)


#: How each name of :data:`fedpeft.training.config.OPTIMIZERS` is built (DP-SGD wraps these;
#: tests/unit/test_layout.py checks the two agree).
_OPTIMIZER_BUILDERS: dict[str, Callable[[list[dict[str, Any]], TrainConfig], torch.optim.Optimizer]] = {
    "adamw": lambda groups, cfg: torch.optim.AdamW(groups, lr=cfg.lr,
                                                   weight_decay=cfg.weight_decay),
    "sgd": lambda groups, cfg: torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                               weight_decay=cfg.weight_decay),
}


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless stream of batches: reshuffle each pass, drop nothing (last batch may be short)."""
    if n == 0:
        raise DataError("cannot train on zero examples")
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield perm[start : start + batch_size]


#: Rows per forward/backward pass inside one (logical) batch.
MICRO_BATCH = 16


def length_sorted_chunks(indices: Sequence[int], lengths: Sequence[int],
                         size: int | None) -> list[list[int]]:
    """Split a batch into near-equal chunks of at most ``size`` rows, shortest rows first.

    Each chunk is then cut to its own longest row (:meth:`Encoded.rows`), so a batch of short
    sentences with one long one pays for the long one once. The chunks partition the batch,
    so any sum over examples is unchanged (``size=None``: one chunk).
    """
    idx = sorted(indices, key=lambda i: (lengths[i], i))
    if not idx or size is None or len(idx) <= size:
        return [idx]
    parts = math.ceil(len(idx) / size)
    step, extra = divmod(len(idx), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + step + (1 if i < extra else 0)
        out.append(idx[start:end])
        start = end
    return out


@dataclass
class TrainResult:
    steps: int
    examples: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


Progress = Callable[[int, int, float], None]


def local_train(
    model: AdaptedModel,
    data: Encoded,
    cfg: TrainConfig,
    *,
    generator: torch.Generator,
    progress: Progress | None = None,
) -> TrainResult:
    """Plain (non-private) local training for ``cfg.local_steps`` steps."""
    optimizer = make_optimizer(model.adapter_parameters(), cfg)
    model.train()
    start = time.perf_counter()
    result = TrainResult(steps=0, examples=len(data))
    batches = shuffled_batches(len(data), cfg.batch_size, generator)
    lengths = data.lengths()
    for step in range(cfg.local_steps):
        index = next(batches)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        # The batch mean is accumulated over length-sorted micro-batches: the same gradient,
        # far less padding on short-sentence data, bounded memory on large batches.
        for chunk in length_sorted_chunks(index.tolist(), lengths, MICRO_BATCH):
            batch = data.rows(torch.tensor(chunk, dtype=torch.long))
            out = model(batch.input_ids, batch.attention_mask,
                        token_type_ids=batch.token_type_ids)
            part = per_example_loss(out.logits, batch.labels, model.task).sum() / len(index)
            part.backward()  # type: ignore[no-untyped-call]
            total += float(part.detach())
        if not math.isfinite(total):
            raise ClientFault(f"training loss became {total} at step {step}; lower lr "
                              f"(now {cfg.lr})")
        optimizer.step()
        result.steps += 1
        result.losses.append(total)
        if progress is not None:
            progress(step + 1, cfg.local_steps, total)
    model.eval()
    result.seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def _outputs(model: AdaptedModel, data: Encoded,
             batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(row indices, logits, labels) of ``data`` in length-sorted batches (less padding)."""
    model.eval()
    order = torch.argsort(torch.tensor(data.lengths()), stable=True)
    for start in range(0, len(data), batch_size):
        idx = order[start : start + batch_size]
        batch = data.rows(idx)
        out = model(batch.input_ids, batch.attention_mask, token_type_ids=batch.token_type_ids)
        yield idx, out.logits, batch.labels


def evaluate(model: AdaptedModel, data: Encoded, batch_size: int = 32) -> dict[str, float]:
    """Held-out metrics: loss and perplexity (causal LM) or loss and accuracy."""
    total_loss = 0.0
    correct = 0
    for _, logits, labels in _outputs(model, data, batch_size):
        total_loss += float(per_example_loss(logits, labels, model.task).sum())
        if model.task == "classification":
            correct += int((logits.argmax(dim=-1) == labels).sum())
    n = len(data)
    metrics = {"loss": total_loss / n}
    if model.task == "classification":
        metrics["accuracy"] = correct / n
    else:
        metrics["perplexity"] = math.exp(min(total_loss / n, 50.0))
    return metrics


@torch.no_grad()
def example_losses(model: AdaptedModel, data: Encoded, batch_size: int = 32) -> torch.Tensor:
    """Each example's loss under ``model`` (in ``data``'s order): the cross-entropy of its label
    (classification) or its mean token negative log-likelihood (causal LM)."""
    out = torch.empty(len(data), dtype=torch.float64)
    for idx, logits, labels in _outputs(model, data, batch_size):
        out[idx] = per_example_loss(logits, labels, model.task).double()
    return out
