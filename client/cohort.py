"""Many virtual clients' rounds in one process, their training batched over the shared base.

Each client's round runs exactly its own pipeline (:class:`fedpeft.client.runtime.ClientRuntime`):
its checks, its user-level release and record-level event reserved in its own ledgers, its
own data, sampling, optimiser, clipping and noise, its own masking and reply. Only the
training in between is shared: up to ``batch-clients`` clients at a time are trained in one
forward/backward per micro-batch (:func:`fedpeft.training.batched.batched_local_train`,
:func:`fedpeft.privacy.dp_sgd_batched.batched_dp_local_train`), each result equal to what the
client would have trained alone. A client that fails anywhere gets its own fault reply; the
others are not affected.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedpeft.client.runtime import ClientRuntime, RoundJob
from fedpeft.core.errors import ClientFault, FedPeftError
from fedpeft.core.protocol import KIND_TRAIN, Content, Value
from fedpeft.privacy.dp_sgd_batched import batched_dp_local_train
from fedpeft.training.batched import (
    BatchingError,
    CohortResult,
    batched_local_train,
    cohort_plan,
)
from fedpeft.training.memory import DEFAULT_BUDGET_SHARE, available_memory_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CohortJob:
    """One client's train message: its runtime, the message and its node state."""

    runtime: ClientRuntime
    content: Mapping[str, Value]
    state: dict[str, bytes]


def train_cohort(jobs: Sequence[CohortJob], batch_clients: int, micro_batch: int, *,
                 memory_budget: int | None = None) -> list[Content]:
    """The reply of every job's train message, as :meth:`ClientRuntime.handle` would give it,
    training up to ``batch_clients`` clients at once (rows per pass: ``micro_batch``).

    Clients are batched only with clients of the same shared model, round settings and
    mechanism (plain or DP-SGD); nothing falls back silently to another computation. When
    ``batch_clients`` clients would not fit ``memory_budget`` bytes (default: half of what the
    kernel reports available, :mod:`fedpeft.training.memory`), fewer are batched at a time and
    a line on stderr (and the log) says so; the results are the same.
    """
    if batch_clients < 1:
        raise BatchingError(f"batch-clients={batch_clients} must be >= 1")
    replies: list[Content | None] = [None] * len(jobs)
    begun: list[tuple[int, RoundJob]] = []
    for i, job in enumerate(jobs):
        try:
            started = job.runtime.begin_round(job.content, job.state)
            if isinstance(started, dict):
                replies[i] = job.runtime.checked(started)
            else:
                begun.append((i, started))
        except Exception as exc:  # noqa: BLE001 - becomes this client's fault reply
            replies[i] = job.runtime.fault_reply(KIND_TRAIN, exc, job.state)
    groups: dict[tuple[object, ...], list[tuple[int, RoundJob]]] = {}
    for i, rj in begun:
        rt = jobs[i].runtime
        # a user-level canary client trains nothing: it runs alone (its own group)
        canary = id(rt) if rt.user_canary is not None else None
        key = (id(rt.model), rj.server_round, rj.train, rj.private is not None, rt.run.dp,
               canary)
        groups.setdefault(key, []).append((i, rj))
    total = len(begun)
    done = 0
    budget = memory_budget if memory_budget is not None else int(
        DEFAULT_BUDGET_SHARE * available_memory_bytes())
    for members in groups.values():
        step = _planned_clients(jobs, members, batch_clients, micro_batch, budget)
        for start in range(0, len(members), step):
            part = members[start:start + step]
            t0 = time.perf_counter()
            outcome = _train_part(jobs, part, micro_batch)
            for (i, rj), (error, result, trained) in zip(part, outcome, strict=True):
                job = jobs[i]
                try:
                    if error is not None:
                        raise error
                    if result is None or trained is None:
                        raise ClientFault("batched training returned no result for this client")
                    replies[i] = job.runtime.checked(
                        job.runtime.finish_round(rj, result, trained, job.state))
                except Exception as exc:  # noqa: BLE001 - becomes this client's fault reply
                    replies[i] = job.runtime.fault_reply(KIND_TRAIN, exc, job.state)
            done += len(part)
            _progress(jobs[part[0][0]].runtime, part[0][1].server_round, done, total,
                      time.perf_counter() - t0)
    missing = [jobs[i].runtime.identity.client_id for i, r in enumerate(replies) if r is None]
    if missing:
        raise FedPeftError(f"train_cohort left clients without a reply: {missing}")
    return [r for r in replies if r is not None]


def _planned_clients(jobs: Sequence[CohortJob], members: Sequence[tuple[int, RoundJob]],
                     batch_clients: int, micro_batch: int, budget: int) -> int:
    """How many of a group's clients to batch at a time: ``batch_clients`` unless the memory
    planner says fewer (and then it says so)."""
    want = min(batch_clients, len(members))
    if want <= 1:
        return 1
    rt = jobs[members[0][0]].runtime
    plan = cohort_plan(rt.model, [rj.data for _, rj in members[:want]], members[0][1].train,
                       clients=want, rows=micro_batch, budget_bytes=max(budget, 1))
    if plan.reason:
        log.warning("%s", plan.reason)
        print(f"fedpeft: {plan.reason}", file=sys.stderr, flush=True)
    return plan.clients


def _train_part(jobs: Sequence[CohortJob], part: Sequence[tuple[int, RoundJob]],
                micro_batch: int) -> list[tuple[Exception | None, Any, Any]]:
    """Train one batch of begun rounds together: per client (error, result, trained tensors)."""
    runtimes = [jobs[i].runtime for i, _ in part]
    rjs = [rj for _, rj in part]
    first = runtimes[0]
    model = first.model
    try:
        if len(part) == 1:
            result, trained = first.train_alone(rjs[0])
            return [(None, result, trained)]
        datas = [rj.data for rj in rjs]
        starts = [rj.global_state for rj in rjs]
        cohort: CohortResult
        if rjs[0].private is not None:
            privs = [rj.private for rj in rjs if rj.private is not None]
            if len(privs) != len(rjs):
                raise BatchingError("a batch mixes private and non-private rounds")
            model.train()
            cohort = batched_dp_local_train(
                model, datas, starts, rjs[0].train, first.run.dp,
                noise_multipliers=[p.sigma for p in privs],
                randomnesses=[p.randomness for p in privs],
                micro_batch=micro_batch)
        else:
            cohort = batched_local_train(
                model, datas, starts, rjs[0].train,
                generators=[rt.shuffle_generator(rj.server_round) for rt, rj in zip(runtimes, rjs,
                                                                             strict=True)],
                micro_batch=micro_batch)
    except Exception as exc:  # noqa: BLE001 - the whole batch failed: each client is told
        log.error("a batch of %d clients failed in training", len(part), exc_info=exc)
        return [(exc, None, None) for _ in part]
    out: list[tuple[Exception | None, Any, Any]] = []
    for c in range(len(part)):
        error = cohort.errors[c]
        if error is None and (cohort.results[c] is None or cohort.states[c] is None):
            error = ClientFault("batched training returned no result for this client")
        out.append((error, cohort.results[c], cohort.states[c]))
    return out


def _progress(runtime: ClientRuntime, server_round: int, done: int, total: int,
              seconds: float) -> None:
    if runtime.run.progress:
        print(f"round {server_round}: {done}/{total} clients trained "
              f"(last batch {seconds:.1f} s)", file=sys.stderr, flush=True)
