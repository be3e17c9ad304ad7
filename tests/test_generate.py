"""Batched greedy generation: token budget, EOS, determinism, order, the predictions file."""

from __future__ import annotations

import json

import pytest
import torch

from lastmile import generate
from lastmile.config import GenerateConfig, LoraSpec
from lastmile.io import write_json, write_jsonl
from lastmile.modeling import AdapterModel, encode_prompts, load_base, tiny_llama

TEXTS = ["libfoo parses things", "a much longer description of a package that does many "
         "different things for many users", "tool", "a daemon that watches files and logs"]


@pytest.fixture
def model(tokenizer) -> AdapterModel:
    """Untied embeddings: the tied tiny model only ever repeats '\\n', which tests nothing."""
    base = tiny_llama(len(tokenizer), seed=3, tie_word_embeddings=False)
    base.eval()
    return AdapterModel(base)


def _prompts(tokenizer, texts=TEXTS) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                          add_generation_prompt=True) for t in texts]


def _bias_eos(model: AdapterModel, eos_id: int, value: float):
    """Add `value` to the EOS logit (a forward hook on the LM head)."""
    def hook(module, inputs, output):
        output = output.clone()
        output[..., eos_id] += value
        return output
    return model.lm_head.register_forward_hook(hook)


def test_budget_is_respected_when_eos_never_comes(model, tokenizer):
    eos = tokenizer.eos_token_id
    handle = _bias_eos(model, eos, float("-inf"))
    ids = encode_prompts(tokenizer, _prompts(tokenizer))
    out = generate.sample_tokens(model, ids, None, max_new_tokens=7, eos_id=eos,
                                 pad_id=tokenizer.pad_token_id)
    handle.remove()
    assert [len(t) for t in out] == [7] * len(ids)
    assert all(eos not in t for t in out)


def test_generation_stops_at_eos(model, tokenizer):
    eos = tokenizer.eos_token_id
    handle = _bias_eos(model, eos, 1e4)
    cfg = GenerateConfig(max_new_tokens=9, batch_size=3)
    ids = generate._generate_ids(model, tokenizer, _prompts(tokenizer), None, cfg)
    texts = generate.generate_texts(model, tokenizer, _prompts(tokenizer), None, cfg)
    handle.remove()
    assert ids == [[eos]] * len(TEXTS)
    assert texts == [""] * len(TEXTS)  # decoded without special tokens


def test_eos_mid_sequence_cuts_the_row(model, tokenizer):
    eos = tokenizer.eos_token_id
    assert generate._cut_at_eos([5, 6, eos, eos, eos], eos) == [5, 6, eos]
    assert generate._cut_at_eos([5, 6, 7], eos) == [5, 6, 7]
    cfg = GenerateConfig(max_new_tokens=6, batch_size=4)
    out = generate._generate_ids(model, tokenizer, _prompts(tokenizer), None, cfg)
    for row in out:  # whatever the model does, EOS can only be the last token
        assert len(row) <= 6 and eos not in row[:-1]


def test_greedy_is_deterministic_and_order_is_restored(model, tokenizer):
    prompts = _prompts(tokenizer)
    cfg = GenerateConfig(max_new_tokens=8, batch_size=2)  # length-sorted batches of 2
    first = generate._generate_ids(model, tokenizer, prompts, None, cfg)
    again = generate._generate_ids(model, tokenizer, prompts, None, cfg)
    one_by_one = [generate._generate_ids(model, tokenizer, [p], None,
                                         GenerateConfig(max_new_tokens=8, batch_size=1))[0]
                  for p in prompts]
    assert first == again
    assert first == one_by_one  # left padding changes nothing, order is the input order
    assert len({tuple(t) for t in first}) > 1  # distinct prompts give distinct outputs
    texts = generate.generate_texts(model, tokenizer, prompts, None, cfg)
    assert texts == [generate.decode(tokenizer, t) for t in first]


def test_sampling_uses_the_seed_and_temperature(model, tokenizer):
    ids = encode_prompts(tokenizer, _prompts(tokenizer)[:2])
    kw = dict(max_new_tokens=6, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
              do_sample=True, temperature=1.0)
    torch.manual_seed(0)
    a = generate.sample_tokens(model, ids, None, **kw)
    torch.manual_seed(0)
    b = generate.sample_tokens(model, ids, None, **kw)
    greedy = generate.sample_tokens(model, ids, None, max_new_tokens=6,
                                    eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    assert a == b and a != greedy  # random model: sampling 12 tokens never matches greedy
    with pytest.raises(ValueError, match="temperature"):
        generate.sample_tokens(model, ids, None, **{**kw, "temperature": 0.0})


def _test_file(tokenizer, path, n=5):
    rows = [{"id": f"r{i}", "input": TEXTS[i % len(TEXTS)], "output": f"reference {i}",
             "prompt": _prompts(tokenizer, [TEXTS[i % len(TEXTS)] * (1 + i % 3)])[0]}
            for i in range(n)]
    write_jsonl(path, rows)
    return rows


def test_predictions_file_fields_and_summary(tokenizer, tmp_path):
    rows = _test_file(tokenizer, tmp_path / "test.jsonl")
    cfg = GenerateConfig(max_new_tokens=4, batch_size=2, window_batches=1)  # several windows
    summary = generate.generate_predictions(tmp_path / "test.jsonl", tmp_path / "p.jsonl", "base",
                                            "tiny-random", None, cfg)
    out = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    assert all(set(r) == {"id", "input", "reference", "prediction", "variant"} for r in out)
    assert [r["reference"] for r in out] == [r["output"] for r in rows]
    assert {r["variant"] for r in out} == {"base"}
    assert summary["n"] == 5 and 1 <= summary["mean_new_tokens"] <= 4
    assert 0.0 <= summary["hit_budget_share"] <= 1.0 and summary["tokens_per_second"] > 0
    assert summary["weights_dtype"] == "float32"
    assert not list(tmp_path.glob(".p.jsonl.*"))  # no temporary file left behind


def test_adapter_variant_merged_equals_unmerged(tokenizer, tmp_path):
    model = AdapterModel(load_base("tiny-random")[0])
    model.add_adapter("policy", LoraSpec(r=4, alpha=8), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.adapter_parameters("policy"):
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_adapter("policy", tmp_path / "adapter")
    prompts = _prompts(tokenizer)
    cfg = GenerateConfig(max_new_tokens=6, batch_size=4)
    want = generate._generate_ids(model, tokenizer, prompts, "policy", cfg)
    assert want != generate._generate_ids(model, tokenizer, prompts, None, cfg)
    merged, _, name = generate.load_variant("tiny-random", tmp_path / "adapter", merge=True)
    assert name is None and merged.peft is None  # plain weights, no LoRA layers left
    assert generate._generate_ids(merged, tokenizer, prompts, None, cfg) == want
    unmerged, _, name = generate.load_variant("tiny-random", tmp_path / "adapter", merge=False)
    assert generate._generate_ids(unmerged, tokenizer, prompts, name, cfg) == want

    _test_file(tokenizer, tmp_path / "test.jsonl", n=3)
    generate.generate_predictions(tmp_path / "test.jsonl", tmp_path / "p.jsonl", "mle",
                                  "tiny-random", str(tmp_path / "adapter"), cfg)
    assert {json.loads(x)["variant"] for x in (tmp_path / "p.jsonl").open()} == {"mle"}


def test_quantized_base_keeps_its_adapter_unmerged(tokenizer, tmp_path, monkeypatch):
    """merge_and_unload cannot fold a LoRA into packed (GPTQ) weights: a quantized base gets
    the adapter by name, and generates what the unmerged adapter does."""
    model = AdapterModel(load_base("tiny-random")[0])
    model.add_adapter("policy", LoraSpec(r=4, alpha=8), seed=0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in model.adapter_parameters("policy"):
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_adapter("policy", tmp_path / "adapter")

    real = generate.load_base

    def quantized_base(source, **kwargs):
        base, tok = real(source, **kwargs)
        base.is_quantized = True  # as transformers marks a GPTQ checkpoint
        return base, tok

    monkeypatch.setattr(generate, "load_base", quantized_base)
    loaded, _, name = generate.load_variant("tiny-random", tmp_path / "adapter", merge=True)
    assert name == generate.VARIANT_ADAPTER and loaded.peft is not None  # not merged
    cfg = GenerateConfig(max_new_tokens=6, batch_size=4)
    prompts = _prompts(tokenizer)
    assert generate._generate_ids(loaded, tokenizer, prompts, name, cfg) == \
        generate._generate_ids(model, tokenizer, prompts, "policy", cfg)
    base, _, name = generate.load_variant("tiny-random", None)
    assert name is None  # the base variant: nothing to merge either way


def test_variant_and_input_errors(tokenizer, tmp_path):
    cfg = GenerateConfig(max_new_tokens=2)
    with pytest.raises(ValueError, match="needs adapter_dir"):
        generate.generate_predictions(tmp_path / "t.jsonl", tmp_path / "p.jsonl", "rl",
                                      "tiny-random", None, cfg)
    with pytest.raises(ValueError, match="takes no adapter"):
        generate.generate_predictions(tmp_path / "t.jsonl", tmp_path / "p.jsonl", "base",
                                      "tiny-random", str(tmp_path), cfg)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        generate.generate_predictions(tmp_path / "t.jsonl", tmp_path / "p.jsonl", "mle",
                                      "tiny-random", str(tmp_path), cfg)
    write_jsonl(tmp_path / "t.jsonl", [{"id": "x", "input": "a", "output": "b"}])
    with pytest.raises(ValueError, match=r"row 1 \(id='x'\) needs text 'prompt'"):
        generate.generate_predictions(tmp_path / "t.jsonl", tmp_path / "p.jsonl", "base",
                                      "tiny-random", None, cfg)
    assert not (tmp_path / "p.jsonl").exists()


def test_generation_memory_stays_flat_as_the_test_set_grows(tokenizer, tmp_path):
    """Peak Python allocation of generate_predictions for N and 4N test rows, each carrying a
    32 KB input (the document, copied into the predictions): rows are held one window at a
    time, so the peak does not grow with N; holding them all would add 3N x 32 KB (~6 MB)."""
    import gc
    import tracemalloc

    cfg = GenerateConfig(max_new_tokens=1, batch_size=8, window_batches=2)
    prompt = _prompts(tokenizer, ["a package"])[0]
    filler = "lorem ipsum dolor sit amet " * 1200  # ~32 KB

    def test_file(n: int):
        rows = [{"id": f"t{i}", "input": filler, "output": f"summary {i}", "prompt": prompt}
                for i in range(n)]
        write_jsonl(tmp_path / f"test{n}.jsonl", rows)
        return tmp_path / f"test{n}.jsonl"

    def peak(path) -> tuple[int, dict]:
        gc.collect()
        tracemalloc.start()
        try:
            summary = generate.generate_predictions(path, tmp_path / "p.jsonl", "base",
                                                    "tiny-random", None, cfg)
            return tracemalloc.get_traced_memory()[1], summary
        finally:
            tracemalloc.stop()

    small, large = test_file(64), test_file(256)
    generate.generate_predictions(small, tmp_path / "p.jsonl", "base", "tiny-random", None,
                                  cfg)  # warm-up: imports and caches
    (peak_small, _), (peak_large, summary) = peak(small), peak(large)
    assert summary["n"] == 256 and len((tmp_path / "p.jsonl").read_text().splitlines()) == 256
    assert peak_large < peak_small + 1_500_000, (peak_small, peak_large)


def test_shards_gathered_equal_one_unsharded_run(tokenizer, tmp_path):
    """Three shards of 9 rows (batches of 2, windows of 2 batches: 3 windows), gathered,
    are the unsharded file byte for byte: same ids, order and greedy text."""
    from lastmile import shards

    _test_file(tokenizer, tmp_path / "test.jsonl", n=9)
    cfg = GenerateConfig(max_new_tokens=5, batch_size=2, window_batches=2, num_shards=3)
    whole = generate.generate_predictions(tmp_path / "test.jsonl", tmp_path / "all.jsonl",
                                          "base", "tiny-random", None, cfg)
    assert "shard" not in whole
    folders = []
    for k in (2, 0, 1):  # any order: the gather sorts by the shard record
        folder = tmp_path / f"shard{k}"
        summary = generate.generate_predictions(tmp_path / "test.jsonl",
                                                folder / "predictions.jsonl", "base",
                                                "tiny-random", None, cfg, shard=k)
        assert summary["shard"] == {"index": k, "count": 3, "rows": [4 * k, min(4 * k + 4, 9)]}
        write_json(folder / "summary.json", summary)
        folders.append(folder)
    merged = shards.gather_predictions(folders, tmp_path / "gathered")
    assert (tmp_path / "gathered" / "predictions.jsonl").read_bytes() == (
        tmp_path / "all.jsonl").read_bytes()
    assert merged["n"] == 9 and merged["shards"] == 3 and len(merged["shard_seconds"]) == 3
    with pytest.raises(ValueError, match="shard 3 does not exist"):
        generate.generate_predictions(tmp_path / "test.jsonl", tmp_path / "x.jsonl", "base",
                                      "tiny-random", None, cfg, shard=3)


def test_bfloat16_decodes_from_bf16_weights_and_says_so(tokenizer, tmp_path, monkeypatch):
    _test_file(tokenizer, tmp_path / "test.jsonl")
    dtypes = []
    real = generate.sample_tokens

    def spy(model, *args, **kwargs):
        dtypes.append(model.lm_head.weight.dtype)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(generate, "sample_tokens", spy)
    cfg = GenerateConfig(max_new_tokens=4, batch_size=2, precision="bfloat16")
    summary = generate.generate_predictions(tmp_path / "test.jsonl", tmp_path / "p.jsonl", "base",
                                            "tiny-random", None, cfg)
    assert set(dtypes) == {torch.bfloat16} and summary["weights_dtype"] == "bfloat16"
    assert summary["n"] == 5 and len((tmp_path / "p.jsonl").read_text().splitlines()) == 5
    with pytest.raises(ValueError, match="precision must be one of"):
        generate.generate_predictions(tmp_path / "test.jsonl", tmp_path / "q.jsonl", "base",
                                      "tiny-random", None, GenerateConfig(precision="fp8"))
    assert not (tmp_path / "q.jsonl").exists()
