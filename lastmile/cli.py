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


# ----------------------------------------------------------------------------- main

SUBCOMMANDS: list[Callable] = [add_score_parser]


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
