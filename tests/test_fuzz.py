"""Property-based fuzzing (hypothesis) of the data path: loader -> negatives -> post-processing
-> scoring, on the real SmolLM2 tokenizer.

Every generated case must end in one of two ways: a clear error (a ValueError subclass whose
message names the file, the row/line and the column or field), or a result in which every row
is accounted for (`rows_in == rows_out + dropped (+ capped)` from the stage's own summary).
An unhandled exception, or a row that disappears without being counted, fails the test.

Each test builds its expectation from an independent model of the rules (what counts as a bad
row, which pairs are duplicates, which split a row belongs to) rather than from the library's
own helpers, so a disagreement shows up as a failure.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lastmile import data, metrics, negatives, postprocess
from lastmile.config import NEGATIVE_CATEGORIES, DataConfig, NegativesConfig, ScoreConfig
from lastmile.data import DataError
from lastmile.io import read_json, read_jsonl, write_jsonl
from lastmile.metrics import ScoreInputError

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

# ----------------------------------------------------------------------------- strategies

#: Strings that have broken text pipelines before: whitespace of every kind, line and paragraph
#: separators, NUL, BOM, combining marks, astral characters, the chat template's own special
#: tokens and Jinja syntax, CSV/JSON metacharacters, the post-processing rule's "Sure,".
TRICKY = ["", " ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u3000", "\u200b", "\ufeff", "\u2028",
          "\u2029", "\x85", "\x00", "\x1c", "\x0b", "e\u0301", "\U0001f600", "\U0010fffd",
          "日本語", "<|im_end|>", "<|im_start|>user", "<|endoftext|>", "{{ messages }}",
          "{% if x %}", '"', "'", ",", ";", "\\", "null", "NaN", "Sure,", "Sure, here:\n"]

plain = st.text(max_size=30)  # any code point but surrogates
word = st.text(st.characters(exclude_categories=("Z", "C")), min_size=1, max_size=10)
sentence = st.lists(st.one_of(word, st.sampled_from(TRICKY)), max_size=8).map(" ".join)
long_text = st.builds(lambda w, n: " ".join([w] * n), word, st.integers(150, 500))
whitespace = st.text(st.sampled_from(" \t\n\r\u00a0\u2028\u3000\x0b\x0c\x1c\x85"), max_size=5)
surrogate = st.builds(lambda a, s, b: a + s + b, plain, st.characters(categories=("Cs",)), plain)
text = st.one_of(plain, sentence, sentence, word, long_text, whitespace, st.sampled_from(TRICKY))
#: Anything a JSON cell can hold: mostly text, sometimes null / numbers / NaN / infinities /
#: booleans / lists / objects, and strings holding a lone surrogate (from a "\\ud800" escape).
json_value = st.one_of(text, text, text, st.none(), st.integers(), st.booleans(),
                       st.floats(allow_nan=True, allow_infinity=True),
                       st.lists(st.one_of(st.integers(), plain), max_size=3),
                       st.dictionaries(plain, st.integers(), max_size=2), surrogate)
#: Mostly usable text, so that most cases get past validation and exercise the writing and
#: accounting; every kind of bad cell still comes up.
good_text = st.builds(lambda a, w, b: f"{a} {w} {b}", st.one_of(sentence, plain), word,
                      st.one_of(st.just(""), sentence))
mostly_valid = st.one_of(good_text, good_text, good_text, good_text, long_text, json_value)
#: True about one time in ten. Hypothesis favours "simple" draws (index 0, small integers),
#: so the common outcome must be the simple one, or the rare case stops being rare.
rarely = st.sampled_from([False] * 9 + [True])
id_value = st.one_of(st.none(), st.integers(), plain, st.lists(st.integers(), max_size=2),
                     surrogate, st.booleans())


@st.composite
def records(draw, value=mostly_valid, allow_missing=True) -> dict[str, Any]:
    """One source row: input/output cells (sometimes missing), often an id, sometimes extras.
    The output is now and then the input itself or a single word."""
    inp = draw(value)
    kind = draw(st.sampled_from(["free", "free", "same", "word", "padded_same"]))
    out = {"free": None, "same": inp, "word": draw(word),
           "padded_same": f"  {inp}\n" if isinstance(inp, str) else inp}[kind]
    out = draw(value) if kind == "free" else out
    row: dict[str, Any] = {}
    if not allow_missing or not draw(rarely):
        row["input"] = inp
    if not allow_missing or not draw(rarely):
        row["output"] = out
    if draw(st.booleans()):
        row["id"] = draw(id_value)
    if draw(rarely):
        row["extra"] = draw(value)
    return row


@st.composite
def with_duplicates(draw, rows: list[dict]) -> list[dict]:
    """Re-insert copies of some rows (exact, or with the text padded by whitespace)."""
    rows = list(rows)
    for _ in range(draw(st.integers(0, 4))):
        if not rows:
            break
        copy = dict(rows[draw(st.integers(0, len(rows) - 1))])
        if draw(st.booleans()):
            copy = {k: f" {v}\t" if isinstance(v, str) and k in ("input", "output") else v
                    for k, v in copy.items()}
        rows.insert(draw(st.integers(0, len(rows))), copy)
    return rows


def _anchors() -> dict[str, list[dict]]:
    """Two plain rows per hash-split side: mixed into most cases so that both splits usually
    keep rows (hypothesis likes to repeat its simplest text, which lands on one side)."""
    found: dict[str, list[dict]] = {"train": [], "test": []}
    i = 0
    while min(map(len, found.values())) < 2:
        doc = f"anchor document {i} about a package"
        side = found[data.split_of(doc, 0.5)]
        if len(side) < 2:
            side.append({"input": doc, "output": f"anchor summary {i}"})
        i += 1
    return found


ANCHORS = _anchors()


@st.composite
def with_anchors(draw, rows: list, anchors: list[dict]) -> list:
    """`rows` with the anchor rows inserted at random places (most of the time)."""
    rows = list(rows)
    if draw(st.sampled_from([True, True, True, False])):
        for anchor in anchors:
            rows.insert(draw(st.integers(0, len(rows))), dict(anchor))
    return rows


# ----------------------------------------------------------------------------- writers

def _json_line(row: Any, ascii_only: bool) -> str:
    line = json.dumps(row, ensure_ascii=ascii_only)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate can only be written escaped
        line = json.dumps(row, ensure_ascii=True)
    return line


Numbered = list[tuple[int, Any]]


def write_source(path: Path, rows: list[Any], fmt: str, draw) -> tuple[Numbered, list[str]]:
    """Write `rows` as `fmt`. Returns ([(number the loader reports, the record as the loader
    will see it)], the file's columns): CSV turns every cell into text and its columns are the
    header's; Parquet keeps text or null; JSON's columns are the union of the objects' keys."""
    if fmt in ("jsonl", "jsonl.gz"):
        newline = draw(st.sampled_from(["\n", "\r\n"]))
        lines, numbered = [], []
        for row in rows:
            for _ in range(draw(st.integers(0, 1))):  # blank lines are skipped, not rows
                lines.append(draw(st.sampled_from(["", " ", "\t"])))
            lines.append(_json_line(row, draw(st.booleans())))
            numbered.append((len(lines), row))
        body = newline.join(lines) + newline
        raw = body.encode("utf-8")
        path.write_bytes(gzip.compress(raw) if fmt == "jsonl.gz" else raw)
        return _with_keys([(n, json.loads(_json_line(r, True))) for n, r in numbered])
    if fmt == "json":
        path.write_text("[" + ",\n".join(_json_line(r, True) for r in rows) + "]",
                        encoding="utf-8")
        return _with_keys([(i, json.loads(_json_line(r, True)))
                           for i, r in enumerate(rows, start=1)])
    if fmt == "csv":
        header = ["input", "output", "id"]
        if draw(st.booleans()):
            header = ["id", "output", "input"]
        cells = []
        for row in rows:
            values = ["" if row.get(c) is None else str(row.get(c)) for c in header]
            values = [v.encode("utf-8", "replace").decode("utf-8") for v in values]
            if draw(rarely):  # a short row: its last columns are missing
                values = values[: draw(st.integers(1, len(header) - 1))]
            cells.append(values)
        with open(path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([header] + cells)
        numbered, line = [], 2
        with open(path, newline="", encoding="utf-8") as f:  # physical line of each record
            reader = csv.reader(f)
            next(reader)
            for values in reader:
                numbered.append((line, dict(zip(header, values))))
                line = reader.line_num + 1
        return numbered, header
    if fmt == "parquet":
        def cell(v):
            return v if isinstance(v, str) and _valid_unicode(v) else None

        columns = {c: [cell(r.get(c)) for r in rows] for c in ("input", "output")}
        pq.write_table(pa.table({c: pa.array(v, pa.string()) for c, v in columns.items()}),
                       path)
        return ([(i, {c: columns[c][i - 1] for c in columns}) for i in range(1, len(rows) + 1)],
                list(columns))
    raise AssertionError(fmt)


def _with_keys(numbered: Numbered) -> tuple[Numbered, list[str]]:
    return numbered, list({k: None for _, r in numbered if isinstance(r, dict) for k in r})


# ----------------------------------------------------------------------------- the model

def _valid_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def expected_problem(rec: dict) -> tuple[str, str] | None:
    """(column, reason) of the first unusable column, by the documented rules."""
    for column in ("input", "output"):
        if column not in rec:
            return column, "missing_column"
        v = rec[column]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return column, "null"
        if not isinstance(v, str):
            return column, "non_string"
        if not _valid_unicode(v):
            return column, "invalid_unicode"
        if not v.strip():
            return column, "empty"
    if rec.get("id") is not None and not _valid_unicode(str(rec["id"])):
        return "id", "invalid_unicode"
    return None


def check_prepare(files: dict[str, tuple[str, tuple[Numbered, list[str]]]], source: Path,
                  out: Path, cfg: DataConfig, tokenizer, named: bool) -> None:
    """Run `prepare` and check it against the model: the exact error, or full accounting."""
    order = sorted(files)  # the loader reads a directory in name order
    # 1. read errors: a record that is not an object (JSON formats), file by file
    for name in order:
        label, (numbered, _) = files[name]
        for number, rec in numbered:
            if not isinstance(rec, dict):
                unit = "row" if name.endswith(".json") else "line"
                with pytest.raises(DataError, match=re.escape(f"{label}: {unit} {number} is a "
                                                              "JSON")):
                    data.prepare(source, out, cfg, tokenizer)
                event("error: a record that is not an object")
                return
    # 2. per part, in validation order (train first): missing columns, then bad rows
    parts = ([n for n in order if n.startswith("train")] + [n for n in order
             if n.startswith("test")]) if named else order
    dropped: Counter = Counter()
    valid: list[tuple[str, tuple[str, str]]] = []  # (split, (input, output))
    for name in parts:
        label, (numbered, columns) = files[name]
        for role, column in (("input_column", "input"), ("output_column", "output")):
            if column not in columns:
                with pytest.raises(DataError, match=re.escape(f"{role} {column!r} not found in "
                                                              f"{label}")):
                    data.prepare(source, out, cfg, tokenizer)
                event("error: a column no row has")
                return
        for number, rec in numbered:
            problem = expected_problem(rec)
            if problem is not None:
                if cfg.strict:
                    column, _ = problem
                    with pytest.raises(DataError, match=re.escape(
                            f"{label}: {'row' if name.endswith(('.json', '.parquet')) else 'line'}"
                            f" {number}: column {column!r} is ")):
                        data.prepare(source, out, cfg, tokenizer)
                    event("error: strict mode, a bad row")
                    return
                dropped[problem[1]] += 1
                continue
            pair = (rec["input"].strip(), rec["output"].strip())
            split = name.split(".")[0] if named else data.split_of(pair[0], cfg.test_fraction)
            valid.append((split, pair))
    # 3. duplicates: the first occurrence of a pair is kept, test rows seen first
    seen: set = set()
    candidates: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for split in ("test", "train"):
        for s, pair in valid:
            if s != split:
                continue
            if pair in seen:
                dropped["duplicate"] += 1
            else:
                seen.add(pair)
                candidates[split].append(pair)
    rows_in = sum(len(files[n][1][0]) for n in parts)

    try:
        summary = data.prepare(source, out, cfg, tokenizer)
    except DataError as e:  # a split left empty: said so, with the counts that emptied it
        m = re.search(r"no (train|test) rows left \(read (\d+), \w+ candidates (\d+)", str(e))
        assert m, str(e)
        split, read, n = m.group(1), int(m.group(2)), int(m.group(3))
        assert read == rows_in and n == len(candidates[split])
        # either nothing survived validation, or the token filter took every candidate
        too_long = re.search(r"'too_long': (\d+)", str(e))
        assert n == 0 or (too_long and int(too_long.group(1)) >= n), str(e)
        event("error: a split left empty")
        return

    assert summary == read_json(out / "summary.json")
    assert summary["rows_in"] == rows_in
    for reason in data.DROP_REASONS:
        if reason != "too_long":
            assert summary["dropped"][reason] == dropped[reason], reason
    capped = sum(summary["splits"][s]["capped"] for s in data.SPLITS)
    assert rows_in == (sum(summary["rows_out"].values()) + sum(summary["dropped"].values())
                       + capped)  # every row is written, dropped for a reason, or capped
    ids = []
    for split in data.SPLITS:
        counts = summary["splits"][split]
        assert counts["candidates"] == len(candidates[split])
        assert counts["rows_out"] + counts["too_long"] + counts["capped"] == counts["candidates"]
        written = list(read_jsonl(out / f"{split}.jsonl"))
        assert len(written) == summary["rows_out"][split] == counts["rows_out"]
        allowed = set(candidates[split])
        lengths = data.prompt_lengths(tokenizer, [r["prompt"] for r in written])
        for row, n_tokens in zip(written, lengths):
            assert (row["input"], row["output"]) in allowed
            assert row["input"] in row["prompt"] and n_tokens <= cfg.max_input_tokens
        ids += [r["id"] for r in written]
    assert len(ids) == len(set(ids))  # predictions are joined on ids
    event("written, every row accounted for")
    for reason, n in summary["dropped"].items():
        if n:
            event(f"dropped: {reason}")
    if capped:
        event("capped")


json_formats = st.sampled_from(["jsonl", "jsonl", "jsonl.gz", "json", "csv", "parquet"])
configs = st.builds(lambda strict, tokens, max_train, max_test: DataConfig(
    strict=strict, max_input_tokens=tokens, max_train=max_train, max_test=max_test,
    test_fraction=0.5), rarely, st.sampled_from([90, 400]),
    st.none() | st.integers(1, 5), st.none() | st.integers(1, 5))


# ----------------------------------------------------------------------------- data loader

@FUZZ
@given(fmt=json_formats, train=st.lists(records(), min_size=3, max_size=12),
       test=st.lists(records(), min_size=2, max_size=8), cfg=configs, st_data=st.data())
def test_named_split_files_account_for_every_row(tokenizer, fmt, train, test, cfg, st_data):
    draw = st_data.draw
    train = draw(with_anchors(draw(with_duplicates(train)), ANCHORS["train"][:1]))
    test = draw(with_anchors(draw(with_duplicates(test)), ANCHORS["test"][:1]))
    if fmt in ("jsonl", "json") and draw(rarely):  # a record that is not an object
        train.insert(draw(st.integers(0, len(train))), draw(st.sampled_from([[1], "x", 3, None])))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        files = {}
        for split, rows in (("train", train), ("test", test)):
            name = f"{split}.{fmt}"
            files[name] = (f"{src}/{name}", write_source(src / name, rows, fmt, draw))
        check_prepare(files, src, Path(tmp) / "out", cfg, tokenizer, named=True)


@FUZZ
@given(fmt=json_formats, rows=st.lists(records(), min_size=4, max_size=16), cfg=configs,
       st_data=st.data())
def test_hash_split_single_file_accounts_for_every_row(tokenizer, fmt, rows, cfg, st_data):
    rows = st_data.draw(with_anchors(st_data.draw(with_duplicates(rows)),
                                     ANCHORS["train"] + ANCHORS["test"]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data.{fmt}"
        numbered = write_source(path, rows, fmt, st_data.draw)
        check_prepare({path.name: (str(path), numbered)}, path, Path(tmp) / "out", cfg,
                      tokenizer, named=False)


@FUZZ
@given(rows=st.lists(st.fixed_dictionaries({"input": text, "output": text}), min_size=1,
                     max_size=6), extra=st.integers(1, 3), st_data=st.data())
def test_csv_row_with_more_fields_than_the_header_names_its_line(tokenizer, rows, extra,
                                                                 st_data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.csv"
        bad = st_data.draw(st.integers(0, len(rows) - 1))
        cells = [[r["input"], r["output"]] + (["x"] * extra if i == bad else [])
                 for i, r in enumerate(rows)]
        with open(path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([["input", "output"]] + cells)
        with pytest.raises(DataError, match=re.escape(f"{path}: line ") + r"\d+ has "
                           + str(2 + extra) + " fields, the header has 2"):
            data.prepare(path, Path(tmp) / "out", DataConfig(), tokenizer)


# ----------------------------------------------------------------------------- hostile files

#: Bytes that break readers: a quote (an unclosed CSV cell), invalid and partial UTF-8, NUL,
#: bare CR and LF, brackets (nesting), a BOM mid-file, a backslash (a JSON escape).
DAMAGE = [b'"', b"\xff", b"\xc3", b"\xe6\x97", b"\x00", b"\r", b"\n", b"[" * 300, b"{", b",",
          b"\xef\xbb\xbf", b"\\", b'"\n"']
damage_ops = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.sampled_from(DAMAGE)),
    st.tuples(st.just("zero"), st.floats(0, 1), st.integers(1, 64)))
#: Where a line of only brackets would make json.loads recurse 100,000 times.
DEEP = "[" * 100_000 + "]" * 100_000


def damage(raw: bytes, ops: list[tuple]) -> bytes:
    out = bytearray(raw)
    for op in ops:
        at = int(op[1] * len(out))
        if op[0] == "truncate":
            del out[at:]
        elif op[0] == "flip" and at < len(out):
            out[at] ^= op[2]
        elif op[0] == "insert":
            out[at:at] = op[2]
        elif op[0] == "zero":
            out[at:at + op[2]] = bytes(len(out[at:at + op[2]]))
    return bytes(out)


def write_plain(path: Path, rows: list[dict], fmt: str, deep_row: int | None) -> bytes:
    """The undamaged file's bytes (for .gz: before compression); `deep_row` gets a cell of
    100,000 nested arrays (JSON formats)."""
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)
        return path.read_bytes()
    if fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([["input", "output"]] + [[r["input"], r["output"]]
                                                             for r in rows])
        return path.read_bytes()
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    if deep_row is not None:
        lines[deep_row] = lines[deep_row][:-1] + ', "deep": ' + DEEP + "}"
    if fmt == "json":
        return ("[" + ",\n".join(lines) + "]").encode()
    return ("\n".join(lines) + "\n").encode()


@settings(FUZZ, max_examples=300)
@given(fmt=st.sampled_from(["jsonl", "jsonl.gz", "json", "csv", "parquet"]),
       rows=st.lists(st.fixed_dictionaries({"input": good_text, "output": good_text}),
                     min_size=1, max_size=8),
       ops=st.lists(damage_ops, min_size=1, max_size=3), inner=st.booleans(),
       deep=st.one_of(st.none(), st.integers(0, 7)), strict=rarely)
def test_damaged_files_give_one_clear_error_or_count_every_row(fmt, rows, ops, inner, deep,
                                                               strict):
    """Any file damaged on disk (cut short, bytes flipped or zeroed, quotes, bad UTF-8, NUL,
    brackets inserted; a .gz damaged before or after compression; a cell nested 100,000 deep)
    either loads with every row counted (kept or dropped for a reason) or raises one DataError
    naming the file, and its line/row when the damage is in one. Never another exception."""
    deep = deep if deep is not None and deep < len(rows) and fmt != "csv" else None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"damaged.{fmt}"
        raw = write_plain(path, rows, fmt, deep)
        if fmt == "jsonl.gz":
            raw = gzip.compress(damage(raw, ops) if inner else raw, mtime=0)
            raw = raw if inner else damage(raw, ops)
        else:
            raw = damage(raw, ops)
        path.write_bytes(raw)
        try:
            loaded = data.load_rows(path, DataConfig(strict=strict, test_fraction=0.5))
        except DataError as e:
            message = str(e)
            assert str(path) in message, message
            kind = re.sub(r"^.*?damaged\.[a-z.]+:? ", "", message)
            kind = re.sub(r"\d[\d,]*", "N", kind)[:60]
            assert re.search(r"\b(line|lines|row|rows) N", kind) or kind.startswith((
                "cannot read Parquet", "the file has no rows", "not valid JSON",
                "input_column", "output_column", "no such")), message
            event(f"error: {kind}")
            return
        kept = sum(len(loaded.splits[s]) for s in data.SPLITS)
        assert kept + sum(loaded.dropped.values()) == loaded.rows_in
        ids = [r["id"] for s in data.SPLITS for r in loaded.splits[s]]
        assert len(ids) == len(set(ids))
        event("loaded, every row counted" + (" (a row dropped)" if loaded.dropped else ""))
        for reason in loaded.dropped:
            event(f"dropped: {reason}")


@FUZZ
@given(ids=st.lists(st.one_of(st.sampled_from(["x", "x~2", "x~3", "x~2~2", "y", "7", "~", ""]),
                              plain), min_size=1, max_size=12),
       n_test=st.integers(0, 12))
def test_ids_are_unique_after_filtering_whatever_the_input_ids(ids, n_test):
    """Stages join on ids: after filter_data no two rows share one. The first row (test rows
    first) with an id keeps it, every other gets `id~k`; the same input, the same ids."""
    def fresh() -> dict[str, list[dict]]:
        rows = [{"id": i} for i in ids]
        return {"test": rows[:n_test], "train": rows[n_test:]}

    splits = fresh()
    data._unique_ids(splits)
    out = [r["id"] for r in splits["test"] + splits["train"]]
    assert len(out) == len(set(out))
    seen = set()
    for before, after in zip(ids, out):
        if before not in seen:
            assert after == before
        else:
            assert after.startswith(before + "~") and after[len(before) + 1:].isdigit()
        seen.add(before)
    again = fresh()
    data._unique_ids(again)
    assert [r["id"] for r in again["test"] + again["train"]] == out


def _record_ends(lines: list[str]) -> list[int]:
    """The physical line each CSV record ends on, as csv.reader splits them."""
    reader = csv.reader(iter(lines))
    return [reader.line_num for _ in reader]


@settings(FUZZ, max_examples=300)
@given(text=st.lists(st.sampled_from(['"', '"', ",", "a", "b", " ", "\r", "\n", "\r\n", "é"]),
                    max_size=60).map("".join))
def test_a_squeezed_csv_record_ends_where_the_original_does(text):
    """An over-long CSV record is read squeezed (quotes and line ends kept, every other run cut
    to its last byte, a comma or "x"): the reader must find the same record ends, or the rows
    after a dropped record would shift."""
    raw = text.encode()
    lines = [raw[m.start():m.end()] for m in re.finditer(rb"[^\r\n]*(\r\n|\r|\n|$)", raw)
             if m.end() > m.start()]
    squeezed = [data._squeeze_csv(line).decode() for line in lines]
    assert _record_ends([line.decode() for line in lines]) == _record_ends(squeezed)


# ----------------------------------------------------------------------------- negatives

neg_text = st.one_of(sentence, word, plain, long_text, st.sampled_from(TRICKY[20:]))


@st.composite
def true_rows(draw) -> list[dict]:
    """Rows as filter_data writes them (non-empty stripped text), with repeats and copies."""
    n = draw(st.integers(1, 7))
    rows = []
    for i in range(n):
        inp = draw(st.builds(lambda t, w: f"{t} {w}", neg_text, word))  # never blank
        out = draw(st.one_of(st.builds(lambda w, t: f"{w} {t}", word, neg_text), st.just(inp),
                             word))
        rows.append({"id": f"r{i}", "input": inp.strip(), "output": out.strip(),
                     "prompt": f"<|im_start|>user\n{inp.strip()}<|im_end|>\n"})
    for i in range(draw(st.integers(0, 2))):  # the same pair under another id
        rows.append({**rows[draw(st.integers(0, n - 1))], "id": f"dup{i}"})
    return rows


categories = st.lists(st.sampled_from(sorted(negatives.REGISTRY)), min_size=1, max_size=6,
                      unique=True).map(tuple)


@FUZZ
@given(rows=true_rows(), cats=categories, budget=st.integers(1, 40), seed=st.integers(0, 3))
def test_negatives_from_loader_output_account_for_every_row(tokenizer, rows, cats, budget,
                                                            seed):
    cfg = NegativesConfig(categories=cats, max_output_tokens=budget, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        train, out = Path(tmp) / "train.jsonl", Path(tmp) / "rm.jsonl"
        train.write_text("".join(_json_line(r, False) + "\n" for r in rows), encoding="utf-8")
        if "repaired" in cats and len(rows) < 2:
            with pytest.raises(ValueError, match="needs at least 2 rows, got 1"):
                negatives.build_reward_dataset(train, out, cfg, tokenizer)
            return
        summary = negatives.build_reward_dataset(train, out, cfg, tokenizer,
                                                 summary_path=Path(tmp) / "summary.json")
        made = list(read_jsonl(out))
    k = len(cats)
    left_out = summary.get("left_out_unchanged", {})
    assert summary["rows_in"] == len(rows) and summary["rows_out"] == len(made)
    # One of each category per true row, none lost - but the unchanged rows that
    # negatives.DROP_UNCHANGED categories leave out, which the summary counts.
    assert len(made) == len(rows) * (1 + k) - sum(left_out.values())
    assert set(left_out) == set(cats) & negatives.DROP_UNCHANGED
    assert sum(summary["per_category"].values()) == len(made)
    assert len({r["id"] for r in made}) == len(made)
    encode = negatives.encode
    special = negatives.special_ids(tokenizer)
    identical: Counter = Counter()
    starts = [j for j, r in enumerate(made) if r["category"] == "true"] + [len(made)]
    assert len(starts) == len(rows) + 1
    for i, row in enumerate(rows):
        group = made[starts[i]:starts[i + 1]]
        assert group[0] == {"id": row["id"], "source_id": row["id"], "input": row["input"],
                            "prompt": row["prompt"], "output": row["output"], "label": 1.0,
                            "weight": 1.0, "category": "true"}
        present = [neg["category"] for neg in group[1:]]
        assert present == [c for c in cats if c in present]  # in the configured order
        assert set(cats) - set(present) <= negatives.DROP_UNCHANGED
        for name, neg in zip(present, group[1:]):
            assert neg["category"] == name and neg["label"] == 0.0
            if name in negatives.DROP_UNCHANGED:
                assert neg["output"].strip() != row["output"].strip()
            assert neg["weight"] == pytest.approx(1 / k) and neg["source_id"] == row["id"]
            assert isinstance(neg["output"], str)
            identical[name] += neg["output"].strip() == row["output"].strip()
            ids = encode(tokenizer, [neg["output"]])[0]
            if name in ("random_tokens", "repetitive", "copy_input"):
                assert len(ids) <= budget, (name, neg["output"])
            if name == "random_tokens":
                assert ids and not special.intersection(ids)
            if name == "shuffled":
                assert sorted(neg["output"].split()) == sorted(row["output"].split())
            if name == "repaired":
                assert neg["output"] in [r["output"] for j, r in enumerate(rows) if j != i]
    assert summary["identical_to_true"] == {c: identical[c] for c in cats}


@st.composite
def corrupt_rows(draw) -> tuple[list[Any], int | None]:
    """Loader-like rows with at most one corruption; returns (rows, 1-based bad row or None)."""
    rows: list[Any] = [{"id": f"r{i}", "input": draw(word), "output": draw(word),
                        "prompt": draw(word)} for i in range(draw(st.integers(2, 6)))]
    kind = draw(st.sampled_from(["none", "not_object", "missing", "null", "non_text",
                                 "surrogate", "repeated_id"]))
    if kind == "none":
        return rows, None
    i = draw(st.integers(1, len(rows) - 1)) if kind == "repeated_id" else draw(
        st.integers(0, len(rows) - 1))
    field = draw(st.sampled_from(["input", "output", "prompt"]))
    if kind == "not_object":
        rows[i] = draw(st.sampled_from([[1, 2], "text", 7]))
    elif kind == "missing":
        del rows[i][draw(st.sampled_from(negatives.ROW_FIELDS))]
    elif kind == "null":
        rows[i][draw(st.sampled_from(negatives.ROW_FIELDS))] = None
    elif kind == "non_text":
        rows[i][field] = draw(st.one_of(st.integers(), st.booleans(), st.lists(st.integers())))
    elif kind == "surrogate":
        rows[i][field] = draw(surrogate)
    else:
        rows[i]["id"] = rows[draw(st.integers(0, i - 1))]["id"]
    return rows, i + 1


@FUZZ
@given(case=corrupt_rows())
def test_negatives_bad_rows_are_errors_naming_file_and_row(tokenizer, case):
    rows, bad = case
    cfg = NegativesConfig(max_output_tokens=20)
    with tempfile.TemporaryDirectory() as tmp:
        train = Path(tmp) / "train.jsonl"
        train.write_text("".join(_json_line(r, True) + "\n" for r in rows), encoding="utf-8")
        if bad is None:
            summary = negatives.build_reward_dataset(train, Path(tmp) / "rm.jsonl", cfg,
                                                     tokenizer)
            assert summary["rows_out"] == len(rows) * (1 + len(NEGATIVE_CATEGORIES))
        else:
            with pytest.raises(ValueError, match=re.escape(f"{train}: row {bad}")):
                negatives.build_reward_dataset(train, Path(tmp) / "rm.jsonl", cfg, tokenizer)


# ----------------------------------------------------------------------------- post-processing

any_text = st.one_of(st.text(), surrogate, st.lists(st.one_of(st.sampled_from(TRICKY), plain),
                                                    max_size=8).map("".join))


@FUZZ
@given(raw=any_text)
def test_clean_is_one_stripped_line_of_the_text_and_idempotent(raw):
    result = postprocess.clean_with_flags(raw)
    normalised = raw.replace("\r\n", "\n").replace("\r", "\n")
    assert "\n" not in result.text and "\r" not in result.text
    assert result.text == result.text.strip() and result.text in normalised
    assert postprocess.clean(result.text) == result.text
    if "\n" not in normalised:
        assert result == postprocess.Cleaned(raw.strip(), False, False)
    if result.sure_dropped:
        assert normalised.lstrip().startswith("Sure,")


prediction_rows = st.fixed_dictionaries(
    {"id": id_value, "prediction": st.one_of(any_text, any_text, any_text, st.none(),
                                             st.integers(), st.lists(st.integers())),
     "variant": st.one_of(st.sampled_from(["base", "mle", "rl"]), st.sampled_from(["base"]),
                          st.just(""), st.none(), st.integers())},
    optional={"reference": any_text})


def _bad_prediction(row: dict) -> bool:
    return not isinstance(row.get("prediction"), str) or not isinstance(
        row.get("variant"), str) or not row["variant"]


@FUZZ
@given(rows=st.lists(prediction_rows, max_size=8))
def test_postprocess_keeps_every_row_or_names_the_bad_one(rows):
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "predictions.jsonl", Path(tmp) / "cleaned.jsonl"
        src.write_text("".join(_json_line(r, True) + "\n" for r in rows), encoding="utf-8")
        bad = next((i for i, r in enumerate(rows, start=1) if _bad_prediction(r)), None)
        if bad is not None:
            with pytest.raises(ValueError, match=re.escape(f"{src}: row {bad} (id=")):
                postprocess.postprocess_predictions(src, dst)
            return
        if not rows:
            with pytest.raises(ValueError, match="no predictions to post-process"):
                postprocess.postprocess_predictions(src, dst)
            return
        summary = postprocess.postprocess_predictions(src, dst)
        cleaned = list(read_jsonl(dst))
    assert summary["rows"] == len(cleaned) == len(rows)
    for row, out in zip(rows, cleaned):
        assert out["raw_prediction"] == row["prediction"]
        assert out["prediction"] == postprocess.clean(row["prediction"])
        assert out["variant"] == row["variant"] + "_cleaned"
    assert summary["changed"] == sum(o["prediction"] != r["prediction"]
                                     for r, o in zip(rows, cleaned))


# ----------------------------------------------------------------------------- scoring

score_rows = st.fixed_dictionaries(
    {"prediction": st.one_of(text, text, text, surrogate, st.none(), st.integers()),
     "reference": st.one_of(text, text, text, surrogate, st.lists(st.integers()))},
    optional={"variant": st.one_of(st.sampled_from(["base", "rl", "mle_cleaned"]), st.none(),
                                   st.just(""), st.integers()), "id": id_value})


def _score_problem(row: dict) -> str | None:
    for key in ("prediction", "reference"):
        if not isinstance(row.get(key), str) or not _valid_unicode(row[key]):
            return key
    variant = row.get("variant")
    if variant is not None and (not isinstance(variant, str) or not variant):
        return "variant"
    return None


def _rouge_tokens(s: str) -> bool:
    return bool(re.search(r"[a-z0-9]", s.lower()))


@FUZZ
@given(rows=st.lists(score_rows, max_size=10), via_file=st.booleans())
def test_scoring_counts_every_row_or_names_the_bad_one(rows, via_file):
    cfg = ScoreConfig(semantic_similarity=False)
    bad = next((i for i, r in enumerate(rows, start=1) if _score_problem(r)), None)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "predictions.jsonl"
        path.write_text("".join(_json_line(r, True) + "\n" for r in rows), encoding="utf-8")

        def run():
            if via_file:
                return metrics.score_file(path, Path(tmp) / "scores.json", cfg)
            return metrics.score_predictions(rows, cfg)

        if bad is not None:
            where = f"{path}:{bad}" if via_file else f"row {bad}"
            with pytest.raises(ScoreInputError, match=re.escape(where) + ".*"
                               + re.escape(repr(_score_problem(rows[bad - 1])))):
                run()
            return
        if not rows:
            with pytest.raises(ScoreInputError, match="no predictions to score"):
                run()
            return
        scores = run()
    models = scores["models"]
    by_variant = Counter(r.get("variant") or "default" for r in rows)
    assert {v: m["n"] for v, m in models.items()} == dict(by_variant)
    for variant, m in models.items():
        mine = [r for r in rows if (r.get("variant") or "default") == variant]
        excess = [len(r["prediction"].split()) - len(r["reference"].split()) for r in mine]
        assert m["excess_length"] == pytest.approx(sum(excess) / len(mine))
        assert m["bleurt"] is None and m["semantic_similarity"] is None
        for kind in metrics.ROUGE_TYPES:
            for part in metrics.PARTS:
                assert 0.0 <= m[f"{kind}_{part}"] <= 1.0 + 1e-9
                assert 0.0 <= m[f"la_{kind}_{part}"] <= 1.0 + 1e-9
            for part in ("precision", "recall"):  # the adjustment only ever scales down
                assert m[f"la_{kind}_{part}"] <= m[f"{kind}_{part}"] + 1e-9


@FUZZ
@given(pred=text, ref=text)
def test_lexical_scores_of_any_pair(pred, ref):
    scores = metrics.lexical_scores(pred, ref)
    assert all(math.isfinite(v) for v in scores.values())
    assert scores["excess_length"] == len(pred.split()) - len(ref.split())
    same = metrics.lexical_scores(pred, pred)
    want = 1.0 if _rouge_tokens(pred) else 0.0
    assert same["rouge1_f1"] == pytest.approx(want) and same["rougeL_f1"] == pytest.approx(want)
    assert same["la_rouge1_f1"] == pytest.approx(want if pred.split() else 0.0)


def test_json_writers_escape_lone_surrogates_instead_of_failing(tmp_path):
    """Found by the post-processing fuzz: a prediction holding a lone surrogate (read from a
    "\\ud800" escape) made write_jsonl raise UnicodeEncodeError and lose the whole file."""
    from lastmile.io import write_json

    rows = [{"prediction": "ok \ud800 then", "note": "café"}, {"prediction": "plain é"}]
    for name in ("p.jsonl", "p.jsonl.gz"):
        assert write_jsonl(tmp_path / name, rows) == 2
        assert list(read_jsonl(tmp_path / name)) == rows  # read back exactly
    lines = (tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()
    assert "\\ud800" in lines[0] and lines[1] == '{"prediction": "plain é"}'  # others readable
    write_json(tmp_path / "s.json", {"x": "\udfff", "y": "é"})
    assert read_json(tmp_path / "s.json") == {"x": "\udfff", "y": "é"}
