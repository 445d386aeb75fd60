"""The coordinator's side of user-level DP: who may join, and the release ledger of each round.

Each round's noisy sum is a release (:mod:`fedpeft.privacy.user_level`). Before any unmask
request leaves, :meth:`UserLevel.field_round`'s gate counts the masked inputs actually in the
sum and either records the release in the coordinator's user-level ledger (reserved and
fsynced, composed per user, refused over the budget) or aborts the round with the reason in
the ledger (too few survivors to carry the planned noise: nothing is released). After the
sum is unmasked the release is committed; a crash in between leaves it reserved, which
counts as spent (never lost, never counted twice). A user who reached
``dp-user-participations`` releases is not selected again.

With adaptive clipping (``dp-user-clip-quantile`` > 0) each round's clip is sent to the
clients (:data:`ROUND_CLIP_KEY`) and the next one follows from the release's noisy count of
unclipped updates (:mod:`fedpeft.privacy.adaptive_clip`); it is kept in the checkpoint, so a
resumed run goes on from the clip of its last completed round.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpeft.coordinator.secure_round import FieldRound
from fedpeft.core.errors import ConfigError, FedPeftError
from fedpeft.core.protocol import CLIENT_ID_KEY, ROUND_CLIP_KEY
from fedpeft.core.vector import unflatten, vector_length
from fedpeft.core.wire import TensorSpec
from fedpeft.privacy.accounting.budget import Budget
from fedpeft.privacy.accounting.errors import BudgetExhaustedError, EventValidationError
from fedpeft.privacy.accounting.ledger import Ledger, ReleaseMetadata, user_epsilons
from fedpeft.privacy.adaptive_clip import next_clip
from fedpeft.privacy.user_level import RoundPlan, decode_release
from fedpeft.runconfig.config import RunConfig, user_round_plan
from fedpeft.secagg.server import AggregateResult

log = logging.getLogger(__name__)

#: The coordinator's user-level ledger, under the run directory (anchors kept apart).
USER_LEDGER = Path("user-ledger") / "coordinator.ledger.jsonl"
USER_ANCHORS = "user-ledger-anchors"
#: Node id -> client id of the users seen (a restart keeps who reached the cap).
USER_IDS = "user-ids.json"
LEDGER_OWNER = "coordinator"
#: Checkpoint-meta field: the clip of the round after the checkpoint's.
CLIP_META_KEY = "user_clip"


def resumed_clip_of(meta: Mapping[str, Any], path: Path) -> float:
    """The adaptive clip a checkpoint's ``meta`` left for its next round (a typed error when
    it is missing or invalid)."""
    clip = meta.get(CLIP_META_KEY)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not (
            math.isfinite(clip) and clip > 0):
        raise ConfigError(f"checkpoint {path} has no valid {CLIP_META_KEY!r} ({clip!r}) but "
                          "the run uses adaptive clipping (dp-user-clip-quantile > 0): resume "
                          "it with the run config it was written with")
    return float(clip)


class RoundAborted(FedPeftError):
    """A user-level round released nothing (the reason is in the ledger too)."""


class UserLevel:
    """User-level DP at the coordinator for one run (plan, ledger, eligibility)."""

    def __init__(self, run: RunConfig, run_dir: Path, population: int,
                 spec: Mapping[str, TensorSpec], clip: float | None = None) -> None:
        self.run = run
        self.spec = spec
        #: the clip of the next round (adaptive clipping; else always dp-user-clip), resumed
        #: from the checkpoint when given
        self.clip = run.user_dp.clip if clip is None else float(clip)
        #: what the last decoded release said about clipping (metrics row), else None
        self.last_clip_row: dict[str, float] | None = None
        # a plan that cannot meet the target fails here, naming the knob, before any round
        self.plan: RoundPlan = user_round_plan(run, population, vector_length(spec))
        self.path = run_dir / USER_LEDGER
        self.anchor_dir = run_dir / USER_ANCHORS
        self.budget = Budget(run.user_dp.budget, run.user_dp.delta)
        #: node id -> the client id it reported (users are accounted by client id); kept in
        #: the run directory so that a restarted coordinator still knows who reached the cap
        self.ids_path = run_dir / USER_IDS
        self.user_ids: dict[int, str] = self._load_ids()
        self._aborted: set[int] = set()  # rounds whose abort the ledger already holds
        self._reserved: set[int] = set()  # rounds whose release is reserved (spent)
        with self._ledger() as ledger:
            self.joined: Counter[str] = Counter(
                u for r in ledger.releases() for u in r.metadata.users)

    def _load_ids(self) -> dict[int, str]:
        if not self.ids_path.is_file():
            return {}
        try:
            doc = json.loads(self.ids_path.read_text(encoding="utf-8"))
            return {int(node): str(cid) for node, cid in doc.items()}
        except (ValueError, TypeError, AttributeError) as exc:
            raise FedPeftError(f"{self.ids_path} is unreadable ({exc}); it maps nodes to the "
                               "users the user-level ledger accounts: restore it, or move it "
                               "away (a user at its cap is then refused by the ledger's "
                               "budget instead)") from exc

    def _remember(self, ids: Mapping[int, str]) -> None:
        if all(self.user_ids.get(n) == c for n, c in ids.items()):
            return
        self.user_ids.update(ids)
        tmp = self.ids_path.with_name(self.ids_path.name + ".tmp")
        tmp.write_text(json.dumps({str(n): c for n, c in sorted(self.user_ids.items())}),
                       encoding="utf-8")
        os.replace(tmp, self.ids_path)

    def _ledger(self) -> Ledger:
        return Ledger(self.path, client_id=LEDGER_OWNER, level="user", budget=self.budget,
                      anchor_dir=self.anchor_dir)

    def eligible(self, nodes: list[int]) -> list[int]:
        """The nodes whose user may join another release (participations not reached)."""
        cap = self.run.user_dp.participations
        return [n for n in nodes
                if n not in self.user_ids or self.joined[self.user_ids[n]] < cap]

    def round_fields(self) -> dict[str, float]:
        """Train-message fields of the next round (its clip, with adaptive clipping)."""
        return {ROUND_CLIP_KEY: self.clip} if self.run.user_dp.adaptive else {}

    def field_round(self, server_round: int, session_id: bytes) -> FieldRound:
        """The :class:`FieldRound` of one round: its gate accounts the release, its decode
        commits it and returns the survivors' mean update."""
        plan = self.plan
        colluders = plan.config.colluders  # with SecAgg's tolerated colluders (user_round_plan)
        round_clip = self.clip
        self.last_clip_row = None
        pending: dict[str, str] = {}

        def gate(survivors: tuple[int, ...], rows: list[dict[str, Any]]) -> None:
            ids = {int(r["node"]): str(r.get(CLIENT_ID_KEY, r["node"])) for r in rows}
            self._remember(ids)
            users = tuple(sorted(ids.get(n, str(n)) for n in survivors))
            with self._ledger() as ledger:
                present = len(survivors) - 1 - colluders
                if present < plan.min_contributors:
                    reason = (f"only {len(survivors)} masked inputs arrived: {present} noise "
                              f"shares protect each user, the plan needs "
                              f"{plan.min_contributors}; nothing was released")
                    ledger.record_abort(server_round, reason)
                    self._aborted.add(server_round)
                    raise RoundAborted(reason)
                try:
                    # security: two nodes with one client id would put one user in the sum
                    # twice (twice the sensitivity): ReleaseMetadata refuses duplicates
                    meta = ReleaseMetadata(round_number=server_round, users=users,
                                           delta=self.run.user_dp.delta,
                                           run_id=self.run.fingerprint())
                    ledger.reserve_release_within_budget(
                        plan.release_event(len(survivors)), meta, self.budget)
                except (BudgetExhaustedError, EventValidationError) as exc:
                    reason = f"the release was refused, nothing was released: {exc}"
                    ledger.record_abort(server_round, reason[:1000])
                    self._aborted.add(server_round)
                    raise RoundAborted(reason) from exc
            pending["event"] = meta.event_id
            self._reserved.add(server_round)

        def decode(aggregate: AggregateResult) -> dict[str, torch.Tensor]:
            survivors = aggregate.survivors
            release = decode_release(aggregate.modular_sum, plan, session_id,
                                     survivors=len(survivors), round_clip=round_clip)
            with self._ledger() as ledger:
                ledger.commit(pending["event"])
            self.joined.update(self.user_ids.get(n, str(n)) for n in survivors)
            if release.unclipped_fraction is not None:
                cfg = self.run.user_dp
                # post-processing of the release: the next clip (Andrew et al. 2021)
                self.clip = next_clip(round_clip, release.unclipped_fraction,
                                      target_quantile=cfg.clip_quantile, lr=cfg.clip_lr)
                self.last_clip_row = {"clip": round_clip, "next_clip": self.clip,
                                      "unclipped_fraction": release.unclipped_fraction,
                                      "count_std": plan.count_std(len(survivors))}
            mean = release.total / len(survivors)
            return unflatten(np.asarray(mean, dtype=np.float64), self.spec)

        return FieldRound(length=plan.ddg.padded, gate=gate, decode=decode)

    def record_abort(self, server_round: int, reason: str) -> None:
        """Record in the ledger why a round released nothing (once per round)."""
        if server_round in self._aborted:
            return
        if server_round in self._reserved:
            reason = ("the sum was not unmasked after its release was reserved; the release "
                      f"still counts as spent: {reason}")
        with self._ledger() as ledger:
            ledger.record_abort(server_round, reason[:1000])
        self._aborted.add(server_round)

    def report(self) -> dict[str, Any]:
        """Per-user epsilons (against the coordinator) recomputed from the ledger."""
        with self._ledger() as ledger:
            releases = ledger.releases()
            aborts = ledger.aborts()
        eps = user_epsilons(releases, self.run.user_dp.delta)
        values = sorted(eps.values())
        return {
            "level": "user",
            "against": "the coordinator (it chooses who joins: no amplification by sampling)",
            "delta": self.run.user_dp.delta, "epsilon_budget": self.budget.epsilon_max,
            "participations": self.run.user_dp.participations,
            "per_client_noise_std": self.plan.provisioned.noise_std,
            "clip": self.run.user_dp.clip, "min_contributors": self.plan.min_contributors,
            **({"adaptive_clip": {"target_quantile": self.run.user_dp.clip_quantile,
                                  "lr": self.run.user_dp.clip_lr, "next_clip": self.clip,
                                  "count_weight": self.plan.count_weight,
                                  "count_std": self.plan.count_std(self.plan.planned_clients)}}
               if self.run.user_dp.adaptive else {}),
            "bits": self.plan.ddg.bits, "releases": len(releases), "aborted_rounds": len(aborts),
            "users": dict(sorted(eps.items())),
            "summary": {"users": len(eps), **({"epsilon_min": values[0],
                                               "epsilon_median": float(np.median(values)),
                                               "epsilon_max": values[-1]} if values else {})},
            "ledger": str(self.path),
        }
