"""The audit's file in a run directory and the line every report prints beside epsilon."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: Written by ``fedpeft audit`` into the run directory.
AUDIT_FILE = "audit.json"


def read_audit(path: Path) -> dict[str, Any] | None:
    """The ``audit.json`` of the run at ``path`` (a run directory, or a folder inside it such
    as its ``ledgers/``), or None when the run was not audited."""
    for folder in (Path(path), Path(path).parent):
        try:
            doc = json.loads((folder / AUDIT_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and "epsilon_lower_bound" in doc:
            return doc
    return None


def audit_line(doc: dict[str, Any]) -> str:
    """One line: the audited lower bound beside the claimed epsilon, with m, confidence,
    level and the most that many canaries can show."""
    claim = doc.get("claimed_epsilon")
    beside = (f"claimed epsilon {claim:.3g} ({doc.get('claimed_adjacency') or 'as accounted'})"
              if isinstance(claim, (int, float)) else "no DP claimed")
    tpr = doc.get("tpr_at_fpr", {}).get("0.01")
    return (f"audit, {doc.get('level', '?')} level ({doc.get('method', 'one run')}): epsilon >= "
            f"{float(doc['epsilon_lower_bound']):.3g} at {100 * float(doc['confidence']):g}% "
            f"confidence from {doc['canaries']} canaries (at most {float(doc['ceiling']):.3g} "
            f"can be shown with that many); {beside}"
            + (f"; TPR at 1% FPR {float(tpr):.3f}" if tpr is not None else "")
            + ". A lower bound from an attack, not the guarantee (docs/privacy.md, 'Audits').")
