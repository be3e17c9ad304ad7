"""Task data (paper §4.2): read (input, output) pairs, drop bad rows, split, format, filter.

`prepare` is the pipeline's `filter_data` stage. In order:

1. **Read** the source: a JSON Lines (`.jsonl`, `.jsonl.gz`, `.json` lines or array), CSV or
   Parquet file; a directory of them (sorted by name); `s3://bucket/key` or `s3://bucket/prefix/`
   (fetched by `lastmile.storage`, then read like a directory); or a Hugging Face dataset id
   (`owner/name`, or `hf:name`, with optional `:config` and `@revision`), only ever when the
   user names one, loaded at the commit the revision resolves to (`source_revision`). A name
   that looks like a path (`looks_local`) and does not exist is "not found", never a hub id.
   The default is the bundled Debian-descriptions dataset (`DEFAULT_DATA`).
   JSON Lines and CSV are streamed line by line: a record over MAX_RECORD_BYTES (8 MiB) is
   measured in passing, never held. A file whose rows cannot be told apart is an error naming
   the file and line (or rows), strict or not: invalid JSON or UTF-8, a CSV quote never closed,
   a .gz cut short or corrupt, an unreadable Parquet footer or row group.
2. **Validate** each row: the configured input/output columns must hold non-empty strings of
   valid Unicode (and an `id`, when present, must be valid Unicode). A bad row is dropped and
   counted by reason (`missing_column`, `null`, `non_string`, `empty`, `invalid_unicode`: a
   lone surrogate, which JSON escapes like "\\ud800" can produce and no tokenizer or UTF-8
   file can hold; `too_large`: over MAX_RECORD_BYTES; `too_deep`: JSON nested deeper than
   MAX_JSON_DEPTH), or with `strict=True` raises naming the file, its 1-based line/row and the
   column. A column that no row of a file has is an error naming the column, the file and the
   columns that do exist.
3. **Split**: named splits are used when the source has them (hub splits; files whose names
   start with `train` / `test` / `validation`; validation serves as test when there is no test).
   Otherwise each row's side is a hash of its (whitespace-normalised) input text, independent of
   the seed, so a row keeps its side when new rows arrive for a scheduled retraining.
4. **Deduplicate**: an exact repeat of an (input, output) pair is dropped (`duplicate`), the
   first occurrence kept; test rows are seen first, so a pair present in both named splits stays
   in test only. Same input with different outputs is kept (several references are legitimate).
   Ids are then made unique over both splits (`_unique_ids`), so no later stage meets a clash.
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
``source_revision`` (the hub commit a hub dataset was loaded at; null for files),
``output_sha256`` ({"train.jsonl", "test.jsonl"} each) and ``data_sha256`` (both outputs).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import json
import math
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .config import DataConfig
from .io import human_bytes, is_valid_unicode, write_json, write_jsonl

#: The bundled default dataset (Debian package descriptions -> synopses; PROVENANCE.md there).
DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "debian-descriptions"
DEFAULT_INPUT_COLUMN = "input"
DEFAULT_OUTPUT_COLUMN = "output"

#: File names read as task data (the same list `lastmile.storage.TASK_DATA_SUFFIXES` fetches).
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")
ID_COLUMN = "id"
SPLITS = ("train", "test")
DROP_REASONS = ("missing_column", "null", "non_string", "empty", "invalid_unicode", "too_large",
                "too_deep", "duplicate", "too_long")
TOKENIZE_BATCH = 512
#: The largest record read as a row: a JSON line, a CSV record, a Parquet row's text cells (for
#: a parsed .json array or hub split: its input and output cells). A larger one is dropped as
#: `too_large` without being parsed or held: SmolLM2's longest token is 81 bytes, so 8 MiB is
#: over 100,000 tokens, far past any `max_input_tokens`, and tokenizing it would take minutes.
MAX_RECORD_BYTES = 8 << 20
#: JSON nested deeper than this (a task row is flat) is dropped as `too_deep` before parsing:
#: Python's parser recurses, so 100,000 nested arrays would raise RecursionError.
MAX_JSON_DEPTH = 100
_READ_CHUNK = 1 << 20
#: `owner/name`, optional `:config`, optional `@revision` (a branch, tag or commit).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?(@[\w./-]+)?$")
#: File name endings that make a name a local path, never a hub id (DATA_SUFFIXES and kin).
_FILE_ENDINGS = DATA_SUFFIXES + (".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".tsv", ".txt",
                                 ".arrow", ".ndjson", ".xlsx")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


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
    revision: str | None = None  # the hub commit a hub split was loaded at


@dataclass(frozen=True)
class Unreadable:
    """A record known only by its place: too large or nested too deeply to parse. It is a bad
    row like the others (dropped and counted by `reason`, or raised with `strict`)."""

    reason: str  # "too_large" or "too_deep"
    detail: str  # for messages, e.g. "200,880,044 bytes, over the 8.0 MiB bound for one record"


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
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:  # the readers name the line
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
_BOM = b"\xef\xbb\xbf"
_LINE_END = {False: re.compile(rb"\n"), True: re.compile(rb"\r\n|\r|\n")}


class _Overflow(Exception):
    """Even squeezed, a record stays over the bound (megabytes of CSV quotes and commas)."""


def _physical_lines(f, universal: bool, squeeze=None) -> Iterator[tuple[bytes, int, bool]]:
    """(line, size, over) for each line of the binary stream `f`, its terminator kept. Lines
    end at "\\n", or also at "\\r" and "\\r\\n" when `universal` (as open(newline="") reads CSV).

    Memory stays bounded whatever the file holds: a line longer than MAX_RECORD_BYTES is never
    held whole; it comes back `over`, as the pieces `squeeze` keeps of it (b"" without one),
    with its true size."""
    ends = _LINE_END[universal]
    held, squeezed, size, carry = bytearray(), None, 0, b""
    while True:
        chunk = f.read1(_READ_CHUNK)  # read1: a truncated .gz yields what precedes the cut
        block, carry = carry + chunk, b""
        if chunk and universal and block.endswith(b"\r"):  # maybe the first half of "\r\n"
            block, carry = block[:-1], b"\r"
        pos = 0
        found = ends.finditer(block) if b"\r" in block else _LINE_END[False].finditer(block)
        cuts = [(m.end(), True) for m in found] + [(len(block), False)]  # \n alone: 8x faster
        for end, complete in cuts:
            piece, pos = block[pos:end], end
            size += len(piece)
            if squeezed is None:
                held += piece
                if len(held) > MAX_RECORD_BYTES:
                    squeezed, kept = [], 0
                    piece, held = bytes(held), bytearray()
            if squeezed is not None and piece:
                squeezed.append(squeeze(piece) if squeeze else b"")
                kept += len(squeezed[-1])
                if kept > MAX_RECORD_BYTES:
                    raise _Overflow(size)
            if size and (complete or not chunk):
                yield (bytes(held), size, False) if squeezed is None else (
                    b"".join(squeezed), size, True)
                held, squeezed, size = bytearray(), None, 0
        if not chunk:
            return


def _decode_line(raw: bytes, label: str, number: int) -> str:
    """One line's bytes as text; invalid UTF-8 is an error naming the line and the bytes."""
    if number == 1:
        raw = raw.removeprefix(_BOM)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = e.object[e.start:e.start + 4]
        raise DataError(f"{label}: line {number} is not valid UTF-8 ({e.reason} at byte "
                        f"{e.start + 1} of the line: {bad!r}); save the file as UTF-8") from None


def _too_large(size: int) -> Unreadable:
    return Unreadable("too_large", f"{size:,} bytes, over the {human_bytes(MAX_RECORD_BYTES)} "
                                   "bound for one record")


_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]')


def _json_too_deep(text: str, limit: int) -> int | None:
    """None when `text` nests at most `limit` levels of arrays/objects, else the 1-based index
    of the top-level array element where it goes deeper (1 for a non-array). A linear scan:
    json.loads would recurse once per level."""
    if text.count("[") + text.count("{") <= limit:
        return None
    depth, element = 0, 1
    for m in _JSON_TOKEN.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > limit:
                return element
        elif c in "]}":
            depth -= 1
        elif c == "," and depth == 1:
            element += 1
    return None


def _json_record(text: str, label: str, number: int, unit: str) -> Any:
    """One JSON Lines record: the parsed value, or Unreadable when nested too deeply."""
    if _json_too_deep(text, MAX_JSON_DEPTH) is not None:
        return Unreadable("too_deep", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{label}: {unit} {number} is not valid JSON ({e.msg})") from None


def _json_lines(f, label: str) -> list[tuple[int, Any]]:
    records, number = [], 0
    try:
        for number, (raw, size, over) in enumerate(_physical_lines(f, False), start=1):
            if over:
                records.append((number, _too_large(size)))
                continue
            line = _decode_line(raw, label, number)
            if line.strip():
                records.append((number, _json_record(line, label, number, "line")))
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{label}: the compressed data is cut short or corrupt after line "
                        f"{number} ({type(e).__name__}: {e}); no row of this file was used"
                        ) from None
    return records


def _read_json_records(path: Path, label: str) -> Records:
    records, unit = None, "line"
    # A .json file may hold one array of objects (parsed whole); a .jsonl file is always lines,
    # read as a stream (its first record may itself be an array: a bad record, named below).
    if path.name.lower().endswith(".json"):
        raw = path.read_bytes()
        text = _decode_whole(raw, label)
        if text.lstrip().startswith("["):
            records = _json_array(text, label)
            unit = "row" if records is not None else unit
        if records is None:
            records = _json_lines(io.BytesIO(raw), label)
    else:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as f:
            records = _json_lines(f, label)
    columns: dict[str, None] = {}  # the union of keys, in order of first appearance
    for number, rec in records:
        if isinstance(rec, Unreadable):
            continue
        if not isinstance(rec, dict):
            raise DataError(f"{label}: {unit} {number} is a JSON {type(rec).__name__}, "
                            "expected an object with the input and output columns")
        columns.update(dict.fromkeys(rec))
    return records, list(columns), unit


def _decode_whole(raw: bytes, label: str) -> str:
    try:
        return raw.removeprefix(_BOM).decode("utf-8")
    except UnicodeDecodeError:  # name the line: decode line by line
        for number, (line, _, _) in enumerate(_physical_lines(io.BytesIO(raw), False), 1):
            _decode_line(line, label, number)
        raise


def _json_array(text: str, label: str) -> list[tuple[int, Any]] | None:
    """The rows of a .json file holding one array; None when it holds more than one value
    (JSON Lines after all)."""
    row = _json_too_deep(text, MAX_JSON_DEPTH + 1)  # + 1: the array itself
    if row is not None:
        raise DataError(f"{label}: row {row} is JSON nested deeper than {MAX_JSON_DEPTH} "
                        "levels; a .json array is parsed whole, so nothing of it was used "
                        "(JSON Lines would drop only that row)")
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # more than one value: JSON Lines after all
            return None
        raise DataError(f"{label}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(items, list):
        return None
    return list(enumerate(items, start=1))


def _squeeze_csv(piece: bytes) -> bytes:
    """What decides where an over-long CSV record ends, without its megabytes: quotes and line
    ends are kept; every run of other bytes becomes its last byte, a comma or "x" (after such a
    run the parser is in the same state either way: a field just started, or inside one)."""
    return _CSV_RUN.sub(rb"\1", piece.translate(_CSV_SHAPE))


_CSV_SHAPE = bytes(c if c in b'",\r\n' else ord("x") for c in range(256))
_CSV_RUN = re.compile(rb"[x,]*([x,])")


def _read_csv_records(path: Path, label: str) -> Records:
    """CSV records, each numbered by its first physical line. A record over MAX_RECORD_BYTES
    is read squeezed (`_squeeze_csv`) and kept as Unreadable; a quote never closed is an error:
    where its cell was meant to end cannot be known, so no row after it can be trusted."""
    state = {"record": 0, "line": 0, "eof": False}

    def lines() -> Iterator[str]:
        with open(path, "rb") as f:
            for raw, size, over in _physical_lines(f, True, _squeeze_csv):
                state["line"] += 1
                state["record"] += size
                if state["record"] > MAX_RECORD_BYTES and not over:
                    raw = _squeeze_csv(raw)  # this record is already over: keep only its shape
                yield _decode_line(raw, label, state["line"])
        state["eof"] = True

    records, start = [], 1
    previous_limit = csv.field_size_limit(2 * MAX_RECORD_BYTES)
    try:
        reader = csv.reader(lines())
        header = next(reader, [])
        if state["eof"] and header:  # the reader reached the end inside the header
            raise _unclosed_quote(label, 1, state["line"])
        if state["record"] > MAX_RECORD_BYTES:
            raise DataError(f"{label}: the header is over {human_bytes(MAX_RECORD_BYTES)}")
        start, state["record"] = state["line"] + 1, 0
        for values in reader:
            if state["eof"]:  # a record ends at a line's end, never at the file's: a quote
                raise _unclosed_quote(label, start, state["line"])
            if state["record"] > MAX_RECORD_BYTES:
                records.append((start, _too_large(state["record"])))
            elif values:
                # A short row lacks its last columns (missing_column); a long one is an error.
                if len(values) > len(header):
                    raise DataError(f"{label}: line {start} has {len(values)} fields, the header "
                                    f"has {len(header)}")
                records.append((start, dict(zip(header, values))))
            start, state["record"] = state["line"] + 1, 0
    except _Overflow:
        raise DataError(f"{label}: line {start}: a record over {human_bytes(MAX_RECORD_BYTES)} "
                        "even with its text cut out (megabytes of quotes and commas); this is "
                        "not a table the loader reads") from None
    except csv.Error as e:
        raise DataError(f"{label}: line {start}: cannot parse the CSV record starting here "
                        f"({e})") from None
    finally:
        csv.field_size_limit(previous_limit)
    return records, header, "line"


def _unclosed_quote(label: str, start: int, last: int) -> DataError:
    return DataError(f"{label}: line {start}: a quoted cell opened in this record is never "
                     f"closed, so lines {start}-{last} would be one cell; close the quote (a "
                     'quote inside a quoted cell is written twice: "")')


def _read_parquet_records(path: Path, label: str) -> Records:
    """Row group by row group (memory: one group); a row whose text cells hold more than
    MAX_RECORD_BYTES is measured in Arrow and kept as Unreadable, never made a Python string."""
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
        columns = list(f.schema_arrow.names)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{label}: cannot read Parquet ({e})") from None
    records: list[tuple[int, Any]] = []
    first = 1
    for group in range(f.num_row_groups):
        n = f.metadata.row_group(group).num_rows
        try:
            table = f.read_row_group(group)
            sizes = _text_bytes_per_row(table)
            small = sizes <= MAX_RECORD_BYTES
            kept = table.filter(small) if not small.all() else table
            rows = iter(kept.to_pylist())
        except Exception as e:
            raise DataError(f"{label}: rows {first}-{first + n - 1} (row group {group + 1} of "
                            f"{f.num_row_groups}) cannot be read: {e}") from None
        records += [(first + i, next(rows) if ok else _too_large(int(sizes[i])))
                    for i, ok in enumerate(small)]
        first += n
    return records, columns, "row"


def _text_bytes_per_row(table) -> np.ndarray:
    """UTF-8 bytes of each row's string and binary cells, computed in Arrow."""
    import pyarrow as pa
    import pyarrow.compute as pc

    total = np.zeros(table.num_rows, dtype=np.int64)
    for column in table.columns:
        kind = column.type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(
                kind) or pa.types.is_large_binary(kind):
            total += pc.fill_null(pc.binary_length(column), 0).to_numpy().astype(np.int64)
    return total


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


#: The columns of hub datasets the paper used (§4.2): a run that leaves the columns at their
#: defaults ("input", "output") reads these, so xsum is one parameter (data_source) away.
HUB_COLUMNS = {"Samsung/samsum": ("dialogue", "summary"), "samsum": ("dialogue", "summary"),
               "EdinburghNLP/xsum": ("document", "summary"), "xsum": ("document", "summary")}


def with_known_columns(cfg: DataConfig, source: str) -> DataConfig:
    """`cfg` with a known hub dataset's columns when it names none of its own."""
    known = HUB_COLUMNS.get(parse_hub_id(str(source))[0])
    if known is None or (cfg.input_column, cfg.output_column) != ("input", "output"):
        return cfg
    return dataclasses.replace(cfg, input_column=known[0], output_column=known[1])


def parse_hub_id(name: str) -> tuple[str, str | None, str | None]:
    """(repo, config, revision) of `owner/name[:config][@revision]` or `hf:name...`."""
    rest, _, revision = name.removeprefix("hf:").partition("@")
    repo, _, config = rest.partition(":")
    return repo, config or None, revision or None


def resolve_hub_revision(repo: str, revision: str | None = None, api=None) -> str:
    """The commit SHA that `revision` (None: the default branch) of Hugging Face dataset `repo`
    names now, so the run loads, and its fingerprint records, one fixed commit. A 40-hex-digit
    revision is already a commit and needs no lookup."""
    if revision and _COMMIT.match(revision):
        return revision
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        sha = api.dataset_info(repo, revision=revision).sha
    except Exception as e:  # network, auth, unknown id or revision: one clear message
        at = f" at {revision!r}" if revision else ""
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        raise DataError(f"cannot load Hugging Face dataset {repo!r}{at} (and no local file or "
                        f"directory has that name): resolving it to a commit failed: "
                        f"{type(e).__name__}: {first.strip()}; on a machine without the hub, "
                        f"set data_source to a file, a directory or an s3:// prefix") from None
    if not (isinstance(sha, str) and _COMMIT.match(sha)):
        raise DataError(f"Hugging Face dataset {repo!r}: the hub gave no commit for "
                        f"{revision or 'its default branch'} (got {sha!r})")
    return sha


def read_hub(name: str) -> list[Part]:
    """A Hugging Face dataset (`owner/name`, `hf:name`, optional `:config` and `@revision`),
    its named splits, loaded at the commit the revision resolves to now."""
    import datasets

    repo, config, revision = parse_hub_id(name)
    sha = resolve_hub_revision(repo, revision)
    try:
        names = datasets.get_dataset_split_names(repo, config, revision=sha)
        loaded = {s: datasets.load_dataset(repo, config, split=s, revision=sha)
                  for s in _hub_splits_to_read(names)}
    except DataError:
        raise
    except Exception as e:  # network, auth, unknown id: all surface as one clear message
        raise DataError(f"cannot load Hugging Face dataset {name!r} at commit {sha} (and no "
                        f"local file or directory has that name): {type(e).__name__}: {e}"
                        ) from None
    return parts_from_hub(name, loaded, sha)


def _hub_splits_to_read(names: list[str]) -> list[str]:
    if "train" not in names:
        raise DataError(f"the dataset has no 'train' split (its splits: {', '.join(names)})")
    extra = "test" if "test" in names else next((n for n in names if n.startswith("valid")), None)
    return ["train"] + ([extra] if extra else [])


def parts_from_hub(name: str, splits: dict[str, Any], revision: str | None = None
                   ) -> list[Part]:
    """Parts from loaded `datasets.Dataset` objects keyed by hub split name."""
    parts = []
    for hub_split, ds in splits.items():
        records = list(enumerate(ds, start=1))
        if not records:
            raise DataError(f"{name} split {hub_split!r}: the split has no rows")
        parts.append(Part(f"{name} split {hub_split!r}", split_from_name(hub_split),
                          list(ds.column_names), records, "row", revision=revision))
    return parts


def looks_local(text: str) -> bool:
    """True when `text` can only mean a path: it starts like one (`.`, `/`, `~`), has a
    backslash or a second `/`, ends with a file extension (`x.jsonl`, `a/b.csv.gz`), or its
    first component is a directory here (`data/typo`). Such a name that does not exist is a
    "no such file" error: it never reaches the Hugging Face hub."""
    if text.startswith(("hf:", "s3://")):
        return False
    base = text.split("@")[0]  # a revision may hold slashes (refs/pr/1)
    if text.startswith((".", "/", "~")) or "\\" in base or base.count("/") != 1:
        return True
    if base.lower().endswith(_FILE_ENDINGS) or not _HUB_ID.match(text):
        return True
    return Path(text.split("/")[0]).is_dir()


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
    if text.startswith("hf:") or not looks_local(text):
        return "hub", read_hub(text)
    why = ""
    if "/" in text and Path(text.split("/")[0]).is_dir() and _HUB_ID.match(text):
        why = (f"; a directory {text.split('/')[0]!r} exists here, so this names a path (for "
               f"the Hugging Face dataset of that name write hf:{text})")
    raise DataError(f"task data not found: {text} (no such file or directory{why}; a Hugging "
                    "Face dataset id looks like owner/name or hf:name)")


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
    source_revision: str | None = None  # the hub commit a hub dataset was loaded at


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
                "empty": "empty", "invalid_unicode": "not valid Unicode (a lone surrogate)",
                "too_large": "too large"}


def _cells_too_large(record: dict[str, Any], cfg: DataConfig) -> int | None:
    """UTF-8 size of the input and output cells when over MAX_RECORD_BYTES (rows already parsed
    whole: a .json array, a hub split), so that no such text reaches the tokenizer."""
    texts = [record[c] for c in (cfg.input_column, cfg.output_column)]
    if sum(map(len, texts)) * 4 <= MAX_RECORD_BYTES:  # 4: the most bytes one character takes
        return None
    size = sum(len(t.encode("utf-8")) for t in texts)
    return size if size > MAX_RECORD_BYTES else None


def _row_problem(record: dict[str, Any], cfg: DataConfig) -> tuple[str, str] | None:
    """(column, reason) for the first unusable column of a row, else None."""
    for column in (cfg.input_column, cfg.output_column):
        reason = bad_reason(record, column)
        if reason is not None:
            return column, reason
    if _cells_too_large(record, cfg) is not None:
        return cfg.input_column, "too_large"
    rid = record.get(ID_COLUMN)
    if rid is not None and not is_valid_unicode(str(rid)):
        return ID_COLUMN, "invalid_unicode"
    return None


def valid_rows(part: Part, cfg: DataConfig, dropped: Counter) -> list[dict[str, str]]:
    """The part's usable rows as {id, input, output}; bad ones counted (or raised if strict)."""
    check_columns(part, cfg)
    rows = []
    for number, rec in part.records:
        if isinstance(rec, Unreadable):  # known only by its place: too large or too deep
            if cfg.strict:
                raise DataError(f"{part.label}: {part.unit} {number}: {rec.detail} (strict mode)")
            dropped[rec.reason] += 1
            continue
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
        splits = {s: [] for s in SPLITS}
        for r in (r for p in used for r in valid_rows(p, cfg, dropped)):
            splits[split_of(r["input"], cfg.test_fraction)].append(r)
        method = "hash"
    splits = _deduplicate(splits, dropped)
    _unique_ids(splits)
    revisions = sorted({p.revision for p in used if p.revision})
    return Rows(splits, kind, method, sum(len(p.records) for p in used), dropped,
                [p.label for p in used], [p.label for p in ignored], _source_sha256(used),
                revisions[0] if revisions else None)


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
    """Make ids unique over both splits, here at filter time: stages join predictions on ids,
    and a clash would surface only when the shards gather, after all the training.

    Test rows come first (the report names them). A row keeps its id unless an earlier row has
    it; then it gets the first free `id~2`, `id~3`, ... that is neither taken nor some other
    row's own id, so `x, x, x~2` become `x, x~3, x~2`. Only the rows' order decides: the same
    input gives the same ids in every run."""
    own = {row["id"] for split in SPLITS for row in splits[split]}
    taken: set[str] = set()
    next_suffix: dict[str, int] = {}
    for split in ("test", "train"):
        for row in splits[split]:
            rid = row["id"]
            if rid in taken:
                k = next_suffix.get(rid, 2)
                while f"{rid}~{k}" in taken or f"{rid}~{k}" in own:
                    k += 1
                next_suffix[rid] = k + 1
                row["id"] = f"{rid}~{k}"
            taken.add(row["id"])


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
        "source_revision": rows.source_revision,
        "input_words": word_stats(r["input"] for r in everything),
        "output_words": word_stats(r["output"] for r in everything),
    }
