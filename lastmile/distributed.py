"""Data-parallel training: the reward, MLE and PPO stages as N processes, one per accelerator.

Why. A training task that is given N GPUs should use them, and must not change the method:
the paper's global batch (14 reward rows, 7 MLE or PPO rows per optimiser step, §3.1) and the
result of one process, up to float rounding. So the data are split, never the batch size:

  * every rank holds the whole model, the whole dataset and the same batch order (seeded), and
    takes a fixed, contiguous share of each batch's rows (`shard_indices`); which rows a rank
    takes depends only on the batch, the rank and the world size;
  * each rank backpropagates its rows' loss numerators divided by the *whole batch's*
    denominator (`train_utils.train_loop`; PPO sums token counts over ranks), so the sum of
    the ranks' gradients is the one-process gradient of the batch;
  * `all_reduce_gradients` sums them; every rank then clips and steps its identical copy of
    the optimiser, so the weights stay identical on every rank without being broadcast;
  * every number a decision or a log reads (loss, reward, gradient norm, normalisers of
    masked means) is summed over ranks first (`all_reduce_sum`), so all ranks take the same
    branch (skip a non-finite update, stop the stage) and the main rank logs what one process
    would;
  * only the main rank (rank 0) writes files: logs, checkpoints, adapters, evaluations.

One node. `run` starts the N processes on this machine (torch.multiprocessing, spawn), on the
NCCL backend with one GPU each (cuda:rank) when CUDA is available, otherwise on gloo on the
CPU (how the tests exercise it: 2 processes, gloo). A function that finds a process group
already initialised (e.g. started by `torchrun`) runs in it instead of launching.
"""

from __future__ import annotations

import builtins
import datetime
import json
import logging
import os
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

T = TypeVar("T")
#: Elements per all-reduce of gradients: few collectives, bounded extra memory.
BUCKET_ELEMENTS = 1 << 25
#: How long a rank waits in a collective for the others (the main rank may be uploading).
COLLECTIVE_TIMEOUT_S = 3600


class DistributedError(RuntimeError):
    """A rank failed with an exception that cannot be re-raised as its own type, or died."""


class RemoteTraceback(Exception):
    """The failing rank's traceback, chained as the `__cause__` of the re-raised error."""

    def __init__(self, text: str):
        super().__init__(text)

    def __str__(self) -> str:
        return "\n" + self.args[0]


# ----------------------------------------------------------------------------- the world

@dataclass(frozen=True)
class World:
    """This process's place among the training processes (rank 0 of 1 when not distributed)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes every file (logs, checkpoints, adapters) and returns the summary."""
        return self.rank == 0


def active() -> bool:
    """Whether a torch.distributed process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def world() -> World:
    return World(dist.get_rank(), dist.get_world_size()) if active() else World()


def shard_indices(n_or_items: int | Sequence[T], rank: int, size: int) -> list:
    """Rank `rank`'s contiguous share of `n` indices (or of a sequence's items), in order.

    Shares differ by at most one (the later ranks take the larger ones) and tile the whole;
    with size 1 the share is everything. Contiguous, so rows the caller keeps together (a
    true reward row and its negatives, which share a prompt forward) mostly stay together.
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"shard_indices: rank {rank} of a world of size {size}")
    items = range(n_or_items) if isinstance(n_or_items, int) else n_or_items
    n = len(items)
    start, stop = rank * n // size, (rank + 1) * n // size
    return list(items[start:stop])


def resolve_processes(requested: int) -> int:
    """How many training processes to run: `requested`, or for 0 one per visible CUDA device
    (at least 1: a CPU-only machine trains in one process)."""
    requested = int(requested)
    if requested < 0:
        raise ValueError(f"processes must be >= 0 (0 = one per visible GPU), got {requested}")
    return requested or max(1, torch.cuda.device_count())


# ----------------------------------------------------------------------------- collectives

def _backend() -> str:
    return dist.get_backend() if active() else "gloo"


def _collective_device() -> torch.device:
    """Where small tensors for a collective live: the rank's GPU under NCCL, else the CPU."""
    if _backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if active():
        dist.barrier()


def all_reduce_sum(value):
    """The sum over ranks of a float or a tensor (a new tensor, on the input's device); in one
    process the value itself, untouched, so the single-process path is bit-identical."""
    if not active():
        return value
    if isinstance(value, torch.Tensor):
        total = value.detach().to(_collective_device(), copy=True)
        dist.all_reduce(total)
        return total.to(value.device)
    total = torch.tensor(float(value), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(total)
    return float(total)


def sum_stats(stats: dict[str, float]) -> dict[str, float]:
    """Each value summed over ranks, in one collective."""
    if not active() or not stats:
        return dict(stats)
    summed = all_reduce_sum(torch.tensor(list(stats.values()), dtype=torch.float64))
    return dict(zip(stats, summed.tolist()))


def gather_rows(values: torch.Tensor, positions: Sequence[int], n: int) -> torch.Tensor:
    """[n, k] float64 on the CPU: every rank's rows of a batch, each at its batch position.

    `values` [b, k] are this rank's rows at `positions` (b of the batch's n); the others are
    zero here and filled in by the sum over ranks.
    """
    full = torch.zeros(n, *values.shape[1:], dtype=torch.float64)
    full[list(positions)] = values.detach().double().cpu()
    return all_reduce_sum(full)


def all_reduce_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum `.grad` over ranks, in place: afterwards every rank holds the whole batch's gradient.

    A parameter without a gradient on some rank (its rows never reached it, or the rank had
    no rows) counts as zero there; one that has none on any rank keeps None, as in one
    process (AdamW skips such parameters, and a zero gradient would still move it).
    """
    if not active():
        return
    params = list(params)
    present = torch.tensor([float(p.grad is not None) for p in params],
                           device=_collective_device())
    dist.all_reduce(present)
    grads = []
    for p, anywhere in zip(params, present.tolist()):
        if anywhere:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    for bucket in _buckets(grads):
        flat = torch.cat([g.reshape(-1) for g in bucket]).to(_collective_device())
        dist.all_reduce(flat)  # [elements of the bucket]
        offset = 0
        for g in bucket:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()


def _buckets(grads: list[torch.Tensor]) -> Iterable[list[torch.Tensor]]:
    """Consecutive gradients of one dtype, up to BUCKET_ELEMENTS elements per bucket."""
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads:
        if bucket and (g.dtype != bucket[0].dtype or size + g.numel() > BUCKET_ELEMENTS):
            yield bucket
            bucket, size = [], 0
        bucket.append(g)
        size += g.numel()
    if bucket:
        yield bucket


# ----------------------------------------------------------------------------- launching

def launch(fn: Callable[..., T], processes: int, *args, **kwargs) -> T:
    """`fn(*args, **kwargs)` as `processes` data-parallel processes (`run`); in this process
    when that resolves to 1 (no torch.distributed at all) or a process group already exists
    (this process is one of the ranks: `fn` runs in that world)."""
    n = resolve_processes(processes)
    if n == 1 or active():
        return fn(*args, **kwargs)
    return run(fn, args, n, kwargs=kwargs)


def run(fn: Callable[..., T], args: Sequence = (), processes: int = 2, *,
        kwargs: dict | None = None, backend: str | None = None) -> T:
    """Run `fn(*args, **kwargs)` in `processes` new processes forming one torch.distributed
    world on this machine; return rank 0's result (it must be JSON: the stages' summaries).

    `fn` must be importable by name (a module-level function). Backend: NCCL with one GPU per
    rank (cuda:rank) when CUDA is available, else gloo on the CPU; `backend="gloo"` on a CUDA
    machine shares its GPUs round-robin (tests). On the CPU each rank gets an equal share of
    the cores unless OMP_NUM_THREADS says otherwise. When a rank fails, the others are
    stopped and its exception is raised here, as its own type when that is a builtin one
    (FloatingPointError, ValueError, ...) else DistributedError, with the rank in the message
    and its traceback chained.
    """
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and processes > torch.cuda.device_count():
        raise ValueError(f"{processes} training processes need as many GPUs; "
                         f"{torch.cuda.device_count()} visible")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="lastmile-dist-") as tmp:
        spec = {"size": processes, "port": free_port(), "backend": backend, "dir": tmp,
                "log_level": logging.getLogger().getEffectiveLevel()}
        try:
            mp.spawn(_worker, args=(spec, fn, tuple(args), dict(kwargs or {})),
                     nprocs=processes, join=True)
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            _raise_rank_error(Path(tmp), processes, e)
        return json.loads((Path(tmp) / "result.json").read_text())


def free_port() -> int:
    """A TCP port free on this machine now (for the process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, spec: dict, fn: Callable, args: tuple, kwargs: dict) -> None:
    """One rank: join the process group, run `fn`, write rank 0's result (or this rank's
    error) for the parent."""
    size, backend = spec["size"], spec["backend"]
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(spec["port"]))
    # One set of INFO lines, the main rank's (train_utils.progress shows only its bar too).
    logging.basicConfig(level=spec["log_level"] if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // size))
    # The main rank alone writes checkpoints (maybe to object storage) and evaluates while
    # the others wait in their next collective: allow it time.
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        result = fn(*args, **kwargs)
        if rank == 0:
            (Path(spec["dir"]) / "result.json").write_text(json.dumps(result))
    except BaseException as e:
        error = {"rank": rank, "time": time.time(), "type": type(e).__name__,
                 "builtin": type(e).__module__ == "builtins", "message": str(e),
                 "traceback": traceback.format_exc()}
        (Path(spec["dir"]) / f"error-{rank}.json").write_text(json.dumps(error))
        raise
    finally:
        dist.destroy_process_group()


def _raise_rank_error(tmp: Path, processes: int, spawn_error: Exception):
    """Re-raise the first failing rank's error (the others fail after it: lost peers)."""
    errors = [json.loads(p.read_text()) for p in tmp.glob("error-*.json")]
    if not errors:  # killed without a Python exception (a signal, the OOM killer)
        raise DistributedError(f"a training process died: {spawn_error}") from None
    first = min(errors, key=lambda e: e["time"])
    message = f"rank {first['rank']} of {processes}: {first['message']}"
    cls = getattr(builtins, first["type"], None)
    if not (first["builtin"] and isinstance(cls, type) and issubclass(cls, Exception)):
        cls, message = DistributedError, f"{first['type']}: {message}"
    try:
        error = cls(message)
    except TypeError:  # an exception type that does not take one message
        error = DistributedError(f"{first['type']}: {message}")
    raise error from RemoteTraceback(first["traceback"])
