"""Data-parallel training (lastmile.distributed): two processes train what one process trains.

The reward model, the MLE baseline and PPO (sampled and reference batches, the paper's fast
path and the textbook one with whitening, KL and minibatches) train the tiny random model for
a few steps in one process and in two (gloo on the CPU), and the saved adapters must agree to
float tolerance. The tolerance is far below the effect of a missed all-reduce (rank 0 would
step on half the batch) or of a per-rank normalisation (rows of the two ranks weighted
differently); the logged losses and gradient norms, which a wrong constant factor would move
even where AdamW's scale invariance hides it in the weights, are compared as well.

Batches of 3 rows split 1 + 2, and the last batch of an epoch of 7 rows has 1 row: rank 0
then has no rows at all and must still join every collective.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lastmile import distributed

ATOL, RTOL = 1e-5, 1e-4
TWO = 2  # processes


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_process():
    """Two ranks on a 2-core machine: one thread each (the spawned ranks inherit this)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setenv("LASTMILE_NO_PROGRESS", "1")
        yield


# ----------------------------------------------------------------------------- helpers

def test_shards_tile_the_batch_contiguously_and_evenly():
    for n in range(0, 12):
        for size in (1, 2, 3, 4):
            shares = [distributed.shard_indices(n, r, size) for r in range(size)]
            assert [i for share in shares for i in share] == list(range(n))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert distributed.shard_indices(["a", "b", "c"], 0, 2) == ["a"]
    assert distributed.shard_indices(["a", "b", "c"], 1, 2) == ["b", "c"]
    assert distributed.shard_indices(7, 0, 1) == list(range(7))
    with pytest.raises(ValueError, match="rank 2 of a world of size 2"):
        distributed.shard_indices(4, 2, 2)


def test_processes_resolve_to_visible_gpus_and_one_process_is_not_distributed():
    assert distributed.resolve_processes(0) == max(1, torch.cuda.device_count())
    assert distributed.resolve_processes(3) == 3
    with pytest.raises(ValueError, match="processes must be >= 0"):
        distributed.resolve_processes(-1)
    assert distributed.world() == distributed.World(0, 1) and distributed.world().is_main
    # Outside a world every collective is the identity: the single-process path is untouched.
    value = torch.tensor([1.5, 2.0])
    assert distributed.all_reduce_sum(value) is value and distributed.all_reduce_sum(2.5) == 2.5
    p = torch.nn.Parameter(torch.ones(2))
    distributed.all_reduce_gradients([p])
    assert p.grad is None
    rows = distributed.gather_rows(torch.tensor([[1.0], [2.0]]), [0, 1], 2)
    assert rows.tolist() == [[1.0], [2.0]]
    assert distributed.launch(lambda x: x + 1, 1, 41) == 42


def test_the_pipeline_parameter_reaches_the_profile():
    from lastmile import config

    assert config.get_profile("paper").train_processes == 0  # every GPU the task is given
    assert config.get_profile("demo").train_processes == 1
    assert config.resolve("smoke", train_processes="2").train_processes == 2
    with pytest.raises(ValueError, match="train_processes must be >= 0"):
        config.resolve("smoke", train_processes=-1)


def test_sampling_a_batch_whole_or_in_parts_draws_the_same_tokens(tiny_model, tokenizer):
    from lastmile import ppo
    from lastmile.config import LoraSpec, PPOConfig
    from lastmile.modeling import AdapterModel

    model = AdapterModel(tiny_model)
    model.add_adapter("reward", LoraSpec(r=4, alpha=8), head=True, seed=1, trainable=False)
    model.add_adapter("policy", LoraSpec(r=4, alpha=8), seed=2)
    model.add_adapter("value", LoraSpec(r=4, alpha=8), head=True, seed=3)
    trainer = ppo.PPOTrainer(model, tokenizer, PPOConfig(max_new_tokens=8, top_k=50), 1)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15, 16]]
    whole = trainer.sample(prompts, update=3)
    halves = (trainer.sample(prompts[:1], update=3, positions=[0])
              + trainer.sample(prompts[1:], update=3, positions=[1, 2, 3]))
    assert halves == whole
    assert trainer.sample(prompts, update=3) == whole  # no state consumed
    assert trainer.sample(prompts, update=4) != whole  # another update, other streams
    assert trainer.sample([]) == []


# ----------------------------------------------------------------------------- training

def _configs() -> dict:
    from lastmile.config import LoraSpec, MLEConfig, OptimConfig, PPOConfig, RewardConfig

    # AdamW moves every weight by about the learning rate per step, whatever the gradient's
    # size, so a gradient element that is float noise (a near-cancelling sum) still moves by
    # a fraction of it. At this rate one process against two differed by <= 1.7e-6 (MLE with
    # 2 threads against 1, PPO with whitened advantages), while each deliberate error tried
    # (no gradient all-reduce, per-rank token counts, whitening or denominators, one sampling
    # stream per rank) moved some weight by 8e-5 to 8e-4.
    small, step = LoraSpec(r=4, alpha=8), OptimConfig(learning_rate=3e-4)
    ppo = dict(policy_lora=small, value_lora=small, batch_size=3, max_new_tokens=6,
               optim=step, checkpoint_every=0)
    return {
        # batches of 4 reward rows (a true output and its negatives mostly together), 5 steps
        "reward": RewardConfig(lora=small, optim=step, batch_size=4, max_steps=5,
                               eval_examples=3, checkpoint_every=0),
        # 7 rows in batches of 3: the third batch has one row, rank 0 none
        "mle": MLEConfig(lora=small, optim=step, batch_size=3, micro_batch_size=1,
                         checkpoint_every=0),
        # sampled, reference, sampled (one row): the paper's fast path
        "ppo": PPOConfig(**ppo),
        # the textbook path: whitening over both ranks, KL to the base, 2 minibatches
        "ppo_general": PPOConfig(**ppo, max_updates=2, minibatches=2, whiten_advantages=True,
                                 kl_coef=0.05, top_p=0.9),
    }


def _train_all(inputs: dict, out: str) -> dict:
    """Every stage into out/<stage>; runs alone or as one rank of a world (module level, so
    spawned ranks can import it)."""
    from lastmile import mle, ppo, reward

    cfg, out = _configs(), Path(out)
    summaries = {
        "reward": reward.train_reward_model(inputs["rm"], out / "reward", cfg["reward"],
                                            "tiny-random", eval_rows=inputs["held_out"]),
        "mle": mle.train_mle(inputs["train"], out / "mle", cfg["mle"], "tiny-random"),
    }
    for name in ("ppo", "ppo_general"):
        summaries[name] = ppo.train_ppo(inputs["train"], inputs["reward_adapter"], out / name,
                                        cfg[name], "tiny-random")
    return summaries


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_same_adapter(one: Path, two: Path) -> None:
    files = sorted(p.name for p in one.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in two.glob("*.safetensors")), one
    for name in files:
        a, b = _tensors(one / name), _tensors(two / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=ATOL, rtol=RTOL,
                                       msg=lambda m: f"{two / name} {key}: {m}")


def _log(path: Path, keys: tuple[str, ...]) -> list[dict]:
    return [{k: row.get(k) for k in keys} for row in map(json.loads, path.open())]


def _assert_same_losses(one: Path, two: Path, stage: str) -> list[dict]:
    """The stage's training logs: the same global batches, losses and gradient norms."""
    keys = ("step", "rows", "tokens", "loss", "grad_norm", "lr")
    a, b = (_log(run / stage / "train_log.jsonl", keys) for run in (one, two))
    assert [r["rows"] for r in b] == [r["rows"] for r in a]  # the global batch
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=RTOL, abs=ATOL), (stage, key, ra)
    return a


def _assert_same_reward_evaluation(one: Path, two: Path) -> None:
    """Rank 0 writes the held-out evaluation one process writes."""
    e1, e2 = (json.loads((run / "reward" / "rm_eval.json").read_text()) for run in (one, two))
    assert e2["accuracy"] == e1["accuracy"] and e2["n"] == e1["n"] == 3
    for category, value in e1["mean_reward"].items():
        assert e2["mean_reward"][category] == pytest.approx(value, rel=RTOL, abs=ATOL)


@pytest.fixture(scope="module")
def trained(inputs, tmp_path_factory):
    """The stages trained in one process and, in one world of two, by two."""
    root = tmp_path_factory.mktemp("trained")
    one = _train_all(inputs, str(root / "one"))
    two = distributed.run(_train_all, (inputs, str(root / "two")), TWO, backend="gloo")
    return root / "one", root / "two", one, two


def test_reward_and_mle_adapters_match_one_process(trained):
    one, two, s1, s2 = trained
    for stage in ("reward", "mle"):
        _assert_same_adapter(one / stage / "adapter", two / stage / "adapter")
        assert s1[stage]["processes"] == 1 and s2[stage]["processes"] == TWO
        assert s2[stage]["train"]["steps"] == s1[stage]["train"]["steps"]
        _assert_same_losses(one, two, stage)
    assert [r["rows"] for r in _log(one / "mle" / "train_log.jsonl", ("rows",))] == [3, 3, 1]
    # The held-out evaluation runs once, on rank 0, on the shared weights.
    _assert_same_reward_evaluation(one, two)


@pytest.mark.parametrize("stage", ["ppo", "ppo_general"])
def test_ppo_adapters_samples_and_log_match_one_process(trained, stage):
    one, two, s1, s2 = trained
    for name in ("adapter", "value_adapter"):
        _assert_same_adapter(one / stage / name, two / stage / name)
    assert s1[stage]["processes"] == 1 and s2[stage]["processes"] == TWO
    keys = ("update", "batch_kind", "response_length_mean", "response_words_mean",
            "reward_mean", "reward_per_token", "policy_loss", "value_loss",
            "policy_grad_norm", "value_grad_norm", "advantage_mean", "return_mean", "lr")
    a, b = _log(one / stage / "ppo_log.jsonl", keys), _log(two / stage / "ppo_log.jsonl", keys)
    assert [r["batch_kind"] for r in a] == ["sampled", "reference", "sampled"][: len(a)]
    for ra, rb in zip(a, b, strict=True):
        # the same samples: lengths in tokens and words are exact
        for key in ("update", "batch_kind", "response_length_mean", "response_words_mean"):
            assert rb[key] == ra[key], (key, ra, rb)
        for key in keys[4:]:
            assert rb[key] == pytest.approx(ra[key], rel=RTOL, abs=ATOL), (key, ra, rb)


def test_a_stage_launches_its_own_processes(inputs, trained, tmp_path):
    """The entry point with processes=2 (what the pipeline's component calls) spawns the
    world itself and gives the adapter of one process; rank 0 checkpoints every step."""
    import dataclasses

    from lastmile import mle

    one = trained[0] / "mle"
    cfg = dataclasses.replace(_configs()["mle"], checkpoint_every=1)
    two = mle.train_mle(inputs["train"], tmp_path / "two", cfg, "tiny-random", processes=TWO)
    assert two["processes"] == TWO and two["train"]["steps"] == 3
    _assert_same_adapter(one / "adapter", tmp_path / "two" / "adapter")
    assert not (tmp_path / "two" / "checkpoints").exists()  # written by rank 0, then cleared


# ----------------------------------------------------------------------------- failures

def _fail_on_rank_one() -> None:
    if distributed.world().rank == 1:
        raise FloatingPointError("MLE: step 3: non-finite loss=nan")
    distributed.barrier()  # rank 0 waits for a peer that never comes: it is stopped


def test_a_failing_rank_surfaces_its_error_and_rank():
    with pytest.raises(FloatingPointError, match=r"^rank 1 of 2: MLE: step 3: non-finite") as e:
        distributed.run(_fail_on_rank_one, (), TWO, backend="gloo")
    assert isinstance(e.value.__cause__, distributed.RemoteTraceback)
    assert "_fail_on_rank_one" in str(e.value.__cause__)  # the rank's own traceback
