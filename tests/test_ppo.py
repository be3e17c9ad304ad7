"""PPO (paper §3.3) on the tiny random Llama: the equations by hand, the update, the stage."""

from __future__ import annotations

import json

import pytest
import torch

from lastmile import ppo, ppo_trainer, sampling
from lastmile import ppo_equations as eq
from lastmile.config import LoraSpec, PPOConfig
from lastmile.modeling import AdapterModel, collate, load_base

SMALL = LoraSpec(r=4, alpha=8)
LOG_FIELDS = ("update", "batch_kind", "reward_mean", "reward_per_token", "rm_reward_per_token",
              "length_penalty_mean", "response_length_mean", "response_words_mean",
              "reference_length_mean", "excess_length_mean", "excess_tokens_mean",
              "policy_loss", "value_loss", "clip_fraction", "approx_kl", "value_mean",
              "value_explained_variance",
              "advantage_mean", "return_mean", "final_value_mean", "final_advantage_mean",
              "lr", "policy_grad_norm", "value_grad_norm", "sample_seconds", "seconds")


# ----------------------------------------------------------------------------- helpers

def _perturb(model: AdapterModel, name: str, seed: int, scale: float = 0.05) -> None:
    """Random LoRA weights (peft starts B at zero, an adapter that changes nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters(name):
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def _model(tiny_model, perturb: bool = True) -> AdapterModel:
    model = AdapterModel(tiny_model)
    model.add_adapter("reward", SMALL, head=True, seed=1, trainable=False)
    model.add_adapter("policy", LoraSpec(r=8, alpha=16), seed=2)
    model.add_adapter("value", LoraSpec(r=8, alpha=16), head=True, seed=3)
    if perturb:
        for i, name in enumerate(("reward", "policy", "value")):
            _perturb(model, name, seed=10 + i)
    return model


def _rows(tokenizer, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        text = f"package {i} provides tools number {i} for the shell and more words " * (1 + i % 3)
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Summarize:\n" + text}], add_generation_prompt=True,
            tokenize=False)
        rows.append({"id": i, "input": text, "output": f"tools {i} for shell", "prompt": prompt})
    return rows


def _write_rows(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------- equations

def test_length_penalty_counts_tokens_past_the_reference():
    out = torch.tensor([3, 2, 5])
    ref = torch.tensor([2, 3, 0])
    got = eq.length_penalty(out, ref, T=5)
    want = torch.tensor([[0, 0, -2.5, 0, 0],  # one token past a 2-token reference
                         [0, 0, 0, 0, 0],  # shorter than its reference: no penalty
                         [-2.5] * 5])
    torch.testing.assert_close(got, want)
    assert eq.length_penalty(out, ref, T=5, coef=-1.0).sum() == -6.0


def test_gae_and_value_targets_by_hand_with_length_penalty():
    # Row 0: 3 tokens, reference 2 tokens -> the third pays -2.5. Row 1: 2 tokens (+ padding).
    mask = ppo_trainer.output_space_mask(torch.tensor([3, 2]), 3)
    rm = torch.tensor([[1.0, 0.5, 0.25], [0.5, 1.0, 9.0]])  # 9.0 sits on padding: ignored
    rewards = rm + eq.length_penalty(torch.tensor([3, 2]), torch.tensor([2, 3]), 3)
    values = torch.tensor([[0.5, 1.0, 2.0], [1.0, 0.5, 7.0]])
    adv, ret = eq.gae(rewards, values, mask, gamma=0.5, lam=0.5)
    # Row 0: r = (1, 0.5, -2.25); deltas -4.25, 0.5, 1.0 (V(s_3) = 0)
    #   A2 = -4.25, A1 = 0.5 + 0.25 * -4.25 = -0.5625, A0 = 1 + 0.25 * -0.5625 = 0.859375
    #   G2 = -2.25, G1 = 0.5 + 0.5 * -2.25 = -0.625, G0 = 1 + 0.5 * -0.625 = 0.6875
    # Row 1: r = (0.5, 1); deltas 1 - 0.5 = 0.5 and 0.5 + 0.25 - 1 = -0.25
    #   A1 = 0.5, A0 = -0.25 + 0.25 * 0.5 = -0.125; G1 = 1, G0 = 0.5 + 0.5 = 1
    torch.testing.assert_close(adv, torch.tensor([[0.859375, -0.5625, -4.25],
                                                  [-0.125, 0.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.6875, -0.625, -2.25], [1.0, 1.0, 0.0]]))


def test_last_token_reads_each_rows_ending_action_and_the_sign_of_stopping():
    mask = ppo_trainer.output_space_mask(torch.tensor([3, 1, 0]), 3)
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    torch.testing.assert_close(eq.last_token(x, mask), torch.tensor([3.0, 4.0, 0.0]))
    # One row of three tokens, reward 0.5 each, a value head expecting 4 everywhere: the
    # ending action's advantage is r - V = 0.5 - 4 (V = 0 past the end), the others' are
    # positive, so Eq. 2 tells the policy that stopping is the worst thing it did.
    mask = ppo_trainer.output_space_mask(torch.tensor([3]), 3)
    adv, _ = eq.gae(torch.full((1, 3), 0.5), torch.full((1, 3), 4.0), mask, gamma=1.0, lam=0.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5, -3.5]]))
    torch.testing.assert_close(eq.last_token(adv, mask), torch.tensor([-3.5]))


def test_explained_variance_by_hand():
    mask = ppo_trainer.output_space_mask(torch.tensor([3, 1]), 3)
    returns = torch.tensor([[3.0, 1.0, -1.0], [1.0, 99.0, 99.0]])  # 99: padding, ignored
    # Masked returns 3, 1, -1, 1: mean 1, variance (4 + 0 + 4 + 0) / 4 = 2.
    torch.testing.assert_close(eq.explained_variance(returns, returns, mask), torch.tensor(1.0))
    # A constant V (any constant) leaves the returns' spread: 0.
    torch.testing.assert_close(eq.explained_variance(torch.full((2, 3), -7.0), returns, mask),
                               torch.tensor(0.0))
    # V = (2, 1, 0 | 0): errors 1, 0, -1, 1, mean 0.25, variance (0.5625 + 0.0625 + 1.5625
    # + 0.5625) / 4 = 0.6875, so 1 - 0.6875 / 2 = 0.65625.
    values = torch.tensor([[2.0, 1.0, 0.0], [0.0, 5.0, 5.0]])
    torch.testing.assert_close(eq.explained_variance(values, returns, mask),
                               torch.tensor(0.65625))
    # The sign flipped: worse than the mean, below 0 (errors 2 * G - 2: variance 4 * 2 = 8).
    torch.testing.assert_close(eq.explained_variance(-returns, returns, mask), torch.tensor(-3.0))
    assert torch.isnan(eq.explained_variance(values, torch.ones(2, 3), mask))


def test_value_targets_are_the_monte_carlo_return_not_a_plus_v():
    mask = ppo_trainer.output_space_mask(torch.tensor([4, 2]), 4)
    rewards = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    values = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    adv, ret = eq.gae(rewards, values, mask, gamma=0.9, lam=0.95)
    # Eq. 4 does not depend on the value predictions ...
    torch.testing.assert_close(ret, eq.gae(rewards, values * 0, mask, 0.9, 0.95)[1])
    assert not torch.allclose(ret, (adv + values) * mask)  # ... so it is not GAE's A + V
    # with λ = 1, Eq. 2 telescopes to G_t - V(s_t)
    adv1, _ = eq.gae(rewards, values, mask, gamma=0.9, lam=1.0)
    torch.testing.assert_close(adv1, (ret - values) * mask)


def test_policy_loss_clipping_zeroes_the_gradient_only_in_the_clipped_direction():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5])).requires_grad_()  # ratios
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    mask = torch.ones(4, dtype=torch.bool)
    loss, clip_fraction, approx_kl = eq.policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # per token -min(wA, clip(w)A): -1.2, +1.5, +0.8, -0.5 -> mean 0.15
    torch.testing.assert_close(loss, torch.tensor(0.15))
    loss.backward()
    # ratio above 1+ε with A > 0 and below 1-ε with A < 0 are clipped: no gradient; the
    # other two keep d(-wA)/dlogp = -wA
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 1.5, 0.0, -0.5]) / 4)
    assert float(clip_fraction) == 0.5
    torch.testing.assert_close(approx_kl, 0.5 * (logp.detach() ** 2).mean())


def test_positive_advantage_raises_the_action_logprob(tiny_model, tokenizer):
    model = _model(tiny_model)
    trainer = ppo.PPOTrainer(model, tokenizer, PPOConfig(), total_updates=1)
    batch = collate([[1, 2, 3, 4], [5, 6, 7]], [[11, 12, 13], [14, 15]], tokenizer.pad_token_id)
    mask = ppo_trainer.output_space_mask(batch.output_lengths)

    def logprobs():  # [B, T] log pi(a_t | s_t), states at p - 1
        hidden = model.hidden_states(batch.input_ids, batch.attention_mask, "policy")
        flat = model.token_logprobs(hidden[:, :-1][batch.action_mask()],
                                    batch.input_ids[:, 1:][batch.action_mask()])
        return ppo_trainer.to_output_space(flat, mask)

    for sign in (1.0, -1.0):
        before = logprobs()
        advantages = torch.where(mask, sign, 0.0)
        loss, _, _ = eq.policy_loss(before, before.detach(), advantages, mask, 0.2)
        loss.backward()
        with torch.no_grad():
            for p in trainer.policy_params:
                p -= 0.05 * p.grad
                p.grad = None
            after = logprobs()
        change = ((after - before.detach()) * mask).sum()
        assert sign * change > 0, (sign, float(change))


def test_batch_kinds_alternate_half_and_half():
    assert ppo.batch_kinds(6, 0.5) == ["sampled", "reference"] * 3
    assert ppo.batch_kinds(3, 0.0) == ["sampled"] * 3
    assert ppo.batch_kinds(3, 1.0) == ["reference"] * 3
    assert ppo.batch_kinds(8, 0.25).count("reference") == 2
    with pytest.raises(ValueError, match="reference_fraction"):
        ppo.batch_kinds(2, 1.5)


# ----------------------------------------------------------------------------- sampling

def test_sampling_budget_eos_min_length_and_merge_restores_the_base(tiny_model, tokenizer):
    model = _model(tiny_model)
    eos = tokenizer.eos_token_id
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    weights = {n: p.detach().clone() for n, p in model.base.named_parameters()
               if "lora_" not in n}
    attention = model.base.config._attn_implementation

    def sample(merge, eos_id=eos, **kw):
        return sampling.sample_outputs(model, prompts, "policy", max_new_tokens=6,
                                       eos_id=eos_id, pad_id=tokenizer.pad_token_id,
                                       generator=torch.Generator().manual_seed(0), merge=merge,
                                       **kw)

    merged, plain = sample(True), sample(False)
    assert merged == plain  # the merged LoRA samples the same tokens
    half = sample(True, dtype=torch.bfloat16)
    assert len(half) == 2 and all(1 <= len(r) <= 6 for r in half)
    for name, p in model.base.named_parameters():  # the base is never written
        if name in weights:
            assert torch.equal(p, weights[name]) and p.dtype == torch.float32, name
    assert model.base.config._attn_implementation == attention
    for row in merged:
        assert 1 <= len(row) <= 6 and eos not in row[:-1]
    # Make the first token drawn for row 0 the "EOS": row 0 stops there, the others go on
    # to their own stop; min_new_tokens forbids stopping early.
    stop = merged[0][0]
    stopped = sample(True, eos_id=stop)
    assert stopped[0] == [stop]
    assert all(stop not in row[:-1] and len(row) <= 6 for row in stopped)
    forced = sample(True, eos_id=stop, min_new_tokens=6)
    assert all(len(r) == 6 and stop not in r for r in forced)


def test_reward_from_merged_weights_equals_the_lora_forward(tiny_model, tokenizer):
    model = _model(tiny_model)
    prompts, outputs = [[1, 2, 3, 4], [5, 6]], [[7, 8, tokenizer.eos_token_id], [9]]
    merged = ppo.PPOTrainer(model, tokenizer, PPOConfig(), 1, merge=True)
    plain = ppo.PPOTrainer(model, tokenizer, PPOConfig(), 1, merge=False)
    a = merged.rollout("reference", prompts, outputs, outputs)
    b = plain.rollout("reference", prompts, outputs, outputs)
    torch.testing.assert_close(a.rm_rewards, b.rm_rewards, rtol=1e-5, atol=1e-6)
    assert a.rm_rewards[a.mask].abs().min() > 0 and not a.rm_rewards[~a.mask].any()


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(sampling.filter_logits(logits, top_k=2)).tolist() == [[True, True, False,
                                                                           False]]
    assert torch.isfinite(sampling.filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False,
                                                                             False]]
    assert torch.isfinite(sampling.filter_logits(logits)).all()


# ----------------------------------------------------------------------------- the update

def _straightforward(model: AdapterModel, rollout: ppo.Rollout, cfg: PPOConfig) -> dict:
    """A textbook PPO loss: no-grad forwards for pi_old and V, full-sequence float32 logits."""
    batch = rollout.batch
    mask = rollout.mask
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def logprobs():  # [B, T]: full logits over every position, then pick the output tokens
        with model.use("policy"):
            logits = model.base(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=pos).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None])
        return ppo_trainer.to_output_space(logp[..., 0][batch.action_mask()], mask)

    def values():
        hidden = model.hidden_states(batch.input_ids, batch.attention_mask, "value")
        return ppo_trainer.to_output_space(model.scalar(hidden[:, :-1], "value")[batch.action_mask()],
                                   mask)

    with torch.no_grad():
        old_logp, old_values = logprobs(), values()
    adv, ret = eq.gae(rollout.rewards, old_values, mask, cfg.gamma, cfg.lam)
    for p in model.parameters():
        p.grad = None
    p_loss, _, _ = eq.policy_loss(logprobs(), old_logp, adv, mask, cfg.clip_eps)
    v_loss = eq.value_loss(values(), ret, mask)
    (p_loss + v_loss).backward()
    return {"policy_loss": float(p_loss.detach()), "value_loss": float(v_loss.detach())}


def _grads(params) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in params]


def test_optimised_path_matches_the_straightforward_one(tiny_model, tokenizer):
    cfg = PPOConfig(max_new_tokens=7)
    model = _model(tiny_model)
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13], [14, 15]]
    outputs = [[20, 21, 22, tokenizer.eos_token_id], [23, 24, 25, 26, 27, 28, 29],
               [30, tokenizer.eos_token_id], [31, 32, 33]]
    references = [[20, tokenizer.eos_token_id], [23] * 8, [30, 31, tokenizer.eos_token_id],
                  [31]]
    fast = ppo.PPOTrainer(model, tokenizer, cfg, 1, micro_batch_size=1)
    slow = ppo.PPOTrainer(model, tokenizer, cfg, 1, micro_batch_size=None, fast=False)
    assert fast.fast and not slow.fast
    rollout = fast.rollout("sampled", prompts, outputs, references)
    assert rollout.penalty.sum() == -2.5 * (2 + 0 + 0 + 2)  # rows 0 and 3 overrun

    got = fast.gradients(rollout)
    params = fast.policy_params + fast.value_params
    got_grads = _grads(params)
    textbook = slow.gradients(rollout)
    textbook_grads = _grads(params)
    want = _straightforward(model, rollout, cfg)
    want_grads = _grads(params)

    for stats in (got, textbook):
        assert stats["policy_loss"] == pytest.approx(want["policy_loss"], rel=1e-5, abs=1e-6)
        assert stats["value_loss"] == pytest.approx(want["value_loss"], rel=1e-5, abs=1e-6)
    assert abs(textbook["approx_kl"]) < 1e-10 and got["clip_fraction"] == 0.0
    assert any(g.abs().sum() > 0 for g in want_grads[: len(fast.policy_params)])
    for a, b, c in zip(got_grads, textbook_grads, want_grads):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-6)


def test_bfloat16_precision_stays_close_to_float32(tiny_model, tokenizer):
    model = _model(tiny_model)
    prompts, outputs = [[1, 2, 3, 4, 5], [6, 7, 8]], [[9, 10, 11], [12, tokenizer.eos_token_id]]
    grads, losses = {}, {}
    for precision in ("float32", "bfloat16"):
        trainer = ppo.PPOTrainer(model, tokenizer, PPOConfig(), 1, precision=precision)
        rollout = trainer.rollout("sampled", prompts, outputs, [[9]] * 2)
        losses[precision] = trainer.gradients(rollout)
        grads[precision] = torch.cat([p.grad.flatten() for p in trainer.policy_params
                                      + trainer.value_params])
        assert all(p.grad.dtype == torch.float32 for p in trainer.policy_params)
    cosine = torch.nn.functional.cosine_similarity(grads["float32"], grads["bfloat16"], dim=0)
    assert cosine > 0.99, float(cosine)
    for key in ("policy_loss", "value_loss"):
        assert losses["bfloat16"][key] == pytest.approx(losses["float32"][key], rel=0.05)
    with pytest.raises(ValueError, match="precision"):
        ppo.PPOTrainer(model, tokenizer, PPOConfig(), 1, precision="float16")


def test_whitening_kl_and_epochs_run_the_general_path(tiny_model, tokenizer):
    cfg = PPOConfig(max_new_tokens=5, ppo_epochs=2, minibatches=2, kl_coef=0.1,
                    whiten_advantages=True)
    model = _model(tiny_model)
    trainer = ppo.PPOTrainer(model, tokenizer, cfg, total_updates=1)
    assert not trainer.fast
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    outputs = trainer.sample(prompts)
    rollout = trainer.rollout("sampled", prompts, outputs, [[9, tokenizer.eos_token_id]] * 2)
    assert rollout.kl is not None and rollout.kl.abs().sum() > 0  # the policy LoRA is not zero
    before = [p.detach().clone() for p in trainer.policy_params]
    stats = trainer.step(rollout)
    assert trainer.scheduler.last_epoch == 4  # 2 epochs x 2 minibatches = 4 optimiser steps
    assert stats["approx_kl"] > 0 and "kl_base" in stats
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy_params))


# ----------------------------------------------------------------------------- the stage

@pytest.fixture
def stage_inputs(tiny_model, tokenizer, tmp_path):
    model = AdapterModel(tiny_model)
    model.add_adapter("reward", SMALL, head=True, seed=1)
    _perturb(model, "reward", seed=4)
    reward_dir = model.save_adapter("reward", tmp_path / "reward")
    train = tmp_path / "train.jsonl"
    _write_rows(train, _rows(tokenizer, 9))
    return train, reward_dir


def test_train_ppo_end_to_end_writes_adapters_and_log(stage_inputs, tmp_path):
    train, reward_dir = stage_inputs
    cfg = PPOConfig(batch_size=3, max_new_tokens=8, max_updates=4, epochs=2)
    summary = ppo.train_ppo(train, reward_dir, tmp_path / "out", cfg, "tiny-random")
    out = tmp_path / "out"
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "value_adapter" / "head.safetensors").exists()
    assert json.loads((out / "ppo_summary.json").read_text())["updates"] == 4
    rows = [json.loads(line) for line in (out / "ppo_log.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == [1, 2, 3, 4]
    assert [r["batch_kind"] for r in rows] == ["sampled", "reference"] * 2  # half sampled
    for row in rows:
        assert set(LOG_FIELDS) <= set(row), set(LOG_FIELDS) - set(row)
        assert all(isinstance(row[k], (int, float)) for k in LOG_FIELDS if k != "batch_kind")
    for row in rows[1::2]:  # reference batches carry the true outputs (+ EOS)
        assert row["response_length_mean"] == row["reference_length_mean"]
        assert row["excess_length_mean"] == 0 and row["length_penalty_mean"] == 0
    # a random tiny model rarely stops: its samples run to the 8-token budget
    assert rows[0]["response_length_mean"] > rows[0]["reference_length_mean"]
    assert rows[0]["length_penalty_mean"] < 0
    assert summary["sampled_updates"] == summary["reference_updates"] == 2
    assert summary["precision"] == "float32"

    fresh, _ = load_base("tiny-random")
    trained = AdapterModel(fresh)
    trained.load_adapter("policy", out / "adapter")
    lora_b = [p for n, p in trained.base.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # the update moved the fresh (B = 0) LoRA


def test_train_ppo_takes_its_precision_from_the_config(stage_inputs, tmp_path):
    train, reward_dir = stage_inputs
    cfg = PPOConfig(batch_size=3, max_new_tokens=4, max_updates=2, precision="bfloat16")
    summary = ppo.train_ppo(train, reward_dir, tmp_path / "out", cfg, "tiny-random")
    assert summary["precision"] == "bfloat16" and summary["updates"] == 2
    with pytest.raises(ValueError, match="PPO precision must be one of"):
        ppo.train_ppo(train, reward_dir, tmp_path / "o", PPOConfig(precision="fp8"),
                      "tiny-random")


def test_policy_can_start_from_the_mle_adapter(stage_inputs, tmp_path):
    _, reward_dir = stage_inputs
    mle = AdapterModel(load_base("tiny-random")[0])
    mle.add_adapter("policy", LoraSpec(r=32, alpha=16), seed=5)
    _perturb(mle, "policy", seed=6)
    mle_dir = mle.save_adapter("policy", tmp_path / "mle")
    want = [p.detach().clone() for p in mle.adapter_parameters("policy")]
    cfg = PPOConfig(init_policy_from_mle=True)
    model, _ = ppo.build_model("tiny-random", reward_dir, cfg, mle_dir)
    got = model.adapter_parameters("policy")
    assert all(p.requires_grad for p in got)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="init_policy_from_mle"):
        ppo.build_model("tiny-random", reward_dir, cfg, None)


def test_bad_rows_and_config_are_named(stage_inputs, tmp_path):
    train, reward_dir = stage_inputs
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x1", "prompt": "p", "output": ""}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: row 1 \(id='x1'\).*'output'"):
        ppo.train_ppo(bad, reward_dir, tmp_path / "o", PPOConfig(), "tiny-random")
    with pytest.raises(ValueError, match="PPOConfig.temperature"):
        ppo.train_ppo(train, reward_dir, tmp_path / "o", PPOConfig(temperature=0.0),
                      "tiny-random")
    with pytest.raises(FileNotFoundError, match="reward_adapter_dir"):
        ppo.train_ppo(train, tmp_path / "nowhere", tmp_path / "o", PPOConfig(), "tiny-random")


# ----------------------------------------------------------------------------- faults

def _poison_rewards(monkeypatch, bad_calls) -> None:
    """The length penalty (a part of r_t) is NaN on the rollouts (1-based) in `bad_calls`."""
    real, calls = eq.length_penalty, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        penalty = real(*args, **kwargs)
        return penalty * float("nan") if bad_calls(len(calls)) else penalty

    monkeypatch.setattr(ppo_trainer, "length_penalty", poisoned)  # as the trainer calls it


def test_a_nan_reward_skips_that_update_and_training_completes(stage_inputs, tmp_path,
                                                               monkeypatch):
    from safetensors.torch import load_file

    train, reward_dir = stage_inputs
    _poison_rewards(monkeypatch, lambda call: call == 2)
    cfg = PPOConfig(batch_size=3, max_new_tokens=6, max_updates=3)
    summary = ppo.train_ppo(train, reward_dir, tmp_path / "out", cfg, "tiny-random")
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "ppo_log.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in rows] == [False, True, False]
    assert {"reward", "advantage_mean", "value_loss"} <= set(rows[1]["nonfinite"])
    assert rows[1]["reward_mean"] is None and len(rows[1]["ids"]) == 3
    assert summary["skipped_updates"] == 1 and summary["updates"] == 3
    for name in ("adapter", "value_adapter"):
        weights = load_file(str(out / name / "adapter_model.safetensors"))
        assert all(torch.isfinite(w).all() for w in weights.values()), name
    assert not (out / "checkpoints").exists()


def test_nan_rewards_in_a_row_stop_ppo_without_an_adapter(stage_inputs, tmp_path, monkeypatch):
    train, reward_dir = stage_inputs
    _poison_rewards(monkeypatch, lambda call: True)
    cfg = PPOConfig(batch_size=3, max_new_tokens=6, max_updates=3)
    with pytest.raises(FloatingPointError, match=r"PPO: step 3: non-finite reward=nan"):
        ppo.train_ppo(train, reward_dir, tmp_path / "out", cfg, "tiny-random")
    assert not (tmp_path / "out" / "adapter").exists()
    assert not (tmp_path / "out" / "value_adapter").exists()
