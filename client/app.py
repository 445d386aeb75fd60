"""Flower ``ClientApp`` adapter (Message API): converts messages to flat dicts and back.

All work happens in :class:`client.runtime.ClientRuntime`. Runtimes are kept per process and
per node, so the frozen base model (shared through ``peft_methods.get_adapted``) and each
client's tokenised data are loaded once, not per round.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.runtime import ClientIdentity, ClientRuntime
from fedpeft.config import RunConfig, parse_run_config

RECORD = "fedpeft"
app = ClientApp()
_RUNTIMES: dict[tuple[tuple[object, ...], str, int, int], ClientRuntime] = {}


def identity_from_node_config(node_config: dict[str, object]) -> ClientIdentity:
    """Simulation gives ``partition-id``/``num-partitions``; deployments add ``client-id``."""
    partition_id = int(node_config.get("partition-id", 0))  # type: ignore[call-overload]
    num_partitions = int(node_config.get("num-partitions", 1))  # type: ignore[call-overload]
    client_id = str(node_config.get("client-id", f"client-{partition_id}"))
    state_dir = str(node_config.get("state-dir", ""))
    return ClientIdentity(client_id=client_id, partition_id=partition_id,
                          num_partitions=num_partitions, state_dir=state_dir)


def runtime_for(context: Context) -> ClientRuntime:
    run: RunConfig = parse_run_config(dict(context.run_config))
    identity = identity_from_node_config(dict(context.node_config))
    key = (run.flat, identity.client_id, identity.partition_id, identity.num_partitions)
    rt = _RUNTIMES.get(key)
    if rt is None:
        rt = ClientRuntime(run, identity)
        _RUNTIMES[key] = rt
    return rt


@app.train()
def train(msg: Message, context: Context) -> Message:
    content = dict(msg.content[RECORD])
    reply = runtime_for(context).handle_train(content)  # type: ignore[arg-type]
    return Message(RecordDict({RECORD: ConfigRecord(reply)}), reply_to=msg)  # type: ignore[arg-type]
