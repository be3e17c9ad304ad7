"""Reward model (paper §3.2): token targets and weights, training, evaluation (tiny model)."""

from __future__ import annotations

import json

import pytest
import torch

from lastmile import reward
from lastmile.config import LoraSpec, OptimConfig, RewardConfig
from lastmile.modeling import AdapterModel
from lastmile.train_utils import (TokenExample, micro_batches, padded_tokens, seed_everything,
                                  train_loop)


def _cfg(**overrides) -> RewardConfig:
    cfg = RewardConfig(lora=LoraSpec(r=4, alpha=4), **overrides)
    return cfg


def _model(tiny_model) -> AdapterModel:
    model = AdapterModel(tiny_model)
    reward.add_reward_adapter(model, _cfg())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero LoRA B and head, so predictions vary by position
        for p in model.adapter_parameters("reward"):
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _prompt(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def _rows(tokenizer, n: int = 6) -> list[dict]:
    """True outputs about the input beside two easy negative classes."""
    rows = []
    for i in range(n):
        prompt = _prompt(tokenizer, f"Summarize: package number {i} provides a tool.")
        rows.append(dict(id=f"t{i}", source_id=f"t{i}", input=f"package {i}", prompt=prompt,
                         output="a tool", label=1.0, weight=1.0, category="true"))
        rows.append(dict(id=f"t{i}-r", source_id=f"t{i}", input=f"package {i}", prompt=prompt,
                         output="zebra zebra zebra", label=0.0, weight=0.2,
                         category="random_tokens"))
        rows.append(dict(id=f"t{i}-c", source_id=f"t{i}", input=f"package {i}", prompt=prompt,
                         output="quartz", label=0.0, weight=0.2, category="copy_input"))
    return rows


def test_loss_is_the_weighted_per_token_squared_error(tiny_model, tokenizer):
    model = _model(tiny_model)
    eos = tokenizer.eos_token_id
    examples = [TokenExample([1, 2, 3, 4], [5, 6, eos], label=1.0, weight=1.0),
                TokenExample([7, 8], [9, 10, 11, 12, eos], label=0.0, weight=0.2),
                TokenExample([13, 14, 15], [16], label=0.0, weight=0.2)]  # cut: no EOS
    got = reward.reward_loss(model, examples, tokenizer.pad_token_id)

    numerator = denominator = 0.0
    with torch.no_grad():
        for e in examples:  # one unpadded row at a time, positions by hand
            ids = torch.tensor([e.prompt_ids + e.output_ids])
            hidden = model.hidden_states(ids, torch.ones_like(ids), "reward")
            scores = model.scalar(hidden, "reward")[0]
            p = len(e.prompt_ids)
            for t in range(len(e.output_ids)):  # reward of a_t read at a_t's own position
                numerator += e.weight * (scores[p + t].item() - e.label) ** 2
            denominator += e.weight * len(e.output_ids)
    assert got.item() == pytest.approx(numerator / denominator, rel=1e-5)
    # The prompt position before the first output token is not scored: shifting the read
    # position by one gives a different number.
    with torch.no_grad():
        e = examples[0]
        ids = torch.tensor([e.prompt_ids + e.output_ids])
        scores = model.scalar(model.hidden_states(ids, torch.ones_like(ids), "reward"), "reward")
        shifted = sum((scores[0, 3 + t].item() - 1.0) ** 2 for t in range(3)) / 3
        own = reward.reward_loss(model, [e], tokenizer.pad_token_id).item()
    assert own != pytest.approx(shifted, rel=1e-3)


def test_targets_and_weights_from_rows(tokenizer):
    rows = _rows(tokenizer, 1)
    examples = reward.encode_rows(tokenizer, rows, max_output_tokens=100)
    assert [e.label for e in examples] == [1.0, 0.0, 0.0]
    assert [e.weight for e in examples] == [1.0, 0.2, 0.2]
    assert all(e.output_ids[-1] == tokenizer.eos_token_id for e in examples)
    assert examples[0].prompt_ids is examples[1].prompt_ids  # shared prompt encoded once
    expected = 0.2 * len(examples[1].output_ids)
    assert reward.reward_loss_weight(examples[1]) == pytest.approx(expected)


def test_micro_batches_give_the_full_batch_gradient(tokenizer):
    from lastmile.modeling import load_base

    params_after = []
    rows = _rows(tokenizer, 3)
    for micro, budget in ((None, None), (2, None), (None, 100)):  # one forward; 2 rows; tokens
        model = AdapterModel(load_base("tiny-random")[0])
        reward.add_reward_adapter(model, _cfg())
        examples = reward.encode_rows(tokenizer, rows, 100)
        train_loop(model.adapter_parameters("reward"), examples,
                   numerator=lambda m, model=model: reward.reward_loss_sum(model, m,
                                                                           tokenizer.pad_token_id),
                   denominator=reward.reward_loss_weight, optim=OptimConfig(learning_rate=1e-3),
                   batch_size=9, micro_batch_size=micro, token_budget=budget, max_steps=1)
        params_after.append(torch.cat([p.detach().flatten()
                                       for p in model.adapter_parameters("reward")]))
    # Adam's first step is lr·g/(|g|+eps): an element whose gradient is ~eps turns float
    # summation-order noise into a step difference of ~1e-5 (one of 8257 elements moved by
    # 1.2e-5 once the outputs ran in length buckets), so allow 5% of the lr-sized step.
    torch.testing.assert_close(params_after[1], params_after[0], atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(params_after[2], params_after[0], atol=5e-5, rtol=1e-5)


def test_micro_batch_split_keeps_the_batch_and_respects_limits():
    batch = [TokenExample([1] * p, [2] * o) for p, o in ((30, 5), (3, 2), (10, 40), (8, 1),
                                                          (20, 20), (4, 4))]
    assert micro_batches(batch, None, None) == [batch]
    for rows_cap, budget in ((2, None), (None, 60), (3, 100), (None, 10)):
        groups = micro_batches(batch, rows_cap, budget)
        flat = [e for g in groups for e in g]
        assert sorted(map(id, flat)) == sorted(map(id, batch))  # same rows, each once
        assert [len(e.prompt_ids) for e in flat] == sorted(len(e.prompt_ids) for e in batch)
        for g in groups:
            assert rows_cap is None or len(g) <= rows_cap
            # a row over the budget runs alone; otherwise the padded forward fits the budget,
            # which for distinct prompts bounds rows x longest row
            assert budget is None or padded_tokens(g) <= budget or len(g) == 1
            assert padded_tokens(g) >= len(g) * max(e.length for e in g)
    assert [len(g) for g in micro_batches(batch, None, 60)] == [3, 1, 1, 1]
    with pytest.raises(ValueError, match="micro_batch_size"):
        micro_batches(batch, 0)


def test_rows_sharing_a_prompt_share_a_forward():
    shared, other = [1] * 50, [3] * 40
    batch = [TokenExample(shared, [2] * n) for n in (3, 9, 5)] + [TokenExample(other, [2] * 4)]
    assert padded_tokens(batch[:3]) == 50 + 3 * 9  # the prompt once, outputs padded
    groups = micro_batches(batch, None, 50 + 3 * 9)
    assert [[len(e.output_ids) for e in g] for g in groups] == [[4], [3, 5, 9]]


def test_the_reward_budget_counts_the_length_buckets():
    """A true output and its negatives: the short rows pad to 4, the copy of the input to 100
    (reward.output_states), so the batch is 50 + 3 x 4 + 100 tokens, not 50 + 4 x 100."""
    shared = [1] * 50
    batch = [TokenExample(shared, [2] * n) for n in (3, 4, 100, 4)]
    assert reward.forward_tokens(batch) == 50 + 3 * 4 + 100
    assert padded_tokens(batch) == 50 + 4 * 100
    assert micro_batches(batch, None, 200, cost=reward.forward_tokens) == [
        sorted(batch, key=lambda e: len(e.output_ids))]  # one forward
    assert len(micro_batches(batch, None, 200)) == 2  # the default cost splits off the 100
    # A sharded base runs one forward per row (no shared prompt): 4 rows x (50 + 100).
    assert reward.row_forward_tokens(batch) == 4 * 150
    assert len(micro_batches(batch, None, 200, cost=reward.row_forward_tokens)) == 2  # 3x54, 150


def test_output_states_equal_one_forward_per_row(tokenizer):
    """The shared-prompt forward gives each row the states, loss and gradient of a plain
    forward of prompt + output (modeling.collate) for the same rows."""
    from lastmile.modeling import collate, load_base

    model = AdapterModel(load_base("tiny-random")[0])
    reward.add_reward_adapter(model, _cfg())
    rows = _rows(tokenizer, 3)  # 3 prompts x 3 rows; prompts of different lengths
    for row in rows[3:6]:
        row["prompt"] = _prompt(tokenizer, "Summarize: a much longer description " * 4)
    rows[2]["output"] = rows[7]["output"] = "a copied input, much longer than the rest " * 3
    examples = reward.encode_rows(tokenizer, rows, 100)
    assert len({len(e.prompt_ids) for e in examples}) == 2
    # the long outputs continue apart from the short ones, one of them from each prompt
    assert len(reward.length_buckets([len(e.output_ids) for e in examples])) == 2
    pad = tokenizer.pad_token_id
    params = model.adapter_parameters("reward")

    def plain_loss():
        batch = collate([e.prompt_ids for e in examples], [e.output_ids for e in examples], pad)
        hidden = model.hidden_states(batch.input_ids, batch.attention_mask, "reward")
        rows = batch.output_mask.nonzero()[:, 0]
        predicted = model.scalar(hidden[batch.output_mask], "reward")
        labels = torch.tensor([e.label for e in examples])
        weights = torch.tensor([e.weight for e in examples])
        return (weights[rows] * (predicted - labels[rows]) ** 2).sum(), predicted

    results = []
    for loss_fn in (plain_loss, lambda: (reward.reward_loss_sum(model, examples, pad), None)):
        for p in params:
            p.grad = None
        loss, predicted = loss_fn()
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in params])))
    (plain, plain_grad), (shared, shared_grad) = results
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared_grad, plain_grad, rtol=1e-4, atol=1e-5)
    assert shared_grad.abs().sum() > 0

    hidden, mask = reward.output_states(model, [e.prompt_ids for e in examples],
                                        [e.output_ids for e in examples], pad)
    assert mask.sum(1).tolist() == [len(e.output_ids) for e in examples]


def test_the_same_seed_gives_the_same_gradient_bit_for_bit():
    """28 rows gathering one prompt's KV cache: without deterministic mode, CPU torch adds the
    rows' gradients into the cache with atomic adds in thread order, and 29 of 29 repeats
    differed from the first in the last bits (train_utils.seed_everything)."""
    from lastmile.modeling import load_base

    model = AdapterModel(load_base("tiny-random")[0])
    reward.add_reward_adapter(model, _cfg())
    seed_everything(0)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, 200, (400,), generator=gen).tolist()
    examples = [TokenExample(prompt, torch.randint(5, 200, (3 + i,), generator=gen).tolist(),
                             float(i % 2), 1.0) for i in range(28)]
    params = model.adapter_parameters("reward")
    grads = []
    for _ in range(30):
        for p in params:
            p.grad = None
        reward.reward_loss_sum(model, examples, pad_id=0).backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    assert grads[0].abs().sum() > 0
    assert all(torch.equal(g, grads[0]) for g in grads[1:])


def test_length_buckets_split_where_padding_is_least():
    # 4 short rows and 2 long ones: [3, 3, 4, 5] pad to 5, [90, 100] to 100
    assert reward.length_buckets([100, 3, 4, 90, 5, 3]) == [[1, 5, 2, 4], [3, 0]]
    # similar lengths stay together: a split would save nothing
    assert reward.length_buckets([4, 4, 4]) == [[0, 1, 2]]
    assert reward.length_buckets([7]) == [[0]]
    groups = reward.length_buckets([12, 1, 30, 2, 11, 29])
    assert sorted(i for g in groups for i in g) == list(range(6))  # every row, once


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_training_on_a_separable_set_lowers_the_loss(tiny_model, tokenizer, tmp_path,
                                                     precision):
    model = AdapterModel(tiny_model)
    rows = _rows(tokenizer, 6) * 4
    # one epoch of 72 rows is 12 steps: no cap hit
    cfg = _cfg(batch_size=6, max_steps=50, precision=precision)
    cfg.optim = OptimConfig(learning_rate=3e-3)  # the tiny random model needs large steps
    log = tmp_path / "train_log.jsonl"
    reward.add_reward_adapter(model, cfg)
    initial = {n: p.detach().clone() for n, p in model.base.named_parameters() if "lora_" in n}
    summary = reward.train_reward(model, tokenizer, rows, cfg, log_path=log)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 13)) == list(range(1, summary["steps"] + 1))
    assert set(lines[0]) >= {"step", "loss", "lr", "seconds"}
    assert lines[0]["lr"] == pytest.approx(3e-3) and lines[-1]["lr"] < lines[0]["lr"]
    first = sum(x["loss"] for x in lines[:3]) / 3
    last = sum(x["loss"] for x in lines[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    result = reward.evaluate_reward_model(model, tokenizer, _rows(tokenizer, 6), cfg)
    assert result["accuracy"] == {"copy_input": 1.0, "random_tokens": 1.0}
    # Every LoRA weight moved: at bf16 an autocast block spanning the updates would keep
    # computing with the first step's weights (LoRA B zero), so A would never move.
    moved = {n: not torch.equal(p, initial[n]) for n, p in model.base.named_parameters()
             if "lora_" in n}
    assert moved and all(moved.values()), [n for n, m in moved.items() if not m]
    assert result["mean_reward"]["true"] > result["mean_reward"]["random_tokens"]


def test_accuracy_per_category_on_hand_made_scores():
    rows = [dict(source_id="a", category="true"), dict(source_id="a", category="shuffled"),
            dict(source_id="a", category="copy_input"),
            dict(source_id="b", category="true"), dict(source_id="b", category="shuffled"),
            dict(source_id="b", category="copy_input"),
            dict(source_id="c", category="shuffled")]  # no true row for c: no pair
    scores = [0.9, 0.2, 0.95, 0.5, 0.5, 0.1, 0.0]
    result = reward.summarize_scores(rows, scores)
    assert result["n"] == 2
    assert result["accuracy"] == {"copy_input": 0.5, "shuffled": 0.5}  # the tie counts as wrong
    assert result["pairs"] == {"copy_input": 2, "shuffled": 2}
    assert result["mean_reward"] == pytest.approx(
        {"true": 0.7, "shuffled": 0.7 / 3, "copy_input": 0.525})
    assert list(result["mean_reward"])[0] == "true"
    with pytest.raises(ValueError, match="3 rows but 2 scores"):
        reward.summarize_scores(rows[:3], scores[:2])


def test_score_outputs_order_and_sequence_reward(tiny_model, tokenizer):
    model = _model(tiny_model)
    prompts = [_prompt(tokenizer, "long input " * 8), _prompt(tokenizer, "short")]
    outputs = ["one two three", "four"]
    batched = reward.score_outputs(model, tokenizer, prompts, outputs, 100, batch_size=2)
    alone = [reward.score_outputs(model, tokenizer, [p], [o], 100)[0]
             for p, o in zip(prompts, outputs)]
    for b, a, o in zip(batched, alone, outputs):
        n = len(tokenizer(o, add_special_tokens=False)["input_ids"]) + 1  # + EOS
        assert b.shape == (n,)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    assert reward.sequence_reward(torch.tensor([0.0, 1.0, 0.5])) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        reward.sequence_reward(torch.tensor([]))


def test_bad_rows_are_named(tokenizer, tmp_path):
    rows = _rows(tokenizer, 1)
    rows[2]["label"] = 0.5
    with pytest.raises(ValueError, match=r"row 3 \(id='t0-c'\) label must be 1 or 0"):
        reward.validate_reward_rows(rows)
    del rows[1]["weight"]
    with pytest.raises(ValueError, match=r"row 2 .* lacks \['weight'\]"):
        reward.validate_reward_rows(rows)
    path = tmp_path / "rm.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match="rm.jsonl: no rows"):
        reward.read_reward_rows(path)


def test_stage_writes_adapter_log_and_eval(tokenizer, tmp_path):
    pytest.importorskip("lastmile.negatives")
    from lastmile.io import read_json, write_jsonl

    rows = _rows(tokenizer, 4)
    write_jsonl(tmp_path / "rm.jsonl", rows)
    held_out = [dict(id=f"h{i}", input=f"Package {i} provides a small command line tool.",
                     output="a tool", prompt=_prompt(tokenizer, f"Summarize: package {i}."))
                for i in range(3)]
    cfg = _cfg(batch_size=4, max_steps=2, eval_examples=2)
    summary = reward.train_reward_model(tmp_path / "rm.jsonl", tmp_path / "out", cfg,
                                        "tiny-random", eval_rows=held_out)
    out = tmp_path / "out"
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "adapter" / "head.safetensors").exists()
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 2
    evaluation = read_json(out / "rm_eval.json")
    assert evaluation == summary["eval"]
    assert evaluation["n"] == 2
    assert set(evaluation) >= {"n", "mean_reward", "accuracy"}
    assert "true" in evaluation["mean_reward"]
    assert set(evaluation["accuracy"]) == set(evaluation["mean_reward"]) - {"true"}
    assert all(0.0 <= v <= 1.0 for v in evaluation["accuracy"].values())


# ----------------------------------------------------------------------------- real SmolLM2

def _bundled_rows(tokenizer, split: str, n: int, max_words: int = 50) -> list[dict]:
    """The first `n` rows of the bundled Debian data with short inputs, prompt-formatted."""
    from lastmile import data
    from lastmile.config import DEFAULT_INSTRUCTION
    from lastmile.io import read_jsonl

    rows = []
    for row in read_jsonl(data.DEFAULT_DATA / f"{split}.jsonl.gz"):
        if len(row["input"].split()) <= max_words:
            rows.append(dict(row, prompt=data.format_prompt(tokenizer, DEFAULT_INSTRUCTION,
                                                            row["input"])))
        if len(rows) == n:
            return rows
    raise AssertionError(f"the bundled {split} split has fewer than {n} short rows")


@pytest.mark.slow
def test_smollm2_reward_model_ranks_true_outputs_above_noise_and_copies(tmp_path):
    """A few dozen Debian pairs suffice for the two easiest negative classes (paper §3.2).

    Sizes are the test's own, set through the config only: the paper's 1e-5 over one epoch of
    a few batches barely moves the adapter and head. 30 pairs (90 rows), batch 7, three epochs
    (39 steps) at 1e-3 rank 20 held-out pairs at 0.95 (random tokens) and 1.0 (copies), mean
    reward true 0.64 vs 0.21 and 0.09; two epochs were too close to the bar. Outputs are cut at
    32 tokens so the long copies of the input neither dominate the token-weighted loss nor the
    run time (2 min 46 s on 2 idle cores).
    """
    from lastmile import negatives
    from lastmile.config import NegativesConfig
    from lastmile.modeling import load_base

    base, tokenizer = load_base("embedded:smollm2-135m-instruct")
    model = AdapterModel(base)
    neg_cfg = NegativesConfig(categories=("random_tokens", "copy_input"), max_output_tokens=32)
    train = negatives.synthesize(_bundled_rows(tokenizer, "train", 30), neg_cfg, tokenizer)
    held_out = negatives.synthesize(_bundled_rows(tokenizer, "test", 20), neg_cfg, tokenizer)
    cfg = RewardConfig(batch_size=7, epochs=3, max_output_tokens=32, seed=0)
    cfg.optim = OptimConfig(learning_rate=1e-3)
    summary = reward.train_reward(model, tokenizer, train, cfg, log_path=tmp_path / "log.jsonl")
    result = reward.evaluate_reward_model(model, tokenizer, held_out, cfg)
    assert summary["steps"] == 39 and summary["tail_mean_loss"] < 0.5 * summary["first_loss"]
    assert result["n"] == 20 and result["pairs"] == {"copy_input": 20, "random_tokens": 20}
    assert result["accuracy"]["random_tokens"] >= 0.8, result
    assert result["accuracy"]["copy_input"] >= 0.8, result
    assert result["mean_reward"]["true"] > result["mean_reward"]["random_tokens"]
    assert result["mean_reward"]["true"] > result["mean_reward"]["copy_input"]


def test_infinite_losses_in_a_row_stop_the_stage_without_an_adapter(tokenizer, tmp_path,
                                                                    monkeypatch):
    from lastmile.io import write_jsonl

    write_jsonl(tmp_path / "rm.jsonl", _rows(tokenizer, 4))
    real = reward.reward_loss_sum
    monkeypatch.setattr(reward, "reward_loss_sum",
                        lambda *a, **k: real(*a, **k) + float("inf"))
    cfg = _cfg(batch_size=4, max_bad_updates=2)
    with pytest.raises(FloatingPointError,
                       match=r"reward model: step 2: non-finite loss=inf; 2 bad updates"):
        reward.train_reward_model(tmp_path / "rm.jsonl", tmp_path / "out", cfg, "tiny-random")
    assert not (tmp_path / "out" / "adapter").exists()
    log = [json.loads(x) for x in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [(x["step"], x["skipped"], x["nonfinite"]) for x in log] == [(1, True, ["loss"])]
    assert log[0]["ids"][0] in {r["id"] for r in _rows(tokenizer, 4)}


def test_bfloat16_loss_and_gradient_stay_close_to_float32(tiny_model, tokenizer,
                                                          assert_bf16_close):
    model = _model(tiny_model)
    examples = reward.encode_rows(tokenizer, _rows(tokenizer, 3), 100)
    params = [p for p in model.adapter_parameters("reward") if p.requires_grad]
    assert_bf16_close(model, params, loss_rel=0.05, loss_fn=lambda: reward.reward_loss(
        model, examples, tokenizer.pad_token_id))


def test_bfloat16_stage_trains_and_says_its_precision(tokenizer, tmp_path):
    from lastmile.io import write_jsonl

    write_jsonl(tmp_path / "rm.jsonl", _rows(tokenizer, 4))
    cfg = _cfg(batch_size=6, max_steps=2, precision="bfloat16")
    summary = reward.train_reward_model(tmp_path / "rm.jsonl", tmp_path / "out", cfg,
                                        "tiny-random", None)
    assert summary["precision"] == "bfloat16" and summary["train"]["steps"] == 2
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    with pytest.raises(ValueError, match="RewardConfig.precision must be one of"):
        reward.train_reward_model(tmp_path / "rm.jsonl", tmp_path / "o2",
                                  _cfg(max_steps=1, precision="fp8"), "tiny-random", None)
    assert not (tmp_path / "o2").exists()  # refused before anything was written


# ----------------------------------------------------------------------------- sequence level

def test_sequence_loss_reads_only_the_last_output_token(tiny_model, tokenizer):
    """RewardConfig.level "sequence": sum_i w_i (r̂_i,last - y_i)^2 / sum_i w_i."""
    model = _model(tiny_model)
    eos = tokenizer.eos_token_id
    examples = [TokenExample([1, 2, 3, 4], [5, 6, eos], label=1.0, weight=1.0),
                TokenExample([1, 2, 3, 4], [9, 10, 11, 12, eos], label=0.0, weight=0.2),
                TokenExample([13, 14, 15], [16], label=0.0, weight=0.2)]  # cut: no EOS
    seen = []  # the states the head scores
    hook = model.heads["reward"].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    try:
        got = reward.reward_loss(model, examples, tokenizer.pad_token_id, level="sequence")
    finally:
        hook.remove()
    assert seen == [torch.Size([3, model.hidden_size])]  # one state per row, no other token

    numerator = denominator = 0.0
    with torch.no_grad():
        for e in examples:  # one unpadded row at a time: the last output token's position
            ids = torch.tensor([e.prompt_ids + e.output_ids])
            scores = model.scalar(model.hidden_states(ids, torch.ones_like(ids), "reward"),
                                  "reward")[0]
            numerator += e.weight * (scores[-1].item() - e.label) ** 2
            denominator += e.weight
    assert got.item() == pytest.approx(numerator / denominator, rel=1e-5)
    assert reward.reward_loss_weight(examples[1], "sequence") == pytest.approx(0.2)
    token = reward.reward_loss(model, examples, tokenizer.pad_token_id)
    assert torch.equal(token, reward.reward_loss(model, examples, tokenizer.pad_token_id,
                                                 level="token"))  # the default is "token"
    assert token.item() != pytest.approx(got.item(), rel=1e-3)
    with pytest.raises(ValueError, match="reward level must be one of"):
        reward.reward_loss(model, examples, tokenizer.pad_token_id, level="episode")


def test_sequence_reward_and_ppo_rewards_by_hand():
    scores = torch.tensor([0.25, 1.0, 0.5])
    assert reward.sequence_reward(scores) == pytest.approx(1.75 / 3)
    assert reward.sequence_reward(scores, "sequence") == 0.5  # the last token's alone
    rm = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.0]])  # row 1: 2 tokens + padding
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert reward.ppo_rewards(rm, mask) is rm  # token level: untouched
    torch.testing.assert_close(reward.ppo_rewards(rm, mask, "sequence"),
                               torch.tensor([[0.0, 0.0, 0.3], [0.0, 0.5, 0.0]]))


def _ppo_model(tiny_model):
    from lastmile.config import LoraSpec as Spec

    model = AdapterModel(tiny_model)
    model.add_adapter("reward", Spec(r=4, alpha=8), head=True, seed=1, trainable=False)
    model.add_adapter("policy", Spec(r=4, alpha=8), seed=2)
    model.add_adapter("value", Spec(r=4, alpha=8), head=True, seed=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.adapter_parameters("reward"):
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def test_ppo_rollout_at_sequence_level_rewards_only_the_last_output_token(tiny_model,
                                                                          tokenizer):
    from lastmile import ppo
    from lastmile.config import PPOConfig

    model = _ppo_model(tiny_model)
    eos = tokenizer.eos_token_id
    prompts, outputs = [[1, 2, 3, 4], [5, 6]], [[7, 8, eos], [9]]
    references = [[7], [9]]  # row 0 runs 2 tokens past its reference: length penalty
    default = ppo.PPOTrainer(model, tokenizer, PPOConfig(), 1)
    token = ppo.PPOTrainer(model, tokenizer, PPOConfig(), 1, reward_level="token")
    sequence = ppo.PPOTrainer(model, tokenizer, PPOConfig(), 1, reward_level="sequence")
    a, b, s = (t.rollout("sampled", prompts, outputs, references)
               for t in (default, token, sequence))
    assert torch.equal(a.rm_rewards, b.rm_rewards) and torch.equal(a.rewards, b.rewards)
    last = torch.zeros_like(s.mask)
    last[0, 2] = last[1, 0] = True  # each row's last output token
    assert not s.rm_rewards[~last].any()
    torch.testing.assert_close(s.rm_rewards[last], a.rm_rewards[last], rtol=0, atol=0)
    assert s.rm_rewards[last].abs().min() > 0
    torch.testing.assert_close(s.penalty, a.penalty)  # the length penalty is unchanged
    assert s.penalty[0, 1] == s.penalty[0, 2] == -2.5
    torch.testing.assert_close(s.rewards, s.rm_rewards + s.penalty)
    with pytest.raises(ValueError, match="reward level"):
        ppo.PPOTrainer(model, tokenizer, PPOConfig(), 1, reward_level="tokens")


def test_the_level_travels_with_the_adapter_into_ppo(tokenizer, tmp_path):
    from lastmile import ppo
    from lastmile.config import PPOConfig
    from lastmile.io import write_jsonl

    write_jsonl(tmp_path / "rm.jsonl", _rows(tokenizer, 4))
    held_out = [dict(id=f"h{i}", input=f"Package {i} provides a tool.", output="a tool",
                     prompt=_prompt(tokenizer, f"Summarize: package {i}.")) for i in range(2)]
    cfg = _cfg(batch_size=6, max_steps=1, eval_examples=2, level="sequence")
    summary = reward.train_reward_model(tmp_path / "rm.jsonl", tmp_path / "rm", cfg,
                                        "tiny-random", eval_rows=held_out)
    adapter = tmp_path / "rm" / "adapter"
    assert summary["level"] == "sequence" and reward.adapter_level(adapter) == "sequence"
    assert set(summary["eval"]["accuracy"]) == {"copy_input", "random_tokens"}
    meta = json.loads((adapter / "lastmile_adapter.json").read_text())
    assert meta["lora"]["r"] == 4  # the adapter's own metadata kept beside the level
    assert not list(adapter.parent.glob(".adapter.tmp*"))  # written whole, then moved in
    train = tmp_path / "train.jsonl"
    write_jsonl(train, [{k: r[k] for k in ("id", "input", "output", "prompt")}
                        for r in _rows(tokenizer, 3) if r["category"] == "true"])
    out = ppo.train_ppo(train, adapter, tmp_path / "ppo",
                        PPOConfig(batch_size=3, max_new_tokens=4, max_updates=1), "tiny-random")
    assert out["reward_level"] == "sequence"
    # An adapter saved without the level (before the option existed) was token-level.
    (adapter / "lastmile_adapter.json").write_text(json.dumps({"lora": meta["lora"]}))
    assert reward.adapter_level(adapter) == "token"


def test_held_out_evaluation_and_report_name_swapped_entities(tokenizer, tmp_path):
    from lastmile import negatives
    from lastmile.config import NEGATIVE_CATEGORIES, NegativesConfig
    from lastmile.io import write_jsonl
    from lastmile.report import rm_table

    def rows(n, start=0):
        out = []
        for i in range(start, start + n):
            text = f"Alice moved {i + 3} boxes to Paris with Bob in {2000 + i}."
            out.append(dict(id=f"r{i}", input=text, output=f"Alice moved {i + 3} boxes to Paris.",
                            prompt=_prompt(tokenizer, f"Summarize: {text}")))
        return out

    six = NegativesConfig(categories=(*NEGATIVE_CATEGORIES, "swap_entities"))
    write_jsonl(tmp_path / "rm.jsonl", negatives.synthesize(rows(4), six, tokenizer))
    summary = reward.train_reward_model(tmp_path / "rm.jsonl", tmp_path / "out",
                                        _cfg(batch_size=7, max_steps=1, eval_examples=3),
                                        "tiny-random", eval_rows=rows(3, start=10))
    evaluation = summary["eval"]
    assert set(evaluation["accuracy"]) == set(six.categories)
    assert evaluation["pairs"]["swap_entities"] == 3
    assert summary["categories"]["swap_entities"] == 4
    table = rm_table(evaluation)
    assert "swapped entities" in [row[0] for row in table.rows]
