"""Sharded base weights (`Profile.fsdp`, lastmile.fsdp) in the real stages.

The reward model, the MLE baseline and PPO (the paper's fast path, and the textbook one with
whitening, KL and minibatches) train the tiny random Llama with its decoder layers sharded
over 2 gloo CPU processes (FSDP2, LoRA weights and AdamW state sharded with them) and must
give the adapters, logs and evaluation of one unsharded process to float rounding. The
configurations are tests/test_distributed.py's: batches of 3 rows split 1 + 2 and a last
batch of one row, so one rank runs fewer micro-batches or none and must idle in lockstep
(fsdp.shortfall), and PPO's ranks sample outputs of different lengths.

A sharded run killed after a checkpoint resumes, sharded, from it (whole tensors on disk,
AdamW moments included) and ends with the uninterrupted adapter; a sharded checkpoint is
the same files an unsharded run writes. One process with fsdp on stops with a ConfigError.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from lastmile import distributed
from test_distributed import (ATOL, RTOL, TWO, _assert_same_adapter, _assert_same_losses,
                              _assert_same_reward_evaluation, _configs, _log, _train_all)


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_process():
    """Two ranks on a 2-core machine: one thread each (the spawned ranks inherit this)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setenv("LASTMILE_NO_PROGRESS", "1")
        yield


class Killed(Exception):
    """A job lost right after a checkpoint (raised on every rank at the same point)."""


def _checkpointing_mle():
    return dataclasses.replace(_configs()["mle"], checkpoint_every=1)


def _mle_killed_after(step: int, inputs: dict, out: Path) -> None:
    """The MLE stage (sharded in a world), checkpointing every step, stopped right after
    writing `step`'s checkpoint; keeps a copy of that checkpoint's tensors beside `out`
    (a resumed run prunes it)."""
    import shutil

    from lastmile import checkpoint, mle

    save = checkpoint.Checkpointer.save

    def save_then_die(self, at, extras):
        path = save(self, at, extras)
        if at == step:
            raise Killed(f"killed after step {at}")
        return path

    checkpoint.Checkpointer.save = save_then_die
    try:
        mle.train_mle(inputs["train"], out, _checkpointing_mle(), "tiny-random",
                      fsdp=distributed.active())
    except Killed:
        pass
    finally:
        checkpoint.Checkpointer.save = save
    if distributed.world().is_main:
        shutil.copy(out / "checkpoints" / f"step-{step:06d}" / "tensors.safetensors",
                    out.parent / f"{out.name}-step{step}.safetensors")


def _train_all_sharded(inputs: dict, out: str) -> dict:
    """Every stage into out/<stage> with fsdp on, as one rank of a world of two (checking
    that the decoder layers are sharded while training); then the MLE stage killed after
    step 2 of 3 and rerun in the same directory (out/mle_resumed): a fresh model, sharded
    afresh, restored from the checkpoint on disk."""
    from lastmile import fsdp, mle, ppo, reward

    shard_base, seen = fsdp.shard_base, []

    def recording(model, *args, **kwargs):  # every stage shards through here
        shard_base(model, *args, **kwargs)
        seen.append(sum(fsdp.is_sharded(p) for p in model.base.parameters()))
        return model

    fsdp.shard_base = recording
    try:
        cfg, out = _configs(), Path(out)
        summaries = {
            "reward": reward.train_reward_model(inputs["rm"], out / "reward", cfg["reward"],
                                                "tiny-random", eval_rows=inputs["held_out"],
                                                fsdp=True),
            "mle": mle.train_mle(inputs["train"], out / "mle", cfg["mle"], "tiny-random",
                                 fsdp=True),
        }
        for name in ("ppo", "ppo_general"):
            summaries[name] = ppo.train_ppo(inputs["train"], inputs["reward_adapter"],
                                            out / name, cfg[name], "tiny-random", fsdp=True)
    finally:
        fsdp.shard_base = shard_base
    summaries["sharded_params"] = seen
    _mle_killed_after(2, inputs, out / "mle_resumed")
    summaries["mle_resumed"] = mle.train_mle(inputs["train"], out / "mle_resumed",
                                             _checkpointing_mle(), "tiny-random", fsdp=True)
    return summaries


@pytest.fixture(scope="module")
def trained(inputs, tmp_path_factory):
    """The stages in one unsharded process and sharded over a world of two (and the resumed
    MLE run); the unsharded MLE's step-2 checkpoint, for comparison."""
    root = tmp_path_factory.mktemp("fsdp")
    one = _train_all(inputs, str(root / "one"))
    _mle_killed_after(2, inputs, root / "one" / "mle_killed")
    two = distributed.run(_train_all_sharded, (inputs, str(root / "two")), TWO, backend="gloo")
    return root / "one", root / "two", one, two


def test_every_stage_shards_the_decoder_layers(trained):
    *_, two = trained
    # 4 stage runs; each shards the 2 tiny layers' base weights and every adapter's LoRA
    assert len(two["sharded_params"]) == 4 and min(two["sharded_params"]) >= 2 * 7
    for stage in ("reward", "mle", "ppo", "ppo_general"):
        assert two[stage]["fsdp"] is True and two[stage]["processes"] == TWO, stage


def test_reward_and_mle_adapters_match_one_unsharded_process(trained):
    one, two, s1, s2 = trained
    for stage in ("reward", "mle"):
        _assert_same_adapter(one / stage / "adapter", two / stage / "adapter")
        # the same files: peft's config (target_modules is a set: its order follows the
        # process's string hashing) and our spec
        assert sorted(p.name for p in (one / stage / "adapter").iterdir()) == \
            sorted(p.name for p in (two / stage / "adapter").iterdir())
        for name in ("adapter_config.json", "lastmile_adapter.json"):
            a, b = (json.loads((run / stage / "adapter" / name).read_text())
                    for run in (one, two))
            if "target_modules" in a:
                a["target_modules"], b["target_modules"] = (sorted(a["target_modules"]),
                                                            sorted(b["target_modules"]))
            assert b == a, (stage, name)
        assert len(_assert_same_losses(one, two, stage)) >= 3
    # every rank evaluates (sharded forwards), rank 0 writes what one process writes
    _assert_same_reward_evaluation(one, two)


@pytest.mark.parametrize("stage", ["ppo", "ppo_general"])
def test_ppo_adapters_samples_and_log_match_one_unsharded_process(trained, stage):
    one, two, _, _ = trained
    for name in ("adapter", "value_adapter"):
        _assert_same_adapter(one / stage / name, two / stage / name)
    keys = ("update", "batch_kind", "response_length_mean", "response_words_mean",
            "reward_mean", "policy_loss", "value_loss", "policy_grad_norm", "value_grad_norm",
            "advantage_mean", "lr")
    a, b = _log(one / stage / "ppo_log.jsonl", keys), _log(two / stage / "ppo_log.jsonl", keys)
    assert len(a) >= 2
    for ra, rb in zip(a, b, strict=True):
        for key in keys[:4]:  # the same samples, decoded in lockstep with unmerged LoRA
            assert rb[key] == ra[key], (key, ra, rb)
        for key in keys[4:]:
            assert rb[key] == pytest.approx(ra[key], rel=RTOL, abs=ATOL), (key, ra, rb)


# ----------------------------------------------------------------------------- checkpoints

def test_a_sharded_run_resumes_from_its_checkpoint(trained):
    """Killed after step 2 of 3 and rerun, the sharded MLE run resumes at step 3 (its LoRA
    weights and AdamW moments cut back into shards) and ends with the uninterrupted run's
    adapter, which is the unsharded one's."""
    one, two, _, s2 = trained
    resumed = s2["mle_resumed"]
    assert resumed["train"]["resumed_from_step"] == 2 and resumed["train"]["steps"] == 3
    _assert_same_adapter(one / "mle" / "adapter", two / "mle_resumed" / "adapter")
    assert not (two / "mle_resumed" / "checkpoints").exists()  # cleared once written


def test_a_sharded_checkpoint_holds_what_an_unsharded_one_holds(trained):
    """The step-2 checkpoints of the sharded run and of one unsharded process: the same
    tensor names and shapes (whole LoRA weights and AdamW moments, not a rank's shard),
    equal to float rounding."""
    from safetensors.torch import load_file

    one, two, _, _ = trained
    a = load_file(str(one / "mle_killed-step2.safetensors"))
    b = load_file(str(two / "mle_resumed-step2.safetensors"))
    a, b = ({k: v for k, v in t.items() if not k.startswith("rng.")} for t in (a, b))
    assert a.keys() == b.keys()
    assert any(k.endswith("exp_avg_sq") for k in a) and any(k.startswith("param.") for k in a)
    for key in a:
        assert b[key].shape == a[key].shape, key
        torch.testing.assert_close(b[key], a[key], atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"{key}: {m}")


def test_fsdp_with_one_process_is_a_configuration_error(inputs, tmp_path):
    from lastmile import mle
    from lastmile.config import ConfigError

    with pytest.raises(ConfigError, match=r"fsdp=true .*train_processes=1"):
        mle.train_mle(inputs["train"], tmp_path, _configs()["mle"], "tiny-random", fsdp=True)
    assert not list(tmp_path.iterdir())  # refused before anything ran


# ----------------------------------------------------------------------------- torchrun

def test_torchrun_with_fsdp_gives_the_one_process_adapter(artifacts, tmp_path):
    """`torchrun --nproc-per-node 2 -m lastmile.train mle` with `fsdp: true` in the
    configuration (local directories: the shared-disk mode) against the entry point in one
    unsharded process: the same adapter and losses. The same configuration without torchrun
    (a world of one) is refused in one line, exit code 2."""
    import subprocess

    from lastmile import train as train_cli
    from test_trainer import TORCHRUN, _child_env, _config, _stage_args

    local = {k: str(artifacts / k) for k in ("data", "negatives", "reward_model")}
    assert train_cli.main(["mle", "--config", _config(), *_stage_args("mle", local),
                           "--out", str(tmp_path / "one")]) == 0
    sharded = _config(fsdp=True)
    done = subprocess.run(
        [TORCHRUN, "--nproc-per-node", "2", "-m", "lastmile.train", "mle", "--config", sharded,
         *_stage_args("mle", local), "--out", str(tmp_path / "two")],
        env=_child_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    _assert_same_adapter(tmp_path / "one" / "adapter", tmp_path / "two" / "adapter")
    a, b = (_log(tmp_path / run / "train_log.jsonl", ("loss",)) for run in ("one", "two"))
    assert len(a) == len(b) >= 2
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=RTOL, abs=ATOL)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == TWO and summary["fsdp"] is True


def test_the_entry_point_refuses_fsdp_in_a_world_of_one(artifacts, tmp_path, capsys):
    from lastmile import train as train_cli
    from test_trainer import _config, _stage_args

    local = {k: str(artifacts / k) for k in ("data", "negatives", "reward_model")}
    assert train_cli.main(["mle", "--config", _config(fsdp=True), *_stage_args("mle", local),
                           "--out", str(tmp_path / "o")]) == train_cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert "fsdp=true" in err and "--nproc-per-node" in err and len(err.splitlines()) == 1
