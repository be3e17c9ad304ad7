"""The whole DAG through kfp.local on a tiny random model and a few dozen rows (profile smoke),
driven through the `pipeline.py run` command line; then with task data in a real S3 server
(SeaweedFS), publishing the results there, and a second run on the same data that trains
nothing."""

from __future__ import annotations

import gzip
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("base", "mle", "rl", "base_cleaned", "mle_cleaned")
REPORT_FILES = ("report.md", "report.html", "scores.json", "ppo_curves.png", "length_hist.png",
                "rm_accuracy.png")
DATASET = ROOT / "data" / "debian-descriptions"


def _check_report(out: Path) -> dict:
    for name in REPORT_FILES:
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
        assert (out / name).stat().st_size > 0, name
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["models"]) == set(VARIANTS)
    for variant, values in scores["models"].items():
        assert values["n"] > 0
        for key, value in values.items():
            if key == "bleurt":
                assert value is None  # no checkpoint given: reported as not computed
                continue
            assert isinstance(value, (int, float)) and math.isfinite(value), (variant, key, value)
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html
    summaries = list((out / "summaries").glob("*.json"))
    assert len(summaries) >= 9, summaries  # one per stage
    return scores


def _check_console(out: Path, printed: str, errors: str) -> None:
    """What a person sees (lastmile.console): one start and one end line per stage execution,
    the total, where things are; kfp.local's executor JSON and runner warnings only in logs/,
    one log per stage; runs/latest and COMPLETE in the run folder."""
    executed = list((out / "kfp").glob("lastmile-*/**/executor_output.json"))
    starts = re.findall(r"^ +\d+:\d\d  start  (.+)$", printed, re.M)
    ends = re.findall(r"^ +\d+:\d\d  done   (.+) in [\d.]+ (?:s|min \d+ s)(?:: .+)?$",
                      printed, re.M)
    assert len(starts) == len(ends) == len(executed) >= 17, (starts, ends, len(executed))
    assert sorted(starts) == sorted(ends) and len(set(starts)) == len(starts)  # shards named
    assert {"generate rl (shard 1/2)", "generate rl (shard 2/2)", "train PPO policy",
            "score (shard 2/2)", "gather shards", "report"} <= set(starts)
    assert re.search(r"^done in \d+ (?:s|min \d+ s): \d+ stages", printed, re.M)
    assert re.search(r"train PPO policy in .*: final reward -?\d+\.\d+, excess length", printed)
    assert re.search(r"gather shards in .*: la-ROUGE-L F1 RL \d\.\d{3} vs MLE \d\.\d{3}", printed)
    assert f"lastmile export {out} --out export/rl" in printed
    (ppo,) = (out / "kfp").glob("lastmile-*/train-ppo/ppo_model/adapter")
    assert f"RL adapter (PPO): {ppo}" in printed
    for noise in ("executor_input", "DockerRunner", "[KFP Executor", "Traceback"):
        assert noise not in printed + errors, noise
    logs = out / "logs"
    kfp_log = (logs / "kfp.log").read_text()
    assert "DockerRunner" in kfp_log and "Got executor_input" in kfp_log
    assert len(list(logs.glob("*.log"))) == len(executed) + 1
    assert "PPO: 100%|" in (logs / "train-ppo-policy.log").read_text()
    assert (out.parent / "latest").resolve() == out.resolve()
    assert "status: done" in (out / "COMPLETE").read_text() and not (out / "FAILED").exists()


def _check_sharded(out: Path) -> None:
    """Generation, post-processing and scoring ran as 2 shards (ParallelFor), gathered."""
    (run,) = (out / "kfp").glob("lastmile-*")
    test_path = next(run.glob("filter-data/data")) / "test.jsonl"
    test_ids = [json.loads(line)["id"] for line in test_path.open()]
    for stage in ("generate_base", "generate_rl", "postprocess_mle", "score"):
        summary = json.loads((out / "summaries" / f"{stage}.json").read_text())
        assert summary["shards"] == 2 and len(summary["shard_seconds"]) == 2, stage
    for variant in VARIANTS:
        gathered = (out / "predictions" / f"{variant}.jsonl").read_text().splitlines()
        assert [json.loads(line)["id"] for line in gathered] == test_ids, variant


def _check_cost_model(out: Path, tmp_path: Path) -> None:
    """bench/scaling.py --runs reads the finished sharded run (the figures its own runs give:
    every stage, per-shard tasks, finite seconds per example)."""
    figures = tmp_path / "scaling.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "scaling.py"), "--runs",
                           str(out), "--json", str(figures)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "machine cpu=" in done.stdout and "s per example, 2 shards" in done.stdout
    result = json.loads(figures.read_text())  # strict JSON: no NaN was written
    (run,) = result["runs"]
    assert (run["shards"], run["planned_shards"], run["test"]) == (2, 2, 8), run
    assert run["train"] == 28 and run["wall_seconds"] > run["stages"]["train_ppo"]["seconds"]
    assert set(run["stages"]) == {"filter_data", "negatives", "train_reward", "train_mle",
                                  "train_ppo", "generate_base", "generate_mle", "generate_rl",
                                  "postprocess_base", "postprocess_mle", "score"}
    for stage in ("generate_base", "generate_rl", "postprocess_mle", "score"):
        assert run["stages"][stage]["tasks"] == 2, stage
    assert run["stages"]["train_reward"]["unit"] == "train"
    assert run["stages"]["generate_rl"]["examples"] == 8
    per_example = [s["seconds_per_example"] for s in run["stages"].values()]
    assert all(math.isfinite(x) and x >= 0 for x in per_example), run["stages"]


def _check_same_results(sharded: Path, unsharded: Path) -> None:
    """Same seed, same data: the same predictions, byte for byte, and the same scores (the
    embedding model's batches differ with the shards: float rounding only)."""
    for variant in VARIANTS:
        assert (sharded / "predictions" / f"{variant}.jsonl").read_bytes() == (
            unsharded / "predictions" / f"{variant}.jsonl").read_bytes(), variant
    a = json.loads((sharded / "scores.json").read_text())
    b = json.loads((unsharded / "scores.json").read_text())
    assert a["notes"] == b["notes"] and set(a["models"]) == set(b["models"])
    for variant, values in a["models"].items():
        for key, value in values.items():
            other = b["models"][variant][key]
            if key in ("semantic_similarity", "bleurt") and value is not None:
                assert value == pytest.approx(other, rel=1e-6), (variant, key)
            else:
                assert value == other, (variant, key)


def _score_metrics(out: Path) -> dict:
    """The KFP metrics the gather step logged (kfp.local records them in its executor output)."""
    (path,) = (out / "kfp").glob("lastmile-*/gather/executor_output.json")
    (metrics,) = json.loads(path.read_text())["artifacts"]["metrics"]["artifacts"]
    return metrics["metadata"]


@pytest.mark.e2e
def test_smoke_pipeline_end_to_end(smoke_runs, tmp_path):
    """The sharded run (conftest.smoke_runs): what its user saw, its report, shards, cost
    table and KFP metrics; then the unsharded run of the same rows from the user's side of
    the door (CSV files with their own column names): training reruns identically and one
    shard gathers to what two did."""
    out = smoke_runs.sharded
    assert f"report: {out / 'report.html'}" in smoke_runs.printed
    _check_console(out, smoke_runs.printed, smoke_runs.errors)
    scores = _check_report(out)
    _check_sharded(out)
    _check_cost_model(out, tmp_path)
    # Every number of scores.json is a KFP metric, named <variant>_<key>.
    metrics = _score_metrics(out)
    expected = {f"{v}_{k}" for v, values in scores["models"].items() for k, x in values.items()
                if isinstance(x, (int, float))}
    assert set(metrics) == expected and len(expected) >= 5 * 20, sorted(set(metrics) ^ expected)
    assert metrics["rl_rougeL_f1"] == scores["models"]["rl"]["rougeL_f1"]
    config = json.loads((smoke_runs.unsharded / "config.json").read_text())
    assert config["data"]["input_column"] == "description", config["data"]
    _check_same_results(out, smoke_runs.unsharded)


# ----------------------------------------------------------------------------- S3

@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """The server's credentials in the environment (the kfp.local steps inherit it), a bucket."""
    from lastmile import storage

    for name in [n for pair in storage.CREDENTIAL_VARS for n in pair] + [
            storage.CREDENTIALS_DIR_VAR, *storage.ENDPOINT_VARS, storage.SECURE_VAR]:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LASTMILE_S3_RETRIES", "2")
    monkeypatch.setenv("LASTMILE_S3_BACKOFF", "0.1")
    bucket = f"e2e-{int(time.time() * 1000) % 10**9}"
    s3_server.client().make_bucket(bucket)
    return s3_server, bucket


def _assert_no_secret(secret: str, logs: str, run_dir: Path) -> None:
    """The run used credentials: the secret key is in no log line and no file it wrote."""
    assert "lastmile" in logs  # the steps' output was captured at all
    assert secret not in logs
    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".md", ".html", ".txt", ".log"):
            assert secret not in path.read_text(errors="replace"), path


def _upload_smoke_data(server, bucket: str, rows: dict[str, int]) -> None:
    """The first rows of the bundled data set, one object per split, under data/."""
    for split, n in rows.items():
        with gzip.open(DATASET / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
            lines = [line for _, line in zip(range(n), f)]
        server.put(bucket, f"data/{split}.jsonl", "".join(lines).encode("utf-8"))


@pytest.mark.e2e
def test_smoke_pipeline_from_s3_publishes_then_skips_unchanged_data(s3_bucket, tmp_path, capfd):
    import pipeline
    from lastmile import freshness, storage

    server, bucket = s3_bucket
    _upload_smoke_data(server, bucket, {"train": 60, "test": 20})
    data, runs = f"s3://{bucket}/data/", f"s3://{bucket}/runs/"

    out = tmp_path / "first"
    assert pipeline.main(["run", "--profile", "smoke", "--data", data, "--publish", runs,
                          "--out", str(out)]) == 0
    captured = capfd.readouterr()  # every step's log too: kfp.local runs them as subprocesses
    printed = captured.out
    _assert_no_secret(server.secret_key, captured.out + captured.err, out)
    scores = _check_report(out)
    (name,) = storage.list_runs(runs)
    assert freshness.RUN_NAME.match(name)
    assert f"published: {runs}{name}/" in printed

    # The published run, read back: adapters, scores.json and the report, and the fingerprint.
    manifest = storage.read_manifest(f"{runs}{name}/")
    paths = {f["path"] for f in manifest["files"]}
    assert {"scores.json", "report/report.md", "report/report.html", "report/scores.json",
            "ppo/adapter/adapter_config.json", "mle/adapter/adapter_config.json"} <= paths, paths
    assert any(re.fullmatch(r"ppo/adapter/.*\.safetensors", p) for p in paths), paths
    assert any(re.fullmatch(r"mle/adapter/.*\.safetensors", p) for p in paths), paths
    assert any(p.startswith("ppo/value_adapter/") for p in paths), paths
    fingerprint = manifest["metadata"]["fingerprint"]
    filtered = json.loads((out / "summaries" / "filter_data.json").read_text())
    assert filtered["source"] == data and filtered["rows_out"] == {"train": 28, "test": 8}
    assert fingerprint["data_sha256"] == filtered["data_sha256"]
    assert fingerprint["base_model"] == "tiny-random" and fingerprint["data_source"] == data
    local = storage.read_published(f"{runs}{name}/", tmp_path / "read-back")
    assert json.loads((local / "scores.json").read_text()) == scores
    assert (local / "report" / "report.md").read_text() == (out / "report.md").read_text()

    # Same data, base model and configuration: the second run ends early and says so.
    again = tmp_path / "second"
    started = time.monotonic()
    assert pipeline.main(["run", "--profile", "smoke", "--data", data, "--publish", runs,
                          "--out", str(again)]) == 0
    seconds = time.monotonic() - started
    captured = capfd.readouterr()
    printed = captured.out
    _assert_no_secret(server.secret_key, captured.out + captured.err, again)
    assert f"no new data: no new data under {data} since run {name}" in printed
    assert "force=true" in printed
    assert (again / "no-new-data.md").is_file() and not (again / "report.html").exists()
    assert not list((again / "kfp").glob("lastmile-*/train-*"))  # no training step ran
    assert storage.list_runs(runs) == [name]  # nothing new published
    assert seconds < 120, seconds  # resolve, filter, check, skip: no model is trained
    print(f"skipped run took {seconds:.1f} s", file=sys.stderr)
