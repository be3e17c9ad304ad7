"""Sampling PPO's outputs from the policy (paper §3.3: ≤100 new tokens, temperature 1):
a KV-cached decoding loop on merged copies of the adapter weights.

Sampling is Gumbel-max (argmax of logits / temperature, filtered by top-k / top-p, plus Gumbel
noise): an exact draw from the filtered softmax. Each row of an outer batch draws its noise
from its own stream, keyed by (seed, update, row) (`row_generators`), so its tokens depend
neither on the other rows of its forward nor on any generator state: a batch sampled whole or
split over processes draws the same tokens, and a resumed run draws what an uninterrupted one
would have.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator, Sequence

import torch

from . import distributed
from . import fsdp as sharding
from .modeling import AdapterModel, bf16_attention, is_quantized, left_pad

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
