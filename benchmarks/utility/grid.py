"""The cells of the utility sweep (pure: no I/O, no training).

A cell is one federated (or centralised) run: a preset, run-config overrides, a client count and
a seed. :func:`grid` lists every cell of a sweep size; the runner executes them and the table
groups them by ``group`` and ``label`` (seeds are averaged).

Sizes
-----
``smoke``
    CI: both models cut to 2 layers, a few hundred examples, 2 rounds. Checks the harness end to
    end; its numbers mean nothing.
``small``
    What ``docs/results.md`` reports, sized for a 2-core machine (see ``SIZES``).
``full``
    The whole SST-2 training file (60,614 sentences over 10 clients) and more rounds: hours on
    two cores, minutes on a workstation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from fedpeft.core.errors import ConfigError
from fedpeft.core.protocol import Scalar
from fedpeft.peft_methods.registry import METHODS
from fedpeft.runconfig.config import DEFAULTS, unused_server_knobs
from fedpeft.runconfig.presets import get_preset
from fedpeft.secagg.config import colluders

#: The published anchors quoted beside our numbers (accuracy in %, SST-2 GLUE dev set).
ANCHORS: tuple[dict[str, str], ...] = (
    {"source": "Yu et al., ICLR 2022 (DP-LoRA, RoBERTa-base, centralised)",
     "private": "92.2 at epsilon 6.7", "non_private": "about 94.8"},
    {"source": "Sun et al., ICLR 2024 (FFA-LoRA, RoBERTa-large, 9 clients)",
     "private": "92.3 at epsilon 8", "non_private": "-"},
)


@dataclass(frozen=True)
class Size:
    """How big each SST-2 / chitchat cell is."""

    name: str
    sst2_clients: int
    sst2_examples_per_client: int
    sst2_rounds: int
    sst2_local_steps: int
    sst2_batch: int
    sst2_eval: int
    chat_clients: int
    chat_examples_per_client: int
    chat_rounds: int
    chat_local_steps: int
    chat_batch: int
    chat_eval: int
    seeds: int
    layers: int = 0  # 0 = the whole model
    main_only: bool = False  # skip the technique comparisons (CI)
    epsilons: tuple[float | None, ...] = (8.0, None, 3.0, 1.0)  # None = no DP
    alphas: tuple[float, ...] = (0.5, 100.0)
    secagg_max_abort: float = 0.01  # 3, 4 and 6 clients cannot reach 1% at 10% dropout
    #: rows repeated for seeds 1.. (the spread); None = every row of the SST-2 and chat tables
    spread_rows: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for k, v in self.__dict__.items():
            if isinstance(v, int) and not isinstance(v, bool) and k != "layers" and v < 1:
                raise ConfigError(f"size {self.name!r}: {k}={v} must be >= 1")
        if self.sst2_clients < 3 or self.chat_clients < 3:
            raise ConfigError(f"size {self.name!r}: secure aggregation needs >= 3 clients")


SIZES: dict[str, Size] = {
    "smoke": Size("smoke", sst2_clients=3, sst2_examples_per_client=64, sst2_rounds=2,
                  sst2_local_steps=2, sst2_batch=16, sst2_eval=64, chat_clients=3,
                  chat_examples_per_client=8, chat_rounds=1, chat_local_steps=1, chat_batch=4,
                  chat_eval=8, seeds=1, layers=2, main_only=True, epsilons=(8.0, None),
                  alphas=(0.5,), secagg_max_abort=0.05),
    "small": Size("small", sst2_clients=10, sst2_examples_per_client=6100, sst2_rounds=10,
                  sst2_local_steps=6, sst2_batch=48, sst2_eval=1500, chat_clients=7,
                  chat_examples_per_client=32, chat_rounds=3, chat_local_steps=4,
                  chat_batch=8, chat_eval=128, seeds=3,
                  spread_rows=("alpha 0.5, epsilon 8", "alpha 0.5, no DP",
                               "alpha 100, epsilon 8", "alpha 100, no DP", "LoRA, epsilon 8",
                               "LoRA, no DP", "soft prompt, epsilon 8", "soft prompt, no DP",
                               "alpha 0.5, full sentences, epsilon 8",
                               "alpha 0.5, full sentences, no DP")),
    "full": Size("full", sst2_clients=10, sst2_examples_per_client=6100, sst2_rounds=20,
                 sst2_local_steps=10, sst2_batch=256, sst2_eval=6735, chat_clients=20,
                 chat_examples_per_client=64, chat_rounds=5, chat_local_steps=8, chat_batch=8,
                 chat_eval=256, seeds=3),
}

#: DP-SGD with momentum, the best optimiser row of the technique table.
_SGDM: dict[str, Scalar] = {"optimizer": "sgd", "momentum": 0.9, "lr": 0.5, "head-lr": 5.0}
#: The settings of every private SST-2 cell of the main table: FFA-LoRA trained by DP-SGD with
#: momentum (the technique table's winner), server momentum 0.5 (FedAvgM: the limits table
#: and docs/results.md) and a SecAgg clip of 16, above every coordinate of these updates (at
#: 1, the head's updates were clamped); the sst2-lora preset uses the same values.
SST2_DP: dict[str, Scalar] = {"dp-clip": 1.0, "method": "ffa-lora", **_SGDM,
                               "pooling": "mean-norm", "aggregation": "fedavgm",
                               "server-momentum": 0.5, "secagg-clip": 16.0}
#: The non-private cells' settings: plain LoRA with AdamW and the same server momentum, the
#: best non-private configuration found, so the gap is measured against the stronger reference.
SST2_NODP: dict[str, Scalar] = {"dp-clip": 1.0, "method": "lora", "lr": 0.002,
                                 "head-lr": 0.05, "optimizer": "adamw", "momentum": 0.0,
                                 "pooling": "mean-norm", "aggregation": "fedavgm",
                                 "server-momentum": 0.5}


#: Run-config keys added after results were stored, with the value that reproduces the runs
#: made before them: a resolved config holding exactly that value hashes as if the key did not
#: exist, so adding a behaviour-preserving knob does not retire every stored cell.
NEUTRAL_LATER_KEYS: dict[str, Scalar] = {"lr-final-fraction": 1.0, "ia3-targets": "",
                                         "ia3-feedforward": "", "bitfit-modules": "",
                                         "bottleneck-placement": "serial",
                                         "bottleneck-size": 8,
                                         "bottleneck-activation": "relu",
                                         "bottleneck-scaling": 1.0, "bottleneck-targets": "",
                                         "secagg-ca": "", "secagg-sim-identities": "",
                                         "prefix-tokens": 16, "prefix-init": "vocab",
                                         # one client at a time, no canaries, record level
                                         # only: the runs before these knobs existed
                                         "batch-clients": 1, "batch-rows": 64,
                                         "audit-canaries": 0, "audit-gradient-canaries": 0,
                                         "audit-user-canaries": 0, "dp-level": "record",
                                         "eval-subset": "all",
                                         # a file's own layout (issue 21): the sweep reads
                                         # the built-in data sets, which ignore them
                                         "data-format": "auto", "data-text-column": "",
                                         "data-label-column": "", "data-user-column": "",
                                         "data-label-names": "", "data-header": "auto",
                                         "data-min-user-examples": 1, "eval-format": "",
                                         "eval-text-column": "", "eval-label-column": "",
                                         "eval-header": ""}
#: Keys that existed (and were hashed) when later cells were stored (the methods cells of
#: 2026-12-03): those cells are found under the key computed without these as neutral.
_HASHED_IN_LATER_CELLS = ("batch-clients", "batch-rows", "audit-canaries",
                          "audit-gradient-canaries", "audit-user-canaries", "dp-level")


@dataclass(frozen=True)
class Cell:
    """One run of the sweep."""

    group: str  # table: "sst2-main", "sst2-technique", "chat"
    label: str  # row label within the group
    preset: str
    clients: int
    seed: int
    overrides: dict[str, Scalar] = field(default_factory=dict)
    epsilon: float | None = None  # target; None = no DP

    @property
    def key(self) -> str:
        return self._key(NEUTRAL_LATER_KEYS, drop_user_knobs=True)

    @property
    def legacy_keys(self) -> tuple[str, ...]:
        """The keys this cell was stored under by earlier versions of :attr:`key` (results
        files are re-keyed on load, :func:`rekey`)."""
        earlier = {k: v for k, v in NEUTRAL_LATER_KEYS.items()
                   if k not in _HASHED_IN_LATER_CELLS}
        return (self._key(earlier, drop_user_knobs=False),)

    def _key(self, neutral_keys: dict[str, Scalar], *, drop_user_knobs: bool) -> str:
        """Stable identity of what the cell computes (results are reused when it matches).

        Hashes the whole run config the cell resolves to (defaults, then the preset, then the
        overrides), so retuning a preset or a default retires exactly the stored cells whose
        run it changes; a new run-config key retires them all unless it is listed, with its
        behaviour-preserving value, in ``NEUTRAL_LATER_KEYS``. Server-optimiser knobs that the
        cell's aggregation does not read, and SecAgg knobs of a run without SecAgg, hash as
        their defaults.
        """
        config = {**DEFAULTS, **get_preset(self.preset).config, **self.overrides}
        if config.get("dp-grad-sample-mode") == "auto":  # the engine it resolves to
            config["dp-grad-sample-mode"] = METHODS[str(config["method"])].grad_sample_modes[0]
        unused = list(unused_server_knobs(str(config["aggregation"])))
        if not config["secagg"]:
            unused += [k for k in DEFAULTS if k.startswith("secagg-")]
        for name in unused:
            config[name] = DEFAULTS[name]  # a knob the run never reads does not change it
        if config.get("num-labels") == 0:  # "from the data" (issue 21) resolves to the 2
            config["num-labels"] = 2  # the cells were keyed with: sst2 presets set 2, chat never reads it
        for name, neutral in neutral_keys.items():
            if config.get(name) == neutral:
                del config[name]
        # SecAgg's corrupt fraction (added later) changes a round only through its colluder
        # count floor(fraction x clients); with fewer clients than 1 / fraction that is 0, the
        # planning of the runs made before the knob existed
        if colluders(self.clients, float(config.get("secagg-corrupt-fraction", 0.0))) == 0:
            config.pop("secagg-corrupt-fraction", None)
        if drop_user_knobs and "dp-level" not in config:  # record level: never read
            for name in [k for k in config if k.startswith("dp-user-")]:
                del config[name]
        doc = {"preset": self.preset, "clients": self.clients, "seed": self.seed,
               "config": config}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def rekey(cells_doc: dict[str, Any], cells: list[Cell]) -> int:
    """Move stored results found under a cell's legacy key to its key; how many moved."""
    moved = 0
    for c in cells:
        if c.key in cells_doc:
            continue
        old = next((k for k in c.legacy_keys if k in cells_doc), None)
        if old is not None:
            cells_doc[c.key] = {**cells_doc.pop(old), "key": c.key}
            moved += 1
    return moved


def _dp(epsilon: float | None) -> dict[str, Scalar]:
    if epsilon is None:
        return {"dp": False}
    return {"dp": True, "dp-target-epsilon": epsilon, "dp-epsilon-budget": epsilon}


def _sst2_base(size: Size) -> dict[str, Scalar]:
    return {"num-rounds": size.sst2_rounds, "local-steps": size.sst2_local_steps,
            "batch-size": size.sst2_batch, "max-examples-per-client": size.sst2_examples_per_client,
            "eval-examples": size.sst2_eval, "num-hidden-layers": size.layers,
            "dp-physical-batch": 16, "secagg": True, "weighting": "uniform",
            "secagg-max-abort": size.secagg_max_abort}


def sst2_cells(size: Size, seed: int) -> list[Cell]:
    """The SST-2 table: federated at two skews x four privacy levels, plus the references."""
    base = _sst2_base(size)
    cells: list[Cell] = []
    for alpha in size.alphas:
        for eps in size.epsilons:
            label = f"alpha {alpha:g}, " + (f"epsilon {eps:g}" if eps else "no DP")
            knobs = SST2_DP if eps else SST2_NODP
            cells.append(Cell("sst2-main", label, "sst2-lora", size.sst2_clients, seed,
                              {**base, **knobs, "dirichlet-alpha": alpha, **_dp(eps)}, eps))
    # Centralised, non-private: one client holds the union of the clients' data and takes as
    # many steps per round as all clients together (same data, same examples processed).
    # One model trained directly: plain FedAvg over one client is ordinary training.
    central = {**base, **SST2_NODP, **_dp(None), "aggregation": "fedavg", "secagg": False,
               "partitioner": "iid",
               "max-examples-per-client": size.sst2_examples_per_client * size.sst2_clients,
               "local-steps": size.sst2_local_steps * size.sst2_clients, "min-clients": 1}
    cells.append(Cell("sst2-main", "centralised, no DP", "sst2-lora", 1, seed, central, None))
    return cells


#: The technique table's first row: DP-Adam, where the search stood before the techniques
#: were compared. Every technique row changes this, so the rows stay comparable when the
#: default (``SST2_DP``) moves to a winner. Aggregated by FedAvg with a SecAgg clip of 1, as
#: when it was measured.
TECHNIQUE_BASE: dict[str, Scalar] = {**SST2_NODP, "aggregation": "fedavg",
                                     "secagg-clip": 1.0}


def technique_cells(size: Size, seed: int) -> list[Cell]:
    """Each technique against DP-Adam (the first row), at epsilon 8 and alpha 0.5."""
    base = {**_sst2_base(size), **TECHNIQUE_BASE, "dirichlet-alpha": 0.5, **_dp(8.0)}
    variants: list[tuple[str, dict[str, Scalar]]] = [
        ("DP-Adam: LoRA q/v r=8, normalised mean pooling, lr 0.002, head-lr 0.05, "
         f"clip 1.0, batch {size.sst2_batch}", {}),
        ("FFA-LoRA (A frozen, B trained)", {"method": "ffa-lora"}),
        ("mean pooling without normalisation", {"pooling": "mean"}),
        ("CLS pooler head (pooling=model)", {"pooling": "model"}),
        ("head-lr = lr (0.002): no separate head learning rate", {"head-lr": 0.0}),
        ("DP-SGD, momentum 0.9, lr 0.5, head-lr 5 instead of DP-Adam", _SGDM),
        ("DP-SGD momentum + FFA-LoRA", {**_SGDM, "method": "ffa-lora"}),
        ("DP-SGD momentum + mean pooling without normalisation", {**_SGDM, "pooling": "mean"}),
        ("DP-SGD momentum, lr 0.25, head-lr 2.5", {**_SGDM, "lr": 0.25, "head-lr": 2.5}),
        ("DP-SGD momentum, lr 0.5, head-lr 2.5", {**_SGDM, "head-lr": 2.5}),
        ("DP-SGD momentum + FFA-LoRA, lr 0.25", {**_SGDM, "method": "ffa-lora", "lr": 0.25}),
        (f"DP-SGD momentum + FFA-LoRA, {2 * size.sst2_rounds} rounds x "
         f"{max(1, size.sst2_local_steps // 2)} local steps (same noisy steps, twice the "
         "averaging)", {**_SGDM, "method": "ffa-lora", "num-rounds": 2 * size.sst2_rounds,
                        "local-steps": max(1, size.sst2_local_steps // 2)}),
        ("clip 0.1 instead of 1.0", {"dp-clip": 0.1}),
        ("logical batch 16, no virtual steps (a third of the examples per step)",
         {"batch-size": 16}),
        (f"DP-SGD momentum + FFA-LoRA, logical batch {2 * size.sst2_batch} (twice the "
         "examples per step: virtual steps of 16)",
         {**_SGDM, "method": "ffa-lora", "batch-size": 2 * size.sst2_batch}),
    ]
    return [Cell("sst2-technique", label, "sst2-lora", size.sst2_clients, seed,
                 {**base, **extra}, 8.0) for label, extra in variants]


#: The diagnosis table's setting: alpha 100, seed 0, epsilon 8, with FedAvg (the private
#: default before server momentum), so each row isolates a client-side change, and a SecAgg
#: clip of 1 (the default when it was measured: it clamps the head's largest updates).
LIMITS_ALPHA = 100.0
LIMITS_BASE: dict[str, Scalar] = {**SST2_DP, "aggregation": "fedavg", "secagg-clip": 1.0}


def limits_cells(size: Size, seed: int) -> list[Cell]:
    """What limits the private run: noise, clipping, step size, the optimiser and method.

    Each row changes one thing of the first row: the default DP configuration (``SST2_DP``)
    at alpha 100, epsilon 8, aggregated by plain FedAvg with SecAgg's clamp at 1
    (``LIMITS_BASE``). "Clip only" keeps
    DP-SGD's clipping and sampling with a negligible noise multiplier (no privacy at all: its
    epsilon is astronomical), which separates the cost of the noise from that of the clipping.
    """
    base = {**_sst2_base(size), **LIMITS_BASE, "dirichlet-alpha": LIMITS_ALPHA}
    private = {**base, **_dp(8.0)}
    variants: list[tuple[str, dict[str, Scalar], float | None]] = [
        ("FFA-LoRA, DP-SGD momentum, lr 0.5, head-lr 5, clip 1, FedAvg", private, 8.0),
        ("server momentum 0.5 (FedAvgM, as in the default)",
         {**private, "aggregation": "fedavgm", "server-momentum": 0.5}, 8.0),
        ("SecAgg clip 16 instead of 1 (no update coordinate clamped, as in the default)",
         {**private, "secagg-clip": 16.0}, 8.0),
        ("clip only: noise multiplier 0.0001 (not private)",
         {**base, "dp": True, "dp-noise-multiplier": 1e-4, "dp-target-epsilon": 0.0}, None),
        ("no DP: neither clipping nor noise, same optimiser and method", {**base, **_dp(None)},
         None),
        ("clip 3, lr 0.167, head-lr 1.67 (lr x clip unchanged)",
         {**private, "dp-clip": 3.0, "lr": 0.16667, "head-lr": 1.6667}, 8.0),
        ("clip 5, lr 0.1, head-lr 1", {**private, "dp-clip": 5.0, "lr": 0.1, "head-lr": 1.0},
         8.0),
        ("clip 10, lr 0.05, head-lr 0.5",
         {**private, "dp-clip": 10.0, "lr": 0.05, "head-lr": 0.5}, 8.0),
        ("lr 1 (twice the step)", {**private, "lr": 1.0}, 8.0),
        ("lr 1, head-lr 10", {**private, "lr": 1.0, "head-lr": 10.0}, 8.0),
        ("cosine lr decay to a tenth by the last round (lr-final-fraction 0.1)",
         {**private, "lr-final-fraction": 0.1}, 8.0),
        ("DP-Adam on plain LoRA (the non-private optimiser and method), clip 10",
         {**private, **SST2_NODP, "aggregation": "fedavg", "dp-clip": 10.0}, 8.0),
    ]
    return [Cell("sst2-limits", label, "sst2-lora", size.sst2_clients, seed, over, eps)
            for label, over, eps in variants]


def chat_cells(size: Size, seed: int) -> list[Cell]:
    """chitchat: one client per participant, perplexity on held-out participants."""
    cells = []
    methods: list[tuple[str, str, dict[str, Scalar]]] = [
        ("LoRA", "chat-lora", {}), ("soft prompt", "chat-prompt", {})]
    if not size.main_only:  # FFA-LoRA: half of LoRA's noisy coordinates
        methods.insert(1, ("FFA-LoRA", "chat-lora", {"method": "ffa-lora"}))
    for method, preset, extra in methods:
        for eps in (8.0, None):
            if eps not in size.epsilons:
                continue
            over: dict[str, Scalar] = {
                "num-rounds": size.chat_rounds, "local-steps": size.chat_local_steps,
                "batch-size": size.chat_batch,
                "max-examples-per-client": size.chat_examples_per_client,
                "eval-examples": size.chat_eval, "num-hidden-layers": size.layers,
                "dp-physical-batch": 2, "secagg": True, "weighting": "uniform",
                "secagg-max-abort": size.secagg_max_abort, **_dp(eps), **extra}
            label = f"{method}, " + (f"epsilon {eps:g}" if eps else "no DP")
            cells.append(Cell("chat", label, preset, size.chat_clients, seed, over, eps))
    return cells


def method_cells(size: Size, seed: int) -> list[Cell]:
    """Each adapter method on SST-2 at alpha 0.5, epsilon 8 and without DP, with the main
    table's optimiser settings (DP-SGD momentum / AdamW, FedAvgM; not tuned per method). The
    LoRA rows are the main table's (FFA-LoRA under DP), in the same invocation."""
    base = {**_sst2_base(size), "dirichlet-alpha": 0.5}
    methods: list[tuple[str, dict[str, Scalar]]] = [
        ("(IA)3", {"method": "ia3"}), ("BitFit", {"method": "bitfit"}),
        ("Bottleneck serial", {"method": "bottleneck"}),
        ("Bottleneck parallel", {"method": "bottleneck", "bottleneck-placement": "parallel"}),
        ("LoRA (FFA-LoRA under DP)", {})]
    cells = []
    for name, extra in methods:
        for eps in (8.0, None):
            knobs = SST2_DP if eps else SST2_NODP
            label = f"{name}, " + (f"epsilon {eps:g}" if eps else "no DP")
            cells.append(Cell("sst2-methods", label, "sst2-lora", size.sst2_clients, seed,
                              {**base, **knobs, **_dp(eps), **extra}, eps))
    return cells


def sentence_cells(size: Size, seed: int) -> list[Cell]:
    """The main table's alpha 0.5 runs (epsilon 8 and without DP) evaluated on the full
    sentences of the evaluation set only (``eval-subset = sentences``; issue 18, item 5)."""
    base = {**_sst2_base(size), "dirichlet-alpha": 0.5, "eval-subset": "sentences"}
    cells = []
    for eps in (8.0, None):
        knobs = SST2_DP if eps else SST2_NODP
        label = "alpha 0.5, full sentences, " + (f"epsilon {eps:g}" if eps else "no DP")
        cells.append(Cell("sst2-sentences", label, "sst2-lora", size.sst2_clients, seed,
                          {**base, **knobs, **_dp(eps)}, eps))
    return cells


PARTS: tuple[str, ...] = ("sst2", "technique", "limits", "chat", "methods", "sentences")


def grid(size_name: str, only: tuple[str, ...] = PARTS,
         seeds: int | None = None) -> list[Cell]:
    """Every cell of a sweep, seed-major so that a partial run covers every row once first."""
    if size_name not in SIZES:
        raise ConfigError(f"unknown sweep size {size_name!r}; known: {sorted(SIZES)}")
    unknown = sorted(set(only) - set(PARTS))
    if unknown:
        raise ConfigError(f"unknown sweep part(s) {unknown}; known: {', '.join(PARTS)}")
    size = SIZES[size_name]
    n_seeds = size.seeds if seeds is None else seeds
    if n_seeds < 1:
        raise ConfigError(f"seeds={n_seeds} must be >= 1")
    cells: list[Cell] = []
    for seed in range(n_seeds):
        row: list[Cell] = []
        if "sst2" in only:
            row += sst2_cells(size, seed)
        if "technique" in only and not size.main_only and seed == 0:
            row += technique_cells(size, seed)
        if "limits" in only and not size.main_only and seed == 0:
            row += limits_cells(size, seed)
        if "chat" in only:
            row += chat_cells(size, seed)
        if "methods" in only and not size.main_only and seed == 0:
            row += method_cells(size, seed)
        if "sentences" in only and not size.main_only:
            row += sentence_cells(size, seed)
        if seed > 0 and size.spread_rows is not None:
            row = [c for c in row if c.label in size.spread_rows]
        cells += row
    return cells
