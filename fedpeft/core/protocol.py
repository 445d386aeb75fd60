"""The coordinator-client protocol: value types, message kinds, field names and statuses.

One module for the names both roles use, so neither imports the other. Messages are flat
dictionaries of scalars and bytes (one Flower ``ConfigRecord`` each, named :data:`RECORD`);
which fields a reply may carry under DP is the client's rule
(``fedpeft.client.runtime.DP_REPLY_FIELDS``, docs/privacy.md "What a client sends").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from fedpeft.core.errors import PayloadError

#: A run-config value (``[tool.flwr.app.config]``).
Scalar = bool | int | float | str
#: A message field's value.
Value = bool | int | float | str | bytes
#: One message: field name -> value.
Content = dict[str, Value]

#: Name of the Flower ``ConfigRecord`` that carries a message's content, both ways.
RECORD = "fedpeft"

# -- message kinds (coordinator -> client) ---------------------------------------------------
#: Train one round: fields round, fingerprint, adapter (safetensors) and, under DP, the
#: ledger receipt; the reply carries the update (plain) or the first SecAgg+ message.
KIND_TRAIN = "train"
#: One SecAgg+ stage: field ``message`` (bytes) each way.
KIND_SECAGG = "secagg"
KINDS = (KIND_TRAIN, KIND_SECAGG)

# -- statuses (client -> coordinator, field ``status``) ---------------------------------------
STATUS_OK = "ok"
STATUS_ERROR = "error"
#: The client refused to train: its privacy budget would be exceeded.
STATUS_BUDGET_EXHAUSTED = "privacy_budget_exhausted"

# -- fields ----------------------------------------------------------------------------------
STATUS_KEY = "status"
REASON_KEY = "reason"
CLIENT_ID_KEY = "client-id"
ROUND_KEY = "round"
#: Train-message fields: the run's model/adapter fingerprint and the global adapter (bytes).
FINGERPRINT_KEY = "fingerprint"
ADAPTER_KEY = "adapter"
#: Train-message field under user-level DP with adaptive clipping: the round's clip of a
#: user's whole update (``fedpeft.privacy.adaptive_clip``; each client checks it).
ROUND_CLIP_KEY = "dp-user-round-clip"
#: Plain reply fields: the update (safetensors bytes), its size and the example count.
UPDATE_KEY = "update"
UPDATE_BYTES_KEY = "update-bytes"
NUM_EXAMPLES_KEY = "num-examples"
#: Train-message fields under secure aggregation: this node's SecAgg+ setup message, its
#: SecAgg+ id and the round's session id (bytes). Their presence asks for SecAgg.
SECAGG_SETUP_KEY = "secagg-setup"
SECAGG_ID_KEY = "secagg-id"
SECAGG_SESSION_KEY = "secagg-session"
#: Train-reply field under secure aggregation: the client's first SecAgg+ message (bytes).
SECAGG_ADVERTISE_KEY = "secagg"
#: A SecAgg+ protocol message (bytes).
SECAGG_MESSAGE_KEY = "message"
#: Train-message field: the coordinator's receipt of this client's ledger head (last round).
RECEIPT_KEY = "dp-ledger-receipt"
#: Reply field: this client's ledger head after the round (the coordinator keeps it).
LEDGER_HEAD_KEY = "dp-ledger-head"

_T = TypeVar("_T", bool, int, float, str, bytes)


def require_field(content: Mapping[str, Value], key: str, kind: type[_T]) -> _T:
    """``content[key]``, which must be present and an instance of ``kind``.

    Raises :class:`PayloadError` otherwise (the other side runs another version).
    """
    if key not in content:
        raise PayloadError(f"message lacks {key!r}; coordinator and client versions differ")
    value = content[key]
    if not isinstance(value, kind):
        raise PayloadError(f"message field {key!r} is {type(value).__name__}, expected "
                           f"{kind.__name__}")
    return value
