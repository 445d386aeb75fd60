"""An in-process federation: the coordinator talks to client runtimes by direct calls.

Used by tests and benchmarks to exercise the whole round pipeline without Flower or Ray; the
Flower simulation (``fedpeft.simulations.launcher``) runs the same coordinator and client code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from fedpeft.client.runtime import ClientIdentity, ClientRuntime
from fedpeft.coordinator.transport import Reply
from fedpeft.core.protocol import ROUND_KEY, Content
from fedpeft.runconfig.config import RunConfig


class InMemoryTransport:
    """Node ``i`` is a :class:`ClientRuntime` for partition ``i`` of ``num_clients``."""

    def __init__(self, run: RunConfig, num_clients: int, state_dir: str = "",
                 fault: Callable[[int, str, int], Exception | None] | None = None) -> None:
        self.runtimes = {
            i: ClientRuntime(run, ClientIdentity(client_id=f"client-{i}", partition_id=i,
                                                 num_partitions=num_clients, state_dir=state_dir))
            for i in range(num_clients)
        }
        self.fault = fault
        self.states: dict[int, dict[str, bytes]] = {i: {} for i in self.runtimes}
        self.received: list[tuple[str, int, Content]] = []  # what the coordinator received

    def node_ids(self) -> list[int]:
        return list(self.runtimes)

    def exchange(self, kind: str, messages: Mapping[int, Content], timeout: float) -> dict[int, Reply]:
        replies: dict[int, Reply] = {}
        for node, content in messages.items():
            if self.fault is not None:
                exc = self.fault(node, kind, int(content.get(ROUND_KEY, 0)))
                if exc is not None:
                    replies[node] = Reply(node, error=f"{type(exc).__name__}: {exc}")
                    continue
            reply = self.runtimes[node].handle(kind, content, self.states[node])
            self.received.append((kind, node, reply))
            replies[node] = Reply(node, content=reply)
        return replies
