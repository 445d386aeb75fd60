"""One client's work for a round, framework-free: load -> train -> privatize -> mask -> send.

The Flower ``ClientApp`` (``client/app.py``) only converts messages to and from the flat
dictionaries used here, so the whole client is testable without Flower. The frozen base model
and its adapter are shared by every client in the process (``peft_methods.get_adapted``); a
runtime holds only its own data and identity.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from client.trainer import Progress, TrainResult, local_train
from fedpeft.config import RunConfig
from fedpeft.errors import ConfigError, FedPeftError, PayloadError
from fedpeft.federation_data import client_corpus
from fedpeft.tokenize import Encoded, encode
from fedpeft.wire import decode
from fedpeft.wire import encode as encode_tensors
from peft_methods import get_adapted
from peft_methods.base import AdaptedModel

log = logging.getLogger(__name__)

Value = bool | int | float | str | bytes
Content = dict[str, Value]

STATUS_OK = "ok"
STATUS_ERROR = "error"


@dataclass(frozen=True)
class ClientIdentity:
    """Who this client is: a stable id, its data partition and where it keeps state."""

    client_id: str
    partition_id: int
    num_partitions: int
    state_dir: str = ""

    def __post_init__(self) -> None:
        if not self.client_id:
            raise ConfigError("client_id is empty; give each client a stable id")
        if not 0 <= self.partition_id < self.num_partitions:
            raise ConfigError(f"partition-id={self.partition_id} is outside "
                              f"[0, num-partitions={self.num_partitions})")


def _require(content: Mapping[str, Value], key: str, kind: type) -> Value:
    if key not in content:
        raise PayloadError(f"message lacks {key!r}; coordinator and client versions differ")
    value = content[key]
    if not isinstance(value, kind):
        raise PayloadError(f"message field {key!r} is {type(value).__name__}, expected "
                           f"{kind.__name__}")
    return value


class ClientRuntime:
    """A client's data and identity, plus the round pipeline."""

    def __init__(self, run: RunConfig, identity: ClientIdentity) -> None:
        self.run = run
        self.identity = identity
        self._data: Encoded | None = None

    @property
    def model(self) -> AdaptedModel:
        return get_adapted(self.run.model, self.run.adapter, self.run.seed)

    def data(self) -> Encoded:
        if self._data is None:
            corpus = client_corpus(self.run.data, self.identity.partition_id,
                                   self.identity.num_partitions, self.run.seed)
            self._data = encode(corpus, self.model.base_info.tokenizer, self.run.model.max_length)
        return self._data

    # -- the round pipeline ------------------------------------------------------------------
    def handle_train(self, content: Mapping[str, Value]) -> Content:
        """Run one round. Errors are returned as a status, never raised to the framework."""
        try:
            return self._train_round(content)
        except FedPeftError as exc:
            log.warning("client %s: round failed: %s", self.identity.client_id, exc)
            return {"status": STATUS_ERROR, "reason": f"{type(exc).__name__}: {exc}",
                    "client-id": self.identity.client_id}

    def _train_round(self, content: Mapping[str, Value]) -> Content:
        fingerprint = _require(content, "fingerprint", str)
        if fingerprint != self.run.fingerprint():
            raise ConfigError(f"coordinator's model/adapter fingerprint {fingerprint} differs "
                              f"from this client's {self.run.fingerprint()}: both must run the "
                              "same model and adapter config")
        server_round = int(_require(content, "round", int))  # type: ignore[arg-type]
        payload = _require(content, "adapter", bytes)
        model = self.model
        global_state = decode(payload, model.spec())  # type: ignore[arg-type]
        model.load_adapter_state(global_state)
        data = self.data()
        result = self._train(model, data, server_round)
        delta = {k: v - global_state[k] for k, v in model.adapter_state().items()}
        delta = self._privatize(delta)
        update = self._mask(delta)
        return self._send(update, result, server_round)

    def _train(self, model: AdaptedModel, data: Encoded, server_round: int) -> TrainResult:
        generator = torch.Generator().manual_seed(
            (self.run.seed * 1_000_003 + self.identity.partition_id) * 10_007 + server_round)
        progress = None
        if self.run.progress:
            progress = _progress_printer(f"client {self.identity.client_id} round {server_round}")
        return local_train(model, data, self.run.train, generator=generator, progress=progress)

    def _privatize(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Extension point: record-level DP happens inside training (DP-SGD); off here."""
        return delta

    def _mask(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Extension point: secure aggregation masks the update; off here."""
        return delta

    def _send(self, update: dict[str, torch.Tensor], result: TrainResult,
              server_round: int) -> Content:
        blob = encode_tensors(update)
        return {
            "status": STATUS_OK,
            "client-id": self.identity.client_id,
            "round": server_round,
            "num-examples": result.examples,
            "steps": result.steps,
            "train-loss": result.mean_loss,
            "train-loss-first": result.losses[0],
            "train-loss-last": result.losses[-1],
            "train-seconds": result.seconds,
            "update": blob,
            "update-bytes": len(blob),
        }


def _progress_printer(desc: str) -> Progress:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return lambda step, total, loss: None
    bar: list[tqdm] = []

    def update(step: int, total: int, loss: float) -> None:
        if not bar:
            bar.append(tqdm(total=total, desc=desc, file=sys.stderr, leave=False,
                            mininterval=1.0))
        bar[0].update(1)
        bar[0].set_postfix(loss=f"{loss:.3f}", refresh=False)
        if step == total:
            bar[0].close()

    return update

