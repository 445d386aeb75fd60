"""Bring your own data (issue 21): every format, header mode, column choice and error of a
user's file, read through the run config's ``data-*`` knobs, on files generated here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpeft.cli.data_inspect import inspect_lines
from fedpeft.cli.main import main
from fedpeft.core.errors import ConfigError, DataError, UnknownNameError
from fedpeft.data.config import DataConfig
from fedpeft.data.federation import federated_split, load_data_file
from fedpeft.data.textfiles import FileSpec, column_spec, load_file, sniff_format
from fedpeft.runconfig.config import parse_data_config, parse_run_config

SPAM = [("ham", "Go until jurong point, crazy.. Available only in bugis"),
        ("ham", "Ok lar... Joking wif u oni..."),
        ("spam", "Free entry in 2 a wkly comp to win FA Cup final tkts"),
        ("ham", "U dun say so early hor... U c already then say..."),
        ("spam", "WINNER!! As a valued network customer you have been selected"),
        ("ham", "Nah I don't think he goes to usf, he lives around here though")]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _spam(tmp: Path, n: int = 30, *, header: str = "", sep: str = "\t",
          name: str = "SMSSpamCollection") -> Path:
    """The public SMS spam corpus' layout: no suffix, label first, no header."""
    rows = [f"{SPAM[i % 6][0]}{sep}{SPAM[i % 6][1]} {i}" for i in range(n)]
    return _write(tmp / name, (header + "\n" if header else "") + "\n".join(rows) + "\n")


def _users_file(tmp: Path, users: int = 6, per_user: int = 5) -> Path:
    lines = ["author\tlabel\treview"]
    for u in range(users):
        for j in range(per_user + u % 3):
            lines.append(f"user{u}\t{(u + j) % 2}\treview {j} written by user {u} about a film")
    return _write(tmp / "reviews.tsv", "\n".join(lines) + "\n")


# -- formats ----------------------------------------------------------------------------------
def test_the_review_s_spam_file_reads_without_any_knob(tmp_path: Path) -> None:
    """No suffix, no header, the label in the first column: format, columns and labels are
    inferred; before issue 21 the text was taken as ~5,000 labels."""
    data = parse_data_config({"dataset": "file", "data-path": str(_spam(tmp_path)),
                              "task": "classification"})
    layout: dict[str, object] = {}
    c = load_data_file(data.path, data, layout=layout)
    assert layout["format"] == "tsv" and layout["header"] is False
    assert (layout["text"], layout["label"]) == (1, 0)
    assert c.label_names == ("ham", "spam") and len(c) == 30
    assert c.texts[0].startswith("Go until jurong") and c.labels[:3] == (0, 0, 1)


@pytest.mark.parametrize(("content", "fmt"), [
    ('{"text": "a", "label": 1}\n', "jsonl"),
    ("a\t1\nb\t0\n", "tsv"),
    ("a,1\nb,0\nc,1\n", "csv"),
    ("just words on a line\nand more words\n", "text"),
    ("", "text"),
])
def test_format_from_content(content: str, fmt: str) -> None:
    assert sniff_format(content) == fmt


def test_csv_with_header_and_named_columns(tmp_path: Path) -> None:
    p = _write(tmp_path / "d.csv", 'id,body,y\n1,"good, really",pos\n2,bad,neg\n3,"fine",pos\n')
    c = load_file(p, FileSpec(text_column="body", label_column="y"), "classification")
    assert c.texts == ("good, really", "bad", "fine") and c.label_names == ("neg", "pos")
    # the same by index, with the header forced
    c2 = load_file(p, FileSpec(text_column=1, label_column=2, header="yes"), "classification")
    assert c2.texts == c.texts and c2.labels == c.labels


def test_label_names_fix_the_order(tmp_path: Path) -> None:
    p = _spam(tmp_path)
    c = load_file(p, FileSpec(label_names=("spam", "ham")), "classification")
    assert c.label_names == ("spam", "ham") and c.labels[:3] == (1, 1, 0)


@pytest.mark.parametrize(("header", "rows"), [("auto", 30), ("yes", 29), ("no", 30)])
def test_header_modes_without_a_header(tmp_path: Path, header: str, rows: int) -> None:
    c = load_file(_spam(tmp_path), FileSpec(header=header, text_column=1, label_column=0),
                  "classification")
    assert len(c) == rows


def test_a_header_of_unusual_names_is_detected(tmp_path: Path) -> None:
    p = _spam(tmp_path, header="v1\tv2")
    layout: dict[str, object] = {}
    c = load_file(p, FileSpec(), "classification", layout=layout)
    assert layout["header"] is True and layout["header_names"] == ["v1", "v2"]
    assert len(c) == 30 and c.label_names == ("ham", "spam")
    named = load_file(p, FileSpec(text_column="v2", label_column="v1"), "classification")
    assert named.texts == c.texts


def test_causal_lm_plain_text_jsonl_and_text_column(tmp_path: Path) -> None:
    txt = _write(tmp_path / "notes.txt", "first note\n\n  second note  \nthird\n")
    assert load_file(txt, FileSpec(), "causal_lm").texts == ("first note", "second note", "third")
    jl = _write(tmp_path / "n.jsonl", "\n".join(json.dumps({"content": t, "who": w}) for t, w in
                                               [("hi there", "a"), ("bye now", "b")]) + "\n")
    c = load_file(jl, FileSpec(user_column="who"), "causal_lm")
    assert c.texts == ("hi there", "bye now") and c.users == ("a", "b") and c.task == "causal_lm"
    tsv = _write(tmp_path / "t.tsv", "u1\tshort\ta much longer line of text\n"
                                     "u2\tsmall\tanother long line of prose here\n")
    c2 = load_file(tsv, FileSpec(user_column=0), "causal_lm")  # the longest column is the text
    assert c2.texts[0] == "a much longer line of text" and c2.users == ("u1", "u2")
    ids = _write(tmp_path / "ids.tsv", "a-very-long-user-identifier-0001\thello there\n"
                                      "a-very-long-user-identifier-0002\tgood night\n")
    c3 = load_file(ids, FileSpec(user_column=0), "causal_lm")  # the user column is never text
    assert c3.texts == ("hello there", "good night")


def test_chat_jsonl_is_rendered_with_the_model_s_chat_template(tmp_path: Path) -> None:
    chats = [{"messages": [{"role": "user", "content": "How are you?"},
                           {"role": "assistant", "content": "Fine, thanks."}], "user": "ann"},
             {"messages": [{"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello!"}], "user": "bob"}]
    p = _write(tmp_path / "chat.jsonl", "\n".join(json.dumps(c) for c in chats) + "\n")
    data = parse_data_config({"dataset": "file", "data-path": str(p), "task": "causal_lm",
                              "model": "smollm2-135m", "data-user-column": "user"})
    c = load_data_file(data.path, data)
    assert c.users == ("ann", "bob")
    assert "How are you?" in c.texts[0] and "Fine, thanks." in c.texts[0]
    assert "<|im_start|>assistant" in c.texts[0]  # SmolLM2-Instruct's template, not ours
    bad = _write(tmp_path / "bad.jsonl", json.dumps({"messages": [{"role": "bot", "content": "x"}],
                                                       "user": "c"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl: line 1: message 0 must be an object with 'role'"):
        load_data_file(str(bad), data)
    with pytest.raises(DataError, match="chat template"):
        load_file(p, FileSpec(), "causal_lm")  # no renderer: never a made-up format


# -- users and partitions --------------------------------------------------------------------
def test_natural_partition_one_client_per_user(tmp_path: Path) -> None:
    p = _users_file(tmp_path)
    data = parse_data_config({"dataset": "file", "data-path": str(p), "task": "classification",
                              "data-user-column": "author", "partitioner": "natural",
                              "data-min-user-examples": 6})
    split = federated_split(data, 3, 0)
    users = [{split.train.examples[i].user for i in part} for part in split.partitions]
    assert all(len(u) == 1 for u in users)  # each client is one user
    assert len({next(iter(u)) for u in users}) == 3
    # users with fewer than 6 rows (user0, user3: 5 each) hold no client and are not evaluated
    # on either; the held-out users are the evaluation set
    assert all(len(part) >= 6 for part in split.partitions)
    with pytest.raises(DataError, match="4 users .*data-min-user-examples=6.*fewer than the 4"):
        federated_split(data, 4, 0)


def test_natural_partition_without_a_user_column_names_the_knob(tmp_path: Path) -> None:
    data = parse_data_config({"dataset": "file", "data-path": str(_spam(tmp_path)),
                              "task": "classification", "partitioner": "natural"})
    with pytest.raises(ConfigError, match="no user column: set data-user-column"):
        federated_split(data, 2, 0)
    iid = parse_data_config({"dataset": "file", "data-path": str(_spam(tmp_path)),
                             "task": "classification", "partitioner": "iid"})
    assert len(federated_split(iid, 3, 0).partitions) == 3


# -- validation before any round --------------------------------------------------------------
def _run_flat(path: Path, **kw: object) -> dict[str, object]:
    return {"dataset": "file", "data-path": str(path), "task": "classification",
            "model": "minilm-l6", "partitioner": "iid", "dp": False, "secagg": False, **kw}


def test_num_labels_from_the_data_and_a_mismatch_is_an_error(tmp_path: Path) -> None:
    p = _spam(tmp_path)
    assert parse_run_config(_run_flat(p)).model.num_labels == 2  # 0: from the data
    three = _write(tmp_path / "three.tsv", "\n".join(f"text {i}\t{i % 3}" for i in range(30)))
    assert parse_run_config(_run_flat(three)).model.num_labels == 3
    with pytest.raises(DataError, match=r"num-labels=2, but data-path=.*three.tsv' has 3 labels: "
                                        r"set num-labels=3"):
        parse_run_config(_run_flat(three, **{"num-labels": 2}))
    with pytest.raises(ConfigError, match="num-labels=1"):
        parse_run_config(_run_flat(three, **{"num-labels": 1}))


def test_num_labels_of_the_built_in_data_sets_without_reading_them() -> None:
    base = {"task": "classification", "model": "minilm-l6", "partitioner": "iid", "dp": False,
            "secagg": False}
    assert parse_run_config({**base, "dataset": "agnews"}).model.num_labels == 4
    assert parse_run_config({**base, "dataset": "sst2"}).model.num_labels == 2
    with pytest.raises(DataError, match="num-labels=4, but dataset='sst2' has 2 labels"):
        parse_run_config({**base, "dataset": "sst2", "num-labels": 4})
    # a causal LM never reads the knob: 0 stays the old default 2 (fingerprints unchanged)
    assert parse_run_config({}).model.num_labels == 2


def test_the_text_column_taken_as_labels_is_an_error_not_a_torch_traceback(
        tmp_path: Path) -> None:
    p = _spam(tmp_path)
    with pytest.raises(DataError, match=r"column 1\) has 30 distinct values in 30 rows: it "
                                        r"looks like text.*data-label-column"):
        parse_run_config(_run_flat(p, **{"data-text-column": "0", "data-label-column": "1"}))


GOOD_ROWS = "".join(f"{lab}\t{text}\n" for lab, text in SPAM)


@pytest.mark.parametrize(("name", "content", "match"), [
    ("bad.data", GOOD_ROWS + "spam\t   \n", r"line 7 has an empty text"),
    ("bad.tsv", GOOD_ROWS + "spam\n", r"line 7 has 1 column\(s\)"),
    ("bad.data", '{"text": "x", "label": 1}\n{"text": "y"}\n', r"line 2 has no data-label-column"),
    ("bad.data", "\xff", "not UTF-8"),
    ("bad.data", "one line of words\nanother\n", "plain text.*set data-format"),
])
def test_bad_rows_name_the_file_and_the_line(tmp_path: Path, name: str, content: str,
                                             match: str) -> None:
    p = tmp_path / name
    p.write_bytes(content.encode("latin-1") if content == "\xff" else content.encode())
    with pytest.raises(DataError, match=match) as err:
        load_file(p, FileSpec(), "classification")
    assert name in str(err.value)


def test_knob_errors(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="data-format 'xml'"):
        DataConfig(dataset="file", path="x", format="xml")
    with pytest.raises(UnknownNameError, match="data-header 'maybe'"):
        DataConfig(dataset="file", path="x", header="maybe")
    with pytest.raises(ConfigError, match="data-user-column describe a file of your own"):
        DataConfig(dataset="sst2", user_column="author")
    with pytest.raises(ConfigError, match="must be distinct columns"):
        DataConfig(dataset="file", path="x", text_column="1", label_column="1")
    with pytest.raises(ConfigError, match="data-min-user-examples=0"):
        DataConfig(dataset="file", path="x", min_user_examples=0)
    assert column_spec("") is None and column_spec("3") == 3 and column_spec("body") == "body"
    with pytest.raises(DataError, match="plain text: it has no columns"):
        load_file(_write(tmp_path / "n.txt", "a line\n"), FileSpec(user_column="u"), "causal_lm")


def test_evaluation_file_with_its_own_columns(tmp_path: Path) -> None:
    train = _spam(tmp_path)
    ev = _write(tmp_path / "eval.csv", "message,kind\n" + "\n".join(
        f'"{t} eval",{lab}' for lab, t in SPAM) + "\n")
    data = parse_data_config({"dataset": "file", "data-path": str(train), "task": "classification",
                              "partitioner": "iid", "eval-path": str(ev),
                              "eval-text-column": "message", "eval-label-column": "kind"})
    split = federated_split(data, 2, 0)
    assert len(split.eval) == 6 and split.eval.label_names == ("ham", "spam")
    assert split.eval.texts[0].endswith(" eval")
    only_ham = _write(tmp_path / "ham.csv", "message,kind\nhello,ham\nbye,ham\n")
    data2 = parse_data_config({"dataset": "file", "data-path": str(train), "task": "classification",
                               "partitioner": "iid", "eval-path": str(only_ham),
                               "eval-text-column": "message", "eval-label-column": "kind"})
    with pytest.raises(DataError, match="evaluation file's labels.*data-label-names"):
        federated_split(data2, 2, 0)
    data3 = parse_data_config({"dataset": "file", "data-path": str(train), "task": "classification",
                               "partitioner": "iid", "eval-path": str(only_ham),
                               "eval-text-column": "message", "eval-label-column": "kind",
                               "data-label-names": "ham,spam"})
    assert federated_split(data3, 2, 0).eval.labels == (0, 0)


# -- fedpeft data inspect ---------------------------------------------------------------------
def test_inspect_reports_and_its_flags_reproduce_the_read(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    p = _users_file(tmp_path)
    long_row = "x " * 200
    with p.open("a", encoding="utf-8") as f:
        f.write(f"user9\t1\t{long_row}\nuser9\t0\treview 0 written by user 0 about a film\n")
    lines = inspect_lines(str(p), "classification", {"data-user-column": "author"})
    text = "\n".join(lines)
    assert "format: tsv" in text and "header: yes" in text
    assert "text column: review" in text and "label column: label" in text
    assert "user column: author" in text and "users: 7" in text
    assert "labels (2): 0: " in text
    assert "duplicate texts: 1" in text  # user9 repeats user0's first review
    assert "longer than max-length=64 tokens (minilm-l6): 1 of" in text
    flags = lines[-1].split()
    sets = dict(flags[i + 1].split("=", 1) for i in range(0, len(flags), 2))
    run = parse_run_config({**sets, "model": "minilm-l6", "dp": False, "secagg": False})
    again = federated_split(run.data, 3, 0)
    assert run.model.num_labels == 2 and run.data.user_column == "author"
    assert {again.train.examples[i].user for i in again.partitions[0]} == {"user2"}
    assert main(["data", "inspect", str(p), "--set", "data-user-column=author"]) == 0
    assert "reproduce with:" in capsys.readouterr().out
    assert main(["data", "inspect", str(tmp_path / "missing.tsv")]) == 2
    assert "does not exist" in capsys.readouterr().err
