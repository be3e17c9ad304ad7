"""The demo over several seeds: mean and standard deviation per metric (issue 20, point 3).

`reproduce` runs one whole local pipeline per seed (the caller's `run_one`, e.g. pipeline.py's
run_locally, so each is a normal run under runs/), reads each run's scores.json and writes
reproduce.json and reproduce.md after every run:

* per variant and metric: the mean over seeds and the sample standard deviation (n - 1 in
  the denominator; none with one seed), with each seed's value;
* per paired-bootstrap comparison in scores.json (RL - MLE, RL - MLE post-processed) and
  headline metric: each seed's difference and 95% interval, and how many seeds call RL, the
  other variant or neither the winner (a winner only where that seed's interval excludes 0,
  as lastmile.metrics.paired_bootstrap decides).

The seed: by default the `seed` pipeline parameter, which config fans out to every seeded
stage, data included (data.seed orders the rows before max_train / max_test cut them, so
each seed also draws its own training and test rows); with `fixed_data`, only the
negatives, reward, MLE and PPO seeds change and every run sees the same rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import SEEDED_STAGES
from .io import read_json, write_json
from .metrics import (BOOTSTRAP_KEYS, PAIRED_BOOTSTRAP, TOWARD_ZERO_KEYS, VARIANT_ORDER,
                      metric_name, variant_name)



def seed_settings(seed: int, fixed_data: bool = False) -> dict[str, int]:
    """The run settings (a pipeline parameter or dotted fields) that give a run `seed`."""
    if fixed_data:
        # every seeded stage but the data split's (config.SEEDED_STAGES)
        return {f"{stage}.seed": seed for stage in SEEDED_STAGES if stage != "data"}
    return {"seed": seed}


def mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation with n - 1) of the values; sd None below 2 values,
    both None with none."""
    n = len(values)
    if n == 0:
        return None, None
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def _number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def aggregate(scores: Mapping[int, Mapping[str, Any]]) -> dict:
    """{"seeds", "models": {variant: {key: {mean, sd, values}}}, "comparisons": {...}} from
    each seed's scores.json content (keyed by seed)."""
    seeds = list(scores)
    models: dict[str, dict[str, dict]] = {}
    variants = [v for v in VARIANT_ORDER if any(v in s.get("models", {}) for s in scores.values())]
    variants += sorted({v for s in scores.values() for v in s.get("models", {})} - set(variants))
    for variant in variants:
        keys = []
        for s in scores.values():
            for key, value in s.get("models", {}).get(variant, {}).items():
                if key not in keys and _number(value):
                    keys.append(key)
        models[variant] = {}
        for key in keys:
            values = {seed: s["models"][variant][key] for seed, s in scores.items()
                      if _number(s.get("models", {}).get(variant, {}).get(key))}
            mean, sd = mean_sd(list(values.values()))
            models[variant][key] = {"mean": mean, "sd": sd, "n": len(values),
                                    "values": values}
    return {"seeds": seeds, "models": models, "comparisons": _comparisons(scores)}


def _comparisons(scores: Mapping[int, Mapping[str, Any]]) -> dict:
    """Each seed's paired-bootstrap intervals, and the winners counted over seeds."""
    found: dict[str, dict] = {}
    for seed, s in scores.items():
        for name, comparison in ((s.get(PAIRED_BOOTSTRAP) or {}).get("comparisons")
                                 or {}).items():
            entry = found.setdefault(name, {"a": comparison["a"], "b": comparison["b"],
                                            "metrics": {}})
            for key, result in (comparison.get("metrics") or {}).items():
                metric = entry["metrics"].setdefault(key, {"per_seed": {}})
                metric["per_seed"][seed] = {k: result.get(k) for k in
                                            ("difference", "low", "high", "winner")}
    for entry in found.values():
        for metric in entry["metrics"].values():
            per_seed = metric["per_seed"].values()
            mean, sd = mean_sd([r["difference"] for r in per_seed if _number(r["difference"])])
            metric["difference_mean"], metric["difference_sd"] = mean, sd
            metric["winners"] = {"a": sum(r["winner"] == "a" for r in per_seed),
                                 "b": sum(r["winner"] == "b" for r in per_seed),
                                 "none": sum(r["winner"] not in ("a", "b") for r in per_seed)}
    return found


# ----------------------------------------------------------------------------- reporting

def _digits(key: str) -> int:
    return 2 if key in TOWARD_ZERO_KEYS else 3


def mean_sd_text(entry: Mapping[str, Any] | None, key: str, signed: bool = False) -> str:
    if not entry or entry.get("mean") is None:
        return "n/a"
    d = _digits(key)
    sd = entry.get("sd")
    sign = "+" if signed else ""
    return f"{entry['mean']:{sign}.{d}f}" + (f" ± {sd:.{d}f}" if sd is not None else "")


def markdown(result: Mapping[str, Any]) -> str:
    """reproduce.md: mean ± sd per headline metric and variant; the intervals per seed."""
    seeds = result["seeds"]
    models = result["models"]
    variants = list(models)
    lines = [f"# The run over {len(seeds)} seed(s): {', '.join(map(str, seeds))}", ""]
    if result.get("runs"):
        lines += ["Runs: " + ", ".join(f"seed {seed} `{run}`" for seed, run in
                                       result["runs"].items()), ""]
    if result.get("seed_note"):
        lines += [result["seed_note"], ""]
    lines += ["Mean ± standard deviation over the seeds (sample sd, n - 1):", "",
              "| metric | " + " | ".join(variant_name(v) for v in variants) + " |",
              "|---|" + "---:|" * len(variants)]
    for key in BOOTSTRAP_KEYS:  # the table's rows; reproduce.json has every metric
        cells = [mean_sd_text(models[v].get(key), key) for v in variants]
        if all(c == "n/a" for c in cells):
            continue
        lines.append(f"| {metric_name(key)} | " + " | ".join(cells) + " |")
    lines.append("")
    for entry in result["comparisons"].values():
        a, b = variant_name(entry["a"]), variant_name(entry["b"])
        lines += [f"## {a} − {b}: paired bootstrap 95% intervals per seed", "",
                  "| metric | " + " | ".join(f"seed {s}" for s in seeds)
                  + f" | mean difference ± sd | seeds calling {a} / {b} / neither |",
                  "|---|" + "---|" * len(seeds) + "---:|---:|"]
        for key in BOOTSTRAP_KEYS:
            metric = entry["metrics"].get(key)
            if metric is None:
                continue
            d = _digits(key)
            cells = []
            for seed in seeds:
                r = metric["per_seed"].get(seed)
                cells.append("n/a" if r is None else
                             f"{r['difference']:+.{d}f} [{r['low']:+.{d}f}, {r['high']:+.{d}f}]")
            w = metric["winners"]
            spread = mean_sd_text({"mean": metric["difference_mean"],
                                   "sd": metric["difference_sd"]}, key, signed=True)
            lines.append(f"| {metric_name(key)} | " + " | ".join(cells)
                         + f" | {spread} | {w['a']} / {w['b']} / {w['none']} |")
        lines += ["", "A seed calls a winner only where its interval excludes 0 (for extra "
                      "length: the mean closer to 0).", ""]
    return "\n".join(lines)


def write(result: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "reproduce.json", "markdown": out / "reproduce.md"}
    write_json(paths["json"], result)
    paths["markdown"].write_text(markdown(result))
    return paths


def read_scores(run_dir: str | Path) -> dict:
    """A local run's scores.json (pipeline.py run copies it to the run's folder)."""
    path = Path(run_dir) / "scores.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no scores.json (did the run finish?)")
    return read_json(path)


def run_seed(run_dir: str | Path) -> tuple[int, int | None]:
    """(seed, data seed) of a finished local run, from its run_info.json: the seed its
    negatives, reward, MLE and PPO stages shared, and its data split's. A run whose trained
    stages had different seeds is no seed's run."""
    path = Path(run_dir) / "run_info.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no run_info.json (is it a pipeline.py run folder?)")
    seeds = read_json(path).get("seeds") or {}
    trained = {seeds.get(stage) for stage in SEEDED_STAGES if stage != "data"}
    if len(trained) != 1 or None in trained:
        raise ValueError(f"{path}: its stages ran with different seeds {seeds}; reproduce "
                         f"compares runs that each used one seed")
    return trained.pop(), seeds.get("data")


def fixed_data_of(data_seeds: Mapping[int, int | None]) -> bool:
    """Whether runs {seed: data seed} are a `--fixed-data` set: False when every run drew its
    rows with its own seed, True when they all share one data seed (a run whose seed is that
    data seed fits either); any other mix varies different things per run."""
    if all(data == seed for seed, data in data_seeds.items()):
        return False
    if len(set(data_seeds.values())) == 1:
        return True
    raise ValueError(f"data seeds {data_seeds} (run seed: data seed): some runs drew their rows "
                     f"with their own seed and some with a fixed one (--fixed-data), so their "
                     f"seeds do not vary the same things")


def _summary(scores: Mapping[int, Mapping[str, Any]], runs: Mapping[int, str],
             fixed_data: bool, seconds: float | None) -> dict:
    note = ("Each seed sets only the negatives, reward, MLE and PPO seeds (the same data "
            "rows in every run)." if fixed_data else
            "Each seed is the `seed` pipeline parameter: every stage's seed, the data's too, "
            "so each run also draws its own training and test rows.")
    return {**aggregate(scores), "runs": dict(runs), "seed_note": note,
            "fixed_data": fixed_data, "seconds": seconds}


def reproduce(run_one: Callable[[int], Path], seeds: Sequence[int], out_dir: str | Path, *,
              fixed_data: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run `run_one(seed)` (returns the run's folder) for each seed in turn; after each,
    aggregate every finished run into out_dir/reproduce.json and reproduce.md."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"reproduce needs distinct seeds, got {list(seeds)}")
    scores: dict[int, dict] = {}
    runs: dict[int, str] = {}
    started = time.perf_counter()
    result: dict[str, Any] = {}
    for seed in seeds:
        run_dir = run_one(seed)
        runs[seed] = str(run_dir)
        scores[seed] = read_scores(run_dir)
        result = _summary(scores, runs, fixed_data, round(time.perf_counter() - started, 1))
        paths = write(result, out_dir)
        log(f"reproduce: seed {seed} done ({run_dir}); {len(scores)} of {len(seeds)} "
            f"seeds in {paths['markdown']}")
    return result


def from_runs(run_dirs: Sequence[str | Path], out_dir: str | Path, *,
              log: Callable[[str], None] = print) -> dict:
    """The same summary from runs that already finished (run one after another, side by
    side, or on other machines): each run's seed from its run_info.json, its scores from
    scores.json. The runs must have distinct seeds and agree on `--fixed-data`
    (`fixed_data_of`)."""
    if not run_dirs:
        raise ValueError("reproduce --from-runs needs at least one run folder")
    scores: dict[int, dict] = {}
    runs: dict[int, str] = {}
    data_seeds: dict[int, int | None] = {}
    for run_dir in run_dirs:
        seed, data_seed = run_seed(run_dir)
        if seed in runs:
            raise ValueError(f"{run_dir} and {runs[seed]} both ran seed {seed}")
        runs[seed], scores[seed] = str(run_dir), read_scores(run_dir)
        data_seeds[seed] = data_seed
    fixed_data = fixed_data_of(data_seeds)
    order = sorted(scores)  # the tables list seeds in order, whatever order the runs came in
    result = _summary({k: scores[k] for k in order}, {k: runs[k] for k in order}, fixed_data,
                      None)
    paths = write(result, out_dir)
    log(f"reproduce: {len(scores)} runs (seeds {', '.join(map(str, order))}) in "
        f"{paths['markdown']}")
    return result
