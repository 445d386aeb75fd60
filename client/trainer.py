"""Local training of the adapter (framework-free; the DP variant lives in ``privacy.dp_sgd``).

The loss is a mean over examples of each example's own mean token loss, so every example
contributes a self-contained term: the form that per-example clipping (DP-SGD) expects.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fedpeft.config import TrainConfig
from fedpeft.errors import ClientFault, DataError
from fedpeft.tokenize import Encoded
from peft_methods.base import AdaptedModel


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


def forward_loss(model: nn.Module, batch: Encoded, task: str) -> torch.Tensor:
    """Mean over the batch of the per-example losses."""
    out = model(batch.input_ids, batch.attention_mask, token_type_ids=batch.token_type_ids)
    return per_example_loss(out.logits, batch.labels, task).mean()


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless stream of batches: reshuffle each pass, drop nothing (last batch may be short)."""
    if n == 0:
        raise DataError("cannot train on zero examples")
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield perm[start : start + batch_size]


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
    params = list(model.adapter_parameters().values())
    optimizer = make_optimizer(params, cfg)
    model.train()
    start = time.perf_counter()
    result = TrainResult(steps=0, examples=len(data))
    batches = shuffled_batches(len(data), cfg.batch_size, generator)
    for step in range(cfg.local_steps):
        batch = data.rows(next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss = forward_loss(model, batch, model.task)
        if not math.isfinite(loss.item()):
            raise ClientFault(f"training loss became {loss.item()} at step {step}; lower lr "
                              f"(now {cfg.lr})")
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        result.steps += 1
        result.losses.append(loss.item())
        if progress is not None:
            progress(step + 1, cfg.local_steps, loss.item())
    model.eval()
    result.seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def evaluate(model: AdaptedModel, data: Encoded, batch_size: int = 32) -> dict[str, float]:
    """Held-out metrics: loss and perplexity (causal LM) or loss and accuracy."""
    model.eval()
    total_loss = 0.0
    correct = 0
    for start in range(0, len(data), batch_size):
        batch = data.rows(torch.arange(start, min(start + batch_size, len(data))))
        out = model(batch.input_ids, batch.attention_mask, token_type_ids=batch.token_type_ids)
        losses = per_example_loss(out.logits, batch.labels, model.task)
        total_loss += float(losses.sum())
        if model.task == "classification":
            correct += int((out.logits.argmax(dim=-1) == batch.labels).sum())
    n = len(data)
    metrics = {"loss": total_loss / n}
    if model.task == "classification":
        metrics["accuracy"] = correct / n
    else:
        metrics["perplexity"] = math.exp(min(total_loss / n, 50.0))
    return metrics
