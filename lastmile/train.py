"""`python -m lastmile.train STAGE`: one training stage as a command, for torchrun on N nodes.

    torchrun --nnodes N --nproc-per-node M -m lastmile.train mle \\
        --config CONFIG.json --data s3://bucket/.../data/ --out s3://bucket/.../mle/

Why. The pipeline's training components train inside their own pod (`lastmile.distributed`
spawns one process per GPU of that pod). A stage that outgrows one node runs as a Kubeflow
Trainer TrainJob instead (`lastmile.trainjob`), whose torch runtime starts this command with
torchrun on every node. So the command must not depend on the node it lands on:

  * inputs (the data, negatives, reward-model and MLE-model artifacts) are directories or
    s3:// prefixes; a prefix is downloaded once per node (its local rank 0) into a node-local
    work directory, and the other ranks wait for it;
  * the output is a directory (a volume every node mounts) or an s3:// prefix; with a prefix
    the main rank trains into the node-local work directory and then uploads it with
    `storage.publish` (files first, a `_COMPLETE` manifest last), which the launcher reads
    back verified (`storage.read_published`); a job restarted after that upload finds the
    manifest and exits at once;
  * checkpoints go to `--checkpoint-dir`, or the configuration's `checkpoint_dir` (or
    $LASTMILE_CHECKPOINT_PREFIX) narrowed to the stage and output, or by default
    `<out>/checkpoints/`; with an s3:// prefix any node can resume them. The main
    rank downloads the newest one (`checkpoint.Checkpointer.resume`); the local rank 0 of
    every other node downloads it here first, because every rank then restores from its own
    node's copy.

The training itself is the pipeline's: the same stage functions (`reward.train_reward_model`,
`mle.train_mle`, `ppo.train_ppo`) run as ranks of the world torchrun started (they find the
process group and use it: `distributed.launch`), so N ranks give the adapters of one
process up to float rounding (tests/test_trainer.py). Without torchrun (or with a world of
one) the command trains in one process, without torch.distributed. With `"fsdp": true` in the
configuration the base's decoder layers are sharded over the ranks (`lastmile.fsdp`, for a
base too big for one GPU; tests/test_fsdp.py); a world of one refuses it (exit code 2).

Exit codes: 0 done (or already done), 2 bad arguments or configuration (one line on stderr),
anything else a training failure (its traceback; torchrun and the TrainJob report it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import distributed, fsdp

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
#: The pipeline's name of each stage (summary.json's "stage", the report's rows).
STAGE_NAMES = {"reward": "train_reward", "mle": "train_mle", "ppo": "train_ppo"}
#: Which inputs each stage reads: {option: (required, files it reads there)}.
STAGE_INPUTS = {
    "reward": {"data": (True, ("test.jsonl",)), "negatives": (True, ("rm.jsonl",))},
    "mle": {"data": (True, ("train.jsonl",))},
    "ppo": {"data": (True, ("train.jsonl",)), "reward_model": (True, ("adapter",)),
            "mle_model": (False, ("adapter",))},
}
#: Written into a node's copy of an input once it is whole (a half-downloaded copy is redone).
FETCHED = ".lastmile-fetched"


class UsageError(Exception):
    """Bad arguments or configuration: one line on stderr, exit code 2."""


# ----------------------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lastmile.train",
        description="Train one lastmile stage (reward, mle, ppo) alone or as the ranks of a "
                    "torchrun world; inputs and output are directories or s3:// prefixes.")
    p.add_argument("stage", choices=sorted(STAGE_NAMES), help="the stage to train")
    p.add_argument("--config", required=True, metavar="JSON|FILE|s3://KEY",
                   help="the run's resolved configuration (pipeline.py's resolve_config "
                        "output): the JSON text itself, a file, or an s3:// object")
    p.add_argument("--data", metavar="DIR|s3://PREFIX",
                   help="the filter_data artifact (train.jsonl, test.jsonl)")
    p.add_argument("--negatives", metavar="DIR|s3://PREFIX",
                   help="the synthesize_negatives artifact (rm.jsonl); reward only")
    p.add_argument("--reward-model", metavar="DIR|s3://PREFIX",
                   help="the train_reward artifact (adapter/); ppo only")
    p.add_argument("--mle-model", metavar="DIR|s3://PREFIX",
                   help="the train_mle artifact, when ppo.init_policy_from_mle is set")
    p.add_argument("--out", required=True, metavar="DIR|s3://PREFIX",
                   help="where the stage's artifact goes (adapter/, logs, summary.json)")
    p.add_argument("--checkpoint-dir", metavar="DIR|s3://PREFIX",
                   help="checkpoints (default: the configuration's, else OUT/checkpoints/)")
    p.add_argument("--work-dir", metavar="DIR",
                   help="node-local scratch for downloaded inputs and the output before its "
                        "upload (default: a directory in $TMPDIR named after OUT)")
    return p


def load_config(value: str):
    """The Profile in `value`: JSON text, a file holding it, or an s3:// object."""
    from . import storage
    from .config import profile_from_json

    text = value
    if not value.lstrip().startswith("{"):
        if storage.is_s3_uri(value):
            with tempfile.TemporaryDirectory(prefix="lastmile-config-") as tmp:
                text = storage.fetch_file(value, Path(tmp) / "config.json").read_text()
        else:
            try:
                text = Path(value).read_text()
            except OSError as e:
                raise UsageError(f"--config {value}: {e.strerror or e}") from None
    try:
        return profile_from_json(text)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--config: not a lastmile configuration ({e})") from None


# ----------------------------------------------------------------------------- the world

@dataclass(frozen=True)
class Place:
    """This process among the ranks torchrun started (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_node_main(self) -> bool:
        """The first rank on its node: downloads what the node's ranks read."""
        return self.local_rank == 0


def place_from_env(env=os.environ) -> Place:
    """Where torchrun put this process (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE)."""
    try:
        return Place(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                     int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", 1)))
    except ValueError as e:
        raise UsageError(f"torchrun's environment is malformed: {e}") from None


def join_world(place: Place) -> None:
    """Join torchrun's process group, as `distributed.run`'s workers join theirs: NCCL with
    this rank's GPU (cuda:LOCAL_RANK) when CUDA is available, else gloo on the CPU with an
    equal share of the cores. A world of one joins nothing (the single-process path)."""
    import torch
    import torch.distributed as dist

    logging.basicConfig(level=logging.INFO if place.is_main else logging.WARNING,
                        format=f"[rank {place.rank}] %(levelname)s %(name)s: %(message)s")
    if place.size == 1:
        return
    if torch.cuda.is_available():
        backend = "nccl"
        torch.cuda.set_device(place.local_rank % torch.cuda.device_count())
    else:
        backend = "gloo"
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // place.local_size))
    # The main rank alone uploads checkpoints and evaluates while the others wait in their
    # next collective: the same allowance as lastmile.distributed's own workers.
    timeout = datetime.timedelta(seconds=distributed.COLLECTIVE_TIMEOUT_S)
    dist.init_process_group(backend, store=attempt_store(place, timeout), rank=place.rank,
                            world_size=place.size, timeout=timeout)


def attempt_store(place: Place, timeout: datetime.timedelta):
    """torchrun's rendezvous store, under a prefix per restart of the worker group.

    `torchrun --max-restarts` restarts the ranks against the same store; without a prefix a
    restarted rank can read the previous attempt's gloo/NCCL addresses and fail with
    "Connection refused" (seen here in 2 of 3 restarts on a busy CPU). Under torchrun the
    agent hosts the store (TORCHELASTIC_USE_AGENT_STORE); otherwise rank 0 does, as env://
    would."""
    import torch.distributed as dist

    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    try:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError) as e:
        raise UsageError(f"MASTER_ADDR/MASTER_PORT missing or malformed ({e}): start the "
                         "ranks with torchrun") from None
    store = dist.TCPStore(host, port, place.size, is_master=not agent and place.is_main,
                          timeout=timeout, multi_tenant=not agent)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"lastmile/attempt-{attempt}/", store)


def leave_world() -> None:
    if distributed.active():
        import torch.distributed as dist

        dist.destroy_process_group()


# ----------------------------------------------------------------------------- inputs, output

def is_remote(value: str | None) -> bool:
    return bool(value) and str(value).startswith("s3://")


def default_work_dir(out: str) -> Path:
    """Node-local scratch named after the output, so every rank on a node (and a restarted
    job on the same node) finds the same one."""
    digest = hashlib.sha256(out.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"lastmile-train-{digest}"


def fetch_dir(uri: str, dest: Path) -> Path:
    """Every object under the s3:// prefix `uri` into `dest`, keeping the relative paths; a
    copy marked whole by an earlier call is reused."""
    from . import storage

    if (dest / FETCHED).is_file():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    objects = storage.list_objects(uri)
    if not objects:
        raise UsageError(f"{uri}: no objects under this prefix")
    prefix = uri if uri.endswith("/") else uri + "/"
    for rel in sorted(objects):
        parts = Path(rel).parts
        if not rel or rel.startswith("/") or ".." in parts:
            raise UsageError(f"{prefix}{rel}: unsafe object name")
        storage.fetch_file(prefix + rel, dest / rel)
    (dest / FETCHED).write_text(json.dumps(objects))
    return dest


def check_args(args: argparse.Namespace) -> None:
    """Each input the stage needs is given and none it does not read (before any rank joins
    the world: a usage error is the same on every rank)."""
    for name in ("data", "negatives", "reward_model", "mle_model"):
        flag, value = "--" + name.replace("_", "-"), getattr(args, name)
        wanted = STAGE_INPUTS[args.stage].get(name)
        if wanted is None and value:
            raise UsageError(f"{args.stage} reads no {flag}")
        if wanted is not None and wanted[0] and not value:
            raise UsageError(f"{args.stage} needs {flag}")


def resolve_inputs(stage: str, args: argparse.Namespace, work: Path,
                   place: Place) -> dict[str, Path]:
    """{input name: local directory} for the stage; s3:// inputs downloaded once per node."""
    found = {}
    for name in STAGE_INPUTS[stage]:
        value = getattr(args, name)
        if not value:
            continue
        local = work / "inputs" / name if is_remote(value) else Path(value)
        if is_remote(value) and place.is_node_main:
            fetch_dir(value, local)
        found[name] = local
    distributed.barrier()  # every node's copies are whole before any rank reads them
    for name, local in found.items():
        for need in STAGE_INPUTS[stage][name][1]:
            if not (local / need).exists():
                raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: no {need} "
                                 "there")
    return found


def checkpoint_dir(stage: str, stage_cfg, explicit: str | None, out: str) -> str | None:
    """--checkpoint-dir as given; else the configuration's `checkpoint_dir` (or the cluster's
    $LASTMILE_CHECKPOINT_PREFIX), an s3:// prefix narrowed to this stage and output as the
    pipeline's steps narrow it (`checkpoint.task_scope`: stages sharing a configuration never
    share checkpoints); else `<out>/checkpoints/` for an s3:// output (None for a directory
    output: the stage's default, out/checkpoints)."""
    from . import checkpoint

    if explicit:
        return explicit
    scoped = checkpoint.task_scope(stage_cfg.checkpoint_dir, STAGE_NAMES[stage], out)
    if scoped:
        return scoped
    if is_remote(out):
        return (out if out.endswith("/") else out + "/") + "checkpoints/"
    return None


def prefetch_checkpoint(ckpt: str | None, out_local: Path, place: Place) -> None:
    """The newest remote checkpoint onto every other node (the main rank's Checkpointer pulls
    onto its own): each rank restores from its node's copy of the same step."""
    from . import checkpoint

    if ckpt and is_remote(ckpt) and place.is_node_main and not place.is_main:
        checkpoint.pull(ckpt, checkpoint.resolve_dir(out_local, ckpt).local)


def already_published(out: str) -> bool:
    """Whether an earlier attempt of this job finished and uploaded its output."""
    from . import storage

    try:
        storage.read_manifest(out)
    except storage.StorageError as e:
        if e.kind == "not-published":
            return False
        raise
    return True


def publish_output(local: Path, out: str) -> str:
    """Upload the stage's directory to the s3:// prefix `out` (`storage.publish`: files,
    then the `_COMPLETE` manifest last)."""
    from . import storage

    stripped = out.rstrip("/")
    parent, _, name = stripped.rpartition("/")
    if parent.endswith(":/") or not name:
        raise UsageError(f"--out {out}: needs a key below the bucket (s3://bucket/prefix/)")
    return storage.publish(local, parent + "/", name,
                           owner=f"lastmile.train:{out}")


# ----------------------------------------------------------------------------- the stages

def run_stage(stage: str, profile, inputs: dict[str, Path], out: Path,
              ckpt: str | None) -> dict:
    """The stage as components/stages.py runs it in its pod: the same stage function, the
    same files in `out`, and on the main rank the same summary.json (runinfo.stage)."""
    main = distributed.world().is_main
    cfg = getattr(profile, stage)
    cfg.checkpoint_dir = ckpt
    common = dict(allow_pickle=profile.allow_pickle, trust_remote_code=profile.trust_remote_code,
                  fsdp=fsdp.enabled(profile))
    data = inputs["data"]
    if stage == "reward":
        from . import reward
        from .io import read_jsonl

        files = {"rm.jsonl": inputs["negatives"] / "rm.jsonl", "test.jsonl": data / "test.jsonl"}
        with _summary(main, stage, out, cfg.seed, files, profile.base_model) as summary:
            summary.update(reward.train_reward_model(
                files["rm.jsonl"], out, cfg, profile.base_model,
                list(read_jsonl(files["test.jsonl"])), **common))
    elif stage == "mle":
        from . import mle

        files = {"train.jsonl": data / "train.jsonl"}
        with _summary(main, stage, out, cfg.seed, files, profile.base_model) as summary:
            summary.update(mle.train_mle(files["train.jsonl"], out, cfg, profile.base_model,
                                         **common))
    else:
        from . import ppo

        start_from = None
        if cfg.init_policy_from_mle and "mle_model" in inputs:
            start_from = inputs["mle_model"] / "adapter"
        files = {"train.jsonl": data / "train.jsonl"}
        with _summary(main, stage, out, cfg.seed, files, profile.base_model) as summary:
            summary.update(ppo.train_ppo(files["train.jsonl"], inputs["reward_model"] / "adapter",
                                         out, cfg, profile.base_model,
                                         mle_adapter_dir=start_from, **common))
    return summary


@contextlib.contextmanager
def _summary(main: bool, stage: str, out: Path, seed: int, inputs: dict, base_model: str):
    """runinfo.stage on the main rank (it writes summary.json); a plain dict elsewhere."""
    from . import runinfo

    if not main:
        yield {}
        return
    with runinfo.stage(STAGE_NAMES[stage], out, seed=seed, inputs=inputs,
                       base_model=base_model, entry_point="lastmile.train") as summary:
        yield summary


def train(args: argparse.Namespace) -> dict | None:
    """Run the stage as this process's rank; returns the main rank's summary (None elsewhere
    or when an earlier attempt already published the output)."""
    place = place_from_env()
    check_args(args)
    profile = load_config(args.config)
    if fsdp.enabled(profile) and place.size < 2:
        raise UsageError("fsdp=true shards the base over torchrun's processes, but there is "
                         "one: start 2 or more (--nproc-per-node, --nnodes) or set fsdp=false")
    join_world(place)
    try:
        if is_remote(args.out) and already_published(args.out):
            log.info("%s is already published by an earlier attempt: nothing to do", args.out)
            return None
        work = Path(args.work_dir) if args.work_dir else default_work_dir(args.out)
        out_local = work / "out" if is_remote(args.out) else Path(args.out)
        inputs = resolve_inputs(args.stage, args, work, place)
        ckpt = checkpoint_dir(args.stage, getattr(profile, args.stage), args.checkpoint_dir,
                              args.out)
        prefetch_checkpoint(ckpt, out_local, place)
        summary = run_stage(args.stage, profile, inputs, out_local, ckpt)
        if place.is_main and is_remote(args.out):
            uri = publish_output(out_local, args.out)
            log.info("%s: published to %s", STAGE_NAMES[args.stage], uri)
        distributed.barrier()  # no rank leaves (and tears the world down) before the upload
        return summary if place.is_main else None
    finally:
        leave_world()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = train(args)
    except UsageError as e:
        print(f"lastmile.train {args.stage}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if summary is not None:
        print("SUMMARY " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
