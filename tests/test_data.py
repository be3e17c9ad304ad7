"""lastmile.data: sources, splits, bad rows, the token filter, subsampling and the summary."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lastmile import data
from lastmile.config import DataConfig, get_profile
from lastmile.data import DataError
from lastmile.io import read_json, read_jsonl

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega").split()


SHA = "0123456789abcdef0123456789abcdef01234567"  # a made-up hub commit


def pairs(n: int, start: int = 0) -> list[dict]:
    """n distinct (input, output) rows with ids."""
    return [{"id": f"r{i}", "input": f"document {i}: " + " ".join(WORDS[: 5 + i % 15]),
             "output": f"summary {i}"} for i in range(start, start + n)]


def write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def prepare(source, tmp_path: Path, tokenizer, **cfg) -> tuple[dict, dict[str, list[dict]]]:
    out = tmp_path / "out"
    summary = data.prepare(source, out, DataConfig(**cfg), tokenizer)
    return summary, {s: list(read_jsonl(out / f"{s}.jsonl")) for s in data.SPLITS}


def hash_split(rows: list[dict], fraction: float = 0.1) -> dict[str, set[str]]:
    return {s: {r["input"] for r in rows if data.split_of(r["input"], fraction) == s}
            for s in data.SPLITS}


# ----------------------------------------------------------------------------- source kinds

def test_hash_split_is_sha256_of_the_normalised_input():
    text = "  Some   document\nwith spacing "
    u = int(hashlib.sha256(b"Some document with spacing").hexdigest()[:16], 16) / 2**64
    for fraction in (0.05, 0.1, 0.5, 0.9):
        assert data.split_of(text, fraction) == ("test" if u < fraction else "train")
    assert data.split_of(text, 0.3) == data.split_of("Some document with spacing", 0.3)


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_file_hash_split(tmp_path, tokenizer, gz):
    rows = pairs(60)
    src = write_jsonl(tmp_path / ("d.jsonl.gz" if gz else "d.jsonl"), rows, gz=gz)
    summary, out = prepare(src, tmp_path, tokenizer, test_fraction=0.3)
    expected = hash_split(rows, 0.3)
    assert {r["input"] for r in out["test"]} == expected["test"] and expected["test"]
    assert {r["input"] for r in out["train"]} == expected["train"]
    assert summary["split_method"] == "hash" and summary["source_kind"] == "file"
    by_id = {r["id"]: r for r in rows}
    for r in out["train"] + out["test"]:
        assert set(r) == {"id", "input", "output", "prompt"}
        assert (r["input"], r["output"]) == (by_id[r["id"]]["input"], by_id[r["id"]]["output"])


def test_csv_file_with_multiline_cells(tmp_path, tokenizer):
    rows = pairs(30)
    rows[3]["input"] = "first line\nsecond line, with a comma and \"quotes\""
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "input", "output"])
        w.writeheader()
        w.writerows(rows)
    _, out = prepare(path, tmp_path, tokenizer, test_fraction=0.3)
    got = {r["id"]: r["input"] for r in out["train"] + out["test"]}
    assert len(got) == 30 and got["r3"] == rows[3]["input"]


def test_parquet_and_json_array_files(tmp_path, tokenizer):
    rows = pairs(40)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    s1, o1 = prepare(tmp_path / "d.parquet", tmp_path / "a", tokenizer, test_fraction=0.3)
    s2, o2 = prepare(tmp_path / "d.json", tmp_path / "b", tokenizer, test_fraction=0.3)
    assert s1["rows_in"] == s2["rows_in"] == 40
    assert o1 == o2 and len(o1["train"]) + len(o1["test"]) == 40


def test_directory_with_named_splits(tmp_path, tokenizer):
    d = tmp_path / "d"
    d.mkdir()
    write_jsonl(d / "train-0.jsonl", pairs(10))
    write_jsonl(d / "train-1.jsonl", pairs(10, start=10))
    write_jsonl(d / "test.jsonl", pairs(6, start=100))
    write_jsonl(d / "validation.jsonl", pairs(4, start=200))
    (d / "README.md").write_text("not data")
    summary, out = prepare(d, tmp_path, tokenizer)
    assert summary["split_method"] == "named"
    assert {r["id"] for r in out["train"]} == {f"r{i}" for i in range(20)}
    assert {r["id"] for r in out["test"]} == {f"r{i}" for i in range(100, 106)}
    assert summary["files"] == [f"{d}/{n}" for n in ("test.jsonl", "train-0.jsonl",
                                                     "train-1.jsonl")]
    assert summary["ignored_files"] == [f"{d}/validation.jsonl"]
    assert summary["rows_in"] == 26

    (d / "test.jsonl").unlink()  # no test file: validation is the test split
    summary, out = prepare(d, tmp_path, tokenizer)
    assert {r["id"] for r in out["test"]} == {f"r{i}" for i in range(200, 204)}


def test_directory_without_split_names_keeps_sides_when_rows_arrive(tmp_path, tokenizer):
    d = tmp_path / "d"
    d.mkdir()
    write_jsonl(d / "part-a.jsonl", pairs(50))
    _, first = prepare(d, tmp_path / "1", tokenizer, test_fraction=0.2)
    write_jsonl(d / "part-b.jsonl", pairs(50, start=50))  # a scheduled retraining's new data
    summary, second = prepare(d, tmp_path / "2", tokenizer, test_fraction=0.2)
    assert summary["split_method"] == "hash" and summary["rows_in"] == 100
    for split in data.SPLITS:
        before = {r["id"] for r in first[split]}
        after = {r["id"] for r in second[split]}
        assert before and before < after
    assert sum(len(v) for v in second.values()) == 100


def test_inconsistent_split_names_are_errors(tmp_path, tokenizer):
    d = tmp_path / "d"
    d.mkdir()
    write_jsonl(d / "train.jsonl", pairs(5))
    write_jsonl(d / "test.jsonl", pairs(5, start=5))
    write_jsonl(d / "extra.jsonl", pairs(5, start=10))
    with pytest.raises(DataError, match="some files name a split.*extra.jsonl"):
        data.load_rows(d, DataConfig())
    (d / "train.jsonl").unlink()
    (d / "extra.jsonl").unlink()
    with pytest.raises(DataError, match="no train\\* file"):
        data.load_rows(d, DataConfig())


def test_hub_dataset_splits(tmp_path, monkeypatch):
    """The hub reader over a local dataset folder (the same `datasets` calls, no network)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(data, "resolve_hub_revision", lambda repo, revision=None: SHA)
    d = tmp_path / "hubds"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"document": f"doc {i}", "summary": f"s {i}"}
                                    for i in range(8)])
    write_jsonl(d / "validation.jsonl", [{"document": "held out", "summary": "h"}])
    parts = data.read_hub(str(d))
    assert [(p.split, len(p.records)) for p in parts] == [("train", 8), ("validation", 1)]
    assert {p.revision for p in parts} == {SHA}
    cfg = DataConfig(input_column="document", output_column="summary")
    dropped = Counter()
    assert [r["input"] for r in data.valid_rows(parts[1], cfg, dropped)] == ["held out"]
    assert data._named_parts(parts)[0] == {"train": [parts[0]], "test": [parts[1]]}
    assert data._hub_splits_to_read(["train", "validation", "test"]) == ["train", "test"]
    with pytest.raises(DataError, match="no 'train' split"):
        data._hub_splits_to_read(["test"])


def test_s3_prefix_and_key(s3_server, monkeypatch, tmp_path, tokenizer):
    """s3:// sources against a real S3 server (SeaweedFS): a prefix reads like a directory."""
    from lastmile import storage

    for name in [n for pair in storage.CREDENTIAL_VARS for n in pair] + [
            storage.CREDENTIALS_DIR_VAR, *storage.SESSION_TOKEN_VARS, *storage.ENDPOINT_VARS,
            storage.SECURE_VAR]:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LASTMILE_CACHE", str(tmp_path / "cache"))
    s3_server.client().make_bucket("lastmile-data-test")
    lines = lambda rows: "".join(json.dumps(r) + "\n" for r in rows).encode()  # noqa: E731
    s3_server.put("lastmile-data-test", "task/train.jsonl", lines(pairs(12)))
    s3_server.put("lastmile-data-test", "task/test.jsonl", lines(pairs(3, start=50)))
    summary, out = prepare("s3://lastmile-data-test/task/", tmp_path / "p", tokenizer)
    assert summary["source_kind"] == "s3" and summary["split_method"] == "named"
    assert len(out["train"]) == 12 and {r["id"] for r in out["test"]} == {"r50", "r51", "r52"}
    s3_server.put("lastmile-data-test", "one/all.jsonl", lines(pairs(40)))
    summary, out = prepare("s3://lastmile-data-test/one/all.jsonl", tmp_path / "k", tokenizer,
                           test_fraction=0.3)
    assert summary["split_method"] == "hash" and summary["files"] == [
        "s3://lastmile-data-test/one/all.jsonl"]
    assert {r["input"] for r in out["test"]} == hash_split(pairs(40), 0.3)["test"]


def test_missing_source_and_unloadable_hub_id(tmp_path):
    with pytest.raises(DataError, match="task data not found: .*nope.jsonl"):
        data.load_rows(tmp_path / "nope.jsonl", DataConfig())
    with pytest.raises(DataError, match="Hugging Face dataset 'nobody/no-such-dataset'"):
        data.load_rows("nobody/no-such-dataset", DataConfig())  # offline in tests


def test_empty_file_and_directory_without_data(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: the file has no rows"):
        data.load_rows(tmp_path / "empty.jsonl", DataConfig())
    (tmp_path / "header.csv").write_text("input,output\n")
    with pytest.raises(DataError, match="header.csv: the file has no rows"):
        data.load_rows(tmp_path / "header.csv", DataConfig())
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no task data files .* found: notes.txt"):
        data.load_rows(d, DataConfig())


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input": "a", "output": "b"}\n{"input": oops}\n')
    with pytest.raises(DataError, match="bad.jsonl: line 2 is not valid JSON"):
        data.load_rows(path, DataConfig())
    (tmp_path / "latin1.csv").write_bytes("input,output\ncaf\xe9,x\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.csv: line 2 is not valid UTF-8 \(invalid "
                       r"continuation byte at byte 4 of the line: b'\\xe9,x"):
        data.load_rows(tmp_path / "latin1.csv", DataConfig())


# ----------------------------------------------------------------------------- columns, rows

def test_column_mapping(tmp_path, tokenizer):
    rows = [{"dialogue": f"A: hi {i}\nB: hello {i}", "summary": f"greeting {i}"}
            for i in range(30)]
    src = write_jsonl(tmp_path / "samsum.jsonl", rows)
    summary, out = prepare(src, tmp_path, tokenizer, input_column="dialogue",
                           output_column="summary", test_fraction=0.3)
    got = {(r["input"], r["output"]) for r in out["train"] + out["test"]}
    assert got == {(r["dialogue"], r["summary"]) for r in rows}
    assert summary["columns"] == {"input": "dialogue", "output": "summary"}
    assert all(r["id"] == data.text_id(r["input"]) for r in out["train"])  # no id column


def test_missing_column_error_names_column_file_and_columns(tmp_path):
    src = write_jsonl(tmp_path / "x.jsonl", [{"document": "d", "summary": "s", "id": 1}])
    with pytest.raises(DataError) as e:
        data.load_rows(src, DataConfig(input_column="dialogue", output_column="summary"))
    msg = str(e.value)
    assert "'dialogue'" in msg and str(src) in msg and "document, summary, id" in msg


def bad_rows() -> list:
    return [
        {"input": "good one", "output": "ok"},
        {"output": "no input"},  # missing_column
        {"input": None, "output": "x"},  # null
        {"input": "text", "output": float("nan")},  # null (NaN, as pandas writes missing text)
        {"input": "text", "output": 7},  # non_string
        {"input": "   ", "output": "x"},  # empty
        {"input": "good one", "output": "ok"},  # duplicate
        {"input": "good one", "output": "another reference"},  # kept: same input, new output
        {"input": "text", "output": ["a"]},  # non_string
    ]


def test_bad_rows_counted_per_reason(tmp_path):
    src = write_jsonl(tmp_path / "b.jsonl", bad_rows())
    rows = data.load_rows(src, DataConfig())
    assert dict(rows.dropped) == {"missing_column": 1, "null": 2, "non_string": 2, "empty": 1,
                                  "duplicate": 1}
    kept = rows.splits["train"] + rows.splits["test"]
    assert sorted(r["output"] for r in kept) == ["another reference", "ok"]
    assert len({r["id"] for r in kept}) == 2  # same input twice: the later id gets a suffix
    assert rows.rows_in == 9


def test_bad_rows_in_csv_and_parquet(tmp_path):
    (tmp_path / "b.csv").write_text("input,output\nfine,ok\nshort\n,empty input\n")
    rows = data.load_rows(tmp_path / "b.csv", DataConfig())
    assert dict(rows.dropped) == {"missing_column": 1, "empty": 1}
    table = pa.table({"input": ["a b", None, "c d"], "output": ["x", "y", None]})
    pq.write_table(table, tmp_path / "b.parquet")
    rows = data.load_rows(tmp_path / "b.parquet", DataConfig())
    assert dict(rows.dropped) == {"null": 2}
    pq.write_table(pa.table({"input": [1, 2], "output": ["x", "y"]}), tmp_path / "n.parquet")
    assert dict(data.load_rows(tmp_path / "n.parquet", DataConfig()).dropped) == {
        "non_string": 2}


def test_lone_surrogates_are_dropped_and_counted_not_a_crash(tmp_path, tokenizer):
    """JSON can escape a lone surrogate ("\\ud800"); no tokenizer or UTF-8 file can hold one.
    Found by tests/test_fuzz.py: it used to raise UnicodeEncodeError from the id hash."""
    path = tmp_path / "s.jsonl"
    rows = pairs(30) + [{"input": "bad \ud800 text", "output": "x"},
                        {"input": "fine text", "output": "bad \udfff"},
                        {"id": "id-\ud83d", "input": "fine", "output": "ok"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # escaped: valid JSON
    summary, out = prepare(path, tmp_path, tokenizer, test_fraction=0.3)
    assert summary["dropped"]["invalid_unicode"] == 3 and summary["rows_in"] == 33
    assert sum(summary["rows_out"].values()) == 30
    with pytest.raises(DataError, match=r"s.jsonl: line 31: column 'input' is not valid "
                       r"Unicode \(a lone surrogate\)"):
        data.load_rows(path, DataConfig(strict=True))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[30:][::-1] + pairs(1)))
    with pytest.raises(DataError, match=r"line 1: column 'id' is not valid Unicode"):
        data.load_rows(path, DataConfig(strict=True))


def test_jsonl_whose_first_record_is_an_array_names_that_line(tmp_path):
    """A .jsonl is always JSON Lines; found by fuzzing: a first line "[1]" made the loader
    read the file as one JSON array and report "not valid JSON (Extra data)"."""
    path = tmp_path / "a.jsonl"
    path.write_text('[1, 2]\n{"input": "a", "output": "b"}\n')
    with pytest.raises(DataError, match=r"a.jsonl: line 1 is a JSON list, expected an object"):
        data.load_rows(path, DataConfig())
    (tmp_path / "b.json").write_text('[1]\n{"input": "a", "output": "b"}\n')  # .json lines
    with pytest.raises(DataError, match=r"b.json: line 1 is a JSON list"):
        data.load_rows(tmp_path / "b.json", DataConfig())
    (tmp_path / "c.json").write_text('[{"input": "a", "output": "b"}, 3]')  # a .json array
    with pytest.raises(DataError, match=r"c.json: row 2 is a JSON int"):
        data.load_rows(tmp_path / "c.json", DataConfig())
    (tmp_path / "d.json").write_text('[{"input": "a", "output": "b"},')
    with pytest.raises(DataError, match=r"d.json: not valid JSON \(Expecting value"):
        data.load_rows(tmp_path / "d.json", DataConfig())


def test_strict_mode_names_file_and_row(tmp_path):
    src = write_jsonl(tmp_path / "b.jsonl", bad_rows())
    with pytest.raises(DataError, match=r"b.jsonl: line 2: column 'input' is missing"):
        data.load_rows(src, DataConfig(strict=True))
    (tmp_path / "b.csv").write_text('input,output\n"two\nlines",ok\nfine,\n')
    with pytest.raises(DataError, match=r"b.csv: line 4: column 'output' is empty"):
        data.load_rows(tmp_path / "b.csv", DataConfig(strict=True))
    (tmp_path / "c.csv").write_text('input,output\n,x\n')
    with pytest.raises(DataError, match=r"c.csv: line 2: column 'input' is empty"):
        data.load_rows(tmp_path / "c.csv", DataConfig(strict=True))
    pq.write_table(pa.table({"input": ["a", "b"], "output": ["x", None]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b.parquet: row 2: column 'output' is null"):
        data.load_rows(tmp_path / "b.parquet", DataConfig(strict=True))


def test_duplicate_pair_in_both_named_splits_stays_in_test(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    write_jsonl(d / "train.jsonl", pairs(5))
    write_jsonl(d / "test.jsonl", pairs(2, start=3))  # r3, r4 also in train
    rows = data.load_rows(d, DataConfig())
    assert [r["id"] for r in rows.splits["train"]] == ["r0", "r1", "r2"]
    assert [r["id"] for r in rows.splits["test"]] == ["r3", "r4"]
    assert rows.dropped["duplicate"] == 2


def test_config_values_checked():
    for bad, name in ((dict(test_fraction=0.0), "test_fraction"),
                      (dict(max_input_tokens=0), "max_input_tokens"),
                      (dict(max_train=0), "max_train")):
        with pytest.raises(DataError, match=name):
            data.load_rows(data.DEFAULT_DATA, DataConfig(**bad))


# ----------------------------------------------------------------------------- prompts, filter

def test_prompt_has_instruction_input_and_assistant_header(tokenizer):
    prompt = data.format_prompt(tokenizer, "Summarize briefly.", "The cat sat on the mat.")
    assert "Summarize briefly.\n\nThe cat sat on the mat." in prompt
    assert prompt.index("Summarize") < prompt.index("The cat")
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")


def test_token_filter_drops_exactly_the_long_prompts(tmp_path, tokenizer):
    instruction = "Summarize."
    base = data.prompt_lengths(tokenizer, [data.format_prompt(tokenizer, instruction, "hello")])[0]
    # "hello" followed by k-1 " hello": k tokens, so the prompt has base + k - 1 tokens.
    lengths = {k: base + k - 1 for k in range(1, 120, 7)}
    rows = [{"id": f"k{k}", "input": "hello" + " hello" * (k - 1), "output": "hi"}
            for k in lengths]
    prompts = [data.format_prompt(tokenizer, instruction, r["input"]) for r in rows]
    assert data.prompt_lengths(tokenizer, prompts) == list(lengths.values())
    limit = lengths[50]  # a length that occurs: kept (the budget is inclusive)
    src = write_jsonl(tmp_path / "t.jsonl", rows)
    summary, out = prepare(src, tmp_path, tokenizer, instruction=instruction,
                           max_input_tokens=limit, test_fraction=0.5)
    kept = {r["id"] for r in out["train"] + out["test"]}
    assert kept == {f"k{k}" for k, n in lengths.items() if n <= limit}
    assert summary["dropped"]["too_long"] == sum(n > limit for n in lengths.values()) > 0
    assert all(r["prompt"] == data.format_prompt(tokenizer, instruction, r["input"])
               for r in out["train"])


def test_subsampling_is_deterministic_and_seeded(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "s.jsonl", pairs(200))

    def ids(name, seed, max_train):
        _, out = prepare(src, tmp_path / name, tokenizer, seed=seed, max_train=max_train,
                         max_test=5, test_fraction=0.2)
        assert len(out["test"]) == 5
        return [r["id"] for r in out["train"]]

    first, again = ids("a", 0, 20), ids("b", 0, 20)
    assert first == again and len(first) == 20
    assert ids("c", 1, 20) != first
    assert ids("d", 0, 10) == first[:10]  # a smaller cap keeps a prefix of the same order
    summary = read_json(tmp_path / "d" / "out" / "summary.json")
    train = summary["splits"]["train"]
    assert train["rows_out"] == 10 and train["capped"] == train["candidates"] - 10


# ----------------------------------------------------------------------------- summary, bundle

def test_summary_json(tmp_path, tokenizer):
    rows = pairs(40) + bad_rows()
    src = write_jsonl(tmp_path / "m.jsonl", rows)
    summary, out = prepare(src, tmp_path, tokenizer, test_fraction=0.3)
    on_disk = read_json(tmp_path / "out" / "summary.json")
    assert on_disk == summary and summary["stage"] == "filter_data"
    assert summary["source"] == str(src) and summary["rows_in"] == 49
    assert summary["rows_out"] == {s: len(out[s]) for s in data.SPLITS}
    assert summary["dropped"] == {"missing_column": 1, "null": 2, "non_string": 2, "empty": 1,
                                  "invalid_unicode": 0, "too_large": 0, "too_deep": 0,
                                  "duplicate": 1, "too_long": 0}
    assert sum(summary["rows_out"].values()) + sum(summary["dropped"].values()) == 49
    digest = hashlib.sha256(b"".join((tmp_path / "out" / f"{s}.jsonl").read_bytes()
                                     for s in data.SPLITS)).hexdigest()
    assert summary["data_sha256"] == digest
    assert summary["output_sha256"] == {
        f"{s}.jsonl": hashlib.sha256((tmp_path / "out" / f"{s}.jsonl").read_bytes()).hexdigest()
        for s in data.SPLITS}
    # the source's bytes: one file -> sha256 of its own sha256 (several: of each, in order)
    own = hashlib.sha256(src.read_bytes()).hexdigest()
    assert summary["source_sha256"] == hashlib.sha256(own.encode()).hexdigest()
    words = [len(r["input"].split()) for s in data.SPLITS for r in out[s]]
    assert summary["input_words"]["mean"] == round(sum(words) / len(words), 2)
    assert set(summary["output_words"]) == {"mean", "median", "p95"}


def test_empty_split_after_filtering_is_an_error(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "few.jsonl", pairs(3))
    with pytest.raises(DataError, match="no test rows left.*raise test_fraction"):
        data.prepare(src, tmp_path / "o", DataConfig(test_fraction=0.01), tokenizer)


def test_bundled_dataset_with_defaults(tmp_path, tokenizer):
    assert data.DEFAULT_DATA.is_dir()
    rows = data.load_rows(data.DEFAULT_DATA, DataConfig())
    assert rows.split_method == "named" and rows.rows_in == 3500
    assert (len(rows.splits["train"]), len(rows.splits["test"])) == (3000, 500)
    assert not rows.dropped
    # The build script split the full set with the same hash: the bundle agrees with it.
    for split in data.SPLITS:
        assert all(data.split_of(r["input"], 0.1) == split for r in rows.splits[split])
    assert all(r["id"] and r["input"] and r["output"] for r in rows.splits["test"])
    demo = get_profile("demo").data  # what `make run` uses
    summary = data.prepare(data.DEFAULT_DATA, tmp_path, demo, tokenizer)
    assert summary["rows_out"] == {"train": demo.max_train, "test": demo.max_test}
    assert 40 < summary["input_words"]["mean"] < 80 and 4 < summary["output_words"]["mean"] < 9


# ----------------------------------------------------------------------------- hostile data
# Each case below reproduced a failure before the fix (issue 18 point 6): an id clash, a file
# swallowed by one quote, a bare RecursionError, errors that named no line, a hub download for a
# mistyped path, an unpinned hub dataset.

def ids_of(rows: data.Rows) -> dict[str, list[str]]:
    return {s: [r["id"] for r in rows.splits[s]] for s in data.SPLITS}


def test_duplicate_ids_become_unique_whatever_the_ids(tmp_path, tokenizer):
    """`x, x, x~2` used to become `x, x~2, x~2`; the clash failed only at gather."""
    rows = [{"id": rid, "input": f"document {i}", "output": f"summary {i}"}
            for i, rid in enumerate(["x", "x", "x~2", "x~3", "x", 7, "7"])]
    src = write_jsonl(tmp_path / "ids.jsonl", rows)
    loaded = data.load_rows(src, DataConfig(test_fraction=0.01))
    assert ids_of(loaded)["train"] == ["x", "x~4", "x~2", "x~3", "x~5", "7", "7~2"]
    assert ids_of(data.load_rows(src, DataConfig(test_fraction=0.01))) == ids_of(loaded)
    # a train/test clash is settled at filter time; the test row keeps its id
    d = tmp_path / "named"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"id": "a", "input": "t1", "output": "o"},
                                    {"id": "b~2", "input": "t2", "output": "o"},
                                    {"id": "b", "input": "t3", "output": "o"}])
    write_jsonl(d / "test.jsonl", [{"id": "b", "input": "e1", "output": "o"},
                                   {"id": "a", "input": "e2", "output": "o"}])
    summary, out = prepare(d, tmp_path, tokenizer)
    assert sorted(r["id"] for r in out["test"]) == ["a", "b"]
    assert sorted(r["id"] for r in out["train"]) == ["a~2", "b~2", "b~3"]


def test_unterminated_csv_quote_is_an_error_naming_its_line(tmp_path, monkeypatch):
    """It used to swallow the rest of the file: as one dropped row, or as one kept row whose
    output held every later line. Where the cell was meant to end cannot be known, so neither
    a drop nor a guess: an error, strict or not."""
    path = tmp_path / "q.csv"
    for body in ('a,b\n"c,d\ne,f\ng,h\n', 'a,b\nc,"d\ne,f\ng,h\n'):
        path.write_text("input,output\n" + body)
        for strict in (False, True):
            with pytest.raises(DataError, match=r"q.csv: line 3: a quoted cell opened in this "
                               r"record is never closed, so lines 3-5 would be one cell"):
                data.load_rows(path, DataConfig(strict=strict))
    path.write_text('"input,output\na,b\n')
    with pytest.raises(DataError, match=r"q.csv: line 1: a quoted cell .* lines 1-2"):
        data.load_rows(path, DataConfig())
    path.write_text("input,output\n" + '"",' * 400 + "x\nok,fine\n")  # all quotes and commas
    monkeypatch.setattr(data, "MAX_RECORD_BYTES", 1000)
    with pytest.raises(DataError, match=r"q.csv: line 2: a record over 1000 B even with its "
                       "text cut out"):
        data.load_rows(path, DataConfig())
    monkeypatch.undo()
    # a closed multi-line cell ending the file without a newline is not that
    path.write_text('input,output\n"x\ny",z\r\n"multi\r\nline",last')
    rows = data.load_rows(path, DataConfig(test_fraction=0.01))
    assert [r["output"] for r in rows.splits["train"]] == ["z", "last"]


def test_invalid_utf8_names_the_line_in_every_format(tmp_path):
    bad = b'{"input": "caf\xe9 au lait", "output": "x"}\n'
    good = b'{"input": "fine", "output": "y"}\n'
    (tmp_path / "u.jsonl").write_bytes(good * 2 + bad)
    (tmp_path / "u.jsonl.gz").write_bytes(gzip.compress(good + bad + good))
    (tmp_path / "u.json").write_bytes(b"[" + good.strip() + b",\n" + bad.strip() + b"]")
    (tmp_path / "u.csv").write_bytes(b'input,output\n"two\r\nlines",ok\nna\xefve,x\n')
    for name, line in (("u.jsonl", 3), ("u.jsonl.gz", 2), ("u.json", 2), ("u.csv", 4)):
        with pytest.raises(DataError, match=rf"{re.escape(name)}: line {line} is not valid "
                           r"UTF-8 \(invalid continuation byte at byte \d+ of the line"):
            data.load_rows(tmp_path / name, DataConfig())


def test_truncated_or_corrupt_gzip_names_the_last_whole_line(tmp_path):
    lines = b"".join(json.dumps({"input": f"document {i} " + "word " * 40,
                                 "output": f"s{i}"}).encode() + b"\n" for i in range(20000))
    packed = gzip.compress(lines)
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError, match=r"t.jsonl.gz: the compressed data is cut short or "
                       r"corrupt after line (\d+) \(EOFError") as e:
        data.load_rows(path, DataConfig())
    last = int(re.search(r"after line (\d+)", str(e.value)).group(1))
    assert 0 < last < 20000  # the whole lines before the cut were read, none used
    damaged = bytearray(packed)
    damaged[len(packed) // 2: len(packed) // 2 + 64] = bytes(64)  # inflates to garbage
    path.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=r"t.jsonl.gz: line 9984 is not valid JSON"):
        data.load_rows(path, DataConfig())
    damaged = bytearray(packed)
    damaged[-8] ^= 0xFF  # only the checksum: every line inflates, the check fails at the end
    path.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=r"t.jsonl.gz: the compressed data is cut short or "
                       r"corrupt after line 20000 \(BadGzipFile: CRC check failed"):
        data.load_rows(path, DataConfig())
    path.write_bytes(lines[:1000])  # not gzip at all
    with pytest.raises(DataError, match=r"after line 0 \(BadGzipFile: Not a gzipped file"):
        data.load_rows(path, DataConfig())


def test_corrupt_parquet_names_file_or_rows(tmp_path):
    table = pa.Table.from_pylist([{"input": f"document number {i} " * 5, "output": f"s {i}"}
                                  for i in range(3000)])
    good = tmp_path / "ok.parquet"
    pq.write_table(table, good, row_group_size=1000)
    raw = good.read_bytes()
    (tmp_path / "cut.parquet").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"cut.parquet: cannot read Parquet \(.*magic bytes"):
        data.load_rows(tmp_path / "cut.parquet", DataConfig())
    offset = pq.ParquetFile(good).metadata.row_group(1).column(0).data_page_offset
    broken = bytearray(raw)
    broken[offset + 5: offset + 35] = bytes(b ^ 0xFF for b in raw[offset + 5: offset + 35])
    (tmp_path / "page.parquet").write_bytes(bytes(broken))
    with pytest.raises(DataError, match=r"page.parquet: rows 1001-2000 \(row group 2 of 3\) "
                       "cannot be read"):
        data.load_rows(tmp_path / "page.parquet", DataConfig())


def test_deeply_nested_json_is_a_counted_row_never_a_recursion_error(tmp_path):
    """100,000 nested arrays in a cell used to raise a bare RecursionError."""
    deep = "[" * 100_000 + "]" * 100_000
    lines = [json.dumps(r) for r in pairs(5)]
    lines.insert(2, '{"input": "x", "output": "y", "extra": ' + deep + "}")
    lines.insert(4, '{"input": "a", "output": ' + "[" * 99 + "]" * 99 + "}")  # at the limit
    path = tmp_path / "deep.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rows = data.load_rows(path, DataConfig(test_fraction=0.01))
    assert dict(rows.dropped) == {"too_deep": 1, "non_string": 1} and rows.rows_in == 7
    with pytest.raises(DataError, match=r"deep.jsonl: line 3: JSON nested deeper than 100 "
                       r"levels \(strict mode\)"):
        data.load_rows(path, DataConfig(strict=True))
    array = tmp_path / "deep.json"
    array.write_text("[" + ", ".join(lines[:2] + [deep, lines[3]]) + "]")
    with pytest.raises(DataError, match=r"deep.json: row 3 is JSON nested deeper than 100 "
                       "levels"):
        data.load_rows(array, DataConfig())


def _write_big_cell_file(path: Path, cell_bytes: int) -> None:
    """Two good rows around one row whose input is `cell_bytes` of text, written in pieces."""
    piece = b"lorem ipsum dolor sit amet " * 40_000  # 1.08 MB
    csv_file = path.suffix == ".csv"
    with open(path, "wb") as f:
        f.write(b"input,output\nfirst row,ok\n" if csv_file
                else b'{"input": "first row", "output": "ok"}\n')
        f.write(b'"' if csv_file else b'{"output": "x", "input": "')
        for _ in range(-(-cell_bytes // len(piece))):  # at least cell_bytes
            f.write(piece)
        f.write(b'",x\nlast row,ok\n' if csv_file
                else b'"}\n{"input": "last row", "output": "ok"}\n')


BIG_CELL_SCRIPT = """
import json, re, sys, time
from lastmile import data
from lastmile.config import DataConfig

def rss_mib(field):
    status = open("/proc/self/status").read()
    return int(re.search(field + r":\\s+(\\d+) kB", status).group(1)) / 1024

before = rss_mib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current RSS: the peak of the read alone
start = time.perf_counter()
rows = data.load_rows(sys.argv[1], DataConfig(test_fraction=0.01))
print(json.dumps({"seconds": time.perf_counter() - start, "dropped": dict(rows.dropped),
                  "inputs": [r["input"] for r in rows.splits["train"]],
                  "rss_before_mib": before, "peak_growth_mib": rss_mib("VmHWM") - before}))
"""


@pytest.mark.parametrize("name", ["big.jsonl", "big.csv"])
def test_a_200_mb_cell_is_dropped_in_bounded_memory_and_time(tmp_path, name):
    """The loader used to hold such a file several times over (3.1 GiB peak, 28 s) and keep
    the 200 MB input for the tokenizer. Now a record over MAX_RECORD_BYTES (8 MiB) is measured
    while streaming past it and dropped as too_large. Measured in a fresh process (the peak RSS
    reset after imports): under 64 MiB more than before the read, and seconds."""
    import subprocess
    import sys

    path = tmp_path / name
    _write_big_cell_file(path, 200 * 10**6)
    assert path.stat().st_size > 200 * 10**6
    done = subprocess.run([sys.executable, "-c", BIG_CELL_SCRIPT, str(path)], check=True,
                          capture_output=True, text=True, timeout=120)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    path.unlink()
    print(name, {k: v for k, v in result.items() if k != "inputs"})
    assert result["dropped"] == {"too_large": 1}
    assert result["inputs"] == ["first row", "last row"]
    assert result["peak_growth_mib"] < 64 and result["seconds"] < 20


def test_too_large_rows_in_parquet_json_arrays_and_strict_mode(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_RECORD_BYTES", 1000)
    big = "word " * 300  # 1,500 bytes
    rows = pairs(4) + [{"id": "big", "input": big, "output": "s"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b.parquet")
    (tmp_path / "b.json").write_text(json.dumps(rows))
    write_jsonl(tmp_path / "b.jsonl", rows)
    for name in ("b.parquet", "b.json", "b.jsonl"):
        loaded = data.load_rows(tmp_path / name, DataConfig(test_fraction=0.01))
        assert dict(loaded.dropped) == {"too_large": 1} and loaded.rows_in == 5, name
    with pytest.raises(DataError, match=r"b.parquet: row 5: 1,5\d\d bytes, over the 1000 B "
                       r"bound for one record \(strict mode\)"):
        data.load_rows(tmp_path / "b.parquet", DataConfig(strict=True))
    with pytest.raises(DataError, match=r"b.json: row 5: column 'input' is too large"):
        data.load_rows(tmp_path / "b.json", DataConfig(strict=True))
    # CSV: an over-long quoted cell over many lines, with commas, "" and CRs in it, is read
    # squeezed to its quotes and line ends: the records after it keep their cells and lines
    cell = ('long, "quoted" text\r\nover lines ' * 60).replace('"', '""')
    (tmp_path / "b.csv").write_text(f'input,output\nfirst,1\n"{cell}",2\nlast,3\n"a\nb",4\n')
    loaded = data.load_rows(tmp_path / "b.csv", DataConfig(test_fraction=0.01))
    assert dict(loaded.dropped) == {"too_large": 1}
    assert [r["output"] for r in loaded.splits["train"]] == ["1", "3", "4"]
    with pytest.raises(DataError, match=r"b.csv: line 3: 2,\d+ bytes, over the 1000 B bound"):
        data.load_rows(tmp_path / "b.csv", DataConfig(strict=True))
    monkeypatch.setattr(data, "MAX_RECORD_BYTES", 10_000)  # the same file, under the bound
    loaded = data.load_rows(tmp_path / "b.csv", DataConfig(test_fraction=0.01))
    assert [r["input"] for r in loaded.splits["train"]][1] == cell.replace('""', '"').strip()
    # a hub split is parsed whole too: its cells are measured before any tokenizer sees them
    monkeypatch.setattr(data, "MAX_RECORD_BYTES", 1000)
    import datasets

    part = data.parts_from_hub("org/name", {"train": datasets.Dataset.from_list(rows)})[0]
    dropped = Counter()
    assert len(data.valid_rows(part, DataConfig(), dropped)) == 4
    assert dropped == {"too_large": 1}


@pytest.mark.parametrize("source", ["./x", "../x", "/no/such/x", "~/x", "x.jsonl", "x.parquet",
                                    "org/name.csv", "org/name.jsonl.gz", "a/b/c", "a\\b",
                                    "data/typo", "data/typo:config", "xsum"])
def test_a_path_that_looks_local_never_reaches_the_hub(tmp_path, monkeypatch, source):
    """`data/typo` (a mistyped directory) used to become a Hugging Face download."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    calls = []
    monkeypatch.setattr(data, "read_hub", lambda name: calls.append(name))
    with pytest.raises(DataError, match=r"task data not found: .*no such file or directory"):
        data.load_rows(source, DataConfig())
    assert calls == []
    if source.startswith("data/"):
        with pytest.raises(DataError, match="a directory 'data' exists here.*write hf:data/"):
            data.load_rows(source, DataConfig())


def test_hub_ids_go_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(data, "read_hub", lambda name: calls.append(name) or [])
    for source in ("org/name", "org/name:cfg", "org/name@v1.0", "hf:data/typo", "hf:xsum",
                   "org/name.v2@refs/pr/1"):
        data.load_rows(source, DataConfig())  # no parts from the stand-in: the route counts
    assert calls == ["org/name", "org/name:cfg", "org/name@v1.0", "hf:data/typo", "hf:xsum",
                     "org/name.v2@refs/pr/1"]
    assert data.parse_hub_id("hf:org/name:cfg@main") == ("org/name", "cfg", "main")


class FakeHubApi:
    """Stands in for huggingface_hub.HfApi at the network boundary only."""

    def __init__(self, calls: list):
        self.calls = calls

    def dataset_info(self, repo_id, revision=None):
        from types import SimpleNamespace

        self.calls.append((repo_id, revision))
        if repo_id == "org/missing":
            raise RuntimeError("404 Repository Not Found")
        return SimpleNamespace(sha=SHA if revision in (None, "main") else "f" * 40)


def test_a_hub_id_resolves_to_a_commit_recorded_in_the_fingerprint(tmp_path, monkeypatch,
                                                                   tokenizer):
    """Offline: HfApi.dataset_info and the `datasets` download calls are replaced (they are
    the network); routing, resolution, the pinned loads, the summary and freshness's
    fingerprint are the real code. Not testable here: that the real hub answers with the
    branch's head commit and that `datasets` downloads exactly that commit."""
    import datasets
    import huggingface_hub

    from lastmile import freshness

    api_calls, loads = [], []
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: FakeHubApi(api_calls))
    hub = {"train": pairs(30), "test": pairs(5, start=100)}
    monkeypatch.setattr(datasets, "get_dataset_split_names",
                        lambda repo, config=None, revision=None: list(hub))
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, config=None, split=None,
                        revision=None: loads.append((repo, config, split, revision))
                        or datasets.Dataset.from_list(hub[split]))
    monkeypatch.chdir(tmp_path)
    summary, out = prepare("org/name", tmp_path, tokenizer)
    assert api_calls == [("org/name", None)]
    assert loads == [("org/name", None, "train", SHA), ("org/name", None, "test", SHA)]
    assert summary["source_kind"] == "hub" and summary["source_revision"] == SHA
    assert len(out["train"]) == 30
    decision = freshness.check(summary, "{}", "tiny-random", "h", data_source="org/name")
    assert decision.fingerprint["data_revision"] == SHA
    # a named revision is resolved too; a commit is used as is, without asking
    assert data.resolve_hub_revision("org/name", "v1.0") == "f" * 40
    assert data.resolve_hub_revision("org/name", "a" * 40) == "a" * 40
    assert api_calls[-1] == ("org/name", "v1.0")
    with pytest.raises(DataError, match=r"cannot load Hugging Face dataset 'org/missing' .*"
                       "resolving it to a commit failed: RuntimeError: 404"):
        data.load_rows("org/missing", DataConfig())
    files = write_jsonl(tmp_path / "f.jsonl", pairs(30))  # files have no hub revision
    assert prepare(files, tmp_path / "f", tokenizer)[0]["source_revision"] is None


# ----------------------------------------------------------------------------- second bundle
# data/python-docstrings (issue 20 point 4): a task whose references are several sentences,
# built by scripts/build_python_dataset.py; PROVENANCE.md there records how.

REPO = data.DEFAULT_DATA.parent.parent
PYTHON_DOCSTRINGS = "data/python-docstrings"  # as a user passes it: data_source=...
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`'\"(\[])")  # the build script's rule


def test_python_docstrings_bundle_goes_through_the_filter_stage(tmp_path, tokenizer,
                                                                 monkeypatch):
    monkeypatch.chdir(REPO)  # the relative name is a directory here, never a hub id
    rows = data.load_rows(PYTHON_DOCSTRINGS, DataConfig())
    assert rows.kind == "directory" and rows.split_method == "named"
    assert rows.rows_in == 3500 and not rows.dropped
    assert (len(rows.splits["train"]), len(rows.splits["test"])) == (3000, 500)
    everything = rows.splits["train"] + rows.splits["test"]
    ids = [r["id"] for r in everything]
    assert len(set(ids)) == len(ids)
    for split in data.SPLITS:  # the build script's hash split, at its fraction
        assert all(data.split_of(r["input"], 0.15) == split for r in rows.splits[split])
    sentences = [len(SENTENCE_END.split(r["output"])) for r in everything]
    assert min(sentences) >= 2 and 2.3 < sum(sentences) / len(sentences) < 3.5
    assert 25 < data.word_stats(r["output"] for r in everything)["mean"] < 60
    assert not any(r["output"] in r["input"] for r in everything)  # the docstring is cut out
    # Every row through the token filter with the default instruction: ~98% fit 400 tokens.
    summary = data.prepare(PYTHON_DOCSTRINGS, tmp_path / "all", DataConfig(), tokenizer)
    too_long = summary["dropped"]["too_long"]
    assert 0 < too_long < 0.03 * 3500
    assert sum(summary["rows_out"].values()) == 3500 - too_long
    demo = get_profile("demo").data  # pipeline.py run --profile demo --param data_source=...
    summary = data.prepare(PYTHON_DOCSTRINGS, tmp_path / "demo", demo, tokenizer)
    assert summary["rows_out"] == {"train": demo.max_train, "test": demo.max_test}


@pytest.mark.parametrize("name", ["debian-descriptions", "python-docstrings"])
def test_bundled_provenance_records_the_committed_files(name):
    folder = REPO / "data" / name
    text = (folder / "PROVENANCE.md").read_text(encoding="utf-8")
    table = re.findall(r"^\| `(\w+\.jsonl\.gz)` \| (\d+) \| (\d+) \| `([0-9a-f]{64})` \|$",
                       text, re.M)
    assert sorted(row[0] for row in table) == ["test.jsonl.gz", "train.jsonl.gz"]
    for file, count, size, sha256 in table:
        raw = (folder / file).read_bytes()
        assert (hashlib.sha256(raw).hexdigest(), len(raw)) == (sha256, int(size))
        assert gzip.decompress(raw).count(b"\n") == int(count)
        assert raw[4:8] == b"\0\0\0\0" and not raw[3] & 0x08  # mtime 0, no file name


def test_python_docstrings_licenses_cover_every_package():
    folder = REPO / "data" / "python-docstrings"
    text = (folder / "PROVENANCE.md").read_text(encoding="utf-8")
    packages = re.findall(r"^\| `([\w.+-]+)` \| \S+ \| ([\w.-]+) \| .* \| "
                          r"`(LICENSES/[\w.+-]+)` \| `[0-9a-f]{64}` \|$", text, re.M)
    assert len(packages) > 10
    for package, license_name, notice in packages:
        assert license_name in {"PSF-2.0", "BSD-2-Clause", "BSD-3-Clause", "MIT", "Expat"}
        assert (folder / notice).is_file(), package
    assert {p.name for p in (folder / "LICENSES").iterdir()} == {
        Path(n).name for *_, n in packages}
    modules = {r["id"].split(".")[0] for split in ("train", "test") for r in read_jsonl_gz(
        folder / f"{split}.jsonl.gz")}
    assert {"asyncio", "django", "numpy", "sympy"} <= modules  # stdlib and libraries


def read_jsonl_gz(path: Path) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()]


def test_python_docstrings_extraction_rules(monkeypatch):
    """The build script's rules on a small module: the docstring leaves the input, prose
    stops at a section header, a file a copyright stanza licenses otherwise is left out."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(
        "build_python_dataset", REPO / "scripts" / "build_python_dataset.py")
    build = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, build)  # dataclasses look the module up
    spec.loader.exec_module(build)
    source = '''class Store:
    @property
    def size(self):
        """Return the number of items. Deleted items are not counted.

        Cached after the first call.

        Args:
            none
        """

        # count the live items
        live = [i for i in self.items if not i.deleted]
        return len(live)

def tiny(): "One line."
'''
    counts = Counter()
    pairs = build.extract("pkg", [("store/base.py", source.encode())], counts)
    assert [p.id for p in pairs] == ["store.base.Store.size"]
    assert (counts["functions"], counts["with a docstring"], counts["docstring own lines"]) == (
        2, 2, 1)  # tiny's docstring shares the def's line: no input without it
    (pair,) = pairs
    assert pair.doc == ("Return the number of items. Deleted items are not counted. Cached "
                        "after the first call.")
    assert build.sentences(pair.doc) == 3
    assert pair.code == ("@property\ndef size(self):\n    # count the live items\n"
                         "    live = [i for i in self.items if not i.deleted]\n"
                         "    return len(live)")
    rules = build.dep5_rules("Files: *\nLicense: BSD-3-Clause\n\n"
                             "Files: lib/pkg/vendored.py\nLicense: Apache-2.0\n")
    assert build.license_of("pkg/base.py", rules, "MIT") == "BSD-3-Clause"
    assert build.license_of("pkg/vendored.py", rules, "MIT") == "Apache-2.0"
    assert build.allowed("BSD-3-Clause and Expat") and not build.allowed("Apache-2.0")


@pytest.mark.parametrize("bundle", ["debian-descriptions", "python-docstrings"])
def test_the_bundles_rewrite_byte_for_byte_through_the_build_scripts_writer(bundle, tmp_path):
    """Both build scripts write through lastmile.io.write_reproducible_jsonl_gz: the committed
    rows written again give the committed bytes (the rebuild is checkable by sha256)."""
    import gzip as _gzip

    from lastmile.io import sha256_file, write_reproducible_jsonl_gz

    for split in ("train", "test"):
        src = REPO / "data" / bundle / f"{split}.jsonl.gz"
        rows = [json.loads(line) for line in _gzip.open(src, "rt", encoding="utf-8")]
        out = tmp_path / f"{bundle}-{split}.jsonl.gz"
        write_reproducible_jsonl_gz(out, rows)
        assert sha256_file(out) == sha256_file(src), split


def test_the_build_scripts_shared_rules_dedupe_and_sample(monkeypatch):
    """scripts/bundling.py, shared by both build scripts: the first of each key survives, and a
    sample is a seeded choice by name, written sorted by name."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    from bundling import dedupe, normalised, sample

    assert normalised("  Foo\tBAR ") == "foo bar"
    assert dedupe(["a", "B", "b", "c"], key=str.lower) == ["a", "B", "c"]
    names = [f"row{i}" for i in range(50)]
    picked = sample(names, 10, seed=0, name=str)
    assert picked == sorted(picked) and len(set(picked)) == 10 and set(picked) <= set(names)
    assert sample(list(reversed(names)), 10, seed=0, name=str) == picked  # input order free
    assert sample(names, 10, seed=1, name=str) != picked
