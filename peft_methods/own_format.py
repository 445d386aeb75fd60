"""This project's adapter export format, for methods PEFT does not have (BitFit, bottleneck
adapters; docs/methods.md, "The fedpeft export format").

A directory holds ``adapter_model.safetensors`` (the trained tensors under their names in the
base model) and ``fedpeft_adapter.json`` (``{"format": 1, "method": ..., "base_model": ...,
"task": ..., "tensors": {name: [shape, dtype]}, ...}`` plus the method's own fields). Reading
bounds the number of tensors, never unpickles, and raises only :class:`PayloadError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fedpeft.core.errors import PayloadError
from fedpeft.core.wire import check_json_depth
from fedpeft.peft_methods.base import CLASSIFIER_HEADS

FORMAT = 1
CONFIG_FILE = "fedpeft_adapter.json"
TENSORS_FILE = "adapter_model.safetensors"
#: An export holds at most this many tensors (a bound for the reader).
MAX_TENSORS = 10_000
#: ``fedpeft_adapter.json`` is at most this many bytes (a bound for the reader).
MAX_CONFIG_BYTES = 4 << 20
#: ``fedpeft_adapter.json`` nests at most this deep (``tensors`` -> name -> [shape, dtype]).
MAX_CONFIG_DEPTH = 4
#: ``adapter_model.safetensors`` is at most this many bytes (adapters are small; a bound).
MAX_TENSOR_FILE_BYTES = 1 << 30


def write_export(directory: str | Path, *, method: str, base_model: str, task: str,
                 tensors: Mapping[str, torch.Tensor], fields: Mapping[str, Any]) -> Path:
    """Write ``tensors`` and the config (with the method's own ``fields``) into ``directory``."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    flat = {n: t.detach().clone().contiguous() for n, t in tensors.items()}
    save_file(flat, str(path / TENSORS_FILE))
    config = {"format": FORMAT, "method": method, "base_model": base_model, "task": task,
              **fields,
              "tensors": {n: [list(t.shape), str(t.dtype).removeprefix("torch.")]
                          for n, t in sorted(flat.items())}}
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return path


def read_export(directory: str | Path, method: str, label: str
                ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and tensors of a ``method`` export (``label`` names it in errors)."""
    path = Path(directory)
    unreadable = f"{path} is not a readable {label} export ({CONFIG_FILE} + {TENSORS_FILE})"
    try:
        for name, bound in ((CONFIG_FILE, MAX_CONFIG_BYTES),
                            (TENSORS_FILE, MAX_TENSOR_FILE_BYTES)):
            size = (path / name).stat().st_size
            if size > bound:
                raise PayloadError(f"{path / name} is {size} bytes, more than {bound}")
        text = (path / CONFIG_FILE).read_bytes().decode("utf-8")
        check_json_depth(text, CONFIG_FILE, MAX_CONFIG_DEPTH)
        config = json.loads(text)
        tensors = load_file(str(path / TENSORS_FILE))
    except PayloadError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, SafetensorError) as exc:
        raise PayloadError(f"{unreadable}: {exc}") from exc
    if not isinstance(config, dict) or config.get("method") != method \
            or config.get("format") != FORMAT:
        raise PayloadError(f"{path / CONFIG_FILE} is not a {label} export of format {FORMAT}")
    if len(tensors) > MAX_TENSORS:
        raise PayloadError(f"{path} holds {len(tensors)} tensors, more than {MAX_TENSORS}")
    return config, tensors


def check_tensors(tensors: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor],
                  where: str) -> None:
    """:class:`PayloadError` unless every tensor names one of ``params`` with its shape and
    dtype (``where`` names the export in the message)."""
    problems = []
    for name, t in tensors.items():
        p = params.get(name)
        if p is None:
            problems.append(f"{name}: no such parameter")
        elif tuple(t.shape) != tuple(p.shape) or t.dtype != p.dtype:
            problems.append(f"{name}: got {tuple(t.shape)} {t.dtype}, expected "
                            f"{tuple(p.shape)} {p.dtype}")
    if problems:
        raise PayloadError(f"{where} does not fit this model: " + "; ".join(problems[:5]))


def head_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The classification head's parameters by name in ``model`` (none for a causal LM)."""
    name = next((h for h in CLASSIFIER_HEADS if isinstance(getattr(model, h, None), nn.Module)),
                None)
    if name is None:
        return {}
    return {f"{name}.{n}": p for n, p in getattr(model, name).named_parameters()}


def copy_into(tensors: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> None:
    """Copy checked ``tensors`` into ``params`` (after :func:`check_tensors`)."""
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
