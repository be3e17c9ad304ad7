"""PPO against the frozen reward model (paper §3.3): policy and value adapters on one base.

Three named adapters share the one frozen base (`modeling.AdapterModel`): "reward" (loaded
frozen from the reward stage, LoRA r=16 + head), "policy" (LoRA r=32, α=16) and "value"
(LoRA r=32, α=16 + head), the last two fresh on the base chat model (the paper's start;
`PPOConfig.init_policy_from_mle` starts the policy from the MLE adapter instead).

One *outer batch* (7 prompts) gives one update. Outer batches alternate deterministically:
with `reference_fraction` = 0.5 the even ones are *sampled* (outputs drawn from the policy,
≤100 new tokens, temperature 1) and the odd ones are *reference* (the true outputs + EOS), as
in §3.3 ("for half of the outer loop batches ... the remaining half used ground-truth
outputs").

Per-token reward and alignment (modeling.py, "Alignment"). For output token a_t at position
p = P + t of prompt + output:
  * pi(a_t | s_t) and V(s_t) are read from the hidden state at p - 1;
  * r_{t+1} (Eq. 2) = reward-model head at p (input + output so far *including* a_t)
    + the length penalty of token t (`length_penalty`). A sequence-level reward adapter
    (`RewardConfig.level`, recorded with the adapter) gives its head's score at the last
    output token only, zero before it (`lastmile.reward.ppo_rewards`).
Lengths count tokens as the batch layout stores them: an output that ended carries its EOS
(true outputs: text + EOS; samples that stopped: ... EOS), a sample cut at the token budget has
none. So a sample equal to the reference text plus EOS pays nothing, and every token past the
reference's length (EOS included) pays `length_penalty` (-2.5).

Equations (T = output length of the row, V(s_T) = 0 beyond the last token):
  Eq. 1  w_t = pi_theta(a_t|s_t) / pi_old(a_t|s_t)
  Eq. 2  A_t = sum_{t'=t}^{T-1} (γλ)^{t'-t} (r_{t'+1} + γ V(s_{t'+1}) - V(s_{t'}))      (`gae`)
  Eq. 3  L_PPO = E_t[min(w_t A_t, clip(w_t, 1-ε, 1+ε) A_t)], maximised      (`policy_loss`)
  Eq. 4  V(s_t)^target = sum_{t'=t}^{T-1} γ^{t'-t} r_{t'+1}, a Monte-Carlo return (not GAE's
         A + V, as the paper writes it); squared loss                  (`value_loss`)
E_t is a mean over every output token of the batch. No entropy or KL term by default.

Speed and memory (bench/README.md has the measurements). With one PPO epoch and one
minibatch (the paper's setting) the pre-update policy *is* the current one, so pi_old and the
V used in Eq. 2 come from the same forward that is differentiated (w_t = exp(logp -
logp.detach()) = 1 with the right gradient) instead of extra no-grad forwards; the general
path (`PPOConfig.ppo_epochs` > 1, `minibatches` > 1 or `kl_coef` > 0) does the textbook rollout
forwards. Log-probabilities use vocabulary logits only at output positions. Sampling is a
KV-cached loop and sampling and the reward model run on merged copies of the weights
(`merged_weights`). Forwards and backwards go in micro-batches of rows, so only one
micro-batch's activations live at a time; losses are normalised by the whole batch's token
count, so the gradient does not depend on the split. `PPOTrainer(precision="bfloat16")` runs
the frozen base's matmuls in bf16 (an option; float32 by default). Log-probabilities are of
the sampling distribution (logits / temperature, as TRL does): pi itself at temperature 1.

Optimiser: one AdamW (cosine from `optim.learning_rate`, as every stage; the value head from
`optim.head_learning_rate` when set) over the policy and value parameters; each model's
gradient norm is clipped separately to
`optim.max_grad_norm`, so the value loss's scale (returns reach hundreds with the length
penalty) cannot shrink the policy's step. Adam is invariant to a constant loss scale per
parameter, so the value loss needs no coefficient: the objective is L_policy + L_value.

Sampling is Gumbel-max (argmax of logits / temperature, filtered by top-k / top-p, plus Gumbel
noise): an exact draw from the filtered softmax. Each row of an outer batch draws its noise
from its own stream, keyed by (seed, update, row) (`row_generators`), so its tokens depend
neither on the other rows of its forward nor on any generator state: a batch sampled whole or
split over processes draws the same tokens, and a resumed run draws what an uninterrupted one
would have.

Data parallelism (`lastmile.distributed`). As N processes, each rank samples, scores and
differentiates a contiguous share of every outer batch's rows. Everything normalised over the
batch (the token count of E_t, whitening, the logged means) sums numerators and denominators
over ranks, and the gradients are summed before clipping, so each rank takes the step one
process would; the main rank writes the log, checkpoints and adapters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from . import checkpoint, distributed
from . import fsdp as sharding
from .config import PPOConfig
from .io import read_jsonl, write_json
from .modeling import (AdapterModel, SequenceBatch, autocast, bf16_attention, check_precision,
                       collate, encode_outputs, encode_prompts, is_quantized, left_pad,
                       load_base)
from .reward import adapter_level, check_level, ppo_rewards
from .train_utils import (NonFiniteGuard, StepLog, default_device, epoch_batches,
                          make_optimizer, nonfinite, progress, seed_everything, skipped_row,
                          step_schedule)

log = logging.getLogger(__name__)

POLICY = "policy"
VALUE = "value"
REWARD = "reward"
SAMPLED = "sampled"
REFERENCE = "reference"
#: Rows per forward/backward (activation memory is per micro-batch; the gradient is the same).
#: Two rows of ~350 tokens keep SmolLM2-135M's PPO step under 4 GiB at full matmul speed.
DEFAULT_MICRO_BATCH = 2
#: What must be finite for an optimiser step (besides the rewards): `PPOTrainer.step`.
WATCHED = ("advantage_mean", "policy_loss", "value_loss", "policy_grad_norm", "value_grad_norm")


# ============================================================================ the equations

def length_penalty(output_lengths: torch.Tensor, reference_lengths: torch.Tensor, T: int,
                   coef: float = -2.5) -> torch.Tensor:
    """[B, T]: `coef` on every output token past the reference length, 0 elsewhere (§3.2).

    output_lengths, reference_lengths [B] count tokens the same way (EOS included when the
    output ended); token t (0-based) is penalised when reference_length <= t < output_length.
    """
    t = torch.arange(T, device=output_lengths.device)  # [T]
    beyond = (t[None, :] >= reference_lengths[:, None]) & (t[None, :] < output_lengths[:, None])
    return torch.where(beyond, coef, 0.0)  # [B, T] float32


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. 4: G_t = sum_{t'>=t} γ^{t'-t} r_{t'+1} over the row's tokens; [B, T] -> [B, T]."""
    mask = mask.to(rewards.dtype)
    rewards = rewards * mask  # zero past each row's end, so the sum stops there
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # [B]; V(s_T)^target = 0 past the last token
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 advantages and Eq. 4 value targets; all [B, T], token t of row b at [b, t].

    rewards[b, t] is r_{t+1} (the reward for a_t), values[b, t] is V(s_t), mask[b, t] is True
    for the row's output tokens (a prefix of each row). V(s_T) = 0 beyond the last token.
    Nothing here is differentiated: pass detached values.
    """
    mask = mask.to(rewards.dtype)
    rewards = rewards * mask  # both zero past each row's end: V(s_T) = 0 there, and the
    values = values * mask  # TD errors (and so the sums) stop at the last token
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # [B] A_{t+1}
    next_value = torch.zeros_like(running)  # [B] V(s_{t+1})
    for t in range(rewards.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages * mask, discounted_returns(rewards, mask, gamma)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def batch_masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`masked_mean` over the whole outer batch: this rank's rows and every other rank's
    (numerator and denominator summed over ranks; `masked_mean` itself in one process)."""
    mask = mask.to(x.dtype)
    total = distributed.all_reduce_sum((x * mask).sum())
    return total / distributed.all_reduce_sum(mask.sum()).clamp(min=1.0)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the masked entries of the whole outer batch (optional
    advantage whitening; statistics over every rank's rows)."""
    mean = batch_masked_mean(x, mask)
    var = batch_masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_eps: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 1 + 3 as a loss to minimise: -E_t[min(w_t A_t, clip(w_t, 1±ε) A_t)].

    Returns (loss, clip_fraction, approx_kl): the share of tokens whose clipped term is the
    active one (zero gradient), and 0.5·E_t[(log w_t)^2] (a KL(old‖new) estimate). Any
    shape; E_t is the masked mean over all entries.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)  # Eq. 1
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)  # Eq. 3, negated
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
        approx_kl = masked_mean(0.5 * log_ratio.detach() ** 2, mask)
    return loss, clip_fraction, approx_kl


def value_loss(values: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared loss against the Eq. 4 targets, mean over the masked tokens."""
    return masked_mean((values - targets) ** 2, mask)


def batch_kinds(n_batches: int, reference_fraction: float) -> list[str]:
    """Deterministic alternation: batch k is "reference" when floor((k+1)f) > floor(kf).

    f = 0.5 gives sampled, reference, sampled, ... (half and half, §3.3); f = 0 all sampled,
    f = 1 all reference.
    """
    if not 0.0 <= reference_fraction <= 1.0:
        raise ValueError(f"PPOConfig.reference_fraction must be in [0, 1], got "
                         f"{reference_fraction}")
    # The small epsilon makes 0.5 * 2 == 1 robust against float rounding of other fractions.
    return [REFERENCE if math.floor((k + 1) * reference_fraction + 1e-9)
            > math.floor(k * reference_fraction + 1e-9) else SAMPLED for k in range(n_batches)]


# ============================================================================ sampling



#: Which sampler drew the outputs (part of a checkpoint's run key: a run resumes only with it).
SAMPLER = "gumbel-max, one stream per (seed, update, row)"


def row_generators(seed: int, update: int, positions: Sequence[int],
                   device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One random stream per row of outer batch `update`, keyed by (seed, update, position).

    A row's tokens then depend on its own key, not on which rows share its forward, how the
    batch is split over processes, or what was drawn before (nothing to checkpoint).
    """
    generators = []
    for position in positions:
        key = hashlib.sha256(f"lastmile-ppo/{seed}/{update}/{position}".encode()).digest()
        generator = torch.Generator(device=device)
        generator.manual_seed(int.from_bytes(key[:8], "little") >> 1)
        generators.append(generator)
    return generators


def gumbel_noise(rows: int, vocab: int, generator, device: torch.device) -> torch.Tensor:
    """[rows, vocab] standard Gumbel noise, -log(E) with E ~ Exp(1).

    argmax(logits + noise) is an exact sample of softmax(logits) (-inf logits never win).
    `generator`: a list with one torch.Generator per row (each row's noise from its own
    stream), one generator for the whole batch, or None (torch's global one).
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != rows:
            raise ValueError(f"{len(generator)} generators for {rows} rows")
        draws = torch.stack([torch.empty(vocab, device=device).exponential_(generator=g)
                             for g in generator])
    else:
        draws = torch.empty(rows, vocab, device=device).exponential_(generator=generator)
    return -torch.log(draws)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus filtering of [B, V] logits (-inf outside); 0 / 1.0 switch them off."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already cover top_p (the first always stays)
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def can_merge(model: AdapterModel) -> bool:
    """Whether `merged_weights` applies: not on a quantized base (GPTQ's packed qweight has no
    dense W to add s·BA to), which samples and scores with its LoRA layers unmerged. Nor on
    a sharded base (`lastmile.fsdp`): outside a forward its weights are this rank's shards
    (DTensors), so there is no whole W to add s·BA to, and a merged copy of every layer at
    once is the memory sharding exists to avoid; FSDP gathers one layer at a time inside
    the unmerged forward instead."""
    return not is_quantized(model) and not sharding.is_sharded_model(model)


def _lora_layers(model: AdapterModel, adapter: str) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.base.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]


@contextlib.contextmanager
def merged_weights(model: AdapterModel, adapter: str | None,
                   dtype: torch.dtype = torch.float32) -> Iterator[None]:
    """Run the block on the base with `adapter` merged (W + s·BA) in fresh `dtype` weights.

    For no-grad passes (sampling, the reward model): an unmerged LoRA costs two thin matmuls,
    a scale and an add per linear (+15% on a forward, more per decoding step); merged weights
    cost one matmul. Call the model with adapter None inside the block. The merged weights
    are views of one new buffer swapped in for the block and out after it: the frozen base is
    never written (peft's in-place merge/unmerge leaves float rounding in it after every
    update), and the single large buffer goes back to the OS when freed instead of fragmenting
    the heap under the training peak. LoRA layers are off inside the block; the model's adapter
    state is restored after it.

    `dtype` bfloat16 (sampling at precision "bfloat16") casts every base weight, which halves
    the weight traffic of decoding; attention then switches as in `modeling.bf16_attention`.

    Not for a quantized base (`can_merge`): its callers take the unmerged path there.
    """
    if not can_merge(model):
        raise ValueError("merged_weights: the base is quantized (no dense weights to merge a "
                         "LoRA into); run the adapter unmerged (merge=False)")
    params: list[tuple[torch.nn.Parameter, torch.nn.Module | None]] = []
    seen: set[int] = set()
    if adapter is not None:
        for layer in _lora_layers(model, adapter):
            params.append((layer.base_layer.weight, layer))
            seen.add(id(layer.base_layer.weight))
    if dtype != torch.float32:
        for name, param in model.base.named_parameters():  # tied weights are listed once
            if "lora_" not in name and id(param) not in seen:
                params.append((param, None))
    swapped: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    kernel = bf16_attention(model.base) if dtype != torch.float32 else contextlib.nullcontext()
    with torch.no_grad(), model.use(None):
        try:
            buffer = torch.empty(sum(p.numel() for p, _ in params), dtype=dtype,
                                 device=model.lm_head.weight.device)
            offset = 0
            for param, layer in params:
                view = buffer[offset: offset + param.numel()].view(param.shape)
                offset += param.numel()
                if layer is not None:
                    view.copy_(param.data + layer.get_delta_weight(adapter))  # W + s·B·A
                else:
                    view.copy_(param.data)
                swapped.append((param, param.data))
                param.data = view
            del buffer
            with kernel:
                yield
        finally:
            for param, original in reversed(swapped):
                param.data = original


@torch.no_grad()
def sample_outputs(model: AdapterModel, prompt_ids: Sequence[Sequence[int]], adapter: str | None,
                   *, max_new_tokens: int, eos_id: int, pad_id: int, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, min_new_tokens: int = 0,
                   generator: torch.Generator | Sequence[torch.Generator] | None = None,
                   merge: bool = True, dtype: torch.dtype = torch.float32) -> list[list[int]]:
    """Sampled output ids per prompt: up to and including EOS, or `max_new_tokens` without it.

    A KV-cached decoding loop over the causal LM (left padding; positions follow the mask).
    Each token is Gumbel-max over the filtered logits / temperature (`gumbel_noise`);
    `generator` is one per row (`row_generators`: tokens independent of the batching), one
    for the batch, or None.
    `min_new_tokens` forbids EOS before that many tokens (the benchmark forces full length).
    A quantized base always samples through the unmerged LoRA (`can_merge`), in its own dtype.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature <= 0:
        raise ValueError(f"PPOConfig.temperature must be > 0, got {temperature}")
    # Sharded layers gather in every forward on every rank at once (`fsdp.shortfall`): decode
    # until the rows of every rank are done (the done rows of this one emit padding); a rank
    # with no rows decodes one throwaway row, done from the start.
    device = model.lm_head.weight.device
    lockstep = sharding.is_sharded_model(model)
    idle = lockstep and not prompt_ids
    if idle:
        prompt_ids, generator = [[pad_id]], torch.Generator(device).manual_seed(0)
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("sample_outputs: needs non-empty prompts")
    from transformers import DynamicCache

    ids, mask = left_pad(prompt_ids, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, P]
    done = torch.full((len(prompt_ids),), idle, dtype=torch.bool, device=device)
    steps: list[torch.Tensor] = []
    weights = (merged_weights(model, adapter, dtype)
               if (merge or dtype != torch.float32) and can_merge(model) else model.use(adapter))
    with weights:
        cache = DynamicCache(config=model.base.config)
        out = model.base(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        position = positions[:, -1:]  # [B, 1]
        for step in range(max_new_tokens):
            logits = out.logits[:, -1].float() / temperature  # [B, V]
            if step < min_new_tokens:
                logits[:, eos_id] = float("-inf")
            logits = filter_logits(logits, top_k, top_p)  # [B, V]
            noise = gumbel_noise(logits.shape[0], logits.shape[1], generator, device)
            token = (logits + noise).argmax(-1)  # [B], a draw from softmax(logits)
            token = torch.where(done, torch.full_like(token, pad_id), token)  # [B]
            steps.append(token)
            done |= token == eos_id
            if step == max_new_tokens - 1:
                break
            if (distributed.all_reduce_sum(float(not done.all())) == 0 if lockstep
                    else bool(done.all())):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position = position + 1
            out = model.base(input_ids=token[:, None], attention_mask=mask,
                             position_ids=position, past_key_values=cache, use_cache=True)
    if idle:
        return []
    rows = torch.stack(steps, dim=1).tolist()  # [B, n]
    return [row[: row.index(eos_id) + 1] if eos_id in row else row for row in rows]


# ============================================================================ the trainer

@dataclass
class Rollout:
    """One outer batch's trajectories and rewards; [B, T] tensors are in output-token space."""

    kind: str  # "sampled" | "reference"
    batch: SequenceBatch  # prompt + output, right-padded (modeling.collate)
    mask: torch.Tensor  # [B, T] bool, t < output length
    rm_rewards: torch.Tensor  # [B, T] reward-model prediction for a_t (read at its position)
    penalty: torch.Tensor  # [B, T] length penalty of a_t
    rewards: torch.Tensor  # [B, T] r_{t+1} of Eq. 2: rm_rewards + penalty (- KL term)
    reference_lengths: torch.Tensor  # [B] tokens, EOS included
    kl: torch.Tensor | None = None  # [B, T] log pi - log pi_base, when kl_coef > 0
    # Distributed: the B rows are this rank's share of the outer batch.
    positions: list[int] | None = None  # each row's place in the outer batch (None: 0..B-1)
    batch_rows: int | None = None  # rows of the whole outer batch (None: B)

    @property
    def output_lengths(self) -> torch.Tensor:
        return self.batch.output_lengths

    @property
    def places(self) -> list[int]:
        return list(range(self.mask.shape[0])) if self.positions is None else self.positions

    @property
    def n_rows(self) -> int:
        return self.mask.shape[0] if self.batch_rows is None else self.batch_rows


def to_output_space(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-output-token values [N] (row-major, as `hidden[mask]` yields them) -> [B, T]."""
    out = flat.new_zeros(mask.shape)
    out[mask] = flat  # differentiable: index_put keeps the graph to `flat`
    return out


def output_space_mask(lengths: torch.Tensor, T: int | None = None) -> torch.Tensor:
    T = int(lengths.max()) if T is None else T
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]  # [B, T]


def _rows(batch: SequenceBatch, idx: Sequence[int]) -> SequenceBatch:
    """Rows `idx` of a batch, trimmed to their own longest row (less padding per micro-batch)."""
    sel = torch.as_tensor(list(idx), device=batch.input_ids.device)
    width = int(batch.attention_mask[sel].sum(-1).max())
    return SequenceBatch(batch.input_ids[sel, :width], batch.attention_mask[sel, :width],
                         batch.output_mask[sel, :width], batch.prompt_lengths[sel],
                         batch.output_lengths[sel])


class PPOTrainer:
    """PPO updates for adapters "policy" and "value" against the frozen adapter "reward".

    The model must already hold the three adapters (see `build_model`). `step(rollout)` is
    one outer-batch update; `gradients(rollout)` stops before the optimiser (tests compare
    the fast and the textbook path with it). `fast=False` forces the textbook path.

    `micro_batch_size`: rows per forward/backward (None: the whole batch at once); the
    gradient is the same, the activation memory is one micro-batch's. `merge`: sample and
    score the reward with the LoRA merged into copies of the weights (`merged_weights`).
    `precision` "bfloat16" runs the frozen base's matmuls in bf16 (float32 accumulation):
    samples from bf16 copies of the merged weights, reward/value/policy forwards (and their
    backwards) under autocast with the float32 residual stream, log-softmax, losses,
    advantages, LoRA weights, gradients and AdamW state in float32. About 2x faster on CPUs
    with AVX512-BF16/AMX (bench/README.md); losses and gradients then differ from float32 by
    bf16 rounding. The paper's own base was a 4-bit GPTQ model. "float32" (default) is exact.
    """

    def __init__(self, model: AdapterModel, tokenizer, cfg: PPOConfig, total_updates: int,
                 *, micro_batch_size: int | None = DEFAULT_MICRO_BATCH, fast: bool = True,
                 merge: bool = True, precision: str = "float32", reward_level: str = "token"):
        _check_config(cfg)
        # The reward adapter's training level (reward.adapter_level): per token, or once on
        # the last output token (the paper's Discussion).
        self.reward_level = check_level(reward_level)
        check_precision(precision)
        for name, head in ((POLICY, False), (VALUE, True), (REWARD, True)):
            if name not in model.specs:
                raise ValueError(f"PPOTrainer needs adapter {name!r}; the model has "
                                 f"{sorted(model.specs)}")
            if head and name not in model.heads:
                raise ValueError(f"adapter {name!r} needs a scalar head")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size}")
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.micro_batch_size = micro_batch_size
        # A quantized or sharded base has no whole dense weights to merge into (`can_merge`):
        # sample and score unmerged.
        self.merge = merge and can_merge(model)
        if merge and not self.merge:
            log.info("quantized or sharded base: PPO samples and scores the reward with "
                     "unmerged LoRA")
        # Sharded layers (lastmile.fsdp): FSDP sums their gradients, and every rank runs as
        # many forwards as the rank with the most (`_idle`).
        self.sharded = sharding.is_sharded_model(model)
        self.precision = precision
        self.fast = fast and cfg.ppo_epochs == 1 and cfg.minibatches == 1 and cfg.kl_coef == 0
        self.device = model.lm_head.weight.device
        self.policy_params = [p for p in model.adapter_parameters(POLICY) if p.requires_grad]
        self.value_params = [p for p in model.adapter_parameters(VALUE) if p.requires_grad]
        if not self.policy_params or not self.value_params:
            raise ValueError("the policy and value adapters must be trainable")
        self.optimizer, self.scheduler = make_optimizer(
            self.policy_params + self.value_params, cfg.optim,
            total_updates * cfg.ppo_epochs * cfg.minibatches,
            head_params=list(model.heads[VALUE].parameters()))
        self.sample_calls = 0  # outer-batch number of `sample` calls that name none

    # -- trajectories ------------------------------------------------------------------
    def sample(self, prompt_ids: Sequence[Sequence[int]], min_new_tokens: int = 0, *,
               update: int | None = None, positions: Sequence[int] | None = None
               ) -> list[list[int]]:
        """Outputs drawn from the current policy (temperature, top-k, top-p from the config).

        Row i draws from the stream of (seed, `update`, positions[i]) (`row_generators`), so
        the rows of outer batch `update` get the same tokens however they are split over
        calls or processes. `update` None: this trainer's count of such calls; `positions`
        None: 0..B-1.
        """
        if not prompt_ids and not self.sharded:  # a rank whose share of a short batch is empty
            return []  # (sharded, it still joins the decoding: `sample_outputs`)
        if update is None:
            self.sample_calls += 1
            update = self.sample_calls
        positions = range(len(prompt_ids)) if positions is None else positions
        generators = row_generators(self.cfg.seed, update, positions, self.device)
        cfg = self.cfg
        return sample_outputs(self.model, prompt_ids, POLICY, max_new_tokens=cfg.max_new_tokens,
                              eos_id=self.tokenizer.eos_token_id,
                              pad_id=self.tokenizer.pad_token_id, temperature=cfg.temperature,
                              top_k=cfg.top_k, top_p=cfg.top_p, min_new_tokens=min_new_tokens,
                              generator=generators, merge=self.merge,
                              dtype=check_precision(self.precision))

    @torch.no_grad()
    def rollout(self, kind: str, prompt_ids: Sequence[Sequence[int]],
                output_ids: Sequence[Sequence[int]],
                reference_ids: Sequence[Sequence[int]], *,
                positions: Sequence[int] | None = None,
                batch_rows: int | None = None) -> Rollout:
        """Score outputs: reward model at each output token + length penalty (- KL term).

        Distributed: the rows are this rank's share of the outer batch, at `positions` of its
        `batch_rows` rows (None: the rows are the whole batch).
        """
        if kind not in (SAMPLED, REFERENCE):
            raise ValueError(f"batch kind must be {SAMPLED!r} or {REFERENCE!r}, got {kind!r}")
        if any(len(o) == 0 for o in output_ids):
            raise ValueError("rollout: every output needs at least one token")
        where = {"positions": None if positions is None else list(positions),
                 "batch_rows": batch_rows}
        if not output_ids:
            empty = self._empty_rollout(kind, **where)
            if self.sharded:  # join the other ranks' sharded forwards
                self._idle(self._shortfall(0), REWARD)
                if self.cfg.kl_coef:
                    self._policy_logprobs(empty, POLICY), self._policy_logprobs(empty, None)
            return empty
        batch = collate(list(prompt_ids), list(output_ids), self.tokenizer.pad_token_id)
        batch = batch.to(self.device)
        mask = output_space_mask(batch.output_lengths)  # [B, T]
        rm = mask.new_zeros(mask.shape, dtype=torch.float32)
        merged = merged_weights(self.model, REWARD) if self.merge else contextlib.nullcontext()
        parts = self._micro_batches(len(output_ids))
        missing = self._shortfall(len(parts))
        with merged, self._autocast():
            for idx in parts:
                part = _rows(batch, idx)
                hidden = self.model.hidden_states(part.input_ids, part.attention_mask,
                                                  None if self.merge else REWARD)
                scores = self.model.scalar(hidden[part.output_mask], REWARD).float()  # [N]
                rm[idx] = to_output_space(scores, mask[idx])
        self._idle(missing, REWARD)
        rm = ppo_rewards(rm, mask, self.reward_level)  # [B, T]
        ref_lengths = torch.tensor([len(r) for r in reference_ids], device=self.device)
        penalty = length_penalty(batch.output_lengths, ref_lengths, mask.shape[1],
                                 self.cfg.length_penalty).to(self.device)
        rollout = Rollout(kind, batch, mask, rm, penalty, rm + penalty, ref_lengths, **where)
        if self.cfg.kl_coef:
            rollout.kl = self._policy_logprobs(rollout, POLICY) - self._policy_logprobs(
                rollout, None)
            rollout.rewards = rollout.rewards - self.cfg.kl_coef * rollout.kl
        return rollout

    def _empty_rollout(self, kind: str, positions, batch_rows) -> Rollout:
        """No rows (a rank whose share of a short outer batch is empty): [0, 1] tensors, so
        the rank joins every sum over ranks with nothing to add."""
        ids = torch.zeros(0, 1, dtype=torch.long, device=self.device)
        lengths = torch.zeros(0, dtype=torch.long, device=self.device)
        batch = SequenceBatch(ids, ids, ids.bool(), lengths, lengths)
        zeros = torch.zeros(0, 1, device=self.device)
        return Rollout(kind, batch, ids.bool(), zeros, zeros, zeros, lengths,
                       kl=zeros if self.cfg.kl_coef else None, positions=positions,
                       batch_rows=batch_rows)

    # -- forward pieces ------------------------------------------------------------------
    def _micro_batches(self, n: int) -> list[list[int]]:
        size = self.micro_batch_size or max(n, 1)
        return [list(range(i, min(i + size, n))) for i in range(0, n, size)]

    def _shortfall(self, parts: int) -> int:
        """Sharded: the idle micro-batches this rank, about to run `parts`, must add to run as
        many as every other rank (`fsdp.shortfall`, a collective before the forwards);
        0 unsharded."""
        return sharding.shortfall(parts) if self.sharded else 0

    def _idle(self, times: int, adapter: str | None, backward: bool = False) -> None:
        """`times` forwards of one one-token row with `adapter` (each with the backward of
        zero times its states): they change nothing, but run the sharded layers' gathers
        (and reduce-scatters) as a real micro-batch does."""
        ids = torch.full((1, 1), self.tokenizer.pad_token_id, device=self.device)
        for _ in range(times):
            with torch.set_grad_enabled(backward), self._autocast():
                hidden = self.model.hidden_states(ids, torch.ones_like(ids), adapter)
            if backward:
                (hidden.float().sum() * 0.0).backward()

    def _autocast(self):  # bf16 attention: PPO's larger steps outgrow the rounding
        return autocast(self.model, self.precision, exact_lora=False)

    def _states(self, part: SequenceBatch, adapter: str | None) -> torch.Tensor:
        """[N, H]: the states s_t that predict each output token (hidden at p - 1)."""
        with self._autocast():
            hidden = self.model.hidden_states(part.input_ids, part.attention_mask, adapter)
        return hidden[:, :-1][part.action_mask()]

    def _logprobs(self, part: SequenceBatch, adapter: str | None) -> torch.Tensor:
        """[N] log pi(a_t | s_t), vocabulary logits only at output positions (log-softmax in
        float32 at any precision)."""
        targets = part.input_ids[:, 1:][part.action_mask()]
        states = self._states(part, adapter)
        with self._autocast():
            return self.model.token_logprobs(states, targets, self.cfg.temperature)

    @torch.no_grad()
    def _policy_logprobs(self, rollout: Rollout, adapter: str | None) -> torch.Tensor:
        out = torch.zeros_like(rollout.rewards)
        parts = self._micro_batches(rollout.mask.shape[0])
        missing = self._shortfall(len(parts))
        for idx in parts:
            out[idx] = to_output_space(self._logprobs(_rows(rollout.batch, idx), adapter).float(),
                                       rollout.mask[idx])
        self._idle(missing, adapter)
        return out

    @torch.no_grad()
    def _values(self, rollout: Rollout) -> torch.Tensor:
        out = torch.zeros_like(rollout.rewards)
        parts = self._micro_batches(rollout.mask.shape[0])
        missing = self._shortfall(len(parts))
        for idx in parts:
            part = _rows(rollout.batch, idx)
            out[idx] = to_output_space(self.model.scalar(self._states(part, VALUE), VALUE).float(),
                                       rollout.mask[idx])
        self._idle(missing, VALUE)
        return out

    def _advantages(self, rollout: Rollout, values: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        advantages, returns = gae(rollout.rewards, values, rollout.mask, self.cfg.gamma,
                                  self.cfg.lam)
        if self.cfg.whiten_advantages:
            advantages = whiten(advantages, rollout.mask)  # over the whole outer batch
        return advantages, returns

    @staticmethod
    def _tokens(rollout: Rollout, rows: Sequence[int]) -> int:
        """Output tokens of `rows` and of every other rank's rows: E_t's denominator."""
        return int(distributed.all_reduce_sum(float(rollout.mask[list(rows)].sum())))

    def _sync_gradients(self) -> None:
        """Sum the gradients over ranks: every rank then holds the whole batch's (sharded
        ones: its shard of it, which FSDP's reduce-scatter summed already)."""
        if self.sharded:
            sharding.reduce_replicated_gradients(self.policy_params + self.value_params)
        else:
            distributed.all_reduce_gradients(self.policy_params + self.value_params)

    def _value_backward(self, rollout: Rollout, rows: Sequence[int], returns: torch.Tensor,
                        total_tokens: int) -> tuple[float, torch.Tensor]:
        """Value loss over `rows` (forward + backward per micro-batch); (its share, values)."""
        loss_sum, values = 0.0, torch.zeros_like(rollout.rewards)
        parts = self._micro_batches(len(rows))
        missing = self._shortfall(len(parts))
        for idx in parts:
            idx = [rows[i] for i in idx]
            mask = rollout.mask[idx]  # [b, T]
            v = self.model.scalar(self._states(_rows(rollout.batch, idx), VALUE), VALUE)  # [N]
            share = int(mask.sum()) / total_tokens  # masked mean over the whole batch
            loss = value_loss(v.float(), returns[idx][mask], torch.ones_like(v, dtype=torch.bool))
            (loss * share).backward()
            loss_sum += float(loss.detach()) * share
            values[idx] = to_output_space(v.detach().float(), mask)
        self._idle(missing, VALUE, backward=True)
        return loss_sum, values

    def _policy_backward(self, rollout: Rollout, rows: Sequence[int], advantages: torch.Tensor,
                         old_logprobs: torch.Tensor | None, total_tokens: int) -> dict:
        """Policy loss over `rows`; old_logprobs None: the fast path (pi_old = pi_theta)."""
        sums = {"policy_loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0}
        parts = self._micro_batches(len(rows))
        missing = self._shortfall(len(parts))
        for idx in parts:
            idx = [rows[i] for i in idx]
            mask = rollout.mask[idx]
            logp = self._logprobs(_rows(rollout.batch, idx), POLICY).float()  # [N]
            old = logp.detach() if old_logprobs is None else old_logprobs[idx][mask]
            ones = torch.ones_like(logp, dtype=torch.bool)
            loss, clip_fraction, approx_kl = policy_loss(logp, old, advantages[idx][mask], ones,
                                                         self.cfg.clip_eps)
            share = int(mask.sum()) / total_tokens
            (loss * share).backward()
            for key, value in zip(sums, (loss, clip_fraction, approx_kl)):
                sums[key] += float(value.detach()) * share
        self._idle(missing, POLICY, backward=True)
        return sums

    # -- updates ---------------------------------------------------------------------------
    def gradients(self, rollout: Rollout) -> dict:
        """Zero the gradients, then backpropagate one full-batch PPO loss (no optimiser step).

        Fast path: values and log-probs from the differentiated forwards. Textbook path: no-grad
        forwards for V and pi_old first, then the differentiated ones.
        """
        self.optimizer.zero_grad(set_to_none=True)
        rows = list(range(rollout.mask.shape[0]))
        total = self._tokens(rollout, rows)
        if self.fast:
            # Eq. 4 targets need no values, so the value pass comes first and its detached
            # outputs are the V(s_t) of Eq. 2 (the parameters have not moved yet).
            returns = discounted_returns(rollout.rewards, rollout.mask, self.cfg.gamma)
            v_loss, values = self._value_backward(rollout, rows, returns, total)
            advantages, _ = self._advantages(rollout, values)
            stats = self._policy_backward(rollout, rows, advantages, None, total)
        else:
            values = self._values(rollout)
            old_logprobs = self._policy_logprobs(rollout, POLICY)
            advantages, returns = self._advantages(rollout, values)
            v_loss, _ = self._value_backward(rollout, rows, returns, total)
            stats = self._policy_backward(rollout, rows, advantages, old_logprobs, total)
        stats = distributed.sum_stats(dict(stats, value_loss=v_loss))  # each rank's share
        self._sync_gradients()
        stats.update(self._value_stats(rollout, values, advantages, returns))
        return stats

    def _value_stats(self, rollout: Rollout, values, advantages, returns) -> dict:
        """Means over the whole outer batch: V(s_t) and A_t per token, the return per row."""
        first = rollout.mask[:, 0]  # [B]: rows with an output (all)
        starts = distributed.sum_stats({"rows": float(first.sum()),
                                        "returns": float(returns[:, 0][first].sum())})
        return {"value_mean": float(batch_masked_mean(values, rollout.mask)),
                "advantage_mean": float(batch_masked_mean(advantages, rollout.mask)),
                "return_mean": starts["returns"] / starts["rows"] if starts["rows"] else 0.0}

    def clip_gradients(self) -> dict:
        """Clip each group's gradient norm; the norms before clipping."""
        max_norm = self.cfg.optim.max_grad_norm
        norms = {}
        for name, params in (("policy", self.policy_params), ("value", self.value_params)):
            grads = [p for p in params if p.grad is not None]
            if self.sharded:  # the global norm over every rank's shards (a collective)
                norms[f"{name}_grad_norm"] = sharding.clip_gradients(grads, max_norm)
                continue
            norm = (torch.nn.utils.clip_grad_norm_(grads, max_norm) if max_norm is not None
                    else torch.linalg.vector_norm(torch.stack(
                        [torch.linalg.vector_norm(p.grad) for p in grads])))
            norms[f"{name}_grad_norm"] = float(norm)
        return norms

    def apply(self) -> dict:
        """Clip each group's gradient norm, take the optimiser and scheduler step."""
        norms = self.clip_gradients()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        return {"lr": lr, **norms}

    def _apply_if_finite(self, rollout: Rollout, stats: dict) -> dict:
        """`apply`, except that a non-finite reward, advantage, loss or gradient norm skips the
        optimiser step (gradients zeroed; the scheduler still steps, following the data).

        Adds "lr", the norms and "nonfinite" ({name: value}, {} when the step was taken).
        """
        stats.update(self.clip_gradients())
        # Any bad r_t of any rank shows in the sum over ranks, which every rank reads.
        reward = distributed.all_reduce_sum(float(rollout.rewards[rollout.mask].sum()))
        watched = {"reward": reward}
        watched.update({k: stats[k] for k in WATCHED if k in stats})
        stats["nonfinite"] = nonfinite(watched)
        stats["lr"] = self.scheduler.get_last_lr()[0]
        if stats["nonfinite"]:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        step_schedule(self.scheduler)
        return stats

    def step(self, rollout: Rollout) -> dict:
        """One outer-batch update: one optimiser step (paper), or epochs × minibatches.

        Steps whose reward, advantages, losses or gradient norms are not finite are skipped;
        stats["nonfinite"] names them ({} when every step was taken).
        """
        if self.fast:
            return self._apply_if_finite(rollout, self.gradients(rollout))
        values = self._values(rollout)
        old_logprobs = self._policy_logprobs(rollout, POLICY)
        advantages, returns = self._advantages(rollout, values)
        n = rollout.n_rows  # minibatches are drawn from the whole outer batch's rows
        local = {place: i for i, place in enumerate(rollout.places)}  # batch row -> our row
        advantage_mean = float(batch_masked_mean(advantages, rollout.mask))
        runs: list[dict] = []
        bad: dict[str, float] = {}
        for epoch in range(self.cfg.ppo_epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(
                self.cfg.seed * 7919 + epoch)).tolist()
            size = math.ceil(n / self.cfg.minibatches)
            for start in range(0, n, size):
                rows = [local[r] for r in order[start: start + size] if r in local]
                total = self._tokens(rollout, rows)
                self.optimizer.zero_grad(set_to_none=True)
                v_loss, _ = self._value_backward(rollout, rows, returns, total)
                stats = self._policy_backward(rollout, rows, advantages, old_logprobs, total)
                stats = distributed.sum_stats(dict(stats, value_loss=v_loss))
                self._sync_gradients()
                stats["advantage_mean"] = advantage_mean
                bad.update(self._apply_if_finite(rollout, stats).pop("nonfinite"))
                runs.append(stats)
        merged_stats = {k: statistics.fmean(r[k] for r in runs) for k in runs[0]}
        merged_stats["lr"] = runs[0]["lr"]
        merged_stats.update(self._value_stats(rollout, values, advantages, returns))
        if rollout.kl is not None:  # per row, mean over the outer batch's rows
            kl_rows = float((rollout.kl * rollout.mask).sum())
            merged_stats["kl_base"] = distributed.all_reduce_sum(kl_rows) / n
        merged_stats["nonfinite"] = bad
        return merged_stats


def _check_config(cfg: PPOConfig) -> None:
    checks = (("batch_size", cfg.batch_size >= 1), ("max_new_tokens", cfg.max_new_tokens >= 1),
              ("temperature", cfg.temperature > 0), ("ppo_epochs", cfg.ppo_epochs >= 1),
              ("minibatches", 1 <= cfg.minibatches <= cfg.batch_size),
              ("gamma", 0 < cfg.gamma <= 1), ("lam", 0 <= cfg.lam <= 1),
              ("clip_eps", cfg.clip_eps > 0), ("top_k", cfg.top_k >= 0),
              ("top_p", 0 < cfg.top_p <= 1), ("kl_coef", cfg.kl_coef >= 0),
              ("epochs", cfg.epochs >= 1),
              ("max_updates", cfg.max_updates is None or cfg.max_updates >= 1),
              ("optim.learning_rate", cfg.optim.learning_rate > 0))
    for name, ok in checks:
        if not ok:
            raise ValueError(f"PPOConfig.{name} is out of range: {_get(cfg, name)!r}")
    batch_kinds(1, cfg.reference_fraction)


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# ============================================================================ the stage

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
    precision = precision or cfg.precision
    check_precision(precision, "PPO precision")
    _check_config(cfg)  # before any process starts
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
    _check_config(cfg)
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
