"""The reward model (paper §3.2): base + LoRA adapter "reward" (r=16, α=16) + scalar head.

Training data is rm.jsonl from `lastmile.negatives`: every true example (label 1, weight 1)
beside the five negative classes (label 0, weight 1/5). Every output token of a row - its EOS
included, when the output ended - targets the row's label, and the loss is squared error.

Which position predicts which token's reward (modeling.py, "Alignment"): the reward for output
token a_t, at position p = P + t in prompt + output, is the head applied to the hidden state at
p itself, i.e. conditional on the input and the output so far *including* a_t. PPO reads the
same position for r_{t+1} in Eq. 2.

Normalisation: the loss of a batch is the weighted mean over all its output tokens,

    L = sum_i w_i sum_{t in out_i} (r̂_it - y_i)^2  /  sum_i w_i n_i ,

so each token carries its row's weight and a step's loss is comparable across batches. Note
that long negatives (copy of the input, repetitive endings up to the 100-token budget) weigh
more in tokens than a short true output; the per-token reward PPO consumes is what the
squared loss calibrates, which is why the normalisation is per token.

Sequence level (`RewardConfig.level` = "sequence", an option after the paper's Discussion:
"it may be necessary to modify the reward function from being token-based to being
sequence-based"). Only each output's last token - its EOS when it ended - regresses to the
row's label, with the same weights:

    L = sum_i w_i (r̂_i,last - y_i)^2  /  sum_i w_i ,

an output is ranked by that one score (`sequence_reward`), and PPO receives it as r_{T} of
Eq. 2 on the last output token, zero before it (`ppo_rewards`; the length penalty is
unchanged). The level is written beside the saved adapter (`adapter_level`), so PPO reads
the reward as it was trained.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch

from . import checkpoint, distributed
from . import fsdp as sharding
from .config import REWARD_LEVELS, NegativesConfig, RewardConfig
from .io import read_jsonl, write_json
from .modeling import (AdapterModel, adapter_meta, autocast, collate, encode_outputs,
                       encode_prompts, load_base, resolve_precision)
from .train_utils import (TokenExample, default_device, seed_everything, train_loop)

log = logging.getLogger(__name__)

ADAPTER = "reward"
TRUE = "true"
REQUIRED = ("prompt", "output", "label", "weight", "category")
TOKEN, SEQUENCE = REWARD_LEVELS  # RewardConfig.level
LEVEL_KEY = "reward_level"  # the level's entry in the saved adapter's metadata


# ----------------------------------------------------------------------------- data

def validate_reward_rows(rows: Sequence[dict], source: str = "reward rows") -> None:
    """Raise naming the row when a reward-dataset row is malformed."""
    if not rows:
        raise ValueError(f"{source}: no rows")
    for i, row in enumerate(rows, start=1):
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise ValueError(f"{source}: row {i} (id={row.get('id')!r}) lacks {missing}")
        if not isinstance(row["prompt"], str) or not row["prompt"]:
            raise ValueError(f"{source}: row {i} (id={row.get('id')!r}) has an empty prompt")
        if not isinstance(row["output"], str):
            raise ValueError(f"{source}: row {i} (id={row.get('id')!r}) output is not text")
        if row["label"] not in (0, 1, 0.0, 1.0):
            raise ValueError(f"{source}: row {i} (id={row.get('id')!r}) label must be 1 or 0, "
                             f"got {row['label']!r}")
        if not isinstance(row["weight"], (int, float)) or row["weight"] <= 0:
            raise ValueError(f"{source}: row {i} (id={row.get('id')!r}) weight must be > 0, "
                             f"got {row['weight']!r}")


def read_reward_rows(path: str | os.PathLike) -> list[dict]:
    rows = list(read_jsonl(path))
    validate_reward_rows(rows, str(path))
    return rows


def encode_rows(tokenizer, rows: Sequence[dict], max_output_tokens: int) -> list[TokenExample]:
    """Token ids per row; prompts are shared by a true row and its negatives, so encode once."""
    unique = list(dict.fromkeys(r["prompt"] for r in rows))
    prompt_ids = dict(zip(unique, encode_prompts(tokenizer, unique)))
    outputs = encode_outputs(tokenizer, [r["output"] for r in rows], max_output_tokens)
    examples = []
    for row, out in zip(rows, outputs):
        if not out:  # max_output_tokens == 0 only; an empty output still has its EOS
            raise ValueError(f"row id={row.get('id')!r}: no output tokens within the budget")
        examples.append(TokenExample(prompt_ids[row["prompt"]], out, float(row["label"]),
                                     float(row["weight"])))
    return examples


# ----------------------------------------------------------------------------- loss

def output_states(model: AdapterModel, prompt_ids: Sequence[Sequence[int]],
                  output_ids: Sequence[Sequence[int]], pad_id: int,
                  adapter: str = ADAPTER) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states at each row's output positions, [B, O, H], and their mask [B, O].

    Rows that share a prompt (a true output and its five negatives) share one forward of it:
    the distinct prompts run once (right-padded, [U, P]), their KV cache is gathered per row,
    and the outputs continue from it with positions that follow each prompt's real length.
    The outputs continue in two length buckets (`length_buckets`): a true output is ~11
    tokens, a repetitive or copied negative up to 100, and one padded block would make every
    short row pay for 100. The states equal those of one forward of prompt + output per row
    (tests/test_reward.py); on rm.jsonl this processes ~3x fewer tokens than that. Gradients
    flow into the prompt forward through the gathered cache.
    """
    if sharding.is_sharded_model(model):
        return _row_states(model, prompt_ids, output_ids, pad_id, adapter)
    from transformers import DynamicCache

    device = model.heads[adapter].proj.weight.device
    distinct: dict[tuple[int, ...], int] = {}
    row_prompt = [distinct.setdefault(tuple(p), len(distinct)) for p in prompt_ids]  # [B]
    prompts = collate([list(p) for p in distinct], [[] for _ in distinct], pad_id).to(device)
    outputs = collate([[] for _ in output_ids], [list(o) for o in output_ids], pad_id).to(device)
    prompt_len = prompts.prompt_lengths.to(device)  # [U]
    hidden: torch.Tensor | None = None
    with model.use(adapter):
        cache = model.decoder(
            input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
            position_ids=(prompts.attention_mask.cumsum(-1) - 1).clamp(min=0),  # [U, P]
            use_cache=True).past_key_values
        for bucket in length_buckets([len(o) for o in output_ids]):
            width = len(output_ids[bucket[-1]])  # the bucket's longest output
            rows = torch.tensor(bucket, device=device)  # [b] rows of the batch
            owner = torch.tensor([row_prompt[i] for i in bucket], device=device)  # [b] -> [U]
            row_cache = DynamicCache(ddp_cache_data=[  # [U, ...] -> [b, ...], differentiable
                (layer.keys[owner], layer.values[owner]) for layer in cache.layers])
            states = model.decoder(
                input_ids=outputs.input_ids[rows, :width],  # [b, w]
                attention_mask=torch.cat([prompts.attention_mask[owner],
                                          outputs.attention_mask[rows, :width]], 1),
                position_ids=prompt_len[owner, None] + torch.arange(width, device=device),
                past_key_values=row_cache, use_cache=True).last_hidden_state  # [b, w, H]
            if hidden is None:
                hidden = states.new_zeros(len(output_ids), outputs.input_ids.shape[1],
                                          states.shape[-1])  # [B, O, H]
            hidden = hidden.index_put((rows[:, None], torch.arange(width, device=device)),
                                      states)
    return hidden, outputs.output_mask


def _row_states(model: AdapterModel, prompt_ids: Sequence[Sequence[int]],
                output_ids: Sequence[Sequence[int]], pad_id: int,
                adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`output_states` by one forward of prompt + output per row, for a sharded base
    (lastmile.fsdp). There every decoder call gathers each layer on every rank at once, and
    FSDP re-gathers a layer for its backward only when gradient reaches the layer's output:
    the shared prompt's forward reaches the loss through its KV cache alone, so its last
    layer would be differentiated with its weights already freed. One call per micro-batch,
    the same on every rank, at the price of each row's own prompt forward."""
    device = model.heads[adapter].proj.weight.device
    batch = collate([list(p) for p in prompt_ids], [list(o) for o in output_ids],
                    pad_id).to(device)
    hidden = model.hidden_states(batch.input_ids, batch.attention_mask, adapter)  # [B, L, H]
    lengths = batch.output_lengths.to(device)  # [B]
    steps = torch.arange(int(lengths.max()), device=device)  # [O]
    mask = steps[None, :] < lengths[:, None]  # [B, O], outputs left-aligned
    where = (batch.prompt_lengths.to(device)[:, None] + steps).clamp(max=hidden.shape[1] - 1)
    states = hidden.gather(1, where[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, O, H]
    return states, mask


def length_buckets(lengths: Sequence[int]) -> list[list[int]]:
    """Row indices in one or two groups by length, split where the padded total is least.

    Rows are taken shortest first; a split into [:k] and [k:] pads to k x (k-th length) plus
    (B - k) x (longest). One group when no split saves anything.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    size = [lengths[i] for i in order]
    cost = [k * size[k - 1] + (len(size) - k) * size[-1] for k in range(1, len(size) + 1)]
    k = min(range(len(cost)), key=lambda j: (cost[j], -j)) + 1  # ties: fewer groups
    return [order[:k], order[k:]] if k < len(order) else [order]


def forward_tokens(examples: Sequence[TokenExample]) -> int:
    """The tokens `output_states` processes for these rows: the distinct prompts padded to
    the longest, plus each length bucket's outputs padded to its longest (the micro-batch
    budget's cost, `RewardConfig.token_budget`)."""
    prompts = {tuple(e.prompt_ids) for e in examples}
    lengths = [len(e.output_ids) for e in examples]
    return (len(prompts) * max(len(e.prompt_ids) for e in examples)
            + sum(len(b) * lengths[b[-1]] for b in length_buckets(lengths)))


def row_forward_tokens(examples: Sequence[TokenExample]) -> int:
    """The tokens `_row_states` (a sharded base) processes: one padded prompt + output per
    row, with no prompt shared; the budget's cost there instead of `forward_tokens`."""
    return len(examples) * max(len(e.prompt_ids) + len(e.output_ids) for e in examples)


def check_level(level: str) -> str:
    if level not in REWARD_LEVELS:
        raise ValueError(f"reward level must be one of {REWARD_LEVELS}, got {level!r}")
    return level


def reward_loss_sum(model: AdapterModel, examples: Sequence[TokenExample], pad_id: int,
                    adapter: str = ADAPTER, level: str = TOKEN) -> torch.Tensor:
    """sum_i w_i sum_t (r̂_it - y_i)^2 over the output tokens of `examples` (a scalar);
    at level "sequence" sum_i w_i (r̂_i,last - y_i)^2, the last output token only."""
    hidden, mask = output_states(model, [e.prompt_ids for e in examples],
                                 [e.output_ids for e in examples], pad_id, adapter)
    device = hidden.device
    labels = torch.tensor([e.label for e in examples], device=device)  # [B]
    weights = torch.tensor([e.weight for e in examples], device=device)  # [B]
    if check_level(level) == SEQUENCE:
        # Outputs are left-aligned in `hidden` (output_states), so row i's last output token
        # is at n_i - 1; the head sees only those B states.
        last = mask.sum(-1) - 1  # [B]
        predicted = model.scalar(hidden[torch.arange(len(examples), device=device), last],
                                 adapter).float()  # [B]
        return (weights * (predicted - labels) ** 2).sum()
    # The reward for token a_t is read at a_t's own position (see the module docstring), so
    # the states to score are exactly those under the output mask; the head sees only them.
    rows = mask.nonzero()[:, 0]  # [N] row of each output token
    predicted = model.scalar(hidden[mask], adapter).float()  # [N]
    return (weights[rows] * (predicted - labels[rows]) ** 2).sum()


def reward_loss_weight(example: TokenExample, level: str = TOKEN) -> float:
    """The row's share of the denominator: w_i * n_i (its weighted token count); w_i at
    level "sequence" (one target per row)."""
    return example.weight * (len(example.output_ids) if level == TOKEN else 1)


def reward_loss(model: AdapterModel, examples: Sequence[TokenExample], pad_id: int,
                adapter: str = ADAPTER, level: str = TOKEN) -> torch.Tensor:
    """The weighted mean squared error of one batch, per token (or per row at level
    "sequence"): what a step minimises."""
    total = sum(reward_loss_weight(e, level) for e in examples)
    return reward_loss_sum(model, examples, pad_id, adapter, level) / total


# ----------------------------------------------------------------------------- training

def add_reward_adapter(model: AdapterModel, cfg: RewardConfig) -> None:
    model.add_adapter(ADAPTER, cfg.lora, head=True, seed=cfg.seed, trainable=True)


def train_reward(model: AdapterModel, tokenizer, rows: Sequence[dict], cfg: RewardConfig,
                 log_path: str | os.PathLike | None = None,
                 checkpoint_dir: str | os.PathLike | None = None) -> dict:
    """Train adapter "reward" (added here when missing) on rm rows; returns the run summary.

    With `checkpoint_dir` (else `cfg.checkpoint_dir`) and `cfg.checkpoint_every` > 0 the run
    checkpoints there and a later call resumes from it (`train_utils.train_loop`).
    """
    validate_reward_rows(rows)
    level = check_level(cfg.level)
    if ADAPTER not in model.specs:
        add_reward_adapter(model, cfg)
    seed_everything(cfg.seed)
    examples = encode_rows(tokenizer, rows, cfg.max_output_tokens)
    pad_id = tokenizer.pad_token_id

    def numerator(micro: Sequence[TokenExample]) -> torch.Tensor:
        with autocast(model, cfg.precision, exact_lora=False):  # per forward (modeling.autocast)
            return reward_loss_sum(model, micro, pad_id, level=level)

    def denominator(example: TokenExample) -> float:
        return reward_loss_weight(example, level)

    return train_loop(
        model.adapter_parameters(ADAPTER), examples, numerator=numerator,
        denominator=denominator, optim=cfg.optim, batch_size=cfg.batch_size,
        micro_batch_size=cfg.micro_batch_size, token_budget=cfg.token_budget,
        token_cost=row_forward_tokens if sharding.is_sharded_model(model) else forward_tokens,
        epochs=cfg.epochs, max_steps=cfg.max_steps,
        seed=cfg.seed, log_path=log_path, desc="reward model",
        checkpoint_dir=checkpoint_dir or cfg.checkpoint_dir,
        checkpoint_every=cfg.checkpoint_every, max_bad_updates=cfg.max_bad_updates,
        example_ids=[r.get("id") for r in rows], groups=[_source(r) for r in rows],
        head_params=list(model.heads[ADAPTER].parameters()), config=cfg)


# ----------------------------------------------------------------------------- scoring

@torch.no_grad()
def score_outputs(model: AdapterModel, tokenizer, prompts: Sequence[str], outputs: Sequence[str],
                  max_output_tokens: int, adapter: str = ADAPTER,
                  batch_size: int = 16) -> list[torch.Tensor]:
    """Per-token predicted rewards [n_i] for each (prompt, output), in input order (CPU).

    Outputs are encoded as in training (EOS appended when the output fits the budget), so the
    last reward of an ended output is the one read at its EOS. A sequence-level model's
    reward is that last score alone (`sequence_reward(..., level="sequence")`).
    """
    if len(prompts) != len(outputs):
        raise ValueError(f"score_outputs: {len(prompts)} prompts but {len(outputs)} outputs")
    if not prompts:
        return []
    prompt_ids = encode_prompts(tokenizer, list(prompts))
    output_ids = encode_outputs(tokenizer, list(outputs), max_output_tokens)
    # Rows of one prompt side by side (they share its forward), similar lengths together.
    order = sorted(range(len(prompts)), key=lambda i: (len(prompt_ids[i]), prompts[i],
                                                        len(output_ids[i])))
    result: list[torch.Tensor | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        hidden, mask = output_states(model, [prompt_ids[i] for i in idx],
                                     [output_ids[i] for i in idx], tokenizer.pad_token_id,
                                     adapter)  # [B, O, H], [B, O]
        rewards = model.scalar(hidden, adapter).float().cpu()  # [B, O]
        mask = mask.cpu()
        for row, i in enumerate(idx):
            result[i] = rewards[row][mask[row]]  # [n_i], reward of a_t at a_t's position
    return result  # type: ignore[return-value]


def sequence_reward(token_rewards: torch.Tensor, level: str = TOKEN) -> float:
    """One number per output: the mean of its per-token rewards (level "token"), or its last
    token's, the only one a sequence-level model was trained on (level "sequence").

    A mean (not a sum) so outputs of different lengths compare on the scale of the token
    targets (1 true, 0 negative); this is what the held-out evaluation ranks.
    """
    if token_rewards.numel() == 0:
        raise ValueError("sequence_reward of an output with no tokens")
    if check_level(level) == SEQUENCE:
        return float(token_rewards[-1].float())
    return float(token_rewards.float().mean())


def ppo_rewards(scores: torch.Tensor, mask: torch.Tensor, level: str = TOKEN) -> torch.Tensor:
    """The reward model's part of r_{t+1} in Eq. 2, [B, T], from its score at every output
    token `scores` [B, T] (zero past each row's end) and the output mask [B, T].

    "token" (the paper, §3.2): every token's own score, `scores` itself. "sequence": the last
    output token's score on that token and zeros before it - the sparse, delayed reward the
    paper's Discussion anticipates. The length penalty is added by PPO either way.
    """
    if check_level(level) == TOKEN:
        return scores
    last = mask.sum(-1) - 1  # [B]; every row has at least one output token
    rows = torch.arange(mask.shape[0], device=mask.device)  # [B]
    out = torch.zeros_like(scores)
    out[rows, last] = scores[rows, last]
    return out


def adapter_level(adapter_dir: str | os.PathLike) -> str:
    """The level a saved reward adapter was trained at (written with it by
    `train_reward_model`); "token" for adapters saved before the option existed."""
    return check_level(adapter_meta(adapter_dir).get(LEVEL_KEY, TOKEN))


# ----------------------------------------------------------------------------- evaluation

def summarize_scores(rows: Sequence[dict], scores: Sequence[float]) -> dict:
    """Mean reward per category and per-category accuracy from one score per row.

    A pair is a true row and a negative row with the same `source_id`; the pair is correct
    when the true output scores strictly higher (a tie counts as wrong).
    """
    if len(rows) != len(scores):
        raise ValueError(f"{len(rows)} rows but {len(scores)} scores")
    by_category: dict[str, list[float]] = defaultdict(list)
    true_score: dict[str, float] = {}
    for row, score in zip(rows, scores):
        by_category[row["category"]].append(float(score))
        if row["category"] == TRUE:
            true_score[_source(row)] = float(score)
    wins: dict[str, list[bool]] = defaultdict(list)
    for row, score in zip(rows, scores):
        if row["category"] != TRUE and _source(row) in true_score:
            wins[row["category"]].append(true_score[_source(row)] > float(score))
    mean = {c: sum(v) / len(v) for c, v in by_category.items()}
    ordered = [TRUE] + sorted(c for c in mean if c != TRUE) if TRUE in mean else sorted(mean)
    return {
        "n": len(true_score),
        "mean_reward": {c: mean[c] for c in ordered},
        "accuracy": {c: sum(w) / len(w) for c, w in sorted(wins.items())},
        "pairs": {c: len(w) for c, w in sorted(wins.items())},
    }


def _source(row: dict) -> str:
    return str(row.get("source_id") if row.get("source_id") is not None else row.get("id"))


def evaluate_reward_model(model: AdapterModel, tokenizer, rows_with_negatives: Sequence[dict],
                          cfg: RewardConfig) -> dict:
    """Score held-out true rows and their negatives (rm.jsonl layout); see `summarize_scores`."""
    validate_reward_rows(rows_with_negatives, "held-out reward rows")
    with autocast(model, cfg.precision, exact_lora=False):
        token_rewards = score_outputs(model, tokenizer,
                                      [r["prompt"] for r in rows_with_negatives],
                                      [r["output"] for r in rows_with_negatives],
                                      cfg.max_output_tokens)
    return summarize_scores(rows_with_negatives,
                            [sequence_reward(t, cfg.level) for t in token_rewards])


def held_out_reward_rows(test_rows: Sequence[dict], cfg: RewardConfig, tokenizer,
                         categories: Sequence[str] | None = None) -> list[dict]:
    """The first `cfg.eval_examples` test rows as true rows plus their synthesized negatives.

    `categories`: the negative classes to build (the training set's, so the evaluation asks
    about what the model learned); None takes NegativesConfig's default list.
    """
    from . import negatives

    chosen = list(test_rows)[: cfg.eval_examples]
    neg_cfg = NegativesConfig(seed=cfg.seed, max_output_tokens=cfg.max_output_tokens)
    if categories is not None:
        neg_cfg.categories = tuple(categories)
    return negatives.synthesize(chosen, neg_cfg, tokenizer)


# ----------------------------------------------------------------------------- the stage

def train_reward_model(rm_path: str | os.PathLike, out_dir: str | os.PathLike,
                       cfg: RewardConfig, base_source: str,
                       eval_rows: list[dict] | None = None, *, allow_pickle: bool = False,
                       trust_remote_code: bool = False, processes: int = 1,
                       fsdp: bool = False) -> dict:
    """The train_reward stage: train, save out_dir/adapter, evaluate into rm_eval.json.

    Writes out_dir/train_log.jsonl (one row per step) and, when `eval_rows` (held-out true
    examples: id, input, output, prompt) are given, out_dir/rm_eval.json. Returns the summary.
    Checkpoints go to `cfg.checkpoint_dir` or out_dir/checkpoints; a rerun with the same
    out_dir resumes from the latest; they are deleted once the adapter is written.
    `allow_pickle` / `trust_remote_code`: see `modeling.load_base` (both off unless asked).
    `processes`: data-parallel training processes (0: one per visible GPU; the same batches
    and, up to float rounding, the same adapter: `lastmile.distributed`); the held-out
    evaluation runs on the main rank alone, on the trained weights every rank shares.
    `fsdp` (`Profile.fsdp`): shard the base's decoder layers over those processes
    (`lastmile.fsdp`; needs two or more); every rank then runs the evaluation, the main rank
    writes it.
    """
    # before any process starts; "auto" resolved here, so the summary names what ran
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision,
                                                               what="RewardConfig.precision"))
    check_level(cfg.level)
    sharding.check_world(fsdp, processes)
    return distributed.launch(_train_reward_model, processes, rm_path, out_dir, cfg,
                              base_source, eval_rows, allow_pickle=allow_pickle,
                              trust_remote_code=trust_remote_code, fsdp=fsdp)


def _train_reward_model(rm_path: str | os.PathLike, out_dir: str | os.PathLike,
                        cfg: RewardConfig, base_source: str, eval_rows: list[dict] | None, *,
                        allow_pickle: bool, trust_remote_code: bool,
                        fsdp: bool = False) -> dict:
    """`train_reward_model` in this process, as one rank of the current world (or alone)."""
    world = distributed.world()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_reward_rows(rm_path)
    started = time.perf_counter()
    base, tokenizer = load_base(base_source, allow_pickle=allow_pickle,
                                trust_remote_code=trust_remote_code)
    model = AdapterModel(base)
    add_reward_adapter(model, cfg)
    if fsdp:  # before the optimiser (it steps the shards) and before the move to the GPU:
        sharding.shard_base(model)  # each layer goes there alone and leaves a shard
    model.to(default_device())
    loaded = time.perf_counter() - started
    checkpoints = checkpoint.resolve_dir(out, cfg.checkpoint_dir)
    train = train_reward(model, tokenizer, rows, cfg, log_path=out / "train_log.jsonl",
                         checkpoint_dir=checkpoints)
    summary = {"rows": len(rows), "categories": _count(rows), "load_seconds": round(loaded, 3),
               "train": train, "adapter": "adapter", "lora": {"r": cfg.lora.r,
                                                              "alpha": cfg.lora.alpha},
               "processes": world.size, "precision": cfg.precision, "level": cfg.level,
               "fsdp": fsdp}
    # every rank: gathers when sharded; the level travels with the adapter, so PPO reads its
    # rewards at the level they were trained at
    sharding.save_adapter(model, ADAPTER, out / "adapter", meta={LEVEL_KEY: cfg.level})
    if world.is_main:
        checkpoint.clear(checkpoints)
    if world.is_main or fsdp:  # sharded forwards need every rank (each scores every row)
        _evaluate_held_out(model, tokenizer, eval_rows, cfg, summary, out, world.is_main)
    return summary


def _evaluate_held_out(model: AdapterModel, tokenizer, eval_rows: list[dict] | None,
                       cfg: RewardConfig, summary: dict, out: Path, write: bool = True) -> None:
    """summary["eval"] and (`write`) out/rm_eval.json from the held-out rows (nothing
    without them)."""
    if eval_rows:
        trained = [c for c in summary["categories"] if c != TRUE]
        held_out = held_out_reward_rows(eval_rows, cfg, tokenizer, categories=trained or None)
        t0 = time.perf_counter()
        summary["eval"] = evaluate_reward_model(model, tokenizer, held_out, cfg)
        summary["eval_seconds"] = round(time.perf_counter() - t0, 3)
        if write:
            write_json(out / "rm_eval.json", summary["eval"])


def _count(rows: Sequence[dict]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[r["category"]] += 1
    return dict(sorted(counts.items()))
