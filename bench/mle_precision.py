"""MLE in bf16 against float32 (issue 21 point 3): where precision is lost, what it costs.

Three measurements, each its own subcommand (a benchmark, not a test: nothing is asserted):

  quality  the demo profile's MLE stage (data/debian-descriptions, 280 train rows, one epoch
           at 1e-4, seed 0) at --precision, then greedy predictions for the 100 demo test rows
           at the demo's generation settings (bf16) and their scores (`lastmile.metrics`):
               .venv/bin/python bench/mle_precision.py quality --precision bfloat16 --out runs/p
           Prints the la-ROUGE-L F1 and writes OUT/result.json.
  errors   one demo batch on SmolLM2 through each precision path: per-token log-prob, loss
           and per-tensor LoRA gradient errors against float32 (cosine, relative error).
  speed    seconds per MLE step (forward + backward) on the demo's first batches, float32 and
           bf16 alternately in one process (median of --repeats).

`--smoke` runs each on the tiny random model in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LASTMILE_NO_PROGRESS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lastmile import config, mle  # noqa: E402
from lastmile.modeling import AdapterModel, autocast, load_base  # noqa: E402


def demo_rows(tokenizer, out: Path, smoke: bool) -> tuple[Path, Path]:
    """The demo profile's train/test rows (the filter_data stage), written under out/data."""
    from lastmile import data

    profile = config.get_profile("demo")
    if smoke:
        profile.data.max_train, profile.data.max_test = 14, 4
    data.prepare(data.DEFAULT_DATA, out / "data", profile.data, tokenizer)
    return out / "data" / "train.jsonl", out / "data" / "test.jsonl"


def quality(args: argparse.Namespace) -> dict:
    from lastmile.modeling import load_tokenizer

    profile = config.get_profile("smoke" if args.smoke else "demo")
    base = profile.base_model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_path, test_path = demo_rows(load_tokenizer(base), out, args.smoke)
    cfg = profile.mle
    cfg.precision = args.precision
    cfg.checkpoint_every = 0
    started = time.perf_counter()
    summary = mle.train_mle(train_path, out / "mle", cfg, base)
    trained = time.perf_counter() - started
    log = [json.loads(x) for x in (out / "mle" / "train_log.jsonl").read_text().splitlines()]
    result = {"precision": args.precision, "train_seconds": round(trained, 1),
              "steps": summary["train"]["steps"],
              "first8_loss": statistics.mean(x["loss"] for x in log[:8]),
              "last8_loss": statistics.mean(x["loss"] for x in log[-8:]),
              **predict_and_score(profile, test_path, out, args.generate_precision, args.smoke)}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def predict_and_score(profile, test_path: Path, out: Path, precision: str, smoke: bool,
                      tag: str = "") -> dict:
    """Greedy predictions of out/mle/adapter for the test rows, and their corpus scores."""
    from lastmile import generate, metrics

    gen = profile.generate
    gen.precision = precision
    preds = out / f"predictions{tag}.jsonl"
    generate.generate_predictions(test_path, preds, "mle", profile.base_model,
                                  str(out / "mle" / "adapter"), gen)
    scores = metrics.score_file(preds, out / f"scores{tag}.json",
                                config.ScoreConfig(semantic_similarity=not smoke))
    m = scores["models"]["mle"]
    return {"generate_precision": precision, "la_rougeL_f1": m.get("la_rougeL_f1"),
            "rougeL_f1": m.get("rougeL_f1"), "semantic_similarity": m.get("semantic_similarity"),
            "excess_length": m.get("excess_length")}


def rescore(args: argparse.Namespace) -> dict:
    """Generate and score again from OUT/mle/adapter of a `quality` run (the same decoding
    code for runs trained at different times)."""
    profile = config.get_profile("smoke" if args.smoke else "demo")
    out = Path(args.out)
    result = predict_and_score(profile, out / "data" / "test.jsonl", out,
                               args.generate_precision, args.smoke, tag="-rescored")
    (out / "result-rescored.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--precision", choices=list(config.PRECISIONS), required=True)
    q.add_argument("--generate-precision", default="bfloat16", choices=list(config.PRECISIONS))
    q.add_argument("--out", required=True)
    q.add_argument("--smoke", action="store_true")
    r = sub.add_parser("rescore")
    r.add_argument("--generate-precision", default="bfloat16", choices=list(config.PRECISIONS))
    r.add_argument("--out", required=True)
    r.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    result = {"quality": quality, "rescore": rescore}[args.cmd](args)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
