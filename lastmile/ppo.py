"""PPO against the frozen reward model (paper §3.3): policy and value adapters on one base.

The PPO stage: the training rows and the reward stage's adapter in; the policy and value
adapters, the per-update log and a summary out; checkpoints between updates, so a retry
resumes. The method is in ppo_equations (Eq. 1-4), sampling and ppo_trainer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import checkpoint, distributed
from . import fsdp as sharding
from .config import PPOConfig
from .io import read_jsonl, write_json
from .modeling import (AdapterModel, encode_outputs, encode_prompts, load_base,
                       resolve_precision)
from .ppo_trainer import (DEFAULT_MICRO_BATCH, POLICY, REFERENCE, REWARD, SAMPLED, VALUE,
                          PPOTrainer, Rollout, check_config, batch_kinds)
from .reward import adapter_level
from .sampling import SAMPLER
from .train_utils import (NonFiniteGuard, StepLog, default_device, epoch_batches, progress,
                          seed_everything, skipped_row)

log = logging.getLogger(__name__)


def read_train_rows(path: str | os.PathLike) -> list[dict]:
    """train.jsonl rows (id, input, output, prompt); a bad row raises naming file and row."""
    rows = []
    for i, row in enumerate(read_jsonl(path), start=1):
        for key in ("prompt", "output"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"{path}: row {i} (id={row.get('id')!r}) needs a non-empty "
                                 f"text {key!r}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no training rows")
    return rows


def build_model(base_source: str, reward_adapter_dir: str | os.PathLike, cfg: PPOConfig,
                mle_adapter_dir: str | os.PathLike | None = None, *,
                allow_pickle: bool = False, trust_remote_code: bool = False):
    """The one base with "reward" (frozen, loaded), "policy" and "value" (trainable)."""
    reward_dir = Path(reward_adapter_dir)
    if not (reward_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"reward_adapter_dir {reward_dir}: no adapter_config.json")
    if cfg.init_policy_from_mle and mle_adapter_dir is None:
        raise ValueError("PPOConfig.init_policy_from_mle is set but no mle_adapter_dir given")
    base, tokenizer = load_base(base_source, allow_pickle=allow_pickle,
                                trust_remote_code=trust_remote_code)
    model = AdapterModel(base)
    model.load_adapter(REWARD, reward_dir, trainable=False)
    if REWARD not in model.heads:
        raise ValueError(f"{reward_dir}: the reward adapter has no scalar head (head.safetensors)")
    if cfg.init_policy_from_mle:
        model.load_adapter(POLICY, mle_adapter_dir, trainable=True)
    else:
        if mle_adapter_dir is not None:
            log.warning("mle_adapter_dir given but PPOConfig.init_policy_from_mle is off: "
                        "the policy starts fresh on the base (paper §3.3)")
        model.add_adapter(POLICY, cfg.policy_lora, seed=cfg.seed, trainable=True)
    model.add_adapter(VALUE, cfg.value_lora, head=True, seed=cfg.seed + 1, trainable=True)
    return model, tokenizer


def word_count(text: str) -> int:
    """Whitespace-delimited entities, the paper's length unit (§4.3)."""
    return len(text.split())


def row_numbers(rollout: Rollout, output_words: list[int],
                reference_words: list[int]) -> torch.Tensor:
    """[B, 7] float64 per row: reward, reward-model reward and length penalty summed over its
    output tokens; output and reference length in tokens; in words."""
    mask = rollout.mask.float()
    columns = [(rollout.rewards * mask).sum(-1), (rollout.rm_rewards * mask).sum(-1),
               (rollout.penalty * mask).sum(-1), rollout.output_lengths,
               rollout.reference_lengths, torch.tensor(output_words),
               torch.tensor(reference_words)]
    return torch.stack([c.detach().double().cpu() for c in columns], dim=1)


def update_row(update: int, rollout: Rollout, stats: dict, output_words: list[int],
               reference_words: list[int]) -> dict:
    """The JSON Lines row of one update (see the module docstring for the reward's parts).

    Means over the whole outer batch: distributed, every rank's rows are gathered first.
    """
    table = distributed.gather_rows(row_numbers(rollout, output_words, reference_words),
                                    rollout.places, rollout.n_rows)  # [n, 7]
    reward, rm, penalty, tokens, ref_tokens, words, ref_words = table.unbind(1)  # [n] each
    n_tokens = tokens.sum().clamp(min=1.0)
    row = {
        "update": update,
        "batch_kind": rollout.kind,
        # r_t = reward model + length penalty: summed over a row's tokens, mean over rows
        # (the return PPO maximises, γ ≈ 1), and the mean per output token.
        "reward_mean": float(reward.mean()),
        "reward_per_token": float(reward.sum() / n_tokens),
        "rm_reward_per_token": float(rm.sum() / n_tokens),
        "length_penalty_mean": float(penalty.mean()),
        "response_length_mean": float(tokens.mean()),
        "reference_length_mean": float(ref_tokens.mean()),
        "response_words_mean": float(words.mean()),
        "excess_length_mean": float((words - ref_words).mean()),
        "excess_tokens_mean": float((tokens - ref_tokens).mean()),
    }
    row.update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in stats.items()})
    return row


def train_ppo(train_path: str | os.PathLike, reward_adapter_dir: str | os.PathLike,
              out_dir: str | os.PathLike, cfg: PPOConfig, base_source: str,
              mle_adapter_dir: str | os.PathLike | None = None, *,
              micro_batch_size: int | None = DEFAULT_MICRO_BATCH,
              precision: str | None = None, allow_pickle: bool = False,
              trust_remote_code: bool = False, processes: int = 1, fsdp: bool = False) -> dict:
    """The train_ppo stage. Writes out_dir/adapter (policy), out_dir/value_adapter,
    out_dir/ppo_log.jsonl (one row per update) and out_dir/ppo_summary.json; returns the
    summary. `precision` is the frozen base's compute precision (see `PPOTrainer`; None:
    `cfg.precision`).

    Every `cfg.checkpoint_every` updates the state (both adapters and the value head, AdamW,
    scheduler and the global RNGs; samples need no state) goes to `cfg.checkpoint_dir` or
    out_dir/checkpoints; a rerun with the same out_dir resumes after the latest one (the
    summary's `resumed_from_step` is its update) and continues exactly as an uninterrupted
    run. The checkpoints are deleted once the adapters are written. Non-finite updates are
    skipped; `cfg.max_bad_updates` in a row raise FloatingPointError (no adapter written).
    `allow_pickle` / `trust_remote_code`: see `modeling.load_base` (both off unless asked).
    `processes`: data-parallel training processes (0: one per visible GPU). Each samples,
    scores and differentiates its share of every outer batch; the samples, the gradients and
    so, up to float rounding, the adapters are those of one process (`lastmile.distributed`).
    `fsdp` (`Profile.fsdp`): shard the base's decoder layers over those processes
    (`lastmile.fsdp`; needs two or more); the adapters are the same up to float rounding.
    """
    precision = resolve_precision(precision or cfg.precision, what="PPO precision")
    check_config(cfg)  # before any process starts
    sharding.check_world(fsdp, processes)
    return distributed.launch(_train_ppo, processes, train_path, reward_adapter_dir, out_dir,
                              cfg, base_source, mle_adapter_dir,
                              micro_batch_size=micro_batch_size, precision=precision,
                              allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                              fsdp=fsdp)


def _train_ppo(train_path: str | os.PathLike, reward_adapter_dir: str | os.PathLike,
               out_dir: str | os.PathLike, cfg: PPOConfig, base_source: str,
               mle_adapter_dir: str | os.PathLike | None, *, micro_batch_size: int | None,
               precision: str, allow_pickle: bool, trust_remote_code: bool,
               fsdp: bool = False) -> dict:
    """`train_ppo` in this process, as one rank of the current world (or alone)."""
    world = distributed.world()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_train_rows(train_path)
    check_config(cfg)
    started = time.perf_counter()
    seed_everything(cfg.seed)
    model, tokenizer = build_model(base_source, reward_adapter_dir, cfg, mle_adapter_dir,
                                   allow_pickle=allow_pickle,
                                   trust_remote_code=trust_remote_code)
    if fsdp:  # before the optimiser (it steps the shards) and before the move to the GPU:
        sharding.shard_base(model)  # each layer goes there alone and leaves a shard
    model.to(default_device())
    load_seconds = time.perf_counter() - started

    prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows])
    references = encode_outputs(tokenizer, [r["output"] for r in rows], cfg.max_new_tokens)
    batches = epoch_batches(len(rows), cfg.batch_size, cfg.epochs, cfg.seed, cfg.max_updates)
    kinds = batch_kinds(len(batches), cfg.reference_fraction)
    trainer = PPOTrainer(model, tokenizer, cfg, len(batches), micro_batch_size=micro_batch_size,
                         precision=precision,
                         reward_level=adapter_level(reward_adapter_dir))
    root = checkpoint.resolve_dir(out, cfg.checkpoint_dir)
    # No sampler state to save: each update's rows draw from streams keyed by its number.
    ckpt = checkpoint.Checkpointer(
        root, cfg.checkpoint_every, trainer.policy_params + trainer.value_params,
        trainer.optimizer, trainer.scheduler,
        run=_run_key(cfg, batches, prompts, references, micro_batch_size, precision))
    start, extras = ckpt.resume()
    guard = NonFiniteGuard("PPO", cfg.max_bad_updates, extras.get("bad_streak", 0))
    logger = StepLog(out / "ppo_log.jsonl" if world.is_main else None, extras.get("log", []),
                     stage="PPO", config=cfg)
    bar = progress(len(batches), "PPO", unit="update", initial=start)
    try:
        for update in range(start + 1, len(batches) + 1):
            idx, kind = batches[update - 1], kinds[update - 1]
            row = _update(trainer, guard, update, kind, idx, rows, prompts, references)
            logger.write(row)
            if ckpt.due(update, len(batches)):
                ckpt.save(update, {"log": logger.rows, "bad_streak": guard.streak})
            bar.update(1)
            bar.set_postfix(kind=kind[:3], len=f"{row['response_length_mean']:.0f}",
                            reward="skipped" if row.get("skipped")
                            else f"{row['reward_mean']:.2f}")
    finally:
        bar.close()
        logger.close()
    summary = summarize(logger.rows, time.perf_counter() - started, load_seconds, len(rows), cfg)
    summary.update(resumed_from_step=start or None, processes=world.size, precision=precision,
                   reward_level=trainer.reward_level, fsdp=trainer.sharded)
    sharding.save_adapter(model, POLICY, out / "adapter")  # every rank: gathers when sharded
    sharding.save_adapter(model, VALUE, out / "value_adapter")
    if world.is_main:
        write_json(out / "ppo_summary.json", summary)
        checkpoint.clear(root)
    return summary


def _update(trainer: PPOTrainer, guard: NonFiniteGuard, update: int, kind: str,
            idx: list[int], rows: list[dict], prompts: list[list[int]],
            references: list[list[int]]) -> dict:
    """One outer batch: outputs (sampled or reference), rollout, PPO step; its log row.

    Distributed, this rank takes the rows at `positions` of the batch (`shard_indices`);
    the step and the row cover the whole batch.
    """
    t0 = time.perf_counter()
    world = distributed.world()
    positions = distributed.shard_indices(len(idx), world.rank, world.size)
    mine = [idx[j] for j in positions]  # this rank's rows of the training data
    prompt_ids = [prompts[i] for i in mine]
    reference_ids = [references[i] for i in mine]
    if kind == SAMPLED:
        output_ids = trainer.sample(prompt_ids, update=update, positions=positions)
        texts = [trainer.tokenizer.decode(o, skip_special_tokens=True) for o in output_ids]
    else:
        output_ids = reference_ids
        texts = [rows[i]["output"] for i in mine]
    sample_seconds = time.perf_counter() - t0
    rollout = trainer.rollout(kind, prompt_ids, output_ids, reference_ids,
                              positions=positions, batch_rows=len(idx))
    stats = trainer.step(rollout)
    where = {"indices": idx, "ids": [rows[i].get("id") for i in idx]}
    bad = guard.record(update, stats.pop("nonfinite"), where)
    stats.update(sample_seconds=round(sample_seconds, 3),
                 seconds=round(time.perf_counter() - t0, 3))
    row = update_row(update, rollout, stats, [word_count(t) for t in texts],
                     [word_count(rows[i]["output"]) for i in mine])
    return skipped_row(row, bad, where) if bad else row


def _run_key(cfg: PPOConfig, batches: list[list[int]], prompts: list[list[int]],
             references: list[list[int]], micro_batch_size: int | None, precision: str) -> dict:
    """What a checkpoint must agree with to be resumed (the fault-handling fields aside)."""
    config = {k: v for k, v in asdict(cfg).items()
              if k not in ("checkpoint_every", "checkpoint_dir", "max_bad_updates")}
    data = json.dumps([batches, prompts, references]).encode()
    return {"stage": "PPO", "config": config, "micro_batch_size": micro_batch_size,
            "precision": precision, "sampler": SAMPLER, "data": hashlib.sha256(data).hexdigest()}


def summarize(rows: list[dict], seconds: float, load_seconds: float, n_rows: int,
              cfg: PPOConfig) -> dict:
    def median(kind: str, key: str):
        values = [r[key] for r in rows if r["batch_kind"] == kind]
        return statistics.median(values) if values else None

    done = [r for r in rows if not r.get("skipped")]
    last = {kind: next((r for r in reversed(done) if r["batch_kind"] == kind), None)
            for kind in (SAMPLED, REFERENCE)}
    return {
        "rows": n_rows,
        "updates": len(rows),
        "skipped_updates": len(rows) - len(done),
        "sampled_updates": sum(r["batch_kind"] == SAMPLED for r in rows),
        "reference_updates": sum(r["batch_kind"] == REFERENCE for r in rows),
        "seconds": round(seconds, 3),
        "load_seconds": round(load_seconds, 3),
        "median_update_seconds": {k: median(k, "seconds") for k in (SAMPLED, REFERENCE)},
        "final_sampled": {k: last[SAMPLED][k] for k in ("reward_mean", "response_length_mean",
                                                        "excess_length_mean")}
        if last[SAMPLED] else None,
        "adapter": "adapter",
        "value_adapter": "value_adapter",
        "log": "ppo_log.jsonl",
        "lora": {"policy": {"r": cfg.policy_lora.r, "alpha": cfg.policy_lora.alpha},
                 "value": {"r": cfg.value_lora.r, "alpha": cfg.value_lora.alpha}},
    }
