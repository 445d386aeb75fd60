"""The one-run audit bound (Steinke, Nasr, Jagielski, NeurIPS 2023), as pure functions.

Setting: ``m`` canaries, each included in training independently with probability 1/2. After
training, an attack scores every canary; the auditor guesses "included" for the canaries
whose score is at least a threshold (``guesses`` of them) and abstains on the rest. Under an
(epsilon, delta)-DP mechanism the number of correct guesses is, up to a delta term, dominated
by Binomial(guesses, e^eps / (1 + e^eps)) (the paper's Theorem 3.1 and Proposition 5.2); its
tail is the p-value of :func:`p_value`. The audited lower bound is the largest epsilon whose
null the observed count rejects at the stated confidence (:func:`epsilon_lower_bound`).

From scores (:func:`audit_scores`) every threshold on the upper convex hull of the ROC is a
candidate; a Bonferroni correction over them keeps the confidence (as jax_privacy's
``CanaryScoreAuditor.epsilon_one_run`` does with its default strategy; its test values are
reproduced in ``tests/dp/test_audit_one_run.py``). The bound is a **lower** bound: it shows
what the run demonstrably leaks, never what it may leak; a DP run's bound stays at or below its
claim except with probability at most ``1 - confidence``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import optimize, special, stats

from fedpeft.core.checks import is_real
from fedpeft.core.errors import ConfigError

FloatArray = npt.NDArray[np.float64]
#: Confidence of the reported bounds unless asked otherwise (the issue's 95 %).
DEFAULT_CONFIDENCE = 0.95
#: Low false-positive rates at which the attack's true-positive rate is reported.
REPORTED_FPRS = (0.001, 0.01, 0.1)


class AuditError(ConfigError):
    """An audit input is invalid (the message says which and what to pass)."""


def _count(name: str, v: object, low: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < low:
        raise AuditError(f"{name}={v!r} must be an integer >= {low}")
    return int(v)


def _check_counts(m: int, guesses: int, correct: int) -> tuple[int, int, int]:
    m, guesses, correct = (_count("canaries", m, 1), _count("guesses", guesses),
                           _count("correct", correct))
    if not correct <= guesses <= m:
        raise AuditError(f"need correct ({correct}) <= guesses ({guesses}) <= canaries ({m})")
    return m, guesses, correct


def _check_delta(delta: float) -> float:
    if not is_real(delta) or not 0.0 <= delta <= 1.0:
        raise AuditError(f"delta={delta!r} must be in [0, 1]")
    return float(delta)


def _check_confidence(confidence: float) -> float:
    if not is_real(confidence) or not 0.0 < confidence < 1.0:
        raise AuditError(f"confidence={confidence!r} must be in (0, 1), e.g. 0.95")
    return float(confidence)


def p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Probability, under an (epsilon, delta)-DP null, of at least ``correct`` right guesses
    out of ``guesses`` with ``m`` canaries (Steinke et al. 2023, Theorem 3.1 with the delta
    term of their Proposition 5.2: ``beta + 2 m delta alpha``)."""
    m, guesses, correct = _check_counts(m, guesses, correct)
    delta = _check_delta(delta)
    if not is_real(epsilon) or not epsilon >= 0:
        raise AuditError(f"epsilon={epsilon!r} must be a number >= 0")
    if correct == 0:
        return 1.0
    q = float(special.expit(epsilon))  # e^eps / (1 + e^eps): eps-DP randomised response
    beta = float(stats.binom.sf(correct - 1, guesses, q))  # P[Binomial(r, q) >= v]
    if delta == 0.0:
        return min(beta, 1.0)
    i = np.arange(1, correct + 1)
    # P[v - i <= Binomial(r, q) < v] / i, maximised over i = 1..v
    window = stats.binom.sf(correct - i - 1, guesses, q) - beta
    alpha = float(np.max(window / i))
    return min(beta + 2.0 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, guesses: int, correct: int, *, delta: float,
                        confidence: float = DEFAULT_CONFIDENCE) -> float:
    """The largest epsilon whose (epsilon, delta)-DP null the guesses reject with
    ``confidence`` (0 when even epsilon 0 is not rejected): the audited lower bound."""
    significance = 1.0 - _check_confidence(confidence)
    if p_value(m, guesses, correct, 0.0, delta) > significance:
        return 0.0

    def gap(eps: float) -> float:  # > 0 while the claim eps is still rejected
        return significance - p_value(m, guesses, correct, eps, delta)

    lo, hi = 0.0, 1.0
    while gap(hi) > 0:
        lo, hi = hi, 2.0 * hi
        if hi > 1e4:  # pragma: no cover - v <= r bounds the binomial tail below 1
            raise AuditError("the epsilon search did not terminate")
    return float(optimize.brentq(gap, lo, hi, xtol=1e-9))


def auditable_ceiling(m: int, *, delta: float, confidence: float = DEFAULT_CONFIDENCE,
                      hypotheses: int = 1, max_guesses: int | None = None) -> float:
    """The largest bound ``m`` canaries can give: all of ``r`` guesses right, for the best
    ``r <= max_guesses`` (default ``m // 2``, the included canaries to expect at inclusion
    probability 1/2), with a Bonferroni correction over ``hypotheses`` thresholds. A claim
    above it cannot be refuted by this audit, whatever the mechanism does."""
    m = _count("canaries", m, 1)
    top = max(1, m // 2) if max_guesses is None else _count("max_guesses", max_guesses, 1)
    if top > m:
        raise AuditError(f"max_guesses={top} exceeds canaries={m}")
    confidence = 1.0 - (1.0 - _check_confidence(confidence)) / _count("hypotheses",
                                                                       hypotheses, 1)

    def bound(r: int) -> float:
        return epsilon_lower_bound(m, r, r, delta=delta, confidence=confidence)

    # geometric scan, then an integer ternary search around the best point (the bound of
    # all-correct guesses rises with r and falls once the delta term dominates)
    grid = sorted({*np.unique(np.geomspace(1, top, num=min(top, 40)).astype(int)).tolist(), top})
    values = [bound(r) for r in grid]
    k = int(np.argmax(values))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    best = values[k]
    while hi - lo > 2:
        a, b = lo + (hi - lo) // 3, hi - (hi - lo) // 3
        fa, fb = bound(a), bound(b)
        best = max(best, fa, fb)
        if fa < fb:
            lo = a
        else:
            hi = b
    return max(best, *(bound(r) for r in range(lo, hi + 1)))


@dataclass(frozen=True)
class OneRunAudit:
    """The outcome of a one-run audit from canary scores."""

    epsilon_lower_bound: float
    confidence: float
    delta: float
    canaries: int
    included: int
    guesses: int
    correct: int
    threshold: float
    hypotheses: int
    ceiling: float
    tpr_at_fpr: dict[float, float]

    def as_dict(self) -> dict[str, object]:
        return {"epsilon_lower_bound": self.epsilon_lower_bound, "confidence": self.confidence,
                "delta": self.delta, "canaries": self.canaries, "included": self.included,
                "guesses": self.guesses, "correct": self.correct,
                "threshold": self.threshold, "hypotheses": self.hypotheses,
                "ceiling": self.ceiling,
                "tpr_at_fpr": {str(k): v for k, v in self.tpr_at_fpr.items()}}


def _scores(name: str, values: Sequence[float] | FloatArray) -> FloatArray:
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise AuditError(f"{name} is empty: an audit needs canaries both included and not")
    if not np.all(np.isfinite(a)):
        raise AuditError(f"{name} has a non-finite score (NaN or inf): fix the attack's "
                         "scoring before auditing")
    return a


def hull_thresholds(in_scores: FloatArray, out_scores: FloatArray
                    ) -> tuple[FloatArray, npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The candidate thresholds (guess "included" at score >= t) on the upper convex hull of
    the ROC, with the true and false positives at each; collinear points are dropped."""
    ins, outs = np.sort(in_scores), np.sort(out_scores)
    cand = np.concatenate([np.union1d(ins, outs), [np.inf]])
    fn = np.searchsorted(ins, cand, side="left")  # included canaries below t
    tn = np.searchsorted(outs, cand, side="left")
    hull: list[int] = []
    for k in range(cand.size):  # monotone chain over (fn, tn), both non-decreasing in t
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (fn[b] - fn[a]) * (tn[k] - tn[a]) - (tn[b] - tn[a]) * (fn[k] - fn[a])
            if cross < 0:  # b is above the chord a -> k: a vertex of the hull
                break
            hull.pop()
        hull.append(k)
    idx = np.array(hull)
    tp = (ins.size - fn[idx]).astype(np.int64)
    fp = (outs.size - tn[idx]).astype(np.int64)
    return cand[idx], tp, fp


def tpr_at_fpr(in_scores: Sequence[float] | FloatArray, out_scores: Sequence[float] | FloatArray,
               fpr: float) -> float:
    """The attack's best true-positive rate at false-positive rate ``fpr`` (interpolating
    between thresholds, i.e. allowing a randomised rule)."""
    if not is_real(fpr) or not 0.0 <= fpr <= 1.0:
        raise AuditError(f"fpr={fpr!r} must be in [0, 1]")
    ins, outs = _scores("in_scores", in_scores), _scores("out_scores", out_scores)
    _, tp, fp = hull_thresholds(ins, outs)
    tpr, fprs = tp[::-1] / ins.size, fp[::-1] / outs.size  # increasing in both
    return float(np.interp(fpr, fprs, tpr))


def audit_scores(in_scores: Sequence[float] | FloatArray,
                 out_scores: Sequence[float] | FloatArray, *, delta: float,
                 confidence: float = DEFAULT_CONFIDENCE) -> OneRunAudit:
    """The one-run bound from the attack scores of the included (``in_scores``) and excluded
    (``out_scores``) canaries, higher meaning "more likely included": the best threshold on
    the ROC hull, Bonferroni-corrected over the hull's thresholds."""
    ins, outs = _scores("in_scores", in_scores), _scores("out_scores", out_scores)
    delta = _check_delta(delta)
    confidence = _check_confidence(confidence)
    thresholds, tp, fp = hull_thresholds(ins, outs)
    hypotheses = int(thresholds.size)
    corrected = 1.0 - (1.0 - confidence) / hypotheses
    m = ins.size + outs.size
    best, best_k = 0.0, -1
    # most precise thresholds first; a threshold whose raw precision is at most the
    # randomised-response accuracy of the best bound so far cannot beat it
    order = np.argsort(-(tp / np.maximum(tp + fp, 1)))
    for k in order.tolist():
        r, v = int(tp[k] + fp[k]), int(tp[k])
        if r == 0 or v / r <= special.expit(best):
            continue
        eps = epsilon_lower_bound(m, r, v, delta=delta, confidence=corrected)
        if eps > best:
            best, best_k = eps, k
    k = best_k if best_k >= 0 else hypotheses - 1
    return OneRunAudit(
        epsilon_lower_bound=best, confidence=confidence, delta=delta, canaries=m,
        included=int(ins.size), guesses=int(tp[k] + fp[k]), correct=int(tp[k]),
        threshold=float(thresholds[k]), hypotheses=hypotheses,
        ceiling=auditable_ceiling(m, delta=delta, confidence=confidence,
                                  hypotheses=hypotheses, max_guesses=max(1, int(ins.size))),
        tpr_at_fpr={f: tpr_at_fpr(ins, outs, f) for f in REPORTED_FPRS})


def randomized_response_correct(epsilon: float) -> float:
    """Accuracy of a guess about one canary under pure epsilon-DP (the null's Bernoulli)."""
    if not is_real(epsilon) or not math.isfinite(epsilon) or epsilon < 0:
        raise AuditError(f"epsilon={epsilon!r} must be a finite number >= 0")
    return float(special.expit(epsilon))
