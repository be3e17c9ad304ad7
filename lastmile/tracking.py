"""Experiment tracking: TensorBoard curves beside every training stage, MLflow when asked.

TensorBoard (always). Each training stage (reward model, MLE, PPO) writes its per-step log
rows (the same rows as train_log.jsonl / ppo_log.jsonl) as scalars `<stage>/<key>` into
`<stage output>/tensorboard/`, flushed every step. A stage output is a KFP artifact, so the
event files land in object storage with it and a TensorBoard pointed at the run's folder
(`tensorboard --logdir runs/<timestamp>/kfp`, Kubeflow's TensorBoards app on the s3:// path)
shows every stage side by side (docs/tracking.md).

MLflow (only when MLFLOW_TRACKING_URI is set; otherwise mlflow is never imported). One MLflow
run per pipeline run, in the experiment MLFLOW_EXPERIMENT_NAME (default "lastmile"):
  * each training stage logs its configuration as parameters `<stage>.<field>` (flattened
    dataclass) and every step row as metrics `<stage>/<key>` at step = the row's step;
  * the report stage (`log_report`) logs the whole resolved configuration (keys a stage
    already logged keep the stage's value, e.g. its task-scoped checkpoint_dir), the final
    scores (Tables 1-2, `scores/<variant>_<metric>`, the names of the KFP metrics), the
    reward model's held-out accuracy, the report files as artifacts under report/, and ends
    the run (FINISHED).

How stages in separate pods find the same MLflow run: they agree on a *pipeline-run key* and
the run carries it as tag `lastmile.pipeline_run` (also its name). The key is, in order:
MLFLOW_RUN_ID (MLflow's own variable: log to that existing run), LASTMILE_TRACKING_RUN, else
read from the stage's output path: KFP lays artifacts out as
`<pipeline root>/<pipeline>/<run UUID>/<task>/...` on a cluster and
`<pipeline root>/<pipeline>-<YYYY-MM-DD-HH-MM-SS-ffffff>/<task>/...` under kfp.local, so the
first path part that is a UUID or such a name identifies the pipeline run. A stage run outside
a pipeline (no key) gets an MLflow run of its own. The first stage to arrive creates the run.
MLflow has no create-if-absent, so two stages arriving at once may both create one: a creator
searches again every `SETTLE_SECONDS` until two searches in a row, its own run among them, name
the same earliest run (start time, then id), keeps that one and deletes its own if it lost. One
search is not enough: a run's start time is stamped by its client, so on a loaded machine a
create stamped first can reach the server after another creator's search saw only its own run
(seen with four creators in one process under a parallel test suite). Two agreeing searches pick
one run as long as the pods' clocks agree and no create takes longer than 2 x `SETTLE_SECONDS`
from its stamp to the server (one search tolerated half that). Metric names carry the stage, so
stages never overwrite each other.

Failures never stop training: an unreachable or failing tracking server is reported once per
stage (a warning) and MLflow logging is off for the rest of that stage. HTTP retries are kept
short unless set (MLFLOW_HTTP_REQUEST_MAX_RETRIES=2, MLFLOW_HTTP_REQUEST_TIMEOUT=20 s), so a
server that is down costs seconds, not MLflow's default minutes of backoff.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
EXPERIMENT = "lastmile"
RUN_TAG = "lastmile.pipeline_run"
ENV_URI = "MLFLOW_TRACKING_URI"
ENV_RUN_ID = "MLFLOW_RUN_ID"
ENV_KEY = "LASTMILE_TRACKING_RUN"
ENV_EXPERIMENT = "MLFLOW_EXPERIMENT_NAME"
#: Bounded HTTP retries for the MLflow client (its defaults back off for minutes).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
#: MLflow's limits (3.x): 6000 characters per parameter value, 100 parameters per call.
MAX_PARAM_VALUE = 6000
PARAMS_PER_CALL = 100
#: How long a stage that created the pipeline run's MLflow run waits between the searches that
#: check no other stage created one at the same moment (`_find_or_create`), and how many it makes
#: at most before it keeps the earliest it saw last.
SETTLE_SECONDS = 1.0
MAX_SETTLE_SEARCHES = 10

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_LOCAL_RUN = re.compile(r".+-\d{4}-\d{2}-\d{2}-\d{2}-\d{2}-\d{2}-\d{6}")  # kfp.local's


# ----------------------------------------------------------------------------- names

def stage_name(desc: str) -> str:
    """The metric prefix of a stage from its description: "reward model" -> "reward",
    "MLE" -> "mle", "PPO" -> "ppo" (the Profile's field names for the same stages)."""
    words = desc.split()
    return re.sub(r"\W+", "_", words[0].lower()) if words else "train"


def pipeline_run_key(path: str | os.PathLike | None = None) -> str | None:
    """The pipeline run a stage writing under `path` belongs to (see the module docstring):
    LASTMILE_TRACKING_RUN, else the first path part that is a KFP run UUID or a kfp.local
    run folder, else None."""
    explicit = os.environ.get(ENV_KEY, "").strip()
    if explicit:
        return explicit
    if path is None:
        return None
    for part in Path(os.path.abspath(path)).parts:
        if _UUID.fullmatch(part) or _LOCAL_RUN.fullmatch(part):
            return part
    return None


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """A (nested) dataclass or mapping as {"a.b.c": text}: strings as they are, anything else
    as JSON (None -> "null", tuples -> lists), the way MLflow shows parameters."""
    if is_dataclass(config) and not isinstance(config, type):
        config = asdict(config)
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if is_dataclass(value) and not isinstance(value, type):
            value = asdict(value)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value)
    return flat


def step_metrics(row: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, {key: value}) of one step-log row: its step ("step", or PPO's "update") and
    every finite number in it (booleans as 0/1; lists, text and nulls left out)."""
    step = row.get("step", row.get("update"))
    if not isinstance(step, int):
        raise ValueError(f"step-log row has no integer step/update: {sorted(row)}")
    values = {}
    for key, value in row.items():
        if key in ("step", "update") or not isinstance(value, (bool, int, float)):
            continue
        if math.isfinite(value):
            values[key] = float(value)
    return step, values


# ----------------------------------------------------------------------------- one stage

class StageTracker:
    """The curves of one training stage: TensorBoard in `out_dir`/tensorboard/, and the
    pipeline run's MLflow run when MLFLOW_TRACKING_URI is set.

    `log(row)` takes each step-log row; `replayed=True` marks the rows a resumed stage
    re-reads from its checkpoint: they go to TensorBoard (its files start afresh, like the
    step log) but not again to MLflow, which already has them from the attempt that ran them.
    """

    def __init__(self, stage: str, out_dir: str | os.PathLike, config: Any = None):
        self.stage = stage
        self.out_dir = Path(out_dir)
        self.tensorboard = _TensorBoard(self.out_dir / TENSORBOARD_DIR, stage, config)
        self.mlflow = MLflowRun.open(self.out_dir, f"{stage} stage") if enabled() else None
        if self.mlflow is not None:
            self.mlflow.set_tags({f"lastmile.{stage}.output": str(self.out_dir)})
            if config is not None:
                self.mlflow.log_params(flatten(config, stage))

    def log(self, row: Mapping[str, Any], replayed: bool = False) -> None:
        step, values = step_metrics(row)
        self.tensorboard.log(step, values)
        if self.mlflow is not None and not replayed:
            self.mlflow.log_metrics({f"{self.stage}/{k}": v for k, v in values.items()}, step)

    def close(self) -> None:
        self.tensorboard.close()


class _TensorBoard:
    """Scalars `<stage>/<key>` in an event file of its own folder, flushed every step."""

    def __init__(self, folder: Path, stage: str, config: Any):
        from torch.utils.tensorboard import SummaryWriter

        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("events.out.tfevents.*"):  # a rerun starts afresh (StepLog)
            old.unlink()
        self.stage = stage
        self.writer = SummaryWriter(log_dir=str(folder))
        if config is not None:  # the settings beside the curves (TensorBoard's Text tab)
            text = json.dumps(flatten(config, stage), indent=1)
            self.writer.add_text(f"{stage}/config", "    " + text.replace("\n", "\n    "))

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{self.stage}/{key}", value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# ----------------------------------------------------------------------------- MLflow

def enabled() -> bool:
    """MLflow tracking is on: MLFLOW_TRACKING_URI is set (and not empty)."""
    return bool(os.environ.get(ENV_URI, "").strip())


class MLflowRun:
    """One process's handle on the pipeline run's MLflow run. Every call is guarded: the
    first failure is logged as a warning and turns this handle off (`broken`)."""

    def __init__(self, what: str):
        self.what = what  # who logs, for the warning ("reward stage", "report")
        self.broken = False
        self.client = None
        self.run_id: str | None = None

    @classmethod
    def open(cls, path: str | os.PathLike | None, what: str) -> "MLflowRun":
        """The run of the pipeline run `path` belongs to (found or created)."""
        handle = cls(what)
        handle._guard(handle._connect, path)
        return handle

    def _connect(self, path) -> None:
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(os.environ[ENV_URI].strip())
        given = os.environ.get(ENV_RUN_ID, "").strip()
        if given:
            self.run_id = self.client.get_run(given).info.run_id
            return
        experiment = _experiment_id(self.client, os.environ.get(ENV_EXPERIMENT) or EXPERIMENT)
        key = pipeline_run_key(path)
        if key is None:  # not in a pipeline: a run of this stage alone
            name = f"{Path(path).name if path else 'lastmile'}-{time.strftime('%Y%m%d-%H%M%S')}"
            self.run_id = self.client.create_run(experiment, run_name=name).info.run_id
        else:
            self.run_id = _find_or_create(self.client, experiment, key)

    def _guard(self, fn, *args) -> Any:
        if self.broken:
            return None
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - tracking never stops training
            self.broken = True
            log.warning("MLflow tracking at %s failed for the %s (%s: %s); MLflow logging is "
                        "off for the rest of it, training goes on", os.environ.get(ENV_URI),
                        self.what, type(e).__name__, e)
            return None

    def log_metrics(self, values: Mapping[str, float], step: int = 0) -> None:
        def call():
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[
                Metric(key, float(value), now, step) for key, value in values.items()])
        if values:
            self._guard(call)

    def log_params(self, params: Mapping[str, str]) -> None:
        """Parameters not logged yet (MLflow refuses to change one: the first value stays)."""
        def call():
            from mlflow.entities import Param

            known = self.client.get_run(self.run_id).data.params
            new = [Param(k, str(v)[:MAX_PARAM_VALUE]) for k, v in params.items()
                   if k not in known]
            for i in range(0, len(new), PARAMS_PER_CALL):
                self.client.log_batch(self.run_id, params=new[i: i + PARAMS_PER_CALL])
        self._guard(call)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        def call():
            from mlflow.entities import RunTag

            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self._guard(call)

    def log_artifacts(self, files: list[Path], artifact_path: str) -> None:
        """Upload files; a failure here (e.g. an s3:// artifact root without boto3 on this
        side) is warned about but leaves the run usable for what follows."""
        if self.broken:
            return
        try:
            for f in files:
                self.client.log_artifact(self.run_id, str(f), artifact_path)
        except Exception as e:  # noqa: BLE001 - tracking never stops the pipeline
            log.warning("MLflow: the %s could not upload %s (%s: %s); the files stay in the "
                        "KFP artifact", self.what, artifact_path, type(e).__name__, e)

    def finish(self) -> None:
        self._guard(lambda: self.client.set_terminated(self.run_id, "FINISHED"))


def _experiment_id(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - another stage created it meanwhile
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _find_or_create(client, experiment: str, key: str) -> str:
    """The run tagged with `key`; created when none is (see the module docstring's race)."""
    quoted = key.replace("\\", "\\\\").replace("'", "\\'")
    query = f"tags.`{RUN_TAG}` = '{quoted}'"

    def search():
        return client.search_runs([experiment], query, max_results=50)

    def earliest(runs) -> str:
        return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id

    found = search()
    if found:
        return earliest(found)
    mine = client.create_run(experiment, run_name=key, tags={RUN_TAG: key}).info.run_id
    winner = None
    for _ in range(MAX_SETTLE_SEARCHES):
        time.sleep(SETTLE_SECONDS)  # a creator that started with us has created its run by now
        runs = search()
        if mine not in {r.info.run_id for r in runs}:
            continue  # our own create is not visible yet, so maybe not every earlier one
        first = earliest(runs)
        if first == winner:  # two searches in a row agree
            break
        winner = first
    if winner is not None and winner != mine:
        client.delete_run(mine)
        return winner
    return mine


# ----------------------------------------------------------------------------- report

#: The report folder's files that go to MLflow (the predictions/ and summaries/ folders stay
#: in the KFP artifact: they can be large and the report shows what matters in them).
REPORT_FILES = ("report.html", "report.md", "scores.json", "rm_eval.json", "config.json",
                "run_info.json", "ppo_log.jsonl")


def log_report(report_dir: str | os.PathLike, config: str | Mapping | None = None) -> None:
    """The report stage's part: the resolved configuration (`config`: the run's Profile as
    JSON or a dict), the final scores, the reward model's held-out accuracy and the report
    files, to the pipeline run's MLflow run, which it then marks FINISHED. Nothing without
    MLFLOW_TRACKING_URI; never raises for a tracking failure (a warning instead)."""
    if not enabled():
        return
    out = Path(report_dir)
    run = MLflowRun.open(out, "report stage")
    found = run._guard(_report_items, out, config)  # a bad file warns like a bad server
    if found is None:
        return
    params, metrics, files = found
    run.log_params(params)
    run.log_metrics(metrics)
    run.log_artifacts(files, "report")
    run.finish()


def _report_items(out: Path, config: str | Mapping | None
                  ) -> tuple[dict[str, str], dict[str, float], list[Path]]:
    """What `log_report` sends: parameters, final metrics, report files."""
    from . import results

    if isinstance(config, str):
        config = json.loads(config)
    params = flatten(config) if config is not None else {}
    metrics: dict[str, float] = {}
    scores = out / "scores.json"
    if scores.is_file():
        found = results.metric_items(json.loads(scores.read_text(encoding="utf-8")))
        metrics.update({f"scores/{k}": v for k, v in found.items()})
    rm_eval = out / "rm_eval.json"
    if rm_eval.is_file():
        accuracy = json.loads(rm_eval.read_text(encoding="utf-8")).get("accuracy", {})
        metrics.update({f"reward/eval_accuracy_{k}": float(v) for k, v in accuracy.items()})
    files = [out / name for name in REPORT_FILES if (out / name).is_file()]
    return params, metrics, files + sorted(out.glob("*.png"))
