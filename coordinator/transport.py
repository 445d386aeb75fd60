"""How the coordinator reaches clients, as a small protocol (Flower's Grid is one implementation).

Messages are flat dictionaries of scalars and bytes (:mod:`fedpeft.core.protocol`), which map
one-to-one onto a Flower ``ConfigRecord``. A reply is either content or an error string (a
client that crashed, timed out or sent garbage); the coordinator drops such a client from the
round and records why (:func:`classify_reply`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from fedpeft.core.protocol import (
    CLIENT_ID_KEY,
    REASON_KEY,
    STATUS_KEY,
    STATUS_OK,
    Content,
)


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


class Fault(dict[str, str]):
    """Why a node's reply is unusable: the record a round's ``faults`` list keeps.

    Keys: ``node`` always, then ``stage`` (secure rounds), then ``client`` and ``status`` when
    the client answered with a status other than ok, and ``reason``. A plain ``dict``
    subclass, so it compares equal to, and serialises as, the dict it holds.
    """


def classify_reply(node: int, reply: Reply | None, *, stage: str | None = None
                   ) -> Content | Fault:
    """A reply's content if the client answered ``ok``, else the :class:`Fault` to record.

    No reply (``None``) -> "no reply before the round timeout"; a transport error or an empty
    reply -> that error; a status other than ok (an error, a refused budget) -> the client's
    id, status and reason. What the content must carry beyond that (the update, a SecAgg+
    message) is the caller's to check. ``stage`` (a secure round's stage) is recorded after
    the node. Pure.
    """
    fault = Fault(node=str(node))
    if stage is not None:
        fault["stage"] = stage
    if reply is None:
        fault["reason"] = "no reply before the round timeout"
        return fault
    content = reply.content
    if not reply.ok or content is None:
        fault["reason"] = reply.error or "empty reply"
        return fault
    status = content.get(STATUS_KEY)
    if status != STATUS_OK:
        fault.update({"client": str(content.get(CLIENT_ID_KEY, node)), "status": str(status),
                      "reason": str(content.get(REASON_KEY, status))})
        return fault
    return content
