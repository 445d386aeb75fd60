"""`fedpeft audit`: the one-run empirical audit of a finished run with canaries (issue 17).

The run planted ``audit-canaries`` canaries in its clients' data (:mod:`fedpeft.data.canaries`:
each in with probability 1/2, otherwise replaced by a filler, so no dataset size depends on the
bits). Afterwards every canary is scored by the likelihood ratio of the final global adapter to
the initial one (``loss_initial - loss_final``: how much more the federation's model explains
the canary than it did before; higher means "more likely included", the per-canary baseline
removes how hard each canary is to begin with), and
:func:`fedpeft.privacy.auditing.one_run.audit_scores` turns the scores into the epsilon lower
bound at the stated confidence (Steinke, Nasr, Jagielski, NeurIPS 2023). The result,
``RUN_DIR/audit.json``, sits beside the claimed epsilon of the run's privacy report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.coordinator.checkpoint import Checkpoint, latest_checkpoint
from fedpeft.core.errors import ConfigError
from fedpeft.core.vector import flatten, vector_length
from fedpeft.data.federation import federated_split
from fedpeft.data.tokenize import encode
from fedpeft.peft_methods.registry import get_adapted, initial_adapter_state
from fedpeft.privacy.auditing.gradient_canaries import (
    CANARY_SCORES_FILE,
    audit_gradient_canaries,
    plan_gradient_canaries,
    tensor_sizes,
)
from fedpeft.privacy.auditing.one_run import DEFAULT_CONFIDENCE, audit_scores
from fedpeft.privacy.auditing.report import AUDIT_FILE
from fedpeft.privacy.auditing.user_canaries import (
    cosine_scores,
    gaussian_epsilon_estimate,
    plan_user_canaries,
)
from fedpeft.runconfig.config import DEFAULTS, RunConfig, data_partitions, parse_run_config
from fedpeft.training.trainer import example_losses

#: Canaries a `fedpeft audit` plants unless told otherwise.
DEFAULT_CANARIES = 1000


def _claimed_user(run_dir: Path) -> dict[str, Any]:
    """The user-level epsilon the run claims (the largest user's) and its users' epsilons."""
    try:
        doc = json.loads((run_dir / "privacy_report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    user = doc.get("user") if isinstance(doc, dict) else None
    if not isinstance(user, dict):
        return {}
    return {"epsilon": user.get("summary", {}).get("epsilon_max"), "delta": user.get("delta"),
            "users": user.get("users", {}),
            "adjacency": "one user's whole update replaced by zero"}


def _claimed(run_dir: Path) -> dict[str, Any]:
    """The record-level epsilon the run claims (the largest client's), from its report."""
    path = run_dir / "privacy_report.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    record = doc.get("record") if isinstance(doc, dict) else None
    if not isinstance(record, dict):
        return {}
    summary = record.get("summary", {})
    # the record-level accounting is under replace-one adjacency, and a canary replaces its
    # filler (docs/privacy.md, "Accounting model")
    return {"epsilon": summary.get("epsilon_max"), "delta": record.get("delta"),
            "adjacency": "replace-one"}


def audit_run(run_dir: Path, *, confidence: float = DEFAULT_CONFIDENCE) -> dict[str, Any]:
    """Audit the run in ``run_dir`` with every kind of canary it planted, write ``audit.json``
    (``{"audits": [...]}``) and return the first audit (the others are in the file)."""
    audits = audit_all(run_dir, confidence=confidence)
    return audits[0]


def audit_all(run_dir: Path, *, confidence: float = DEFAULT_CONFIDENCE) -> list[dict[str, Any]]:
    """Every audit the run in ``run_dir`` supports: black box (data canaries, scored with its
    last checkpoint) and white box (gradient canaries, scored on the clients); written to
    ``RUN_DIR/audit.json``."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "run_config.json"
    try:
        flat = json.loads(meta_path.read_text(encoding="utf-8"))["run_config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{meta_path} is missing or unreadable ({exc}): audit a run "
                          "directory written by fedpeft simulate or fedpeft audit") from exc
    run: RunConfig = parse_run_config({**DEFAULTS, **flat})
    if not (run.data.canaries or run.dp.gradient_canaries or run.user_dp.canaries):
        raise ConfigError(f"the run in {run_dir} has no canaries: run it with "
                          "audit-canaries = M, audit-gradient-canaries = M or "
                          "audit-user-canaries = M (fedpeft audit sets them)")
    ckpt = latest_checkpoint(run_dir, run.fingerprint())
    if ckpt is None or "num_partitions" not in ckpt.meta:
        raise ConfigError(f"{run_dir} has no checkpoint of a completed round to audit")
    num_partitions = int(ckpt.meta["num_partitions"])
    claimed = _claimed(run_dir)
    delta = float(claimed.get("delta") or run.dp.delta)
    audits: list[dict[str, Any]] = []
    if run.data.canaries:
        audits.append(_black_box(run, ckpt, data_partitions(run, num_partitions), claimed,
                                 delta, confidence))
    if run.dp.gradient_canaries:
        audits.append(_white_box(run, run_dir, ckpt.round, num_partitions, claimed, delta,
                                 confidence))
    if run.user_dp.canaries:
        audits.append(_user_level(run, run_dir, ckpt, num_partitions, confidence))
    (run_dir / AUDIT_FILE).write_text(json.dumps({"audits": audits}, indent=1),
                                      encoding="utf-8")
    return audits


def _black_box(run: RunConfig, ckpt: Checkpoint, num_partitions: int, claimed: dict[str, Any],
               delta: float, confidence: float) -> dict[str, Any]:
    split = federated_split(run.data, num_partitions, run.seed)
    canaries = split.canaries
    if canaries is None:  # pragma: no cover - data.canaries > 0 always plants them
        raise ConfigError("the split has no canaries")
    model = get_adapted(run.model, run.adapter, run.seed)
    data = encode(canaries.corpus(split.train.task, split.train.label_names),
                  model.base_info.tokenizer, run.model.max_length)
    model.load_adapter_state(initial_adapter_state(run.model, run.adapter, run.seed))
    before = example_losses(model, data).numpy()
    model.load_adapter_state(ckpt.params)
    after = example_losses(model, data).numpy()
    scores = before - after  # likelihood ratio of the final model to the initial one
    included = np.array(canaries.included)
    audit = audit_scores(scores[included], scores[~included], delta=delta,
                         confidence=confidence)
    return {
        "level": "record", "method": "one run (Steinke, Nasr, Jagielski 2023)",
        "access": "black box",
        "canary": "random pseudo-word sequence"
                  + (", random label" if split.train.task == "classification" else ""),
        "score": "loss under the initial adapter - loss under the final one",
        "round": ckpt.round, **audit.as_dict(),
        "claimed_epsilon": claimed.get("epsilon"), "claimed_adjacency": claimed.get("adjacency"),
        "dp": run.dp.enabled,
        "mean_score_included": float(scores[included].mean()),
        "mean_score_excluded": float(scores[~included].mean()),
    }


def _white_box(run: RunConfig, run_dir: Path, last_round: int, num_partitions: int,
               claimed: dict[str, Any], delta: float, confidence: float) -> dict[str, Any]:
    model = get_adapted(run.model, run.adapter, run.seed)
    plan = plan_gradient_canaries(run.dp.gradient_canaries,
                                  tensor_sizes(model.adapter_parameters()),
                                  num_partitions=num_partitions, seed=run.seed)
    rows = read_canary_scores(run_dir / "client-state")
    scores = np.zeros(len(plan))
    for (partition, _round), row in rows.items():
        for key, value in row.items():
            i = int(key)
            if not 0 <= i < len(plan) or plan.owners[i] != partition:
                raise ConfigError(f"client-state of partition {partition} scores canary {key}, "
                                  "which it does not own: the scores are not this run's")
            scores[i] += float(value)
    included = np.array(plan.included)
    audit = audit_gradient_canaries(plan, scores.tolist(), delta=delta, confidence=confidence)
    return {
        "level": "record", "method": "one run (Steinke, Nasr, Jagielski 2023)",
        "access": "white box",
        "canary": "Dirac gradient canary in DP-SGD's clipped sum (Nasr et al. 2023), "
                  f"spread over {len(plan.names)} trainable tensors",
        "score": "sum over the owner's steps of the privatised gradient at the canary's "
                 "coordinate",
        "round": last_round, "client_rounds_scored": len(rows), **audit,
        "claimed_epsilon": claimed.get("epsilon"), "claimed_adjacency": claimed.get("adjacency"),
        "dp": run.dp.enabled,
        "mean_score_included": float(scores[included].mean()) if included.any() else 0.0,
        "mean_score_excluded": float(scores[~included].mean()) if (~included).any() else 0.0,
    }


def _user_level(run: RunConfig, run_dir: Path, ckpt: Checkpoint, num_partitions: int,
                confidence: float) -> dict[str, Any]:
    spec = get_adapted(run.model, run.adapter, run.seed).spec()
    plan = plan_user_canaries(run.user_dp.canaries, vector_length(spec), run.seed)
    initial = initial_adapter_state(run.model, run.adapter, run.seed)
    change = (flatten(ckpt.params, spec).astype(np.float64)
              - flatten(initial, spec).astype(np.float64))
    scores = cosine_scores(plan, change)
    included = np.array(plan.included)
    claimed = _claimed_user(run_dir)
    delta = float(claimed.get("delta") or run.user_dp.delta)
    audit = audit_scores(scores[included], scores[~included], delta=delta,
                         confidence=confidence)
    first = data_partitions(run, num_partitions)
    users = claimed.get("users") or {}
    # the ledger names users by client id; a simulation's are client-<partition>
    ids = [f"client-{first + i}" for i in range(len(plan))]
    named = any(c in users for c in ids)
    joined = sum(1 for c, inc in zip(ids, plan.included, strict=True) if inc and c in users)
    estimate = (gaussian_epsilon_estimate(scores[included], scores[~included], delta=delta)
                if included.sum() >= 2 and (~included).sum() >= 2 else None)
    return {
        "level": "user", "method": "one run (Steinke, Nasr, Jagielski 2023)",
        "access": "black box (the final model)",
        "canary": "canary client sending the round's clip x a random unit direction, or "
                  "zero (Andrew et al. 2024)",
        "score": "cosine of the canary's direction with the final model's change",
        "round": ckpt.round, **audit.as_dict(),
        "claimed_epsilon": claimed.get("epsilon"), "claimed_adjacency": claimed.get("adjacency"),
        "dp": run.user_dp.enabled,
        "included_canaries_that_joined": joined if named else None,
        "gaussian_epsilon_estimate": estimate,
        "mean_score_included": float(scores[included].mean()) if included.any() else 0.0,
        "mean_score_excluded": float(scores[~included].mean()) if (~included).any() else 0.0,
        "std_score_excluded": float(scores[~included].std()) if (~included).any() else 0.0,
    }


def read_canary_scores(state_root: Path) -> dict[tuple[int, int], dict[str, float]]:
    """Every simulated client's gradient-canary scores under ``state_root`` (the run's
    ``client-state``), keyed by (partition, round); a round scored twice (a retried round)
    counts once, its last row."""
    out: dict[tuple[int, int], dict[str, float]] = {}
    for path in sorted(Path(state_root).glob(f"*/{CANARY_SCORES_FILE}")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                row = json.loads(line)
                key = (int(row["partition"]), int(row["round"]))
                scores = {str(k): float(v) for k, v in dict(row["scores"]).items()}
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{path}:{n} is not a canary-score row ({exc})") from exc
            out[key] = scores
    return out
