"""Round configuration and the planner that derives (degree, threshold) from n and dropout.

Abort model (documented in docs/secagg.md): every client independently fails to complete the
round with probability ``delta`` (the expected dropout). The server must reconstruct, for each
client that shared keys, a secret from ``threshold`` shares held by its neighbours that complete
the round. Hence

Each client keeps one share of its own secrets (Bonawitz et al. share with all of U1, the
sender included), so a secret has ``k + 1`` holders: the ``k`` neighbours and, for the
self-mask seed only, its owner.

* complete graph (degree = n - 1): abort iff fewer than ``t`` clients complete, so exactly
  ``P_abort = P[Bin(n, 1 - delta) <= t - 1]``;
* sparse graph: union bound over clients, ``P_abort <= n * P[Bin(k, 1 - delta) < t]``.

Security floor with ``c`` clients colluding with the server: ``2 t > k + 1 + c``. A server
lying about dropouts asks some holders of client ``u`` for its self-mask share and others for
its key share; an honest holder answers one kind, a colluder both, so the server gets
``t`` of each only if ``2 t <= (k + 1 - c) + 2 c`` (Bonawitz et al. CCS 2017, sec. 6; Bell et
al. CCS 2020, sec. 3). ``c = floor(gamma * n)`` for a corrupted fraction ``gamma``
(``corrupt_fraction``), all of them assumed to be ``u``'s neighbours: the server draws the graph
seed today, so it may place its colluders around ``u`` (worst case, no binomial thinning). The
floor also keeps the colluders alone below ``t``. The degree is at least ``2 ceil(log2 n)``
(Bell et al.'s ``O(log n)``; a small degree lets a lying server isolate small blocks).
Among the feasible degrees the planner takes the smallest (cheapest), then the largest
threshold that still meets the abort target (margin above the floor). Clients recompute the
floor from their own ``corrupt_fraction`` (:func:`check_round_parameters`) and the plan from
their own config, and refuse a lower threshold or degree (:func:`check_against_own_plan`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from fedpeft.secagg.errors import InfeasiblePlanError, RefusedError, SecAggConfigError
from fedpeft.secagg.quantize import (
    MAX_BITS,
    MAX_CLIP,
    MIN_BITS,
    MIN_CLIP,
    QuantizationPlan,
    plan_quantization,
)

#: Fewest participants a round accepts (with two, each learns the other's input from the sum).
MIN_CLIENTS = 3
#: Client ids are unsigned 64-bit integers (u64 on the wire).
MAX_CLIENT_ID = (1 << 64) - 1


def binom_cdf(k: int, n: int, p: float) -> float:
    """Exact ``P[Bin(n, p) <= k]`` (math.comb, no scipy)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return math.fsum(math.comb(n, i) * p**i * (1.0 - p) ** (n - i) for i in range(k + 1))


def abort_probability(n: int, degree: int, threshold: int, dropout: float) -> float:
    """Abort probability (exact for the complete graph, union bound otherwise)."""
    survive = 1.0 - dropout
    if degree >= n - 1:
        return binom_cdf(threshold - 1, n, survive)
    return min(1.0, n * binom_cdf(threshold - 1, degree, survive))


def min_safe_threshold(degree: int, colluders: int = 0, *, consistency: bool = False) -> int:
    """Smallest safe threshold for ``c = min(colluders, k)`` colluders.

    Without the consistency check: ``2 t > k + 1 + c`` (a server with ``c`` colluding holders
    cannot gather both share kinds of one honest client). With it (authenticated rounds),
    honest holders all answer for one signed survivor set, so the server gets a secret's
    other kind from colluders only: ``t > c`` suffices; ``2 t > k + 1`` is kept as a second
    line (it holds even if the check were bypassed with no colluders).
    """
    c = min(max(colluders, 0), degree)
    if consistency:
        return max(c + 1, (degree + 1) // 2 + 1)
    return (degree + 1 + c) // 2 + 1


#: Fraction of a round's clients assumed to collude with the coordinator (the run config's
#: ``secagg-corrupt-fraction``); the floor tolerates ``floor(gamma * n)`` of them.
DEFAULT_CORRUPT_FRACTION = 0.05


def colluders(n: int, corrupt_fraction: float) -> int:
    """Colluding clients tolerated among ``n``: ``floor(gamma * n)`` (``n`` >= 1)."""
    return int(math.floor(corrupt_fraction * n + 1e-9))


def consistency_quorum(n: int, corrupt_fraction: float) -> int:
    """Signatures on one survivor set a client needs before it reveals shares (authenticated
    rounds): ``floor((n + c) / 2) + 1`` of the ``n`` participants, ``c = floor(gamma n)``.

    Two different survivor sets cannot both reach it: their signer sets would share more than
    ``c`` clients, so some honest client signed both, and an honest client signs once per
    session. The sum therefore also always covers a majority of the participants.
    """
    return (n + colluders(n, corrupt_fraction)) // 2 + 1


def min_degree(n: int) -> int:
    """Smallest degree a round of ``n`` accepts: ``min(n - 1, max(2, 2 ceil(log2 n)))``."""
    return min(n - 1, max(2, 2 * math.ceil(math.log2(n))))


@dataclass(frozen=True)
class GraphPlan:
    """Degree and threshold for ``n`` clients with the resulting abort probability (bound)."""

    n: int
    degree: int
    threshold: int
    abort_probability: float
    exact: bool  # True: exact (complete graph); False: union bound
    colluders: int = 0  # colluding clients the threshold tolerates (floor(gamma * n))


#: Fraction of a round's clients expected to drop out, planned for by default (the run config's
#: ``secagg-dropout`` reads it).
DEFAULT_EXPECTED_DROPOUT = 0.1


def plan_graph(n: int, expected_dropout: float = DEFAULT_EXPECTED_DROPOUT,
               max_abort_prob: float = 0.01, *, complete: bool = False,
               corrupt_fraction: float = DEFAULT_CORRUPT_FRACTION,
               consistency: bool = False) -> GraphPlan:
    """Smallest even degree (or the complete graph) and then largest threshold meeting the target.

    The threshold is at least :func:`min_safe_threshold` for ``floor(corrupt_fraction * n)``
    colluders. ``complete``: the complete graph only, whose threshold is the largest any graph
    allows (user-level DP sizes each client's noise for ``threshold - 1`` other survivors).
    ``consistency``: the round runs the consistency check (authenticated rounds), whose floor
    is lower (:func:`min_safe_threshold`); it also needs a quorum of survivors, counted in the
    abort probability of the complete graph only through ``threshold`` (the quorum is at most
    the complete graph's threshold).
    """
    if n < MIN_CLIENTS:
        raise SecAggConfigError(f"n={n} must be >= {MIN_CLIENTS} for secure aggregation to hide anyone")
    _check_prob("expected_dropout", expected_dropout, upper_open=True)
    _check_prob("max_abort_prob", max_abort_prob, upper_open=False)
    _check_prob("corrupt_fraction", corrupt_fraction, upper_open=True)
    c = colluders(n, corrupt_fraction)
    candidates = [] if complete else [k for k in range(min_degree(n), n - 1) if k % 2 == 0]
    candidates.append(n - 1)
    for k in candidates:
        t = min_safe_threshold(k, c, consistency=consistency)
        if t > k or abort_probability(n, k, t, expected_dropout) > max_abort_prob:
            continue
        while t + 1 <= k and abort_probability(n, k, t + 1, expected_dropout) <= max_abort_prob:
            t += 1
        return GraphPlan(n, k, t, abort_probability(n, k, t, expected_dropout), k >= n - 1, c)
    t_min = min_safe_threshold(n - 1, c, consistency=consistency)
    best = abort_probability(n, n - 1, t_min, expected_dropout) if t_min <= n - 1 else 1.0
    raise InfeasiblePlanError(
        f"max_abort_prob={max_abort_prob} is unreachable for n={n}, expected_dropout="
        f"{expected_dropout}, corrupt_fraction={corrupt_fraction} ({c} colluders): even the "
        f"complete graph with the minimum safe threshold {t_min} aborts with probability "
        f"{best:.4g}; raise max_abort_prob to >= {best:.4g}, use more clients or assume fewer "
        "colluders"
    )


def check_round_parameters(n: int, degree: int, threshold: int, corrupt_fraction: float, *,
                           consistency: bool = False) -> None:
    """A client's floor on the server's round parameters (Bell et al. CCS 2020, sec. 3).

    Refuses (``RefusedError``) a degree below :func:`min_degree` or a threshold below
    :func:`min_safe_threshold` for ``floor(corrupt_fraction * n)`` colluders (the client's own
    fraction, never the server's).
    """
    k = min(degree, n - 1)
    c = colluders(n, corrupt_fraction)
    floor_t = min_safe_threshold(k, c, consistency=consistency)
    rule = (f"threshold > {c} colluders and 2*threshold > degree + 1, with the consistency check"
            if consistency else f"2*threshold > degree + 1 + {c} colluders")
    # security: the threshold floor and the degree floor hold whatever the server says
    if degree < 2 or k < min_degree(n) or not floor_t <= threshold <= k:
        raise RefusedError(
            f"threshold={threshold}, degree={degree} are below the security floor for n={n}: "
            f"degree >= {min_degree(n)} and {floor_t} <= threshold <= degree "
            f"({rule} at corrupt_fraction={corrupt_fraction})"
        )


def check_against_own_plan(n: int, degree: int, threshold: int, pin: SecAggConfig, *,
                           consistency: bool = False) -> None:
    """A planning client (``pin`` without threshold and degree) re-plans the round from ``n``
    and its own config and refuses a lower degree or, at its own degree, a lower threshold
    (``RefusedError``): a lying coordinator cannot downgrade it (review finding, issue 19)."""
    if pin.degree is not None:
        return
    try:
        own = plan_graph(n, pin.expected_dropout, pin.max_abort_prob,
                         corrupt_fraction=pin.corrupt_fraction, consistency=consistency)
    except InfeasiblePlanError as exc:
        raise RefusedError(f"this client cannot plan a round of n={n}: {exc}") from exc
    k = min(degree, n - 1)
    # security: never below the client's own plan
    if k < own.degree or (k == own.degree and threshold < own.threshold):
        raise RefusedError(
            f"server threshold={threshold}, degree={degree} are below this client's own plan "
            f"(threshold={own.threshold}, degree={own.degree}) for n={n}; run both sides with the "
            "same secagg-dropout, secagg-max-abort and secagg-corrupt-fraction"
        )


def _check_prob(name: str, value: float, *, upper_open: bool) -> None:
    ok = 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
    if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
        bound = "[0, 1)" if upper_open else "[0, 1]"
        raise SecAggConfigError(f"{name}={value} must be in {bound}")


@dataclass(frozen=True)
class SecAggConfig:
    """Secure-aggregation parameters (validated at construction).

    ``clip`` is the per-coordinate bound of the (already DP-noised) update; ``threshold`` and
    ``degree`` are derived from ``n`` by :func:`plan_graph` when left ``None``.
    """

    clip: float
    bits: int = 32
    expected_dropout: float = DEFAULT_EXPECTED_DROPOUT
    max_abort_prob: float = 0.01
    threshold: int | None = None
    degree: int | None = None
    corrupt_fraction: float = DEFAULT_CORRUPT_FRACTION

    def __post_init__(self) -> None:
        if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)) or not (
            math.isfinite(self.clip) and self.clip > 0
        ):
            raise SecAggConfigError(f"clip={self.clip!r} must be a finite positive float")
        if not MIN_CLIP <= self.clip <= MAX_CLIP:  # finite scale and a grid step below any update
            raise SecAggConfigError(
                f"clip={self.clip!r} is outside [MIN_CLIP, MAX_CLIP] = [{MIN_CLIP:g}, {MAX_CLIP:g}]: "
                "a smaller clip overflows the quantisation scale max_level / clip, a larger one "
                "makes one grid step coarser than any update; set secagg-clip to the update's "
                "per-coordinate bound (default 1.0)"
            )
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not (
            MIN_BITS <= self.bits <= MAX_BITS
        ):
            raise SecAggConfigError(f"bits={self.bits!r} must be an int in [{MIN_BITS}, {MAX_BITS}]")
        _check_prob("expected_dropout", self.expected_dropout, upper_open=True)
        _check_prob("max_abort_prob", self.max_abort_prob, upper_open=False)
        _check_prob("corrupt_fraction", self.corrupt_fraction, upper_open=True)
        if (self.threshold is None) != (self.degree is None):
            raise SecAggConfigError(
                f"threshold={self.threshold}, degree={self.degree}: set both or neither (planner)"
            )
        if self.threshold is not None and self.degree is not None:
            if self.degree < 2:
                raise SecAggConfigError(f"degree={self.degree} must be >= 2")
            if not min_safe_threshold(self.degree) <= self.threshold <= self.degree:
                raise SecAggConfigError(
                    f"threshold={self.threshold} must be in [{min_safe_threshold(self.degree)}, "
                    f"degree={self.degree}] (security: 2*threshold > degree + 1)"
                )

    def resolve(self, n: int, *, authenticated: bool = False) -> SecAggConfig:
        """Concrete config for ``n`` participants (planner or checks), failing closed;
        ``authenticated``: the round runs the consistency check (its lower floor)."""
        if n < MIN_CLIENTS:
            raise SecAggConfigError(f"n={n} must be >= {MIN_CLIENTS}")
        if self.degree is None:
            gp = plan_graph(n, self.expected_dropout, self.max_abort_prob,
                            corrupt_fraction=self.corrupt_fraction, consistency=authenticated)
            resolved = replace(self, degree=gp.degree, threshold=gp.threshold)
        else:
            degree = min(self.degree, n - 1)
            if degree < n - 1 and degree % 2:
                raise SecAggConfigError(f"degree={self.degree} must be even when below n - 1 = {n - 1}")
            resolved = replace(self, degree=degree)
            if resolved.threshold is not None and resolved.threshold > degree:
                raise SecAggConfigError(
                    f"threshold={resolved.threshold} exceeds degree={degree} for n={n}; lower it"
                )
            c = colluders(n, self.corrupt_fraction)
            floor_t = min_safe_threshold(degree, c, consistency=authenticated)
            if int(self.threshold or 0) < floor_t or degree < min_degree(n):
                raise SecAggConfigError(  # security: the floor clients enforce, checked here first
                    f"threshold={self.threshold}, degree={degree} are below the floor for n={n}: "
                    f"degree >= {min_degree(n)}, threshold >= {floor_t} ({c} colluders at "
                    f"corrupt_fraction={self.corrupt_fraction}); raise them or use the planner"
                )
            p = abort_probability(n, degree, int(self.threshold or 0), self.expected_dropout)
            if p > self.max_abort_prob:
                raise InfeasiblePlanError(
                    f"threshold={self.threshold}, degree={degree} give abort probability {p:.4g} > "
                    f"max_abort_prob={self.max_abort_prob} at n={n}, dropout={self.expected_dropout}; "
                    "lower threshold, raise degree, or leave both None to use the planner"
                )
        resolved.quantization(n)  # security: fail closed now if the sum of n clients could wrap
        return resolved

    def resolve_complete(self, n: int, *, authenticated: bool = False) -> SecAggConfig:
        """Like :meth:`resolve`, but a planned graph is the complete one with its largest
        threshold meeting the abort target (explicit degree and threshold are kept)."""
        if self.degree is None and n >= MIN_CLIENTS:
            gp = plan_graph(n, self.expected_dropout, self.max_abort_prob, complete=True,
                            corrupt_fraction=self.corrupt_fraction)
            return replace(self, degree=gp.degree, threshold=gp.threshold).resolve(
                n, authenticated=authenticated)
        return self.resolve(n, authenticated=authenticated)

    def quantization(self, n: int) -> QuantizationPlan:
        """Quantisation plan for ``n`` participants."""
        return plan_quantization(self.clip, n, self.bits)

    def abort_probability(self, n: int) -> float:
        """Abort probability (bound) of the resolved config at ``n`` participants."""
        r = self if self.degree is not None else self.resolve(n)
        return abort_probability(n, min(int(r.degree or 0), n - 1), int(r.threshold or 0),
                                 self.expected_dropout)
