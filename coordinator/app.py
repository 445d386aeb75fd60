"""Flower ``ServerApp`` adapter (Message API): a Grid-backed Transport for the Coordinator."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedpeft.coordinator.server import Coordinator
from fedpeft.coordinator.transport import Reply
from fedpeft.core.protocol import KIND_SECAGG, KIND_TRAIN, RECORD, Content
from fedpeft.runconfig.config import parse_run_config

#: Flower message type of each message kind (the client app registers the same handlers).
MESSAGE_TYPES = {KIND_TRAIN: MessageType.TRAIN, KIND_SECAGG: f"{MessageType.QUERY}.{KIND_SECAGG}"}
app = ServerApp()


class GridTransport:
    """:class:`fedpeft.coordinator.transport.Transport` over a Flower Grid."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def node_ids(self) -> list[int]:
        return sorted(int(n) for n in self.grid.get_node_ids())

    def exchange(self, kind: str, messages: Mapping[int, Content], timeout: float) -> dict[int, Reply]:
        message_type = MESSAGE_TYPES.get(kind, f"{MessageType.QUERY}.{kind}")
        out = [Message(RecordDict({RECORD: ConfigRecord(dict(c))}), dst_node_id=node,
                       message_type=message_type)
               for node, c in messages.items()]
        replies: dict[int, Reply] = {}
        for rep in self.grid.send_and_receive(out, timeout=timeout):
            node = int(rep.metadata.src_node_id)
            if rep.has_error():
                replies[node] = Reply(node, error=f"client error {rep.error.code}: {rep.error.reason}")
            elif RECORD not in rep.content:
                replies[node] = Reply(node, error=f"reply lacks the {RECORD!r} record")
            else:
                replies[node] = Reply(node, content=dict(rep.content[RECORD]))  # type: ignore[arg-type]
        return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = parse_run_config(dict(context.run_config))
    run_dir = Path(run.run_dir).resolve()
    summary = Coordinator(run, GridTransport(grid), run_dir).run_federation()
    (run_dir / "summary.json").write_text(json.dumps({
        "rounds_completed": summary.rounds_completed, "start_round": summary.start_round,
        "num_rounds": run.federation.num_rounds, "stopped_reason": summary.stopped_reason,
    }, indent=2))
