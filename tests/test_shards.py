"""Sharded generation and scoring (lastmile.shards): the plan, the gather, the merged summary,
and scores gathered from shards equal to scoring the predictions in one go."""

from __future__ import annotations

import json

import pytest

from lastmile import metrics, report, shards
from lastmile.config import GenerateConfig, ScoreConfig
from lastmile.io import read_json, write_json, write_jsonl


def test_shards_are_contiguous_whole_windows():
    assert shards.shard_ranges(9, 3, 4) == [(0, 4), (4, 8), (8, 9)]
    assert shards.shard_ranges(9, 1, 4) == [(0, 9)]
    assert shards.shard_ranges(9, 8, 4) == [(0, 4), (4, 8), (8, 9)]  # 3 windows: 3 shards
    assert shards.shard_ranges(0, 4, 4) == []
    assert shards.shard_ranges(100, 2, 128) == [(0, 100)]  # the demo: one window
    assert shards.plan(3000, GenerateConfig(num_shards=4)) == [
        (0, 768), (768, 1536), (1536, 2304), (2304, 3000)]  # 24 windows of 128 rows, 6 each


@pytest.mark.parametrize("n", [1, 7, 8, 9, 31, 100, 1001])
@pytest.mark.parametrize("num_shards", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("window", [1, 4, 16])
def test_shards_tile_the_rows_exactly_once(n, num_shards, window):
    ranges = shards.shard_ranges(n, num_shards, window)
    windows = -(-n // window)
    assert len(ranges) == min(num_shards, windows)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(start < stop and start % window == 0 for start, stop in ranges)
    sizes = [-(-(stop - start) // window) for start, stop in ranges]  # windows per shard
    assert max(sizes) - min(sizes) <= 1


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match="num_shards"):
        shards.shard_ranges(10, 0, 4)
    with pytest.raises(ValueError, match="shard 2 does not exist: .* 2 shard"):
        shards.shard_record(2, [(0, 4), (4, 8)])


def _shard(folder, index, count, rows, predictions, **summary):
    folder.mkdir(parents=True)
    write_jsonl(folder / "predictions.jsonl", predictions)
    write_json(folder / "summary.json", {"stage": "generate_base", "variant": "base",
                                         "shard": {"index": index, "count": count,
                                                   "rows": rows}, **summary})
    return folder


def _rows(ids):
    return [{"id": i, "reference": f"ref {i}", "prediction": f"pred {i} words", "variant": "base"}
            for i in ids]


def test_gather_orders_by_shard_record_and_merges_summaries(tmp_path):
    a = _shard(tmp_path / "a", 0, 2, [0, 3], _rows(["r0", "r1", "r2"]), n=3, seconds=6.0,
               load_seconds=1.0, mean_new_tokens=10.0, hit_budget_share=0.0,
               tokens_per_second=5.0, base_model="m")
    b = _shard(tmp_path / "b", 1, 2, [3, 4], _rows(["r3"]), n=1, seconds=2.0,
               load_seconds=1.0, mean_new_tokens=30.0, hit_budget_share=1.0,
               tokens_per_second=15.0, base_model="m")
    merged = shards.gather_predictions([b, a], tmp_path / "out")  # collected out of order
    ids = [json.loads(line)["id"] for line in (tmp_path / "out/predictions.jsonl").open()]
    assert ids == ["r0", "r1", "r2", "r3"]
    assert merged == read_json(tmp_path / "out/summary.json")
    assert merged["n"] == 4 and merged["seconds"] == 8.0 and merged["wall_seconds"] == 6.0
    assert merged["shard_seconds"] == [6.0, 2.0] and merged["shards"] == 2
    assert merged["mean_new_tokens"] == 15.0 and merged["hit_budget_share"] == 0.25
    assert merged["tokens_per_second"] == 7.5  # 60 tokens in 6 s + 2 s
    assert merged["base_model"] == "m" and merged["stage"] == "generate_base"
    assert "shard" not in merged


def test_gather_refuses_incomplete_or_overlapping_shards(tmp_path):
    a = _shard(tmp_path / "a", 0, 3, [0, 2], _rows(["r0", "r1"]))
    c = _shard(tmp_path / "c", 2, 3, [4, 5], _rows(["r4"]))
    with pytest.raises(shards.ShardError, match=r"indices \[0, 2\]"):
        shards.gather_predictions([a, c], tmp_path / "out")
    b = _shard(tmp_path / "b", 1, 3, [2, 4], _rows(["r1", "r3"]))  # r1 again
    with pytest.raises(shards.ShardError, match="id \"r1\" appears on lines 2 and 3"):
        shards.gather_predictions([a, b, c], tmp_path / "out2")
    d = _shard(tmp_path / "d", 1, 3, [3, 4], _rows(["r3"]))
    with pytest.raises(shards.ShardError, match="not contiguous"):
        shards.gather_predictions([a, d, c], tmp_path / "out3")
    (tmp_path / "e").mkdir()
    with pytest.raises(shards.ShardError, match="no summary.json"):
        shards.gather_predictions([tmp_path / "e"], tmp_path / "out4")


def _predictions(variant, n, offset=0):
    return [{"id": f"r{i}", "reference": f"the package provides tool number {i}",
             "prediction": " ".join(["the tool", str(i)] * (1 + i % 4)), "variant": variant}
            for i in range(offset, offset + n)]


@pytest.mark.parametrize("semantic", [False, True])
def test_scores_gathered_from_shards_equal_one_pass(tmp_path, semantic):
    cfg = ScoreConfig(semantic_similarity=semantic)
    variants = ("base", "rl")
    whole = [tmp_path / f"{v}.jsonl" for v in variants]
    for v, path in zip(variants, whole):
        write_jsonl(path, _predictions(v, 70))  # more than one model batch (64)
    expected = metrics.score_file(whole, tmp_path / "scores.json", cfg)

    folders = []
    for index, (start, stop) in enumerate([(0, 30), (30, 70)]):
        folder = tmp_path / f"shard{index}"
        parts = []
        for v in variants:
            parts.append(folder / f"{v}.jsonl")
            write_jsonl(parts[-1], _predictions(v, stop - start, start))
        metrics.score_examples_file(parts, folder / shards.EXAMPLE_SCORES, cfg)
        write_json(folder / "summary.json", {"stage": "score", "shard": {
            "index": index, "count": 2, "rows": [start, stop]}})
        folders.append(folder)
    gathered = shards.gather_example_scores(folders[::-1], tmp_path / "gathered.json", cfg)
    assert gathered["notes"] == expected["notes"]
    for v in variants:
        for key, value in expected["models"][v].items():
            if value is None:
                assert gathered["models"][v][key] is None, key
            else:  # lexical: exactly; embeddings: batch padding differs, float rounding only
                assert gathered["models"][v][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_per_example_scores_are_written_and_checked(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", _predictions("base", 3))
    cfg = ScoreConfig(semantic_similarity=False)
    scores = metrics.score_file(tmp_path / "p.jsonl", tmp_path / "s.json", cfg,
                                examples_path=tmp_path / "ex.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "ex.jsonl").open()]
    assert [r["id"] for r in rows] == ["r0", "r1", "r2"]
    assert sum(r["excess_length"] for r in rows) / 3 == scores["models"]["base"]["excess_length"]
    assert all(r["semantic_similarity"] is None for r in rows)
    # Per-example rows scored without embeddings cannot make scores that claim them.
    with pytest.raises(metrics.ScoreInputError, match=r"ex.jsonl:1: .*semantic_similarity"):
        metrics.aggregate_example_files([tmp_path / "ex.jsonl"], tmp_path / "x.json",
                                        ScoreConfig(semantic_similarity=True))


def test_timing_table_marks_sharded_stages_and_cost_per_row():
    table = report.timing_table({
        "generate_base": {"seconds": 30.0, "n": 100, "shards": 3},
        "train_ppo": {"seconds": 50.0, "rows": 10, "processes": 2},
        "filter_data": {"seconds": 1.0, "rows_in": 4}})
    assert table.rows[0][:3] == ["generate_base ×3", "30.0", "0.3"]
    assert table.rows[1][:3] == ["train_ppo ×2", "50.0", "5"]
    assert table.rows[2][:3] == ["filter_data", "1.0", "0.25"]
    assert table.rows[-1][:2] == ["total", "81.0"]
