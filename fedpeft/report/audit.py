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

from fedpeft.coordinator.checkpoint import latest_checkpoint
from fedpeft.core.errors import ConfigError
from fedpeft.data.federation import federated_split
from fedpeft.data.tokenize import encode
from fedpeft.peft_methods.registry import get_adapted, initial_adapter_state
from fedpeft.privacy.auditing.one_run import DEFAULT_CONFIDENCE, audit_scores
from fedpeft.privacy.auditing.report import AUDIT_FILE
from fedpeft.runconfig.config import DEFAULTS, RunConfig, parse_run_config
from fedpeft.training.trainer import example_losses

#: Canaries a `fedpeft audit` plants unless told otherwise.
DEFAULT_CANARIES = 1000


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
    """Score the canaries of the run in ``run_dir`` with its last checkpoint, compute the
    one-run bound, write ``audit.json`` and return it."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "run_config.json"
    try:
        flat = json.loads(meta_path.read_text(encoding="utf-8"))["run_config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{meta_path} is missing or unreadable ({exc}): audit a run "
                          "directory written by fedpeft simulate or fedpeft audit") from exc
    run: RunConfig = parse_run_config({**DEFAULTS, **flat})
    if not run.data.canaries:
        raise ConfigError(f"the run in {run_dir} has no canaries: run it with "
                          "audit-canaries = M (fedpeft audit does)")
    ckpt = latest_checkpoint(run_dir, run.fingerprint())
    if ckpt is None or "num_partitions" not in ckpt.meta:
        raise ConfigError(f"{run_dir} has no checkpoint of a completed round to audit")
    split = federated_split(run.data, int(ckpt.meta["num_partitions"]), run.seed)
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
    claimed = _claimed(run_dir)
    delta = float(claimed.get("delta") or run.dp.delta)
    audit = audit_scores(scores[included], scores[~included], delta=delta,
                         confidence=confidence)
    doc: dict[str, Any] = {
        "level": "record", "method": "one run (Steinke, Nasr, Jagielski 2023)",
        "canary": "random pseudo-word sequence"
                  + (", random label" if split.train.task == "classification" else ""),
        "score": "loss under the initial adapter - loss under the final one",
        "round": ckpt.round, **audit.as_dict(),
        "claimed_epsilon": claimed.get("epsilon"), "claimed_adjacency": claimed.get("adjacency"),
        "dp": run.dp.enabled,
        "mean_score_included": float(scores[included].mean()),
        "mean_score_excluded": float(scores[~included].mean()),
    }
    (run_dir / AUDIT_FILE).write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return doc
