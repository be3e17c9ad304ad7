"""The `lastmile` command line: one argparse subcommand per task.

Each subcommand is a pair: `add_<name>_parser(subparsers)` declares its options and points
`func` at `cmd_<name>(args) -> int`. To add one, write the pair and list it in `SUBCOMMANDS`.
Bad input ends with exit code 2 and a one-line message, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

EXIT_BAD_INPUT = 2


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------- score

def add_score_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "score",
        help="score predictions (ROUGE, la-ROUGE, extra length, BLEURT, semantic similarity)",
        description=(
            "Score a JSON Lines file of predictions: each line an object with string fields "
            "'prediction' and 'reference' and optionally 'variant' (default: 'default'). "
            "Prints the paper's Tables 1 and 2 as Markdown and writes the scores as JSON."),
    )
    p.add_argument("--input", required=True, metavar="FILE.jsonl",
                   help="predictions, one JSON object per line (.jsonl or .jsonl.gz)")
    p.add_argument("--out", default="scores.json", metavar="FILE.json",
                   help="where to write the scores (default: scores.json in the current directory)")
    p.add_argument("--bleurt", default=None, metavar="CHECKPOINT",
                   help="BLEURT checkpoint, a local directory or a hub id (e.g. "
                        "lucadiliello/bleurt-base-128); without it BLEURT is not computed")
    p.add_argument("--no-semantic", action="store_true",
                   help="skip the all-MiniLM-L6-v2 semantic similarity")
    p.set_defaults(func=cmd_score)


def cmd_score(args: argparse.Namespace) -> int:
    from .bleurt_compat import BleurtLoadError
    from .config import ScoreConfig
    from .metrics import markdown_tables, score_file

    cfg = ScoreConfig(bleurt_checkpoint=args.bleurt, semantic_similarity=not args.no_semantic)
    try:
        scores = score_file(args.input, args.out, cfg)
    except (ValueError, OSError, BleurtLoadError) as e:
        raise CommandError(str(e)) from e
    print(markdown_tables(scores), end="")
    print(f"\nscores written to {args.out}")
    return 0


# ----------------------------------------------------------------------------- export

def add_export_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a run's trained model: PEFT adapter, optionally merged, with a model card",
        description=(
            "Export the RL (or MLE) adapter of a finished run as a standard PEFT directory "
            "(adapter_config.json, adapter_model.safetensors), with --merged as a plain "
            "Hugging Face model with the LoRA merged into the base, plus the tokenizer, "
            "lastmile.json (prompt and decoding settings for `lastmile predict`) and a model "
            "card README.md."),
    )
    p.add_argument("run", metavar="RUN",
                   help="a run directory (runs/<timestamp>, runs/latest) or a published run "
                        "s3://bucket/prefix/<run name>/")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="a new (or empty) directory to write the export to")
    p.add_argument("--variant", choices=("rl", "mle"), default="rl",
                   help="which adapter: rl (PPO, default) or mle (the baseline)")
    p.add_argument("--merged", action="store_true",
                   help="merge the LoRA into the base and write the whole model (not for a "
                        "GPTQ-quantized base); the adapter then goes to DIR/adapter/")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    try:
        settings = export_run(args.run, args.out, variant=args.variant, merged=args.merged)
    except (ValueError, OSError, _storage_error()) as e:  # data, weights, export: ValueError
        raise CommandError(str(e)) from e
    kind = "merged model" if settings["merged"] else "PEFT adapter"
    print(f"exported the {settings['variant']} {kind} of {args.run} to {args.out}")
    print(f"next: lastmile predict {args.out} --input FILE --out predictions.jsonl")
    return 0


def _storage_error() -> type:
    """lastmile.storage's error type, imported only when a command may reach a store."""
    from .storage import StorageError

    return StorageError


# ----------------------------------------------------------------------------- predict

def add_predict_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="run a trained model on new inputs, as the pipeline's generate stage does",
        description=(
            "Predict with an exported model (lastmile export) or a run's RL adapter: the "
            "run's instruction and chat-template prompt, greedy decoding, batched as the "
            "pipeline batches. Writes JSON Lines {id, input, prediction}."),
    )
    p.add_argument("model", metavar="MODEL",
                   help="an export directory, a run directory (runs/latest) or s3:// run")
    p.add_argument("--input", required=True, metavar="FILE",
                   help="inputs: .jsonl, .jsonl.gz, .json, .csv or .parquet (an 'id' column is "
                        "copied to the output; otherwise rows are numbered from 1)")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="where to write")
    p.add_argument("--input-column", default="input", metavar="C",
                   help="the column holding the text (default: input)")
    p.add_argument("--postprocess", action="store_true",
                   help="apply the paper's clean-up (drop a 'Sure, ...' first line, keep the "
                        "first line); the raw text is kept as raw_prediction")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="rows per batch (default: the run's generation batch size)")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="longest prediction in tokens (default: the run's, 100 in the paper)")
    p.add_argument("--precision", choices=("float32", "bfloat16"), default=None,
                   help="decoding precision (default: the run's generation precision)")
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict_file

    try:
        summary = predict_file(args.model, args.input, args.out, input_column=args.input_column,
                               postprocess=args.postprocess, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens, precision=args.precision)
    except (ValueError, OSError, _storage_error()) as e:
        raise CommandError(str(e)) from e
    print(f"{summary['rows']} predictions written to {args.out} ({summary['seconds']} s, "
          f"model loaded in {summary['load_seconds']} s)")
    return 0


# ----------------------------------------------------------------------------- main

SUBCOMMANDS: list[Callable] = [add_score_parser, add_export_parser, add_predict_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lastmile",
        description="Last-mile fine-tuning with RL and no human feedback (arXiv 2408.16753).")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CommandError as e:
        message = " ".join(str(e).split())  # one line, whatever the cause wrote
        print(f"lastmile {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
