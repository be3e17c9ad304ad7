"""The cost model (issue 10): how the whole pipeline's time grows with the data and the shards.

Runs the whole DAG locally (`pipeline.py run`, kfp.local; profile smoke: the tiny random Llama,
the bundled Debian data) once per dataset size and shard count, each in a fresh process, with
training uncapped (reward_max_steps=0, mle_max_steps=0, ppo_max_updates=0: one epoch each), so
training work grows with the data. For every run it measures the wall time and reads each
stage's seconds and rows from the run's `summaries/<stage>.json`; then it prints

  * the run wall time per size and shard count;
  * per stage: seconds per example at each size (training stages per train pair, generation,
    post-processing and scoring per test row, filtering per row read) and a least-squares fit
    seconds = fixed + slope * examples across the sizes: `slope` is what one more example
    costs, `fixed` what the stage costs at any size (model loading, imports, evaluation);
  * for sharded runs, the sharded stages' task-seconds (the sum over shards, what a cluster
    bills) beside their wall time on a cluster (the slowest shard: shards run side by side).

Locally kfp.local runs at most 2 shards at a time on the same CPU, so a sharded run is not
faster here: the shards share the cores, and each shard loads the model again. Read the
"slowest shard" row for what shards buy on a cluster, where each shard has its own GPU.
"wall - stages" is what the run spends outside the stages' own timers (a process and imports
per task, kfp.local's bookkeeping); it goes negative when tasks overlap (the shards).

    make bench-scaling                                     # sizes 56:16,224:64,896:256 x 1, 2 shards
    .venv/bin/python bench/scaling.py --sizes 28:8,56:16 --shards 1 --keep runs/scaling
    .venv/bin/python bench/scaling.py --smoke              # one run: 28:8, 2 shards, capped
    .venv/bin/python bench/scaling.py --runs runs/A runs/B # the same tables from runs you have
A benchmark, not a test: nothing is asserted, and the tiny model's seconds are about the
pipeline's overheads, not about a real model's compute (`--profile demo` measures SmolLM2).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DEFAULT_SIZES = "56:16,224:64,896:256"
DEFAULT_SHARDS = "1,2"
# One run of the smoke profile as it is (its training caps kept), sharded: 8 test rows are two
# windows of 4, so 2 shards. About 2 minutes on 2 cores.
SMOKE = dict(sizes="28:8", shards="2", capped=True)
UNCAPPED = {"reward_max_steps": 0, "mle_max_steps": 0, "ppo_max_updates": 0}
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
             "LASTMILE_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}

#: What a stage's cost is counted per: train pairs, test rows, or every row read.
STAGE_UNITS = {
    "filter_data": "row", "negatives": "train", "train_reward": "train", "train_mle": "train",
    "train_ppo": "train", "generate_base": "test", "generate_mle": "test",
    "generate_rl": "test", "postprocess_base": "test", "postprocess_mle": "test",
    "score": "test",
}
STAGES = tuple(STAGE_UNITS)


# ----------------------------------------------------------------------------- pure parts

def parse_sizes(text: str) -> list[tuple[int, int]]:
    """"28:8,56:16" -> [(28, 8), (56, 16)]: (max_train, max_test) per size."""
    sizes = []
    for item in text.split(","):
        train, sep, test = item.strip().partition(":")
        if not sep:
            raise ValueError(f"a size is TRAIN:TEST (e.g. 28:8), got {item!r}")
        train_n, test_n = int(train), int(test)
        if train_n < 1 or test_n < 1:
            raise ValueError(f"sizes must be >= 1, got {item!r}")
        sizes.append((train_n, test_n))
    return sizes


def parse_shards(text: str) -> list[int]:
    shards = [int(s) for s in text.split(",") if s.strip()]
    if not shards or min(shards) < 1:
        raise ValueError(f"shard counts must be >= 1, got {text!r}")
    return shards


def fit_line(xs, ys) -> tuple[float | None, float | None]:
    """(fixed, slope) of the least-squares line y = fixed + slope * x; (None, None) without
    two distinct x (one size: nothing to fit)."""
    xs, ys = [float(x) for x in xs], [float(y) for y in ys]
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        return None, None
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def stage_rows(summary: dict) -> int | None:
    """The rows a stage itself worked through (as the report's timing table counts them)."""
    for key in ("rows_in", "n", "rows", "examples"):
        value = summary.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def run_record(train: int, test: int, shards: int, wall: float,
               summaries: dict[str, dict]) -> dict:
    """One run's figures from its stage summaries: per stage its seconds (summed over shards),
    wall seconds (the slowest shard), tasks, examples and seconds per example."""
    rows_out = summaries.get("filter_data", {}).get("rows_out") or {}
    counts = {"train": rows_out.get("train", train), "test": rows_out.get("test", test)}
    counts["row"] = counts["train"] + counts["test"]
    stages = {}
    for stage, s in summaries.items():
        seconds = s.get("seconds")
        if not _number(seconds):
            continue
        unit = STAGE_UNITS.get(stage, "test")
        examples = counts[unit]
        stages[stage] = {
            "seconds": float(seconds),
            "wall_seconds": float(s["wall_seconds"]) if _number(s.get("wall_seconds"))
            else float(seconds),
            "tasks": int(s.get("shards") or 1),
            "unit": unit, "examples": examples, "stage_rows": stage_rows(s),
            "seconds_per_example": float(seconds) / examples if examples else None,
        }
    stage_total = sum(v["seconds"] for v in stages.values())
    return {"train": counts["train"], "test": counts["test"], "max_train": train,
            "max_test": test, "shards": shards, "planned_shards": _planned(summaries, shards),
            "wall_seconds": wall, "stage_seconds": stage_total,
            "outside_stages_seconds": wall - stage_total, "stages": stages}


def _planned(summaries: dict[str, dict], requested: int) -> int:
    """The shards the run really made (num_shards is capped at the number of windows)."""
    got = summaries.get("generate_base", {}).get("shards")
    return int(got) if isinstance(got, int) else requested


def fits(runs: list[dict]) -> dict[str, dict]:
    """Per shard count: per stage (and the run's wall time) the line fixed + slope * examples
    across sizes. The run's wall time is fitted against train + test rows."""
    out: dict[str, dict] = {}
    for shards in sorted({r["shards"] for r in runs}):
        group = [r for r in runs if r["shards"] == shards]
        result = {}
        fixed, slope = fit_line([r["train"] + r["test"] for r in group],
                                [r["wall_seconds"] for r in group])
        result["run_wall"] = {"unit": "row", "fixed_seconds": fixed,
                              "slope_seconds_per_example": slope}
        for stage in _stage_order(group):
            points = [(r["stages"][stage]["examples"], r["stages"][stage]["seconds"])
                      for r in group if stage in r["stages"]]
            fixed, slope = fit_line([p[0] for p in points], [p[1] for p in points])
            result[stage] = {"unit": group[0]["stages"][stage]["unit"], "fixed_seconds": fixed,
                             "slope_seconds_per_example": slope}
        out[str(shards)] = result
    return out


def _stage_order(runs: list[dict]) -> list[str]:
    found = {s for r in runs for s in r["stages"]}
    return [s for s in STAGES if s in found] + sorted(found - set(STAGES))


def _size(r: dict) -> str:
    return f"{r['train']}:{r['test']}"


def format_tables(result: dict) -> str:
    runs, fitted = result["runs"], result["fits"]
    sizes = sorted({(r["train"], r["test"]) for r in runs})
    labels = [f"{a}:{b}" for a, b in sizes]
    width = max(8, *(len(x) + 1 for x in labels))
    lines = []

    head = f"{'run wall time, s':26}" + "".join(f"{x:>{width}}" for x in labels)
    lines += [head + f"{'s/row':>9}{'fixed s':>9}", "-" * (len(head) + 18)]
    for shards in sorted({r["shards"] for r in runs}):
        by_size = {(r["train"], r["test"]): r for r in runs if r["shards"] == shards}
        cells = "".join(f"{by_size[s]['wall_seconds']:{width}.1f}" if s in by_size
                        else f"{'':>{width}}" for s in sizes)
        fit = fitted[str(shards)]["run_wall"]
        name = f"  {shards} shard{'s' if shards > 1 else ''}"
        lines.append(f"{name:26}{cells}{_cell(fit['slope_seconds_per_example'], 9, 3)}"
                     f"{_cell(fit['fixed_seconds'], 9, 1)}")
    lines.append("  (train:test rows; s/row and fixed s: the line fitted across sizes)")

    for shards in sorted({r["shards"] for r in runs}):
        group = {(r["train"], r["test"]): r for r in runs if r["shards"] == shards}
        lines.append("")
        title = f"s per example, {shards} shard{'s' if shards > 1 else ''}"
        head = (f"{title:24}"
                f"{'per':>6}" + "".join(f"{x:>{width}}" for x in labels))
        lines += [head + f"{'slope':>9}{'fixed s':>9}", "-" * (len(head) + 18)]
        for stage in _stage_order(list(group.values())):
            cells = ""
            unit = ""
            for s in sizes:
                st = group.get(s, {}).get("stages", {}).get(stage)
                unit = unit or (st["unit"] if st else "")
                cells += _cell(st["seconds_per_example"], width, 4) if st else f"{'':>{width}}"
            fit = fitted[str(shards)].get(stage, {})
            tasks = max((group[s]["stages"][stage]["tasks"] for s in sizes
                         if stage in group.get(s, {}).get("stages", {})), default=1)
            name = stage + (f" x{tasks}" if tasks > 1 else "")
            lines.append(f"{name:24}{unit:>6}{cells}"
                         f"{_cell(fit.get('slope_seconds_per_example'), 9, 4)}"
                         f"{_cell(fit.get('fixed_seconds'), 9, 1)}")
        totals = "".join(_cell(group[s]["stage_seconds"], width, 1) if s in group
                         else f"{'':>{width}}" for s in sizes)
        lines.append(f"{'all stages, s':24}{'':>6}{totals}")
        outside = "".join(_cell(group[s]["outside_stages_seconds"], width, 1) if s in group
                          else f"{'':>{width}}" for s in sizes)
        lines.append(f"{'wall - stages, s':24}{'':>6}{outside}")

    sharded = [r for r in runs if r["planned_shards"] > 1]
    if sharded:
        lines.append("")
        head = f"{'sharded stages, s':30}" + "".join(f"{x:>{width}}" for x in labels)
        lines += [head, "-" * len(head)]
        for shards in sorted({r["shards"] for r in runs}):
            group = {(r["train"], r["test"]): r for r in runs if r["shards"] == shards}
            for what, key in (("task-seconds", "seconds"), ("slowest shard", "wall_seconds")):
                if shards == 1 and key == "wall_seconds":
                    continue
                cells = "".join(_cell(sharded_seconds(group[s], key), width, 1) if s in group
                                else f"{'':>{width}}" for s in sizes)
                label = f"  {shards} shard{'s' if shards > 1 else ''}, {what}"
                lines.append(f"{label:30}{cells}")
        lines.append("  (generate x3, post-process x2, score: summed over shards, or each "
                     "stage's slowest shard)")
    return "\n".join(lines)


def sharded_seconds(run: dict, key: str) -> float:
    """Seconds of the stages that fan out over shards (generation, post-processing, score)."""
    return sum(st[key] for name, st in run["stages"].items()
               if name.startswith(("generate_", "postprocess_")) or name == "score")


def _cell(value: float | None, width: int, decimals: int) -> str:
    return f"{'n/a':>{width}}" if not _number(value) else f"{value:{width}.{decimals}f}"


def figures(result: dict) -> dict[str, float]:
    """Every number of the result, flattened to name -> value (what the smoke test checks)."""
    out = {}
    for r in result["runs"]:
        tag = f"{r['train']}_{r['test']}_s{r['shards']}"
        for key in ("wall_seconds", "stage_seconds", "outside_stages_seconds"):
            out[f"{tag}.{key}"] = r[key]
        for stage, st in r["stages"].items():
            for key in ("seconds", "wall_seconds", "seconds_per_example"):
                if st[key] is not None:
                    out[f"{tag}.{stage}.{key}"] = st[key]
    for shards, stages in result["fits"].items():
        for stage, fit in stages.items():
            for key in ("fixed_seconds", "slope_seconds_per_example"):
                if fit[key] is not None:  # None: one size, no line to fit
                    out[f"fit_s{shards}.{stage}.{key}"] = fit[key]
    return out


# ----------------------------------------------------------------------------- the runs

def _load_ppo_vs_trl():
    spec = importlib.util.spec_from_file_location("bench_ppo_vs_trl", BENCH / "ppo_vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the standard library only, at import
    return module


def machine() -> dict:
    return _load_ppo_vs_trl().machine()


def read_summaries(report_dir: Path) -> dict[str, dict]:
    folder = report_dir / "summaries"
    if not folder.is_dir():
        raise SystemExit(f"{report_dir}: no summaries/ (did the run train? see its log)")
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def child_env(threads: int) -> dict[str, str]:
    env = {**os.environ, **CHILD_ENV}
    if threads:  # every task's torch (and BLAS) threads
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def pipeline_command(args, train: int, test: int, shards: int, out: Path) -> list[str]:
    """The `pipeline.py run` of one size and shard count."""
    params = {"max_train": train, "max_test": test, "num_shards": shards,
              **({} if args.capped else UNCAPPED)}
    cmd = [args.python, str(ROOT / "pipeline.py"), "run", "--profile", args.profile,
           "--out", str(out)]
    if args.data:
        cmd += ["--data", args.data]
    for key, value in {**params, **dict(args.param)}.items():
        cmd += ["--param", f"{key}={value}"]
    return cmd


def record_from_run(run_dir: Path) -> dict:
    """A finished `pipeline.py run` folder's figures, as `run_once` records a run it starts
    (the wall time from its COMPLETE file, the caps and shards from its config.json), with
    its profile's name."""
    from lastmile import console

    run_dir = Path(run_dir)
    status = console.read_status(run_dir / console.COMPLETE_FILE)
    if status.get("status") != "done" or not status.get("seconds"):
        raise SystemExit(f"{run_dir}: not a finished run (no COMPLETE with its seconds)")
    cfg = json.loads((run_dir / "config.json").read_text())
    record = run_record(cfg["data"]["max_train"], cfg["data"]["max_test"],
                        cfg["generate"]["num_shards"], float(status["seconds"]),
                        read_summaries(run_dir))
    return {**record, "profile": cfg["name"]}


def run_once(args, train: int, test: int, shards: int, out: Path) -> dict:
    cmd = pipeline_command(args, train, test, shards, out)
    log = out.parent / f"{out.name}.log"
    if args.verbose:
        print("$ " + shlex.join(cmd), file=sys.stderr, flush=True)
    started = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                              env=child_env(args.threads))
    wall = time.perf_counter() - started
    if proc.returncode:
        sys.stderr.write(log.read_text(errors="replace")[-6000:])
        raise SystemExit(f"failed ({proc.returncode}): {shlex.join(cmd)}  (log above, {log})")
    record = run_record(train, test, shards, wall, read_summaries(out))
    print(f"run {_size(record)} rows, {shards} shard(s) ({record['planned_shards']} made): "
          f"{wall:.1f} s wall, {record['stage_seconds']:.1f} s in stages", flush=True)
    return record


def from_runs(args) -> dict:
    """`--runs`: the figures of finished runs, nothing started."""
    runs, seen = [], {}
    for folder in args.runs:
        record = record_from_run(Path(folder))
        key = (record["train"], record["test"], record["shards"])
        if key in seen:  # the tables hold one run per size and shard count
            raise SystemExit(f"{seen[key]} and {folder}: the same size ({key[0]}:{key[1]} rows) "
                             f"and shard count ({key[2]}); pass one run of each")
        seen[key] = folder
        runs.append(record)
    profiles = sorted({r["profile"] for r in runs})
    return {"setting": {"profile": ",".join(profiles), "data": "as each run had it",
                        "sizes": ",".join(f"{r['train']}:{r['test']}" for r in runs),
                        "shards": ",".join(str(r["shards"]) for r in runs),
                        "training": "as each run had it", "threads": args.threads,
                        "params": {}, "runs": [str(d) for d in args.runs]},
            "machine": machine(), "runs": runs, "fits": fits(runs)}


def measure(args) -> dict:
    if args.runs:
        return from_runs(args)
    sizes, shard_counts = parse_sizes(args.sizes), parse_shards(args.shards)
    keep = Path(args.keep) if args.keep else None
    runs = []
    with tempfile.TemporaryDirectory(prefix="lastmile-scaling-") as tmp:
        work = keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for train, test in sizes:  # shard counts alternate within a size: drift hits both
            for shards in shard_counts:
                out = work / f"train{train}-test{test}-shards{shards}"
                runs.append(run_once(args, train, test, shards, out))
    return {"setting": {"profile": args.profile, "data": args.data or "bundled",
                        "sizes": args.sizes, "shards": args.shards,
                        "training": "the profile's caps" if args.capped
                        else "uncapped (one epoch)", "threads": args.threads,
                        "params": {**({} if args.capped else UNCAPPED), **dict(args.param)}},
            "machine": machine(), "runs": runs, "fits": fits(runs)}


def report(result: dict, args) -> None:
    m, s = result["machine"], result["setting"]
    print(f"setting profile={s['profile']} data={s['data']} sizes={s['sizes']} "
          f"shards={s['shards']} training={s['training']} "
          f"threads={s['threads'] or 'default'} "
          f"params={','.join(f'{k}={v}' for k, v in s['params'].items()) or '-'}")
    print(f"machine cpu=\"{m['cpu']}\" cores={m['cores']} memory={m['memory_gib']:.1f}GiB "
          f"load_1min={m['load_1min']:.1f} python={m['python']}")
    print(format_tables(result))
    if s["profile"] == "smoke":
        print("note profile smoke: a tiny random model; the seconds are the pipeline's own "
              "costs (processes, loading, bookkeeping), not a real model's compute")


def _param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param expects KEY=VALUE, got {text!r}")
    return key, value


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=DEFAULT_SIZES,
                   help=f"TRAIN:TEST row caps per size, comma-separated (default {DEFAULT_SIZES})")
    p.add_argument("--shards", default=DEFAULT_SHARDS,
                   help=f"shard counts, comma-separated (default {DEFAULT_SHARDS})")
    p.add_argument("--profile", default="smoke", choices=["smoke", "demo", "paper"],
                   help="the pipeline profile (default smoke: the tiny random model)")
    p.add_argument("--data", default="", help="task data (default: the bundled Debian set)")
    p.add_argument("--param", action="append", type=_param, default=[], metavar="KEY=VALUE",
                   help="any other pipeline parameter, for every run")
    p.add_argument("--capped", action="store_true",
                   help="keep the profile's training caps (default: uncapped, one epoch, so "
                        "training grows with the data)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of every task (OMP_NUM_THREADS; 0: torch's default). "
                        "kfp.local runs up to 2 tasks at once (the shards), so 1 keeps them "
                        "from sharing cores on a 2-core machine")
    p.add_argument("--python", default=sys.executable, help="the project venv's python")
    p.add_argument("--smoke", action="store_true",
                   help=f"one run: size {SMOKE['sizes']}, {SMOKE['shards']} shards, the smoke "
                        "profile's caps (about a minute on 2 cores)")
    p.add_argument("--runs", nargs="+", default=None, metavar="RUN_DIR",
                   help="read finished `pipeline.py run` folders instead of starting runs "
                        "(their machine must be this one for the machine line to be true)")
    p.add_argument("--keep", default=None, help="keep every run's report and log here")
    p.add_argument("--json", default=None, help="also write every figure to this file")
    p.add_argument("-v", "--verbose", action="store_true", help="print the commands")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    try:
        parse_sizes(args.sizes)
        parse_shards(args.shards)
    except ValueError as e:
        p.error(str(e))
    if args.threads < 0:
        p.error("--threads must be >= 0")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    result = measure(args)
    report(result, args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
