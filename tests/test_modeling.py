"""Adapters on one frozen base, the batch layout and its token alignment (tiny random Llama)."""

from __future__ import annotations

import pytest
import torch

from lastmile.config import LoraSpec
from lastmile.modeling import AdapterModel, collate, encode_outputs, load_base

SMALL = LoraSpec(r=4, alpha=8)


def _perturb(model: AdapterModel, name: str, seed: int) -> None:
    """Random LoRA B weights (peft starts them at zero, i.e. an adapter that does nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters(name):
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def _batch(tokenizer):
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    outputs = [[11, 12, tokenizer.eos_token_id], [13, 14, 15, 16, tokenizer.eos_token_id]]
    return collate(prompts, outputs, tokenizer.pad_token_id)


def test_adapter_save_load_round_trip_with_head(tiny_model, tokenizer, tmp_path):
    model = AdapterModel(tiny_model)
    model.add_adapter("reward", SMALL, head=True, seed=1)
    _perturb(model, "reward", seed=2)
    batch = _batch(tokenizer)
    with torch.no_grad():
        before = model.scalar(model.hidden_states(batch.input_ids, batch.attention_mask,
                                                  "reward"), "reward")
        plain = model.hidden_states(batch.input_ids, batch.attention_mask, None)
    saved = model.save_adapter("reward", tmp_path / "adapter")
    assert (saved / "adapter_config.json").exists() and (saved / "head.safetensors").exists()
    assert not list(tmp_path.glob(".adapter.tmp*"))  # the staging directory is gone

    fresh_base, _ = load_base("tiny-random")
    fresh = AdapterModel(fresh_base)
    fresh.load_adapter("reward", saved)
    with torch.no_grad():
        hidden = fresh.hidden_states(batch.input_ids, batch.attention_mask, "reward")
        after = fresh.scalar(hidden, "reward")
    torch.testing.assert_close(after, before)
    assert not torch.allclose(hidden, plain)  # the adapter really changes the states
    assert fresh.specs["reward"].r == SMALL.r
    assert not any(p.requires_grad for p in fresh.adapter_parameters("reward"))


def test_loading_under_another_name_and_missing_adapter(tiny_model, tokenizer, tmp_path):
    model = AdapterModel(tiny_model)
    model.add_adapter("policy", SMALL, seed=1)
    _perturb(model, "policy", seed=3)
    batch = _batch(tokenizer)
    with torch.no_grad():
        want = model.hidden_states(batch.input_ids, batch.attention_mask, "policy")
    model.save_adapter("policy", tmp_path / "p")
    other = AdapterModel(load_base("tiny-random")[0])
    other.load_adapter("generate", tmp_path / "p")
    with torch.no_grad():
        got = other.hidden_states(batch.input_ids, batch.attention_mask, "generate")
    torch.testing.assert_close(got, want)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        other.load_adapter("x", tmp_path)
    with pytest.raises(KeyError, match="no adapter 'nope'"):
        other.use_adapter("nope")


def test_switching_keeps_trainable_flags_and_routes_gradients(tiny_model, tokenizer, tmp_path):
    model = AdapterModel(tiny_model)
    model.add_adapter("reward", SMALL, head=True, seed=0)
    model.save_adapter("reward", tmp_path / "r")
    model2 = AdapterModel(load_base("tiny-random")[0])
    model2.load_adapter("reward", tmp_path / "r", trainable=False)  # frozen, as in PPO
    model2.add_adapter("policy", SMALL, seed=1)
    model2.add_adapter("value", SMALL, head=True, seed=2)
    for name in ("policy", "value", None, "reward", "policy"):
        model2.use_adapter(name)
        assert all(p.requires_grad for p in model2.adapter_parameters("policy"))
        assert all(p.requires_grad for p in model2.adapter_parameters("value"))
        assert not any(p.requires_grad for p in model2.adapter_parameters("reward"))
    assert not any(p.requires_grad for n, p in model2.base.named_parameters() if "lora_" not in n)

    _perturb(model2, "policy", seed=5)  # non-zero B so A receives gradient too
    batch = _batch(tokenizer)
    hidden = model2.hidden_states(batch.input_ids, batch.attention_mask, "policy")
    hidden.pow(2).mean().backward()
    policy_grads = [p.grad for p in model2.adapter_parameters("policy")]
    assert all(g is not None for g in policy_grads) and any(g.abs().sum() > 0 for g in policy_grads)
    assert all(p.grad is None for p in model2.adapter_parameters("value"))
    assert all(p.grad is None for p in model2.adapter_parameters("reward"))


def test_base_output_unaffected_by_a_trained_adapter(tokenizer):
    plain_base, _ = load_base("tiny-random")
    batch = _batch(tokenizer)
    with torch.no_grad():
        reference = plain_base.get_decoder()(input_ids=batch.input_ids,
                                             attention_mask=batch.attention_mask).last_hidden_state
    model = AdapterModel(load_base("tiny-random")[0])
    model.add_adapter("policy", SMALL, seed=0)
    _perturb(model, "policy", seed=7)
    with torch.no_grad():
        adapted = model.hidden_states(batch.input_ids, batch.attention_mask, "policy")
        base = model.hidden_states(batch.input_ids, batch.attention_mask, None)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(base[real], reference[real])
    assert not torch.allclose(adapted[real], reference[real], atol=1e-4)
    with model.use(None):  # the context manager restores the previous adapter
        pass
    assert model._active is None


def test_encode_outputs_adds_eos_only_when_it_fits(tokenizer):
    eos = tokenizer.eos_token_id
    text = "libfoo is a library"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids)
    fits, exact, cut = (encode_outputs(tokenizer, [text], m)[0] for m in (n + 1, n, n - 1))
    assert fits == ids + [eos]
    assert exact == ids and eos not in exact
    assert cut == ids[: n - 1]
    assert encode_outputs(tokenizer, [text], n + 5, add_eos=False)[0] == ids
    assert encode_outputs(tokenizer, [""], 5)[0] == [eos]  # an empty output is just "stop"


def test_collate_layout_and_alignment(tokenizer):
    pad = tokenizer.pad_token_id
    batch = collate([[1, 2, 3], [4]], [[5, 6], [7, 8, 9, 10]], pad)
    assert batch.input_ids.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 10]]
    batch = collate([[1, 2, 3], [4]], [[5], [7, 8]], pad)
    assert batch.input_ids.tolist() == [[1, 2, 3, 5], [4, 7, 8, pad]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch.output_mask.tolist() == [[False, False, False, True],
                                          [False, True, True, False]]
    assert batch.prompt_lengths.tolist() == [3, 1] and batch.output_lengths.tolist() == [1, 2]
    # hidden[:, i] predicts input_ids[:, i + 1]: the action mask marks the states before outputs
    assert batch.action_mask().tolist() == [[False, False, True], [True, True, False]]
    with pytest.raises(ValueError):
        collate([[1]], [[2], [3]], pad)


def test_left_and_right_padding_give_the_same_states(tiny_model, tokenizer):
    model = AdapterModel(tiny_model)
    short, long = [5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        alone = model.hidden_states(torch.tensor([short]), torch.ones(1, 4, dtype=torch.long),
                                    None)[0]
        right = collate([short, long], [[], []], pad)
        h_right = model.hidden_states(right.input_ids, right.attention_mask, None)[0, :4]
        left_ids = torch.tensor([[pad] * 3 + short, long])
        left_mask = torch.tensor([[0] * 3 + [1] * 4, [1] * 7])
        h_left = model.hidden_states(left_ids, left_mask, None)[0, 3:]
    torch.testing.assert_close(h_right, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(h_left, alone, atol=1e-5, rtol=1e-4)
