"""Experiment tracking (lastmile.tracking): TensorBoard curves beside each training stage and
one MLflow run per pipeline run, checked against a real MLflow tracking server started here
(SQLite backend, loopback port) and read back with MlflowClient."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from lastmile import mle, ppo, reward, results, tracking
from lastmile.config import (LoraSpec, MLEConfig, PPOConfig, RewardConfig, get_profile,
                             profile_to_json)
from lastmile.io import read_jsonl, write_json, write_jsonl
from lastmile.train_utils import StepLog
from s3server import _die_with_parent, free_ports

RUN = "lastmile-2026-12-06-23-39-46-529909"  # a kfp.local pipeline-run folder name
KFP_RUN = "3f2b8c1e-9a4d-4e7b-8c2a-1d5e6f7a8b9c"  # a KFP run UUID


# ----------------------------------------------------------------------------- the server

class MlflowServer:
    """`mlflow server` with a SQLite store in `root`, on a free loopback port."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_ports(1)[0]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> None:
        command = [sys.executable, "-m", "mlflow", "server",
                   "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                   "--default-artifact-root", str(self.root / "artifacts"),
                   "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        # No background job runner (MLflow's GenAI jobs): one process less to start and stop.
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with open(self.log_path, "ab") as log:
            # Its own process group: the uvicorn workers it spawns stop with it.
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:  # not listening yet
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the server's process group, SIGKILL to whatever is left after `grace`."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = time.perf_counter()
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    srv.start()
    srv.start_seconds = time.perf_counter() - started
    yield srv
    srv.stop()


def _clean_env(monkeypatch) -> None:
    """No run id or key from outside; the HTTP settings tracking sets itself (setdefault) are
    restored after the test (set-then-delete makes monkeypatch remember the original)."""
    monkeypatch.setenv("LASTMILE_NO_PROGRESS", "1")
    for name in ("MLFLOW_RUN_ID", tracking.ENV_KEY, *tracking.HTTP_DEFAULTS):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.fixture
def mlflow_env(server, monkeypatch, request):
    """MLFLOW_TRACKING_URI at the server, an experiment of this test's own."""
    _clean_env(monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", request.node.name)
    from mlflow.tracking import MlflowClient

    return MlflowClient(server.uri)


def _runs(client, experiment: str):
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


# ----------------------------------------------------------------------------- stage data

def _prompt(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def _train_rows(tokenizer, n: int) -> list[dict]:
    return [{"id": str(i), "input": f"package {i} parses config files",
             "prompt": _prompt(tokenizer, f"Summarize: package {i} parses config files."),
             "output": f"config parser {i}"} for i in range(n)]


def _reward_rows(tokenizer, n: int) -> list[dict]:
    rows = []
    for row in _train_rows(tokenizer, n):
        common = dict(source_id=row["id"], input=row["input"], prompt=row["prompt"])
        rows.append(dict(common, id=row["id"], output=row["output"], label=1.0, weight=1.0,
                         category="true"))
        rows.append(dict(common, id=row["id"] + "-r", output="zebra zebra", label=0.0,
                         weight=0.5, category="random_tokens"))
    return rows


def _log(path: Path) -> list[dict]:
    return list(read_jsonl(path))


def _expected(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} of a step log, as tracking.step_metrics reads each row."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        step, values = tracking.step_metrics(row)
        for key, value in values.items():
            series.setdefault(key, []).append((step, value))
    return series


def _tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _assert_tensorboard_equals_log(out: Path, stage: str, rows: list[dict]) -> None:
    """Every numeric log column is a TensorBoard scalar `<stage>/<key>` with the same steps
    and the same values (stored as float32 by TensorBoard)."""
    expected = _expected(rows)
    assert expected, "the log has no numeric column"
    found = _tensorboard(out / tracking.TENSORBOARD_DIR)
    assert set(found) == {f"{stage}/{k}" for k in expected}
    for key, series in expected.items():
        got = found[f"{stage}/{key}"]
        assert [s for s, _ in got] == [s for s, _ in series], key
        assert [v for _, v in got] == [float(np.float32(v)) for _, v in series], key


# ----------------------------------------------------------------------------- pure parts

def test_pipeline_run_key_from_kfp_layouts_and_env(monkeypatch):
    monkeypatch.delenv(tracking.ENV_KEY, raising=False)
    local = f"/work/runs/20261206/kfp/{RUN}/train-reward/reward_model"
    cluster = f"/s3/mlpipeline/v2/artifacts/lastmile/{KFP_RUN}/train-ppo/" \
              "0a1b2c3d-0000-4000-8000-000000000000/ppo_model"  # the launcher's salt folder
    assert tracking.pipeline_run_key(local) == RUN
    assert tracking.pipeline_run_key(f"/work/runs/20261206/kfp/{RUN}/report/report_dir") == RUN
    assert tracking.pipeline_run_key(cluster) == KFP_RUN  # the first UUID: the run, not salt
    assert tracking.pipeline_run_key("/tmp/some/stage_out") is None
    monkeypatch.setenv(tracking.ENV_KEY, "nightly-42")
    assert tracking.pipeline_run_key(local) == "nightly-42"


def test_flatten_and_step_metrics():
    flat = tracking.flatten(PPOConfig(), "ppo")
    assert flat["ppo.policy_lora.r"] == "32" and flat["ppo.optim.learning_rate"] == "1e-05"
    assert flat["ppo.checkpoint_dir"] == "null" and flat["ppo.whiten_advantages"] == "false"
    assert flat["ppo.policy_lora.target_modules"] == "all-linear"
    flat = tracking.flatten(get_profile("smoke"))
    assert flat["reward.lora.r"] == str(get_profile("smoke").reward.lora.r)
    assert json.loads(flat["negatives.categories"]) == list(get_profile("smoke").negatives
                                                            .categories)
    skipped = {"step": 4, "loss": None, "lr": 1e-5, "rows": 7, "skipped": True,
               "nonfinite": ["loss"], "ids": ["a"], "batch_kind": "sampled"}
    assert tracking.step_metrics(skipped) == (4, {"lr": 1e-5, "rows": 7.0, "skipped": 1.0})
    assert tracking.step_metrics({"update": 2, "reward_mean": 0.5}) == (2, {"reward_mean": 0.5})
    with pytest.raises(ValueError, match="no integer step"):
        tracking.step_metrics({"loss": 1.0})
    assert [tracking.stage_name(d) for d in ("reward model", "MLE", "PPO")] == \
        ["reward", "mle", "ppo"]


def test_without_a_tracking_uri_tensorboard_only_and_mlflow_never_imported(tmp_path):
    """Off and zero-cost: a stage's step log in a fresh process imports no mlflow."""
    script = textwrap.dedent(f"""
        import sys
        from lastmile.train_utils import StepLog
        log = StepLog({str(tmp_path / "out" / "train_log.jsonl")!r}, stage="MLE")
        for step in (1, 2, 3):
            log.write({{"step": step, "loss": 1.0 / step, "lr": 1e-5}})
        log.close()
        print("mlflow imported:", "mlflow" in sys.modules)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "mlflow imported: False" in done.stdout
    rows = _log(tmp_path / "out" / "train_log.jsonl")
    _assert_tensorboard_equals_log(tmp_path / "out", "mle", rows)


# ----------------------------------------------------------------------------- MLflow

def test_stages_and_report_share_one_mlflow_run(server, mlflow_env, tokenizer, tmp_path,
                                                request):
    """Reward, MLE and PPO stages (real training on the tiny Llama) in kfp.local's layout and
    the report stage's `log_report` all land in one MLflow run: the stage configurations as
    parameters, every step-log column as a metric history equal to the log, the scores and
    the report files; each stage's TensorBoard files equal its log too."""
    client = mlflow_env
    run_dir = tmp_path / "kfp" / RUN
    data = run_dir / "filter-data" / "data"
    write_jsonl(data / "train.jsonl", _train_rows(tokenizer, 4))
    write_jsonl(run_dir / "negatives" / "rm.jsonl", _reward_rows(tokenizer, 4))
    outs = {"reward": run_dir / "train-reward" / "reward_model",
            "mle": run_dir / "train-mle" / "mle_model",
            "ppo": run_dir / "train-ppo" / "ppo_model"}
    reward_cfg = RewardConfig(lora=LoraSpec(r=4, alpha=4), batch_size=4, max_steps=2,
                              checkpoint_every=0)
    mle_cfg = MLEConfig(lora=LoraSpec(r=4, alpha=8), batch_size=2, max_steps=2)
    ppo_cfg = PPOConfig(policy_lora=LoraSpec(r=4, alpha=8), value_lora=LoraSpec(r=4, alpha=8),
                        batch_size=2, max_new_tokens=4, max_updates=2)
    started = time.perf_counter()
    reward.train_reward_model(run_dir / "negatives" / "rm.jsonl", outs["reward"], reward_cfg,
                              "tiny-random")
    mle.train_mle(data / "train.jsonl", outs["mle"], mle_cfg, "tiny-random")
    ppo.train_ppo(data / "train.jsonl", outs["reward"] / "adapter", outs["ppo"], ppo_cfg,
                  "tiny-random")
    train_seconds = time.perf_counter() - started

    report_dir = run_dir / "report" / "report_dir"
    scores = {"models": {"rl": {"n": 4, "excess_length": 1.25, "la_rougeL_f1": 0.232,
                                "bleurt": None},
                         "mle": {"n": 4, "excess_length": 3.5, "la_rougeL_f1": 0.201}}}
    write_json(report_dir / "scores.json", scores)
    write_json(report_dir / "rm_eval.json", {"accuracy": {"random_tokens": 0.75}})
    (report_dir / "report.md").write_text("# Report\n\n| variant | la-ROUGE-L |\n")
    (report_dir / "report.html").write_text("<html><body><h1>Report</h1></body></html>")
    profile = get_profile("smoke")
    tracking.log_report(report_dir, profile_to_json(profile))

    runs = _runs(client, request.node.name)
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = client.get_run(runs[0].info.run_id)
    assert run.info.run_name == RUN and run.data.tags[tracking.RUN_TAG] == RUN
    assert run.info.status == "FINISHED"
    params = run.data.params
    # The stages' own settings (they ran with them) beside the whole resolved profile.
    assert params["reward.batch_size"] == "4" and params["reward.lora.r"] == "4"
    assert params["mle.optim.learning_rate"] == "1e-05" and params["ppo.max_new_tokens"] == "4"
    assert params["base_model"] == profile.base_model
    assert params["generate.max_new_tokens"] == str(profile.generate.max_new_tokens)
    assert params["data.instruction"] == profile.data.instruction
    assert run.data.tags["lastmile.ppo.output"] == str(outs["ppo"])

    logs = {"reward": _log(outs["reward"] / "train_log.jsonl"),
            "mle": _log(outs["mle"] / "train_log.jsonl"),
            "ppo": _log(outs["ppo"] / "ppo_log.jsonl")}
    assert [len(rows) for rows in logs.values()] == [2, 2, 2]
    for stage, rows in logs.items():
        for key, series in _expected(rows).items():
            history = client.get_metric_history(run.info.run_id, f"{stage}/{key}")
            assert sorted((m.step, m.value) for m in history) == series, (stage, key)
        _assert_tensorboard_equals_log(outs[stage], stage, rows)
    assert {"ppo/reward_mean", "ppo/response_length_mean", "reward/grad_norm",
            "mle/lr"} <= set(run.data.metrics)

    for name, value in results.metric_items(scores).items():
        assert run.data.metrics[f"scores/{name}"] == value
    assert "scores/rl_bleurt" not in run.data.metrics  # None: not computed
    assert run.data.metrics["reward/eval_accuracy_random_tokens"] == 0.75
    listed = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "report")}
    assert listed == {"report.md", "report.html", "scores.json", "rm_eval.json"}
    got = Path(client.download_artifacts(run.info.run_id, "report/report.html",
                                         str(tmp_path / "dl")))
    assert got.read_bytes() == (report_dir / "report.html").read_bytes()
    print(f"\nmlflow server start {server.start_seconds:.1f} s; three stages with "
          f"tracking {train_seconds:.1f} s", file=sys.__stderr__)


def test_a_resumed_stage_does_not_log_its_replayed_steps_again(mlflow_env, tmp_path, request):
    """A resume re-reads the log rows up to its checkpoint: TensorBoard gets them again (its
    files start afresh), MLflow, which has them from the first attempt, does not."""
    client = mlflow_env
    out = tmp_path / KFP_RUN / "train-mle" / "mle_model"
    first = StepLog(out / "train_log.jsonl", stage="MLE")
    for step in (1, 2, 3):  # the attempt that stops after step 3; checkpoint at step 2
        first.write({"step": step, "loss": 3.0 - step, "lr": 1e-5})
    first.close()
    again = StepLog(out / "train_log.jsonl", rows=[{"step": s, "loss": 3.0 - s, "lr": 1e-5}
                                                    for s in (1, 2)], stage="MLE")
    again.write({"step": 3, "loss": 0.5, "lr": 1e-5})  # step 3 rerun from the checkpoint
    again.close()
    (run,) = _runs(client, request.node.name)
    history = client.get_metric_history(run.info.run_id, "mle/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 2.0), (2, 1.0), (3, 0.0),
                                                          (3, 0.5)]
    assert _tensorboard(out / tracking.TENSORBOARD_DIR)["mle/loss"] == [(1, 2.0), (2, 1.0),
                                                                        (3, 0.5)]


def test_stages_arriving_together_agree_on_one_run(mlflow_env, tmp_path, request):
    """Four processes' worth of handles opening the same pipeline run at once: one run
    stays (losers of the create race delete theirs) and every handle logs to it."""
    client = mlflow_env
    path = tmp_path / KFP_RUN / "train-reward" / "reward_model"
    handles: list[tracking.MLflowRun] = []
    barrier = threading.Barrier(4)

    def open_one():
        barrier.wait()
        handles.append(tracking.MLflowRun.open(path, "test"))

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(handles) == 4 and not any(h.broken for h in handles)
    assert len({h.run_id for h in handles}) == 1
    (run,) = _runs(client, request.node.name)
    assert run.info.run_id == handles[0].run_id and run.info.run_name == KFP_RUN


def test_a_create_stamped_first_but_landing_late_still_joins_the_one_run(mlflow_env,
                                                                          request):
    """The race a loaded machine produced (the test above failed once under a parallel
    suite): creator `late` stamps its run's start time first, but its create reaches the
    server after `prompt`'s first search saw only its own run (within 2 x SETTLE_SECONDS of
    the stamp, tracking's stated bound). `late`'s run is then the earliest; both creators
    must still end on one run, with the other deleted."""
    from mlflow.tracking import MlflowClient

    client = mlflow_env
    experiment = client.create_experiment(request.node.name)
    key = KFP_RUN
    prompt_searched = threading.Event()

    class LateClient(MlflowClient):
        def create_run(self, experiment_id, start_time=None, **kwargs):
            stamp = int(time.time() * 1000)  # stamped before `prompt` creates its run
            prompt_searched.wait(30)  # lands after prompt's first search, ~1.3 s after its stamp
            return super().create_run(experiment_id, start_time=stamp, **kwargs)

    class PromptClient(MlflowClient):
        def create_run(self, *args, **kwargs):
            time.sleep(0.2)  # after `late` has stamped
            return super().create_run(*args, **kwargs)

        def search_runs(self, *args, **kwargs):
            found = super().search_runs(*args, **kwargs)
            if found:  # its first search after creating: it sees only its own run
                prompt_searched.set()
            return found

    chosen: dict[str, str] = {}

    def open_with(name, cls):
        chosen[name] = tracking._find_or_create(cls(client.tracking_uri), experiment, key)

    threads = [threading.Thread(target=open_with, args=("late", LateClient)),
               threading.Thread(target=open_with, args=("prompt", PromptClient))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert chosen["late"] == chosen["prompt"], chosen
    (run,) = client.search_runs([experiment])
    assert run.info.run_id == chosen["late"]


def test_a_down_server_warns_once_and_training_goes_on(tokenizer, tmp_path, monkeypatch,
                                                       caplog):
    """MLFLOW_TRACKING_URI at a port nobody listens on: the real MLE stage trains, writes its
    adapter and TensorBoard files, and tracking says so once."""
    _clean_env(monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_ports(1)[0]}")
    write_jsonl(tmp_path / "train.jsonl", _train_rows(tokenizer, 4))
    out = tmp_path / "out"
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="lastmile.tracking"):
        summary = mle.train_mle(tmp_path / "train.jsonl", out,
                                MLEConfig(lora=LoraSpec(r=4, alpha=8), batch_size=2,
                                          max_steps=2), "tiny-random")
    assert time.perf_counter() - started < 60
    assert summary["train"]["steps"] == 2 and (out / "adapter" / "adapter_config.json").exists()
    warned = [r for r in caplog.records if r.name == "lastmile.tracking"]
    assert len(warned) == 1 and "training goes on" in warned[0].getMessage()
    _assert_tensorboard_equals_log(out, "mle", _log(out / "train_log.jsonl"))


def test_report_files_that_cannot_be_uploaded_leave_the_run_finished(mlflow_env, tmp_path,
                                                                    request, caplog):
    """An experiment whose artifacts live in s3:// (client-side upload needs boto3, which the
    images do not have): the report's scores still arrive, the upload failure is a warning,
    and the run is still marked FINISHED."""
    client = mlflow_env
    client.create_experiment(request.node.name, artifact_location="s3://nowhere/artifacts")
    report_dir = tmp_path / "kfp" / RUN / "report" / "report_dir"
    write_json(report_dir / "scores.json", {"models": {"rl": {"n": 2, "excess_length": 0.5}}})
    (report_dir / "report.md").write_text("# Report\n")
    with caplog.at_level(logging.WARNING, logger="lastmile.tracking"):
        tracking.log_report(report_dir)
    (run,) = _runs(client, request.node.name)
    assert run.data.metrics == {"scores/rl_n": 2.0, "scores/rl_excess_length": 0.5}
    assert run.info.status == "FINISHED"
    warned = [r.getMessage() for r in caplog.records if r.name == "lastmile.tracking"]
    assert len(warned) == 1 and "could not upload report" in warned[0]
