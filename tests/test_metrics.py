"""lastmile.metrics and lastmile.bleurt_compat: hand-computed ROUGE / la-ROUGE, the tables,
the MiniLM similarity, and BLEURT through a tiny random checkpoint saved and loaded for real."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from lastmile import metrics
from lastmile.bleurt_compat import (
    BleurtLoadError,
    bleurt_score_batch,
    find_pruneable_heads_and_indices,
    import_bleurt,
    load_bleurt,
)
from lastmile.config import ScoreConfig
from lastmile.metrics import (
    ScoreInputError,
    excess_length,
    la_adjust,
    lexical_scores,
    markdown_tables,
    rouge_scores,
    score_file,
    score_predictions,
)

REF4 = "the cat sat down"  # 4 words
PRED8 = "the cat sat on the mat all day"  # 8 words
LEXICAL_ONLY = ScoreConfig(semantic_similarity=False)

MODEL_KEYS = {"n", "excess_length", "bleurt", "semantic_similarity"} | {
    f"{la}{k}_{p}" for la in ("", "la_") for k in ("rouge1", "rouge2", "rougeL")
    for p in ("precision", "recall", "f1")}


# ----------------------------------------------------------------------------- la-ROUGE

def test_la_adjust_longer_prediction_scales_recall_only():
    # np = 8 > ng = 4: recall x 4/8, precision unchanged; F1 from the adjusted pair.
    p, r, f = la_adjust(3 / 8, 3 / 4, 8, 4)
    assert (p, r) == pytest.approx((3 / 8, 3 / 8))
    assert f == pytest.approx(3 / 8)


def test_la_adjust_shorter_prediction_scales_precision_only():
    # np = 2 < ng = 4: precision x 2/4, recall unchanged.
    p, r, f = la_adjust(1.0, 0.5, 2, 4)
    assert (p, r, f) == pytest.approx((0.5, 0.5, 0.5))
    p, r, f = la_adjust(0.9, 0.3, 3, 10)
    assert (p, r) == pytest.approx((0.27, 0.3))
    assert f == pytest.approx(2 * 0.27 * 0.3 / 0.57)


def test_la_adjust_equal_lengths_unchanged():
    p, r, f = la_adjust(0.4, 0.6, 5, 5)
    assert (p, r) == (0.4, 0.6)
    assert f == pytest.approx(0.48)  # 2 * 0.24 / 1.0


@pytest.mark.parametrize("np_, ng", [(0, 4), (4, 0), (0, 0)])
def test_la_adjust_empty_side_is_zero(np_, ng):
    assert la_adjust(0.5, 0.5, np_, ng) == (0.0, 0.0, 0.0)


# ----------------------------------------------------------------------------- ROUGE

def _prf(scores: dict, kind: str) -> tuple[float, float, float]:
    return scores[f"{kind}_precision"], scores[f"{kind}_recall"], scores[f"{kind}_f1"]


def test_rouge_hand_computed():
    s = rouge_scores(PRED8, REF4)
    # unigrams: the, cat, sat shared (the appears twice in the prediction, once in the reference)
    assert _prf(s, "rouge1") == pytest.approx((3 / 8, 3 / 4, 0.5))
    # bigrams: "the cat", "cat sat" of the prediction's 7 and the reference's 3
    assert (s["rouge2_precision"], s["rouge2_recall"]) == pytest.approx((2 / 7, 2 / 3))
    assert s["rouge2_f1"] == pytest.approx(2 * (2 / 7) * (2 / 3) / (2 / 7 + 2 / 3))
    # LCS "the cat sat"
    assert (s["rougeL_precision"], s["rougeL_recall"]) == pytest.approx((3 / 8, 3 / 4))


def test_rouge_uses_stemmer():
    assert rouge_scores("dogs running", "dog runs")["rouge1_f1"] == pytest.approx(1.0)


def test_lexical_scores_combine_rouge_and_la():
    s = lexical_scores(PRED8, REF4)
    assert s["excess_length"] == 4
    assert _prf(s, "la_rouge1") == pytest.approx((3 / 8, 3 / 8, 3 / 8))
    assert s["la_rouge2_recall"] == pytest.approx(2 / 3 * 4 / 8)
    assert s["la_rouge2_precision"] == pytest.approx(2 / 7)


def test_empty_prediction_scores_zero():
    s = lexical_scores("", REF4)
    assert s["excess_length"] == -4
    assert all(s[k] == 0.0 for k in s if k != "excess_length")


def test_excess_length_counts_whitespace_entities():
    assert excess_length("a b c", "a") == 2
    assert excess_length("Sure,\nhere  is\tit.", "one two three four five") == -1
    assert excess_length("", "") == 0


# ----------------------------------------------------------------------------- corpus

def test_score_predictions_means_per_variant():
    rows = [
        {"prediction": PRED8, "reference": REF4, "variant": "base"},
        {"prediction": "the cat", "reference": REF4, "variant": "base"},
        {"prediction": REF4, "reference": REF4},  # no variant -> "default"
    ]
    out = score_predictions(rows, LEXICAL_ONLY)
    assert list(out["models"]) == ["base", "default"]
    base = out["models"]["base"]
    assert set(base) == MODEL_KEYS
    assert base["n"] == 2
    assert base["excess_length"] == pytest.approx((4 + -2) / 2)
    assert base["rouge1_precision"] == pytest.approx((3 / 8 + 1.0) / 2)
    assert base["la_rouge1_recall"] == pytest.approx((3 / 8 + 0.5) / 2)
    assert base["la_rouge1_f1"] == pytest.approx((3 / 8 + 0.5) / 2)
    assert out["models"]["default"]["rougeL_f1"] == pytest.approx(1.0)
    assert base["bleurt"] is None and base["semantic_similarity"] is None
    assert out["bleurt_checkpoint"] is None
    assert any("BLEURT not computed" in note for note in out["notes"])


@pytest.mark.parametrize("row, message", [
    ({"reference": "r"}, "row 2: missing field 'prediction'"),
    ({"prediction": "p", "reference": 3}, "row 2: field 'reference' must be a string"),
    ({"prediction": "p", "reference": "r", "variant": 7}, "row 2: field 'variant'"),
    (["p", "r"], "row 2: expected a JSON object"),
])
def test_score_predictions_rejects_bad_rows(row, message):
    rows = [{"prediction": "a", "reference": "b"}, row]
    with pytest.raises(ScoreInputError, match=message):
        score_predictions(rows, LEXICAL_ONLY)


def test_score_predictions_rejects_empty_input():
    with pytest.raises(ScoreInputError, match="no predictions"):
        score_predictions([], LEXICAL_ONLY)


def test_score_file_writes_json_and_names_bad_line(tmp_path):
    good = {"id": 1, "input": "x", "reference": REF4, "prediction": PRED8, "variant": "rl"}
    src = tmp_path / "predictions.jsonl"
    src.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    out = score_file(src, tmp_path / "out" / "scores.json", LEXICAL_ONLY)
    assert json.loads((tmp_path / "out" / "scores.json").read_text()) == out
    assert out["models"]["rl"]["n"] == 2

    src.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "prediction": None}) + "\n")
    with pytest.raises(ScoreInputError, match=f"{src}:3: field 'prediction' must be a string"):
        score_file(src, tmp_path / "bad.json", LEXICAL_ONLY)
    assert not (tmp_path / "bad.json").exists()
    src.write_text("{not json\n")
    with pytest.raises(ScoreInputError, match=f"{src}:1: not valid JSON"):
        score_file(src, tmp_path / "bad.json", LEXICAL_ONLY)


# ----------------------------------------------------------------------------- tables

def _fake_model_scores(value: float, **extra) -> dict:
    scores = {k: value for k in MODEL_KEYS}
    scores.update(n=3, bleurt=None, **extra)
    return scores


def test_markdown_tables_layout():
    scores = {
        "models": {  # deliberately out of order, with one variant the paper does not have
            "custom": _fake_model_scores(0.5),
            "rl": _fake_model_scores(0.25, excess_length=-1.06),
            "base": _fake_model_scores(0.125, excess_length=39.24),
            "mle_cleaned": _fake_model_scores(1 / 3),
        },
        "bleurt_checkpoint": None,
        "notes": ["BLEURT not computed (no checkpoint given)"],
    }
    md = markdown_tables(scores)
    lines = md.splitlines()
    headers = [line for line in lines if line.startswith("|  |")]
    # the paper's order, only the variants present, others after them; one name per variant
    assert headers == ["|  | Base | RL | MLE, post-processed | custom |"] * 2
    # Table 1: one decimal, the value closest to the reference length in bold
    assert "| extra length (words) | 39.2 | -1.1 | **0.3** | 0.5 |" in lines
    assert "| examples | 3 | 3 | 3 | 3 |" in lines
    # Table 2: three decimals, labels in words, the highest value per row in bold
    assert "| BLEURT | n/a | n/a | n/a | n/a |" in lines
    assert "| length-adjusted ROUGE-1 F1 | 0.125 | 0.250 | 0.333 | **0.500** |" in lines
    table2 = lines[lines.index("Table 2: Evaluation metrics"):]
    labels = [line.split(" | ")[0][2:] for line in table2
              if line.startswith("| ") and not line.startswith("|  |")]
    kinds, parts = ("ROUGE-1", "ROUGE-2", "ROUGE-L"), ("F1", "precision", "recall")
    assert labels == (  # the paper's Table 2 order, then ours
        ["BLEURT"]
        + [f"length-adjusted {k} {p}" for k in kinds for p in parts]
        + [f"{k} {p}" for k in kinds for p in parts]
        + ["semantic similarity"])
    assert "- BLEURT not computed (no checkpoint given)" in lines
    assert "against" not in md  # no intervals in these scores: no interval table


def test_best_value_marks_ties_and_skips_rows_without_a_contest():
    scores = {"models": {"base": _fake_model_scores(0.5, excess_length=2.0),
                         "mle": _fake_model_scores(0.5, excess_length=-2.0),
                         "rl": _fake_model_scores(0.4, excess_length=3.0)}}
    table1, table2 = metrics.score_tables(scores)
    assert table1.best == {(0, 1), (0, 2)}  # +2 and -2 are equally close to the reference
    assert (1, 1) in table2.best and (1, 2) in table2.best and (1, 3) not in table2.best
    assert not any(row == 0 for row, _ in table2.best)  # BLEURT: all n/a, nothing marked
    alone = metrics.score_tables({"models": {"rl": _fake_model_scores(0.4)}})
    assert alone[0].best == set() and alone[1].best == set()  # one variant: no contest


def test_names_are_one_spelling_per_variant_category_and_metric():
    from lastmile.config import NEGATIVE_CATEGORIES
    from lastmile.negatives import REGISTRY

    assert metrics.VARIANT_NAMES["mle"] == "MLE"
    assert metrics.VARIANT_NAMES["mle_cleaned"] == "MLE, post-processed"
    for category in (*NEGATIVE_CATEGORIES, *REGISTRY):
        assert category in metrics.CATEGORY_NAMES, category
    labels = list(metrics.CATEGORY_NAMES.values())
    assert len(set(labels)) == len(labels) and not any("_" in label for label in labels)
    assert metrics.category_name("repaired") == "re-paired output"
    assert metrics.category_name("new_kind") == "new kind"  # unknown: still words
    assert metrics.metric_name("la_rougeL_f1") == "length-adjusted ROUGE-L F1"
    assert metrics.metric_name("rouge2_recall") == "ROUGE-2 recall"


# ----------------------------------------------------------------------------- bootstrap

def _boot(a: list[float], b: list[float], key: str = "la_rougeL_f1", **kw) -> dict:
    return metrics.paired_bootstrap({key: a}, {key: b}, **kw)[key]


def test_bootstrap_identical_variants_contain_zero_and_call_no_winner():
    import random

    rnd = random.Random(1)
    scores = [rnd.random() for _ in range(200)]
    entry = _boot(scores, list(scores))
    assert entry["low"] == entry["high"] == entry["difference"] == 0.0
    assert entry["winner"] is None


def test_bootstrap_constant_shift_is_the_interval():
    import random

    rnd = random.Random(2)
    mle = [rnd.random() for _ in range(150)]
    entry = _boot([x + 0.0625 for x in mle], mle)
    assert entry["low"] == pytest.approx(0.0625, abs=1e-12)
    assert entry["high"] == pytest.approx(0.0625, abs=1e-12)
    assert entry["difference"] == pytest.approx(0.0625, abs=1e-12)
    assert entry["winner"] == "a"
    assert _boot(mle, [x + 0.0625 for x in mle])["winner"] == "b"


def test_bootstrap_width_matches_the_standard_error():
    # Per-example differences of +1 and -1, half each: mean 0, standard error 1/sqrt(400)
    # = 0.05, so a 95% interval of about +-1.96 x 0.05 = +-0.098 around 0.
    a = [1.0, 0.0] * 200
    b = [0.0, 1.0] * 200
    entry = _boot(a, b)
    assert entry["difference"] == 0.0 and entry["winner"] is None
    assert entry["low"] == pytest.approx(-0.098, abs=0.012)
    assert entry["high"] == pytest.approx(0.098, abs=0.012)
    # The same numbers again: a fixed seed gives the same interval, another seed another.
    assert _boot(a, b) == entry
    varied = [i * 0.37 % 1 for i in range(400)]
    assert _boot(varied, b, seed=1)["low"] != _boot(varied, b)["low"]


def test_bootstrap_is_paired():
    # Both variants vary a lot from example to example, but RL is always 0.01 above MLE:
    # unpaired, the spread would swamp 0.01; paired, the interval is exactly 0.01.
    mle = [i % 10 / 10 for i in range(100)]
    entry = _boot([x + 0.01 for x in mle], mle)
    assert entry["low"] == pytest.approx(0.01) and entry["high"] == pytest.approx(0.01)


def test_bootstrap_extra_length_winner_is_the_mean_closer_to_zero():
    # RL 3 words short, MLE 2 words long: RL - MLE is clearly negative, but MLE is closer.
    entry = _boot([-3.0] * 50, [2.0] * 50, key="excess_length")
    assert entry["high"] == pytest.approx(-5.0) and entry["winner"] == "b"
    assert entry["closer_low"] == pytest.approx(1.0)
    both_long = _boot([1.0] * 50, [4.0] * 50, key="excess_length")
    assert both_long["winner"] == "a"  # RL +1, MLE +4: RL closer
    assert metrics.verdict("excess_length", both_long, "rl", "mle") == (
        "RL closer to the reference length")
    tied = _boot([-2.0, 2.0] * 25, [2.0, -2.0] * 25, key="excess_length")
    assert tied["winner"] is None
    assert metrics.verdict("excess_length", tied, "rl", "mle") == "no clear difference"


def test_bootstrap_refuses_bad_input():
    with pytest.raises(ValueError, match="no paired examples"):
        _boot([], [])
    with pytest.raises(ValueError, match="n scores for both"):
        _boot([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="resamples >= 1"):
        _boot([1.0], [1.0], resamples=0)


def _rows(variant: str, ids, prediction) -> list[dict]:
    return [{"id": i, "variant": variant, "reference": f"tool {i} parses files",
             "prediction": prediction(i)} for i in ids]


def test_scores_carry_intervals_for_rl_against_both_mle_variants():
    ids = list(range(30))
    rows = (_rows("base", ids, lambda i: f"sure here is tool {i} that parses many files")
            + _rows("mle", ids, lambda i: f"tool {i} parses files and more files")
            + _rows("rl", ids, lambda i: f"tool {i} parses files")
            + _rows("mle_cleaned", ids, lambda i: f"tool {i} parses files"))
    scores = score_predictions(rows, LEXICAL_ONLY)
    boot = scores[metrics.PAIRED_BOOTSTRAP]
    assert (boot["resamples"], boot["seed"], boot["confidence"]) == (2000, 0, 0.95)
    assert list(boot["comparisons"]) == ["rl-mle", "rl-mle_cleaned"]
    versus_mle = boot["comparisons"]["rl-mle"]
    assert (versus_mle["n"], versus_mle["paired_by"]) == (30, "id")
    # Only the headline metrics, only those computed (no BLEURT or embeddings here).
    assert list(versus_mle["metrics"]) == ["excess_length", "rougeL_f1", "la_rougeL_f1"]
    length = versus_mle["metrics"]["excess_length"]
    assert length["difference"] == pytest.approx(-3.0) and length["low"] == pytest.approx(-3.0)
    assert length["winner"] == "a"
    models = scores["models"]
    la = versus_mle["metrics"]["la_rougeL_f1"]
    assert (la["a"], la["b"]) == (pytest.approx(models["rl"]["la_rougeL_f1"]),
                                  pytest.approx(models["mle"]["la_rougeL_f1"]))
    same = boot["comparisons"]["rl-mle_cleaned"]["metrics"]  # identical outputs: no winner
    assert all(e["low"] == e["high"] == 0.0 and e["winner"] is None for e in same.values())
    # The CLI's Markdown prints them with the verdict.
    md = markdown_tables(scores)
    assert "RL against MLE, post-processed" in md
    assert ("| extra length (words) | 0.00 | 3.00 | -3.00 | -3.00 to -3.00 | "
            "**RL closer to the reference length** |") in md
    assert ("| length-adjusted ROUGE-L F1 | 1.000 | 0.571 | +0.429 | +0.429 to +0.429 | "
            "**RL better** |") in md  # every pair differs alike: 1 - 4/7
    assert "| no clear difference |" in md


def test_intervals_cover_every_headline_metric_computed():
    """Hand-made per-example scores (as the score stage writes them) with BLEURT and semantic
    similarity: RL is 0.02 above MLE on both on every example, equal to MLE post-processed."""
    def example(variant, i, shift):
        row = {"variant": variant, "id": f"t{i}", **dict.fromkeys(metrics.LEXICAL_KEYS, 0.5)}
        row.update(excess_length=float(i % 5), bleurt=0.3 + i / 100 + shift,
                   semantic_similarity=0.6 - i / 200 + shift)
        return row

    rows = [example(v, i, 0.02 if v == "rl" else 0.0)
            for v in ("mle", "mle_cleaned", "rl") for i in range(25)]
    cfg = ScoreConfig(bleurt_checkpoint="some/checkpoint", semantic_similarity=True)
    boot = metrics.aggregate(iter(rows), cfg, "hand-made")[metrics.PAIRED_BOOTSTRAP]
    found = boot["comparisons"]["rl-mle"]["metrics"]
    assert list(found) == list(metrics.BOOTSTRAP_KEYS)
    for key in ("bleurt", "semantic_similarity"):
        assert found[key]["low"] == pytest.approx(0.02) and found[key]["winner"] == "a"
    for key in ("excess_length", "rougeL_f1", "la_rougeL_f1"):
        assert found[key]["low"] == found[key]["high"] == 0.0 and found[key]["winner"] is None
    md = markdown_tables({"models": {}, metrics.PAIRED_BOOTSTRAP: boot})
    assert "| BLEURT | 0.440 | 0.420 | +0.020 | +0.020 to +0.020 | **RL better** |" in md
    assert ("| semantic similarity | 0.560 | 0.540 | +0.020 | +0.020 to +0.020 | "
            "**RL better** |") in md


def test_intervals_pair_by_id_whatever_the_row_order():
    ids = list(range(40))
    mle = _rows("mle", ids, lambda i: "tool parses" if i % 3 else f"tool {i} parses files ok")
    rl = _rows("rl", ids, lambda i: f"tool {i} parses" if i % 2 else f"tool {i} parses files")
    ordered = score_predictions(mle + rl, LEXICAL_ONLY)[metrics.PAIRED_BOOTSTRAP]
    shuffled = score_predictions(mle[::-1] + rl, LEXICAL_ONLY)[metrics.PAIRED_BOOTSTRAP]
    assert shuffled == ordered
    # An MLE row missing: the comparison runs on the ids both have.
    fewer = score_predictions(mle[:-1] + rl, LEXICAL_ONLY)[metrics.PAIRED_BOOTSTRAP]
    assert fewer["comparisons"]["rl-mle"]["n"] == 39
    # No ids: paired by position when both list the same number of rows, else skipped.
    anonymous = [{k: v for k, v in r.items() if k != "id"} for r in mle + rl]
    by_position = score_predictions(anonymous, LEXICAL_ONLY)[metrics.PAIRED_BOOTSTRAP]
    assert by_position["comparisons"]["rl-mle"]["paired_by"] == "position"
    assert by_position["comparisons"]["rl-mle"]["metrics"] == ordered["comparisons"]["rl-mle"][
        "metrics"]
    uneven = score_predictions(anonymous[1:], LEXICAL_ONLY)
    assert "no unique ids" in uneven[metrics.PAIRED_BOOTSTRAP]["comparisons"]["rl-mle"]["skipped"]
    assert "No interval: rl and mle have 40 and 39 rows" in markdown_tables(uneven)
    # Without RL or without any MLE variant, scores.json keeps its old keys only.
    assert set(score_predictions(mle, LEXICAL_ONLY)) == {"models", "bleurt_checkpoint", "notes"}


def test_sharded_scoring_gives_the_same_intervals(tmp_path):
    from lastmile import shards
    from lastmile.io import write_json, write_jsonl

    def predictions(variant, start, stop):
        return _rows(variant, range(start, stop),
                     lambda i: " ".join(["tool", str(i)] * (1 + i % (3 if variant == "rl" else 5)))
                     + " parses files")

    whole = []
    for v in ("mle", "rl", "mle_cleaned"):
        whole.append(tmp_path / f"{v}.jsonl")
        write_jsonl(whole[-1], predictions(v, 0, 50))
    expected = score_file(whole, tmp_path / "scores.json", LEXICAL_ONLY)
    folders = []
    for index, (start, stop) in enumerate([(0, 20), (20, 50)]):
        folder = tmp_path / f"shard{index}"
        parts = []
        for v in ("mle", "rl", "mle_cleaned"):
            parts.append(folder / f"{v}.jsonl")
            write_jsonl(parts[-1], predictions(v, start, stop))
        metrics.score_examples_file(parts, folder / shards.EXAMPLE_SCORES, LEXICAL_ONLY)
        write_json(folder / "summary.json", {"shard": {"index": index, "count": 2,
                                                       "rows": [start, stop]}})
        folders.append(folder)
    gathered = shards.gather_example_scores(folders[::-1], tmp_path / "g.json", LEXICAL_ONLY)
    assert gathered[metrics.PAIRED_BOOTSTRAP] == expected[metrics.PAIRED_BOOTSTRAP]
    assert json.loads((tmp_path / "g.json").read_text())[metrics.PAIRED_BOOTSTRAP][
        "comparisons"]["rl-mle"]["n"] == 50


# ----------------------------------------------------------------------------- semantic

@pytest.fixture(scope="module")
def embedder():
    return metrics.get_embedder()


def test_semantic_similarity_identical_related_unrelated(embedder):
    ref = "The government announced new taxes on fuel today."
    sims = embedder.similarity(
        [ref, "Officials unveiled a fuel tax increase.", "My cat likes to sleep in the sun."],
        [ref, ref, ref])
    assert sims[0] == pytest.approx(1.0, abs=1e-5)
    assert sims[2] < sims[1] < sims[0]
    assert metrics.get_embedder() is embedder  # loaded once per process


def test_semantic_means_survive_batching(embedder):
    # 70 rows, two interleaved variants: one full batch of 64 and a remainder of 6.
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    rows = [{"prediction": f"{words[i % 10]} {words[(i * 3) % 10]}", "reference": words[i % 7],
             "variant": "a" if i % 3 else "b"} for i in range(70)]
    out = score_predictions(rows, ScoreConfig(semantic_similarity=True))
    for variant in ("a", "b"):
        mine = [r for r in rows if r["variant"] == variant]
        direct = embedder.similarity([r["prediction"] for r in mine],
                                     [r["reference"] for r in mine])
        mean = sum(direct) / len(direct)
        assert out["models"][variant]["semantic_similarity"] == pytest.approx(mean, abs=1e-5)


# ----------------------------------------------------------------------------- BLEURT

PAIRS = (["the cat sat on the mat", "stocks fell sharply on monday", "hello"],
         ["a cat was sitting on a mat", "markets dropped", "goodbye " * 80])


@pytest.fixture(scope="module")
def tiny_bleurt(tmp_path_factory):
    """A randomly initialised 2-layer BLEURT saved like a lucadiliello checkpoint
    (config + weights + vocab.txt; the vocabulary is all-MiniLM-L6-v2's BERT WordPiece)."""
    bleurt = import_bleurt()
    vocab = metrics.minilm_dir() / "vocab.txt"
    config = bleurt.BleurtConfig(
        vocab_size=len(vocab.read_text(encoding="utf-8").splitlines()), hidden_size=32,
        num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64)
    torch.manual_seed(0)
    model = bleurt.BleurtForSequenceClassification(config).eval()
    path = tmp_path_factory.mktemp("bleurt-tiny")
    model.save_pretrained(path)
    shutil.copy(vocab, path / "vocab.txt")
    return path, model


def test_bleurt_tiny_checkpoint_round_trip(tiny_bleurt):
    path, original = tiny_bleurt
    model, tokenizer = load_bleurt(str(path))
    assert len(tokenizer) == original.config.vocab_size  # the real vocabulary, not 5 specials
    assert tokenizer.tokenize("The cat")[:2] == ["the", "cat"]
    refs, cands = PAIRS
    scores = bleurt_score_batch(model, tokenizer, refs, cands)
    assert len(scores) == 3 and all(math.isfinite(s) for s in scores)
    assert len(set(scores)) == 3  # the input reaches the output
    assert bleurt_score_batch(model, tokenizer, refs, cands) == scores  # deterministic (eval)
    enc = tokenizer(refs, cands, padding="longest", truncation=True, max_length=64,
                    return_tensors="pt")
    assert enc["input_ids"].shape[1] == 64  # the long pair was truncated to the position table
    with torch.no_grad():
        expected = original(**enc).logits[:, 0].tolist()
    assert scores == pytest.approx(expected, abs=1e-6)  # weights survived save/load


def test_bleurt_padding_is_masked(tiny_bleurt):
    # The patched get_extended_attention_mask must hide padding: a short pair scores the same
    # alone as in a batch padded to a long one.
    model, tokenizer = load_bleurt(str(tiny_bleurt[0]))
    alone = bleurt_score_batch(model, tokenizer, ["hello"], ["goodbye"])
    batched = bleurt_score_batch(model, tokenizer, ["hello", PAIRS[0][0]], ["goodbye", PAIRS[1][0]])
    assert batched[0] == pytest.approx(alone[0], abs=1e-6)


def test_score_predictions_with_bleurt(tiny_bleurt):
    path = str(tiny_bleurt[0])
    refs, cands = PAIRS
    rows = [{"prediction": c, "reference": r, "variant": "rl"} for r, c in zip(refs, cands)]
    out = score_predictions(rows, ScoreConfig(bleurt_checkpoint=path, semantic_similarity=False))
    model, tokenizer = load_bleurt(path)
    direct = bleurt_score_batch(model, tokenizer, refs, cands)
    assert out["models"]["rl"]["bleurt"] == pytest.approx(sum(direct) / 3, abs=1e-6)
    assert out["bleurt_checkpoint"] == path
    assert not any("not computed" in note and "BLEURT" in note for note in out["notes"])


def test_bleurt_head_pruning_helper():
    # Heads 0..2 of size 2; pruning head 1 keeps rows 0,1 and 4,5.
    heads, index = find_pruneable_heads_and_indices([1], 3, 2, set())
    assert heads == {1} and index.tolist() == [0, 1, 4, 5]
    # Head 0 already gone: original head 2 is now at position 1 of the 2 left.
    heads, index = find_pruneable_heads_and_indices([0, 2], 2, 2, {0})
    assert heads == {2} and index.tolist() == [0, 1]


def test_bleurt_prune_heads_runs(tiny_bleurt):
    model, tokenizer = load_bleurt(str(tiny_bleurt[0]))
    attention = model.bleurt.encoder.layer[0].attention
    attention.prune_heads([1, 3])
    assert attention.self.num_attention_heads == 2 and attention.self.query.out_features == 16
    assert all(math.isfinite(s) for s in bleurt_score_batch(model, tokenizer, *PAIRS))


def test_bleurt_bad_checkpoints_raise_naming_them(tmp_path):
    with pytest.raises(BleurtLoadError, match="/no/such/bleurt"):
        load_bleurt("/no/such/bleurt")
    with pytest.raises(BleurtLoadError, match="someone/no-such-bleurt"):
        load_bleurt("someone/no-such-bleurt")  # hub id; the suite runs with HF_HUB_OFFLINE=1
    with pytest.raises(BleurtLoadError, match="no tokenizer vocabulary"):
        load_bleurt(str(tmp_path))
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\n")
    with pytest.raises(BleurtLoadError, match=f"{tmp_path}.*failed to load"):
        load_bleurt(str(tmp_path))  # vocabulary but no config/weights
    with pytest.raises(BleurtLoadError, match="/no/such/bleurt"):
        score_predictions([{"prediction": "a", "reference": "b"}],
                          ScoreConfig(bleurt_checkpoint="/no/such/bleurt"))


def test_bleurt_pickle_only_checkpoint_is_refused_unless_allowed(tiny_bleurt, tmp_path,
                                                                 monkeypatch):
    """A checkpoint published as pytorch_model.bin only: refused by default (unpickling can
    run code), loaded with allow_pickle=True, scoring exactly like the safetensors copy."""
    safe_dir, model = tiny_bleurt
    path = tmp_path / "bleurt-bin"
    path.mkdir()
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    shutil.copy(safe_dir / "vocab.txt", path / "vocab.txt")
    with pytest.raises(BleurtLoadError, match=rf"{path}: its only weights are pickle files "
                       r"\(pytorch_model\.bin\).*allow_pickle=True"):
        load_bleurt(str(path))
    rows = [{"prediction": c, "reference": r} for r, c in zip(*PAIRS)]
    with pytest.raises(BleurtLoadError, match="pytorch_model.bin"):
        score_predictions(rows, ScoreConfig(bleurt_checkpoint=str(path),
                                            semantic_similarity=False))
    loaded, tokenizer = load_bleurt(str(path), allow_pickle=True)
    want = bleurt_score_batch(*load_bleurt(str(safe_dir)), *PAIRS)
    assert bleurt_score_batch(loaded, tokenizer, *PAIRS) == pytest.approx(want, abs=1e-6)
    # the opt-in travels from the score config (a field the config may carry)
    import types

    cfg = types.SimpleNamespace(bleurt_checkpoint=str(path), semantic_similarity=False,
                                bleurt_allow_pickle=True)
    out = score_predictions(rows, cfg)
    assert out["models"]["default"]["bleurt"] == pytest.approx(sum(want) / 3, abs=1e-6)

    # A hub id: pickle files are not even downloaded unless allowed.
    import huggingface_hub

    asked = []

    def fake_download(repo, allow_patterns=None, **kw):
        asked.append(sorted(allow_patterns))
        return str(safe_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    load_bleurt("someone/bleurt-tiny")
    load_bleurt("someone/bleurt-tiny", allow_pickle=True)
    assert "*.bin" not in asked[0] and "*.safetensors" in asked[0] and "*.bin" in asked[1]


# ----------------------------------------------------------------------------- memory

def _peak_bytes(fn) -> int:
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_scoring_memory_stays_flat_as_the_test_set_grows(tmp_path):
    """Peak Python allocation while scoring N and 4N rows (each row carries a 16 KB input, as
    real test rows carry their document): streamed, the peak does not grow with N; a
    scorer that held the rows would need 3N x 16 KB more (~9.8 MB here)."""
    filler = "lorem ipsum dolor sit amet " * 600  # ~16 KB

    def predictions(n: int):
        path = tmp_path / f"p{n}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for i in range(n):
                f.write(json.dumps({"id": i, "input": filler, "variant": ("base", "rl")[i % 2],
                                    "reference": f"tool {i} parses the files of package {i}",
                                    "prediction": f"a tool that parses files number {i} well"})
                        + "\n")
        return path

    small, large = predictions(200), predictions(800)
    score_file(small, tmp_path / "warm.json", LEXICAL_ONLY)  # imports, caches, the stemmer
    peak_small = _peak_bytes(lambda: score_file(small, tmp_path / "s.json", LEXICAL_ONLY))
    peak_large = _peak_bytes(lambda: score_file(large, tmp_path / "l.json", LEXICAL_ONLY))
    held = _peak_bytes(lambda: list(open(large, encoding="utf-8")))  # what holding costs
    assert held > 12_000_000  # the rows themselves: the bound below is meaningful
    assert peak_large < peak_small + 1_000_000, (peak_small, peak_large)
    assert json.loads((tmp_path / "l.json").read_text())["models"]["rl"]["n"] == 400
