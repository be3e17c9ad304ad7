"""The paper's light post-processing of predictions (§4.3; the "cleaned" columns of Tables 1-2).

Exactly two rules, in this order:

1. "The text leading up to the first newline character was removed if the response contained
   a newline and started with 'Sure,'" - the chat model's "Sure, here is a summary:" line.
   "Started with" is read after leading whitespace (a response " Sure, ...\\n..." counts);
   the match is case-sensitive, as quoted. The first newline itself goes with the line.
2. "Throw away everything after the first newline": only the first line of what remains is
   kept. Blank (whitespace-only) lines before it are skipped first, so
   "Sure, here's a summary:\\n\\nThe text." becomes "The text." rather than an empty string;
   the paper's assumption is that the summary starts the response, not that it is empty.
   The kept line is stripped of surrounding whitespace.

Line breaks: "\\r\\n" and a lone "\\r" count as one newline (they are turned into "\\n"
before the rules), so Windows-style output is cleaned like any other. A response that is
nothing but a "Sure, ...:" line and a newline cleans to the empty string, as the rule says.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .io import read_jsonl, write_jsonl

SURE = "Sure,"


@dataclass(frozen=True)
class Cleaned:
    text: str
    sure_dropped: bool  # rule 1 removed a "Sure, ..." first line
    truncated: bool  # rule 2 removed non-blank text after the kept line


def clean_with_flags(text: str) -> Cleaned:
    """Apply both rules and say which of them removed something."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    rest = text.lstrip()
    sure_dropped = "\n" in rest and rest.startswith(SURE)
    if sure_dropped:
        rest = rest.split("\n", 1)[1]
    lines = rest.split("\n")
    first = next((i for i, line in enumerate(lines) if line.strip()), len(lines))
    kept = lines[first].strip() if first < len(lines) else ""
    truncated = any(line.strip() for line in lines[first + 1:])
    return Cleaned(kept, sure_dropped, truncated)


def clean(text: str) -> str:
    """A prediction after the paper's two rules (see the module docstring)."""
    return clean_with_flags(text).text


def postprocess_predictions(in_path: str | os.PathLike, out_path: str | os.PathLike,
                            variant_suffix: str = "_cleaned") -> dict:
    """Clean every prediction of a predictions.jsonl (id, input, reference, prediction,
    variant) into out_path; the variant becomes `<variant><variant_suffix>` (base ->
    base_cleaned) and the original text is kept as `raw_prediction`. Returns the summary."""
    if not variant_suffix:
        raise ValueError("variant_suffix must be non-empty, or the cleaned rows would be "
                         "scored as the original variant")
    rows, counts = [], {"changed": 0, "sure_dropped": 0, "truncated": 0}
    for lineno, row in enumerate(read_jsonl(in_path), start=1):
        where = f"{in_path}: row {lineno} (id={row.get('id')!r})"
        prediction, variant = row.get("prediction"), row.get("variant")
        if not isinstance(prediction, str):
            raise ValueError(f"{where}: field 'prediction' must be text, got {prediction!r}")
        if not isinstance(variant, str) or not variant:
            raise ValueError(f"{where}: field 'variant' must be a non-empty string, "
                             f"got {variant!r}")
        result = clean_with_flags(prediction)
        counts["changed"] += result.text != prediction
        counts["sure_dropped"] += result.sure_dropped
        counts["truncated"] += result.truncated
        rows.append({**row, "prediction": result.text, "raw_prediction": prediction,
                     "variant": variant + variant_suffix})
    if not rows:
        raise ValueError(f"{in_path}: no predictions to post-process")
    write_jsonl(Path(out_path), rows)
    variants = sorted({r["variant"] for r in rows})
    return {"stage": "postprocess", "rows": len(rows), **counts, "variants": variants}
