"""The coordinator's round loop, framework-free (the Flower ``ServerApp`` only supplies a Transport).

Each round: sample clients -> send the global adapter -> collect updates (a faulty client is
dropped and recorded) -> aggregate -> server optimiser step -> evaluate -> checkpoint -> append
metrics. Resumes from the latest checkpoint of the run directory.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpeft.coordinator.aggregate import weighted_mean
from fedpeft.coordinator.checkpoint import latest_checkpoint, save_checkpoint
from fedpeft.coordinator.secure_round import secure_round
from fedpeft.coordinator.server_opt import ServerOptConfig, server_step
from fedpeft.coordinator.transport import Fault, Reply, Transport, classify_reply
from fedpeft.coordinator.user_level import CLIP_META_KEY, UserLevel, resumed_clip_of
from fedpeft.core.errors import ConfigError, FedPeftError
from fedpeft.core.protocol import (
    ADAPTER_KEY,
    CLIENT_ID_KEY,
    FINGERPRINT_KEY,
    KIND_TRAIN,
    LEDGER_HEAD_KEY,
    NUM_EXAMPLES_KEY,
    RECEIPT_KEY,
    ROUND_KEY,
    STATUS_BUDGET_EXHAUSTED,
    UPDATE_BYTES_KEY,
    UPDATE_KEY,
    Content,
)
from fedpeft.core.wire import decode
from fedpeft.core.wire import encode as encode_tensors
from fedpeft.data.federation import federated_split
from fedpeft.data.tokenize import Encoded, count_too_long, encode
from fedpeft.peft_methods import get_adapted
from fedpeft.peft_methods.base import AdaptedModel
from fedpeft.peft_methods.registry import initial_adapter_state
from fedpeft.runconfig.config import RunConfig, data_partitions, planned_clients
from fedpeft.runconfig.secagg_identity import read_trust_anchor
from fedpeft.secagg.config import SecAggConfig
from fedpeft.secagg.errors import SecAggError
from fedpeft.training.trainer import evaluate

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RECEIPTS_FILE = "ledger_receipts.json"


@dataclass
class RunSummary:
    rounds_completed: int = 0
    start_round: int = 0
    stopped_reason: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)


def select_clients(nodes: list[int], k: int, seed: int, server_round: int) -> list[int]:
    """Sample ``k`` of ``nodes`` uniformly without replacement (all if ``k`` is 0 or too big)."""
    ordered = sorted(nodes)
    if k <= 0 or k >= len(ordered):
        return ordered
    rng = np.random.default_rng([seed, server_round])
    return sorted(int(x) for x in rng.choice(ordered, size=k, replace=False))


class Coordinator:
    """Runs the federation over any :class:`Transport`."""

    def __init__(self, run: RunConfig, transport: Transport, run_dir: Path | None = None) -> None:
        self.run = run
        self.transport = transport
        self.run_dir = Path(run_dir or run.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fed = run.federation
        self.opt_cfg = ServerOptConfig(kind=fed.aggregation, lr=fed.server_lr,
                                       momentum=fed.server_momentum, beta1=fed.beta1,
                                       beta2=fed.beta2, tau=fed.tau)
        self._eval: Encoded | None = None
        self.privacy: dict[str, dict[str, Any]] = {}
        self.exhausted: set[int] = set()
        #: node id -> (client id, the ledger head it last reported): sent back as a receipt
        #: so that a client whose ledger was deleted or restored refuses to train.
        self.receipts: dict[int, tuple[str, str]] = self._load_receipts()
        #: user-level DP (dp-level user | both): plan, ledger, who may still join
        self.user: UserLevel | None = None
        #: clients of the federation (known once the run starts)
        self.num_partitions = 0
        #: the federation CA (secagg-ca): SecAgg+ rounds are authenticated; None: they are not
        self.trust = (read_trust_anchor(run.secagg_ca)
                      if run.secagg is not None and run.secagg_ca is not None else None)

    @property
    def model(self) -> AdaptedModel:
        return get_adapted(self.run.model, self.run.adapter, self.run.seed)

    def eval_data(self, num_partitions: int) -> Encoded:
        if self._eval is None:
            split = federated_split(self.run.data, data_partitions(self.run, num_partitions),
                                    self.run.seed)
            tokenizer, max_length = self.model.base_info.tokenizer, self.run.model.max_length
            self._eval = encode(split.eval, tokenizer, max_length)
            if self.run.data.dataset == "file":  # a user's own file: say what is truncated
                long_train = count_too_long(split.train, tokenizer, max_length)
                long_eval = count_too_long(split.eval, tokenizer, max_length)
                duplicates = len(split.train) - len(set(split.train.texts))
                if long_train or long_eval or duplicates:
                    print(f"fedpeft: data-path {self.run.data.path}: {long_train} of its "
                          f"{len(split.train)} rows and {long_eval} of the {len(split.eval)} "
                          f"evaluation rows are longer than max-length={max_length} tokens "
                          f"(truncated); {duplicates} rows repeat an earlier text (kept)",
                          file=sys.stderr)
        return self._eval

    def _meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"fingerprint": self.run.fingerprint(),
                                "run_config": self.run.as_flat()}
        if self.num_partitions:  # the split (and its audit canaries) depend on it
            meta["num_partitions"] = self.num_partitions
        if self.user is not None and self.run.user_dp.adaptive:
            meta[CLIP_META_KEY] = self.user.clip  # the next round's clip (resume)
        return meta

    def _load_receipts(self) -> dict[int, tuple[str, str]]:
        path = self.run_dir / RECEIPTS_FILE
        if not path.is_file():
            return {}
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            return {int(node): (str(v["client-id"]), str(v["head"])) for node, v in doc.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FedPeftError(f"{path} is unreadable ({exc}); it holds the clients' ledger "
                               "receipts: restore it, or move it away to run without them") from exc

    def _receipt_fields(self, chosen: list[int]) -> dict[int, Content]:
        """Per-node train-message fields: the receipt of the node's last ledger head."""
        if not self.run.dp.enabled:
            return {}
        return {n: {RECEIPT_KEY: "\n".join(self.receipts[n])} for n in chosen
                if n in self.receipts}

    def _keep_receipts(self, client_rows: list[dict[str, Any]]) -> None:
        changed = False
        for r in client_rows:
            head, node = r.get(LEDGER_HEAD_KEY), r.get("node")
            if isinstance(head, str) and isinstance(node, int):
                self.receipts[node] = (str(r.get(CLIENT_ID_KEY, node)), head)
                changed = True
        if changed:
            doc = {str(n): {"client-id": c, "head": h} for n, (c, h) in sorted(self.receipts.items())}
            tmp = self.run_dir / (RECEIPTS_FILE + ".tmp")
            tmp.write_text(json.dumps(doc, indent=1, sort_keys=True), encoding="utf-8")
            os.replace(tmp, self.run_dir / RECEIPTS_FILE)

    def _append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")

    def _check_secagg_plan(self, secagg: SecAggConfig, n: int) -> None:
        """Fail before round 1, naming the knobs, when no SecAgg+ round of ``n`` clients can
        meet the abort target (otherwise every round would abort)."""
        try:
            secagg.resolve(n, authenticated=self.trust is not None)
        except SecAggError as exc:
            raise ConfigError(
                f"secure aggregation cannot plan rounds of {n} clients: {exc}. Raise "
                "secagg-max-abort, lower secagg-dropout or secagg-corrupt-fraction, or run "
                "more clients per round") from exc

    def run_federation(self) -> RunSummary:
        fed = self.run.federation
        model = self.model
        spec = model.spec()
        params = initial_adapter_state(self.run.model, self.run.adapter, self.run.seed)
        model.load_adapter_state(params)
        opt_state: dict[str, torch.Tensor] = {}
        start = 0
        resumed_clip: float | None = None
        if self.run.resume:
            ckpt = latest_checkpoint(self.run_dir, self.run.fingerprint())
            if ckpt is not None:
                model.load_adapter_state(ckpt.params)
                params, opt_state, start = model.adapter_state(), ckpt.opt_state, ckpt.round
                if self.run.user_dp.adaptive:
                    resumed_clip = resumed_clip_of(ckpt.meta, ckpt.path)
                log.info("resuming from %s (round %d)", ckpt.path, start)
        (self.run_dir / "run_config.json").write_text(json.dumps(self._meta(), indent=2,
                                                                 sort_keys=True))
        summary = RunSummary(start_round=start, rounds_completed=start)
        nodes = self.transport.node_ids()
        num_partitions = self.num_partitions = len(nodes)
        if self.run.user_dp.enabled:
            # the plan is checked here (a typed error naming the knob) before any round runs
            self.user = UserLevel(self.run, self.run_dir, num_partitions, spec,
                                  clip=resumed_clip)
        elif self.run.secagg is not None and fed.clients_per_round > 0:
            # a fixed round size: its plan is checked before any round (with every connected
            # client instead, the size can change as nodes come and go: checked per round)
            self._check_secagg_plan(self.run.secagg, planned_clients(self.run, num_partitions))
        if start == 0:
            metrics = evaluate(model, self.eval_data(num_partitions))
            row0 = {"round": 0, "eval": metrics, "time": time.time()}
            self._append_metrics(row0)
            summary.history.append(row0)
        rounds = range(start + 1, fed.num_rounds + 1)
        bar = _round_bar(len(rounds), start, self.run.progress)
        for server_round in rounds:
            t0 = time.perf_counter()
            nodes = [n for n in self.transport.node_ids() if n not in self.exhausted]
            if self.user is not None:
                nodes = self.user.eligible(nodes)
                planned = self.user.plan.planned_clients
                if len(nodes) < planned:
                    # a smaller round has a smaller SecAgg threshold: it cannot carry the
                    # planned noise shares, and every client would refuse it
                    summary.stopped_reason = (
                        f"round {server_round}: only {len(nodes)} users may still join (the "
                        f"others reached dp-user-participations="
                        f"{self.run.user_dp.participations} or their budget); the user-level "
                        f"plan needs rounds of {planned}")
                    break
            if len(nodes) < fed.min_clients:
                why = (f"{len(self.exhausted)} clients have exhausted their privacy budget and "
                       if self.exhausted else "")
                summary.stopped_reason = (f"round {server_round}: {why}only {len(nodes)} "
                                          f"clients are available, min-clients is "
                                          f"{fed.min_clients}")
                break
            chosen = select_clients(nodes, fed.clients_per_round, self.run.seed, server_round)
            payload = encode_tensors(params)
            message: Content = {ROUND_KEY: server_round, FINGERPRINT_KEY: self.run.fingerprint(),
                                ADAPTER_KEY: payload}
            if self.user is not None:
                message.update(self.user.round_fields())
            row: dict[str, Any] = {"round": server_round, "selected": len(chosen),
                                   "bytes_down": len(payload) * len(chosen)}
            delta, reason = self._round_updates(chosen, message, spec, server_round, row)
            if delta is None:
                row["skipped"] = reason + "; global adapter unchanged"
                log.warning("round %d skipped: %s", server_round, row["skipped"])
            else:
                params, opt_state = server_step(params, delta, opt_state, self.opt_cfg)
                model.load_adapter_state(params)
            row["eval"] = evaluate(model, self.eval_data(num_partitions))
            save_checkpoint(self.run_dir, server_round, model, params, opt_state, self._meta())
            row["seconds"] = time.perf_counter() - t0
            row["time"] = time.time()
            self._append_metrics(row)
            summary.history.append(row)
            summary.rounds_completed = server_round
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in row["eval"].items()}, refresh=False)
            available = [n for n in self.transport.node_ids() if n not in self.exhausted]
            if "skipped" in row and self.exhausted and len(available) < fed.min_clients:
                summary.stopped_reason = (
                    f"round {server_round}: {len(self.exhausted)} clients have exhausted their "
                    f"privacy budget; {len(available)} remain, min-clients is {fed.min_clients}")
                break
        if bar is not None:
            bar.close()
        if summary.stopped_reason:
            log.error("run stopped: %s", summary.stopped_reason)
        return summary

    def _round_updates(self, chosen: list[int], message: Content, spec: Any, server_round: int,
                       row: dict[str, Any]) -> tuple[dict[str, torch.Tensor] | None, str]:
        """Collect this round's updates and return their mean (or None and the reason)."""
        fed = self.run.federation
        if self.run.secagg is not None:
            session = os.urandom(16) + server_round.to_bytes(8, "big")  # security: fresh per round
            field_round = (None if self.user is None
                           else self.user.field_round(server_round, session))
            # user level: the complete graph (its threshold is what the plan counts on)
            cfg = (self.run.secagg if self.user is None
                   else self.run.secagg.resolve_complete(len(chosen)))
            sec = secure_round(self.transport, chosen, message, cfg, spec, session,
                               fed.round_timeout, extras=self._receipt_fields(chosen),
                               field_round=field_round, trust=self.trust)
            client_rows, faults = sec.client_rows, sec.faults
            row.update({"secagg": {"survivors": len(sec.survivors), "threshold": sec.threshold,
                                   "degree": sec.degree, "aborted": sec.abort_reason or None,
                                   "clipped": sec.clipped,
                                   "clients_clipped": sec.clients_clipped}})
            if sec.clipped:
                log.warning(
                    "round %d: %d update coordinates of %d clients exceeded secagg-clip=%g and "
                    "were clipped to it, which biases the mean toward zero; raise secagg-clip "
                    "(docs/secagg.md, 'Choosing secagg-clip')", server_round, sec.clipped,
                    sec.clients_clipped, self.run.secagg.clip)
            row["bytes_up"] = sec.bytes_up
            if self.user is not None and self.user.last_clip_row is not None:
                row["dp_user_clip"] = self.user.last_clip_row
            if self.user is not None and sec.mean_delta is None:
                # a release is reserved before unmasking; nothing reserved: nothing released
                self.user.record_abort(server_round, sec.abort_reason or "no usable sum")
            ok = len(sec.survivors)
            result, reason = sec.mean_delta, sec.abort_reason
        else:
            receipts = self._receipt_fields(chosen)
            replies = self.transport.exchange(
                KIND_TRAIN, {n: {**message, **receipts.get(n, {})} for n in chosen},
                fed.round_timeout)
            updates, weights, faults, client_rows = self._collect(chosen, replies, spec)
            row["bytes_up"] = sum(int(r.get(UPDATE_BYTES_KEY, 0)) for r in client_rows)
            ok = len(updates)
            result, reason = None, ""
            if ok >= fed.min_clients:
                w = weights if fed.weighting == "examples" else [1.0] * ok
                result = weighted_mean(updates, w)
        row["ok"] = ok
        row["faults"] = faults
        losses = [float(r["train-loss"]) for r in client_rows if "train-loss" in r]
        row["train_loss"] = statistics.fmean(losses) if losses else None
        eps = sorted(float(r["dp-epsilon"]) for r in client_rows if "dp-epsilon" in r)
        if eps:
            row["dp_epsilon"] = {"min": eps[0], "median": statistics.median(eps), "max": eps[-1]}
        self._privacy_rows(client_rows, faults, row)
        row["clients"] = [{k: v for k, v in r.items() if not isinstance(v, bytes)}
                          for r in client_rows]
        if result is not None and ok < fed.min_clients:
            result = None
        if result is None and not reason:
            reason = f"{ok} usable updates < min-clients {fed.min_clients}"
        if self.run.dp.enabled:
            # What happened to DP this round: clients that trained spent privacy (their
            # ledgers hold the event) even when nothing was aggregated.
            spent = sum(1 for r in client_rows if "dp-epsilon" in r)
            seen = {str(r.get("node")) for r in client_rows}
            # a client that faulted or never replied may have trained (and spent) first
            maybe = len({f["node"] for f in faults if f.get("node") not in seen
                         and f.get("status") != STATUS_BUDGET_EXHAUSTED})
            row["dp_spent"] = spent
            row["dp_maybe_spent"] = maybe
            if result is None:
                if spent:
                    reason += (f"; {spent} clients trained with DP and spent privacy budget on "
                               "updates that were discarded (their ledgers record it)")
                if maybe:
                    reason += (f"; {maybe} selected clients faulted or did not reply and may "
                               "have spent privacy budget (their ledgers are authoritative)")
                if not spent and not maybe:
                    reason += "; no client trained: no privacy was spent"
        return result, reason

    def _privacy_rows(self, client_rows: list[dict[str, Any]], faults: list[dict[str, str]],
                      row: dict[str, Any]) -> None:
        """Keep each client's latest privacy report; count budget-exhausted clients."""
        self._keep_receipts(client_rows)
        for r in client_rows:
            if "dp-epsilon" in r:
                self.privacy[str(r.get(CLIENT_ID_KEY))] = {
                    k: v for k, v in r.items() if k.startswith("dp-") or k == ROUND_KEY}
        for f in faults:
            if f.get("status") == STATUS_BUDGET_EXHAUSTED:
                self.exhausted.add(int(f["node"]))
                prev = self.privacy.setdefault(f.get("client", f["node"]), {})
                prev["exhausted"] = True
        if self.run.dp.enabled:
            row["dp_exhausted"] = len(self.exhausted)
        if self.run.private:
            self._write_privacy_report(row)

    def _write_privacy_report(self, row: dict[str, Any]) -> None:
        doc: dict[str, Any] = {"levels": self.run.dp_level}
        if self.run.dp.enabled and self.user is not None:
            doc["record"] = {
                "level": "record", "delta": self.run.dp.delta,
                "epsilon_budget": self.run.dp.epsilon_max,
                "note": "At dp-level both the devices do not send their record-level "
                        "accounting (it reveals each device's dataset size, which is user data "
                        "at user level); each device's ledger holds it (fedpeft privacy report "
                        "<ledger-dir>)."}
        elif self.run.dp.enabled:
            doc["record"] = self._record_report()
        if self.user is not None:
            doc["user"] = user = self.user.report()
            row["dp_user_epsilon_max"] = user["summary"].get("epsilon_max", 0.0)
        (self.run_dir / "privacy_report.json").write_text(json.dumps(doc, indent=2))

    def _record_report(self) -> dict[str, Any]:
        eps = sorted(float(v["dp-epsilon"]) for v in self.privacy.values() if "dp-epsilon" in v)
        return {
            "level": "record",
            "accountant": "prv (rdp alongside)", "delta": self.run.dp.delta,
            "epsilon_budget": self.run.dp.epsilon_max,
            "clients": dict(sorted(self.privacy.items())),
            "summary": {"clients": len(self.privacy), "exhausted": len(self.exhausted),
                        **({"epsilon_min": eps[0], "epsilon_median": statistics.median(eps),
                            "epsilon_max": eps[-1]} if eps else {})},
            "note": "Collected from the clients' replies; each client's ledger on its device is "
                    "the record of truth (fedpeft privacy report <ledger-dir>).",
        }

    def _collect(self, chosen: list[int], replies: dict[int, Reply], spec: Any
                 ) -> tuple[list[dict[str, torch.Tensor]], list[float], list[dict[str, str]],
                            list[dict[str, Any]]]:
        """A plain round's usable updates, their example counts, the faults and the rows."""
        updates: list[dict[str, torch.Tensor]] = []
        weights: list[float] = []
        faults: list[dict[str, str]] = []
        rows: list[dict[str, Any]] = []
        for node in chosen:
            content = classify_reply(node, replies.get(node))
            if isinstance(content, Fault):
                faults.append(content)
                continue
            client = str(content.get(CLIENT_ID_KEY, node))
            try:
                blob = content.get(UPDATE_KEY)
                if not isinstance(blob, bytes):
                    raise FedPeftError(f"reply has no {UPDATE_KEY!r} bytes")
                delta = decode(blob, spec)
                n = content.get(NUM_EXAMPLES_KEY)
                if not isinstance(n, int) or n < 1:
                    raise FedPeftError(f"reply has {NUM_EXAMPLES_KEY}={n!r}; must be a "
                                       "positive int")
            except FedPeftError as exc:
                faults.append({"node": str(node), "client": client, "reason": str(exc)})
                continue
            updates.append(delta)
            weights.append(float(n))
            rows.append({**content, "node": node})
        return updates, weights, faults, rows


def _round_bar(total: int, start: int, enabled: bool) -> Any:
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=0, desc=f"rounds (from {start + 1})", file=sys.stderr,
                mininterval=0.5)
