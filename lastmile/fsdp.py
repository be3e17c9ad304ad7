"""Sharded base weights (FSDP2, `torch.distributed.fsdp.fully_shard`) for bases too big for one GPU.

Why. Data parallelism (`lastmile.distributed`) gives every rank the whole frozen base; a base
that does not fit one GPU needs its weights split over the ranks. FSDP2 shards each decoder
layer's parameters over the world (dim 0, as DTensors), gathers a layer just before its
forward (and again in backward) and frees it after, so a rank holds about 1/N of the layers
plus one whole layer at a time. The LoRA weights live inside those layers and are sharded
with them; their gradients are reduce-scattered, so each rank steps its own shard.

What stays as in `lastmile.distributed`:
  * the global batch is split over ranks, each rank divides its rows' loss numerators by the
    whole batch's denominator, and the ranks' gradients are SUMMED (not averaged: FSDP2's
    default divides by the world size, `shard_base` sets the divide factor to 1);
  * parameters outside the layers (scalar heads, and the embeddings, final norm and LM head,
    which Llama ties and which are a few percent of a 7B) stay whole on every rank; their
    gradients are all-reduced as before (`reduce_replicated_gradients`);
  * the adapter written at the end is gathered whole (`full_adapter_state`).

Only the decoder layers are sharded, each as its own FSDP unit, not the whole model: the
stages call the decoder and the LM head separately (modeling.AdapterModel), and the tied
embedding/LM-head weight cannot sit in two units.

Setting: `Profile.fsdp` (proposed, default False; read with getattr until it exists).
Status: `shard_base` and the helpers below are tested with 2 CPU processes on gloo against
one unsharded process (tests/test_trainer.py: loss, every LoRA gradient and the adapter after
AdamW steps agree to float rounding). They are not yet wired into the stages' training loop:
that needs train_utils.train_loop to skip `all_reduce_gradients` for sharded parameters and
use `grad_norm` here for clipping, and Checkpointer/save_adapter to save `full_tensor()`s
(docs/scaling.md lists the three changes).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from . import distributed


def enabled(profile) -> bool:
    """The proposed `Profile.fsdp` switch (False until the configuration has it)."""
    return bool(getattr(profile, "fsdp", False))


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
    the model. Needs an initialised process group (lastmile.distributed or torchrun)."""
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


def reduce_replicated_gradients(params: Iterable[nn.Parameter]) -> None:
    """Sum over ranks the gradients FSDP does not reduce (parameters outside the layers)."""
    distributed.all_reduce_gradients([p for p in params if not is_sharded(p)])


def grad_norm(params: Iterable[nn.Parameter]) -> float:
    """The global L2 norm of the gradients, each element counted once: sharded gradients
    summed over their shards, replicated ones taken once."""
    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is None:
            continue
        if is_sharded(p.grad):
            sharded += p.grad.to_local().double().pow(2).sum().cpu()
        else:
            replicated += p.grad.detach().double().pow(2).sum().cpu()
    return float((distributed.all_reduce_sum(sharded) + replicated).sqrt())


def clip_gradients(params: Sequence[nn.Parameter], max_norm: float | None) -> float:
    """Scale every gradient by min(1, max_norm / global norm); returns the norm before."""
    norm = grad_norm(params)
    if max_norm is not None and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for sharded ones: call it on all ranks)."""
    return p.full_tensor().detach() if is_sharded(p) else p.detach()


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


def peak_memory_bytes() -> int:
    """This rank's peak resident memory: the GPU's allocator peak, else the process's RSS."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
