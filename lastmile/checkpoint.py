"""Training checkpoints that survive preemption (reward model, MLE, PPO).

Layout, under a stage's checkpoint directory (default `<out_dir>/checkpoints`, or the config's
`checkpoint_dir`):

    step-000050/
        tensors.safetensors   trainable parameters (adapter LoRA weights and scalar heads, in
                              the order the stage lists them), AdamW state tensors, RNG states
                              (torch CPU [+ CUDA], every named torch.Generator the stage
                              passes)
        meta.json             step (the data position: steps 1..step are done), the run key,
                              AdamW param groups, scheduler state, Python and NumPy RNG states,
                              the stage's extras (its step-log rows, the bad-update streak)
        COMPLETE              written last: {"step", "files": {name: {bytes, sha256}}}

A checkpoint is written into `.tmp-step-...` (every file fsynced, COMPLETE last), renamed into
place atomically, and the directory fsynced; only directories with a COMPLETE whose sizes and
hashes match their files are ever loaded, so a run killed mid-write resumes from the previous
one. The last `KEEP` (2) are kept. No pickle: tensors in safetensors, everything else JSON.
Stages delete the directory once their final adapter is written (`clear`).

Object storage. A `checkpoint_dir` that is an ``s3://`` prefix keeps the layout above under
that prefix, so a task restarted on another node (a KFP retry: the pod and its disk are new)
resumes too. Checkpoints are still written locally first (`<out_dir>/checkpoints`, or a
directory under the cache when no out_dir is known) and each complete one is then uploaded,
its files first and COMPLETE last; the remote ones are pruned to the last `KEEP` (COMPLETE
deleted first, so a reader never finds a marker without its files). On start the newest
remote checkpoint that has its COMPLETE is downloaded (when it is newer than any local one),
verified against it like a local one, and resumed; a remote step without COMPLETE (an
interrupted upload) is never read. `clear` deletes the remote checkpoints too. A failed upload
(store unreachable after the storage layer's retries) is logged and training goes on: that
checkpoint is local only.

One writer per directory: two runs sharing an out_dir (or a prefix) are not supported; the
pipeline's stages give each task its own prefix (`task_scope`). A data-parallel run
(`lastmile.distributed`, one node) is one writer too: its main rank saves (every rank holds
the same state) and downloads a remote checkpoint; every rank then restores from the local
copy.

Sharded base (`lastmile.fsdp`). When some trainable parameters are FSDP shards (DTensors),
every rank gathers them and their AdamW moments whole (a collective) and the main rank
writes those whole tensors: the files are the same as an unsharded run's, whatever the
number of ranks. Restoring cuts each rank's shard out of the whole tensor again
(`fsdp.shard_like`), for the parameters and for their AdamW state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import torch

from . import distributed

log = logging.getLogger(__name__)

KEEP = 2
COMPLETE = "COMPLETE"
TENSORS = "tensors.safetensors"
META = "meta.json"
PREFIX = "step-"


# ----------------------------------------------------------------------------- files

@dataclass(frozen=True)
class RemoteDir:
    """Checkpoints written to `local` and mirrored to the s3:// prefix `uri` (see the module
    docstring). As a path (os.fspath) it is the local directory."""

    local: Path
    uri: str  # s3://bucket/prefix/, with the trailing slash

    def __fspath__(self) -> str:
        return str(self.local)


#: What stages pass around as a checkpoint directory: a local path, a RemoteDir, an s3:// URI.
Root = Union[str, os.PathLike, RemoteDir, None]


def is_remote(value) -> bool:
    return isinstance(value, RemoteDir) or (isinstance(value, str) and value.startswith("s3://"))


def _as_prefix(uri: str) -> str:
    return uri if uri.endswith("/") else uri + "/"


#: The default checkpoint prefix of a cluster's training steps (pipeline.py compile
#: --checkpoint-prefix sets it).
PREFIX_VAR = "LASTMILE_CHECKPOINT_PREFIX"


def resolve_dir(out_dir: str | os.PathLike, explicit: str | os.PathLike | None
                ) -> Path | RemoteDir:
    """The stage's checkpoint directory: `explicit` when given, else out_dir/checkpoints. An
    s3:// `explicit` gives a RemoteDir staged locally in out_dir/checkpoints."""
    if explicit and is_remote(str(explicit)):
        return RemoteDir(Path(out_dir) / "checkpoints", _as_prefix(str(explicit)))
    return Path(explicit) if explicit else Path(out_dir) / "checkpoints"


def staging_dir(uri: str) -> Path:
    """Local staging for an s3:// checkpoint directory given without an out_dir (e.g. a
    `train_loop` called directly): under $LASTMILE_CACHE/checkpoints, one per prefix."""
    base = os.environ.get("LASTMILE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lastmile")
    return Path(base) / "checkpoints" / hashlib.sha256(_as_prefix(uri).encode()).hexdigest()[:16]


def _split(root: Root) -> tuple[Path | None, str | None]:
    """(local directory, remote prefix or None) of a checkpoint root."""
    if root is None:
        return None, None
    if isinstance(root, RemoteDir):
        return Path(root.local), _as_prefix(root.uri)
    if is_remote(root):
        return staging_dir(str(root)), _as_prefix(str(root))
    return Path(root), None


def task_scope(checkpoint_dir: str | None, stage: str, task_uri: str) -> str | None:
    """`checkpoint_dir` (or, when None, the prefix in $LASTMILE_CHECKPOINT_PREFIX: a compiled
    cluster pipeline sets it on training steps), narrowed to one task when it is an s3://
    prefix: `<prefix>/<stage>-<hash of the task's output URI>/`. A KFP retry runs the same
    task with the same output URI, so it finds its checkpoints; another run, or another stage
    sharing the prefix, never does. Local directories (and None) are returned unchanged."""
    checkpoint_dir = checkpoint_dir or os.environ.get(PREFIX_VAR) or None
    if not checkpoint_dir or not is_remote(checkpoint_dir):
        return checkpoint_dir
    digest = hashlib.sha256(task_uri.encode()).hexdigest()[:16]
    return f"{_as_prefix(checkpoint_dir)}{stage}-{digest}/"


def _write(path: Path, data: bytes) -> dict:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry durable (some network filesystems cannot: skipped there)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        log.debug("fsync of directory %s not supported: %s", path, e)
    finally:
        os.close(fd)


def save(root: str | os.PathLike, step: int, tensors: dict[str, torch.Tensor], meta: dict,
         keep: int = KEEP) -> Path:
    """Write one checkpoint atomically (temp dir, fsync, COMPLETE last, rename); prune old."""
    from safetensors.torch import save as to_bytes

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = {TENSORS: _write(tmp / TENSORS, to_bytes({k: _plain(v) for k, v in tensors.items()})),
             META: _write(tmp / META, json.dumps(dict(meta, step=step)).encode())}
    _write(tmp / COMPLETE, json.dumps({"step": step, "files": files}).encode())
    _fsync_dir(tmp)
    if final.exists():  # only an unreadable one can be here (we resumed before it)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    _prune(root, keep)
    return final


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def _prune(root: Path, keep: int) -> None:
    for path in _complete_dirs(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(".tmp-*"):  # left by a killed writer (one writer per directory)
        shutil.rmtree(path, ignore_errors=True)


def _complete_dirs(root: Path) -> list[Path]:
    """step-* directories with a COMPLETE marker, oldest first."""
    dirs = [p for p in root.glob(f"{PREFIX}*") if (p / COMPLETE).is_file()]
    return sorted(dirs, key=lambda p: int(p.name[len(PREFIX):]))


def _read_verified(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of one checkpoint; ValueError when a file does not match COMPLETE."""
    from safetensors.torch import load as from_bytes

    marker = json.loads((path / COMPLETE).read_text())
    blobs = {}
    for name, want in marker["files"].items():
        data = (path / name).read_bytes()
        if len(data) != want["bytes"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
            raise ValueError(f"{path / name}: size or sha256 differs from {COMPLETE}")
        blobs[name] = data
    return from_bytes(blobs[TENSORS]), json.loads(blobs[META])


def load_latest(root: Root) -> tuple[Path, dict[str, torch.Tensor], dict] | None:
    """The newest complete, verified checkpoint under `root` (None when there is none).

    Local only: for a remote root, `pull` brings the newest remote one here first."""
    root, _ = _split(root)
    if root is None or not root.is_dir():
        return None
    for path in reversed(_complete_dirs(root)):
        try:
            tensors, meta = _read_verified(path)
        except (OSError, ValueError, KeyError) as e:
            log.warning("checkpoint %s is unreadable (%s); trying an older one", path, e)
            continue
        return path, tensors, meta
    return None


def clear(root: Root) -> None:
    """Delete the checkpoints (after the final adapter is written); the directory too if empty.
    A remote root's checkpoints are deleted from the store as well."""
    root, remote = _split(root)
    if remote is not None:
        try:
            listing = _remote_steps(remote)
            _delete_remote(remote, sorted(listing), listing)
        except Exception as e:  # noqa: BLE001 - the stage's work is done; leftovers are harmless
            if not _transient(e):
                raise
            log.warning("could not delete the checkpoints under %s (%s); they stay there",
                        remote, e)
    if root is None or not root.is_dir():
        return
    for path in [*root.glob(f"{PREFIX}*"), *root.glob(".tmp-*")]:
        shutil.rmtree(path, ignore_errors=True)
    try:
        root.rmdir()
    except OSError:  # something else lives there: leave it
        pass


# ----------------------------------------------------------------------------- object storage

def _transient(exc: BaseException) -> bool:
    """A store that cannot be reached (after lastmile.storage's own retries)."""
    from .storage import StorageError

    return isinstance(exc, StorageError) and exc.kind in ("unreachable", "server")


def _step_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def _remote_steps(uri: str) -> dict[int, set[str]]:
    """{step: its object names} for every step-NNNNNN/ under the prefix `uri`."""
    from . import storage

    found: dict[int, set[str]] = {}
    for rel in storage.list_objects(uri):
        name, _, file = rel.partition("/")
        number = name[len(PREFIX):]
        if name.startswith(PREFIX) and number.isdigit() and file and "/" not in file:
            found.setdefault(int(number), set()).add(file)
    return found


def _delete_remote(uri: str, steps: Sequence[int],
                   listing: dict[int, set[str]] | None = None) -> None:
    """Delete remote checkpoints, each one's COMPLETE first: a reader never sees a marker whose
    files are gone."""
    from . import storage

    listing = _remote_steps(uri) if listing is None else listing
    for step in steps:
        files = listing.get(step, set())
        ordered = sorted(files, key=lambda f: (f != COMPLETE, f))
        storage.delete_objects(uri, [f"{_step_name(step)}/{f}" for f in ordered])


def upload(path: str | os.PathLike, uri: str, keep: int = KEEP) -> str:
    """Mirror the complete local checkpoint `path` to `<uri>/<its name>/` (files first,
    COMPLETE last), then prune the remote checkpoints to the newest `keep` complete ones.
    Returns the checkpoint's URI."""
    from . import storage

    path, uri = Path(path), _as_prefix(uri)
    marker = json.loads((path / COMPLETE).read_text())
    target = f"{uri}{path.name}/"
    for name in marker["files"]:
        storage.upload_file(path / name, target + name)
    storage.upload_file(path / COMPLETE, target + COMPLETE)
    steps = _remote_steps(uri)
    complete = sorted(s for s, files in steps.items() if COMPLETE in files)
    kept = set(complete[-keep:]) if keep > 0 else set()
    # Older than the newest complete one and not kept: superseded, or torn uploads (a step
    # past the newest is a torn upload a resumed run will write again: left alone).
    stale = [s for s in steps if s not in kept and complete and s < complete[-1]]
    _delete_remote(uri, sorted(stale), steps)
    return target


def pull(uri: str, local: str | os.PathLike) -> Path | None:
    """Download the newest remote checkpoint that has its COMPLETE into `local`, unless a
    local one is as new; returns its local path (None: nothing downloaded).

    Downloaded into `.tmp-step-...`, verified against COMPLETE (sizes, sha256) and renamed
    into place; one that does not verify is discarded and the next older one is tried.
    """
    from . import storage

    uri, local = _as_prefix(uri), Path(local)
    steps = _remote_steps(uri)
    have = _complete_dirs(local) if local.is_dir() else []
    newest_local = int(have[-1].name[len(PREFIX):]) if have else -1
    for step in sorted((s for s, files in steps.items() if COMPLETE in files), reverse=True):
        if step <= newest_local:
            return None
        name = _step_name(step)
        tmp = local / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            storage.fetch_file(f"{uri}{name}/{COMPLETE}", tmp / COMPLETE)
            for file in json.loads((tmp / COMPLETE).read_text())["files"]:
                if "/" in file or file in ("", ".", "..", COMPLETE):
                    raise ValueError(f"{COMPLETE} lists {file!r}")
                storage.fetch_file(f"{uri}{name}/{file}", tmp / file)
            _read_verified(tmp)
        except (OSError, ValueError, KeyError, TypeError, storage.StorageError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, storage.StorageError) and e.kind not in ("no-such-key", "changed",
                                                                      "checksum"):
                raise
            log.warning("remote checkpoint %s%s is unusable (%s); trying an older one", uri,
                        name, e)
            continue
        final = local / name
        if final.exists():  # only an unreadable one can be here (it was not counted above)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(local)
        log.info("downloaded checkpoint %s%s into %s", uri, name, final)
        return final
    return None


# ----------------------------------------------------------------------------- state

def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW's state dict split into tensors ("optim.<param>.<key>") and JSON. Sharded
    state (DTensors, `lastmile.fsdp`) is gathered whole: a collective, call it on every rank."""
    from .fsdp import full_tensor

    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    # In a fixed order, the same on every rank: the gathers are collectives (the state's own
    # order follows a resumed checkpoint's, which safetensors loads in no fixed order).
    for idx, state in sorted(sd["state"].items()):
        for key, value in sorted(state.items()):
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = full_tensor(value)
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict) -> None:
    """The state `optimizer_state` saved; a whole moment of a sharded parameter becomes this
    rank's shard of it (laid out as the parameter)."""
    from .fsdp import shard_like

    params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's ids
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            param = params[int(idx)]
            if value.shape == param.shape and value.dim() > 0:  # a moment, not the step count
                value = shard_like(value, param)
            state.setdefault(int(idx), {})[key] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g
              for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict]:
    """torch (CPU, every CUDA device), named generators, Python and NumPy RNG states."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    for name, gen in generators.items():
        tensors[f"rng.gen.{name}"] = gen.get_state()
    version, internal, gauss = random.getstate()
    meta = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        meta["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict,
                generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    for name, gen in generators.items():
        gen.set_state(tensors[f"rng.gen.{name}"])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in meta:
        import numpy as np

        kind, keys, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ----------------------------------------------------------------------------- a training run

class Checkpointer:
    """Save and restore one training loop's state every `every` steps (0 or no root: off).

    params: the trainable tensors (adapters and heads) in a fixed order; optimizer, scheduler
    and generators (named torch.Generator, if the loop draws from any) are restored in place.
    `run` is a JSON key of what the loop will do (stage, steps, seed, data ...): resuming a
    checkpoint written under another key raises instead of silently mixing two runs.
    """

    def __init__(self, root: Root, every: int,
                 params: Sequence[torch.nn.Parameter], optimizer, scheduler, run: dict,
                 generators: dict[str, torch.Generator] | None = None, keep: int = KEEP):
        if every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0 = off), got {every}")
        # root: where checkpoints are written; remote: the s3:// prefix they are mirrored to.
        self.root, self.remote = _split(root) if every > 0 else (None, None)
        self.every, self.keep = every, keep
        self.params, self.optimizer, self.scheduler = list(params), optimizer, scheduler
        self.run = json.loads(json.dumps(run))  # as it reads back from meta.json
        self.generators = generators or {}

    def resume(self) -> tuple[int, dict]:
        """(step, extras) of the latest complete checkpoint, state restored; (0, {}) if none.

        With a remote prefix the newest complete remote checkpoint is downloaded first (when
        newer than the local ones): a task restarted on a fresh node resumes from it.
        Distributed: the main rank downloads, then every rank reads the same local files."""
        if self.remote is not None and distributed.world().is_main:
            pull(self.remote, self.root)
        distributed.barrier()
        found = load_latest(self.root)
        if found is None:
            return 0, {}
        path, tensors, meta = found
        if meta["run"] != self.run:
            raise ValueError(f"checkpoint {path} belongs to another run ({meta['run']} != "
                             f"{self.run}); delete {self.remote or self.root} or set another "
                             "checkpoint_dir")
        self._restore_params(path, tensors)
        load_optimizer_state(self.optimizer, tensors, meta["optimizer"])
        self.scheduler.load_state_dict(meta["scheduler"])
        restore_rng(tensors, meta["rng"], self.generators)
        log.info("resumed from %s (step %d)", path, meta["step"])
        return int(meta["step"]), meta.get("extras", {})

    def _restore_params(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        names = sorted(k for k in tensors if k.startswith("param."))
        if len(names) != len(self.params):
            raise ValueError(f"checkpoint {path} holds {len(names)} parameters, the model "
                             f"trains {len(self.params)}")
        from .fsdp import shard_like

        with torch.no_grad():
            for name, p in zip(names, self.params):
                if tensors[name].shape != p.shape:
                    raise ValueError(f"checkpoint {path}: {name} has shape "
                                     f"{tuple(tensors[name].shape)}, the model {tuple(p.shape)}")
                p.copy_(shard_like(tensors[name], p))

    def due(self, step: int, last: int) -> bool:
        return self.root is not None and (step % self.every == 0 or step == last)

    def save(self, step: int, extras: dict) -> Path | None:
        """Write the state (main rank only: the other ranks hold the same state). With
        sharded parameters every rank must call it: they gather the shards whole first."""
        from .fsdp import any_sharded, full_tensor

        if self.root is None:
            return None
        sharded = any_sharded(self.params)
        if not sharded and not distributed.world().is_main:
            return None
        tensors = {f"param.{i:05d}": full_tensor(p) for i, p in enumerate(self.params)}
        optim_tensors, optim_meta = optimizer_state(self.optimizer)
        if not distributed.world().is_main:
            return None
        rng_tensors, rng_meta = rng_state(self.generators)
        meta = {"run": self.run, "optimizer": optim_meta, "rng": rng_meta,
                "scheduler": self.scheduler.state_dict(), "extras": extras}
        path = save(self.root, step, {**tensors, **optim_tensors, **rng_tensors}, meta,
                    self.keep)
        if self.remote is not None:
            try:
                upload(path, self.remote, self.keep)
            except Exception as e:  # noqa: BLE001 - only an unreachable store is tolerated
                if not _transient(e):
                    raise
                log.warning("checkpoint %s not uploaded to %s (%s): it is local only; "
                            "training goes on", path.name, self.remote, e)
        return path


# --------------------------------------------------------------------------- failures a retry repeats

#: The marker a failed attempt leaves in its task's s3:// checkpoint prefix.
FAILED = "FAILED"


class RetryWouldRepeat(RuntimeError):
    """An earlier attempt of this task failed in a way another attempt repeats."""


def _permanent_errors() -> tuple[type[BaseException], ...]:
    """Failures a retry repeats: bad data, a configuration error, unsafe weights, and the NaN
    guard's stop (train_utils.NonFiniteGuard: same seed, same data, same NaN)."""
    from .config import ConfigError
    from .data import DataError
    from .modeling import UnsafeWeightsError

    return (FloatingPointError, ConfigError, DataError, UnsafeWeightsError, RetryWouldRepeat)


@contextlib.contextmanager
def failing_once(checkpoint_dir: str | None):
    """Around one training task whose checkpoints go to an s3:// prefix (task_scope).

    KFP's retry policy retries every failure alike (it has no per-error rule), so a stage that
    failed for good on bad data or a NaN would train again for hours per retry. Instead such a
    failure leaves `<prefix>FAILED` with its message, and a retried attempt that finds it
    fails at once with that message. Transient failures (a lost pod, a storage outage) leave
    nothing and the retry resumes from the newest checkpoint.
    """
    if not checkpoint_dir or not is_remote(checkpoint_dir):
        yield
        return
    from . import storage

    prefix = _as_prefix(checkpoint_dir)
    if FAILED in storage.list_objects(prefix):
        with tempfile.TemporaryDirectory() as tmp:
            earlier = storage.fetch_file(prefix + FAILED, Path(tmp) / FAILED).read_text()
        raise RetryWouldRepeat(f"{earlier.strip()} (an earlier attempt of this task; another "
                               f"attempt would fail the same way: not training again. Delete "
                               f"{prefix}{FAILED} to try anyway)")
    try:
        yield
    except _permanent_errors() as exc:
        if not isinstance(exc, RetryWouldRepeat):
            with tempfile.TemporaryDirectory() as tmp:
                marker = Path(tmp) / FAILED
                marker.write_text(f"{type(exc).__name__}: {exc}\n")
                try:
                    storage.upload_file(marker, prefix + FAILED)
                except storage.StorageError as upload_error:  # the stage's own error matters
                    log.warning("could not record the failure at %s%s: %s", prefix, FAILED,
                                upload_error)
        raise
