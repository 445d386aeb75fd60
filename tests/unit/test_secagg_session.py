"""The client's SecAgg+ session glue: the durable, at-most-once unmask marker."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fedpeft.client.secagg_session import mark_unmask_answered
from fedpeft.core.errors import PayloadError


def test_an_unmask_is_answered_at_most_once(tmp_path: Path) -> None:
    markers = tmp_path / "secagg-unmasked"
    session = b"\x01" * 24
    mark_unmask_answered(markers, "client-0", session)
    marker = markers / f"client-0-{session.hex()}"
    assert marker.is_file() and stat.S_IMODE(os.stat(marker).st_mode) == 0o600
    with pytest.raises(PayloadError, match="already answered an unmask request"):
        mark_unmask_answered(markers, "client-0", session)
    mark_unmask_answered(markers, "client-0", b"\x02" * 24)  # another session
    mark_unmask_answered(markers, "client-1", session)  # another client
