"""lastmile.freshness (is anything new?) and lastmile.results (metrics, publishing): the pure
decision, then the lookup and the published layout against a real S3 server (SeaweedFS)."""

from __future__ import annotations

import datetime as dt
import json
import math
import re

import pytest

from lastmile import config, freshness, results, storage
from s3server import bucket, s3_env  # noqa: F401 - the fixtures (s3_server: conftest)

CONFIG = config.profile_to_json(config.get_profile("smoke"))
DATA = "a" * 64


def fp(data=DATA, base_hash="tiny-random", cfg=CONFIG, source="s3://b/data/"):
    return freshness.fingerprint(data, "tiny-random", base_hash, cfg, source)


# ----------------------------------------------------------------------------- pure

def test_fingerprint_compares_data_base_and_configuration_only():
    one = fp()
    assert one["format"] == freshness.FINGERPRINT_FORMAT
    assert re.fullmatch(r"[0-9a-f]{64}", one["digest"])
    # The source's name and the configuration's key order are not part of the identity.
    reordered = json.dumps(json.loads(CONFIG), sort_keys=False, indent=3)
    assert fp(source="s3://other/place/", cfg=reordered)["digest"] == one["digest"]
    assert fp(data="b" * 64)["digest"] != one["digest"]
    assert fp(base_hash="0123456789abcdef")["digest"] != one["digest"]
    other = config.profile_to_json(config.resolve("smoke", max_train=5))
    assert fp(cfg=other)["digest"] != one["digest"]
    # More shards or training processes: the same result, so nothing new to train on.
    scaled = config.profile_to_json(config.resolve("smoke", num_shards=4, train_processes=2))
    assert fp(cfg=scaled)["digest"] == one["digest"]
    with pytest.raises(ValueError, match="data_sha256"):
        fp(data="")


def test_decide_unchanged_skips_and_says_why():
    d = freshness.decide(fp(), fp(), previous_run="20250101T030000Z-a", publish_to="s3://b/runs/")
    assert d.changed is False and d.previous_run == "20250101T030000Z-a"
    assert d.reason.startswith("no new data under s3://b/data/ since run 20250101T030000Z-a")
    assert "force=true" in d.reason
    assert freshness.Decision.from_json(d.to_json()) == d


@pytest.mark.parametrize("current, changed_words", [
    (fp(data="b" * 64), "the data changed since run r (data sha256 aaaaaaaaaaaa -> bbbbbbbbbbbb)"),
    (fp(base_hash="feed"), "the base model's weights changed"),
    (fp(cfg=config.profile_to_json(config.resolve("smoke", seed=3))), "the configuration changed"),
])
def test_decide_anything_different_trains(current, changed_words):
    d = freshness.decide(current, fp(), previous_run="r", publish_to="s3://b/runs/")
    assert d.changed is True
    assert changed_words in d.reason


def test_decide_trains_when_forced_or_with_nothing_to_compare():
    same = fp()
    forced = freshness.decide(same, same, previous_run="r", publish_to="s3://b/runs/", force=True)
    assert forced.changed and forced.forced and "force=true" in forced.reason
    assert freshness.decide(same, same, previous_run="r").changed  # no publish_to
    first = freshness.decide(same, None, previous_run=None, publish_to="s3://b/runs/")
    assert first.changed and "no run published under s3://b/runs/" in first.reason
    legacy = freshness.decide(same, {"data_sha256": DATA}, previous_run="r",
                              publish_to="s3://b/runs/")
    assert legacy.changed and "carries no lastmile-fingerprint/1" in legacy.reason


def test_check_without_lookup_when_forced_or_unpublished(monkeypatch):
    def no_store(*args, **kwargs):
        raise AssertionError("must not touch the object store")

    monkeypatch.setattr(freshness, "latest_published", no_store)
    summary = {"data_sha256": DATA}
    assert freshness.check(summary, CONFIG, "tiny-random", "tiny-random").changed
    d = freshness.check(summary, CONFIG, "tiny-random", "tiny-random", publish_to="s3://b/r/",
                        force=True)
    assert d.changed and d.forced


def test_run_names_sort_by_time_and_are_valid_run_names():
    t = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    assert freshness.run_name("lastmile-retrain-x7k2p", t) == "20250102T030405Z-lastmile-retrain-x7k2p"
    assert freshness.run_name("", t) == "20250102T030405Z"
    weird = freshness.run_name("my run / with: odd chars" + "x" * 300, t)
    assert weird.startswith("20250102T030405Z-my-run-with-odd-chars") and len(weird) <= 128
    storage._check_run_name(weird)  # accepted by publish
    later = freshness.run_name("a", t + dt.timedelta(seconds=1))
    assert sorted([later, freshness.run_name("zzz", t)])[-1] == later
    assert freshness.RUN_NAME.match(later) and not freshness.RUN_NAME.match("manual-run")


def test_metric_items_logs_every_finite_number_per_variant():
    scores = {"models": {
        "rl": {"n": 8, "rougeL_f1": 0.25, "la_rouge1_precision": 0.5, "bleurt": None,
               "excess_length": -1.5, "semantic_similarity": float("nan"), "flag": True,
               "note": "text"},
        "base": {"n": 8, "rougeL_f1": 0.125}},
        "notes": ["not a model"], "bleurt_checkpoint": None}
    assert results.metric_items(scores) == {
        "base_n": 8.0, "base_rougeL_f1": 0.125, "rl_excess_length": -1.5,
        "rl_la_rouge1_precision": 0.5, "rl_n": 8.0, "rl_rougeL_f1": 0.25}
    assert all(isinstance(v, float) and math.isfinite(v) for v in results.metric_items(scores).values())


def _fake_stage_outputs(tmp_path):
    ppo, mle, report = tmp_path / "ppo", tmp_path / "mle", tmp_path / "report"
    for d, files in ((ppo, ["adapter/adapter_model.safetensors", "value_adapter/x.safetensors",
                            "ppo_log.jsonl", "summary.json", "checkpoints/step-1/state.pt"]),
                     (mle, ["adapter/adapter_model.safetensors", "summary.json"]),
                     (report, ["report.md", "report.html", "summaries/score.json"])):
        for rel in files:
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_text(f"{d.name}/{rel}")
    (report / "scores.json").write_text(json.dumps({"models": {"rl": {"n": 1}}}))
    return ppo, mle, report


def test_stage_run_layout_leaves_checkpoints_out(tmp_path):
    ppo, mle, report = _fake_stage_outputs(tmp_path)
    out = results.stage_run(tmp_path / "staged", ppo, mle, report)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["mle/adapter/adapter_model.safetensors", "mle/summary.json",
                     "ppo/adapter/adapter_model.safetensors", "ppo/ppo_log.jsonl",
                     "ppo/summary.json", "ppo/value_adapter/x.safetensors",
                     "report/report.html", "report/report.md", "report/scores.json",
                     "report/summaries/score.json", "scores.json"]
    with pytest.raises(FileNotFoundError, match="no scores.json"):
        results.stage_run(tmp_path / "again", ppo, mle, tmp_path / "mle")


# ----------------------------------------------------------------------------- object store

def test_publish_then_check_finds_nothing_new_then_new_data(bucket, tmp_path):
    prefix = f"s3://{bucket}/runs/"
    summary = {"data_sha256": DATA}
    first = freshness.check(summary, CONFIG, "tiny-random", "tiny-random", publish_to=prefix,
                            data_source="s3://b/data/")
    assert first.changed and "no run published" in first.reason

    ppo, mle, report = _fake_stage_outputs(tmp_path)
    uri = results.publish_run(prefix, ppo_dir=ppo, mle_dir=mle, report_dir=report,
                              decision=first, job_name="lastmile-abc", job_id="id-1")
    name = uri[len(prefix):].rstrip("/")
    assert freshness.RUN_NAME.match(name) and name.endswith("-lastmile-abc")
    manifest = storage.read_manifest(uri)
    assert {"scores.json", "report/report.html", "report/report.md",
            "ppo/adapter/adapter_model.safetensors", "mle/adapter/adapter_model.safetensors"} <= {
        f["path"] for f in manifest["files"]}
    assert not [f for f in manifest["files"] if "checkpoints" in f["path"]]
    assert manifest["metadata"]["fingerprint"] == first.fingerprint
    assert manifest["metadata"]["kfp_run"] == {"job_name": "lastmile-abc", "job_id": "id-1"}

    again = freshness.check(summary, CONFIG, "tiny-random", "tiny-random", publish_to=prefix,
                            data_source="s3://b/data/")
    assert again.changed is False and again.previous_run == name

    # A run published by hand (no timestamp name, no fingerprint) is not "the latest".
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "notes.txt").write_text("hand-made")
    storage.publish(tmp_path / "manual", prefix, "zz-manual")
    assert freshness.latest_published(prefix)[0] == name

    newer = freshness.check({"data_sha256": "c" * 64}, CONFIG, "tiny-random", "tiny-random",
                            publish_to=prefix)
    assert newer.changed and "the data changed since run " + name in newer.reason

    # The latest run is the one compared with: publish the new data, then it is "nothing new".
    later = results.publish_run(prefix, ppo_dir=ppo, mle_dir=mle, report_dir=report,
                                decision=newer, run_name=freshness.run_name(
                                    "next", dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=5)))
    assert freshness.latest_published(prefix)[0] == later[len(prefix):].rstrip("/")
    assert not freshness.check({"data_sha256": "c" * 64}, CONFIG, "tiny-random", "tiny-random",
                               publish_to=prefix).changed
    assert freshness.check(summary, CONFIG, "tiny-random", "tiny-random",
                           publish_to=prefix).changed  # back to the old data: new again


def test_check_against_an_empty_prefix_and_a_missing_bucket(bucket):
    summary = {"data_sha256": DATA}
    d = freshness.check(summary, CONFIG, "tiny-random", "tiny-random",
                        publish_to=f"s3://{bucket}/nothing-here/")
    assert d.changed and d.previous_run is None
    with pytest.raises(storage.StorageError) as e:
        freshness.check(summary, CONFIG, "tiny-random", "tiny-random",
                        publish_to="s3://no-such-bucket-lastmile/runs/")
    assert e.value.kind == "no-such-bucket"


def test_publish_metadata_must_be_plain_json(bucket, tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(storage.StorageError, match="metadata is not plain JSON"):
        storage.publish(tmp_path, f"s3://{bucket}/runs/", "r1", metadata={"x": float("nan")})
    with pytest.raises(storage.StorageError, match="metadata is not plain JSON"):
        storage.publish(tmp_path, f"s3://{bucket}/runs/", "r1", metadata={"x": object()})
    assert storage.list_runs(f"s3://{bucket}/runs/") == []
