"""Sharded base weights (FSDP2, `torch.distributed.fsdp.fully_shard`) for bases too big for one GPU.

Why. Data parallelism (`lastmile.distributed`) gives every rank the whole frozen base; a base
that does not fit one GPU needs its weights split over the ranks. FSDP2 shards each decoder
layer's parameters over the world (dim 0, as DTensors), gathers a layer just before its
forward (and again in backward) and frees it after, so a rank holds about 1/N of the layers
plus one whole layer at a time. The LoRA weights live inside those layers and are sharded
with them; their gradients are reduce-scattered, so each rank steps its own shard (and holds
1/N of their AdamW state).

What stays as in `lastmile.distributed`:
  * the global batch is split over ranks, each rank divides its rows' loss numerators by the
    whole batch's denominator, and the ranks' gradients are SUMMED (not averaged: FSDP2's
    default divides by the world size, `shard_base` sets the divide factor to 1);
  * parameters outside the layers (scalar heads, and the embeddings, final norm and LM head,
    which Llama ties and which are a few percent of a 7B) stay whole on every rank; their
    gradients are all-reduced as before (`reduce_replicated_gradients`);
  * the adapter written at the end is gathered whole (`save_adapter`), in the same files as
    an unsharded run's; checkpoints hold whole tensors too (`checkpoint.Checkpointer`), so a
    sharded run resumes from them.

Only the decoder layers are sharded, each as its own FSDP unit, not the whole model: the
stages call the decoder and the LM head separately (modeling.AdapterModel), and the tied
embedding/LM-head weight cannot sit in two units.

Lockstep. A sharded layer all-gathers its weights in every forward and backward, on every
rank at once, so every rank must run the same number of decoder forwards and backwards,
whatever its share of the batch (a short batch can leave a rank no rows at all). Where the
number of forwards depends on the rank's rows, the rank with fewer runs idle ones
(`shortfall`: a forward, and a backward of zero times its loss, that adds nothing):
train_utils' micro-batches, PPO's micro-batches and its sampling loop (which decodes until
every rank's rows are done). The reward model runs one forward of prompt + output per row
instead of sharing each prompt's forward (reward.output_states; its token budget counts
that, `reward.row_forward_tokens`). The reward model's
held-out evaluation runs on every rank (each scores all rows; the main rank writes).

Setting: `Profile.fsdp` (default False; `--param fsdp=true`, or `"fsdp": true` in a config
file). It needs a world of two or more ranks (train_processes >= 2, or torchrun): with one
process the stage stops with a ConfigError naming both settings (`check_world`), since
nothing would be sharded and a base that needs sharding would not fit anyway. Tested with
2 gloo CPU processes against one unsharded process, for every stage and for a resumed run
(tests/test_fsdp.py), and the pieces here step by step (tests/test_trainer.py).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from . import distributed


def enabled(profile) -> bool:
    """Whether `profile` (a config.Profile) shards the base: its `fsdp` setting."""
    return bool(profile.fsdp)


def check_world(fsdp: bool, processes: int) -> None:
    """Refuse FSDP where it cannot shard: one training process and no world already joined
    (torchrun's). Called before any process starts."""
    from .config import ConfigError

    if fsdp and not distributed.active() and distributed.resolve_processes(processes) < 2:
        raise ConfigError(
            f"fsdp=true shards the base over the training processes, but there is one "
            f"(train_processes={processes}): set train_processes to 2 or more (0 = one per "
            f"GPU, with 2+ GPUs) or run under torchrun with 2+ processes, or set fsdp=false")


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device, (distributed.world().size,))


def decoder_layers(model) -> Sequence[nn.Module]:
    """The transformer blocks of an AdapterModel's base (Llama-style `decoder.layers`)."""
    layers = getattr(model.decoder, "layers", None)
    if layers is None or not len(layers):
        raise ValueError(f"{type(model.decoder).__name__} has no `layers` to shard")
    return layers


def shard_base(model, reshard_after_forward: bool = True):
    """fully_shard every decoder layer of `model` (an AdapterModel, adapters already added)
    over the current world; gradients of sharded parameters are summed over ranks. Returns
    the model. Needs an initialised process group (lastmile.distributed or torchrun).

    Call it before moving the model to the GPU: fully_shard moves one layer at a time to the
    mesh's device and keeps this rank's shard, so the GPU never holds the whole base. (The
    host still does: every rank loads the whole base before sharding it.)"""
    from torch.distributed.fsdp import fully_shard

    if not distributed.active():
        raise RuntimeError("FSDP needs a torch.distributed world (torchrun or "
                           "lastmile.distributed); none is initialised")
    mesh = _mesh()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
        layer.set_gradient_divide_factor(1.0)  # sum, as lastmile.distributed does
        # ...with a plain SUM reduce-scatter: gloo has no PREMUL_SUM, which a divide factor
        # otherwise asks for ("Cannot use ReduceOp.PREMUL_SUM with Gloo").
        layer.set_force_sum_reduction_for_comms(True)
    return model


def is_sharded(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def any_sharded(params: Iterable[torch.Tensor]) -> bool:
    """Whether any of `params` is sharded (the training loops' switch)."""
    return any(is_sharded(p) for p in params)


def is_sharded_model(model) -> bool:
    """Whether `model`'s (an AdapterModel's) base has sharded parameters."""
    return any_sharded(model.base.parameters())


def reduce_replicated_gradients(params: Iterable[nn.Parameter]) -> None:
    """Sum over ranks the gradients FSDP does not reduce (parameters outside the layers)."""
    distributed.all_reduce_gradients([p for p in params if not is_sharded(p)])


def grad_norm(params: Iterable[nn.Parameter]) -> float:
    """The global L2 norm of the gradients, each element counted once: sharded gradients
    summed over their shards, replicated ones taken once. The squares are summed on the
    gradients' device and copied to the host once (not once per parameter)."""
    sharded, replicated = [], []
    for p in params:
        if p.grad is not None:
            if is_sharded(p.grad):
                sharded.append(p.grad.to_local().double().pow(2).sum())
            else:
                replicated.append(p.grad.detach().double().pow(2).sum())

    def total(squares: list[torch.Tensor]) -> torch.Tensor:
        return (torch.stack(squares).sum().cpu() if squares
                else torch.zeros((), dtype=torch.float64))

    return float((distributed.all_reduce_sum(total(sharded)) + total(replicated)).sqrt())


def clip_gradients(params: Sequence[nn.Parameter], max_norm: float | None) -> float:
    """Scale every gradient by min(1, max_norm / global norm); returns the norm before. A
    collective: every rank calls it (with its shards) and gets the same norm and scale."""
    norm = grad_norm(params)
    if max_norm is not None and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


def most(count: int) -> int:
    """The largest `count` over the ranks (a collective)."""
    import torch.distributed as dist

    value = torch.tensor([count], dtype=torch.int64,
                         device=distributed._collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def shortfall(count: int) -> int:
    """How many idle calls this rank, about to make `count` sharded forwards (or forward +
    backward pairs), must add to match the rank that makes the most (see Lockstep above).
    A collective: every rank calls it at the same place, BEFORE those forwards (a forward's
    all-gathers would otherwise meet another rank's count). The idle calls must leave the
    result unchanged: a no-grad forward, or the backward of zero times a loss."""
    return most(count) - count


def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for sharded ones: call it on all ranks)."""
    return p.full_tensor().detach() if is_sharded(p) else p.detach()


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`whole` (a full tensor every rank holds) as a DTensor laid out as `like` (this rank's
    shard cut locally, no communication); `whole` itself when `like` is not sharded."""
    if not is_sharded(like):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(device=like.device, dtype=like.dtype), like.device_mesh,
                             like.placements, src_data_rank=None)


def full_adapter_state(model, name: str) -> dict[str, torch.Tensor]:
    """{parameter name: whole tensor} of adapter `name`'s LoRA weights and head, gathered on
    every rank (all ranks must call it), on the CPU."""
    marker = f".{name}."
    state = {n: full_tensor(p).cpu() for n, p in model.base.named_parameters()
             if "lora_" in n and marker in n}
    if name in model.heads:
        state.update({f"heads.{name}.{n}": full_tensor(p).cpu()
                      for n, p in model.heads[name].named_parameters()})
    return state


def save_adapter(model, name: str, out_dir, meta=None):
    """Write adapter `name` as `AdapterModel.save_adapter` does, from every rank: a sharded
    model's weights are gathered whole first (a collective: every rank calls this), then the
    main rank writes the same files an unsharded run writes. Returns the directory on the
    main rank, None elsewhere. Unsharded, only the main rank does anything."""
    state = full_adapter_state(model, name) if is_sharded_model(model) else None
    if not distributed.world().is_main:
        return None
    return model.save_adapter(name, out_dir, state=state, meta=meta)


def peak_memory_bytes() -> int:
    """This rank's peak resident memory: the GPU's allocator peak, else the process's RSS."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
