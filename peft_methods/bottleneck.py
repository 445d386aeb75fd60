"""Bottleneck adapters: serial (Houlsby et al., ICML 2019, "Parameter-Efficient Transfer
Learning for NLP") and parallel (He et al., ICLR 2022, "Towards a Unified View of
Parameter-Efficient Transfer Learning").

A bottleneck ``f(x) = s * W_up act(W_down x + b_down) + b_up`` (``W_down``: hidden -> ``size``)
is added to a frozen transformer:

- **serial** (Houlsby): after a sublayer's output projection, before the residual sum,
  ``h <- h + f(h)``; by default after the attention output and after the feed-forward output of
  every layer;
- **parallel** (He et al.): beside the feed-forward sublayer, reading its input,
  ``h <- FFN(x) + f(x)``; by default beside every layer's feed-forward block.

``W_up`` and ``b_up`` start at zero, so the adapted model starts as the base model (Houlsby's
near-identity initialisation; ``W_down`` is drawn with standard deviation 0.01).

Why our own: PEFT 0.21 has no bottleneck adapters and AdapterHub's ``adapters`` cannot be
installed beside transformers 5 (docs/methods.md). The two projections are plain ``nn.Linear``
modules called in the forward pass, so every Opacus engine computes exact per-example
gradients without a rule of ours, and batched multi-client training routes them per row.

The export is this project's format (:mod:`fedpeft.peft_methods.own_format`), with the
settings and the wrapped module names; :func:`load_bottleneck` puts the same adapters into a
fresh base model and loads the tensors after checking every name, shape and dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from fedpeft.core.errors import ConfigError, ModelError, PayloadError
from fedpeft.core.models import BaseModel, ModelConfig
from fedpeft.core.protocol import Scalar
from fedpeft.peft_methods.base import (
    AdaptedModel,
    InPlaceAdaptedModel,
    MethodEntry,
    build_on_fresh_base,
    head_name,
    register_method,
)
from fedpeft.peft_methods.own_format import (
    check_tensors,
    copy_into,
    head_parameters,
    read_export,
    write_export,
)

PLACEMENTS = ("serial", "parallel")
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
#: Largest bottleneck width accepted (a bound for the settings and for the export reader).
MAX_SIZE = 4096
#: Largest scaling accepted (He et al. use 4 for the parallel adapter).
MAX_SCALING = 1000.0
#: An export wraps at most this many modules (a bound for the reader).
MAX_TARGETS = 10_000
#: The residual sublayer outputs of BERT-style encoders: ``LayerNorm(dropout(dense(h)) + x)``.
_RESIDUAL_NORM_CLASSES = {"serial": ("BertSelfOutput", "BertOutput"), "parallel": ("BertOutput",)}
#: Default targets (module-name suffixes) of decoder architectures without such blocks.
_DEFAULT_SUFFIXES: dict[str, dict[str, tuple[str, ...]]] = {
    arch: {"serial": ("self_attn.o_proj", "mlp.down_proj"), "parallel": ("mlp",)}
    for arch in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")}
#: The wrapper kinds, by what the target is (recorded in the export and checked on load).
KINDS = ("linear", "residual-norm", "block")


@dataclass(frozen=True)
class BottleneckSettings:
    """Bottleneck adapter settings. ``target_modules=None`` picks the placement's defaults for
    the architecture (module docstring); otherwise adapters wrap every module whose name ends
    with one of them."""

    placement: str = "serial"
    size: int = 8
    activation: str = "relu"
    scaling: float = 1.0
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"bottleneck-placement={self.placement!r}: choose one of "
                              f"{list(PLACEMENTS)}")
        if not 1 <= self.size <= MAX_SIZE:
            raise ConfigError(f"bottleneck-size={self.size}: the bottleneck width must be in "
                              f"[1, {MAX_SIZE}]")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"bottleneck-activation={self.activation!r}: choose one of "
                              f"{sorted(ACTIVATIONS)}")
        if not (math.isfinite(self.scaling) and 0.0 < self.scaling <= MAX_SCALING):
            raise ConfigError(f"bottleneck-scaling={self.scaling}: must be in (0, "
                              f"{MAX_SCALING:g}]")
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("bottleneck target_modules is empty: name at least one module "
                              "or leave bottleneck-targets unset for the architecture default")


class Bottleneck(nn.Module):
    """``s * up(act(down(x)))``, starting at zero (``up`` is zero-initialised)."""

    def __init__(self, dim: int, settings: BottleneckSettings, dtype: torch.dtype) -> None:
        super().__init__()
        self.down = nn.Linear(dim, settings.size, dtype=dtype)
        self.act = ACTIVATIONS[settings.activation]()
        self.up = nn.Linear(settings.size, dim, dtype=dtype)
        self.scaling = settings.scaling
        with torch.no_grad():
            nn.init.normal_(self.down.weight, std=1e-2)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.up(self.act(self.down(x)))
        return out * self.scaling if self.scaling != 1.0 else out


class AdapterWrapper(nn.Module):
    """A frozen module (``inner``) with a bottleneck adapter (``adapter``) in series or in
    parallel; ``kind`` says what ``inner`` is (one of :data:`KINDS`)."""

    def __init__(self, inner: nn.Module, adapter: Bottleneck, *, kind: str,
                 placement: str) -> None:
        super().__init__()
        if kind not in KINDS or placement not in PLACEMENTS:
            raise ModelError(f"no adapter wrapper of kind {kind!r} and placement {placement!r}")
        self.inner = inner
        self.adapter = adapter
        self.kind = kind
        self.placement = placement

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.kind == "residual-norm":  # LayerNorm(dropout(dense(h)) + x), BERT-style
            hidden = args[0] if args else kwargs["hidden_states"]
            residual = args[1] if len(args) > 1 else kwargs["input_tensor"]
            dense, dropout, norm = (self.inner.get_submodule(n)
                                    for n in ("dense", "dropout", "LayerNorm"))
            h = dropout(dense(hidden))
            if self.placement == "serial":
                return norm(h + self.adapter(h) + residual)
            return norm(h + self.adapter(residual) + residual)
        y = self.inner(*args, **kwargs)
        if not isinstance(y, torch.Tensor):
            raise ModelError(f"bottleneck adapter target {type(self.inner).__name__} returns "
                             f"{type(y).__name__}, not a tensor; choose other "
                             "bottleneck-targets")
        if self.placement == "serial":
            return y + self.adapter(y)
        x = args[0] if args else next(iter(kwargs.values()))
        return y + self.adapter(x)


def _kind_and_dim(module: nn.Module, placement: str, hidden: int) -> tuple[str, int]:
    """What kind of target ``module`` is, and the width the adapter reads and writes."""
    if isinstance(module, nn.Linear):
        if placement == "parallel" and module.in_features != module.out_features:
            raise ModelError(
                f"a parallel bottleneck adapter beside a linear layer needs equal input and "
                f"output widths, this one maps {module.in_features} -> {module.out_features}; "
                "target a whole sublayer (e.g. the feed-forward block) or use "
                "bottleneck-placement = serial")
        return "linear", int(module.out_features)
    if all(isinstance(getattr(module, a, None), nn.Module) for a in ("dense", "dropout",
                                                                     "LayerNorm")) \
            and type(module).__name__ in _RESIDUAL_NORM_CLASSES["serial"]:
        dense = module.dense
        if not isinstance(dense, nn.Linear):
            raise ModelError(f"{type(module).__name__}.dense is not nn.Linear")
        return "residual-norm", int(dense.out_features)
    return "block", hidden


def _default_targets(model: nn.Module, architecture: str, placement: str,
                     name: str) -> Callable[[str, nn.Module], bool]:
    classes = _RESIDUAL_NORM_CLASSES[placement]
    if any(type(m).__name__ in classes for m in model.modules()):
        return lambda _n, m: type(m).__name__ in classes
    suffixes = _DEFAULT_SUFFIXES.get(architecture, {}).get(placement)
    if suffixes is None:
        raise ConfigError(f"bottleneck adapters have no default {placement} placement for "
                          f"architecture {architecture!r} (model {name!r}); set "
                          "bottleneck-targets to the modules to wrap")
    return _suffix_match(suffixes)


def _suffix_match(suffixes: Sequence[str]) -> Callable[[str, nn.Module], bool]:
    return lambda n, _m: any(n == s or n.endswith(f".{s}") for s in suffixes)


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(hidden, int):
        inner = getattr(model, "encoder", None)
        hidden = getattr(getattr(inner, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise ModelError(f"{type(model).__name__} has no config.hidden_size for the adapter")
    return hidden


def _wrappers(model: nn.Module, targets: Sequence[tuple[str, str]],
              settings: BottleneckSettings) -> dict[str, AdapterWrapper]:
    """New wrappers for ``(name, kind)`` targets of ``model`` (not yet put in place)."""
    hidden = _hidden_size(model)
    dtype = next(model.parameters()).dtype
    out: dict[str, AdapterWrapper] = {}
    modules = dict(model.named_modules())
    for name, kind in targets:
        module = modules.get(name)
        if module is None or not name:
            raise ModelError(f"bottleneck adapter target {name!r} is not a module of the model")
        found, dim = _kind_and_dim(module, settings.placement, hidden)
        if found != kind:
            raise ModelError(f"bottleneck adapter target {name!r} is a {found} module, the "
                             f"adapter was built for a {kind} one")
        out[name] = AdapterWrapper(module, Bottleneck(dim, settings, dtype), kind=kind,
                                   placement=settings.placement)
    return out


def _put_in_place(model: nn.Module, wrappers: Mapping[str, AdapterWrapper]) -> None:
    for name, wrapper in wrappers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrapper)


def _unreached(model: nn.Module, wrappers: Mapping[str, AdapterWrapper]) -> list[str]:
    """Targets whose adapter gets no gradient (the module's output is unused, as BERT's pooler
    under mean pooling): training them would only add noisy coordinates."""
    params = [p for w in wrappers.values() for p in w.adapter.parameters()]
    ids = torch.tensor([[1, 2, 3, 4]])
    for p in params:
        p.grad = None
    try:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        if not logits.requires_grad:
            return list(wrappers)
        logits.float().sum().backward()
        return [n for n, w in wrappers.items() if any(p.grad is None
                                                      for p in w.adapter.parameters())]
    finally:
        for p in params:
            p.grad = None


class BottleneckModel(InPlaceAdaptedModel):
    """A frozen base model with bottleneck adapters (and the head, for classification)."""

    method: ClassVar[str] = "bottleneck"

    def __init__(self, base: BaseModel, settings: BottleneckSettings) -> None:
        super().__init__(base)
        self.settings = settings
        head = head_name(self.model) if self.task == "classification" else None
        if settings.target_modules is None:
            chosen = _default_targets(self.model, base.architecture, settings.placement,
                                      base.config.name)
        else:
            chosen = _suffix_match(settings.target_modules)
        hidden = _hidden_size(self.model)
        targets: list[tuple[str, str]] = []
        for name, module in self.model.named_modules():
            if not name or (head and (name == head or name.startswith(f"{head}."))):
                continue
            if chosen(name, module):
                if any(name.startswith(f"{t}.") for t, _k in targets):
                    continue  # inside a module already wrapped
                targets.append((name, _kind_and_dim(module, settings.placement, hidden)[0]))
        if not targets:
            what = ("the default modules" if settings.target_modules is None
                    else f"bottleneck-targets {list(settings.target_modules)}")
            raise ModelError(f"{what} match no module of {base.config.name!r}; choose other "
                             "bottleneck-targets")
        for p in self.model.parameters():
            p.requires_grad_(False)
        wrappers = _wrappers(self.model, targets, settings)
        _put_in_place(self.model, wrappers)
        unused = _unreached(self.model, wrappers)
        if unused:
            raise ModelError(f"bottleneck adapter targets {unused[:3]} of {base.config.name!r} "
                             "do not reach the model's output (their gradient is always "
                             "zero); choose other bottleneck-targets")
        self.targets: tuple[tuple[str, str], ...] = tuple(targets)
        self.train_head()

    def export_peft(self, directory: str | Path) -> Path:
        """Not a PEFT method: this project's format (module docstring)."""
        tensors = {n.removeprefix("model."): p for n, p in self.adapter_parameters().items()}
        s = self.settings
        fields = {"settings": {"placement": s.placement, "size": s.size,
                               "activation": s.activation, "scaling": s.scaling},
                  "targets": [[n, k] for n, k in self.targets]}
        return write_export(directory, method=self.method, base_model=self.base_info.source,
                            task=self.task, tensors=tensors, fields=fields)


def _export_settings(config: Mapping[str, Any], where: str
                     ) -> tuple[BottleneckSettings, list[tuple[str, str]]]:
    raw, targets = config.get("settings"), config.get("targets")
    if not isinstance(raw, dict) or not isinstance(targets, list) \
            or not 0 < len(targets) <= MAX_TARGETS:
        raise PayloadError(f"{where}: settings or targets (1 to {MAX_TARGETS}) missing")
    try:
        settings = BottleneckSettings(
            placement=str(raw["placement"]), size=int(raw["size"]),
            activation=str(raw["activation"]), scaling=float(raw["scaling"]))
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise PayloadError(f"{where}: bad settings {raw!r}: {exc}") from exc
    pairs = []
    for t in targets:
        if not (isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t)
                and t[1] in KINDS):
            raise PayloadError(f"{where}: a target is not [module name, one of {KINDS}]: "
                               f"{str(t)[:80]}")
        pairs.append((t[0], t[1]))
    return settings, pairs


def load_bottleneck(model: nn.Module, directory: str | Path) -> nn.Module:
    """Put the exported bottleneck adapters into ``model`` (a fresh base model, as
    ``load_fresh`` gives) and load their tensors (and the head's), in place.

    Raises :class:`PayloadError` when the export is not a bottleneck export, is malformed, or
    does not fit the model (a target it lacks, a tensor name, shape or dtype); nothing is
    changed then.
    """
    where = f"bottleneck export {directory}"
    config, tensors = read_export(directory, "bottleneck", "bottleneck adapter")
    settings, targets = _export_settings(config, where)
    try:
        wrappers = _wrappers(model, targets, settings)
    except ModelError as exc:
        raise PayloadError(f"{where} does not fit this model: {exc}") from exc
    # only the adapters and the head: an export cannot overwrite the base model's weights
    expected = head_parameters(model)
    adapter_params = {f"{name}.adapter.{pn}": p for name, w in wrappers.items()
                      for pn, p in w.adapter.named_parameters()}
    expected.update(adapter_params)
    check_tensors(tensors, expected, where)
    missing = sorted(set(adapter_params) - set(tensors))
    if missing:
        raise PayloadError(f"{where} lacks adapter tensors {missing[:3]}")
    _put_in_place(model, wrappers)
    copy_into(tensors, expected)
    return model


def build_bottleneck(base_config: ModelConfig, settings: BottleneckSettings,
                     seed: int = 0) -> AdaptedModel:
    """Build a bottleneck-adapter model on a fresh copy of the base (it rewrites the tree)."""
    return build_on_fresh_base(BottleneckModel, base_config, settings, seed)


#: The run-config knobs bottleneck adapters read (targets: comma-separated module-name
#: suffixes; empty: the placement's defaults for the architecture).
KNOBS: dict[str, Scalar] = {"bottleneck-placement": "serial", "bottleneck-size": 8,
                            "bottleneck-activation": "relu", "bottleneck-scaling": 1.0,
                            "bottleneck-targets": ""}


def parse_knobs(v: Mapping[str, Scalar]) -> BottleneckSettings:
    """Bottleneck settings from the typed flat run config."""
    names = tuple(t.strip() for t in str(v["bottleneck-targets"]).split(",") if t.strip())
    return BottleneckSettings(placement=str(v["bottleneck-placement"]),
                              size=int(v["bottleneck-size"]),
                              activation=str(v["bottleneck-activation"]),
                              scaling=float(v["bottleneck-scaling"]),
                              target_modules=names or None)


register_method(MethodEntry("bottleneck", BottleneckSettings, build_bottleneck,
                            "bottleneck adapters, serial (Houlsby) or parallel (He et al.)",
                            KNOBS, parse_knobs))
