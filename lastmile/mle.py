"""The maximum-likelihood control (paper §3.4): supervised fine-tuning of adapter "policy".

LoRA r=32, α=16 on the frozen base, trained on the true outputs with token cross-entropy on
the output tokens only: prompt tokens are context, never targets, and the EOS that ends every
output (when it fits the budget) is a target, so the model learns to stop. Same optimiser and
schedule as every model here (AdamW, cosine from 1e-5, one epoch), batch 7.

Loss of a batch: the mean over all its output tokens of -log pi(a_t | s_t), where (modeling.py,
"Alignment") the state s_t predicting a_t at position p is the hidden state at p - 1. The
vocabulary projection runs only for those states (`AdapterModel.token_logprobs`), never over
the prompt.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from . import checkpoint, distributed
from . import fsdp as sharding
from .config import MLEConfig
from .io import read_jsonl
from .modeling import (AdapterModel, autocast, collate, encode_outputs, encode_prompts,
                       load_base, resolve_precision)
from .train_utils import TokenExample, default_device, seed_everything, train_loop

ADAPTER = "policy"


# ----------------------------------------------------------------------------- data

def validate_rows(rows: Sequence[dict], source: str = "MLE rows") -> None:
    if not rows:
        raise ValueError(f"{source}: no rows")
    for i, row in enumerate(rows, start=1):
        for key in ("prompt", "output"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"{source}: row {i} (id={row.get('id')!r}) needs a non-empty "
                                 f"text {key!r}")


def encode_rows(tokenizer, rows: Sequence[dict], max_output_tokens: int) -> list[TokenExample]:
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows])
    outputs = encode_outputs(tokenizer, [r["output"] for r in rows], max_output_tokens)
    return [TokenExample(p, o, label=0.0, weight=1.0) for p, o in zip(prompts, outputs)]


# ----------------------------------------------------------------------------- loss

def output_nll_sum(model: AdapterModel, hidden: torch.Tensor, targets: torch.Tensor,
                   output_mask: torch.Tensor) -> torch.Tensor:
    """sum over output tokens of -log pi(target_p | state_{p-1}) (a scalar).

    hidden [B, T, H] states, targets [B, T] token ids (normally the input ids), output_mask
    [B, T] True where targets[:, p] is an output token. Prompt targets are never read.
    """
    predicts = output_mask[:, 1:]  # [B, T-1]: state p-1 predicts token p
    states = hidden[:, :-1][predicts]  # [N, H]
    return -model.token_logprobs(states, targets[:, 1:][predicts]).sum()


def mle_loss_sum(model: AdapterModel, examples: Sequence[TokenExample], pad_id: int,
                 adapter: str = ADAPTER) -> torch.Tensor:
    device = model.lm_head.weight.device
    batch = collate([e.prompt_ids for e in examples], [e.output_ids for e in examples],
                    pad_id).to(device)
    hidden = model.hidden_states(batch.input_ids, batch.attention_mask, adapter)  # [B, T, H]
    return output_nll_sum(model, hidden, batch.input_ids, batch.output_mask)


def output_token_count(example: TokenExample) -> float:
    return float(len(example.output_ids))


def mle_loss(model: AdapterModel, examples: Sequence[TokenExample], pad_id: int,
             adapter: str = ADAPTER) -> torch.Tensor:
    """Mean token cross-entropy over the output tokens of one batch."""
    total = sum(output_token_count(e) for e in examples)
    return mle_loss_sum(model, examples, pad_id, adapter) / total


# ----------------------------------------------------------------------------- training

def train_mle_adapter(model: AdapterModel, tokenizer, rows: Sequence[dict], cfg: MLEConfig,
                      log_path: str | os.PathLike | None = None,
                      adapter: str = ADAPTER,
                      checkpoint_dir: str | os.PathLike | None = None) -> dict:
    """Fine-tune `adapter` (added here when missing) on the true outputs; returns a summary.

    With `checkpoint_dir` (else `cfg.checkpoint_dir`) and `cfg.checkpoint_every` > 0 the run
    checkpoints there and a later call resumes from it (`train_utils.train_loop`).
    """
    validate_rows(rows)
    if adapter not in model.specs:
        model.add_adapter(adapter, cfg.lora, head=False, seed=cfg.seed, trainable=True)
    seed_everything(cfg.seed)
    examples = encode_rows(tokenizer, rows, cfg.max_output_tokens)
    pad_id = tokenizer.pad_token_id

    def numerator(micro: Sequence[TokenExample]) -> torch.Tensor:
        with autocast(model, cfg.precision):  # per forward (see modeling.autocast)
            return mle_loss_sum(model, micro, pad_id, adapter)

    return train_loop(
        model.adapter_parameters(adapter), examples, numerator=numerator,
        denominator=output_token_count, optim=cfg.optim, batch_size=cfg.batch_size,
        micro_batch_size=cfg.micro_batch_size, epochs=cfg.epochs, max_steps=cfg.max_steps,
        seed=cfg.seed, log_path=log_path, desc="MLE",
        checkpoint_dir=checkpoint_dir or cfg.checkpoint_dir,
        checkpoint_every=cfg.checkpoint_every, max_bad_updates=cfg.max_bad_updates,
        example_ids=[r.get("id") for r in rows], config=cfg)


def train_mle(train_path: str | os.PathLike, out_dir: str | os.PathLike, cfg: MLEConfig,
              base_source: str, *, allow_pickle: bool = False, trust_remote_code: bool = False,
              processes: int = 1, fsdp: bool = False) -> dict:
    """The train_mle stage: out_dir/adapter, out_dir/train_log.jsonl; returns the summary.

    Checkpoints go to `cfg.checkpoint_dir` or out_dir/checkpoints; a rerun with the same
    out_dir resumes from the latest; they are deleted once the adapter is written.
    `allow_pickle` / `trust_remote_code`: see `modeling.load_base` (both off unless asked).
    `processes`: data-parallel training processes (0: one per visible GPU; the same batches
    and, up to float rounding, the same adapter: `lastmile.distributed`). `fsdp`
    (`Profile.fsdp`): shard the base's decoder layers over those processes (`lastmile.fsdp`;
    needs two or more).
    """
    # before any process starts; "auto" resolved here, so the summary names what ran
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision,
                                                               what="MLEConfig.precision"))
    sharding.check_world(fsdp, processes)
    return distributed.launch(_train_mle, processes, train_path, out_dir, cfg, base_source,
                              allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                              fsdp=fsdp)


def _train_mle(train_path: str | os.PathLike, out_dir: str | os.PathLike, cfg: MLEConfig,
               base_source: str, *, allow_pickle: bool, trust_remote_code: bool,
               fsdp: bool = False) -> dict:
    """`train_mle` in this process, as one rank of the current world (or alone)."""
    world = distributed.world()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = list(read_jsonl(train_path))
    validate_rows(rows, str(train_path))
    started = time.perf_counter()
    base, tokenizer = load_base(base_source, allow_pickle=allow_pickle,
                                trust_remote_code=trust_remote_code)
    model = AdapterModel(base)
    model.add_adapter(ADAPTER, cfg.lora, head=False, seed=cfg.seed, trainable=True)
    if fsdp:  # before the optimiser (it steps the shards) and before the move to the GPU:
        sharding.shard_base(model)  # each layer goes there alone and leaves a shard
    model.to(default_device())
    loaded = time.perf_counter() - started
    checkpoints = checkpoint.resolve_dir(out, cfg.checkpoint_dir)
    train = train_mle_adapter(model, tokenizer, rows, cfg, log_path=out / "train_log.jsonl",
                              checkpoint_dir=checkpoints)
    sharding.save_adapter(model, ADAPTER, out / "adapter")  # every rank: gathers when sharded
    if world.is_main:
        checkpoint.clear(checkpoints)
    return {"rows": len(rows), "load_seconds": round(loaded, 3), "train": train,
            "adapter": "adapter", "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha},
            "processes": world.size, "precision": cfg.precision, "fsdp": fsdp}
