"""Sharded generation and scoring: which test rows a shard takes, and gathering the shards.

The pipeline fans generation and per-example scoring out over `GenerateConfig.num_shards`
tasks (`dsl.ParallelFor`; one GPU each on a cluster) and gathers them (`dsl.Collected`).

Why shards are made of whole windows: generation sorts rows by length inside windows of
`window_batches` batches and decodes a batch at a time (`lastmile.generate`). A batch's
padding, and so on a real machine the last bits of its logits, depend on which rows share it.
A shard is a contiguous run of whole windows, so every batch of a sharded run holds exactly
the rows it holds in an unsharded run: greedy predictions are the same text, and the gathered
file is the unsharded one, row for row.

Each shard records `{"index", "count", "rows": [start, stop]}` under "shard" in its
summary.json; the gather orders shards by that record (KFP does not promise the order of a
collected list) and checks that they tile the test rows exactly once.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from .io import atomic_path, read_json, read_jsonl, write_json

SHARD_KEY = "shard"
PREDICTIONS = "predictions.jsonl"
EXAMPLE_SCORES = "example_scores.jsonl"
SUMMARY = "summary.json"


class ShardError(ValueError):
    """Shards that do not tile the test rows (missing, repeated or foreign shards)."""


# ----------------------------------------------------------------------------- the plan

def window_rows(batch_size: int, window_batches: int) -> int:
    if batch_size < 1 or window_batches < 1:
        raise ValueError(f"batch_size and window_batches must be >= 1, got {batch_size}, "
                         f"{window_batches}")
    return batch_size * window_batches


def shard_ranges(n_rows: int, num_shards: int, rows_per_window: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges, one per non-empty shard: contiguous runs of whole windows,
    as even as whole windows allow. Fewer ranges than `num_shards` when there are fewer
    windows than shards; none when there are no rows."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if rows_per_window < 1:
        raise ValueError(f"rows_per_window must be >= 1, got {rows_per_window}")
    windows = math.ceil(n_rows / rows_per_window)
    shards = min(num_shards, windows)
    edges = [k * windows // shards for k in range(shards + 1)] if shards else []
    return [(a * rows_per_window, min(b * rows_per_window, n_rows))
            for a, b in zip(edges, edges[1:])]


def plan(n_rows: int, cfg) -> list[tuple[int, int]]:
    """The shard ranges for `n_rows` test rows under a GenerateConfig."""
    return shard_ranges(n_rows, cfg.num_shards, window_rows(cfg.batch_size, cfg.window_batches))


def shard_record(index: int, ranges: Sequence[tuple[int, int]]) -> dict:
    """What a shard writes into its summary: its index, the shard count and its rows."""
    if not 0 <= index < len(ranges):
        raise ValueError(f"shard {index} does not exist: the test rows make {len(ranges)} "
                         f"shard(s) (num_shards is capped at the number of windows)")
    start, stop = ranges[index]
    return {"index": index, "count": len(ranges), "rows": [start, stop]}


# ----------------------------------------------------------------------------- the gather

def _shard_of(folder: Path) -> dict:
    path = folder / SUMMARY
    if not path.is_file():
        raise ShardError(f"{folder}: no {SUMMARY}, so no shard record")
    record = read_json(path).get(SHARD_KEY)
    if not isinstance(record, dict) or not {"index", "count", "rows"} <= set(record):
        raise ShardError(f"{path}: no shard record (is this a sharded stage's output?)")
    return record


def read_summary(folder: str | os.PathLike) -> dict:
    return read_json(Path(folder) / SUMMARY)


def ordered(folders: Sequence[str | os.PathLike]) -> list[tuple[dict, Path]]:
    """(shard record, folder) sorted by shard index, after checking the shards tile the rows:
    one of each index 0..count-1, all agreeing on the count, row ranges back to back."""
    found = sorted(((_shard_of(Path(f)), Path(f)) for f in folders), key=lambda x: x[0]["index"])
    if not found:
        raise ShardError("no shards to gather")
    counts = {r["count"] for r, _ in found}
    indices = [r["index"] for r, _ in found]
    if len(counts) != 1 or indices != list(range(counts.pop())):
        raise ShardError(f"shards do not make one complete set: indices {indices} from "
                         f"{[str(f) for _, f in found]}")
    for (a, fa), (b, fb) in zip(found, found[1:]):
        if a["rows"][1] != b["rows"][0]:
            raise ShardError(f"shard rows are not contiguous: {fa} ends at {a['rows'][1]}, "
                             f"{fb} starts at {b['rows'][0]}")
    return found


def concatenate(folders: Sequence[Path], name: str, out_path: Path) -> int:
    """Concatenate folder/name files in the given order into out_path (atomically); rows."""
    rows = 0
    with atomic_path(out_path) as tmp, open(tmp, "wb") as out:
        for folder in folders:
            with open(folder / name, "rb") as part:
                shutil.copyfileobj(part, out)
            rows += sum(1 for _ in read_jsonl(folder / name))
    return rows


def _check_unique_ids(path: Path) -> None:
    seen: dict[Any, int] = {}
    for line, row in enumerate(read_jsonl(path), start=1):
        key = row.get("id")
        if key is None:
            continue
        key = json.dumps(key)
        if key in seen:
            raise ShardError(f"{path}: id {key} appears on lines {seen[key]} and {line}: "
                             "shards overlap")
        seen[key] = line


#: Summary fields that add up over shards; the rest must agree (or are per-shard detail).
ADDITIVE = ("n", "seconds", "load_seconds")


def merge_summaries(summaries: Sequence[dict]) -> dict:
    """One stage summary from its shards' (in shard order).

    "seconds" is the sum over shards (the stage's cost in task-seconds, what the timing
    table adds up); "wall_seconds" the slowest shard (the stage's wall time when the shards
    run side by side); "shard_seconds" each one. Token statistics are re-weighted by rows.
    Fields that differ between shards and are not additive are dropped, never guessed.
    """
    first = summaries[0]
    merged = {k: v for k, v in first.items()
              if k not in ADDITIVE and k != SHARD_KEY
              and all(s.get(k) == v for s in summaries[1:])}
    for key in ADDITIVE:
        values = [s.get(key) for s in summaries]
        if all(isinstance(v, (int, float)) for v in values):
            merged[key] = round(sum(values), 3) if key != "n" else sum(values)
    seconds = [s.get("seconds") for s in summaries]
    if all(isinstance(v, (int, float)) for v in seconds):
        merged["wall_seconds"] = max(seconds)
        merged["shard_seconds"] = seconds
    merged["shards"] = len(summaries)
    n = [s.get("n") for s in summaries]
    if all(isinstance(v, int) and v > 0 for v in n):
        total = sum(n)
        for key in ("mean_new_tokens", "hit_budget_share"):
            if all(isinstance(s.get(key), (int, float)) for s in summaries):
                merged[key] = sum(s[key] * k for s, k in zip(summaries, n)) / total
        rates = [s.get("tokens_per_second") for s in summaries]
        if "mean_new_tokens" in merged and all(isinstance(r, (int, float)) and r > 0
                                               for r in rates):
            gen_seconds = sum(s["mean_new_tokens"] * k / r
                              for s, k, r in zip(summaries, n, rates))
            merged["tokens_per_second"] = round(merged["mean_new_tokens"] * total
                                                / gen_seconds, 2)
    return merged


def gather_predictions(folders: Sequence[str | os.PathLike], out_dir: str | os.PathLike
                       ) -> dict:
    """Concatenate the shards' predictions.jsonl in shard order into out_dir; write and
    return the merged summary.json (the stage as if it had run unsharded)."""
    shards = ordered(folders)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = out / PREDICTIONS
    rows = concatenate([f for _, f in shards], PREDICTIONS, written)
    _check_unique_ids(written)
    summary = merge_summaries([read_json(f / SUMMARY) for _, f in shards])
    expected = shards[-1][0]["rows"][1] - shards[0][0]["rows"][0]
    if rows != expected:
        raise ShardError(f"gathered {rows} predictions, the shards' row ranges cover {expected}")
    summary["rows_gathered"] = rows
    write_json(out / SUMMARY, summary)
    return summary


def gather_example_scores(folders: Sequence[str | os.PathLike], out_path: str | os.PathLike,
                          cfg) -> dict:
    """The corpus scores (scores.json at out_path) from the shards' per-example scores, read
    in shard order: the means of an unsharded run (`metrics.aggregate_example_files`)."""
    from .metrics import aggregate_example_files

    shards = ordered(folders)
    return aggregate_example_files([f / EXAMPLE_SCORES for _, f in shards], out_path, cfg)
