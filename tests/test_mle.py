"""MLE control (paper §3.4): loss on output tokens only, EOS included; training lowers it."""

from __future__ import annotations

import json

import pytest
import torch

from lastmile import mle
from lastmile.config import LoraSpec, MLEConfig, OptimConfig
from lastmile.modeling import AdapterModel, collate
from lastmile.train_utils import TokenExample


def _cfg(**overrides) -> MLEConfig:
    return MLEConfig(lora=LoraSpec(r=4, alpha=8), **overrides)


def _rows(tokenizer, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Summarize: package {i} parses config files."}],
            tokenize=False, add_generation_prompt=True)
        rows.append({"id": str(i), "input": f"package {i}", "prompt": prompt,
                     "output": "config file parser"})
    return rows


@pytest.fixture
def batch_and_states(tiny_model, tokenizer):
    model = AdapterModel(tiny_model)
    eos = tokenizer.eos_token_id
    batch = collate([[1, 2, 3, 4], [5, 6]], [[7, 8, eos], [9, eos]], tokenizer.pad_token_id)
    with torch.no_grad():
        hidden = model.hidden_states(batch.input_ids, batch.attention_mask, None)
    return model, batch, hidden


def test_prompt_targets_are_masked_and_output_targets_count(batch_and_states, tokenizer):
    model, batch, hidden = batch_and_states
    loss = mle.output_nll_sum(model, hidden, batch.input_ids, batch.output_mask)

    prompt_changed = batch.input_ids.clone()
    prompt_changed[0, 2] = 999  # a prompt token as a *target*; the states stay the same
    prompt_changed[1, 1] = 555
    same = mle.output_nll_sum(model, hidden, prompt_changed, batch.output_mask)
    assert same.item() == pytest.approx(loss.item(), rel=1e-6)

    output_changed = batch.input_ids.clone()
    output_changed[0, 5] = 999  # the first output token of row 0
    assert mle.output_nll_sum(model, hidden, output_changed, batch.output_mask).item() != \
        pytest.approx(loss.item(), rel=1e-4)

    eos_changed = batch.input_ids.clone()
    eos_changed[1, 3] = 999  # row 1's EOS is a target too: the model learns to stop
    assert eos_changed[1, 3] != tokenizer.eos_token_id
    assert mle.output_nll_sum(model, hidden, eos_changed, batch.output_mask).item() != \
        pytest.approx(loss.item(), rel=1e-4)


def test_loss_equals_transformers_masked_cross_entropy(tiny_model, tokenizer):
    model = AdapterModel(tiny_model)
    eos = tokenizer.eos_token_id
    examples = [TokenExample([1, 2, 3, 4], [7, 8, eos]), TokenExample([5, 6], [9, 10, 11, eos])]
    ours = mle.mle_loss(model, examples, tokenizer.pad_token_id, adapter=None)
    batch = collate([e.prompt_ids for e in examples], [e.output_ids for e in examples],
                    tokenizer.pad_token_id)
    labels = batch.input_ids.masked_fill(~batch.output_mask, -100)  # prompt and padding ignored
    with torch.no_grad():
        reference = tiny_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               labels=labels).loss
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_a_few_steps_reduce_the_loss(tiny_model, tokenizer, tmp_path, precision):
    model = AdapterModel(tiny_model)
    rows = _rows(tokenizer, 4)
    examples = mle.encode_rows(tokenizer, rows, 100)
    assert all(e.output_ids[-1] == tokenizer.eos_token_id for e in examples)
    model.add_adapter("policy", _cfg().lora, seed=0)
    initial = {n: p.detach().clone() for n, p in model.base.named_parameters() if "lora_" in n}
    before = mle.mle_loss(model, examples, tokenizer.pad_token_id).item()
    cfg = _cfg(batch_size=2, epochs=4, precision=precision)
    cfg.optim = OptimConfig(learning_rate=1e-2)  # the tiny random model needs large steps
    summary = mle.train_mle_adapter(model, tokenizer, rows, cfg, log_path=tmp_path / "log.jsonl")
    after = mle.mle_loss(model, examples, tokenizer.pad_token_id).item()
    assert summary["steps"] == 8
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 8
    assert after < before - 0.4, (before, after)  # chance level is ln(49152) = 10.8
    # Every LoRA weight moved (see test_reward's separable-set test on bf16 autocast).
    moved = {n: not torch.equal(p, initial[n]) for n, p in model.base.named_parameters()
             if "lora_" in n}
    assert moved and all(moved.values()), [n for n, m in moved.items() if not m]


def test_stage_saves_adapter_and_log(tokenizer, tmp_path):
    from lastmile.io import write_jsonl

    write_jsonl(tmp_path / "train.jsonl", _rows(tokenizer, 5))
    summary = mle.train_mle(tmp_path / "train.jsonl", tmp_path / "out",
                            _cfg(batch_size=2, max_steps=2),
                            "tiny-random")
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    log = [json.loads(x) for x in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2] and summary["train"]["steps"] == 2
    assert log[0]["lr"] == pytest.approx(1e-5)  # the paper's starting learning rate


def test_bad_rows_are_named(tokenizer):
    rows = _rows(tokenizer, 2)
    rows[1]["output"] = "  "
    with pytest.raises(ValueError, match=r"row 2 \(id='1'\) needs a non-empty text 'output'"):
        mle.validate_rows(rows)


# ----------------------------------------------------------------------------- faults

def _poison(monkeypatch, bad_calls) -> None:
    """mle_loss_sum returns NaN on the calls (1-based, one per step here) in `bad_calls`."""
    real, calls = mle.mle_loss_sum, []

    def poisoned(model, examples, pad_id, adapter=mle.ADAPTER):
        calls.append(1)
        loss = real(model, examples, pad_id, adapter)
        return loss * float("nan") if bad_calls(len(calls)) else loss

    monkeypatch.setattr(mle, "mle_loss_sum", poisoned)


def test_a_nan_batch_is_skipped_logged_and_training_completes(tokenizer, tmp_path, monkeypatch,
                                                               caplog):
    from lastmile.io import write_jsonl
    from safetensors.torch import load_file

    write_jsonl(tmp_path / "train.jsonl", _rows(tokenizer, 8))  # batch 2: 4 steps
    _poison(monkeypatch, lambda call: call == 2)
    cfg = _cfg(batch_size=2)
    cfg.optim = OptimConfig(learning_rate=1e-2)
    with caplog.at_level("WARNING"):
        summary = mle.train_mle(tmp_path / "train.jsonl", tmp_path / "out", cfg, "tiny-random")
    log = [json.loads(x) for x in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2, 3, 4]
    assert log[1]["skipped"] and log[1]["nonfinite"] == ["loss"] and log[1]["loss"] is None
    assert len(log[1]["ids"]) == 2 and log[1]["ids"] == [str(i) for i in log[1]["indices"]]
    assert not any(x.get("skipped") for x in log[:1] + log[2:])
    assert summary["train"]["skipped_steps"] == 1 and summary["train"]["steps"] == 4
    assert "MLE: step 2: non-finite loss=nan" in caplog.text
    weights = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)  # it trained


def test_consecutive_nan_batches_stop_the_stage_without_an_adapter(tokenizer, tmp_path,
                                                                   monkeypatch):
    from lastmile.io import write_jsonl

    write_jsonl(tmp_path / "train.jsonl", _rows(tokenizer, 10))  # batch 2: 5 steps
    _poison(monkeypatch, lambda call: call >= 2)
    with pytest.raises(FloatingPointError,
                       match=r"MLE: step 4: non-finite loss=nan; 3 bad updates in a row "
                             r"\(max_bad_updates=3\)"):
        mle.train_mle(tmp_path / "train.jsonl", tmp_path / "out", _cfg(batch_size=2),
                      "tiny-random")
    assert not (tmp_path / "out" / "adapter").exists()


def test_bfloat16_loss_and_gradient_stay_close_to_float32(tiny_model, tokenizer,
                                                          assert_bf16_close):
    model = AdapterModel(tiny_model)
    model.add_adapter("policy", _cfg().lora, seed=0)
    with torch.no_grad():  # a non-zero LoRA B, so every LoRA weight gets a gradient
        for p in model.adapter_parameters("policy"):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    examples = mle.encode_rows(tokenizer, _rows(tokenizer, 3), 100)
    params = [p for p in model.adapter_parameters("policy") if p.requires_grad]
    assert_bf16_close(model, params, loss_rel=0.02, loss_fn=lambda: mle.mle_loss(
        model, examples, tokenizer.pad_token_id))


def test_bfloat16_stage_trains_and_bad_precision_is_named(tokenizer, tmp_path):
    from lastmile.io import write_jsonl

    write_jsonl(tmp_path / "train.jsonl", _rows(tokenizer, 4))
    summary = mle.train_mle(tmp_path / "train.jsonl", tmp_path / "out",
                            _cfg(batch_size=2, max_steps=2, precision="bfloat16"), "tiny-random")
    assert summary["precision"] == "bfloat16" and summary["train"]["steps"] == 2
    with pytest.raises(ValueError, match="MLEConfig.precision must be one of"):
        mle.train_mle(tmp_path / "train.jsonl", tmp_path / "o2", _cfg(precision="fp8"),
                      "tiny-random")
    assert not (tmp_path / "o2").exists()  # refused before anything was written


def _young_adapter_model(tokenizer, lr: float) -> AdapterModel:
    """A tiny Llama whose projections output values ~1 as SmolLM2's do (the default tiny
    model's are ~0.1, where bf16 steps are 10x finer), with a policy LoRA one Adam step old:
    every weight moved by lr x the sign of its float32 gradient (Adam's first step)."""
    from lastmile.modeling import tiny_llama

    base = tiny_llama(len(tokenizer), initializer_range=0.1)
    for p in base.parameters():
        p.requires_grad_(False)
    model = AdapterModel(base)
    model.add_adapter("policy", LoraSpec(r=8, alpha=16), seed=0)
    examples = _random_examples(tokenizer, 16, seed=2)
    mle.mle_loss(model, examples, tokenizer.pad_token_id).backward()
    with torch.no_grad():
        for p in model.adapter_parameters("policy"):
            p -= lr * torch.sign(p.grad)
            p.grad = None
    return model


def _random_examples(tokenizer, n: int, seed: int) -> list[TokenExample]:
    g = torch.Generator().manual_seed(seed)
    return [TokenExample(torch.randint(100, 5000, (40,), generator=g).tolist(),
                         torch.randint(100, 5000, (30,), generator=g).tolist()
                         + [tokenizer.eos_token_id]) for _ in range(n)]


def test_bfloat16_sees_a_young_adapter_as_float32_does(tokenizer):
    """The demo's MLE regime (1e-4): one step's LoRA update is below half a bf16 step of the
    base outputs it is added to. bf16 sums rounded it away: the forward saw 16% of the
    adapter's effect on the loss (SmolLM2: ~40%), so bf16 MLE trained on a forward that
    hardly saw its own updates (la-ROUGE-L 0.149 against 0.201). `modeling.autocast` keeps
    the sums and attention float32 (94% here)."""
    from lastmile.modeling import autocast

    model = _young_adapter_model(tokenizer, lr=1e-4)
    examples = _random_examples(tokenizer, 16, seed=2)  # the batch of the step
    effect = {}
    for precision in ("float32", "bfloat16"):
        with torch.no_grad(), autocast(model, precision):
            base = mle.mle_loss(model, examples, tokenizer.pad_token_id, adapter=None)
            adapted = mle.mle_loss(model, examples, tokenizer.pad_token_id)
        effect[precision] = (adapted - base).item()
    assert effect["float32"] < -2e-3  # the step lowers its batch's loss
    assert effect["bfloat16"] == pytest.approx(effect["float32"], rel=0.2), effect
