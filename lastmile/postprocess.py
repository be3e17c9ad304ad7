"""The paper's light post-processing of predictions (§4.3; the "cleaned" columns of Tables 1-2).

Two rules, each applied where the paper applied it (PAPER_RULES):

1. Base model: "the text leading up to the first newline character was removed if the
   response contained a newline and started with 'Sure,'" - the chat model's "Sure, here is a
   summary:" line. "Started with" is read after leading whitespace (a response " Sure, ...\\n..."
   counts); the match is case-sensitive, as quoted. The first newline goes with the line; the
   rest of the response stays whole.
2. MLE model: "throw away everything after the first newline" - only the text before the first
   newline is kept, even when it is blank (the paper cut, nothing more).

Both rules (1 then 2) make `clean`, the clean-up `lastmile predict --postprocess` offers. The
kept text is stripped of surrounding whitespace. "\\r\\n" and a lone "\\r" count as one newline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .io import read_jsonl, write_jsonl

SURE = "Sure,"
RULES = ("sure", "first_line")
#: Which rule the paper applied to which model's outputs (§4.3).
PAPER_RULES = {"base": ("sure",), "mle": ("first_line",)}


@dataclass(frozen=True)
class Cleaned:
    text: str
    sure_dropped: bool  # rule 1 removed a "Sure, ..." first line
    truncated: bool  # rule 2 removed non-blank text after the first newline


def clean_with_flags(text: str, rules: tuple[str, ...] = RULES) -> Cleaned:
    """Apply `rules` (in the order of RULES) and say which of them removed something."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    sure_dropped = truncated = False
    if "sure" in rules:
        rest = text.lstrip()
        sure_dropped = "\n" in rest and rest.startswith(SURE)
        if sure_dropped:
            text = rest.split("\n", 1)[1]
    if "first_line" in rules:
        text, _, after = text.partition("\n")
        truncated = bool(after.strip())
    return Cleaned(text.strip(), sure_dropped, truncated)


def clean(text: str) -> str:
    """A prediction after both of the paper's rules (see the module docstring)."""
    return clean_with_flags(text).text


def rules_for(variant: str) -> tuple[str, ...]:
    """The paper's rules for a variant's outputs; both for any other variant."""
    return PAPER_RULES.get(variant, RULES)


def postprocess_predictions(in_path: str | os.PathLike, out_path: str | os.PathLike,
                            variant_suffix: str = "_cleaned") -> dict:
    """Clean every prediction of a predictions.jsonl (id, input, reference, prediction,
    variant) into out_path with its variant's rules (PAPER_RULES); the variant becomes
    `<variant><variant_suffix>` (base -> base_cleaned) and the original text is kept as
    `raw_prediction`. Returns the summary, with the rules applied per variant."""
    if not variant_suffix:
        raise ValueError("variant_suffix must be non-empty, or the cleaned rows would be "
                         "scored as the original variant")
    rows, counts, rules = [], {"changed": 0, "sure_dropped": 0, "truncated": 0}, {}
    for lineno, row in enumerate(read_jsonl(in_path), start=1):
        where = f"{in_path}: row {lineno} (id={row.get('id')!r})"
        prediction, variant = row.get("prediction"), row.get("variant")
        if not isinstance(prediction, str):
            raise ValueError(f"{where}: field 'prediction' must be text, got {prediction!r}")
        if not isinstance(variant, str) or not variant:
            raise ValueError(f"{where}: field 'variant' must be a non-empty string, "
                             f"got {variant!r}")
        rules[variant] = list(rules_for(variant))
        result = clean_with_flags(prediction, rules_for(variant))
        counts["changed"] += result.text != prediction
        counts["sure_dropped"] += result.sure_dropped
        counts["truncated"] += result.truncated
        rows.append({**row, "prediction": result.text, "raw_prediction": prediction,
                     "variant": variant + variant_suffix})
    if not rows:
        raise ValueError(f"{in_path}: no predictions to post-process")
    write_jsonl(Path(out_path), rows)
    variants = sorted({r["variant"] for r in rows})
    return {"stage": "postprocess", "rows": len(rows), **counts, "variants": variants,
            "rules": dict(sorted(rules.items()))}
