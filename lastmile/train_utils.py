"""Training-loop pieces shared by the reward model, the MLE baseline and PPO (paper §3.1).

Every model is optimised the same way: AdamW with a cosine learning-rate schedule starting at
1e-5, one epoch over the shuffled data. A *step* is one optimiser update on one batch (14 for
the reward model, 7 for MLE). A batch may run as several forwards ("micro-batches": at most
`micro_batch_size` rows and `token_budget` padded tokens each, rows of similar length
together) whose gradients accumulate before the update. Losses are normalised by the *whole
batch's* denominator (computed from token counts before any forward), so the accumulated
gradient equals the one-forward gradient exactly, whatever the split.

Faults. Every `checkpoint_every` steps `train_loop` saves its whole state (`lastmile.checkpoint`)
and a rerun into the same checkpoint directory resumes after the last complete checkpoint, as
if never stopped. An update whose loss or gradient norm is NaN/inf never reaches the weights:
gradients are zeroed, the optimiser step is skipped, the batch is logged (`NonFiniteGuard`),
and `max_bad_updates` such updates in a row stop the stage with FloatingPointError.

Data parallelism (`lastmile.distributed`). Run as N processes, every rank forms the same
batches and takes a contiguous share of each batch's rows; losses still divide by the whole
batch's denominator, so the gradients summed over ranks are the one-process gradient and every
rank takes the same step. Only the main rank writes the log and the checkpoints.

Sharded base (`lastmile.fsdp`, `Profile.fsdp`). When the trainable parameters are FSDP shards
(the stage called `fsdp.shard_base`), FSDP has already summed their gradients over ranks
(reduce-scatter): only the whole ones (scalar heads) are all-reduced, the norm for clipping
is the global one over the shards (`fsdp.clip_gradients`), and every rank runs as many
micro-batches as the rank with the most (`fsdp.shortfall`), so the sharded layers' gathers
line up. Unsharded, none of this runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
import warnings
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from . import distributed, fsdp
from .checkpoint import Checkpointer
from .config import OptimConfig

log = logging.getLogger(__name__)

#: Padded tokens per forward (see `micro_batches`). Measured on real SmolLM2, bundled Debian
#: data, this 2-core CPU, the same batches timed back to back (forward + backward, medians):
#: reward batch 14 (rows 174 tokens on average): one forward 17.2 s and 12.7 GiB peak RSS,
#: budget 1024 10.3 s and 3.7 GiB, budget 512 10.5 s; MLE batch 7: 5.9 s vs 4.5 s. Rows of
#: similar length together waste little on padding and the activations stay small.
DEFAULT_TOKEN_BUDGET = 1024


# ----------------------------------------------------------------------------- set-up

def seed_everything(seed: int) -> None:
    """Seed Python, torch (and numpy when present) so a stage reruns identically.

    On a CPU it also turns on torch's deterministic algorithms: the backward of gathering a
    shared prompt's KV cache per row (`reward.output_states`) is index_put with accumulate,
    which torch runs as atomic float adds from parallel threads, so the sums round in
    whichever order the threads finish and two runs of the same seed drift apart within a few
    steps. Not on a GPU, where deterministic mode demands CUBLAS_WORKSPACE_CONFIG and slows
    other kernels; the cluster profile promises the same data and schedule, not the same bits.

    Deterministic mode also fills every new tensor with NaN (a guard against reading
    uninitialised memory) unless told not to; nothing here reads memory it did not write (the
    same-seed and bit-exact resume tests compare the bits), and the fill was ~17% of a reward
    step's backward (bench/README.md, the cost account).
    """
    random.seed(seed)
    torch.manual_seed(seed)
    if not torch.cuda.is_available():
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # numpy is optional here
        pass


def default_device() -> torch.device:
    """CUDA when the node has a GPU (the cluster profile), otherwise the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_optimizer(params: Sequence[torch.nn.Parameter], cfg: OptimConfig, total_steps: int,
                   head_params: Sequence[torch.nn.Parameter] = ()):
    """AdamW + cosine decay from `cfg.learning_rate` to 0 over `total_steps` (paper §3.1).

    `head_params` (a subset of `params`: scalar heads) start from `cfg.head_learning_rate`
    when it is set; the cosine schedule scales both groups alike.
    """
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: was the adapter added with trainable=True?")
    for name in ("learning_rate", "head_learning_rate"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    groups = [params]
    if cfg.head_learning_rate is not None:
        heads = {id(p) for p in head_params}
        groups = [[p for p in params if id(p) not in heads], [p for p in params if id(p) in heads]]
    optimizer = torch.optim.AdamW(
        [{"params": group, "lr": cfg.learning_rate if i == 0 else cfg.head_learning_rate}
         for i, group in enumerate(groups) if group],
        lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, max(total_steps, 1))
    return optimizer, scheduler


# ----------------------------------------------------------------------------- data

@dataclass
class TokenExample:
    """One training row as token ids: chat-formatted prompt, then output (EOS when it fits)."""

    prompt_ids: list[int]
    output_ids: list[int]
    label: float = 0.0  # reward target of every output token (reward model)
    weight: float = 1.0  # per-example loss weight (1 for true rows, 1/5 for negatives)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


def epoch_batches(n: int, batch_size: int, epochs: int = 1, seed: int = 0,
                  max_steps: int | None = None,
                  groups: Sequence | None = None) -> list[list[int]]:
    """Row indices per step: a seeded shuffle per epoch cut into batches (last one may be short).

    `groups` (one key per row): shuffle the groups instead and keep each group's rows
    together, in their given order, before cutting. The reward model uses it so a true output
    and its negatives land in one batch and share a forward of their prompt
    (`reward.output_states`). Which rows form a batch depends only on (n, batch_size, epoch,
    seed, groups), never on lengths.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
    batches: list[list[int]] = []
    for epoch in range(epochs):
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        if groups is None:
            order = torch.randperm(n, generator=gen).tolist()
        else:
            members: dict = {}
            for i, key in enumerate(groups):
                members.setdefault(key, []).append(i)
            blocks = list(members.values())
            order = [i for b in torch.randperm(len(blocks), generator=gen).tolist()
                     for i in blocks[b]]
        batches += [order[i: i + batch_size] for i in range(0, n, batch_size)]
    return batches[:max_steps] if max_steps is not None else batches


def padded_tokens(group: Sequence[TokenExample]) -> int:
    """A bound on the tokens one forward of `group` processes (`micro_batches`' default cost):
    its distinct prompts padded to the longest prompt, plus every row's output padded to the
    longest output. For rows with distinct prompts it bounds rows x longest row, the cost of
    one forward of prompt + output per row (MLE); the reward model counts its own forward
    exactly (`reward.forward_tokens`).
    """
    prompts = {tuple(e.prompt_ids) for e in group}
    return (len(prompts) * max(len(e.prompt_ids) for e in group)
            + len(group) * max(len(e.output_ids) for e in group))


#: The tokens a forward of a group of rows processes (`padded_tokens`, `reward.forward_tokens`).
TokenCost = Callable[[Sequence[TokenExample]], int]


def micro_batches(batch: Sequence[TokenExample], micro_batch_size: int | None,
                  token_budget: int | None = None,
                  cost: TokenCost = padded_tokens) -> list[list[TokenExample]]:
    """Split one batch into forwards of at most `micro_batch_size` rows and `token_budget`
    tokens by `cost` each.

    Only the forwards change, never the batch: the rows, the loss and the gradient are those
    of the whole batch (`train_loop` divides by the whole batch's denominator). Rows are
    ordered by prompt length, then prompt, then output length, so rows sharing a prompt (a
    true output and its negatives) share its forward and similar lengths waste little on
    padding; the budget bounds activation memory (one 14 x 686-token forward of SmolLM2
    peaked at 21.6 GiB; see DEFAULT_TOKEN_BUDGET).
    """
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size}")
    if token_budget is not None and token_budget < 1:
        raise ValueError(f"token_budget must be >= 1 or None, got {token_budget}")
    if not batch:  # a rank whose share of a short batch is empty
        return []
    rows_cap = micro_batch_size or len(batch)
    if token_budget is None and rows_cap >= len(batch):
        return [list(batch)]
    groups: list[list[TokenExample]] = []
    for example in sorted(batch, key=lambda e: (len(e.prompt_ids), e.prompt_ids,
                                                len(e.output_ids))):
        group = groups[-1] if groups else None
        if group is not None and len(group) < rows_cap and (
                token_budget is None or cost(group + [example]) <= token_budget):
            group.append(example)
        else:
            groups.append([example])
    return groups


# ----------------------------------------------------------------------------- logging

class StepLog:
    """JSON Lines, one row per optimiser step, flushed as it goes (a stage can be watched).

    With `stage` (its description, e.g. "PPO") the same rows also become the stage's curves:
    TensorBoard event files in the log's folder/tensorboard/ and, when MLFLOW_TRACKING_URI is
    set, MLflow metrics, with `config` (the stage's dataclass) as parameters
    (`lastmile.tracking`).
    """

    def __init__(self, path: str | os.PathLike | None, rows: Sequence[dict] = (),
                 stage: str | None = None, config: object | None = None):
        """Starts the file afresh with `rows` (a resumed run's rows up to its checkpoint)."""
        self.path = Path(path) if path is not None else None
        self.rows: list[dict] = []
        self._file = None
        self._tracker = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", encoding="utf-8")
            if stage is not None:
                from .tracking import StageTracker, stage_name

                self._tracker = StageTracker(stage_name(stage), self.path.parent, config)
        for row in rows:
            self.write(row, replayed=True)

    def write(self, row: dict, replayed: bool = False) -> None:
        self.rows.append(row)
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        if self._tracker is not None:
            self._tracker.log(row, replayed)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None


def progress(total: int, desc: str, unit: str = "step", initial: int = 0):
    """A tqdm bar on stderr (KFP shows it in the step's log); LASTMILE_NO_PROGRESS=1 hides it."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, initial=initial,
                disable=os.environ.get("LASTMILE_NO_PROGRESS") == "1"
                or not distributed.world().is_main)


# ----------------------------------------------------------------------------- the loop

#: loss numerator of a micro-batch: sum over its rows/tokens of weight * per-token loss.
Numerator = Callable[[list[TokenExample]], torch.Tensor]
#: the row's share of the loss denominator (e.g. weight * number of output tokens).
Denominator = Callable[[TokenExample], float]


def train_loop(params: Sequence[torch.nn.Parameter], examples: Sequence[TokenExample],
               numerator: Numerator, denominator: Denominator, optim: OptimConfig, *,
               batch_size: int, micro_batch_size: int | None = None,
               token_budget: int | None = DEFAULT_TOKEN_BUDGET,
               token_cost: TokenCost = padded_tokens, epochs: int = 1,
               max_steps: int | None = None, seed: int = 0,
               log_path: str | os.PathLike | None = None, desc: str = "train",
               checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 0,
               max_bad_updates: int = 3, example_ids: Sequence | None = None,
               groups: Sequence | None = None,
               head_params: Sequence[torch.nn.Parameter] = (),
               config: object | None = None) -> dict:
    """Optimise `params` on `examples`; returns a summary of the run.

    `groups`: one key per example; a group's examples stay together in batches
    (`epoch_batches`). `token_budget` / `token_cost`: see `micro_batches`. `head_params`: the
    scalar heads among `params` (`make_optimizer`). `config`: the stage's configuration,
    logged beside its curves (`StepLog`, `lastmile.tracking`).

    Loss of a batch = sum(numerator(micro) for its micro-batches) / sum(denominator(row)),
    a weighted mean whose gradient does not depend on the micro-batch split.

    Every `checkpoint_every` steps (and after the last) the state goes to `checkpoint_dir`
    (`lastmile.checkpoint`); a call finding a checkpoint there resumes after its step, and the
    summary says `resumed_from_step`. An update whose loss or gradient norm is not finite is
    skipped (`NonFiniteGuard`); `max_bad_updates` in a row raise FloatingPointError.

    In a torch.distributed world (`lastmile.distributed`) each rank computes its share of
    every batch and the gradients are summed before the step; the main rank writes the log
    and the checkpoints, and the summary counts the batch's rows, not one rank's.
    """
    if not examples:
        raise ValueError(f"{desc}: no training examples")
    params = [p for p in params if p.requires_grad]
    if groups is not None and len(groups) != len(examples):
        raise ValueError(f"{desc}: {len(groups)} group keys for {len(examples)} examples")
    steps = epoch_batches(len(examples), batch_size, epochs, seed, max_steps, groups)
    optimizer, scheduler = make_optimizer(params, optim, len(steps), head_params)
    run = run_key(desc, steps, examples, optim, seed, micro_batch_size, token_budget)
    ckpt = Checkpointer(checkpoint_dir, checkpoint_every, params, optimizer, scheduler, run)
    start, extras = ckpt.resume()
    guard = NonFiniteGuard(desc, max_bad_updates, extras.get("bad_streak", 0))
    logger = StepLog(log_path if distributed.world().is_main else None, extras.get("log", []),
                     stage=desc, config=config)
    bar = progress(len(steps), desc, initial=start)
    started = time.perf_counter()
    try:
        for step, indices in enumerate(steps[start:], start=start + 1):
            batch = [examples[i] for i in indices]
            ids = [example_ids[i] for i in indices] if example_ids is not None else None
            row = _train_step(step, batch, params, optimizer, scheduler, guard, numerator,
                              denominator, optim, micro_batch_size, token_budget, token_cost,
                              {"indices": indices, "ids": ids})
            logger.write(row)
            if ckpt.due(step, len(steps)):
                ckpt.save(step, {"log": logger.rows, "bad_streak": guard.streak})
            bar.update(1)
            bar.set_postfix(loss="skipped" if row.get("skipped") else f"{row['loss']:.4f}",
                            lr=f"{row['lr']:.2e}")
    finally:
        bar.close()
        logger.close()
    summary = summarize_log(logger.rows, time.perf_counter() - started, len(examples))
    summary["resumed_from_step"] = start or None
    return summary


def _train_step(step: int, batch: list[TokenExample], params, optimizer, scheduler,
                guard: "NonFiniteGuard", numerator: Numerator, denominator: Denominator,
                optim: OptimConfig, micro_batch_size: int | None, token_budget: int | None,
                token_cost: TokenCost, where: dict) -> dict:
    """One optimiser update on `batch` (skipped when not finite); its step-log row.

    Distributed: this rank backpropagates its share of the rows (the denominator is the whole
    batch's); the loss and the gradients are summed over ranks before anything reads them,
    so every rank clips, checks and steps alike. Sharded (`lastmile.fsdp`): FSDP has summed
    the shards' gradients; the rest are all-reduced and the norm is the global one.
    """
    t0 = time.perf_counter()
    total = float(sum(denominator(e) for e in batch))
    if total <= 0:
        raise ValueError(f"{guard.stage}: step {step} has no loss weight (empty outputs?)")
    optimizer.zero_grad(set_to_none=True)
    world = distributed.world()
    mine = distributed.shard_indices(batch, world.rank, world.size)
    sharded = fsdp.any_sharded(params)
    loss = _accumulate(mine, numerator, total, micro_batch_size, token_budget, token_cost,
                       idle=batch if sharded else None)
    watched = {"loss": distributed.all_reduce_sum(loss)}
    if math.isfinite(watched["loss"]):  # a non-finite loss stopped before all backwards
        if sharded:
            fsdp.reduce_replicated_gradients(params)
            watched["grad_norm"] = fsdp.clip_gradients(
                [p for p in params if p.grad is not None], optim.max_grad_norm)
        else:
            distributed.all_reduce_gradients(params)
            watched["grad_norm"] = _clip(params, optim.max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    bad = guard.check(step, watched, where)
    if bad:
        optimizer.zero_grad(set_to_none=True)  # nothing of this batch reaches the weights
    else:
        optimizer.step()
    step_schedule(scheduler)  # the schedule follows the data position, skipped or not
    row = {"step": step, "loss": watched["loss"], "lr": lr,
           "grad_norm": watched.get("grad_norm"),
           "rows": len(batch), "tokens": sum(e.length for e in batch),
           "seconds": round(time.perf_counter() - t0, 4)}
    return skipped_row(row, bad, where) if bad else row


def _accumulate(batch: list[TokenExample], numerator: Numerator, total: float,
                micro_batch_size: int | None, token_budget: int | None,
                token_cost: TokenCost, idle: Sequence[TokenExample] | None = None) -> float:
    """Backpropagate the batch loss micro-batch by micro-batch; returns the loss.

    Stops at the first non-finite part (its value is returned; the caller skips the update).
    `idle` (a sharded base: the whole batch, which every rank holds): every micro-batch runs,
    whatever its loss, and then idle ones (zero times the loss of the batch's shortest row)
    until this rank has run as many as the rank with the most (`fsdp.shortfall`).
    """
    loss_sum = 0.0
    parts = micro_batches(batch, micro_batch_size, token_budget, token_cost)
    missing = fsdp.shortfall(len(parts)) if idle is not None else 0  # before any forward
    for micro in parts:
        part = numerator(micro) / total  # scalar
        value = part.item()
        if not math.isfinite(value) and idle is None:
            return value
        part.backward()  # sharded: a non-finite part skips the update all the same
        loss_sum += value
    for _ in range(missing):
        (numerator([min(idle, key=lambda e: e.length)]) * 0.0).backward()
    return loss_sum


def run_key(desc: str, steps: list[list[int]], examples: Sequence[TokenExample],
            optim: OptimConfig, seed: int, micro_batch_size: int | None,
            token_budget: int | None) -> dict:
    """What a checkpoint must agree with to be resumed: the stage, its batches and data."""
    data = hashlib.sha256()
    for e in examples:
        data.update(array("q", [len(e.prompt_ids), *e.prompt_ids, *e.output_ids]).tobytes())
        data.update(array("d", [e.label, e.weight]).tobytes())
    return {"stage": desc, "steps": len(steps), "seed": seed, "optim": asdict(optim),
            "micro_batch_size": micro_batch_size, "token_budget": token_budget,
            "batches": hashlib.sha256(json.dumps(steps).encode()).hexdigest(),
            "data": data.hexdigest()}


# ----------------------------------------------------------------------------- faults

class NonFiniteGuard:
    """Decides whether an update may reach the optimiser: every watched value finite.

    `check` returns the names of the non-finite values (empty: go ahead). A bad update is
    logged with its batch and must be skipped by the caller (gradients zeroed, no optimiser
    step); `max_bad` bad updates in a row raise FloatingPointError naming the stage, the step
    and the values, before any adapter of the stage is written.
    """

    def __init__(self, stage: str, max_bad: int = 3, streak: int = 0):
        if max_bad < 1:
            raise ValueError(f"{stage}: max_bad_updates must be >= 1, got {max_bad}")
        self.stage, self.max_bad, self.streak = stage, max_bad, streak

    def check(self, step: int, values: dict[str, float], where: dict) -> list[str]:
        return self.record(step, nonfinite(values), where)

    def record(self, step: int, bad: dict[str, float], where: dict) -> list[str]:
        """Count one update whose non-finite values are `bad` ({} for a good update)."""
        if not bad:
            self.streak = 0
            return []
        self.streak += 1
        what = ", ".join(f"{k}={v}" for k, v in bad.items())
        log.warning("%s: step %d: non-finite %s; update skipped (%d in a row); batch %s",
                    self.stage, step, what, self.streak, where)
        if self.streak >= self.max_bad:
            raise FloatingPointError(
                f"{self.stage}: step {step}: non-finite {what}; {self.streak} bad updates in a "
                f"row (max_bad_updates={self.max_bad}), stopping (batch {where})")
        return list(bad)


def nonfinite(values: dict[str, float]) -> dict[str, float]:
    """The entries of `values` that are NaN or infinite."""
    return {k: v for k, v in values.items() if not math.isfinite(v)}


def step_schedule(scheduler) -> None:
    """scheduler.step(), also after a skipped first update (torch warns then: not an error
    here, the learning rate follows the data position)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        scheduler.step()


def skipped_row(row: dict, bad: list[str], where: dict) -> dict:
    """A log row for a skipped update: non-finite numbers become null (strict JSON)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in row.items()}
    return {**clean, "skipped": True, "nonfinite": bad, **where}


def _clip(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm is None:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad)
                                                     for p in grads]))
    else:
        norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
    return float(norm)


def summarize_log(rows: list[dict], seconds: float, n_examples: int) -> dict:
    """Loss statistics over the applied updates; skipped (non-finite) ones are counted apart."""
    done = [r for r in rows if not r.get("skipped")]
    losses = [r["loss"] for r in done]
    tail = losses[-max(1, len(losses) // 10):]
    step_seconds = sorted(r["seconds"] for r in rows)
    return {
        "examples": n_examples,
        "steps": len(rows),
        "skipped_steps": len(rows) - len(done),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "tail_mean_loss": sum(tail) / len(tail) if tail else None,  # last 10% of steps
        "seconds": round(seconds, 3),
        "median_step_seconds": step_seconds[len(step_seconds) // 2] if step_seconds else None,
        "tokens": sum(r["tokens"] for r in rows),
    }


def chunked(items: Iterable, size: int) -> Iterable[list]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
