"""Task data (paper §4.2): read (input, output) pairs, drop bad rows, split, format, filter.

`prepare` is the pipeline's `filter_data` stage. In order:

1. **Read** the source: a JSON Lines (`.jsonl`, `.jsonl.gz`, `.json` lines or array), CSV or
   Parquet file; a directory of them (sorted by name); `s3://bucket/key` or `s3://bucket/prefix/`
   (fetched by `lastmile.storage`, then read like a directory); or a Hugging Face dataset id
   (`owner/name`, or `hf:name[:config]`), only ever when the user names one. The default is the
   bundled Debian-descriptions dataset (`DEFAULT_DATA`).
2. **Validate** each row: the configured input/output columns must hold non-empty strings of
   valid Unicode (and an `id`, when present, must be valid Unicode). A bad row is dropped and
   counted by reason (`missing_column`, `null`, `non_string`, `empty`, `invalid_unicode`: a
   lone surrogate, which JSON escapes like "\\ud800" can produce and no tokenizer or UTF-8
   file can hold), or with `strict=True` raises naming the file, its 1-based line/row and the
   column. A column that no row of a file has is an error naming the column, the file and the
   columns that do exist.
3. **Split**: named splits are used when the source has them (hub splits; files whose names
   start with `train` / `test` / `validation`; validation serves as test when there is no test).
   Otherwise each row's side is a hash of its (whitespace-normalised) input text, independent of
   the seed, so a row keeps its side when new rows arrive for a scheduled retraining.
4. **Deduplicate**: an exact repeat of an (input, output) pair is dropped (`duplicate`), the
   first occurrence kept; test rows are seen first, so a pair present in both named splits stays
   in test only. Same input with different outputs is kept (several references are legitimate).
5. **Format** each input with the base model's chat template and the instruction
   (`format_prompt`), and drop prompts longer than `max_input_tokens` tokens (`too_long`; paper
   §4.2: 400 tokens).
6. **Order and subsample**: each split is written in a seeded pseudo-random order (hash of the
   seed and the row), and `max_train` / `max_test` keep the first rows of that order that fit the
   token budget. Rows past the cap are never tokenized; they are counted as `capped` per split.

Output: `train.jsonl`, `test.jsonl` (records `{"id", "input", "output", "prompt"}`) and
`summary.json`, all written atomically. Every row read is accounted for in the summary:
``rows_in == sum(rows_out) + sum(dropped) + sum(splits[s]["capped"])``. The summary also
records ``source_sha256`` (the bytes of the files read; null for a hub dataset),
``output_sha256`` ({"train.jsonl", "test.jsonl"} each) and ``data_sha256`` (both outputs).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .config import DataConfig
from .io import is_valid_unicode, write_json, write_jsonl

#: The bundled default dataset (Debian package descriptions -> synopses; PROVENANCE.md there).
DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "debian-descriptions"
DEFAULT_INPUT_COLUMN = "input"
DEFAULT_OUTPUT_COLUMN = "output"

#: File names read as task data (the same list `lastmile.storage.TASK_DATA_SUFFIXES` fetches).
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")
ID_COLUMN = "id"
SPLITS = ("train", "test")
DROP_REASONS = ("missing_column", "null", "non_string", "empty", "invalid_unicode", "duplicate",
                "too_long")
TOKENIZE_BATCH = 512
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")


class DataError(ValueError):
    """Task data that cannot be used; the message names the file, row, column or parameter."""


# ----------------------------------------------------------------------------- prompt format

def format_prompt(tokenizer, instruction: str, text: str) -> str:
    """The input as the base model sees it: one user turn (instruction, blank line, text) in the
    model's chat template, ending with the assistant header so generation starts the summary."""
    content = f"{instruction}\n\n{text}" if instruction else text
    try:
        return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             tokenize=False, add_generation_prompt=True)
    except ValueError as e:  # transformers raises ValueError when there is no template
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise DataError(f"tokenizer {name!r} cannot format prompts: {e}") from None


def prompt_lengths(tokenizer, prompts: list[str]) -> list[int]:
    """Token counts of chat-formatted prompts (the template already holds special tokens)."""
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    return [len(x) for x in ids]


# ----------------------------------------------------------------------------- hashing

def _normalise(text: str) -> str:
    return " ".join(text.split())


def split_of(text: str, test_fraction: float) -> str:
    """'test' or 'train' from a hash of the input text alone (no seed): a row keeps its side
    across runs and data refreshes, and a larger fraction only moves rows from train to test."""
    digest = hashlib.sha256(_normalise(text).encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def text_id(text: str) -> str:
    """A stable id for rows without an `id` column."""
    return "h" + hashlib.sha256(_normalise(text).encode("utf-8")).hexdigest()[:16]


def _order_key(seed: int, row: dict[str, str]) -> bytes:
    return hashlib.sha256(f"{seed}\0{row['input']}\0{row['output']}".encode("utf-8")).digest()


def word_stats(texts: Iterable[str]) -> dict[str, float]:
    """Whitespace-word counts: mean, median and 95th percentile (numpy's linear method)."""
    counts = np.array([len(t.split()) for t in texts], dtype=float)
    if counts.size == 0:
        return {"mean": 0.0, "median": 0.0, "p95": 0.0}
    return {"mean": round(float(counts.mean()), 2), "median": float(np.median(counts)),
            "p95": round(float(np.percentile(counts, 95)), 2)}


# ----------------------------------------------------------------------------- reading

@dataclass(eq=False)  # compared by identity
class Part:
    """One file (or hub split) of the source, read into memory."""

    label: str  # how messages name it: a path, an s3 key, a hub split
    split: str | None  # "train" / "test" / "validation" when the source names it, else None
    columns: list[str]
    records: list[tuple[int, Any]]  # (1-based line or row number, record)
    unit: str = "line"  # what the number counts: "line" or "row"
    sha256: str | None = None  # of the file's bytes (None for a hub split)


def is_data_file(path: Path) -> bool:
    name = path.name.lower()
    return not name.startswith(".") and name.endswith(DATA_SUFFIXES)


def split_from_name(name: str) -> str | None:
    """The split a file name declares: train*, test*, valid* (validation), else None."""
    name = name.lower()
    for prefix, split in (("train", "train"), ("test", "test"), ("valid", "validation")):
        if name.startswith(prefix):
            return split
    return None


def read_file(path: Path, label: str | None = None, split: str | None = None) -> Part:
    """Read one JSON Lines / JSON / CSV / Parquet file."""
    label = label or str(path)
    if not path.is_file():
        raise DataError(f"task data file not found: {label}")
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json")):
        reader = _read_json_records
    elif name.endswith(".csv"):
        reader = _read_csv_records
    elif name.endswith(".parquet"):
        reader = _read_parquet_records
    else:
        raise DataError(f"{label}: unsupported file type (expected one of "
                        f"{', '.join(DATA_SUFFIXES)})")
    try:
        records, columns, unit = reader(path, label)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise DataError(f"{label}: cannot decode the file ({e})") from None
    if not records:
        raise DataError(f"{label}: the file has no rows")
    return Part(label, split, columns, records, unit, _file_sha256(path))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


Records = tuple[list[tuple[int, Any]], list[str], str]  # (records, columns, unit)


def _read_json_records(path: Path, label: str) -> Records:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8-sig") as f:
        text = f.read()
    items = None
    # A .json file may hold one array of objects; a .jsonl file is always lines (its first
    # record may itself be an array: that is a bad record, reported by its line below).
    if path.name.lower().endswith(".json") and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # more than one value: JSON Lines after all
                raise DataError(f"{label}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if isinstance(items, list):
        records = list(enumerate(items, start=1))
        unit = "row"
    else:
        records, unit = [], "line"
        for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{label}: line {lineno} is not valid JSON ({e.msg})") from None
    columns: dict[str, None] = {}  # the union of keys, in order of first appearance
    for number, rec in records:
        if not isinstance(rec, dict):
            raise DataError(f"{label}: {unit} {number} is a JSON {type(rec).__name__}, "
                            "expected an object with the input and output columns")
        columns.update(dict.fromkeys(rec))
    return records, list(columns), unit


def _read_csv_records(path: Path, label: str) -> Records:
    csv.field_size_limit(2**31 - 1)  # long documents in one cell
    records = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        start = reader.line_num + 1
        for values in reader:
            if values:
                # A short row lacks its last columns (missing_column); a long one is an error.
                if len(values) > len(header):
                    raise DataError(f"{label}: line {start} has {len(values)} fields, the header "
                                    f"has {len(header)}")
                records.append((start, dict(zip(header, values))))
            start = reader.line_num + 1
    return records, header, "line"


def _read_parquet_records(path: Path, label: str) -> Records:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{label}: cannot read Parquet ({e})") from None
    return list(enumerate(table.to_pylist(), start=1)), table.column_names, "row"


def read_directory(path: Path, label: str | None = None) -> list[Part]:
    """Every task data file directly in `path`, sorted by name (other files are ignored)."""
    label = label or str(path)
    files = sorted((p for p in path.iterdir() if p.is_file() and is_data_file(p)),
                   key=lambda p: p.name)
    if not files:
        present = sorted(p.name for p in path.iterdir())[:10]
        raise DataError(f"{label}: no task data files ({', '.join(DATA_SUFFIXES)}) in this "
                        f"directory; found: {', '.join(present) or 'nothing'}")
    return read_files(files, [f"{label.rstrip('/')}/{p.name}" for p in files])


def read_files(paths: list[Path], labels: list[str]) -> list[Part]:
    """Read files whose names may declare splits (a directory's or an s3 prefix's)."""
    return [read_file(p, lab, split_from_name(p.name)) for p, lab in zip(paths, labels)]


def read_hub(name: str) -> list[Part]:
    """A Hugging Face dataset (`owner/name`, `hf:name`, optional `:config`), its named splits."""
    import datasets

    repo, _, config = name.removeprefix("hf:").partition(":")
    try:
        names = datasets.get_dataset_split_names(repo, config or None)
        loaded = {s: datasets.load_dataset(repo, config or None, split=s)
                  for s in _hub_splits_to_read(names)}
    except DataError:
        raise
    except Exception as e:  # network, auth, unknown id: all surface as one clear message
        raise DataError(f"cannot load Hugging Face dataset {name!r} (and no local file or "
                        f"directory has that name): {type(e).__name__}: {e}") from None
    return parts_from_hub(name, loaded)


def _hub_splits_to_read(names: list[str]) -> list[str]:
    if "train" not in names:
        raise DataError(f"the dataset has no 'train' split (its splits: {', '.join(names)})")
    extra = "test" if "test" in names else next((n for n in names if n.startswith("valid")), None)
    return ["train"] + ([extra] if extra else [])


def parts_from_hub(name: str, splits: dict[str, Any]) -> list[Part]:
    """Parts from loaded `datasets.Dataset` objects keyed by hub split name."""
    parts = []
    for hub_split, ds in splits.items():
        records = list(enumerate(ds, start=1))
        if not records:
            raise DataError(f"{name} split {hub_split!r}: the split has no rows")
        parts.append(Part(f"{name} split {hub_split!r}", split_from_name(hub_split),
                          list(ds.column_names), records, "row"))
    return parts


def read_source(source: str | Path) -> tuple[str, list[Part]]:
    """(kind, parts) for any supported source; kind is file, directory, s3 or hub."""
    text = str(source)
    if text.startswith("s3://"):
        from . import storage  # lazily: only s3 sources need the object-store client

        paths = [Path(p) for p in storage.fetch_task_data(text)]
        labels = [text if text.endswith("/" + p.name) else f"{p.name} from {text}" for p in paths]
        return "s3", read_files(paths, labels)
    path = Path(text).expanduser()
    if path.is_dir():
        return "directory", read_directory(path, text)
    if path.is_file():
        return "file", [read_file(path, text)]
    if text.startswith("hf:") or (_HUB_ID.match(text) and not text.lower().endswith(DATA_SUFFIXES)):
        return "hub", read_hub(text)
    raise DataError(f"task data not found: {text} (no such file or directory; a Hugging Face "
                    "dataset id looks like owner/name or hf:name)")


# ----------------------------------------------------------------------------- validation

@dataclass
class Rows:
    """Valid (id, input, output) rows per split, and what was dropped on the way."""

    splits: dict[str, list[dict[str, str]]]
    kind: str  # file, directory, s3 or hub
    split_method: str  # "named" or "hash"
    rows_in: int
    dropped: Counter = field(default_factory=Counter)
    files: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    source_sha256: str | None = None  # over the used files' bytes; None for a hub dataset


def check_columns(part: Part, cfg: DataConfig) -> None:
    for role, column in (("input_column", cfg.input_column), ("output_column", cfg.output_column)):
        if column not in part.columns:
            raise DataError(f"{role} {column!r} not found in {part.label}; its columns are: "
                            f"{', '.join(map(str, part.columns)) or '(none)'}")


def bad_reason(record: dict[str, Any], column: str) -> str | None:
    """Why `record[column]` is not a usable text, or None when it is."""
    if column not in record:
        return "missing_column"
    value = record[column]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "null"
    if not isinstance(value, str):
        return "non_string"
    if not is_valid_unicode(value):
        return "invalid_unicode"
    if not value.strip():
        return "empty"
    return None


_REASON_TEXT = {"missing_column": "missing", "null": "null", "non_string": "not a string",
                "empty": "empty", "invalid_unicode": "not valid Unicode (a lone surrogate)"}


def _row_problem(record: dict[str, Any], cfg: DataConfig) -> tuple[str, str] | None:
    """(column, reason) for the first unusable column of a row, else None."""
    for column in (cfg.input_column, cfg.output_column):
        reason = bad_reason(record, column)
        if reason is not None:
            return column, reason
    rid = record.get(ID_COLUMN)
    if rid is not None and not is_valid_unicode(str(rid)):
        return ID_COLUMN, "invalid_unicode"
    return None


def valid_rows(part: Part, cfg: DataConfig, dropped: Counter) -> list[dict[str, str]]:
    """The part's usable rows as {id, input, output}; bad ones counted (or raised if strict)."""
    check_columns(part, cfg)
    rows = []
    for number, rec in part.records:
        problem = _row_problem(rec, cfg)
        if problem is not None:
            column, reason = problem
            if cfg.strict:
                raise DataError(f"{part.label}: {part.unit} {number}: column {column!r} is "
                                f"{_REASON_TEXT[reason]} (strict mode)")
            dropped[reason] += 1
            continue
        text = rec[cfg.input_column].strip()
        rid = rec.get(ID_COLUMN)
        rows.append({"id": text_id(text) if rid is None else str(rid),
                     "input": text, "output": rec[cfg.output_column].strip()})
    return rows


def load_rows(source: str | Path, cfg: DataConfig) -> Rows:
    """Read, validate, split and deduplicate; no tokenizer needed."""
    _check_config(cfg)
    kind, parts = read_source(source)
    named, ignored = _named_parts(parts)
    used = [p for p in parts if p not in ignored]
    dropped: Counter = Counter()
    if named is not None:
        splits = {s: [r for p in named[s] for r in valid_rows(p, cfg, dropped)] for s in SPLITS}
        method = "named"
    else:
        every = [r for p in used for r in valid_rows(p, cfg, dropped)]
        splits = {s: [r for r in every if split_of(r["input"], cfg.test_fraction) == s]
                  for s in SPLITS}
        method = "hash"
    splits = _deduplicate(splits, dropped)
    _unique_ids(splits)
    return Rows(splits, kind, method, sum(len(p.records) for p in used), dropped,
                [p.label for p in used], [p.label for p in ignored], _source_sha256(used))


def _source_sha256(parts: list[Part]) -> str | None:
    """A hash of the used files' contents in reading order; None unless every part is a file."""
    if not parts or any(p.sha256 is None for p in parts):
        return None
    return hashlib.sha256("\n".join(p.sha256 for p in parts).encode()).hexdigest()


def _named_parts(parts: list[Part]) -> tuple[dict[str, list[Part]] | None, list[Part]]:
    """({'train': [...], 'test': [...]}, ignored) when the names give the split, else (None, []).

    Splits count as named when there is a train part and a test or validation part;
    validation is the test split only when there is no test part (else it is ignored).
    """
    by_split: dict[str | None, list[Part]] = {}
    for p in parts:
        by_split.setdefault(p.split, []).append(p)
    held_out = by_split.get("test") or by_split.get("validation")
    if not by_split.get("train") or not held_out:
        if set(by_split) - {None, "train"}:  # test/validation files without train files
            labels = [p.label for p in parts if p.split not in (None, "train")]
            raise DataError(f"held-out files ({', '.join(labels)}) but no train* file; name "
                            "the training file train*, or drop the split names to hash-split")
        return None, []
    if by_split.get(None):
        labels = ", ".join(p.label for p in by_split[None])
        raise DataError(f"some files name a split (train*/test*/validation*) and some do not "
                        f"({labels}); name every file by its split or none")
    ignored = by_split.get("validation", []) if by_split.get("test") else []
    return {"train": by_split["train"], "test": held_out}, ignored


def _deduplicate(splits: dict[str, list[dict]], dropped: Counter) -> dict[str, list[dict]]:
    """Drop exact repeats of an (input, output) pair, test rows first (see module docstring)."""
    seen: set[tuple[str, str]] = set()
    kept: dict[str, list[dict]] = {}
    for split in ("test", "train"):
        kept[split] = []
        for row in splits[split]:
            key = (row["input"], row["output"])
            if key in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(key)
            kept[split].append(row)
    return {s: kept[s] for s in SPLITS}


def _unique_ids(splits: dict[str, list[dict]]) -> None:
    """Later rows that repeat an id get `~2`, `~3`, ...: stages join predictions on ids."""
    counts: Counter = Counter()
    for split in SPLITS:
        for row in splits[split]:
            counts[row["id"]] += 1
            if counts[row["id"]] > 1:
                row["id"] = f"{row['id']}~{counts[row['id']]}"


def _check_config(cfg: DataConfig) -> None:
    if not 0.0 < cfg.test_fraction < 1.0:
        raise DataError(f"test_fraction must be between 0 and 1, got {cfg.test_fraction}")
    if cfg.max_input_tokens <= 0:
        raise DataError(f"max_input_tokens must be positive, got {cfg.max_input_tokens}")
    for name in ("max_train", "max_test"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise DataError(f"{name} must be positive or None (no cap), got {value}")
    if not cfg.input_column or not cfg.output_column:
        raise DataError("input_column and output_column must be non-empty column names")


# ----------------------------------------------------------------------------- token filter

def fit_budget(rows: list[dict[str, str]], cfg: DataConfig, tokenizer, cap: int | None,
               ) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Rows in seeded order with their prompts, those over `max_input_tokens` dropped, at most
    `cap` kept. Returns (records, counts) with counts = candidates/too_long/capped/rows_out."""
    ordered = sorted(rows, key=lambda r: _order_key(cfg.seed, r))
    kept: list[dict[str, str]] = []
    too_long = examined = 0
    for start in range(0, len(ordered), TOKENIZE_BATCH):
        if cap is not None and len(kept) >= cap:
            break
        chunk = ordered[start:start + TOKENIZE_BATCH]
        prompts = [format_prompt(tokenizer, cfg.instruction, r["input"]) for r in chunk]
        for row, prompt, n in zip(chunk, prompts, prompt_lengths(tokenizer, prompts)):
            if cap is not None and len(kept) >= cap:
                break
            examined += 1
            if n > cfg.max_input_tokens:
                too_long += 1
                continue
            kept.append({"id": row["id"], "input": row["input"], "output": row["output"],
                         "prompt": prompt})
    counts = {"candidates": len(rows), "too_long": too_long,
              "capped": len(rows) - examined, "rows_out": len(kept)}
    return kept, counts


# ----------------------------------------------------------------------------- the stage

def prepare(source: str | Path, out_dir: Path, cfg: DataConfig, tokenizer) -> dict[str, Any]:
    """The filter_data stage: write train.jsonl, test.jsonl and summary.json into `out_dir`."""
    rows = load_rows(source, cfg)
    out_dir = Path(out_dir)
    written: dict[str, list[dict[str, str]]] = {}
    per_split: dict[str, dict[str, int]] = {}
    for split, cap in (("train", cfg.max_train), ("test", cfg.max_test)):
        written[split], per_split[split] = fit_budget(rows.splits[split], cfg, tokenizer, cap)
        rows.dropped["too_long"] += per_split[split]["too_long"]
        if not written[split]:
            raise DataError(_empty_split_message(source, split, rows, per_split[split]))
    digest = hashlib.sha256()
    per_file: dict[str, str] = {}
    for split in SPLITS:
        write_jsonl(out_dir / f"{split}.jsonl", written[split])
        content = (out_dir / f"{split}.jsonl").read_bytes()
        digest.update(content)
        per_file[f"{split}.jsonl"] = hashlib.sha256(content).hexdigest()
    summary = _summary(source, rows, written, per_split, cfg, digest.hexdigest(), per_file)
    write_json(out_dir / "summary.json", summary)
    return summary


def _empty_split_message(source, split: str, rows: Rows, counts: dict[str, int]) -> str:
    hint = ("; with a hash split, raise test_fraction or add rows" if rows.split_method == "hash"
            and split == "test" else "")
    return (f"{source}: no {split} rows left (read {rows.rows_in}, {split} candidates "
            f"{counts['candidates']}, dropped {dict(rows.dropped)}){hint}")


def _summary(source, rows: Rows, written: dict[str, list[dict]], per_split: dict[str, dict],
             cfg: DataConfig, data_sha256: str, output_sha256: dict[str, str]
             ) -> dict[str, Any]:
    everything = [r for split in SPLITS for r in written[split]]
    return {
        "stage": "filter_data",
        "source": str(source),
        "source_kind": rows.kind,
        "files": rows.files,
        "ignored_files": rows.ignored,
        "split_method": rows.split_method,
        "columns": {"input": cfg.input_column, "output": cfg.output_column},
        "max_input_tokens": cfg.max_input_tokens,
        "rows_in": rows.rows_in,
        "rows_out": {s: len(written[s]) for s in SPLITS},
        "dropped": {reason: rows.dropped.get(reason, 0) for reason in DROP_REASONS},
        "splits": per_split,
        "data_sha256": data_sha256,
        "output_sha256": output_sha256,
        "source_sha256": rows.source_sha256,
        "input_words": word_stats(r["input"] for r in everything),
        "output_words": word_stats(r["output"] for r in everything),
    }
