"""Many clients' adapters trained in one forward/backward over one shared frozen base.

The multi-adapter batching of mLoRA/ASPEN (Ye et al. 2023) and Punica/S-LoRA (Chen et al.
2023; Sheng et al. 2023), done with plain autograd and no custom kernel: the rows of every
client's batch go through the frozen base together, and each row uses its own client's adapter
tensors. Every module that owns a trainable tensor (an ``nn.Linear``: LoRA's ``A`` and ``B``,
a classification head; an ``nn.Embedding``: a soft prompt) has its forward swapped, while
:func:`routed` is open, for one that reads *per-row* tensors: ``(N, *shape)`` for ``N`` rows.
Nothing else of the base changes, so a method whose trainable tensors sit in those modules
(LoRA, FFA-LoRA, soft prompt, heads) batches without code of its own; any other owner is a
:class:`BatchingError` naming it.

Each client keeps its own leaf tensors, optimiser, data and sampling. Per-row tensors are
gathered from the clients' leaves (:meth:`Cohort.rows`), so backward sends each row's gradient
to its own client: the loss is a sum over clients of each client's own loss, and no client's
loss depends on another's tensors, so each client's gradient is exactly the gradient it would
have had alone (up to floating-point summation order). Under DP the per-row tensors are made
leaves themselves, and their gradients *are* the per-example gradients (what Opacus'
ExpandedWeights computes), see :mod:`fedpeft.privacy.dp_sgd_batched`.
"""

from __future__ import annotations

import math
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fedpeft.core.errors import ClientFault, ConfigError, DataError
from fedpeft.data.tokenize import Encoded
from fedpeft.peft_methods.base import AdaptedModel
from fedpeft.training.config import TrainConfig
from fedpeft.training.memory import CohortPlan, ModelShape, pass_cost, plan_cohort
from fedpeft.training.trainer import (
    TrainResult,
    length_sorted_chunks,
    make_optimizer,
    per_example_loss,
    shuffled_batches,
)

#: Rows (across all clients of a cohort) per forward/backward pass, unless the caller says.
COHORT_MICRO_BATCH = 64


class BatchingError(ConfigError):
    """These clients cannot be trained in one batch (and will not be, silently, one by one)."""


# -- routing: each row through its own client's adapter tensors -------------------------------
@dataclass(frozen=True)
class Segment:
    """Rows ``start:end`` of a pass belong to ``client`` (rows are grouped by client)."""

    client: int
    start: int
    end: int


@dataclass
class _Capture:
    """A routed layer's input and output gradient in one pass (for per-example gradients)."""

    module: nn.Module
    attrs: Mapping[str, str]
    inputs: torch.Tensor
    grad: torch.Tensor | None = None


@dataclass
class Router:
    """What the swapped forwards read in the current pass: the rows' segments, each client's
    tensors (``tensors[client][name]``), and whether to keep what per-example gradients need."""

    names: tuple[str, ...]
    segments: list[Segment] = field(default_factory=list)
    tensors: Sequence[Mapping[str, torch.Tensor]] = ()
    capture: bool = False
    captured: list[_Capture] = field(default_factory=list)

    def set(self, segments: Sequence[Segment], tensors: Sequence[Mapping[str, torch.Tensor]],
            *, capture: bool = False) -> None:
        if not segments or segments[0].start != 0 or any(
                a.end != b.start for a, b in zip(segments, segments[1:], strict=False)):
            raise BatchingError("segments must cover the pass's rows in order")
        self.segments = list(segments)
        self.tensors = tensors
        self.capture = capture
        self.captured = []

    @property
    def rows(self) -> int:
        return self.segments[-1].end if self.segments else 0

    def check_rows(self, n: int) -> None:
        if n != self.rows:
            raise BatchingError(f"a layer with adapter tensors received {n} rows in a pass of "
                                f"{self.rows}: it does not keep the batch as its first "
                                "dimension, so it cannot be batched across clients; set "
                                "batch-clients = 1 (train clients one by one)")

    def record(self, module: nn.Module, attrs: Mapping[str, str], x: torch.Tensor,
               y: torch.Tensor) -> None:
        if not self.capture:
            return
        if not y.requires_grad:
            raise BatchingError(f"{type(module).__name__} output has no gradient: its adapter "
                                "tensors must require grad for per-example gradients")
        entry = _Capture(module, attrs, x.detach())

        def keep(grad: torch.Tensor) -> None:
            entry.grad = grad.detach()

        y.register_hook(keep)  # type: ignore[no-untyped-call]
        self.captured.append(entry)

    def per_example_grads(self) -> dict[str, torch.Tensor]:
        """After backward: ``name -> (rows, *shape)``, row ``i``'s own gradient of its loss.

        The gradients Opacus' grad samplers compute for ``nn.Linear`` and ``nn.Embedding``
        (``opacus/grad_sample/linear.py``, ``embedding.py``), summed over a layer's calls.
        """
        n = self.rows
        out: dict[str, torch.Tensor] = {}
        for entry in self.captured:
            if entry.grad is None:
                raise BatchingError("a routed layer got no gradient in backward")
            g, x = entry.grad, entry.inputs
            parts: dict[str, torch.Tensor] = {}
            if isinstance(entry.module, nn.Embedding):
                vocab = int(entry.module.num_embeddings)
                flat = (x.reshape(n, -1) + vocab * torch.arange(n, device=x.device)[:, None])
                grad = g.new_zeros(n * vocab, g.shape[-1])
                grad.index_add_(0, flat.reshape(-1), g.reshape(-1, g.shape[-1]))
                parts["weight"] = grad.reshape(n, vocab, g.shape[-1])
            else:
                g3 = g.reshape(n, -1, g.shape[-1])
                if "weight" in entry.attrs:
                    parts["weight"] = torch.einsum("nko,nki->noi", g3,
                                                   x.reshape(n, -1, x.shape[-1]))
                if "bias" in entry.attrs:
                    parts["bias"] = g3.sum(dim=1)
            for attr, grad in parts.items():
                name = entry.attrs[attr]
                out[name] = out[name] + grad if name in out else grad
        return out


def _owners(model: AdaptedModel) -> dict[str, tuple[nn.Module, str]]:
    """Every trainable tensor's name -> (the module that owns it, its attribute name)."""
    owners: dict[str, tuple[nn.Module, str]] = {}
    params = model.adapter_parameters()
    for module_name, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{attr}" if module_name else attr
            if full in params and p is params[full]:
                owners[full] = (module, attr)
    return owners


def check_batchable(model: AdaptedModel) -> dict[str, tuple[nn.Module, str]]:
    """The owners of the trainable tensors, or :class:`BatchingError` naming one that cannot be
    routed per row (only ``nn.Linear`` and plain ``nn.Embedding`` owners can)."""
    owners = _owners(model)
    for name, (module, _attr) in owners.items():
        if type(module) is nn.Linear:
            continue
        if type(module) is nn.Embedding:
            if module.max_norm is not None or module.sparse or module.padding_idx is not None:
                raise BatchingError(f"adapter tensor {name!r} is an embedding with max_norm, "
                                    "padding_idx or sparse gradients, which batched training "
                                    "does not route; set batch-clients = 1 (train clients one "
                                    "by one)")
            continue
        raise BatchingError(f"adapter tensor {name!r} belongs to a {type(module).__name__}, "
                            "which batched training cannot route per row (it routes nn.Linear "
                            "and nn.Embedding); set batch-clients = 1 to train clients one by "
                            "one")
    return owners


@contextmanager
def routed(model: AdaptedModel) -> Iterator[Router]:
    """While open, every module owning a trainable tensor uses, for each segment of rows, its
    client's tensor (:meth:`Router.set` before each pass).

    The shared model is restored on exit (also after an exception): its own adapter tensors
    are never read or changed in between.
    """
    owners = check_batchable(model)
    router = Router(tuple(owners))
    by_module: dict[int, tuple[nn.Module, dict[str, str]]] = {}
    for name, (module, attr) in owners.items():
        by_module.setdefault(id(module), (module, {}))[1][attr] = name
    swapped: list[nn.Module] = []
    try:
        for module, attrs in by_module.values():
            if "forward" in module.__dict__:
                raise BatchingError(f"module {type(module).__name__} already has its forward "
                                    "replaced (a hook library?); cannot route it per row")
            module.forward = types.MethodType(_routed_forward(router, attrs), module)
            swapped.append(module)
        yield router
    finally:
        for module in swapped:
            del module.forward
        router.tensors, router.captured = (), []


def _routed_forward(router: Router, attrs: Mapping[str, str]) -> Callable[..., torch.Tensor]:
    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        router.check_rows(int(x.shape[0]))
        parts = []
        for seg in router.segments:
            own = router.tensors[seg.client]
            rows = x[seg.start:seg.end]
            if isinstance(self, nn.Embedding):
                parts.append(F.embedding(rows, own[attrs["weight"]]))
                continue
            if not isinstance(self, nn.Linear):  # routed() swaps only Linear and Embedding
                raise BatchingError(f"cannot route {type(self).__name__}: set batch-clients = 1")
            weight = own[attrs["weight"]] if "weight" in attrs else self.weight
            bias = own[attrs["bias"]] if "bias" in attrs else self.bias
            parts.append(F.linear(rows, weight, bias))
        y = parts[0] if len(parts) == 1 else torch.cat(parts)
        router.record(self, attrs, x, y)
        return y
    return forward


# -- a cohort: the clients trained together -----------------------------------------------------
def concat_encoded(parts: Sequence[Encoded]) -> tuple[Encoded, list[int]]:
    """One tensor per field for all clients' rows (right-padded to the widest) and offsets.

    The clients' tokenised data then live once, read-only, in one set of tensors; row ``j`` of
    client ``c`` is row ``offsets[c] + j``.
    """
    if not parts:
        raise DataError("a cohort needs at least one client")
    tti = [p.token_type_ids for p in parts]
    if any(t is None for t in tti) and not all(t is None for t in tti):
        raise BatchingError("some clients' data have token type ids and others not; tokenise "
                            "them with the same tokenizer")
    width = max(int(p.input_ids.shape[1]) for p in parts)
    causal = parts[0].labels.dim() == 2
    if any((p.labels.dim() == 2) != causal for p in parts):
        raise BatchingError("clients mix causal-LM and classification labels")

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[1]), value=value)

    ids = torch.cat([pad(p.input_ids, 0) for p in parts])
    mask = torch.cat([pad(p.attention_mask, 0) for p in parts])
    labels = torch.cat([pad(p.labels, -100) if causal else p.labels for p in parts])
    types_ = None if tti[0] is None else torch.cat([pad(t, 0) for t in tti if t is not None])
    offsets, total = [], 0
    for p in parts:
        offsets.append(total)
        total += len(p)
    return Encoded(ids, mask, labels, types_), offsets


class Cohort:
    """Clients' own adapter leaves (their starting states, cloned) and their data, together."""

    def __init__(self, model: AdaptedModel, datas: Sequence[Encoded],
                 starts: Sequence[Mapping[str, torch.Tensor]]) -> None:
        if len(datas) != len(starts):
            raise BatchingError(f"{len(datas)} clients' data but {len(starts)} starting states")
        for c, data in enumerate(datas):
            if len(data) == 0:
                raise DataError(f"client {c} of the cohort has zero examples")
        spec = model.spec()
        self.names = tuple(spec)
        self.leaves: list[dict[str, nn.Parameter]] = []
        for c, start in enumerate(starts):
            if set(start) != set(spec):
                raise BatchingError(f"client {c}'s adapter has tensors "
                                    f"{sorted(set(start) ^ set(spec))[:3]} that differ from "
                                    "the shared model's: batch only clients of one adapter "
                                    "config (group them by method and rank)")
            leaves = {}
            for name in self.names:
                t = start[name]
                if tuple(t.shape) != spec[name].shape or t.dtype != model.adapter_parameters()[name].dtype:
                    raise BatchingError(f"client {c}'s {name!r} is {tuple(t.shape)} {t.dtype}, "
                                        f"the shared model's {spec[name].shape}: batch only "
                                        "clients of one adapter config")
                leaves[name] = nn.Parameter(t.detach().clone())
            self.leaves.append(leaves)
        self.data, self.offsets = concat_encoded(datas)
        self.sizes = [len(d) for d in datas]
        self.lengths = self.data.lengths()

    def __len__(self) -> int:
        return len(self.leaves)

    def states(self) -> list[dict[str, torch.Tensor]]:
        """Each client's adapter tensors now (detached copies)."""
        return [{n: p.detach().clone() for n, p in leaves.items()} for leaves in self.leaves]


@dataclass
class CohortRow:
    """A row of a cohort step: the global row, its client and its weight in the client's loss."""

    row: int
    client: int
    weight: float


def cohort_chunks(rows: Sequence[CohortRow], lengths: Sequence[int],
                  size: int) -> list[list[CohortRow]]:
    """``rows`` in near-equal chunks of at most ``size``, shortest first (less padding), each
    chunk's rows grouped by client (:func:`segments_of`)."""
    row_lengths = [lengths[r.row] for r in rows]
    chunks = length_sorted_chunks(range(len(rows)), row_lengths, size)
    return [sorted((rows[i] for i in chunk), key=lambda r: (r.client, r.row))
            for chunk in chunks]


def segments_of(chunk: Sequence[CohortRow]) -> list[Segment]:
    """The client segments of a chunk whose rows are grouped by client."""
    out: list[Segment] = []
    for i, r in enumerate(chunk):
        if out and out[-1].client == r.client:
            out[-1] = Segment(r.client, out[-1].start, i + 1)
        else:
            if any(s.client == r.client for s in out):
                raise BatchingError("a chunk's rows are not grouped by client")
            out.append(Segment(r.client, i, i + 1))
    return out


@dataclass
class CohortResult:
    """What each client of a batched run produced: its result, its final state, or its error."""

    results: list[TrainResult | None]
    states: list[dict[str, torch.Tensor] | None]
    errors: list[Exception | None]
    seconds: float = 0.0
    passes: int = 0


def cohort_result(cohort: Cohort, results: list[TrainResult | None],
                  errors: list[Exception | None], *, start: float, passes: int) -> CohortResult:
    """The cohort's outcome after training began at ``start`` (``perf_counter``): each
    client's final state, none for a stopped client; the time shared out evenly."""
    seconds = time.perf_counter() - start
    states: list[dict[str, torch.Tensor] | None] = list(cohort.states())
    for c, result in enumerate(results):
        if result is None:
            states[c] = None
        else:
            result.seconds = seconds / len(cohort)
    return CohortResult(results, states, errors, seconds=seconds, passes=passes)


def forward_rows(model: AdaptedModel, router: Router, data: Encoded, chunk: Sequence[CohortRow],
                 tensors: Sequence[Mapping[str, torch.Tensor]], *,
                 capture: bool = False) -> torch.Tensor:
    """Per-example losses of ``data`` (the rows of ``chunk``), each row through its own
    client's adapter tensors ``tensors[client]``."""
    router.set(segments_of(chunk), tensors, capture=capture)
    out = model(data.input_ids, data.attention_mask, token_type_ids=data.token_type_ids)
    return per_example_loss(out.logits, data.labels, model.task)


def batched_local_train(
    model: AdaptedModel,
    datas: Sequence[Encoded],
    starts: Sequence[Mapping[str, torch.Tensor]],
    cfg: TrainConfig,
    *,
    generators: Sequence[torch.Generator],
    micro_batch: int = COHORT_MICRO_BATCH,
) -> CohortResult:
    """Plain local training of several clients at once, each exactly as
    :func:`fedpeft.training.trainer.local_train` would train it alone.

    Client ``c`` starts from ``starts[c]``, samples its batches with ``generators[c]`` (the same
    draws as alone) and steps its own optimiser. A client whose loss becomes non-finite is
    stopped and gets a :class:`fedpeft.core.errors.ClientFault` in ``errors``; the others go on.
    """
    if len(generators) != len(datas):
        raise BatchingError(f"{len(datas)} clients but {len(generators)} generators")
    if micro_batch < 1:
        raise ConfigError(f"micro_batch={micro_batch} must be >= 1")
    cohort = Cohort(model, datas, starts)
    k = len(cohort)
    optimizers = [make_optimizer(leaves, cfg) for leaves in cohort.leaves]
    streams = [shuffled_batches(n, cfg.batch_size, g) for n, g in
               zip(cohort.sizes, generators, strict=True)]
    results: list[TrainResult | None] = [TrainResult(steps=0, examples=n) for n in cohort.sizes]
    errors: list[Exception | None] = [None] * k
    start = time.perf_counter()
    passes = 0
    model.train()
    try:
        with routed(model) as router:
            for step in range(cfg.local_steps):
                rows: list[CohortRow] = []
                for c in range(k):
                    index = next(streams[c])  # drawn even for a stopped client: same streams
                    if errors[c] is None:
                        rows += [CohortRow(cohort.offsets[c] + int(i), c, 1.0 / len(index))
                                 for i in index]
                if not rows:
                    break
                totals = torch.zeros(k, dtype=torch.float64)
                for chunk in cohort_chunks(rows, cohort.lengths, micro_batch):
                    batch = cohort.data.rows(torch.tensor([r.row for r in chunk]))
                    owners = torch.tensor([r.client for r in chunk])
                    weights = torch.tensor([r.weight for r in chunk])
                    losses = forward_rows(model, router, batch, chunk, cohort.leaves)
                    weighted = losses * weights
                    weighted.sum().backward()  # type: ignore[no-untyped-call]
                    totals.index_add_(0, owners, weighted.detach().double())
                    passes += 1
                for c in range(k):
                    if errors[c] is not None:
                        continue
                    total = float(totals[c])
                    result = results[c]
                    if result is None:  # a failed client has an error and was skipped above
                        raise BatchingError(f"client {c} of the cohort has no result "
                                            "(an internal error: report it)")
                    if not math.isfinite(total):
                        errors[c] = ClientFault(f"training loss became {total} at step {step}; "
                                                f"lower lr (now {cfg.lr})")
                        results[c] = None
                        continue
                    optimizers[c].step()
                    result.steps += 1
                    result.losses.append(total)
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
    finally:
        model.eval()
    return cohort_result(cohort, results, errors, start=start, passes=passes)


def model_shape(model: AdaptedModel) -> ModelShape:
    """The base's shape for the memory estimate (:mod:`fedpeft.training.memory`)."""
    hf = model.base_info.model.config
    hidden = int(getattr(hf, "hidden_size", 0) or 0)
    return ModelShape(
        layers=int(getattr(hf, "num_hidden_layers", 1) or 1),
        hidden=max(hidden, 1),
        heads=int(getattr(hf, "num_attention_heads", 1) or 1),
        intermediate=int(getattr(hf, "intermediate_size", 4 * max(hidden, 1)) or 1),
        vocab=int(getattr(hf, "vocab_size", 0) or 0) if model.task == "causal_lm" else 0,
        gated=str(getattr(hf, "hidden_act", "")) in ("silu", "swiglu"),
    )


def cohort_plan(model: AdaptedModel, datas: Sequence[Encoded], cfg: TrainConfig, *,
                clients: int, rows: int, budget_bytes: int) -> CohortPlan:
    """How many of ``clients`` clients (whose data look like ``datas``) one batched pass of
    ``model`` can hold within ``budget_bytes`` (:func:`fedpeft.training.memory.plan_cohort`)."""
    seq_len = max((int(d.input_ids.shape[1]) for d in datas), default=1)
    trainable = sum(p.numel() for p in model.adapter_parameters().values())
    states = 2 if cfg.optimizer == "adamw" else (1 if cfg.momentum > 0 else 0)
    cost = pass_cost(model_shape(model), max(seq_len, 1), max(trainable, 1),
                     optimizer_states=states)
    return plan_cohort(cost, clients=clients, rows=rows, rows_per_client=cfg.batch_size,
                       budget_bytes=budget_bytes)
