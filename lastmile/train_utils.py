"""Training-loop pieces shared by the reward model, the MLE baseline and PPO (paper §3.1).

Every model is optimised the same way: AdamW with a cosine learning-rate schedule starting at
1e-5, one epoch over the shuffled data. A *step* is one optimiser update on one batch (14 for
the reward model, 7 for MLE). A batch may run as several forwards ("micro-batches": at most
`micro_batch_size` rows and `token_budget` padded tokens each, rows of similar length
together) whose gradients accumulate before the update. Losses are normalised by the *whole
batch's* denominator (computed from token counts before any forward), so the accumulated
gradient equals the one-forward gradient exactly, whatever the split.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

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
    """Seed Python, torch (and numpy when present) so a stage reruns identically."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # numpy is optional here
        pass


def default_device() -> torch.device:
    """CUDA when the node has a GPU (the cluster profile), otherwise the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_optimizer(params: Sequence[torch.nn.Parameter], cfg: OptimConfig, total_steps: int):
    """AdamW + cosine decay from `cfg.learning_rate` to 0 over `total_steps` (paper §3.1)."""
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: was the adapter added with trainable=True?")
    if cfg.learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {cfg.learning_rate}")
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
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
                  max_steps: int | None = None) -> list[list[int]]:
    """Row indices per step: a seeded shuffle per epoch cut into batches (last one may be short).

    Which rows form a batch depends only on (n, batch_size, epoch, seed), never on lengths.
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
        order = torch.randperm(n, generator=gen).tolist()
        batches += [order[i: i + batch_size] for i in range(0, n, batch_size)]
    return batches[:max_steps] if max_steps is not None else batches


def micro_batches(batch: Sequence[TokenExample], micro_batch_size: int | None,
                  token_budget: int | None = None) -> list[list[TokenExample]]:
    """Split one batch into forwards: rows sorted by length, at most `micro_batch_size` rows
    and at most `token_budget` padded tokens (rows x longest row) per forward.

    Only the forwards change, never the batch: the rows, the loss and the gradient are those
    of the whole batch (`train_loop` divides by the whole batch's denominator). Grouping rows
    of similar length cuts the compute spent on padding, and the budget bounds activation
    memory (one 14 x 686-token forward of SmolLM2 peaked at 21.6 GiB; see DEFAULT_TOKEN_BUDGET).
    """
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size}")
    if token_budget is not None and token_budget < 1:
        raise ValueError(f"token_budget must be >= 1 or None, got {token_budget}")
    rows_cap = micro_batch_size or len(batch)
    if token_budget is None and rows_cap >= len(batch):
        return [list(batch)]
    groups: list[list[TokenExample]] = []
    for example in sorted(batch, key=lambda e: e.length):  # ascending: the last row is longest
        group = groups[-1] if groups else None
        if group is not None and len(group) < rows_cap and (
                token_budget is None or (len(group) + 1) * example.length <= token_budget):
            group.append(example)
        else:
            groups.append([example])
    return groups


# ----------------------------------------------------------------------------- logging

class StepLog:
    """JSON Lines, one row per optimiser step, flushed as it goes (a stage can be watched)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self.rows: list[dict] = []
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def progress(total: int, desc: str, unit: str = "step"):
    """A tqdm bar on stderr (KFP shows it in the step's log); LASTMILE_NO_PROGRESS=1 hides it."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True,
                disable=os.environ.get("LASTMILE_NO_PROGRESS") == "1")


# ----------------------------------------------------------------------------- the loop

#: loss numerator of a micro-batch: sum over its rows/tokens of weight * per-token loss.
Numerator = Callable[[list[TokenExample]], torch.Tensor]
#: the row's share of the loss denominator (e.g. weight * number of output tokens).
Denominator = Callable[[TokenExample], float]


def train_loop(params: Sequence[torch.nn.Parameter], examples: Sequence[TokenExample],
               numerator: Numerator, denominator: Denominator, optim: OptimConfig, *,
               batch_size: int, micro_batch_size: int | None = None,
               token_budget: int | None = DEFAULT_TOKEN_BUDGET, epochs: int = 1,
               max_steps: int | None = None, seed: int = 0,
               log_path: str | os.PathLike | None = None, desc: str = "train") -> dict:
    """Optimise `params` on `examples`; returns a summary of the run.

    Loss of a batch = sum(numerator(micro) for its micro-batches) / sum(denominator(row)),
    a weighted mean whose gradient does not depend on the micro-batch split.
    """
    if not examples:
        raise ValueError(f"{desc}: no training examples")
    params = [p for p in params if p.requires_grad]
    steps = epoch_batches(len(examples), batch_size, epochs, seed, max_steps)
    optimizer, scheduler = make_optimizer(params, optim, len(steps))
    logger = StepLog(log_path)
    bar = progress(len(steps), desc)
    started = time.perf_counter()
    try:
        for step, indices in enumerate(steps, start=1):
            t0 = time.perf_counter()
            batch = [examples[i] for i in indices]
            total = float(sum(denominator(e) for e in batch))
            if total <= 0:
                raise ValueError(f"{desc}: step {step} has no loss weight (empty outputs?)")
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for micro in micro_batches(batch, micro_batch_size, token_budget):
                part = numerator(micro) / total
                part.backward()
                loss_sum += part.item()
            grad_norm = _clip(params, optim.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"{desc}: loss is {loss_sum} at step {step}")
            row = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                   "rows": len(batch), "tokens": sum(e.length for e in batch),
                   "seconds": round(time.perf_counter() - t0, 4)}
            logger.write(row)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}")
    finally:
        bar.close()
        logger.close()
    return summarize_log(logger.rows, time.perf_counter() - started, len(examples))


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
    losses = [r["loss"] for r in rows]
    tail = losses[-max(1, len(losses) // 10):]
    step_seconds = sorted(r["seconds"] for r in rows)
    return {
        "examples": n_examples,
        "steps": len(rows),
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
