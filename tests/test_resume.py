"""Resume after preemption: a real training subprocess killed with SIGKILL, then rerun.

Each stage test runs the tiny model in a child process that stops at a chosen point and is
killed there with SIGKILL (MLE: halfway through writing a checkpoint, so a half-written one
is on disk; PPO: in the middle of an update after a checkpoint, so an update's work is lost).
A second child runs the stage again into the same out_dir (it must resume from the last
complete checkpoint) and then once more into a fresh out_dir (the uninterrupted reference).
The adapters must be bit-identical: same process layout, same CPU kernels, and every piece of
state (weights, AdamW, scheduler, torch/Python/NumPy RNGs) restored; PPO's samples come from
streams keyed by the update's number, so the resumed updates draw what the lost ones drew.

With an s3:// checkpoint_dir (a real SeaweedFS server) the local disk is deleted between the
runs, as on a KFP retry that lands on a new pod: the rerun resumes from the object store.
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

from lastmile import checkpoint

# The child: run one stage into each out dir in turn; HANG (first run only) stops it at a
# chosen point and writes HANG_FILE, where the parent kills it. Prints one summary per run.
CHILD = r"""
import json, os, sys, time
from pathlib import Path
from lastmile import checkpoint, mle, ppo
from lastmile.config import LoraSpec, MLEConfig, OptimConfig, PPOConfig

stage, hang, data, reward_dir, *outs = sys.argv[1:]
small = LoraSpec(r=4, alpha=8)

def stop_here():
    Path(os.environ["HANG_FILE"]).write_text("ready")
    time.sleep(600)

if hang == "mid-checkpoint":  # half of step 6's tensors on disk, no COMPLETE
    write = checkpoint._write
    def partial(path, blob):
        if path.parent.name.startswith(".tmp-step-000006") and path.name == checkpoint.TENSORS:
            with open(path, "wb") as f:
                f.write(blob[: len(blob) // 2])
            stop_here()
        return write(path, blob)
    checkpoint._write = partial
elif hang == "mid-update":  # update 6 scored, not yet stepped; update 5 (sampled) not saved
    rollout = ppo.PPOTrainer.rollout
    calls = []
    def counted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            stop_here()
        return rollout(self, *args, **kwargs)
    ppo.PPOTrainer.rollout = counted

for out in outs:
    if stage == "mle":
        cfg = MLEConfig(lora=small, batch_size=2, checkpoint_every=2,
                        optim=OptimConfig(learning_rate=1e-2))
        summary = mle.train_mle(data, out, cfg, "tiny-random")
    else:
        cfg = PPOConfig(policy_lora=small, value_lora=small, batch_size=3, max_new_tokens=6,
                        epochs=3, max_updates=8, checkpoint_every=2,
                        optim=OptimConfig(learning_rate=1e-3))
        summary = ppo.train_ppo(data, reward_dir, out, cfg, "tiny-random")
    print("SUMMARY " + json.dumps(summary), flush=True)
"""


def _env(hang_file: Path) -> dict:
    root = Path(__file__).resolve().parents[1]
    return dict(os.environ, HANG_FILE=str(hang_file), LASTMILE_NO_PROGRESS="1",
                PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _kill_when_stopped(args: list[str], hang_file: Path, timeout: float = 60.0) -> None:
    """Start the child, wait until it reaches its stop point, SIGKILL it."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, *args], env=_env(hang_file),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not hang_file.exists():
            if child.poll() is not None:
                out, err = child.communicate()
                pytest.fail(f"child exited ({child.returncode}) before its stop point:\n"
                            f"{out}\n{err[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("child did not reach its stop point in time")
            time.sleep(0.02)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL


def _run(args: list[str], hang_file: Path) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", CHILD, *args], env=_env(hang_file),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line[len("SUMMARY "):]) for line in done.stdout.splitlines()
            if line.startswith("SUMMARY ")]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_same_files(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        ta, tb = _tensors(a / name), _tensors(b / name)
        assert ta.keys() == tb.keys(), name
        for key in ta:  # exact: the resumed run is the same computation
            assert torch.equal(ta[key], tb[key]), (name, key)


def _log(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:  # wall-clock times differ between runs
        row.pop("seconds", None)
        row.pop("sample_seconds", None)
    return rows


def _rows(tokenizer, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        text = f"package {i} provides tools number {i} for the shell"
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Summarize: " + text}],
                                               add_generation_prompt=True, tokenize=False)
        rows.append({"id": f"r{i}", "input": text, "output": f"tools {i} for shell",
                     "prompt": prompt})
    return rows


# ----------------------------------------------------------------------------- stages

def test_mle_killed_while_writing_a_checkpoint_resumes_from_the_last_complete_one(
        tokenizer, tmp_path):
    from lastmile.io import write_jsonl

    write_jsonl(tmp_path / "train.jsonl", _rows(tokenizer, 16))  # batch 2: 8 steps
    resumed, fresh = tmp_path / "resumed", tmp_path / "fresh"
    base = ["mle", "mid-checkpoint", str(tmp_path / "train.jsonl"), "-"]
    _kill_when_stopped(base + [str(resumed)], tmp_path / "hung")

    ckpts = resumed / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-000002", "step-000004"]
    half = list(ckpts.glob(".tmp-step-000006-*"))  # the torn write, never to be loaded
    assert half and not (half[0] / checkpoint.COMPLETE).exists()
    assert not (resumed / "adapter").exists()

    summaries = _run(["mle", "none", str(tmp_path / "train.jsonl"), "-", str(resumed),
                      str(fresh)], tmp_path / "unused")
    assert summaries[0]["train"]["resumed_from_step"] == 4
    assert summaries[1]["train"]["resumed_from_step"] is None
    assert summaries[0]["train"]["steps"] == summaries[1]["train"]["steps"] == 8
    assert _log(resumed / "train_log.jsonl") == _log(fresh / "train_log.jsonl")
    _assert_same_files(resumed / "adapter", fresh / "adapter", ["adapter_model.safetensors"])
    assert not ckpts.exists()  # deleted once the adapter is written


def test_ppo_killed_mid_update_resumes_with_the_sampling_rng(tokenizer, tmp_path):
    from lastmile.config import LoraSpec
    from lastmile.io import write_jsonl
    from lastmile.modeling import AdapterModel, load_base

    model = AdapterModel(load_base("tiny-random")[0])
    model.add_adapter("reward", LoraSpec(r=4, alpha=8), head=True, seed=1)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(4)
        for p in model.adapter_parameters("reward"):
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    reward_dir = model.save_adapter("reward", tmp_path / "reward")
    write_jsonl(tmp_path / "train.jsonl", _rows(tokenizer, 9))  # batch 3, 3 epochs: 8 updates
    resumed, fresh = tmp_path / "resumed", tmp_path / "fresh"
    args = [str(tmp_path / "train.jsonl"), str(reward_dir)]
    _kill_when_stopped(["ppo", "mid-update", *args, str(resumed)], tmp_path / "hung")

    assert sorted(p.name for p in (resumed / "checkpoints").glob("step-*")) == [
        "step-000002", "step-000004"]
    assert len((resumed / "ppo_log.jsonl").read_text().splitlines()) == 5  # 5 lost on resume

    summaries = _run(["ppo", "none", *args, str(resumed), str(fresh)], tmp_path / "unused")
    assert summaries[0]["resumed_from_step"] == 4 and summaries[1]["resumed_from_step"] is None
    assert summaries[0]["updates"] == summaries[1]["updates"] == 8
    log_resumed, log_fresh = _log(resumed / "ppo_log.jsonl"), _log(fresh / "ppo_log.jsonl")
    assert [r["update"] for r in log_resumed] == list(range(1, 9))
    assert log_resumed == log_fresh  # update 5's samples included: same sampling streams
    _assert_same_files(resumed / "adapter", fresh / "adapter", ["adapter_model.safetensors"])
    _assert_same_files(resumed / "value_adapter", fresh / "value_adapter",
                       ["adapter_model.safetensors", "head.safetensors"])
    assert not (resumed / "checkpoints").exists()


# ----------------------------------------------------------------------------- the files

def _state(step: int) -> dict[str, torch.Tensor]:
    return {"param.00000": torch.full((3,), float(step))}


def test_torn_and_corrupt_checkpoints_are_skipped_and_two_are_kept(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, _state(step), {"x": step})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000003"]
    path, tensors, meta = checkpoint.load_latest(tmp_path)
    assert path.name == "step-000003" and meta == {"x": 3, "step": 3}
    assert torch.equal(tensors["param.00000"], _state(3)["param.00000"])

    blob = path / checkpoint.TENSORS  # flip a byte: the hash no longer matches COMPLETE
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    torn = tmp_path / "step-000004"  # a directory without COMPLETE (e.g. copied by hand)
    torn.mkdir()
    (torn / checkpoint.META).write_text("{}")
    assert checkpoint.load_latest(tmp_path)[0].name == "step-000002"

    checkpoint.clear(tmp_path)
    assert not tmp_path.exists()
    assert checkpoint.load_latest(tmp_path) is None


def test_a_checkpoint_of_another_run_is_not_resumed(tmp_path):
    from lastmile.config import OptimConfig
    from lastmile.train_utils import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer, scheduler = make_optimizer(params, OptimConfig(), 4)
    ckpt = checkpoint.Checkpointer(tmp_path, 1, params, optimizer, scheduler, {"steps": 4})
    ckpt.save(1, {})
    other = checkpoint.Checkpointer(tmp_path, 1, params, optimizer, scheduler, {"steps": 5})
    with pytest.raises(ValueError, match="belongs to another run"):
        other.resume()
    assert checkpoint.Checkpointer(tmp_path, 0, params, optimizer, scheduler,
                                   {"steps": 5}).resume() == (0, {})  # off: nothing read


# ----------------------------------------------------------------------------- object storage

@pytest.fixture
def s3_checkpoints(s3_server, monkeypatch, tmp_path, request):
    """An s3:// checkpoint prefix in a fresh bucket of the test's SeaweedFS server."""
    import re

    from lastmile import storage

    for pair in storage.CREDENTIAL_VARS:
        for name in pair:
            monkeypatch.delenv(name, raising=False)
    for name in (storage.CREDENTIALS_DIR_VAR, *storage.SESSION_TOKEN_VARS,
                 *storage.ENDPOINT_VARS, storage.SECURE_VAR):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LASTMILE_S3_RETRIES", "2")
    monkeypatch.setenv("LASTMILE_S3_BACKOFF", "0.05")
    monkeypatch.setenv("LASTMILE_CACHE", str(tmp_path / "cache"))
    import hashlib

    digest = hashlib.sha256(request.node.name.encode()).hexdigest()[:8]  # parametrized names
    bucket = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:40].strip("-") + \
        f"-{digest}-ckpt"
    s3_server.client().make_bucket(bucket)
    return f"s3://{bucket}/runs/ckpt/"


def _remote(uri: str) -> dict[str, int]:
    from lastmile import storage

    return storage.list_objects(uri)


def _tear(uri: str, source_step: int, torn_step: int, tmp_path: Path) -> None:
    """A remote step-<torn_step>/ holding the files of step <source_step> but no COMPLETE:
    what an upload killed before its marker leaves."""
    from lastmile import storage

    for name in (checkpoint.TENSORS, checkpoint.META):
        local = tmp_path / f"torn-{name}"
        storage.fetch_file(f"{uri}step-{source_step:06d}/{name}", local)
        storage.upload_file(local, f"{uri}step-{torn_step:06d}/{name}")


def test_s3_checkpoints_upload_complete_last_prune_and_resume_on_a_fresh_disk(
        s3_checkpoints, tmp_path):
    from lastmile.config import OptimConfig
    from lastmile.train_utils import make_optimizer

    uri = s3_checkpoints
    root = checkpoint.resolve_dir(tmp_path / "out", uri)
    assert root == checkpoint.RemoteDir(tmp_path / "out" / "checkpoints", uri)
    assert checkpoint.task_scope(uri[:-1], "train_mle", "minio://a/run1/mle") == \
        checkpoint.task_scope(uri, "train_mle", "minio://a/run1/mle") != \
        checkpoint.task_scope(uri, "train_mle", "minio://a/run2/mle")
    assert checkpoint.task_scope(uri, "train_mle", "x").startswith(uri + "train_mle-")
    assert checkpoint.task_scope("/local/dir", "train_mle", "x") == "/local/dir"

    def trainer(seed: float):
        params = [torch.nn.Parameter(torch.full((3,), seed))]
        optimizer, scheduler = make_optimizer(params, OptimConfig(), 8)
        return params, checkpoint.Checkpointer(root, 1, params, optimizer, scheduler,
                                               {"steps": 8})

    params, ckpt = trainer(0.0)
    assert ckpt.resume() == (0, {})
    for step in (1, 2, 3):
        with torch.no_grad():
            params[0].fill_(float(step))
        ckpt.save(step, {"at": step})
    files = {checkpoint.TENSORS, checkpoint.META, checkpoint.COMPLETE}
    assert set(_remote(uri)) == {f"step-{s:06d}/{f}" for s in (2, 3) for f in files}

    # A torn upload past the newest complete one is never read; a fresh disk resumes step 3.
    _tear(uri, 3, 4, tmp_path)
    shutil.rmtree(tmp_path / "out")
    params, ckpt = trainer(-1.0)
    assert ckpt.resume() == (3, {"at": 3})
    assert torch.equal(params[0].detach(), torch.full((3,), 3.0))
    assert sorted(p.name for p in root.local.iterdir()) == ["step-000003"]

    # A remote checkpoint whose bytes do not match its COMPLETE: the older one is used.
    from lastmile import storage

    bad = tmp_path / "bad"
    bad.write_bytes(b"not the tensors")
    storage.upload_file(bad, f"{uri}step-000003/{checkpoint.TENSORS}")
    shutil.rmtree(tmp_path / "out")
    params, ckpt = trainer(-1.0)
    assert ckpt.resume() == (2, {"at": 2})
    assert torch.equal(params[0].detach(), torch.full((3,), 2.0))

    checkpoint.clear(root)  # the stage is done: local and remote checkpoints go
    assert _remote(uri) == {} and not root.local.exists()


def test_s3_checkpoint_resumes_mle_on_a_fresh_disk_like_an_uninterrupted_run(
        s3_checkpoints, tokenizer, tmp_path, monkeypatch):
    """Training stopped after step 6 (checkpoints 2 and 4 uploaded), its local disk lost (a
    KFP retry lands on a new pod): the rerun downloads step 4, ignores a torn step 6, and ends
    bit-identical to a run that was never interrupted."""
    from lastmile import mle
    from lastmile.config import LoraSpec, MLEConfig, OptimConfig
    from lastmile.io import write_jsonl

    uri = s3_checkpoints
    write_jsonl(tmp_path / "train.jsonl", _rows(tokenizer, 16))  # batch 2: 8 steps

    def config(checkpoint_dir):
        return MLEConfig(lora=LoraSpec(r=4, alpha=8), batch_size=2, checkpoint_every=2,
                         checkpoint_dir=checkpoint_dir, optim=OptimConfig(learning_rate=1e-2))

    class Preempted(Exception):
        pass

    save = checkpoint.Checkpointer.save

    def preempted_at_6(self, step, extras):
        if step == 6:
            raise Preempted
        return save(self, step, extras)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", preempted_at_6)
    resumed = tmp_path / "resumed"
    with pytest.raises(Preempted):
        mle.train_mle(tmp_path / "train.jsonl", resumed, config(uri), "tiny-random")
    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    assert {k.split("/")[0] for k in _remote(uri)} == {"step-000002", "step-000004"}

    _tear(uri, 4, 6, tmp_path)
    shutil.rmtree(resumed)  # the pod's disk is gone
    summary = mle.train_mle(tmp_path / "train.jsonl", resumed, config(uri), "tiny-random")
    fresh = mle.train_mle(tmp_path / "train.jsonl", tmp_path / "fresh", config(None),
                          "tiny-random")
    assert summary["train"]["resumed_from_step"] == 4
    assert fresh["train"]["resumed_from_step"] is None
    assert summary["train"]["steps"] == fresh["train"]["steps"] == 8
    assert _log(resumed / "train_log.jsonl") == _log(tmp_path / "fresh" / "train_log.jsonl")
    _assert_same_files(resumed / "adapter", tmp_path / "fresh" / "adapter",
                       ["adapter_model.safetensors"])
    assert _remote(uri) == {}  # deleted once the adapter is written, the torn step too
    assert not (resumed / "checkpoints").exists()


def test_heads_get_their_own_learning_rate_under_the_same_schedule():
    from lastmile.config import OptimConfig
    from lastmile.train_utils import make_optimizer

    lora, head = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(1))
    optimizer, scheduler = make_optimizer([lora, head], OptimConfig(learning_rate=1e-3,
                                                                    head_learning_rate=1e-5),
                                          4, head_params=[head])
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-5]
    assert [g["params"] for g in optimizer.param_groups] == [[lora], [head]]
    optimizer.step()
    scheduler.step()
    scheduler.step()  # cosine: halfway through 4 steps each group is at half its start
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-4, 5e-6])
    plain, _ = make_optimizer([lora, head], OptimConfig(learning_rate=1e-3), 4, head_params=[head])
    assert len(plain.param_groups) == 1  # no head step size: one group, as before
    with pytest.raises(ValueError, match="head_learning_rate must be > 0"):
        make_optimizer([lora, head], OptimConfig(head_learning_rate=-1.0), 4, head_params=[head])


# ----------------------------------------------------------------------------- preempted pods

# A training task as a KFP step runs it: one stage into `out`, checkpoints to an s3:// prefix,
# `processes` data-parallel processes. Prints its summary.
STAGE = r"""
import json, sys
from lastmile import mle, ppo, reward
from lastmile.config import LoraSpec, MLEConfig, OptimConfig, PPOConfig, RewardConfig

stage, data, reward_dir, out, ckpt, processes = sys.argv[1:]
small, ckpt, processes = LoraSpec(r=4, alpha=8), ckpt or None, int(processes)
if stage == "reward":
    cfg = RewardConfig(lora=small, batch_size=6, checkpoint_every=2, checkpoint_dir=ckpt,
                       optim=OptimConfig(learning_rate=1e-2))
    summary = reward.train_reward_model(data, out, cfg, "tiny-random", processes=processes)
elif stage == "mle":
    cfg = MLEConfig(lora=small, batch_size=2, checkpoint_every=2, checkpoint_dir=ckpt,
                    optim=OptimConfig(learning_rate=1e-2))
    summary = mle.train_mle(data, out, cfg, "tiny-random", processes=processes)
else:
    cfg = PPOConfig(policy_lora=small, value_lora=small, batch_size=2, max_new_tokens=6,
                    max_updates=10, checkpoint_every=2, checkpoint_dir=ckpt,
                    optim=OptimConfig(learning_rate=1e-3))
    summary = ppo.train_ppo(data, reward_dir, out, cfg, "tiny-random", processes=processes)
print("SUMMARY " + json.dumps(summary), flush=True)
"""


def _stage_child(args: list[str], env: dict) -> subprocess.Popen:
    # Its own session: a SIGKILL of the group takes the data-parallel workers down with it,
    # as losing the pod does.
    return subprocess.Popen([sys.executable, "-c", STAGE, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def _finish(child: subprocess.Popen) -> dict:
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-3000:]
    (line,) = [line for line in out.splitlines() if line.startswith("SUMMARY ")]
    return json.loads(line[len("SUMMARY "):])


# MLE's resume from the object store on a fresh disk is tested in-process above; PPO with two
# processes covers one (the checkpointing and the kill are the same code for every stage).
@pytest.mark.parametrize("stage, processes", [("reward", 1), ("ppo", 2)])
def test_a_preempted_training_pod_resumes_from_the_object_store_bit_for_bit(
        s3_checkpoints, tokenizer, tmp_path, stage, processes):
    """SIGKILL of the whole task (all its processes) once a checkpoint is in the object store,
    every local file of the run deleted (a KFP retry on a new pod with an empty disk), the same
    command again: it resumes from the s3:// prefix and ends with the adapters of a run that
    was never interrupted (same process count), bit for bit."""
    from lastmile import negatives
    from lastmile.config import NegativesConfig, OptimConfig, RewardConfig
    from lastmile.io import write_jsonl

    uri = s3_checkpoints
    rows = _rows(tokenizer, 16)
    data = tmp_path / ("rm.jsonl" if stage == "reward" else "train.jsonl")
    write_jsonl(data, negatives.synthesize(rows, NegativesConfig(), tokenizer)
                if stage == "reward" else rows)
    reward_dir = tmp_path / "reward" / "adapter"
    if stage == "ppo":  # PPO scores with a (tiny, briefly trained) reward model
        from lastmile import reward

        write_jsonl(tmp_path / "rm.jsonl", negatives.synthesize(rows[:4], NegativesConfig(),
                                                               tokenizer))
        reward.train_reward_model(tmp_path / "rm.jsonl", tmp_path / "reward",
                                  RewardConfig(batch_size=6, max_steps=1, checkpoint_every=0,
                                               optim=OptimConfig(learning_rate=1e-2)),
                                  "tiny-random")
    env = _env(tmp_path / "unused")
    pod = tmp_path / "pod"  # everything the task keeps on its own disk
    env["LASTMILE_CACHE"] = str(pod / "cache")
    args = [stage, str(data), str(reward_dir), str(pod / "out"), uri, str(processes)]

    child = _stage_child(args, env)
    deadline = time.monotonic() + 240
    while not any(key.endswith("/COMPLETE") for key in _remote(uri)):
        assert child.poll() is None, child.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint reached the object store"
        time.sleep(0.02)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    shutil.rmtree(pod)  # the new pod starts with an empty disk

    resumed = _finish(_stage_child(args, env))
    fresh = _finish(_stage_child([*args[:3], str(tmp_path / "fresh"), "", str(processes)], env))
    resumed, fresh = (summary.get("train", summary) for summary in (resumed, fresh))  # PPO's
    assert resumed["resumed_from_step"] >= 2
    assert fresh["resumed_from_step"] is None
    for adapter in ("adapter", "value_adapter"):  # PPO's value model too
        expected = tmp_path / "fresh" / adapter
        if expected.exists() or adapter == "adapter":
            names = sorted(p.name for p in expected.glob("*.safetensors"))
            assert names, expected
            _assert_same_files(pod / "out" / adapter, expected, names)
    assert _remote(uri) == {}  # the task's checkpoints are removed once its adapter is written


def test_a_failure_a_retry_would_repeat_stops_the_retry_at_once(s3_checkpoints):
    """KFP retries every failure alike: a NaN-guard stop (or bad data) leaves FAILED in the
    task's checkpoint prefix, and the retried attempt fails at once with that message instead
    of training again; a transient failure leaves nothing, so its retry resumes."""
    uri = s3_checkpoints
    with pytest.raises(OSError):
        with checkpoint.failing_once(uri):
            raise OSError("connection reset")  # transient: retried for real
    assert checkpoint.FAILED not in _remote(uri)
    with pytest.raises(FloatingPointError):
        with checkpoint.failing_once(uri):
            raise FloatingPointError("3 non-finite updates in a row at step 41")
    assert checkpoint.FAILED in _remote(uri)
    started = time.monotonic()
    with pytest.raises(checkpoint.RetryWouldRepeat,
                       match="FloatingPointError: 3 non-finite updates in a row at step 41"):
        with checkpoint.failing_once(uri):
            pytest.fail("a retry of a task that failed for good must not train")
    assert time.monotonic() - started < 10
    with checkpoint.failing_once(None):  # local checkpoints: nothing to record or find
        pass
