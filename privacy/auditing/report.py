"""The audit's file in a run directory and the line every report prints beside epsilon."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: Written by ``fedpeft audit`` into the run directory.
AUDIT_FILE = "audit.json"


def read_audits(path: Path) -> list[dict[str, Any]]:
    """The audits in ``audit.json`` of the run at ``path`` (a run directory, or a folder
    inside it such as its ``ledgers/``); empty when the run was not audited. The file holds
    ``{"audits": [...]}``; one audit at its top level (the first audited runs) is read too."""
    for folder in (Path(path), Path(path).parent):
        try:
            doc = json.loads((folder / AUDIT_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        docs = doc.get("audits", [doc]) if isinstance(doc, dict) else []
        found = [d for d in docs if isinstance(d, dict) and "epsilon_lower_bound" in d]
        if found:
            return found
    return []


def audit_line(doc: dict[str, Any]) -> str:
    """One line: the audited lower bound beside the claimed epsilon, with m, confidence,
    level and the most that many canaries can show."""
    claim = doc.get("claimed_epsilon")
    beside = (f"claimed epsilon {claim:.3g} ({doc.get('claimed_adjacency') or 'as accounted'})"
              if isinstance(claim, (int, float)) else "no DP claimed")
    tpr = doc.get("tpr_at_fpr", {}).get("0.01")
    access = f", {doc['access']}" if doc.get("access") else ""
    return (f"audit, {doc.get('level', '?')} level{access} ({doc.get('method', 'one run')}): "
            f"epsilon >= "
            f"{float(doc['epsilon_lower_bound']):.3g} at {100 * float(doc['confidence']):g}% "
            f"confidence from {doc['canaries']} canaries (at most {float(doc['ceiling']):.3g} "
            f"can be shown with that many); {beside}"
            + (f"; TPR at 1% FPR {float(tpr):.3f}" if tpr is not None else "")
            + (f"; the bound comes from the canaries on {doc['bound_from']} (the largest of "
               f"{doc['tests']} bounds, union-bounded)"
               if doc.get("bound_from") not in (None, "all") else "")
            + ". A lower bound from an attack, not the guarantee (docs/privacy.md, 'Audits').")
