"""One process against `torchrun --nproc-per-node N`: seconds per training step and peak memory
per rank, for a lastmile training stage run through its torchrun entry point.

    .venv/bin/python bench/torchrun_vs_one.py                        # SmolLM2-135M, MLE
    .venv/bin/python bench/torchrun_vs_one.py --base tiny-random --steps 6 --rows 48
    .venv/bin/python bench/torchrun_vs_one.py --stage reward --json runs/bench/torchrun.json
    .venv/bin/python bench/torchrun_vs_one.py --fsdp-params     # bytes per rank, FSDP or not
    .venv/bin/python bench/torchrun_vs_one.py --fsdp --steps 3  # N ranks, unsharded vs FSDP

Each round runs `python -m lastmile.train STAGE` as one process on every core, as one
process on cores / N threads (what each rank gets), and `torchrun --nproc-per-node N -m
lastmile.train STAGE` (N processes, cores / N threads each: torchrun's OMP_NUM_THREADS=1 is
replaced), on the same synthetic rows and configuration, for `--rounds` rounds. Per run it
reads the main rank's `median_step_seconds` (the stage summary's median of its steps'
`seconds`, the upper one for an even count) and every rank's peak RSS (each rank reports
its own `ru_maxrss` at exit). The global batch is the same in every setup, so a step does
the same work: N ranks split its rows. `--fsdp` runs the N-process setup twice instead,
with `fsdp` off and on (the base's decoder layers sharded over the ranks, lastmile.fsdp).

It is a benchmark, not a test: it never asserts a time. The figures in docs/scaling.md come
from it. On a machine with fewer cores than N x the threads a forward can use, expect
little or no speed-up: the ranks share the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- worker

def worker(argv: list[str], report_dir: str) -> int:
    """One rank: lastmile.train's main, then this rank's peak RSS into report_dir."""
    sys.path.insert(0, str(ROOT))
    from lastmile import train

    code = train.main(argv)
    rank = int(os.environ.get("RANK", 0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(report_dir, f"rank-{rank}.json").write_text(json.dumps({"rank": rank,
                                                                 "peak_rss": peak}))
    return code


def fsdp_parameter_bytes(base: str) -> dict:
    """One rank's parameter bytes with the base whole and with its decoder layers sharded by
    `lastmile.fsdp.shard_base` (a LoRA r=32 adapter added first); run as every rank of a
    world (lastmile.distributed.run)."""
    sys.path.insert(0, str(ROOT))
    from lastmile import distributed, fsdp
    from lastmile.config import LoraSpec
    from lastmile.modeling import AdapterModel, load_base

    model = AdapterModel(load_base(base)[0])
    model.add_adapter("policy", LoraSpec(r=32, alpha=16), seed=0)

    def local_bytes(params) -> int:
        return sum((p.to_local() if fsdp.is_sharded(p) else p).numel() * p.element_size()
                   for p in params)

    whole = local_bytes(model.parameters())
    lora_whole = local_bytes(model.adapter_parameters("policy"))
    fsdp.shard_base(model)
    return {"rank": distributed.world().rank, "world": distributed.world().size,
            "whole_bytes": whole, "sharded_bytes": local_bytes(model.parameters()),
            "lora_whole_bytes": lora_whole,
            "lora_sharded_bytes": local_bytes(model.adapter_parameters("policy"))}


# ----------------------------------------------------------------------------- inputs

def make_inputs(root: Path, base: str, rows: int, words: int) -> dict[str, Path]:
    """Synthetic data/ (train.jsonl, test.jsonl) and negatives/ (rm.jsonl) artifacts whose
    prompts are `words` words long, with the base's chat template."""
    sys.path.insert(0, str(ROOT))
    from lastmile.modeling import load_tokenizer

    tokenizer = load_tokenizer(base)
    vocab = ("package provides tools library command line utility files system network "
             "python data server client manager editor plugin module support").split()
    task, rm = [], []
    for i in range(rows):
        text = " ".join(vocab[(i * 7 + j * 3) % len(vocab)] for j in range(words))
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Summarize the following text in one short sentence."
              "\n\n" + text}], tokenize=False, add_generation_prompt=True)
        output = f"{vocab[i % len(vocab)]} {vocab[(i + 3) % len(vocab)]} for the shell"
        task.append({"id": f"r{i}", "input": text, "output": output, "prompt": prompt})
        for suffix, out, label, weight, category in (
                ("", output, 1.0, 1.0, "true"),
                ("-c", text, 0.0, 0.5, "copy_input"),
                ("-r", " ".join(reversed(output.split())), 0.0, 0.5, "shuffled")):
            rm.append(dict(id=f"r{i}{suffix}", source_id=f"r{i}", input=text, prompt=prompt,
                           output=out, label=label, weight=weight, category=category))
    paths = {"data": root / "data", "negatives": root / "negatives"}
    for path in paths.values():
        path.mkdir(parents=True, exist_ok=True)
    for name, items in (("data/train.jsonl", task), ("data/test.jsonl", task[:4]),
                        ("negatives/rm.jsonl", rm)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in items))
    return paths


def make_config(base: str, stage: str, steps: int, batch: int, fsdp: bool = False) -> str:
    sys.path.insert(0, str(ROOT))
    from lastmile.config import get_profile, profile_to_json

    p = get_profile("demo")
    p.base_model, p.fsdp = base, fsdp
    cfg = getattr(p, stage)
    cfg.batch_size = batch
    cfg.checkpoint_every = 0
    if stage == "reward":
        cfg.max_steps, cfg.eval_examples = steps, 4
    else:
        cfg.max_steps = steps
    return profile_to_json(p)


# ----------------------------------------------------------------------------- runs

def run_once(processes: int, stage: str, inputs: dict[str, Path], config: str, root: Path,
             threads: int) -> dict:
    out, reports = Path(tempfile.mkdtemp(dir=root, prefix=f"p{processes}-")), None
    reports = out / "ranks"
    reports.mkdir()
    args = [stage, "--config", config, "--data", str(inputs["data"]), "--out", str(out / "out")]
    if stage == "reward":
        args += ["--negatives", str(inputs["negatives"])]
    env = dict(os.environ, LASTMILE_NO_PROGRESS="1", OMP_NUM_THREADS=str(threads),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    me = [str(Path(__file__).resolve()), "--worker", str(reports), "--"]
    if processes == 1:
        command = [sys.executable, *me, *args]
    else:
        command = [str(Path(sys.executable).parent / "torchrun"), "--standalone",
                   "--nproc-per-node", str(processes), *me, *args]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])} ... failed:\n{done.stderr[-3000:]}")
    (line,) = [l for l in done.stdout.splitlines() if l.startswith("SUMMARY ")]
    summary = json.loads(line[len("SUMMARY "):])
    ranks = sorted((json.loads(p.read_text()) for p in reports.glob("rank-*.json")),
                   key=lambda r: r["rank"])
    steps = [json.loads(l)["seconds"] for l in (out / "out" / "train_log.jsonl").open()
             if "seconds" in json.loads(l)]
    return {"processes": processes, "threads_per_rank": threads,
            "fsdp": bool(summary.get("fsdp")), "wall_seconds": round(wall, 2),
            "load_seconds": summary["load_seconds"],
            "median_step_seconds": summary["train"]["median_step_seconds"],
            "step_seconds": steps, "steps": summary["train"]["steps"],
            "tokens": summary["train"].get("tokens"),
            "peak_rss_gib": [round(r["peak_rss"] / 2**30, 3) for r in ranks],
            "load_average_1m": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker(argv[3:], argv[1])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=("mle", "reward"), default="mle")
    p.add_argument("--base", default="embedded:smollm2-135m-instruct",
                   help="base model (default: the embedded SmolLM2-135M; tiny-random: quick)")
    p.add_argument("--processes", type=int, default=2, help="torchrun --nproc-per-node")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--words", type=int, default=120, help="words per input text")
    p.add_argument("--batch", type=int, default=8, help="global batch (rows per step)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1, help="alternating 1-process/N-process pairs")
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--json", metavar="FILE", help="also write the results here")
    p.add_argument("--fsdp", action="store_true",
                   help="instead of the 1-process setups: the N-process one unsharded and "
                        "with the base sharded (fsdp on)")
    p.add_argument("--fsdp-params", action="store_true",
                   help="instead: parameter bytes per rank, whole and FSDP-sharded, with "
                        "--processes gloo ranks")
    args = p.parse_args(argv)
    if args.fsdp_params:
        sys.path.insert(0, str(ROOT))
        from lastmile import distributed

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        row = distributed.run(fsdp_parameter_bytes, (args.base,), args.processes,
                              backend="gloo")
        print(json.dumps(row))
        print(f"\n{args.base}, {args.processes} ranks (rank 0): parameters "
              f"{row['whole_bytes'] / 2**20:.1f} MiB whole, {row['sharded_bytes'] / 2**20:.1f} "
              f"MiB sharded; LoRA {row['lora_whole_bytes'] / 2**20:.2f} MiB whole, "
              f"{row['lora_sharded_bytes'] / 2**20:.2f} MiB sharded")
        return 0
    with tempfile.TemporaryDirectory(prefix="lastmile-bench-torchrun-") as tmp:
        root = Path(tmp)
        inputs = make_inputs(root, args.base, args.rows, args.words)
        configs = {fsdp: make_config(args.base, args.stage, args.steps, args.batch, fsdp)
                   for fsdp in (False, True)}
        # (processes, threads per rank, fsdp): one process on every core, one process on one
        # core (what each rank gets), N processes sharing the cores; or with --fsdp the N
        # processes unsharded and sharded.
        share = max(1, args.cores // args.processes)
        setups = ([(args.processes, share, False), (args.processes, share, True)] if args.fsdp
                  else [(1, args.cores, False), (1, share, False),
                        (args.processes, share, False)])
        setups = list(dict.fromkeys(setups))
        runs = []
        for _ in range(args.rounds):
            for n, threads, fsdp in setups:
                runs.append(run_once(n, args.stage, inputs, configs[fsdp], root, threads))
                print(json.dumps(runs[-1]), flush=True)
    table = []
    for n, threads, fsdp in setups:
        mine = [r for r in runs if r["processes"] == n and r["threads_per_rank"] == threads
                and r["fsdp"] == fsdp]
        table.append({"processes": n, "threads_per_rank": threads, "fsdp": fsdp,
                      "median_step_seconds": statistics.median(r["median_step_seconds"]
                                                               for r in mine),
                      "peak_rss_gib_per_rank": max(max(r["peak_rss_gib"]) for r in mine),
                      "load_seconds": statistics.median(r["load_seconds"] for r in mine)})
    print(f"\n{args.stage} on {args.base}: batch {args.batch}, {args.steps} steps, "
          f"{args.cores} cores, {args.rounds} round(s), load average "
          f"{statistics.mean(r['load_average_1m'] for r in runs):.1f}")
    print("| processes x threads | s / step (median) | peak RSS per rank | model load |")
    print("|---|---|---|---|")
    for row in table:
        print(f"| {row['processes']} x {row['threads_per_rank']}"
              f"{' (fsdp)' if row['fsdp'] else ''} | "
              f"{row['median_step_seconds']:.3f} | {row['peak_rss_gib_per_rank']:.2f} GiB | "
              f"{row['load_seconds']:.1f} s |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs,
                                               "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
