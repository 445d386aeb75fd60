"""``--set KEY=VALUE`` command-line overrides -> run config overrides.

One parser for every command that takes ``--set`` (``fedpeft simulate``, ``fedpeft
coordinator``). Keys are checked against :data:`fedpeft.runconfig.config.DEFAULTS`; values stay
strings (stripped of surrounding whitespace) and are typed later by
:func:`fedpeft.runconfig.config.parse_run_config`, which names the key on a bad value.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedpeft.core.errors import ConfigError
from fedpeft.core.protocol import Scalar
from fedpeft.runconfig.config import DEFAULTS


def parse_overrides(items: Iterable[str]) -> dict[str, Scalar]:
    """``KEY=VALUE`` strings -> ``{key: value}``; :class:`ConfigError` for an item without
    ``=`` or a key that is not a run config key. A later item for the same key wins."""
    out: dict[str, Scalar] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like key=value")
        key, raw = (s.strip() for s in item.split("=", 1))
        if key not in DEFAULTS:
            raise ConfigError(f"--set {key!r} is not a run config key; known: {sorted(DEFAULTS)}")
        out[key] = raw
    return out
