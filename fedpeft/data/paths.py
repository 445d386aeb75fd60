"""Where benchmark data files live.

Order: ``$FEDPEFT_DATA_DIR`` if set (and then only there), else ``<project root>/../shared/data``
(project root = the first directory above this package holding ``pyproject.toml``), then
``<cwd>/../shared/data``. Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedpeft.core.errors import ConfigError
from fedpeft.data.errors import MissingDataError

ENV_VAR = "FEDPEFT_DATA_DIR"


def _project_root() -> Path | None:
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    return None


def candidate_data_dirs() -> tuple[Path, ...]:
    """Directories searched by :func:`shared_data_path`, in order (duplicates removed)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return (Path(env).expanduser(),)
    dirs: list[Path] = []
    root = _project_root()
    if root is not None:
        dirs.append((root.parent / "shared" / "data").resolve())
    cwd_dir = (Path.cwd().parent / "shared" / "data").resolve()
    if cwd_dir not in dirs:
        dirs.append(cwd_dir)
    return tuple(dirs)


def _check_filename(filename: str) -> None:
    if not filename or Path(filename).is_absolute() or ".." in Path(filename).parts:
        raise ConfigError(
            f"filename={filename!r} must be a non-empty relative name such as 'sst2_dev.tsv'; "
            "pass an explicit path to the loader for files elsewhere."
        )


def shared_data_path(filename: str) -> Path:
    """Path of benchmark file ``filename``; raises :class:`MissingDataError` if no copy is found."""
    _check_filename(filename)
    dirs = candidate_data_dirs()
    for d in dirs:
        candidate = d / filename
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(d) for d in dirs)
    raise MissingDataError(
        f"data file {filename!r} not found; searched: {searched}. Set {ENV_VAR} to the directory "
        "that holds it, or pass the file's path to the loader explicitly."
    )


def data_available(filename: str) -> bool:
    """Whether :func:`shared_data_path` would find ``filename`` (for tests/benchmarks to skip)."""
    try:
        shared_data_path(filename)
    except MissingDataError:
        return False
    return True


def resolve_path(path: str | os.PathLike[str] | None, default_filename: str) -> Path:
    """``path`` if given (it must exist), else the shared copy of ``default_filename``."""
    if path is None:
        return shared_data_path(default_filename)
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingDataError(
            f"data file path={str(p)!r} does not exist or is not a file; searched: {p.resolve()}. "
            f"Pass an existing file, or omit path and set {ENV_VAR}."
        )
    return p
