"""How the coordinator reaches clients, as a small protocol (Flower's Grid is one implementation).

Messages are flat dictionaries of scalars and bytes, which map one-to-one onto a Flower
``ConfigRecord``. A reply is either content or an error string (a client that crashed, timed
out or sent garbage); the coordinator drops such a client from the round and records why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

Value = bool | int | float | str | bytes
Content = dict[str, Value]


@dataclass(frozen=True)
class Reply:
    node_id: int
    content: Content | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.content is not None


class Transport(Protocol):
    def node_ids(self) -> list[int]:
        """Currently connected clients."""
        ...

    def exchange(self, kind: str, messages: Mapping[int, Content],
                 timeout: float) -> dict[int, Reply]:
        """Send one message per node and collect replies; a missing node has no entry."""
        ...
