"""Adapters on one frozen base, the batch layout and its token alignment (tiny random Llama)."""

from __future__ import annotations

import errno
import math
from pathlib import Path

import pytest
import torch

from lastmile import modeling
from lastmile.config import EMBEDDED_BASE, LoraSpec
from lastmile.io import DiskSpaceError, ensure_free_space, human_bytes
from lastmile.modeling import (GGUF_NAME, TINY_CONFIG, AdapterModel, UnsafeWeightsError,
                               base_fingerprint, check_weight_files, collate,
                               embedded_gguf_path, encode_outputs, load_base, resolve_base,
                               tiny_llama)

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


# ----------------------------------------------------------------------------- disk space

def _free(monkeypatch, free: int, calls: list | None = None):
    """shutil.disk_usage reporting `free` bytes (and recording the paths it was asked about)."""
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")

    def fake(path):
        if calls is not None:
            calls.append(Path(path))
        return usage(10 * free + 1, 9 * free + 1, free)

    monkeypatch.setattr(shutil, "disk_usage", fake)


def test_ensure_free_space_names_needed_and_free_in_human_units(tmp_path, monkeypatch):
    calls: list = []
    _free(monkeypatch, 100 << 20, calls)
    target = tmp_path / "not" / "yet" / "there"
    with pytest.raises(DiskSpaceError, match=r"not enough disk space for the cache: need "
                       r"2\.0 GiB, 100\.0 MiB free on the filesystem of .* \(try elsewhere\)"
                       ) as info:
        ensure_free_space(target, 2 << 30, "the cache", hint="try elsewhere")
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert calls == [tmp_path]  # the nearest existing ancestor: where the file would land
    assert ensure_free_space(target, 100 << 20, "the cache") == 100 << 20  # exactly enough
    assert not target.exists()
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 << 30)] == ["0 B", "1023 B", "1.5 KiB",
                                                                  "5.0 GiB"]


def test_save_adapter_checks_free_space_sized_from_its_tensors(tiny_model, tmp_path, monkeypatch):
    model = AdapterModel(tiny_model)
    model.add_adapter("reward", SMALL, head=True, seed=1)
    nbytes = model.adapter_nbytes("reward")
    lora = [p for n, p in tiny_model.named_parameters() if "lora_" in n and ".reward." in n]
    assert nbytes == sum(p.numel() * 4 for p in lora) + (model.hidden_size + 1) * 4
    saved = model.save_adapter("reward", tmp_path / "ok")
    on_disk = sum(f.stat().st_size for f in saved.glob("*.safetensors"))
    assert nbytes <= on_disk <= nbytes + (64 << 10)  # the estimate is the tensors; headers small

    _free(monkeypatch, nbytes // 2)
    with pytest.raises(DiskSpaceError, match=r"adapter 'reward' in .*full: need .* free"):
        model.save_adapter("reward", tmp_path / "full")
    assert not (tmp_path / "full").exists() and not list(tmp_path.glob(".full.tmp*"))
    with pytest.raises(KeyError, match="no adapter 'nope'"):
        model.adapter_nbytes("nope")


def test_dequantizing_a_gguf_checks_free_space_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("LASTMILE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "src" / GGUF_NAME
    gguf.parent.mkdir()
    gguf.symlink_to(embedded_gguf_path())  # 94 MB: linked, not copied
    # The element count from the header alone: what the gguf package's reader counts too.
    assert modeling.gguf_elements(gguf) == 134_515_008
    need = modeling.dequantized_size(gguf)
    assert 538_000_000 < need < 620_000_000  # 538 MB of fp32 tensors, plus the margin
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 1000)
    assert modeling.dequantized_size(garbage) == 8 * 1008 + (16 << 20)  # unreadable: 8x bound
    _free(monkeypatch, 50 << 20)
    with pytest.raises(DiskSpaceError, match=rf"dequantized base model {GGUF_NAME}: need "
                       r"5\d\d\.\d MiB, 50\.0 MiB free .*LASTMILE_CACHE"):
        resolve_base(str(gguf.parent))
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # nothing was written


# ----------------------------------------------------------------------------- safe loading

def test_gguf_directory_local_or_from_s3_goes_through_the_dequantized_cache(
        tokenizer, tmp_path, monkeypatch):
    """A directory holding only a .gguf - local, or what storage.fetch_model returns for an
    s3 prefix or .gguf key - resolves to the same dequantized cache as the embedded base."""
    from lastmile import storage

    cached = resolve_base(EMBEDDED_BASE)  # made by the session's tokenizer fixture
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    (fetched / GGUF_NAME).symlink_to(embedded_gguf_path())
    assert resolve_base(str(fetched)) == cached
    assert resolve_base(str(fetched / GGUF_NAME)) == cached

    asked = []

    def fake_fetch(uri, cache_dir=None, *, allow_pickle=False, **kw):
        asked.append((uri, allow_pickle))
        return fetched

    monkeypatch.setattr(storage, "fetch_model", fake_fetch)
    assert resolve_base("s3://models/smollm2/") == cached
    assert resolve_base("s3://models/smollm2/model.gguf", allow_pickle=True) == cached
    assert asked == [("s3://models/smollm2/", False), ("s3://models/smollm2/model.gguf", True)]
    assert base_fingerprint("s3://models/smollm2/") == base_fingerprint(EMBEDDED_BASE)

    # A directory with a config.json beside the .gguf is a Hugging Face layout: used as is.
    dequantized = []
    monkeypatch.setattr(modeling, "_dequantized_gguf", lambda p: dequantized.append(p) or p)
    (fetched / "config.json").write_text("{}")
    (fetched / "model.safetensors").write_bytes(b"")
    assert resolve_base("s3://models/smollm2/") == str(fetched) and not dequantized


def _pickle_model_dir(path: Path, tokenizer, safetensors_too: bool = False):
    """A tiny Llama saved the old way: config + pytorch_model.bin (+ the tokenizer)."""
    model = tiny_llama(len(tokenizer), seed=5)
    path.mkdir()
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    if safetensors_too:
        model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def test_pickle_only_base_is_refused_unless_allowed(tokenizer, tmp_path):
    original = _pickle_model_dir(tmp_path / "old", tokenizer)
    source = str(tmp_path / "old")
    for load in (resolve_base, load_base, modeling.load_tokenizer):
        with pytest.raises(UnsafeWeightsError, match=rf"{tmp_path}/old: its only weights are "
                           r"pickle files \(pytorch_model\.bin\).*allow_pickle=True"):
            load(source)
    model, _ = load_base(source, allow_pickle=True)
    for (name, want), got in zip(original.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(got, want, msg=name)
    assert base_fingerprint(source)  # hashing never unpickles, so it never refuses

    # safetensors beside the pickle: loaded from safetensors, no opt-in needed
    _pickle_model_dir(tmp_path / "both", tokenizer, safetensors_too=True)
    assert resolve_base(str(tmp_path / "both")) == str(tmp_path / "both")
    assert load_base(str(tmp_path / "both"))[0].config.hidden_size == TINY_CONFIG["hidden_size"]
    for suffix in (".pt", ".pth", ".ckpt"):
        (tmp_path / suffix[1:]).mkdir()
        (tmp_path / suffix[1:] / f"weights{suffix}").write_bytes(b"")
        with pytest.raises(UnsafeWeightsError, match=f"weights\\{suffix}"):
            check_weight_files(tmp_path / suffix[1:])


def test_remote_code_is_not_run_unless_asked(tokenizer, tmp_path, monkeypatch):
    """A model whose config maps AutoModelForCausalLM to its own Python file: by default
    transformers' built-in class loads it and the file is never imported."""
    path = tmp_path / "custom"
    model = tiny_llama(len(tokenizer), seed=1)
    model.config.auto_map = {"AutoModelForCausalLM": "evil.EvilForCausalLM"}
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    marker = tmp_path / "code-ran"
    (path / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "from transformers import LlamaForCausalLM\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    pass\n")
    loaded, _ = load_base(str(path))
    assert type(loaded).__name__ == "LlamaForCausalLM" and not marker.exists()

    import transformers

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        kwargs["trust_remote_code"] = False  # record the request; never run the file here
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_base(str(path))
    load_base(str(path), trust_remote_code=True)
    assert seen == [False, True]


# ----------------------------------------------------------------------------- quantized bases

def test_is_quantized_reads_the_flag_the_quantizer_or_the_config(tokenizer):
    from types import SimpleNamespace

    from lastmile.modeling import is_quantized

    base = tiny_llama(len(tokenizer))
    assert not is_quantized(base) and not is_quantized(AdapterModel(base))
    base.is_quantized = True  # what transformers sets when a quantizer loaded the weights
    assert is_quantized(base) and is_quantized(AdapterModel(base))
    assert is_quantized(SimpleNamespace(hf_quantizer=object(), config=None))
    gptq = SimpleNamespace(config=SimpleNamespace(quantization_config={"quant_method": "gptq"}))
    assert is_quantized(gptq)
    assert not is_quantized(SimpleNamespace(hf_quantizer=None,
                                            config=SimpleNamespace(quantization_config=None)))


def _config_dir(path: Path, tokenizer, quantization: dict | None) -> str:
    import json

    tiny_llama(len(tokenizer)).config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if quantization is not None:
        config = json.loads((path / "config.json").read_text())
        config["quantization_config"] = quantization
        (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_a_quantized_checkpoint_loads_in_float16_others_in_float32(tokenizer, tmp_path,
                                                                   monkeypatch):
    """GPTQ kernels compute in float16; forcing float32 on them is what load_base did."""
    import transformers

    asked = []

    def spy(path, **kwargs):  # no GPTQ backend here: record the dtype, hand back a tiny model
        asked.append(kwargs["dtype"])
        return tiny_llama(len(tokenizer))

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    gptq = _config_dir(tmp_path / "gptq", tokenizer,
                       {"quant_method": "gptq", "bits": 4, "group_size": 128})
    plain = _config_dir(tmp_path / "plain", tokenizer, None)
    load_base(gptq)
    load_base(plain)
    load_base(gptq, dtype=torch.bfloat16)  # an explicit dtype is the caller's
    assert asked == [torch.float16, torch.float32, torch.bfloat16]


class _Packed(torch.nn.Module):
    """A stand-in for GPTQ's QuantLinear: the same product, but no dense `weight` to merge a
    LoRA into (the real one holds packed int32 `qweight`)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.register_buffer("qweight", linear.weight.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x, *args, **kwargs):
        return torch.nn.functional.linear(x, self.qweight)


def _ppo_model(tokenizer, quantized: bool) -> AdapterModel:
    from peft.tuners.lora import LoraLayer

    model = AdapterModel(tiny_llama(len(tokenizer), seed=4))
    model.add_adapter("reward", SMALL, head=True, seed=1, trainable=False)
    model.add_adapter("policy", LoraSpec(r=8, alpha=16), seed=2)
    model.add_adapter("value", LoraSpec(r=8, alpha=16), head=True, seed=3)
    for i, name in enumerate(("reward", "policy", "value")):
        _perturb(model, name, seed=10 + i)
    if quantized:
        for layer in [m for m in model.base.modules() if isinstance(m, LoraLayer)]:
            layer.base_layer = _Packed(layer.base_layer)
        model.base.is_quantized = True
    return model


def test_quantized_base_samples_and_scores_with_unmerged_lora(tokenizer):
    """PPO's merged fast path needs dense weights; on a quantized base the trainer and
    sample_outputs take the unmerged path instead, with the same tokens and rewards."""
    from lastmile import ppo, sampling
    from lastmile.config import PPOConfig

    dense, packed = _ppo_model(tokenizer, False), _ppo_model(tokenizer, True)
    assert sampling.can_merge(dense) and not sampling.can_merge(packed)
    with pytest.raises(ValueError, match="quantized"):
        with sampling.merged_weights(packed, "policy"):
            pass

    prompts = [[1, 2, 3, 4, 5], [7, 8]]

    def sample(model, merge, **kw):
        return sampling.sample_outputs(model, prompts, "policy", max_new_tokens=6,
                                       eos_id=tokenizer.eos_token_id,
                                       pad_id=tokenizer.pad_token_id,
                                       generator=torch.Generator().manual_seed(0), merge=merge,
                                       **kw)

    want = sample(dense, False)
    assert sample(packed, True) == want  # merge asked for, unmerged taken
    assert sample(packed, True, dtype=torch.bfloat16) == want  # no bf16 copy of packed weights

    trainer = ppo.PPOTrainer(packed, tokenizer, PPOConfig(), 1, merge=True)
    assert trainer.merge is False and ppo.PPOTrainer(dense, tokenizer, PPOConfig(), 1).merge
    outputs = [[9, 10, tokenizer.eos_token_id], [11]]
    got = trainer.rollout("reference", prompts, outputs, outputs)
    ref = ppo.PPOTrainer(dense, tokenizer, PPOConfig(), 1, merge=False).rollout(
        "reference", prompts, outputs, outputs)
    torch.testing.assert_close(got.rm_rewards, ref.rm_rewards)
    assert got.rm_rewards[got.mask].abs().min() > 0


def test_scalar_head_takes_float16_states():
    head = modeling.ScalarHead(8)
    hidden = torch.randn(2, 3, 8)
    torch.testing.assert_close(head(hidden.half()), head(hidden.half().float()))
    assert head(hidden.half()).dtype == torch.float32


def test_decoding_in_bf16_keeps_rope_frequencies_in_float32(tiny_model):
    """cast_for_decoding rounds the weights to bf16 but not RoPE's inv_freq, as transformers'
    own bf16 loading does (lastmile export's plain-transformers users get the same text)."""
    from lastmile.modeling import cast_for_decoding

    before = {n: b.clone() for n, b in tiny_model.named_buffers() if n.endswith("inv_freq")}
    assert before
    cast_for_decoding(tiny_model, "bfloat16")
    after = dict(tiny_model.named_buffers())
    for name, value in before.items():
        assert after[name].dtype == torch.float32 and torch.equal(after[name], value), name
    assert next(tiny_model.parameters()).dtype == torch.bfloat16


def test_bf16_autocast_keeps_a_lora_update_below_half_a_bf16_step(tiny_model):
    """Under `modeling.autocast`, a LoRA update smaller than half a bf16 step of the base
    output it is added to (the demo MLE's first steps at 1e-4) reaches the layer's output:
    before `float32_lora_sums` the bf16 sum rounded it back to W·x."""
    from lastmile.config import LoraSpec
    from lastmile.modeling import AdapterModel, autocast

    model = AdapterModel(tiny_model)
    model.add_adapter("policy", LoraSpec(r=8, alpha=16), seed=0)
    model.use_adapter("policy")
    layer = model.base.model.layers[0].self_attn.v_proj  # a peft LoRA Linear
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        b = layer.lora_B["policy"].weight
        b.copy_(1e-4 * torch.sign(torch.randn(b.shape, generator=g)))  # one Adam step
        x = 8 * torch.randn(32, tiny_model.config.hidden_size, generator=g)  # outputs ~1
        update = layer(x) - layer.base_layer(x)
        with autocast(model, "bfloat16"):
            seen = layer(x).float() - layer.base_layer(x).float()
    assert layer.base_layer(x).abs().mean() > 0.5  # bf16 steps of ~4e-3 and more
    assert update.abs().mean() < 3e-3  # below half of them
    assert ((seen - update).norm() / update.norm()).item() < 0.02


# ----------------------------------------------------------------------------- auto precision

@pytest.mark.parametrize("flags, speedup, expected", [
    ({}, 9.0, "float32"),  # no bf16 hardware (an older x86 CPU, ARM): emulated, never measured
    ({"_is_avx512_bf16_supported": True}, 1.85, "bfloat16"),  # as on the AMD EPYC
    ({"_is_avx512_bf16_supported": True}, 0.56, "float32"),  # as on a Xeon without AMX
    ({"_is_amx_tile_supported": True}, 1.2, "float32"),  # under the margin
    ({"_is_amx_tile_supported": True}, 1.3, "bfloat16"),
])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it_faster(monkeypatch, flags,
                                                                      speedup, expected):
    for flag in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, flag, lambda v=flags.get(flag, False): v)
    measured = []
    monkeypatch.setattr(modeling, "cpu_bf16_speedup", lambda: measured.append(1) or speedup)
    assert modeling.resolve_precision("auto", "cpu") == expected
    assert measured == ([1] if flags else [])
    with pytest.raises(ValueError, match="'auto' unresolved"):  # the stages resolve it first
        modeling.check_precision("auto")
    # a named precision is taken as it is, whatever the machine
    assert modeling.resolve_precision("bfloat16", "cpu") == "bfloat16"
    assert modeling.resolve_precision("float32", "cpu") == "float32"
    with pytest.raises(ValueError, match="GenerateConfig.precision must be one of .*'auto'"):
        modeling.resolve_precision("float16", "cpu", what="GenerateConfig.precision")


def test_the_cpu_bf16_measurement_is_a_finite_ratio():
    modeling.cpu_bf16_speedup.cache_clear()
    ratio = modeling.cpu_bf16_speedup(rows=64, width=32, hidden=48)
    assert ratio > 0 and math.isfinite(ratio)


def test_auto_precision_on_a_gpu_asks_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert modeling.resolve_precision("auto", "cuda") == "float32"  # e.g. a V100
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert modeling.resolve_precision("auto", "cuda") == "bfloat16"


def test_a_stage_records_the_precision_auto_resolved_to(artifacts, tmp_path, monkeypatch):
    """The summary and the checkpoint key name what the stage computed in, not "auto"."""
    from lastmile import mle
    from lastmile.config import MLEConfig

    monkeypatch.setattr(modeling, "native_bf16", lambda device=None: False)
    cfg = MLEConfig(max_steps=1, batch_size=2, precision="auto")
    summary = mle.train_mle(artifacts / "data" / "train.jsonl", tmp_path / "mle", cfg, "tiny-random")
    assert summary["precision"] == "float32" and cfg.precision == "auto"  # caller's untouched
