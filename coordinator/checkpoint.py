"""Per-round checkpoints of the global adapter, and resume from the latest complete one.

Layout: ``RUN_DIR/checkpoints/round-0003/`` holds ``adapter/`` (Hugging Face PEFT format,
loadable with ``PeftModel.from_pretrained``), ``state.safetensors`` (global adapter tensors and
server optimiser state) and ``meta.json`` (round, run config, fingerprint). The directory is
written under a temporary name and renamed, so a checkpoint is either complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedpeft.core.errors import ConfigError, FedPeftError
from fedpeft.peft_methods.base import AdaptedModel


class CheckpointError(FedPeftError):
    """A checkpoint is unusable for this run."""


@dataclass(frozen=True)
class Checkpoint:
    round: int
    params: dict[str, torch.Tensor]
    opt_state: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: Path


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(run_dir: Path, server_round: int, model: AdaptedModel,
                    params: dict[str, torch.Tensor], opt_state: dict[str, torch.Tensor],
                    meta: dict[str, Any]) -> Path:
    """Write the checkpoint of ``server_round`` (``model`` must already hold ``params``)."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{server_round:04d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".round-{server_round:04d}-", dir=root))
    try:
        model.export_peft(tmp / "adapter")
        tensors = {f"param/{k}": v.contiguous() for k, v in params.items()}
        tensors.update({f"opt/{k}": v.contiguous() for k, v in opt_state.items()})
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({**meta, "round": server_round}, indent=2,
                                                  sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path, fingerprint: str) -> Checkpoint | None:
    """The latest complete checkpoint, or None. A checkpoint of another model/adapter errors."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return None
    rounds = sorted(p for p in root.iterdir() if p.name.startswith("round-")
                    and (p / "meta.json").is_file())
    if not rounds:
        return None
    path = rounds[-1]
    try:
        meta = json.loads((path / "meta.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable ({exc}); delete it to resume "
                              "from the one before, or start a new run directory") from exc
    if meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint {path} was made with model/adapter fingerprint "
            f"{meta.get('fingerprint')}, this run has {fingerprint}; use a new run-dir or set "
            "resume=false to start over")
    params = {k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")}
    opt = {k[len("opt/"):]: v for k, v in tensors.items() if k.startswith("opt/")}
    server_round = int(meta.get("round", 0))
    if server_round < 1:
        raise ConfigError(f"checkpoint {path} has round={server_round}")
    return Checkpoint(round=server_round, params=params, opt_state=opt, meta=meta, path=path)
