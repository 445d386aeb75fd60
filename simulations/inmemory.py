"""An in-process federation: the coordinator talks to client runtimes by direct calls.

Used by tests and benchmarks to exercise the whole round pipeline without Flower or Ray; the
Flower simulation (``fedpeft.simulations.launcher``) runs the same coordinator and client code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from fedpeft.client.cohort import CohortJob, train_cohort
from fedpeft.client.runtime import ClientIdentity, ClientRuntime
from fedpeft.coordinator.transport import Reply
from fedpeft.core.protocol import KIND_TRAIN, ROUND_KEY, Content
from fedpeft.runconfig.config import RunConfig


class InMemoryTransport:
    """Node ``i`` is a :class:`ClientRuntime` for partition ``i`` of ``num_clients``.

    ``record=True`` keeps every reply the coordinator received (:attr:`received`, for tests
    that inspect the wire); off by default, since at population scale the masked vectors of
    every client and round would grow memory without bound.
    """

    def __init__(self, run: RunConfig, num_clients: int, state_dir: str = "",
                 fault: Callable[[int, str, int], Exception | None] | None = None, *,
                 record: bool = False) -> None:
        self.run = run
        self.runtimes = {
            i: ClientRuntime(run, ClientIdentity(client_id=f"client-{i}", partition_id=i,
                                                 num_partitions=num_clients, state_dir=state_dir))
            for i in range(num_clients)
        }
        self.fault = fault
        self.states: dict[int, dict[str, bytes]] = {i: {} for i in self.runtimes}
        self._received: list[tuple[str, int, Content]] | None = [] if record else None

    @property
    def received(self) -> list[tuple[str, int, Content]]:
        """What the coordinator received: ``(kind, node, reply)``, in order."""
        if self._received is None:
            raise RuntimeError("this InMemoryTransport keeps no replies: construct it with "
                               "record=True to inspect what the coordinator received")
        return self._received

    def node_ids(self) -> list[int]:
        return list(self.runtimes)

    def exchange(self, kind: str, messages: Mapping[int, Content], timeout: float) -> dict[int, Reply]:
        replies: dict[int, Reply] = {}
        todo: list[tuple[int, Content]] = []
        for node, content in messages.items():
            if self.fault is not None:
                exc = self.fault(node, kind, int(content.get(ROUND_KEY, 0)))
                if exc is not None:
                    replies[node] = Reply(node, error=f"{type(exc).__name__}: {exc}")
                    continue
            todo.append((node, content))
        cohort = self.run.cohort
        if kind == KIND_TRAIN and cohort.clients > 1:
            # the round's clients trained in batches over the shared base (fedpeft.client.cohort)
            answers = train_cohort([CohortJob(self.runtimes[node], content, self.states[node])
                                    for node, content in todo], cohort.clients, cohort.rows)
        else:
            answers = [self.runtimes[node].handle(kind, content, self.states[node])
                       for node, content in todo]
        for (node, _), reply in zip(todo, answers, strict=True):
            if self._received is not None:
                self._received.append((kind, node, reply))
            replies[node] = Reply(node, content=reply)
        return {node: replies[node] for node in messages if node in replies}
