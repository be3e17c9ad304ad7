"""The run report: what a person reads after a run (issue 4, "The report").

One document, built once as a list of blocks and rendered twice:
  * report.md   - Markdown; the plots are referenced as PNG files beside it;
  * report.html - self-contained: inline CSS, the plots as base64 PNG data URIs, so the
                  Kubeflow UI's HTML viewer (which shows one file) shows them too.
Sections, in order: the instruction the models were given; headline (RL against MLE with
confidence intervals: a winner only where the interval excludes 0); the paper's Table 1
(extra length) and Table 2 (metrics) with each row's best value marked, and the intervals,
from `metrics.score_tables` / `metrics.interval_tables` so the tables live in one place (the
`lastmile score` CLI prints the same); reward-model accuracy per negative category (paper
§3.2); PPO curves (§3.3; the panels that are 0 by construction for the run's configuration
left out); output lengths against the references; example outputs side by side; stage
timings; reproducibility. Variants, metrics and negative categories are named in words
(`metrics.variant_name`, `metric_name`, `category_name`), the same everywhere.

Predictions are arbitrary model output, so every piece of run text is escaped for the format
it lands in (`html.escape` for HTML; entities and backslashes for Markdown).

`build_report_from_dir(run_dir, out_dir)` reads these conventional names in run_dir:
  scores.json                  required: `metrics.score_file` output
  predictions/<variant>.jsonl  or  predictions*.jsonl (one combined file, or
                               predictions_<variant>.jsonl): rows id, input, reference,
                               prediction, variant; a row without "variant" takes it from
                               the file name
  rm_eval.json                 optional: `reward.summarize_scores` output
  ppo_log.jsonl                optional: one row per PPO update
  summaries/<stage>.json       optional: one `runinfo` summary per stage
  run_info.json                optional: run-wide facts (profile, base_model, seed(s),
                               versions, hashes)
  config.json                  optional: the run's whole configuration (config.Profile as a
                               dict): the instruction, PPO's epochs and minibatches
(.jsonl.gz works wherever .jsonl does.) `build_report_from_stages` gathers a pipeline run's
stage folders into that layout inside out_dir and builds from there, so every report folder
can be rebuilt by `build_report_from_dir(folder, folder)`.
"""

from __future__ import annotations

import base64
import html
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .io import atomic_path, read_json, read_jsonl, write_json, write_jsonl
from .metrics import (
    PAIRED_BOOTSTRAP,
    VARIANT_ORDER,
    ScoreTable,
    category_name,
    interval_tables,
    interval_text,
    metric_name,
    score_tables,
    variant_name,
    verdict,
    word_count,
)

#: One colour per variant in every plot; a cleaned variant is the light shade of its source.
VARIANT_COLOURS = {"base": "#1f77b4", "base_cleaned": "#9ec5e8", "mle": "#ff7f0e",
                   "mle_cleaned": "#ffbb78", "rl": "#2ca02c"}
EXTRA_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
REFERENCE_COLOUR = "#444444"
DPI = 110

PLOT_FILES = {"ppo_curves": "ppo_curves.png", "length_hist": "length_hist.png",
              "rm_accuracy": "rm_accuracy.png"}
#: The pipeline's stages in DAG order (components/stages.py); others follow by name.
STAGE_ORDER = ("filter_data", "negatives", "train_reward", "train_mle", "train_ppo",
               "generate_base", "generate_mle", "generate_rl", "postprocess_base",
               "postprocess_mle", "score", "report")
#: (key, panel title, y label) in plotting order; only keys present in the log are drawn.
PPO_PANELS = (
    ("reward_mean", "Reward", "mean reward"),
    ("response_length_mean", "Response length", "tokens"),
    ("excess_length_mean", "Excess length vs reference", "words"),
    ("response_words_mean", "Response length", "words"),
    ("policy_loss", "Policy loss", "loss"),
    ("value_loss", "Value loss", "loss"),
    ("value_explained_variance", "Value head: explained variance", "1 - Var(G-V)/Var(G)"),
    ("approx_kl", "Approx. KL", "KL"),
    ("clip_fraction", "Clip fraction", "fraction"),
)
BATCH_KIND_STYLE = {  # sampled = the policy's own outputs; reference = true outputs (§3.3)
    "sampled": dict(color=VARIANT_COLOURS["rl"], linestyle="-", marker="o", label="sampled"),
    "reference": dict(color=REFERENCE_COLOUR, linestyle="--", marker="s", label="reference"),
}
N_EXAMPLES = 5
INPUT_WORDS = 60  # the input is truncated in the examples; outputs up to OUTPUT_WORDS
OUTPUT_WORDS = 150


class ReportInputError(ValueError):
    """An input the report cannot use; the message names the file, row or argument."""


# ----------------------------------------------------------------------------- blocks

@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str
    muted: bool = False


@dataclass
class Bullets:
    items: list[str]
    css: str = ""


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""
    text_cols: tuple[int, ...] = ()  # free text: wrapped, never right-aligned
    best: frozenset[tuple[int, int]] = frozenset()  # (row, column) cells shown in bold


@dataclass
class Image:
    path: Path  # a PNG in out_dir
    alt: str


Block = Heading | Para | Bullets | Table | Image


# ----------------------------------------------------------------------------- rendering

_NUMBER = re.compile(r"[+-]?(\d[\d,]*(\.\d*)?|\.\d+)([eE][+-]?\d+)?%?|n/a|-|")


def _numeric_cols(table: Table) -> set[int]:
    """Columns whose body cells are all numbers (or n/a / blank): right-aligned."""
    cols = set()
    for j in range(len(table.header)):
        if j in table.text_cols:
            continue
        cells = [r[j] for r in table.rows if j < len(r)]
        if any(c not in ("", "n/a", "-") for c in cells) and all(
                _NUMBER.fullmatch(c) for c in cells):
            cols.add(j)
    return cols


def _md_escape(text: str) -> str:
    """Literal text in Markdown: no raw HTML, no emphasis or links, no table breaks."""
    text = html.escape(str(text), quote=False)
    text = re.sub(r"([\\`*_\[\]|])", r"\\\1", text)
    return text.replace("\r\n", "\n").replace("\n", "<br>")


def render_markdown(title: str, blocks: Sequence[Block]) -> str:
    out = [f"# {_md_escape(title)}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + _md_escape(b.text), ""]
        elif isinstance(b, Para):
            out += [f"*{_md_escape(b.text)}*" if b.muted else _md_escape(b.text), ""]
        elif isinstance(b, Bullets):
            out += [f"- {_md_escape(item)}" for item in b.items] + [""]
        elif isinstance(b, Table):
            if b.caption:
                out += [f"**{_md_escape(b.caption)}**", ""]
            num = _numeric_cols(b)
            out.append("| " + " | ".join(_md_escape(h) for h in b.header) + " |")
            out.append("|" + "".join("---:|" if j in num else "---|"
                                     for j in range(len(b.header))))
            out += ["| " + " | ".join(f"**{_md_escape(c)}**" if (i, j) in b.best
                                      else _md_escape(c) for j, c in enumerate(r)) + " |"
                    for i, r in enumerate(b.rows)]
            out.append("")
        elif isinstance(b, Image):
            out += [f"![{_md_escape(b.alt)}]({b.path.name})", ""]
    return "\n".join(out).rstrip() + "\n"


CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 color:#222;background:#fff;max-width:1160px;margin:1.5rem auto;padding:0 1rem}
h1{font-size:1.6rem;margin:0 0 .3rem}
h2{font-size:1.2rem;margin:2rem 0 .6rem;padding-bottom:.2rem;border-bottom:1px solid #ddd}
nav{font-size:.9rem;color:#555;margin-bottom:1rem} nav a{color:#1f5fa8;margin-right:.8rem}
table{border-collapse:collapse;margin:.4rem 0 1.2rem;font-size:.9rem}
caption{caption-side:top;text-align:left;font-weight:600;padding:.2rem 0}
td.best{font-weight:700;background:#eaf4ea}
th,td{padding:.25rem .65rem;border-bottom:1px solid #e4e4e4;text-align:left;vertical-align:top}
thead th{background:#f4f5f7;border-bottom:2px solid #ccc}
tbody th{font-weight:500;white-space:nowrap}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.text{white-space:pre-wrap;max-width:70ch}
tr.total td,tr.total th{font-weight:600;border-top:2px solid #ccc}
ul.headline{background:#f2f8f2;border-left:4px solid #2ca02c;padding:.6rem 1rem .6rem 2rem}
.muted{color:#666;font-size:.9rem}
figure{margin:.5rem 0 1.2rem} img{max-width:100%;height:auto}
"""


def _html_table(b: Table) -> str:
    num = _numeric_cols(b)

    def cls(j: int, best: bool = False) -> str:
        names = (["num"] if j in num else ["text"] if j in b.text_cols else []) + (
            ["best"] if best else [])
        return f' class="{" ".join(names)}"' if names else ""

    e = html.escape
    parts = ["<table>"]
    if b.caption:
        parts.append(f"<caption>{e(b.caption)}</caption>")
    parts.append("<thead><tr>" + "".join(f"<th{cls(j)}>{e(h)}</th>"
                                         for j, h in enumerate(b.header)) + "</tr></thead>")
    parts.append("<tbody>")
    for i, r in enumerate(b.rows):
        total = ' class="total"' if r and r[0] == "total" else ""
        cells = [f'<th scope="row">{e(r[0])}</th>'] + [
            f"<td{cls(j, True)}><strong>{e(c)}</strong></td>" if (i, j) in b.best
            else f"<td{cls(j)}>{e(c)}</td>" for j, c in enumerate(r) if j > 0]
        parts.append(f"<tr{total}>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    return "\n".join(parts)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def render_html(title: str, blocks: Sequence[Block]) -> str:
    e = html.escape
    nav = " ".join(f'<a href="#{_anchor(b.text)}">{e(b.text)}</a>'
                   for b in blocks if isinstance(b, Heading) and b.level == 2)
    body = [f"<h1>{e(title)}</h1>", f"<nav>{nav}</nav>"]
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f'<h{b.level} id="{_anchor(b.text)}">{e(b.text)}</h{b.level}>')
        elif isinstance(b, Para):
            body.append(f'<p class="muted">{e(b.text)}</p>' if b.muted else f"<p>{e(b.text)}</p>")
        elif isinstance(b, Bullets):
            css = f' class="{e(b.css)}"' if b.css else ""
            body.append(f"<ul{css}>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            body.append(_html_table(b))
        elif isinstance(b, Image):
            body.append(f'<figure><img alt="{e(b.alt)}" src="{_data_uri(b.path)}"></figure>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{e(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# ----------------------------------------------------------------------------- input checks

def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_scores(scores: Any, source: str = "scores") -> dict:
    if not isinstance(scores, dict) or not isinstance(scores.get("models"), dict):
        raise ReportInputError(f"{source}: expected an object with a 'models' object "
                               "(metrics.score_file output)")
    if not scores["models"]:
        raise ReportInputError(f"{source}: 'models' is empty")
    for variant, values in scores["models"].items():
        if not isinstance(values, dict):
            raise ReportInputError(f"{source}: models[{variant!r}] is not an object")
        for key in ("n", "excess_length"):
            if key not in values:
                raise ReportInputError(f"{source}: models[{variant!r}] lacks {key!r}")
    return scores


def check_predictions(rows_by_variant: Mapping[str, Iterable[dict]] | None,
                      source: str = "predictions") -> dict[str, list[dict]]:
    """{variant: [row]} with string input/reference/prediction (input may be absent)."""
    checked: dict[str, list[dict]] = {}
    for variant, rows in (rows_by_variant or {}).items():
        rows = list(rows)
        for i, row in enumerate(rows, start=1):
            where = f"{source}[{variant!r}] row {i}"
            if not isinstance(row, dict):
                raise ReportInputError(f"{where}: expected an object, got {type(row).__name__}")
            for key in ("reference", "prediction"):
                if not isinstance(row.get(key), str):
                    raise ReportInputError(f"{where}: field {key!r} must be a string")
            if row.get("input") is not None and not isinstance(row["input"], str):
                raise ReportInputError(f"{where}: field 'input' must be a string")
        if rows:
            checked[variant] = rows
    return checked


def check_rm_eval(rm_eval: Any, source: str = "rm_eval") -> dict:
    if not isinstance(rm_eval, dict) or not isinstance(rm_eval.get("accuracy"), dict):
        raise ReportInputError(f"{source}: expected an object with an 'accuracy' object")
    for part in ("accuracy", "mean_reward", "pairs"):
        for category, value in (rm_eval.get(part) or {}).items():
            if not _is_number(value):
                raise ReportInputError(f"{source}: {part}[{category!r}] = {value!r} "
                                       "is not a finite number")
    return rm_eval


def check_ppo_log(rows: Iterable[dict], source: str = "ppo_log") -> list[dict]:
    """Rows as given; any plotted key must be a number or null (missing keys are fine)."""
    rows = list(rows)
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ReportInputError(f"{source} row {i}: expected an object")
        for key in ("update", *(p[0] for p in PPO_PANELS)):
            value = row.get(key)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, (int, float))):
                raise ReportInputError(f"{source} row {i}: {key!r} = {value!r} is not a number")
    return rows


# ----------------------------------------------------------------------------- numbers

def _colour(variant: str, others: list[str]) -> str:
    if variant in VARIANT_COLOURS:
        return VARIANT_COLOURS[variant]
    return EXTRA_COLOURS[others.index(variant) % len(EXTRA_COLOURS)]


def ordered_variants(names: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    return [v for v in VARIANT_ORDER if v in names] + [v for v in names if v not in VARIANT_ORDER]


def _value(models: dict, variant: str, key: str) -> float | None:
    v = models.get(variant, {}).get(key)
    return float(v) if _is_number(v) else None


def _best(models: dict, key: str) -> list[tuple[str, float]]:
    """(variant, value) with a value, best first; ties keep the table's variant order."""
    present = [(v, _value(models, v, key)) for v in ordered_variants(models)]
    return sorted([(v, x) for v, x in present if x is not None], key=lambda t: -t[1])


#: The metrics the headline speaks of (the bootstrap covers these and more).
HEADLINE_KEYS = ("la_rougeL_f1", "semantic_similarity", "bleurt")


def _comparison(scores: dict, a: str, b: str) -> dict | None:
    for c in ((scores.get(PAIRED_BOOTSTRAP) or {}).get("comparisons") or {}).values():
        if c.get("a") == a and c.get("b") == b:
            return c
    return None


def _versus(scores: dict, a: str, b: str) -> str:
    """"RL vs MLE: <metric> 0.232 vs 0.201: RL better (95% CI of the difference +0.010 to
    +0.052); ..." from the bootstrap, or the bare means when scores.json has no interval."""
    models = scores["models"]
    title = f"{variant_name(a)} vs {variant_name(b)}"
    if a not in models or b not in models:
        return f"{title}: not both present in the scores."
    comparison = _comparison(scores, a, b)
    found = (comparison or {}).get("metrics") or {}
    parts = []
    for key in ("excess_length", *HEADLINE_KEYS):
        entry = found.get(key)
        x, y = (entry["a"], entry["b"]) if entry else (_value(models, a, key),
                                                       _value(models, b, key))
        if x is None or y is None:
            if key != "bleurt":  # BLEURT is optional; its absence is named once below
                parts.append(f"{metric_name(key)} n/a")
            continue
        spec = "+.1f" if key == "excess_length" else ".3f"
        text = f"{metric_name(key)} {x:{spec}} vs {y:{spec}}"
        parts.append(f"{text}: {verdict(key, entry, a, b)} (95% CI of the difference "
                     f"{interval_text(key, entry)})" if entry else f"{text} (no interval)")
    if comparison is None:
        tail = " No confidence intervals in these scores (scored before they were added)."
    elif "metrics" not in comparison:
        tail = f" No confidence intervals: {comparison.get('skipped')}."
    else:
        tail = ""
    return f"{title}: " + "; ".join(parts) + "." + tail


def headline(scores: dict, absent: list[str]) -> list[str]:
    """The few sentences a reader needs first: RL against MLE as generated and as
    post-processed, with a winner only where the confidence interval excludes 0; the best
    variant per headline metric; and the lengths."""
    models = scores["models"]
    lines = [_versus(scores, "rl", "mle")]
    if "mle_cleaned" in models:
        lines.append(_versus(scores, "rl", "mle_cleaned"))
    for key in HEADLINE_KEYS[:2]:
        label = metric_name(key)
        ranked = _best(models, key)
        if not ranked:
            lines.append(f"{label}: not computed for any variant.")
            continue
        rest = [(v, x) for v, x in ranked if x != ranked[0][1]]
        if not rest and len(ranked) > 1:
            lines.append(f"{label}: all {len(ranked)} variants alike ({ranked[0][1]:.3f}).")
            continue
        # Names may hold commas ("MLE, post-processed"): ties are joined by semicolons.
        top = "; ".join(variant_name(v) for v, x in ranked if x == ranked[0][1])
        line = f"Highest {label}: {top} ({ranked[0][1]:.3f})"
        if rest:
            line += f"; next {variant_name(rest[0][0])} ({rest[0][1]:.3f})"
        lines.append(line + ".")
    lengths = [f"{variant_name(v)} {_value(models, v, 'excess_length'):+.1f}"
               for v in ("rl", "base", "mle") if _value(models, v, "excess_length") is not None]
    if lengths:
        lines.append("Mean extra length, words beyond the reference (0 = reference length): "
                     + ", ".join(lengths) + ".")
    if absent:
        lines.append("Absent from this run: " + "; ".join(absent) + ".")
    return lines


def _pct(share: float) -> str:
    """87.5%, but 100% rather than 100.0%: one decimal only where it carries information."""
    return f"{share:.0%}" if round(share * 100, 1) == round(share * 100) else f"{share:.1%}"


def _fmt_rows(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return " · ".join(f"{k} {_fmt_rows(v)}" for k, v in value.items())
    return str(value)


def _rows_processed(s: Mapping[str, Any]) -> int | None:
    """The rows a stage worked through: rows in, else a generation's or training's rows."""
    for key in ("rows_in", "n", "rows", "examples"):
        if isinstance(s.get(key), int) and not isinstance(s.get(key), bool) and s[key] > 0:
            return s[key]
    return None


def _tasks(s: Mapping[str, Any]) -> str:
    """" ×3" for a stage that ran as 3 shards or 3 training processes, else ""."""
    n = max(int(s.get("shards") or 1), int(s.get("processes") or 1))
    return f" ×{n}" if n > 1 else ""


def timing_table(summaries: Mapping[str, dict]) -> Table:
    """stage, seconds, seconds per row, rows in/out, and the summed total (see
    `_timing_section`). Rows in falls back to a training stage's "rows", rows out to a
    generation stage's "n"."""
    rows, total = [], 0.0
    for stage, s in summaries.items():
        seconds = s.get("seconds")
        processed = _rows_processed(s)
        per_row = ""
        if _is_number(seconds):
            total += seconds
            per_row = f"{seconds / processed:.3g}" if processed else ""
        rows.append([stage + _tasks(s), f"{seconds:.1f}" if _is_number(seconds) else "",
                     per_row, _fmt_rows(s.get("rows_in", s.get("rows"))),
                     _fmt_rows(s.get("rows_out", s.get("n")))])
    rows.append(["total", f"{total:.1f}", "", "", ""])
    return Table(["stage", "seconds", "s / row", "rows in", "rows out"], rows)


def _distinct(summaries: Mapping[str, dict], key: str) -> str:
    """One value, or "v1 (stage a, stage b); v2 (stage c)" when stages disagree."""
    by_value: dict[str, list[str]] = {}
    for stage, s in summaries.items():
        if s.get(key) is not None:
            by_value.setdefault(str(s[key]), []).append(stage)
    if len(by_value) <= 1:
        return next(iter(by_value), "")
    return "; ".join(f"{v} ({', '.join(stages)})" for v, stages in by_value.items())


#: Run-wide facts shown first, from run_info or else from the stage summaries.
REPRO_KEYS = {"profile": "profile", "base_model": "base model",
              "base_model_hash": "base-model hash", "data_sha256": "data sha256",
              "source_sha256": "source data sha256"}


def _fact(run_info: Mapping[str, Any], summaries: Mapping[str, dict], key: str) -> str:
    return str(run_info[key]) if run_info.get(key) is not None else _distinct(summaries, key)


def _seeds(run_info: Mapping[str, Any], summaries: Mapping[str, dict]) -> list[str] | None:
    seeds = run_info.get("seeds", run_info.get("seed"))
    if seeds is None:
        seeds = {k: s["seed"] for k, s in summaries.items() if s.get("seed") is not None}
        if len(set(seeds.values())) == 1:
            return ["seed", f"{next(iter(seeds.values()))} (every seeded stage)"]
    if isinstance(seeds, dict):
        return ["seeds", ", ".join(f"{k} {v}" for k, v in seeds.items())] if seeds else None
    return ["seed", str(seeds)]


def _versions(run_info: Mapping[str, Any], summaries: Mapping[str, dict]) -> list[list[str]]:
    """package, version; where stages ran different versions, each with its stages."""
    sources = ({"run": run_info["versions"]} if run_info.get("versions")
               else {stage: s.get("versions") or {} for stage, s in summaries.items()})
    found: dict[str, dict[str, list[str]]] = {}  # package -> version -> stages
    for stage, versions in sources.items():
        for package, version in versions.items():
            found.setdefault(package, {}).setdefault(str(version), []).append(stage)
    return [[package, next(iter(vs)) if len(vs) == 1 else
             "; ".join(f"{v} ({', '.join(stages)})" for v, stages in vs.items())]
            for package, vs in found.items()]


#: Per-stage {file: sha256} maps (lastmile.runinfo): what each stage read, and wrote.
DATA_HASH_KEYS = {"input_sha256": "read", "output_sha256": "wrote"}


def _data_hash_rows(summaries: Mapping[str, dict]) -> tuple[list[list[str]], list[str]]:
    """One row per distinct file content: file name(s), sha256 (16 hex), the stages that
    wrote/read it. Also the names seen with more than one content (a mismatch to look at)."""
    by_digest: dict[str, tuple[list[str], list[str]]] = {}
    digests_of: dict[str, set[str]] = {}
    for stage, s in summaries.items():
        for key, role in DATA_HASH_KEYS.items():
            files = s.get(key)
            if not isinstance(files, Mapping):
                continue
            for name, digest in files.items():
                names, stages = by_digest.setdefault(str(digest), ([], []))
                if str(name) not in names:
                    names.append(str(name))
                stages.append(f"{stage} ({role})")
                digests_of.setdefault(str(name), set()).add(str(digest))
    rows = [[", ".join(names), digest[:16], ", ".join(stages)]
            for digest, (names, stages) in by_digest.items()]
    return rows, sorted(n for n, d in digests_of.items() if len(d) > 1)


def reproducibility_blocks(run_info: Mapping[str, Any], summaries: Mapping[str, dict]
                           ) -> list[Block]:
    """Seeds, versions, base-model and data hashes: what a rerun must match."""
    hash_keys = sorted(k for k in {*run_info, *(k for s in summaries.values() for k in s)}
                       if k.endswith(("_sha256", "_hash")) and k not in REPRO_KEYS
                       and k not in DATA_HASH_KEYS)
    facts = [[REPRO_KEYS.get(k, k), _fact(run_info, summaries, k)]
             for k in [*REPRO_KEYS, *hash_keys]]
    facts = [f for f in facts if f[1]]
    seeds = _seeds(run_info, summaries)
    if seeds:
        facts.append(seeds)
    facts += [[k, str(v)] for k, v in run_info.items()
              if k not in REPRO_KEYS and k not in hash_keys and k not in ("seed", "seeds")
              and isinstance(v, (str, int, float)) and not isinstance(v, bool)]
    versions = _versions(run_info, summaries)
    data_rows, mismatched = _data_hash_rows(summaries)
    blocks: list[Block] = []
    if facts:
        blocks.append(Table(["", "value"], facts, text_cols=(1,)))
    if data_rows:
        blocks.append(Table(["data file", "sha256", "stages"], data_rows,
                            caption="Data files by content: a file every stage saw alike "
                                    "is one row", text_cols=(0, 2)))
    if mismatched:
        blocks.append(Para("Stages saw different contents under the same name: "
                           + ", ".join(mismatched)))
    if versions:
        blocks.append(Table(["package", "version"], versions, text_cols=(1,)))
    if not blocks:
        blocks.append(Para("No seeds, versions or hashes were recorded (no run info, "
                           "no stage summaries).", muted=True))
    return blocks


# ----------------------------------------------------------------------------- plots

def _figure(nrows: int, ncols: int, width: float, height: float):
    """A figure on the Agg canvas directly: no pyplot, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(alpha=0.3, linewidth=0.6)
        ax.tick_params(labelsize=8)
    return fig, axes


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    return path


def _rolling_mean(ys: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def ppo_panels(rows: list[dict], skip: Iterable[str] = ()) -> list[tuple[str, str, str]]:
    """The PPO_PANELS to draw: those with a number in the log, less the keys in `skip` (0 by
    construction for the run's configuration: `zero_by_construction`)."""
    skip = set(skip)
    panels = [p for p in PPO_PANELS
              if p[0] not in skip and any(_is_number(r.get(p[0])) for r in rows)]
    # Show words only when tokens are absent: one response-length panel is enough.
    if any(p[0] == "response_length_mean" for p in panels):
        panels = [p for p in panels if p[0] != "response_words_mean"]
    return panels


def plot_ppo(rows: list[dict], path: Path, skip: Iterable[str] = ()) -> Path | None:
    """One panel per logged quantity (`ppo_panels`) against the update number; sampled and
    reference batches as separate lines (§3.3 mixes true outputs into half of the batches)."""
    panels = ppo_panels(rows, skip)
    if not panels:
        return None
    ncols = 2 if len(panels) == 4 else min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _figure(nrows, ncols, 3.4 * ncols, 2.6 * nrows + 0.4)
    kinds = list(dict.fromkeys(r.get("batch_kind") for r in rows))
    for ax, (key, title, ylabel) in zip(axes.flat, panels):
        for kind in kinds:
            pts = [(r.get("update", i), r[key]) for i, r in enumerate(rows)
                   if r.get("batch_kind") == kind and _is_number(r.get(key))]
            if not pts:
                continue
            xs, ys = zip(*sorted(pts))
            style = dict(BATCH_KIND_STYLE.get(kind, dict(color=EXTRA_COLOURS[0], linestyle="-",
                                                         marker="o", label=str(kind or "all"))))
            label = style.pop("label") if kind is not None else "all batches"
            if len(xs) > 40:  # many updates: faint raw line, bold rolling mean
                ax.plot(xs, ys, color=style["color"], alpha=0.25, linewidth=0.8)
                ax.plot(xs, _rolling_mean(list(ys), max(2, len(xs) // 10)), color=style["color"],
                        linestyle=style["linestyle"], linewidth=1.6, label=label)
            else:
                ax.plot(xs, ys, markersize=3.5, linewidth=1.3, label=label, **style)
        if key == "excess_length_mean":
            ax.axhline(0, color="#999999", linewidth=0.8, zorder=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("update", fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if len(labels) > 1:
        fig.legend(handles, labels, loc="outside upper right", fontsize=8, ncols=len(labels),
                   frameon=False, title="batch", title_fontsize=8)
    fig.suptitle("PPO training, per update", fontsize=11, x=0.01, ha="left")
    return _save(fig, path)


def plot_lengths(preds: dict[str, list[dict]], path: Path) -> Path:
    """Per variant: histogram of prediction lengths (words) over the references' outline."""
    import numpy as np

    variants = ordered_variants(preds)
    others = [v for v in variants if v not in VARIANT_COLOURS]
    lengths = {v: (np.array([word_count(r["prediction"]) for r in preds[v]]),
                   np.array([word_count(r["reference"]) for r in preds[v]])) for v in variants}
    everything = np.concatenate([np.concatenate(p) for p in lengths.values()])
    top = max(1, int(np.percentile(everything, 99)))  # a few runaway outputs go in the last bin
    edges = (np.arange(0, top + 2) - 0.5 if top <= 40
             else np.linspace(0, top + 1, 41))
    ncols = min(3, len(variants))
    nrows = math.ceil(len(variants) / ncols)
    fig, axes = _figure(nrows, ncols, 3.3 * ncols, 2.4 * nrows + 0.5)
    for ax, v in zip(axes.flat, variants):
        pred_len, ref_len = lengths[v]
        ax.hist(np.clip(pred_len, 0, top), bins=edges, color=_colour(v, others), alpha=0.8,
                label="prediction")
        ax.hist(np.clip(ref_len, 0, top), bins=edges, histtype="step", color=REFERENCE_COLOUR,
                linewidth=1.3, label="reference")
        ax.set_title(f"{variant_name(v)}: {pred_len.mean():.1f} vs {ref_len.mean():.1f} words",
                     fontsize=9.5)
        ax.set_xlabel(f"words (last bin: ≥{top})", fontsize=8.5)
        ax.set_ylabel("outputs", fontsize=8.5)
    for ax in list(axes.flat)[len(variants):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper right", fontsize=8, ncols=2, frameon=False)
    fig.suptitle("Output length: predictions (filled) vs references (outline)", fontsize=11,
                 x=0.01, ha="left")
    return _save(fig, path)


def plot_rm(rm_eval: dict, path: Path) -> Path:
    """Accuracy per negative category (true output scored above the negative), and the mean
    reward of each category beside that of the true outputs."""
    from matplotlib.ticker import PercentFormatter

    accuracy = rm_eval["accuracy"]
    means = rm_eval.get("mean_reward") or {}
    cats = list(accuracy)
    panels = 2 if means else 1
    fig, axes = _figure(1, panels, 4.4 * panels, 0.45 * max(len(cats), len(means)) + 1.4)
    ax = axes[0, 0]
    ys = list(range(len(cats)))[::-1]
    ax.barh(ys, [accuracy[c] for c in cats], color=VARIANT_COLOURS["rl"], height=0.6)
    for y, c in zip(ys, cats):  # the value inside a long bar, after a short one
        inside = accuracy[c] > 0.2
        ax.text(accuracy[c] + (-0.015 if inside else 0.015), y, _pct(accuracy[c]),
                va="center", ha="right" if inside else "left", fontsize=8,
                color="white" if inside else "#222222", fontweight="bold")
    ax.axvline(0.5, color="#999999", linestyle=":", linewidth=1)
    ax.text(0.5, 1.0, "chance", transform=ax.get_xaxis_transform(), ha="center", va="bottom",
            fontsize=7.5, color="#777777")
    ax.set_yticks(ys, [category_name(c) for c in cats], fontsize=8.5)
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("accuracy (true output scored higher)", fontsize=8.5)
    ax.set_title("Accuracy per negative category", fontsize=10, pad=12)
    if means:
        ax = axes[0, 1]
        mcats = list(means)
        ys = list(range(len(mcats)))[::-1]
        colours = [REFERENCE_COLOUR if c == "true" else "#d62728" for c in mcats]
        ax.barh(ys, [means[c] for c in mcats], color=colours, height=0.6, alpha=0.85)
        ax.set_yticks(ys, [category_name(c) for c in mcats], fontsize=8.5)
        ax.axvline(0, color="#999999", linewidth=0.8)
        ax.set_xlabel("mean reward", fontsize=8.5)
        ax.set_title("Mean reward: true vs negatives", fontsize=10, pad=12)
    n = rm_eval.get("n")
    fig.suptitle(f"Reward model on held-out examples{f' (n={n})' if n else ''}", fontsize=11,
                 x=0.01, ha="left")
    return _save(fig, path)


# ----------------------------------------------------------------------------- sections

def _id_key(key: Any) -> tuple:
    return (0, key, "") if _is_number(key) else (1, 0, str(key))


def _row_id(row: dict, position: int) -> Any:
    """The row's id (numbers stay numbers for sorting), or its position when it has none."""
    key = row.get("id")
    return f"#{position}" if key is None else (key if _is_number(key) else str(key))


def _truncate(text: str, words: int) -> str:
    parts = text.split()
    return text if len(parts) <= words else " ".join(parts[:words]) + " …"


def example_blocks(preds: dict[str, list[dict]], n: int = N_EXAMPLES) -> list[Block]:
    """The first n ids (sorted) with each variant's prediction for that id, one table each."""
    variants = ordered_variants(preds)
    by_id = {v: {_row_id(r, i): r for i, r in enumerate(preds[v], start=1)} for v in variants}
    ids = sorted({k for rows in by_id.values() for k in rows}, key=_id_key)[:n]
    blocks: list[Block] = []
    for key in ids:
        first = next(by_id[v][key] for v in variants if key in by_id[v])
        rows = []
        if first.get("input") is not None:
            rows.append([f"input (first {INPUT_WORDS} words)", _truncate(first["input"],
                                                                         INPUT_WORDS),
                         str(word_count(first["input"]))])
        rows.append(["reference", _truncate(first["reference"], OUTPUT_WORDS),
                     str(word_count(first["reference"]))])
        for v in variants:
            row = by_id[v].get(key)
            text = "(no prediction for this id)" if row is None else row["prediction"]
            rows.append([variant_name(v), _truncate(text, OUTPUT_WORDS),
                         "" if row is None else str(word_count(text))])
        blocks.append(Table(["", "text", "words"], rows, caption=f"Example id {key}",
                            text_cols=(1,)))
    return blocks


def rm_table(rm_eval: dict) -> Table:
    means = rm_eval.get("mean_reward") or {}
    pairs = rm_eval.get("pairs") or {}
    rows = [[category_name(c), _pct(a), _fmt_rows(pairs.get(c)),
             f"{means[c]:.3f}" if c in means else ""] for c, a in rm_eval["accuracy"].items()]
    if "true" in means:
        rows.insert(0, [category_name("true"), "", "", f"{means['true']:.3f}"])
    return Table(["negative category", "accuracy", "pairs", "mean reward"], rows)


def _all_null(models: dict, key: str) -> bool:
    return all(m.get(key) is None for m in models.values())


def _absent(models: dict, rm_eval: dict | None, ppo_rows: list, preds: dict,
            summaries: dict) -> list[str]:
    """What this run lacks, named once in the headline (each section says it again)."""
    checks = ((_all_null(models, "bleurt"), "BLEURT not computed"),
              (_all_null(models, "semantic_similarity"), "semantic similarity not computed"),
              (rm_eval is None, "reward-model evaluation (rm_eval.json)"),
              (not ppo_rows, "PPO log (ppo_log.jsonl)"),
              (not preds, "predictions"),
              (not summaries, "stage summaries"))
    return [what for missing, what in checks if missing]


def _table_blocks(t: ScoreTable) -> list[Block]:
    blocks: list[Block] = []
    if t.rows:
        blocks.append(Table(t.header, t.rows, caption=t.caption, best=frozenset(t.best)))
    elif t.caption:
        blocks.append(Para(t.caption))
    if t.note:
        blocks.append(Para(t.note, muted=True))
    return blocks


def _scores_section(scores: dict) -> list[Block]:
    blocks: list[Block] = [Heading("Scores (paper Tables 1 and 2)")]
    for t in score_tables(scores, VARIANT_ORDER):
        blocks += _table_blocks(t)
    intervals = interval_tables(scores)
    if intervals:
        blocks.append(Heading("RL against MLE: confidence intervals", level=3))
        for t in intervals:
            blocks += _table_blocks(t)
    if scores.get("notes"):
        blocks.append(Bullets(list(scores["notes"])))
    if _all_null(scores["models"], "bleurt") and not any(
            "BLEURT not computed" in note for note in scores.get("notes") or []):
        blocks.append(Para("BLEURT not computed (no checkpoint given).", muted=True))
    return blocks


def _rm_section(rm_eval: dict | None, out: Path, paths: dict[str, Path]) -> list[Block]:
    if rm_eval is None:
        return [Heading("Reward model"),
                Para("No reward-model evaluation in this run (rm_eval.json absent).", muted=True)]
    paths["rm_accuracy"] = plot_rm(rm_eval, out / PLOT_FILES["rm_accuracy"])
    return [Heading("Reward model"),
            Para("Accuracy: share of held-out pairs where the true output scores above its "
                 "synthesized negative (paper §3.2); 50% is chance."),
            rm_table(rm_eval),
            Image(paths["rm_accuracy"], "reward-model accuracy per negative category")]


#: PPO log columns that are 0 by construction when each outer batch makes one optimiser
#: step: the policy is scored at the very weights that sampled, so the probability ratio is
#: 1 (paper §3.3: "with a single update the clipping is redundant").
ONE_STEP_ZEROS = ("approx_kl", "clip_fraction")


def zero_by_construction(config: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The PPO panels the run's configuration makes 0 on every update (none without it)."""
    ppo = (config or {}).get("ppo")
    if not isinstance(ppo, Mapping):
        return ()
    one_step = ppo.get("ppo_epochs", 1) == 1 and ppo.get("minibatches", 1) == 1
    return ONE_STEP_ZEROS if one_step else ()


def _ppo_section(ppo_rows: list[dict], out: Path, paths: dict[str, Path],
                 config: Mapping[str, Any] | None = None) -> list[Block]:
    skip = zero_by_construction(config)
    png = (plot_ppo(ppo_rows, out / PLOT_FILES["ppo_curves"], skip=skip)
           if ppo_rows else None)
    if png is None:
        return [Heading("PPO training"),
                Para("No PPO log in this run (ppo_log.jsonl absent or without plottable "
                     "columns).", muted=True)]
    paths["ppo_curves"] = png
    blocks: list[Block] = [
        Heading("PPO training"),
        Para("Sampled batches hold the policy's own outputs, reference batches the true "
             "outputs (paper §3.3). Excess length is in words against the reference; "
             "0 is the reference length."),
        Image(png, "PPO reward, response length and excess length per update")]
    if skip:
        blocks.append(Para("Approximate KL and clip fraction are not plotted: this run makes "
                           "one optimiser step per batch (one PPO epoch, one minibatch), so "
                           "the policy is scored at the weights that sampled and both are 0 "
                           "by construction (paper §3.3).", muted=True))
    return blocks


def instruction_blocks(config: Mapping[str, Any] | None) -> list[Block]:
    """The instruction put before every input: it shapes every variant's output (a length
    hint shortens Base and MLE, the very effect the paper measures)."""
    data = (config or {}).get("data")
    text = data.get("instruction") if isinstance(data, Mapping) else None
    if not isinstance(text, str):
        return [Para("Instruction: not recorded (no config.json with this run).", muted=True)]
    if not text.strip():
        return [Para("Instruction: none (the input alone is the prompt).")]
    return [Para(f"Instruction given before every input: “{text}”")]


def _predictions_sections(preds: dict[str, list[dict]], out: Path,
                          paths: dict[str, Path]) -> list[Block]:
    if not preds:
        return [Heading("Output lengths"), Para("No predictions given.", muted=True),
                Heading("Examples"), Para("No predictions given.", muted=True)]
    paths["length_hist"] = plot_lengths(preds, out / PLOT_FILES["length_hist"])
    return [Heading("Output lengths"),
            Image(paths["length_hist"], "prediction vs reference length per variant, in words"),
            Heading("Examples"),
            Para(f"The first {N_EXAMPLES} test ids in sorted order, every variant's output "
                 "for each; inputs truncated."),
            *example_blocks(preds)]


def _timing_section(summaries: dict[str, dict]) -> list[Block]:
    if not summaries:
        return [Heading("Stage timings"), Para("No stage summaries given.", muted=True)]
    return [Heading("Stage timings"), timing_table(summaries),
            Para("Total is the sum of the stages' times; stages that ran side by side (the MLE "
                 "baseline beside the reward model and PPO) overlap in wall time. A stage "
                 "marked ×N ran as N shards or processes: its seconds add up all of them (the "
                 "cost in task-seconds; its wall time is about 1/N of that). s / row is how "
                 "cost grows with the data: seconds per row the stage worked through.",
                 muted=True)]


def build_report(out_dir: str | Path, scores: dict,
                 predictions_rows_by_variant: Mapping[str, Iterable[dict]] | None,
                 rm_eval: dict | None = None, ppo_log: Iterable[dict] | None = None,
                 stage_summaries: Mapping[str, dict] | None = None,
                 run_info: Mapping[str, Any] | None = None,
                 config: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write out_dir/report.md, out_dir/report.html and the plots that have data.

    `config` is the run's configuration (config.Profile as a dict): the report prints its
    instruction and leaves out the PPO panels it makes 0 by construction.

    Returns {"markdown", "html"} plus "ppo_curves", "length_hist", "rm_accuracy" for the
    plots written (a plot whose input is absent is skipped and the report says so).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scores = check_scores(scores)
    preds = check_predictions(predictions_rows_by_variant)
    rm_eval = check_rm_eval(rm_eval) if rm_eval is not None else None
    ppo_rows = check_ppo_log(ppo_log) if ppo_log is not None else []
    summaries = dict(stage_summaries or {})
    run_info = dict(run_info or {})
    if config is not None and not isinstance(config, Mapping):
        raise ReportInputError(f"config: expected an object (config.Profile as a dict), got "
                               f"{type(config).__name__}")

    paths: dict[str, Path] = {}
    blocks: list[Block] = []
    if run_info.get("profile") or run_info.get("base_model"):
        blocks.append(Para(" · ".join(f"{k.replace('_', ' ')}: {run_info[k]}"
                                      for k in ("profile", "base_model") if run_info.get(k)),
                           muted=True))
    absent = _absent(scores["models"], rm_eval, ppo_rows, preds, summaries)
    blocks += [*instruction_blocks(config),
               Heading("Summary"), Bullets(headline(scores, absent), css="headline"),
               *_scores_section(scores),
               *_rm_section(rm_eval, out, paths),
               *_ppo_section(ppo_rows, out, paths, config),
               *_predictions_sections(preds, out, paths),
               *_timing_section(summaries),
               Heading("Reproducibility"), *reproducibility_blocks(run_info, summaries)]

    title = "lastmile run report"
    paths["markdown"], paths["html"] = out / "report.md", out / "report.html"
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text(render_markdown(title, blocks), encoding="utf-8")
    with atomic_path(paths["html"]) as tmp:
        tmp.write_text(render_html(title, blocks), encoding="utf-8")
    return paths


# ----------------------------------------------------------------------------- from files

def _jsonl_files(folder: Path, pattern: str) -> list[Path]:
    return sorted(set(folder.glob(pattern + ".jsonl")) | set(folder.glob(pattern + ".jsonl.gz")))


def _stem(path: Path) -> str:
    return path.name.split(".jsonl")[0]


def read_predictions(run_dir: str | Path) -> dict[str, list[dict]]:
    """{variant: rows} from predictions/<variant>.jsonl or predictions*.jsonl (see module)."""
    run = Path(run_dir)
    per_variant = _jsonl_files(run / "predictions", "*") if (run / "predictions").is_dir() else []
    flat = _jsonl_files(run, "predictions*")
    if per_variant and flat:
        raise ReportInputError(f"{run}: both predictions/ and predictions*.jsonl present; "
                               "keep one layout")
    rows_by_variant: dict[str, list[dict]] = {}
    for path in per_variant or flat:
        default = _stem(path).removeprefix("predictions").lstrip("_-") or None
        for i, row in enumerate(read_jsonl(path), start=1):
            if not isinstance(row, dict):
                raise ReportInputError(f"{path}: row {i} is not a JSON object")
            variant = row.get("variant") or default
            if not variant:
                raise ReportInputError(f"{path}: row {i} has no 'variant' and the file name "
                                       "names none (use predictions_<variant>.jsonl)")
            rows_by_variant.setdefault(str(variant), []).append(row)
    return rows_by_variant


def read_summaries(folder: str | Path) -> dict[str, dict]:
    """{stage: summary} from folder/<stage>.json, in pipeline order, others by name."""
    found = {p.stem: p for p in Path(folder).glob("*.json")} if Path(folder).is_dir() else {}
    order = [s for s in STAGE_ORDER if s in found] + sorted(s for s in found
                                                             if s not in STAGE_ORDER)
    out = {}
    for stage in order:
        summary = _load_json(found[stage])
        if not isinstance(summary, dict):
            raise ReportInputError(f"{found[stage]}: expected a JSON object")
        out[stage] = summary
    return out


def _load_json(path: Path) -> Any:
    try:
        return read_json(path)
    except ValueError as e:  # json.JSONDecodeError does not name the file
        raise ReportInputError(f"{path}: not valid JSON ({e})") from None


def build_report_from_dir(run_dir: str | Path, out_dir: str | Path | None = None
                          ) -> dict[str, Path]:
    """`build_report` from the conventional file names in run_dir (module docstring);
    out_dir defaults to run_dir."""
    run = Path(run_dir)
    scores_path = run / "scores.json"
    if not scores_path.is_file():
        raise ReportInputError(f"{run}: no scores.json (the score stage's output)")
    ppo_path = next(iter(_jsonl_files(run, "ppo_log")), None)
    rm_path = run / "rm_eval.json"
    run_info_path = run / "run_info.json"
    config_path = run / "config.json"
    return build_report(
        out_dir or run, check_scores(_load_json(scores_path), str(scores_path)),
        check_predictions(read_predictions(run), str(run / "predictions")),
        rm_eval=check_rm_eval(_load_json(rm_path), str(rm_path)) if rm_path.is_file() else None,
        ppo_log=check_ppo_log(read_jsonl(ppo_path), str(ppo_path)) if ppo_path else None,
        stage_summaries=read_summaries(run / "summaries"),
        run_info=_load_json(run_info_path) if run_info_path.is_file() else None,
        config=_load_json(config_path) if config_path.is_file() else None)


def _profile_info(profile: Any) -> tuple[dict, dict]:
    """(run_info, full config) from a config.Profile or its dict form."""
    config = profile.to_dict() if hasattr(profile, "to_dict") else dict(profile)
    info = {k: config[k] for k in ("name", "base_model") if config.get(k) is not None}
    if "name" in info:
        info["profile"] = info.pop("name")
    seeds = {stage: part["seed"] for stage, part in config.items()
             if isinstance(part, dict) and part.get("seed") is not None}
    if seeds:
        info["seeds"] = seeds
    return info, config


def build_report_from_stages(stage_dirs: Mapping[str, str | Path], out_dir: str | Path,
                             profile: Any = None) -> dict[str, Path]:
    """The pipeline's report stage: gather each stage folder's files into out_dir in the
    conventional layout (scores.json, predictions/<variant>.jsonl, rm_eval.json,
    ppo_log.jsonl, summaries/<stage>.json, run_info.json, config.json), then build the report
    from out_dir. `stage_dirs` maps stage name -> the folder it wrote (with summary.json)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dirs = {stage: Path(d) for stage, d in stage_dirs.items()}
    for stage, d in dirs.items():
        if not d.is_dir():
            raise ReportInputError(f"stage {stage!r}: folder {d} does not exist")

    def the_file(name: str) -> Path | None:
        hits = [d / name for d in dirs.values() if (d / name).is_file()]
        if len(hits) > 1:
            raise ReportInputError(f"{name} found in several stage folders: {hits}")
        return hits[0] if hits else None

    scores = the_file("scores.json")
    if scores is None:
        raise ReportInputError(f"no stage folder holds scores.json: {sorted(dirs)}")
    shutil.copyfile(scores, out / "scores.json")
    for name in ("rm_eval.json", "ppo_log.jsonl"):
        found = the_file(name)
        if found is not None:
            shutil.copyfile(found, out / name)

    rows_by_variant: dict[str, list[dict]] = {}
    for stage, d in dirs.items():
        if (d / "predictions.jsonl").is_file():
            for row in read_jsonl(d / "predictions.jsonl"):
                rows_by_variant.setdefault(str(row.get("variant") or stage), []).append(row)
    for variant, rows in rows_by_variant.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", variant):
            raise ReportInputError(f"variant name {variant!r} cannot name a file "
                                   "(letters, digits, _ . - only)")
        write_jsonl(out / "predictions" / f"{variant}.jsonl", rows)

    for stage, d in dirs.items():
        if (d / "summary.json").is_file():
            write_json(out / "summaries" / f"{stage}.json", _load_json(d / "summary.json"))
    if profile is not None:
        info, config = _profile_info(profile)
        write_json(out / "run_info.json", info)
        write_json(out / "config.json", config)
    return build_report_from_dir(out, out)
