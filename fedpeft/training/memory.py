"""How many virtual clients one batched pass can hold in memory (issue 16's planner).

Pure arithmetic over the model's shape: a conservative estimate of the bytes a batched
forward/backward keeps alive, per row of the pass and per client of the batch, compared with
a budget (by default half the memory the kernel reports available). When the configured
``batch-clients`` would not fit, :func:`plan_cohort` picks the largest number of clients that
does and says why; batching fewer clients at a time changes the speed, never the result (each
client's training is the same computation in any batch, tests/dp/test_batched.py).

Activation memory per transformer layer follows Korthikanti et al., "Reducing Activation
Recomputation in Large Transformer Models" (MLSys 2023), eq. 1: ``s*h*34 + 5*a*s^2`` bytes at
16 bits per value (sequence ``s``, hidden ``h``, heads ``a``), here generalised to an MLP of
width ``I`` (gated or not) and doubled for float32. A causal LM adds its logits over the
vocabulary (value, log-softmax and gradient). Per-example adapter gradients (the batched path
computes them for every row) and, per client, its adapter, gradient, optimiser state and the
start/result copies are added on top, and :data:`WORKSPACE_MARGIN` on the activations.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from fedpeft.core.errors import ConfigError

FLOAT_BYTES = 4
#: Headroom on eq. 1's activations for what it does not count: autograd's temporaries and the
#: allocator's rounding. Measured peak / eq. 1 reached 1.007 under load on 2 cores (the
#: integration test tests/integration/test_memory_estimate.py), so 1/8 more is planned.
WORKSPACE_MARGIN = 1.125
#: Share of the available memory a batched pass may plan for, unless the caller gives a budget.
DEFAULT_BUDGET_SHARE = 0.5


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a transformer: layers, widths, heads, vocabulary (0 when the
    task has no LM head), and whether the MLP is gated (SwiGLU: Llama, SmolLM2)."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int = 0
    gated: bool = False

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "intermediate"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ModelShape.{name}={getattr(self, name)} must be >= 1")
        if self.vocab < 0:
            raise ConfigError(f"ModelShape.vocab={self.vocab} must be >= 0")


@dataclass(frozen=True)
class PassCost:
    """Estimated bytes of a batched pass: ``per_row * rows + per_client * clients``."""

    per_row: int
    per_client: int

    def bytes(self, rows: int, clients: int) -> int:
        return self.per_row * rows + self.per_client * clients


def activation_bytes_per_row(shape: ModelShape, seq_len: int) -> int:
    """Float32 activations one row keeps for backward through every layer (Korthikanti et
    al. 2023, eq. 1, MLP of width ``intermediate``), plus the LM head's logits."""
    s, h, a, i = seq_len, shape.hidden, shape.heads, shape.intermediate
    attention = 11 * s * h + 5 * a * s * s  # QKV input, Q/K/V, scores, softmax, dropout, out
    norms = 4 * s * h
    mlp = 3 * s * h + (8 if shape.gated else 4) * s * i  # input, mask; I-wide tensors
    per_layer_16bit = attention + norms + mlp
    logits = 3 * s * shape.vocab * FLOAT_BYTES  # logits, log-softmax, their gradient
    return shape.layers * per_layer_16bit * 2 + logits


def pass_cost(shape: ModelShape, seq_len: int, trainable: int, *,
              optimizer_states: int) -> PassCost:
    """The estimate for ``trainable`` adapter values per client and an optimiser keeping
    ``optimizer_states`` tensors of that size (SGD 0, momentum 1, Adam/AdamW 2)."""
    if seq_len < 1 or trainable < 1 or optimizer_states < 0:
        raise ConfigError(f"pass_cost: seq_len={seq_len}, trainable={trainable}, "
                          f"optimizer_states={optimizer_states} must be >= 1, >= 1, >= 0")
    per_example_grads = 2 * trainable * FLOAT_BYTES  # the gradient rows and their clipping
    per_row = math.ceil(activation_bytes_per_row(shape, seq_len) * WORKSPACE_MARGIN) + per_example_grads
    # leaf, gradient, optimiser states, the start and result copies, DP's summed/noised grad
    per_client = (5 + optimizer_states) * trainable * FLOAT_BYTES
    return PassCost(per_row=per_row, per_client=per_client)


@dataclass(frozen=True)
class CohortPlan:
    """How many clients a pass batches, the estimate for it, and why it is fewer than asked
    (``reason`` is empty when the configured number fits)."""

    clients: int
    rows: int
    estimate_bytes: int
    budget_bytes: int
    reason: str = ""


def plan_cohort(cost: PassCost, *, clients: int, rows: int, rows_per_client: int,
                budget_bytes: int) -> CohortPlan:
    """The largest number of clients up to ``clients`` whose pass fits ``budget_bytes``.

    A pass holds at most ``rows`` rows (``batch-rows``) and at most ``rows_per_client`` rows
    of each client (its batch size), so fewer clients also means fewer rows. One client always
    "fits": it is trained one by one, as without batching.
    """
    if clients < 1 or rows < 1 or rows_per_client < 1 or budget_bytes < 1:
        raise ConfigError(f"plan_cohort: clients={clients}, rows={rows}, "
                          f"rows_per_client={rows_per_client}, budget_bytes={budget_bytes} "
                          "must all be >= 1")

    def estimate(k: int) -> int:
        return cost.bytes(min(rows, k * rows_per_client), k)

    if clients == 1 or estimate(clients) <= budget_bytes:
        return CohortPlan(clients, min(rows, clients * rows_per_client), estimate(clients),
                          budget_bytes)
    lo, hi = 1, clients  # largest k with estimate(k) <= budget (estimate grows with k)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(mid) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    k = lo
    gib = 1024 ** 3
    reason = (f"batch-clients={clients} with batch-rows={rows} needs about "
              f"{estimate(clients) / gib:.1f} GiB, more than the {budget_bytes / gib:.1f} GiB "
              f"budget; training {k} client{'s' if k > 1 else ''} at a time"
              + ("" if k > 1 else " (one by one)")
              + " instead (same results, different speed); lower batch-rows to batch more")
    return CohortPlan(k, min(rows, k * rows_per_client), estimate(k), budget_bytes, reason)


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """What the kernel reports available (``MemAvailable``), else the free physical pages."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 * 1024 ** 3  # unknown platform: assume a small laptop's share
