"""The reward stage alone under the paper's Discussion options (issue 20 point 5).

The demo profile's filter_data, synthesize_negatives and train_reward stages - the same stage
functions the pipeline runs (`data.prepare`, `negatives.build_reward_dataset`,
`reward.train_reward_model`), nothing else - with configuration overrides, so options such as
`negatives.categories` (swap_entities) and `reward.level` (sequence) are measured by the
reward model's held-out accuracy per negative category without the MLE, PPO and generation
stages (a measurement, not a test: nothing is asserted):

    .venv/bin/python bench/reward_options.py --out runs/rm-token
    .venv/bin/python bench/reward_options.py --out runs/rm-swap \\
        --param negatives.categories=random_tokens,repaired,shuffled,repetitive,copy_input,swap_entities
    .venv/bin/python bench/reward_options.py --out runs/rm-sequence --param reward.level=sequence

`--param KEY=VALUE` takes what `pipeline.py --param` takes (dotted fields, pipeline
parameters) and goes through the same validation (`config.resolve`); `--data` is the task
data (default: the profile's, the bundled Debian descriptions). Prints and writes
OUT/result.json: per-category accuracy and mean reward on the held-out inputs, steps, the
final loss and seconds. `--smoke` runs the smoke profile (tiny random model) in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lastmile import config, data, negatives, reward  # noqa: E402
from lastmile.io import read_jsonl  # noqa: E402
from lastmile.modeling import load_tokenizer  # noqa: E402


def parse_params(pairs: list[str]) -> dict:
    """KEY=VALUE pairs as `pipeline.py --param` reads them (VALUE as JSON where it parses)."""
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--param expects KEY=VALUE, got {pair!r}")
        try:
            settings[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            settings[key.strip()] = value
    return settings


def run(profile: config.Profile, source: str | Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tokenizer = load_tokenizer(profile.base_model)
    prepared = data.prepare(source, out / "data", profile.data, tokenizer)
    neg = negatives.build_reward_dataset(out / "data" / "train.jsonl", out / "rm.jsonl",
                                         profile.negatives, tokenizer)
    before_reward = time.perf_counter()
    cfg = profile.reward
    cfg.checkpoint_every = 0
    summary = reward.train_reward_model(out / "rm.jsonl", out / "reward", cfg,
                                        profile.base_model,
                                        list(read_jsonl(out / "data" / "test.jsonl")))
    ended = time.perf_counter()
    log = [json.loads(x) for x in (out / "reward" / "train_log.jsonl").read_text().splitlines()]
    evaluation = summary["eval"]
    return {
        "profile": profile.name, "data": str(source),
        "rows": prepared["rows_out"],
        "categories": list(profile.negatives.categories), "level": cfg.level,
        "rm_rows": neg["rows_out"], "steps": summary["train"]["steps"],
        "last8_loss": sum(x["loss"] for x in log[-8:]) / len(log[-8:]),
        "accuracy": evaluation["accuracy"], "mean_reward": evaluation["mean_reward"],
        "held_out_inputs": evaluation["n"], "pairs": evaluation["pairs"],
        "identical_to_true": neg["identical_to_true"],
        "left_out_unchanged": neg.get("left_out_unchanged", {}),
        "reward_stage_seconds": round(ended - before_reward, 1),
        "eval_seconds": summary.get("eval_seconds"),
        "total_seconds": round(ended - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    # set here, not at import: tests import this file and their pipelines show bars
    os.environ.setdefault("LASTMILE_NO_PROGRESS", "1")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", help="task data (default: the profile's)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--smoke", action="store_true", help="the smoke profile, in seconds")
    args = p.parse_args(argv)
    profile = config.resolve("smoke" if args.smoke else "demo", parse_params(args.param))
    source = args.data or profile.data.source or data.DEFAULT_DATA
    result = run(profile, source, args.out)
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
