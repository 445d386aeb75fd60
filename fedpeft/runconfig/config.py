"""Run configuration: small frozen dataclasses per concern, parsed once at the edge.

The knobs live flat in ``pyproject.toml`` under ``[tool.flwr.app.config]`` (Flower's run
config, keys with dashes). :func:`parse_run_config` turns that flat mapping into a
:class:`RunConfig` and rejects unknown keys and bad values with a message naming the key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fedpeft.core.errors import ConfigError, DataError, UnknownNameError
from fedpeft.core.models import ModelConfig
from fedpeft.core.protocol import Scalar
from fedpeft.data.config import DataConfig
from fedpeft.data.federation import label_count
from fedpeft.peft_methods.registry import METHODS, AdapterConfig, method_knobs
from fedpeft.privacy.dp_config import GRAD_SAMPLE_MODES, DPConfig
from fedpeft.privacy.user_level import RoundPlan, UserDPConfig, round_plan
from fedpeft.secagg.config import SecAggConfig
from fedpeft.secagg.config import colluders as secagg_colluders
from fedpeft.secagg.errors import SecAggError
from fedpeft.training.config import CohortConfig, TrainConfig

AGGREGATIONS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
#: Server-optimiser run-config keys and the aggregations that read them
#: (``fedpeft.coordinator.server_opt.server_step``; tests/unit/test_aggregate.py checks this table).
SERVER_KNOBS: dict[str, tuple[str, ...]] = {
    "server-momentum": ("fedavgm",), "beta1": ("fedadam", "fedyogi"),
    "beta2": ("fedadam", "fedyogi"), "tau": ("fedadam", "fedyogi")}


def unused_server_knobs(aggregation: str) -> tuple[str, ...]:
    """The server-optimiser run-config keys that ``aggregation`` ignores."""
    return tuple(k for k, users in SERVER_KNOBS.items() if aggregation not in users)

WEIGHTINGS = ("examples", "uniform")
#: ``dp-level``: record-level DP-SGD on each device, user-level distributed noise under SecAgg,
#: or both (each guarantee accounted and reported on its own).
DP_LEVELS = ("record", "user", "both")






@dataclass(frozen=True)
class FederationConfig:
    """Rounds, client sampling and server-side aggregation."""

    num_rounds: int = 3
    clients_per_round: int = 0  # 0 = every connected client
    min_clients: int = 2
    aggregation: str = "fedavg"
    weighting: str = "uniform"  # the only weighting secure aggregation allows
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
    cohort: CohortConfig = field(default_factory=CohortConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    secagg: SecAggConfig | None = None
    dp: DPConfig = field(default_factory=DPConfig)
    user_dp: UserDPConfig = field(default_factory=UserDPConfig)
    ledger_dir: str = ""
    #: the federation CA every SecAgg+ round is authenticated with (None: unauthenticated
    #: rounds); knob ``secagg-ca``, or ``secagg-sim-identities``/ca.crt
    secagg_ca: Path | None = None
    #: simulations: certificate dir whose nodes/secagg-<client id>.{key,crt} are the virtual
    #: clients' identities (knob ``secagg-sim-identities``)
    secagg_sim_identities: Path | None = None
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

    @property
    def dp_level(self) -> str:
        """Which guarantees the run gives: ``record``, ``user``, ``both`` or ``off``."""
        return {(True, False): "record", (False, True): "user", (True, True): "both",
                (False, False): "off"}[(self.dp.enabled, self.user_dp.enabled)]

    @property
    def private(self) -> bool:
        """Any DP level is on: replies carry only the documented fields."""
        return self.dp.enabled or self.user_dp.enabled


def _default(cls: type[Any], name: str) -> Scalar:
    """The default of dataclass field ``name`` of ``cls`` (the one source of that default)."""
    for f in fields(cls):
        if f.name == name:
            if f.default is MISSING:
                raise ConfigError(f"{cls.__name__}.{name} has no default")  # a coding error
            return f.default  # type: ignore[no-any-return]
    raise ConfigError(f"{cls.__name__} has no field {name!r}")  # a coding error


#: Run-config knobs that are one field of one concern's dataclass: flat key -> (class, field).
#: Their defaults are read from the dataclass (tests/unit/test_config.py checks every one).
KNOB_FIELDS: dict[str, tuple[type[Any], str]] = {
    "model": (ModelConfig, "name"), "task": (ModelConfig, "task"),
    "max-length": (ModelConfig, "max_length"), "pooling": (ModelConfig, "pooling"),
    "dataset": (DataConfig, "dataset"), "data-path": (DataConfig, "path"),
    "eval-path": (DataConfig, "eval_path"), "partitioner": (DataConfig, "partitioner"),
    "dirichlet-alpha": (DataConfig, "dirichlet_alpha"),
    "max-examples-per-client": (DataConfig, "max_examples_per_client"),
    "eval-examples": (DataConfig, "eval_examples"),
    "eval-subset": (DataConfig, "eval_subset"),
    "audit-canaries": (DataConfig, "canaries"),
    "data-format": (DataConfig, "format"), "data-text-column": (DataConfig, "text_column"),
    "data-label-column": (DataConfig, "label_column"),
    "data-user-column": (DataConfig, "user_column"),
    "data-label-names": (DataConfig, "label_names"), "data-header": (DataConfig, "header"),
    "data-min-user-examples": (DataConfig, "min_user_examples"),
    "eval-format": (DataConfig, "eval_format"),
    "eval-text-column": (DataConfig, "eval_text_column"),
    "eval-label-column": (DataConfig, "eval_label_column"),
    "eval-header": (DataConfig, "eval_header"),
    "num-rounds": (FederationConfig, "num_rounds"),
    "clients-per-round": (FederationConfig, "clients_per_round"),
    "min-clients": (FederationConfig, "min_clients"),
    "aggregation": (FederationConfig, "aggregation"),
    "weighting": (FederationConfig, "weighting"), "server-lr": (FederationConfig, "server_lr"),
    "server-momentum": (FederationConfig, "server_momentum"),
    "beta1": (FederationConfig, "beta1"), "beta2": (FederationConfig, "beta2"),
    "tau": (FederationConfig, "tau"), "round-timeout": (FederationConfig, "round_timeout"),
    "local-steps": (TrainConfig, "local_steps"), "batch-size": (TrainConfig, "batch_size"),
    "lr": (TrainConfig, "lr"), "head-lr": (TrainConfig, "head_lr"),
    "optimizer": (TrainConfig, "optimizer"), "momentum": (TrainConfig, "momentum"),
    "weight-decay": (TrainConfig, "weight_decay"),
    "lr-final-fraction": (TrainConfig, "lr_final_fraction"),
    "batch-clients": (CohortConfig, "clients"), "batch-rows": (CohortConfig, "rows"),
    "dp-delta": (DPConfig, "delta"), "dp-clip": (DPConfig, "max_grad_norm"),
    "dp-accountant": (DPConfig, "accountant"),
    "audit-gradient-canaries": (DPConfig, "gradient_canaries"),
    "dp-user-epsilon": (UserDPConfig, "target_epsilon"), "dp-user-delta": (UserDPConfig, "delta"),
    "dp-user-clip": (UserDPConfig, "clip"), "dp-user-colluders": (UserDPConfig, "colluders"),
    "dp-user-clip-quantile": (UserDPConfig, "clip_quantile"),
    "dp-user-clip-lr": (UserDPConfig, "clip_lr"),
    "dp-user-clip-count-std": (UserDPConfig, "clip_count_std"),
    "audit-user-canaries": (UserDPConfig, "canaries"),
    "secagg-bits": (SecAggConfig, "bits"), "secagg-dropout": (SecAggConfig, "expected_dropout"),
    "secagg-max-abort": (SecAggConfig, "max_abort_prob"),
    "secagg-corrupt-fraction": (SecAggConfig, "corrupt_fraction"),
}

#: Flat key -> default: exactly the keys of [tool.flwr.app.config] (scripts/sync_run_config.py
#: writes that table from this). Knobs of one dataclass field take its default; the methods'
#: knobs come from the method registry; the rest are run-level choices, each explained.
DEFAULTS: dict[str, Scalar] = {
    "preset": "chat-lora",
    **{k: _default(*KNOB_FIELDS[k]) for k in ("model", "task")},
    "num-hidden-layers": 0,  # 0 = the model's own depth (ModelConfig.num_hidden_layers=None)
    "max-length": _default(*KNOB_FIELDS["max-length"]),
    # 0 = from the data: 2 for sst2, 4 for agnews, the label count of a file (data-path);
    # a value that disagrees with the data is an error before any round runs
    "num-labels": 0,
    "pooling": _default(*KNOB_FIELDS["pooling"]),
    "method": _default(AdapterConfig, "method"),
    **method_knobs(),
    **{k: _default(*KNOB_FIELDS[k]) for k in (
        "dataset", "data-path", "eval-path", "data-format", "data-text-column",
        "data-label-column", "data-user-column", "data-label-names", "data-header",
        "data-min-user-examples", "eval-format", "eval-text-column", "eval-label-column",
        "eval-header", "partitioner", "dirichlet-alpha",
        "max-examples-per-client", "eval-examples", "eval-subset", "audit-canaries", "num-rounds",
        "clients-per-round",
        "min-clients", "aggregation", "weighting", "server-lr", "server-momentum", "beta1",
        "beta2", "tau", "round-timeout", "local-steps", "batch-size", "lr", "head-lr",
        "optimizer", "momentum", "weight-decay", "lr-final-fraction", "batch-clients",
        "batch-rows")},
    "dp": True,  # private by default (the library's DPConfig is off until asked)
    "dp-noise-multiplier": 0.0,  # 0 = calibrate sigma from dp-target-epsilon
    "dp-target-epsilon": 8.0,
    **{k: _default(*KNOB_FIELDS[k]) for k in ("dp-delta", "dp-clip")},
    "dp-physical-batch": 2,  # micro-batches of 2 bound memory on edge boards; 0 = no split
    "dp-planned-rounds": 0,  # 0 = num-rounds
    "dp-epsilon-budget": 0.0,  # 0 = the target epsilon is also the hard budget
    "dp-accountant": _default(*KNOB_FIELDS["dp-accountant"]),
    "audit-gradient-canaries": _default(*KNOB_FIELDS["audit-gradient-canaries"]),
    # auto = the method's fastest exact engine: ew, or hooks where the method has a custom
    # layer ((IA)3); docs/benchmarks.md
    "dp-grad-sample-mode": "auto",
    "dp-level": "record",  # record | user | both (docs/privacy.md, "User-level DP")
    **{k: _default(*KNOB_FIELDS[k]) for k in (
        "dp-user-epsilon", "dp-user-delta", "dp-user-clip", "dp-user-colluders",
        "dp-user-clip-quantile", "dp-user-clip-lr", "dp-user-clip-count-std",
        "audit-user-canaries")},
    "dp-user-participations": 0,  # 0 = num-rounds (a user may join every round)
    "dp-user-budget": 0.0,  # 0 = dp-user-epsilon is also the hard per-user budget
    "ledger-dir": "",  # "" = RUN_DIR/ledgers
    "secagg": True,  # the coordinator sees only the sum
    "secagg-bits": _default(*KNOB_FIELDS["secagg-bits"]),
    "secagg-clip": 1.0,  # per-coordinate bound of an update (SecAggConfig.clip is required)
    **{k: _default(*KNOB_FIELDS[k]) for k in (
        "secagg-dropout", "secagg-max-abort", "secagg-corrupt-fraction")},
    "secagg-threshold": 0,  # 0 = planned from the number of clients (plan_graph)
    "secagg-degree": 0,
    # Authenticated SecAgg+ (docs/secagg.md; Bonawitz et al. 2017, active adversaries): the
    # path of the federation CA certificate (`fedpeft certs init`'s ca.crt) the coordinator
    # checks node certificates against; "" = unauthenticated rounds. A deployment client pins
    # its own CA (node config secagg-ca, beside secagg-node-key and secagg-node-cert) and
    # refuses an unauthenticated round when it has an identity. Needs secagg = true; the file
    # must exist where the run is parsed (coordinator, simulation).
    "secagg-ca": "",
    # Simulations: a `fedpeft certs init DIR --name client-0 --name client-1 ...` directory;
    # each virtual client client-<partition-id> (or its node config client-id) signs with
    # DIR/nodes/secagg-<client id>.{key,crt}. secagg-ca defaults to DIR/ca.crt (set it too to
    # pin another CA). "" = no simulated identities.
    "secagg-sim-identities": "",
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


def _grad_sample_mode(mode: str, method: str) -> str:
    """``dp-grad-sample-mode`` for ``method``: ``auto`` resolved to the method's fastest exact
    engine; an engine the method's layers have no exact rule for is refused."""
    modes = METHODS[method].grad_sample_modes
    if mode == "auto":
        return modes[0]
    if mode in GRAD_SAMPLE_MODES and mode not in modes:
        raise ConfigError(f"dp-grad-sample-mode={mode!r} cannot compute per-example gradients "
                          f"of method {method!r} (its layers have no rule there); use one of "
                          f"{list(modes)} or 'auto'")
    return mode


def _secagg_files(v: Mapping[str, Scalar], secagg: bool,
                  local_files: bool) -> tuple[Path | None, Path | None]:
    """``(secagg_ca, secagg_sim_identities)`` from their knobs (see DEFAULTS), checked."""
    ca_knob, sim_knob = str(v["secagg-ca"]), str(v["secagg-sim-identities"])
    if not ca_knob and not sim_knob:
        return None, None
    if not secagg:
        which = "secagg-ca" if ca_knob else "secagg-sim-identities"
        raise ConfigError(f"{which} authenticates secure aggregation, but secagg=false: set "
                          f"secagg = true, or {which} = \"\" for a run without it")
    sim = Path(sim_knob) if sim_knob else None
    ca = Path(ca_knob) if ca_knob else (sim / "ca.crt" if sim is not None else None)
    if local_files:
        if sim is not None and not sim.is_dir():
            raise ConfigError(f"secagg-sim-identities={sim_knob!r} is not a directory; create "
                              "it with `fedpeft certs init DIR --name client-0 --name client-1 "
                              "...` (one name per virtual client), or set it to \"\"")
        if ca is not None and not ca.is_file():
            source = (f"secagg-ca={ca_knob!r}" if ca_knob else
                      f"secagg-sim-identities={sim_knob!r} has no ca.crt, so secagg-ca={str(ca)!r}")
            raise ConfigError(f"{source} is not a file; give the federation CA certificate "
                              "(ca.crt of `fedpeft certs init`), or secagg-ca = \"\" for "
                              "unauthenticated rounds")
    return ca, sim


def parse_run_config(flat: Mapping[str, Any], *, extra_ok: tuple[str, ...] = (),
                     local_files: bool = True) -> RunConfig:
    """Parse Flower's flat run config (dashed keys) into a validated :class:`RunConfig`.

    ``local_files=False`` skips the check that ``secagg-ca`` / ``secagg-sim-identities``
    exist on this machine: a deployment client parses the coordinator's run config, whose
    paths name the coordinator's files (the client pins its own CA, from its node config).
    """
    unknown = sorted(k for k in flat if k not in DEFAULTS and not k.startswith(extra_ok or "\0"))
    if unknown:
        raise ConfigError(f"unknown run config keys {unknown}; known keys: {sorted(DEFAULTS)}")
    v: dict[str, Scalar] = {k: _typed(k, flat.get(k, d), d) for k, d in DEFAULTS.items()}
    method = str(v["method"])
    if method not in METHODS:
        raise UnknownNameError(f"unknown adapter method {method!r}; known: {sorted(METHODS)}")
    settings = METHODS[method].parse(v)
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
                                  corrupt_fraction=float(v["secagg-corrupt-fraction"]),
                                  threshold=int(v["secagg-threshold"]) or None,
                                  degree=int(v["secagg-degree"]) or None)
        except SecAggError as exc:
            raise ConfigError(f"secure aggregation settings: {exc}") from exc
    secagg_ca, sim_identities = _secagg_files(v, secagg is not None, local_files)
    level = str(v["dp-level"])
    if level not in DP_LEVELS:
        raise ConfigError(f"dp-level={level!r} must be one of {list(DP_LEVELS)}")
    if not bool(v["dp"]) and level != "record":
        raise ConfigError(f"dp=false with dp-level={level!r}: say which you mean; set dp=true "
                          "for a private run, or drop dp-level for a non-private one")
    user_dp = UserDPConfig()
    user_canaries = int(v["audit-user-canaries"])
    if user_canaries and not (bool(v["dp"]) and level == "user"):
        raise ConfigError(f"audit-user-canaries={user_canaries} audits user-level DP: set "
                          "dp = true and dp-level = 'user' (a canary client has no records, "
                          "so it cannot run record-level DP-SGD), or 0")
    if bool(v["dp"]) and level in ("user", "both"):
        if secagg is None:
            # security: the distributed noise protects a user only inside the secure sum
            raise ConfigError(f"dp-level={level!r} needs secagg=true: each client adds only a "
                              "share of the noise, so its update must never be seen alone")
        user_budget = float(v["dp-user-budget"])
        user_dp = UserDPConfig(
            enabled=True, target_epsilon=float(v["dp-user-epsilon"]),
            delta=float(v["dp-user-delta"]), clip=float(v["dp-user-clip"]),
            participations=int(v["dp-user-participations"]) or int(v["num-rounds"]),
            colluders=int(v["dp-user-colluders"]),
            epsilon_max=user_budget if user_budget > 0 else None,
            clip_quantile=float(v["dp-user-clip-quantile"]),
            clip_lr=float(v["dp-user-clip-lr"]),
            clip_count_std=float(v["dp-user-clip-count-std"]),
            canaries=user_canaries)
    dp = DPConfig()
    gradient_canaries = int(v["audit-gradient-canaries"])
    if gradient_canaries and not (bool(v["dp"]) and level in ("record", "both")):
        raise ConfigError(f"audit-gradient-canaries={gradient_canaries} audits record-level "
                          "DP-SGD: set dp = true and dp-level = 'record' or 'both', or 0")
    if int(v["batch-clients"]) > 1 and not METHODS[method].batchable:
        raise ConfigError(f"batch-clients={v['batch-clients']}: method {method!r} trains layers "
                          "that batched training cannot route per row (norm biases, (IA)3 "
                          "scales); set batch-clients = 1 (train clients one by one)")
    if gradient_canaries and int(v["batch-clients"]) > 1:
        raise ConfigError(f"audit-gradient-canaries={gradient_canaries} instruments one "
                          f"client's DP-SGD at a time; set batch-clients = 1 (it is "
                          f"{v['batch-clients']}) for an audited run")
    if bool(v["dp"]) and level in ("record", "both"):
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
            grad_sample_mode=_grad_sample_mode(str(v["dp-grad-sample-mode"]), method),  # type: ignore[arg-type]
            accountant=str(v["dp-accountant"]),  # type: ignore[arg-type]
            planned_rounds=int(v["dp-planned-rounds"]) or int(v["num-rounds"]),
            epsilon_max=budget if budget > 0 else (target if sigma == 0.0 else None),
            gradient_canaries=gradient_canaries,
        )
    data = _data_config(v)
    v["num-labels"] = _num_labels(int(v["num-labels"]), data)
    return RunConfig(
        preset=str(v["preset"]),
        secagg=secagg,
        dp=dp,
        user_dp=user_dp,
        ledger_dir=str(v["ledger-dir"]),
        secagg_ca=secagg_ca,
        secagg_sim_identities=sim_identities,
        model=ModelConfig(name=str(v["model"]), task=task,  # type: ignore[arg-type]
                          num_hidden_layers=layers or None, num_labels=int(v["num-labels"]),
                          max_length=int(v["max-length"]),
                          pooling=str(v["pooling"])),  # type: ignore[arg-type]
        adapter=AdapterConfig(method=method, settings=settings),
        data=data,
        train=TrainConfig(local_steps=int(v["local-steps"]), batch_size=int(v["batch-size"]),
                          lr=float(v["lr"]), head_lr=float(v["head-lr"]),
                          optimizer=str(v["optimizer"]),
                          momentum=float(v["momentum"]), weight_decay=float(v["weight-decay"]),
                          lr_final_fraction=float(v["lr-final-fraction"])),
        cohort=CohortConfig(clients=int(v["batch-clients"]), rows=int(v["batch-rows"])),
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



def _data_config(v: Mapping[str, Scalar]) -> DataConfig:
    task, dataset = str(v["task"]), str(v["dataset"])
    return DataConfig(dataset=dataset, path=str(v["data-path"]),
                      eval_path=str(v["eval-path"]), partitioner=str(v["partitioner"]),
                      dirichlet_alpha=float(v["dirichlet-alpha"]),
                      max_examples_per_client=int(v["max-examples-per-client"]),
                      eval_examples=int(v["eval-examples"]),
                      eval_subset=str(v["eval-subset"]),
                      canaries=int(v["audit-canaries"]),
                      format=str(v["data-format"]), text_column=str(v["data-text-column"]),
                      label_column=str(v["data-label-column"]),
                      user_column=str(v["data-user-column"]),
                      label_names=str(v["data-label-names"]), header=str(v["data-header"]),
                      min_user_examples=int(v["data-min-user-examples"]),
                      eval_format=str(v["eval-format"]),
                      eval_text_column=str(v["eval-text-column"]),
                      eval_label_column=str(v["eval-label-column"]),
                      eval_header=str(v["eval-header"]),
                      file_task=task if dataset == "file" else "",
                      chat_model=str(v["model"]) if task == "causal_lm" and dataset == "file"
                      else "")


def parse_data_config(flat: Mapping[str, Any]) -> DataConfig:
    """Only the data concern of a flat run config (``fedpeft data inspect``): the data knobs
    and ``task`` / ``model``, every other key at its default and not validated."""
    unknown = sorted(k for k in flat if k not in DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown run config keys {unknown}; known keys: {sorted(DEFAULTS)}")
    return _data_config({k: _typed(k, flat.get(k, d), d) for k, d in DEFAULTS.items()})


def _num_labels(knob: int, data: DataConfig) -> int:
    """``num-labels`` resolved against the data: 0 takes the data's label count; any other
    value must equal it (a head narrower than the labels fails inside the loss; a wider one
    trains classes no example has)."""
    if knob < 0 or knob == 1:
        raise ConfigError(f"num-labels={knob} must be 0 (from the data) or >= 2")
    found = label_count(data)
    if found is None:  # causal LM (the knob is not read) or no labels to compare with
        return knob or 2
    if knob and knob != found:
        where = f"data-path={data.path!r}" if data.dataset == "file" else f"dataset={data.dataset!r}"
        raise DataError(f"num-labels={knob}, but {where} has {found} labels: set num-labels="
                        f"{found} (or 0, from the data), or point data-label-column at the "
                        "label column (`fedpeft data inspect FILE` shows the columns)")
    if found < 2:
        raise DataError(f"data-path={data.path!r} has {found} label: a classifier needs at "
                        "least 2; check data-label-column (`fedpeft data inspect FILE`)")
    return found


def data_partitions(run: RunConfig, population: int) -> int:
    """How many of ``population`` clients hold data: all but the user-level audit's canary
    clients, which are the last ``audit-user-canaries`` partitions."""
    n = population - run.user_dp.canaries
    if n < 1:
        raise ConfigError(f"{population} clients leave none with data beside "
                          f"audit-user-canaries={run.user_dp.canaries}: add clients")
    return n


def is_user_canary(run: RunConfig, partition_id: int, population: int) -> bool:
    """Whether partition ``partition_id`` of ``population`` is a user-level canary client."""
    return run.user_dp.canaries > 0 and partition_id >= population - run.user_dp.canaries


def planned_clients(run: RunConfig, population: int) -> int:
    """Clients a round asks for: ``clients-per-round`` of ``population`` (all when 0)."""
    k = run.federation.clients_per_round
    return population if k <= 0 or k >= population else k


def user_round_plan(run: RunConfig, population: int, dimension: int) -> RoundPlan:
    """The user-level plan of this run's rounds, the same on every client and the coordinator
    (:func:`fedpeft.privacy.user_level.round_plan`): the field and threshold of a round of
    :func:`planned_clients` of ``population``, an update of ``dimension`` coordinates.

    The SecAgg graph of a user-level round is the complete one unless ``secagg-degree`` is
    set (:meth:`SecAggConfig.resolve_complete`): its threshold, the most noise shares every
    client can verify are in the sum, is the largest, so each client adds the least noise.

    One threat model: the noise counts at least the colluders SecAgg's threshold tolerates,
    ``floor(secagg-corrupt-fraction x clients)``; a lower ``dp-user-colluders`` is raised to
    it (more noise, never less), so a coalition the masking is planned against cannot strip
    more noise shares than the accounting assumes.

    Raises :class:`ConfigError` naming the knob when user-level DP is off or the plan cannot
    meet its target (before any round runs)."""
    if run.secagg is None or not run.user_dp.enabled:
        raise ConfigError("user-level DP needs dp-level = 'user' or 'both' and secagg=true")
    n = planned_clients(run, population)
    try:
        resolved = run.secagg.resolve_complete(n)
    except SecAggError as exc:
        raise ConfigError(f"user-level DP plans rounds of {n} clients: {exc}") from exc
    user_dp = user_dp_against_colluders(run.user_dp, run.secagg, n)
    try:
        return round_plan(user_dp, planned_clients=n,
                          threshold=int(resolved.threshold or 0), dimension=dimension,
                          bits=run.secagg.bits)
    except ConfigError as exc:
        raise ConfigError(
            f"user-level DP cannot meet dp-user-epsilon={run.user_dp.target_epsilon} over "
            f"dp-user-participations={run.user_dp.participations} with secagg-bits="
            f"{run.secagg.bits} and rounds of {n} clients (SecAgg threshold "
            f"{resolved.threshold}, {user_dp.colluders} colluders from dp-user-colluders="
            f"{run.user_dp.colluders} and secagg-corrupt-fraction="
            f"{run.secagg.corrupt_fraction}): {exc}. Raise secagg-bits or clients-per-round, "
            "or lower dp-user-participations") from exc


def user_dp_against_colluders(user_dp: UserDPConfig, secagg: SecAggConfig,
                              n: int) -> UserDPConfig:
    """``user_dp`` counting at least the colluders SecAgg tolerates in rounds of ``n``."""
    tolerated = secagg_colluders(n, secagg.corrupt_fraction)
    if user_dp.colluders >= tolerated:
        return user_dp
    return replace(user_dp, colluders=tolerated)  # security: never fewer than SecAgg's
