"""Run configuration: small frozen dataclasses per concern, parsed once at the edge.

The knobs live flat in ``pyproject.toml`` under ``[tool.flwr.app.config]`` (Flower's run
config, keys with dashes). :func:`parse_run_config` turns that flat mapping into a
:class:`RunConfig` and rejects unknown keys and bad values with a message naming the key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from fedpeft.errors import ConfigError, UnknownNameError
from fedpeft.models import ModelConfig
from peft_methods.lora import LoraSettings
from peft_methods.prompt import PromptSettings
from peft_methods.registry import METHODS, AdapterConfig
from privacy.dp_config import DPConfig
from privacy.secagg.config import SecAggConfig
from privacy.secagg.errors import SecAggError

Scalar = bool | int | float | str

DATASETS = ("chitchat", "sst2", "agnews", "shakespeare", "file")
AGGREGATIONS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
#: Server-optimiser run-config keys and the aggregations that read them
#: (``coordinator.server_opt.server_step``; tests/unit/test_aggregate.py checks this table).
SERVER_KNOBS: dict[str, tuple[str, ...]] = {
    "server-momentum": ("fedavgm",), "beta1": ("fedadam", "fedyogi"),
    "beta2": ("fedadam", "fedyogi"), "tau": ("fedadam", "fedyogi")}


def unused_server_knobs(aggregation: str) -> tuple[str, ...]:
    """The server-optimiser run-config keys that ``aggregation`` ignores."""
    return tuple(k for k, users in SERVER_KNOBS.items() if aggregation not in users)

WEIGHTINGS = ("examples", "uniform")
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class DataConfig:
    """Which corpus, how it is split over clients, and how much each client uses."""

    dataset: str = "chitchat"
    path: str = ""
    eval_path: str = ""
    partitioner: str = "natural"
    dirichlet_alpha: float = 0.5
    max_examples_per_client: int = 64
    eval_examples: int = 128

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise UnknownNameError(f"unknown dataset {self.dataset!r}; known: {DATASETS} "
                                   "('file' reads data-path)")
        if self.dataset == "file" and not self.path:
            raise ConfigError("dataset='file' needs data-path (a .tsv, .csv or .jsonl file)")
        if self.partitioner not in ("natural", "iid", "dirichlet"):
            raise UnknownNameError(f"unknown partitioner {self.partitioner!r}; known: "
                                   "natural, iid, dirichlet")
        if self.dirichlet_alpha <= 0:
            raise ConfigError(f"dirichlet-alpha={self.dirichlet_alpha} must be > 0")
        if self.max_examples_per_client < 1:
            raise ConfigError(f"max-examples-per-client={self.max_examples_per_client} must be >= 1")
        if self.eval_examples < 1:
            raise ConfigError(f"eval-examples={self.eval_examples} must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each client."""

    local_steps: int = 4
    batch_size: int = 8
    lr: float = 1e-3
    head_lr: float = 0.0  # classification head's own learning rate; 0 = lr
    optimizer: str = "adamw"
    momentum: float = 0.0
    weight_decay: float = 0.0
    #: lr (and head-lr) in the last round, as a fraction of round 1's; 1 = constant, < 1 =
    #: cosine decay across rounds (``client.trainer.round_lr_scale``)
    lr_final_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.local_steps < 1:
            raise ConfigError(f"local-steps={self.local_steps} must be >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"batch-size={self.batch_size} must be >= 1")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        if not self.head_lr >= 0:
            raise ConfigError(f"head-lr={self.head_lr} must be >= 0 (0 means the same as lr)")
        if self.optimizer not in OPTIMIZERS:
            raise UnknownNameError(f"unknown optimizer {self.optimizer!r}; known: {OPTIMIZERS}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum={self.momentum} must be in [0, 1)")
        if self.weight_decay < 0:
            raise ConfigError(f"weight-decay={self.weight_decay} must be >= 0")
        if not 0 < self.lr_final_fraction <= 1:
            raise ConfigError(f"lr-final-fraction={self.lr_final_fraction} must be in (0, 1] "
                              "(1 keeps lr constant; 0.1 decays it to a tenth by the last round)")


@dataclass(frozen=True)
class FederationConfig:
    """Rounds, client sampling and server-side aggregation."""

    num_rounds: int = 3
    clients_per_round: int = 0  # 0 = every connected client
    min_clients: int = 2
    aggregation: str = "fedavg"
    weighting: str = "examples"
    server_lr: float = 1.0
    server_momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    round_timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.num_rounds < 1:
            raise ConfigError(f"num-rounds={self.num_rounds} must be >= 1")
        if self.clients_per_round < 0:
            raise ConfigError(f"clients-per-round={self.clients_per_round} must be >= 0 "
                              "(0 means every client)")
        if self.min_clients < 1:
            raise ConfigError(f"min-clients={self.min_clients} must be >= 1")
        if 0 < self.clients_per_round < self.min_clients:
            raise ConfigError(f"clients-per-round={self.clients_per_round} is below "
                              f"min-clients={self.min_clients}")
        if self.aggregation not in AGGREGATIONS:
            raise UnknownNameError(f"unknown aggregation {self.aggregation!r}; known: "
                                   f"{AGGREGATIONS}")
        if self.weighting not in WEIGHTINGS:
            raise UnknownNameError(f"unknown weighting {self.weighting!r}; known: {WEIGHTINGS}")
        if not self.server_lr > 0:
            raise ConfigError(f"server-lr={self.server_lr} must be > 0")
        for name in ("server_momentum", "beta1", "beta2"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ConfigError(f"{name.replace('_', '-')}={v} must be in [0, 1)")
        if not self.tau > 0:
            raise ConfigError(f"tau={self.tau} must be > 0")
        if not self.round_timeout > 0:
            raise ConfigError(f"round-timeout={self.round_timeout} must be > 0")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run. ``fingerprint`` identifies model + adapter + data."""

    preset: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    secagg: SecAggConfig | None = None
    dp: DPConfig = field(default_factory=DPConfig)
    ledger_dir: str = ""
    seed: int = 0
    run_dir: str = "runs/latest"
    resume: bool = True
    progress: bool = True
    flat: tuple[tuple[str, Scalar], ...] = ()

    def fingerprint(self) -> str:
        """Hash of what client and coordinator must agree on (model, adapter, task)."""
        doc = {"model": asdict(self.model), "adapter": self.adapter.method,
               "settings": asdict(self.adapter.settings)}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def as_flat(self) -> dict[str, Scalar]:
        return dict(self.flat)


# Flat key -> default. These are exactly the keys of [tool.flwr.app.config].
DEFAULTS: dict[str, Scalar] = {
    "preset": "chat-lora",
    "model": "smollm2-135m",
    "task": "causal_lm",
    "num-hidden-layers": 0,
    "max-length": 64,
    "num-labels": 2,
    "pooling": "mean-norm",
    "method": "lora",
    "lora-r": 8,
    "lora-alpha": 16,
    "lora-dropout": 0.0,
    "lora-targets": "",
    "prompt-tokens": 16,
    "prompt-init": "vocab",
    "dataset": "chitchat",
    "data-path": "",
    "eval-path": "",
    "partitioner": "natural",
    "dirichlet-alpha": 0.5,
    "max-examples-per-client": 64,
    "eval-examples": 128,
    "num-rounds": 3,
    "clients-per-round": 0,
    "min-clients": 2,
    "aggregation": "fedavg",
    "weighting": "uniform",
    "server-lr": 1.0,
    "server-momentum": 0.9,
    "beta1": 0.9,
    "beta2": 0.99,
    "tau": 0.001,
    "round-timeout": 600.0,
    "local-steps": 4,
    "batch-size": 8,
    "lr": 0.001,
    "head-lr": 0.0,
    "optimizer": "adamw",
    "momentum": 0.0,
    "weight-decay": 0.0,
    "lr-final-fraction": 1.0,
    "dp": True,
    "dp-noise-multiplier": 0.0,
    "dp-target-epsilon": 8.0,
    "dp-delta": 1e-05,
    "dp-clip": 1.0,
    "dp-physical-batch": 2,
    "dp-planned-rounds": 0,
    "dp-epsilon-budget": 0.0,
    "dp-accountant": "prv",
    "dp-grad-sample-mode": "ew",
    "ledger-dir": "",
    "secagg": True,
    "secagg-bits": 32,
    "secagg-clip": 1.0,
    "secagg-dropout": 0.1,
    "secagg-max-abort": 0.01,
    "secagg-threshold": 0,
    "secagg-degree": 0,
    "seed": 0,
    "run-dir": "runs/latest",
    "resume": True,
    "progress": True,
}


def _typed(key: str, value: Any, default: Scalar) -> Scalar:
    """Coerce ``value`` to the type of ``default``, naming the key on failure."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"run config {key}={value!r} is not a valid "
                          f"{type(default).__name__}") from None


def parse_run_config(flat: Mapping[str, Any], *, extra_ok: tuple[str, ...] = ()) -> RunConfig:
    """Parse Flower's flat run config (dashed keys) into a validated :class:`RunConfig`."""
    unknown = sorted(k for k in flat if k not in DEFAULTS and not k.startswith(extra_ok or "\0"))
    if unknown:
        raise ConfigError(f"unknown run config keys {unknown}; known keys: {sorted(DEFAULTS)}")
    v: dict[str, Scalar] = {k: _typed(k, flat.get(k, d), d) for k, d in DEFAULTS.items()}
    method = str(v["method"])
    if method not in METHODS:
        raise UnknownNameError(f"unknown adapter method {method!r}; known: {sorted(METHODS)}")
    settings: LoraSettings | PromptSettings
    if method == "prompt":
        settings = PromptSettings(num_virtual_tokens=int(v["prompt-tokens"]),
                                  init=str(v["prompt-init"]))  # type: ignore[arg-type]
    else:
        targets = tuple(t.strip() for t in str(v["lora-targets"]).split(",") if t.strip())
        settings = LoraSettings(r=int(v["lora-r"]), alpha=int(v["lora-alpha"]),
                                dropout=float(v["lora-dropout"]),
                                target_modules=targets or None,
                                freeze_a=method == "ffa-lora")
    layers = int(v["num-hidden-layers"])
    task = str(v["task"])
    if task not in ("causal_lm", "classification"):
        raise ConfigError(f"task={task!r} must be 'causal_lm' or 'classification'")
    secagg: SecAggConfig | None = None
    if bool(v["secagg"]):
        if str(v["weighting"]) == "examples":
            raise ConfigError("weighting='examples' needs each client's update in the clear; "
                              "with secagg=true set weighting='uniform' (the mean over survivors)")
        try:
            secagg = SecAggConfig(clip=float(v["secagg-clip"]), bits=int(v["secagg-bits"]),
                                  expected_dropout=float(v["secagg-dropout"]),
                                  max_abort_prob=float(v["secagg-max-abort"]),
                                  threshold=int(v["secagg-threshold"]) or None,
                                  degree=int(v["secagg-degree"]) or None)
        except SecAggError as exc:
            raise ConfigError(f"secure aggregation settings: {exc}") from exc
    dp = DPConfig()
    if bool(v["dp"]):
        sigma = float(v["dp-noise-multiplier"])
        target = float(v["dp-target-epsilon"])
        budget = float(v["dp-epsilon-budget"])
        dp = DPConfig(
            enabled=True,
            noise_multiplier=sigma if sigma != 0.0 else None,
            target_epsilon=None if sigma != 0.0 else target,
            delta=float(v["dp-delta"]),
            max_grad_norm=float(v["dp-clip"]),
            expected_batch_size=int(v["batch-size"]),
            physical_batch_size=int(v["dp-physical-batch"]) or None,
            grad_sample_mode=str(v["dp-grad-sample-mode"]),  # type: ignore[arg-type]
            accountant=str(v["dp-accountant"]),  # type: ignore[arg-type]
            planned_rounds=int(v["dp-planned-rounds"]) or int(v["num-rounds"]),
            epsilon_max=budget if budget > 0 else (target if sigma == 0.0 else None),
        )
    return RunConfig(
        preset=str(v["preset"]),
        secagg=secagg,
        dp=dp,
        ledger_dir=str(v["ledger-dir"]),
        model=ModelConfig(name=str(v["model"]), task=task,  # type: ignore[arg-type]
                          num_hidden_layers=layers or None, num_labels=int(v["num-labels"]),
                          max_length=int(v["max-length"]),
                          pooling=str(v["pooling"])),  # type: ignore[arg-type]
        adapter=AdapterConfig(method=method, settings=settings),
        data=DataConfig(dataset=str(v["dataset"]), path=str(v["data-path"]),
                        eval_path=str(v["eval-path"]), partitioner=str(v["partitioner"]),
                        dirichlet_alpha=float(v["dirichlet-alpha"]),
                        max_examples_per_client=int(v["max-examples-per-client"]),
                        eval_examples=int(v["eval-examples"])),
        train=TrainConfig(local_steps=int(v["local-steps"]), batch_size=int(v["batch-size"]),
                          lr=float(v["lr"]), head_lr=float(v["head-lr"]),
                          optimizer=str(v["optimizer"]),
                          momentum=float(v["momentum"]), weight_decay=float(v["weight-decay"]),
                          lr_final_fraction=float(v["lr-final-fraction"])),
        federation=FederationConfig(
            num_rounds=int(v["num-rounds"]), clients_per_round=int(v["clients-per-round"]),
            min_clients=int(v["min-clients"]), aggregation=str(v["aggregation"]),
            weighting=str(v["weighting"]), server_lr=float(v["server-lr"]),
            server_momentum=float(v["server-momentum"]), beta1=float(v["beta1"]),
            beta2=float(v["beta2"]), tau=float(v["tau"]),
            round_timeout=float(v["round-timeout"])),
        seed=int(v["seed"]),
        run_dir=str(v["run-dir"]),
        resume=bool(v["resume"]),
        progress=bool(v["progress"]),
        flat=tuple(sorted(v.items())),
    )

