"""Unit tests: Corpus/TextExample containers and data-file path resolution."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedpeft.core.errors import ConfigError, DataError
from fedpeft.data.errors import MissingDataError
from fedpeft.data.examples import Corpus, TextExample
from fedpeft.data.paths import ENV_VAR, candidate_data_dirs, data_available, resolve_path, shared_data_path


def _clf(labels: list[int], names: tuple[str, ...] | None = ("a", "b")) -> Corpus:
    return Corpus(tuple(TextExample(f"t{i}", lab) for i, lab in enumerate(labels)), names,
                  "classification", "c")


def test_text_example_is_frozen() -> None:
    ex = TextExample("hi", 1, "u")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ex.text = "x"  # type: ignore[misc]
    assert TextExample("hi") == TextExample("hi", None, None)


def test_corpus_accessors_and_subset() -> None:
    c = Corpus(
        (TextExample("a", 0, "u1"), TextExample("b", 1, "u2"), TextExample("c", 1, None)),
        ("neg", "pos"), "classification", "toy",
    )
    assert len(c) == 3 and c.texts == ("a", "b", "c") and c.labels == (0, 1, 1)
    assert c.users == ("u1", "u2", None) and c.num_labels == 2
    s = c.subset([2, 0], name="part")
    assert s.texts == ("c", "a") and s.name == "part" and s.label_names == ("neg", "pos")
    with pytest.raises(DataError, match="index 3"):
        c.subset([3])


@pytest.mark.parametrize("labels", [[0, 2], [0, -1]])
def test_corpus_rejects_out_of_range_labels(labels: list[int]) -> None:
    with pytest.raises(DataError, match="label="):
        _clf(labels)


def test_corpus_validation() -> None:
    with pytest.raises(DataError, match="label=None"):
        Corpus((TextExample("x"),), None, "classification", "c")
    with pytest.raises(DataError, match="causal_lm"):
        Corpus((TextExample("x", 1),), None, "causal_lm", "c")
    with pytest.raises(ConfigError, match="task="):
        Corpus((), None, "translation", "c")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="duplicates"):
        Corpus((), ("a", "a"), "classification", "c")
    with pytest.raises(ConfigError, match="tuple"):
        Corpus([TextExample("x")], None, "causal_lm", "c")  # type: ignore[arg-type]
    lm = Corpus((TextExample("x"),), None, "causal_lm", "lm")
    with pytest.raises(DataError, match="unlabelled"):
        _ = lm.labels
    assert _clf([0, 1, 1], None).num_labels is None


def test_env_var_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "x.tsv").write_text("a\t1\n")
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert candidate_data_dirs() == (tmp_path,)
    assert shared_data_path("x.tsv") == tmp_path / "x.tsv"
    assert data_available("x.tsv") and not data_available("missing.tsv")


def test_missing_file_message_names_file_places_and_fix(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(MissingDataError) as err:
        shared_data_path("nope.tsv")
    msg = str(err.value)
    assert "nope.tsv" in msg and str(tmp_path) in msg and ENV_VAR in msg and "path" in msg
    assert isinstance(err.value, DataError)


def test_default_dirs_without_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    work = tmp_path / "proj"
    work.mkdir()
    monkeypatch.chdir(work)
    dirs = candidate_data_dirs()
    project_root = Path(__file__).resolve().parents[2]
    assert (project_root / "pyproject.toml").is_file()
    assert dirs[0] == (project_root.parent / "shared" / "data").resolve()
    assert (tmp_path / "shared" / "data").resolve() in dirs
    # the CWD fallback is really searched
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "only_here_xyz.txt").write_text("x")
    assert (shared_data_path("only_here_xyz.txt")
            == (tmp_path / "shared" / "data" / "only_here_xyz.txt").resolve())


@pytest.mark.parametrize("bad", ["", "/etc/passwd", "../x.tsv"])
def test_bad_filename(bad: str) -> None:
    with pytest.raises(ConfigError, match="filename="):
        shared_data_path(bad)


def test_resolve_path(tmp_path: Path) -> None:
    f = tmp_path / "f.txt"
    f.write_text("x")
    assert resolve_path(f, "ignored.txt") == f
    with pytest.raises(MissingDataError, match="g.txt"):
        resolve_path(tmp_path / "g.txt", "ignored.txt")
