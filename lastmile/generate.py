"""Batched generation on the test split for one model variant (paper §4.2).

Variants: the base chat model (no adapter), base + MLE adapter, base + PPO adapter. At test
time every variant decodes *greedily* with at most 100 new tokens (the paper's output limit):
greedy decoding is deterministic, so a variant's predictions do not depend on a sampling seed
and differences between variants come from the weights alone. Sampling stays available
(`GenerateConfig.do_sample`) and PPO reuses `sample_tokens` with temperature 1.

Prompts are left-padded (positions follow the attention mask, so padding does not move them),
grouped by length into batches for speed, and the outputs are put back in input order.
Generation stops at EOS (<|im_end|>); text is decoded without special tokens.

A run may be one shard of the test rows (`lastmile.shards`): a contiguous run of whole
windows, so its batches are those of an unsharded run.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch

from . import shards
from .config import GenerateConfig
from .io import atomic_path, read_jsonl
from .modeling import (AdapterModel, cast_for_decoding, encode_prompts, is_quantized, left_pad,
                       load_base, resolve_precision)
from .train_utils import chunked, default_device, progress

log = logging.getLogger(__name__)

#: The name a loaded variant's adapter gets (before merging).
VARIANT_ADAPTER = "variant"


# ----------------------------------------------------------------------------- sampling



@torch.no_grad()
def sample_tokens(model: AdapterModel, prompt_ids: Sequence[Sequence[int]], adapter: str | None,
                  *, max_new_tokens: int, eos_id: int, pad_id: int, do_sample: bool = False,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
                  ) -> list[list[int]]:
    """New token ids per prompt (one batch), with `adapter` active (None: the base).

    Each row ends with EOS when the model stopped; a row without EOS hit `max_new_tokens`
    (the layout `modeling.encode_outputs` uses). Sampling is plain temperature sampling
    unless top_k / top_p are set: the model's own generation defaults are not inherited.
    """
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("sample_tokens: an empty prompt")
    device = model.lm_head.weight.device
    ids, mask = left_pad(prompt_ids, pad_id)
    settings = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=eos_id,
                    pad_token_id=pad_id, bos_token_id=None, num_beams=1, use_cache=True)
    if do_sample:
        settings.update(temperature=temperature, top_k=top_k or None, top_p=top_p)
    else:
        settings.update(temperature=None, top_k=None, top_p=None)
    gen_cfg = GenerationConfig(**settings)
    with model.use(adapter):
        out = model.base.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                  generation_config=gen_cfg)
    new = out[:, ids.shape[1]:].tolist()  # [B, <= max_new_tokens]
    return [_cut_at_eos(row, eos_id) for row in new]


def _cut_at_eos(tokens: list[int], eos_id: int) -> list[int]:
    """Keep tokens up to and including the first EOS (later ones are padding)."""
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def decode(tokenizer, tokens: Sequence[int]) -> str:
    return tokenizer.decode(list(tokens), skip_special_tokens=True).strip()


def _generate_ids(model: AdapterModel, tokenizer, prompts: Sequence[str], adapter: str | None,
                  cfg: GenerateConfig, top_k: int = 0, top_p: float = 1.0
                  ) -> list[list[int]]:
    """New token ids for every prompt, batched by length, in input order."""
    prompt_ids = encode_prompts(tokenizer, list(prompts))
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    result: list[list[int]] = [[] for _ in prompt_ids]
    for idx in chunked(order, cfg.batch_size):
        tokens = sample_tokens(model, [prompt_ids[i] for i in idx], adapter,
                               max_new_tokens=cfg.max_new_tokens, eos_id=tokenizer.eos_token_id,
                               pad_id=tokenizer.pad_token_id, do_sample=cfg.do_sample,
                               temperature=cfg.temperature, top_k=top_k, top_p=top_p)
        for i, t in zip(idx, tokens):
            result[i] = t
    return result


def generate_texts(model: AdapterModel, tokenizer, prompts: Sequence[str], adapter: str | None,
                   cfg: GenerateConfig) -> list[str]:
    """Decoded completions of chat-formatted `prompts`, in input order."""
    return [decode(tokenizer, t) for t in _generate_ids(model, tokenizer, prompts, adapter, cfg)]


# ----------------------------------------------------------------------------- the stage

def load_variant(base_source: str, adapter_dir: str | os.PathLike | None, merge: bool = True,
                 *, allow_pickle: bool = False, trust_remote_code: bool = False):
    """The base with the adapter at `adapter_dir`, if any. Returns (model, tokenizer, adapter).

    `adapter` is the name to pass to generation: None for the base, and also when the LoRA
    weights are merged into the base (W + s·BA), which makes generation as fast as the base
    and changes results only by float rounding. A quantized base (GPTQ: packed weights) has
    nothing to merge into, so its adapter stays unmerged whatever `merge` says.
    `allow_pickle` / `trust_remote_code`: see `modeling.load_base` (both off unless asked).
    """
    base, tokenizer = load_base(base_source, allow_pickle=allow_pickle,
                                trust_remote_code=trust_remote_code)
    model = AdapterModel(base)
    if adapter_dir is None:
        return model, tokenizer, None
    model.load_adapter(VARIANT_ADAPTER, adapter_dir, trainable=False)
    if merge and is_quantized(base):
        log.info("%s is quantized: generating with the adapter unmerged", base_source)
        merge = False
    if not merge:
        return model, tokenizer, VARIANT_ADAPTER
    return AdapterModel(model.peft.merge_and_unload()), tokenizer, None


def _check_variant(variant: str, adapter_dir) -> None:
    if not variant:
        raise ValueError("variant must be a non-empty name (base, mle, rl)")
    if variant == "base" and adapter_dir is not None:
        raise ValueError(f"variant 'base' takes no adapter, got adapter_dir={adapter_dir}")
    if variant != "base" and adapter_dir is None:
        raise ValueError(f"variant {variant!r} needs adapter_dir (only 'base' runs without one)")
    if adapter_dir is not None and not (Path(adapter_dir) / "adapter_config.json").exists():
        raise FileNotFoundError(f"adapter_dir {adapter_dir}: no adapter_config.json there")


def _read_test_rows(path: str | os.PathLike) -> Iterator[dict]:
    for i, row in enumerate(read_jsonl(path), start=1):
        for key in ("prompt", "output"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise ValueError(f"{path}: row {i} (id={row.get('id')!r}) needs text {key!r}")
        yield row


def _count_rows(path: str | os.PathLike) -> int:
    return sum(1 for _ in read_jsonl(path))


def generate_predictions(test_path: str | os.PathLike, out_path: str | os.PathLike, variant: str,
                         base_source: str, adapter_dir: str | None, cfg: GenerateConfig, *,
                         shard: int | None = None, allow_pickle: bool = False,
                         trust_remote_code: bool = False) -> dict:
    """Predictions for the test rows as JSON Lines {id, input, reference, prediction, variant}.

    Rows are read and written in windows of `cfg.window_batches` batches (sorted by length
    inside a window, written in input order); the file appears under `out_path` only when
    complete. `shard` (0-based): only that shard's rows (`shards.plan`); None: every row.
    """
    _check_variant(variant, adapter_dir)
    if cfg.batch_size < 1:
        raise ValueError(f"GenerateConfig.batch_size must be >= 1, got {cfg.batch_size}")
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision,
                                                               what="GenerateConfig.precision"))
    total = _count_rows(test_path)
    if total == 0:
        raise ValueError(f"{test_path}: no test rows")
    ranges = shards.plan(total, cfg) if shard is not None else [(0, total)]
    record = shards.shard_record(shard if shard is not None else 0, ranges)
    start, stop = record["rows"]
    started = time.perf_counter()
    model, tokenizer, adapter = load_variant(base_source, adapter_dir, allow_pickle=allow_pickle,
                                             trust_remote_code=trust_remote_code)
    model.to(default_device())
    if adapter is None:  # merged or the base: one dense model to decode from
        cast_for_decoding(model.base, cfg.precision)
    load_seconds = time.perf_counter() - started
    n = new_tokens = hit_budget = 0
    gen_seconds = 0.0
    label = f"generate {variant}" + (f" [{shard + 1}/{len(ranges)}]" if shard is not None else "")
    bar = progress(stop - start, label, unit="row")
    rows = itertools.islice(_read_test_rows(test_path), start, stop)
    try:
        with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for window in chunked(rows, cfg.batch_size * cfg.window_batches):
                t0 = time.perf_counter()
                ids = _generate_ids(model, tokenizer, [r["prompt"] for r in window], adapter,
                                     cfg)
                gen_seconds += time.perf_counter() - t0
                for row, tokens in zip(window, ids):
                    f.write(_json_line({"id": row.get("id"), "input": row.get("input"),
                                        "reference": row["output"],
                                        "prediction": decode(tokenizer, tokens),
                                        "variant": variant}))
                    new_tokens += len(tokens)
                    hit_budget += tokens[-1:] != [tokenizer.eos_token_id]
                n += len(window)
                bar.update(len(window))
    finally:
        bar.close()
    summary = {"variant": variant, "n": n, "seconds": round(gen_seconds, 3),
               "load_seconds": round(load_seconds, 3),
               "tokens_per_second": round(new_tokens / gen_seconds, 2) if gen_seconds else None,
               "mean_new_tokens": new_tokens / n, "hit_budget_share": hit_budget / n,
               "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size,
               "do_sample": cfg.do_sample, "adapter": adapter_dir is not None,
               "weights_dtype": str(model.lm_head.weight.dtype).removeprefix("torch.")}
    if shard is not None:
        summary[shards.SHARD_KEY] = record
    return summary


def _json_line(row: dict) -> str:
    import json

    return json.dumps(row, ensure_ascii=False) + "\n"
