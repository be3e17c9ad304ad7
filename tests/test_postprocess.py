"""The paper's two post-processing rules (§4.3), each for the model the paper applied it to,
with its cases as exact values."""

from __future__ import annotations

import json

import pytest

from lastmile.postprocess import (PAPER_RULES, clean, clean_with_flags,
                                  postprocess_predictions)


@pytest.mark.parametrize("raw, cleaned", [
    # Rule 1: a "Sure," response with a newline loses its first line.
    ("Sure, here is a summary:\nAlice meets Bob.", "Alice meets Bob."),
    ("Sure, here's a summary:\n\nThe text says hi.", ""),  # the paper's cut: the line is blank
    ("  Sure, here you go:\nAlice meets Bob.", "Alice meets Bob."),  # after leading whitespace
    ("Sure, here it is:\n", ""),  # nothing but the "Sure," line: empty, as the rule says
    # No newline: rule 1 does not apply and rule 2 has nothing to cut.
    ("Sure, here is a summary:", "Sure, here is a summary:"),
    ("No newline", "No newline"),
    # Rule 2: only the first line survives.
    ("Alice meets Bob.\nBob is late.", "Alice meets Bob."),
    ("Alice meets Bob.\nSure, fine.", "Alice meets Bob."),
    # A "Sure," that does not start the response is not touched.
    ("Alice said: Sure, why not.", "Alice said: Sure, why not."),
    ("He agreed. Sure, he did.\nMore.", "He agreed. Sure, he did."),
    ("sure, lower case:\nAlice.", "sure, lower case:"),  # "Sure," is matched as quoted
    # Whatever precedes the first newline, stripped, even when that is nothing.
    ("\n\n  Alice meets Bob.  \nBob is late.", ""),
    ("  Alice meets Bob.  \nBob is late.", "Alice meets Bob."),
    ("   \n\t\n", ""),
    ("", ""),
    # CRLF and a lone CR count as one newline.
    ("Sure, here is a summary:\r\nAlice meets Bob.\r\nBob is late.", "Alice meets Bob."),
    ("Alice meets Bob.\rBob is late.", "Alice meets Bob."),
    # Only the first "Sure," line goes; a second one is then the first line.
    ("Sure, ok:\nSure, again:\nAlice.", "Sure, again:"),
])
def test_clean(raw, cleaned):
    assert clean(raw) == cleaned


@pytest.mark.parametrize("variant, raw, cleaned", [
    # §4.3: the base model loses its "Sure, ..." line and keeps the rest whole ...
    ("base", "Sure, here is a summary:\nAlice meets Bob.\nBob is late.",
     "Alice meets Bob.\nBob is late."),
    ("base", "Alice meets Bob.\nBob is late.", "Alice meets Bob.\nBob is late."),
    ("base", "Sure, here's a summary:\n\nThe text.", "The text."),
    # ... and the MLE model is cut at its first newline, "Sure," or not.
    ("mle", "Alice meets Bob.\nBob is late.", "Alice meets Bob."),
    ("mle", "Sure, here is a summary:\nAlice meets Bob.", "Sure, here is a summary:"),
])
def test_each_model_gets_the_papers_rule(variant, raw, cleaned):
    assert clean_with_flags(raw, PAPER_RULES[variant]).text == cleaned


def test_flags_say_which_rule_removed_something():
    flags = clean_with_flags("Sure, x:\nA.\nB.")
    assert (flags.text, flags.sure_dropped, flags.truncated) == ("A.", True, True)
    flags = clean_with_flags("Sure, x:\nA.\n\n  ")
    assert (flags.text, flags.sure_dropped, flags.truncated) == ("A.", True, False)
    flags = clean_with_flags("A.\nB.")
    assert (flags.text, flags.sure_dropped, flags.truncated) == ("A.", False, True)
    flags = clean_with_flags("  A.  ")
    assert (flags.text, flags.sure_dropped, flags.truncated) == ("A.", False, False)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_postprocess_predictions(tmp_path):
    rows = [
        {"id": "1", "input": "i1", "reference": "r1", "variant": "base",
         "prediction": "Sure, here is a summary:\nAlice meets Bob.\nThen more."},
        {"id": "2", "input": "i2", "reference": "r2", "variant": "base",
         "prediction": "Alice meets Bob."},
        {"id": "3", "input": "i3", "reference": "r3", "variant": "mle",
         "prediction": "Bob is late.\nBob is late.\nBob is late."},
        {"id": "4", "input": "i4", "reference": "r4", "variant": "base",
         "prediction": " Padded. "},
    ]
    write_rows(tmp_path / "in.jsonl", rows)
    summary = postprocess_predictions(tmp_path / "in.jsonl", tmp_path / "out" / "p.jsonl")
    out = [json.loads(line) for line in (tmp_path / "out" / "p.jsonl").open(encoding="utf-8")]
    assert [r["prediction"] for r in out] == ["Alice meets Bob.\nThen more.", "Alice meets Bob.",
                                              "Bob is late.", "Padded."]
    assert [r["variant"] for r in out] == ["base_cleaned", "base_cleaned", "mle_cleaned",
                                           "base_cleaned"]
    assert [r["raw_prediction"] for r in out] == [r["prediction"] for r in rows]
    assert [(r["id"], r["input"], r["reference"]) for r in out] == \
        [(r["id"], r["input"], r["reference"]) for r in rows]
    assert summary == {"stage": "postprocess", "rows": 4, "changed": 3, "sure_dropped": 1,
                       "truncated": 1, "variants": ["base_cleaned", "mle_cleaned"],
                       "rules": {"base": ["sure"], "mle": ["first_line"]}}


def test_postprocess_suffix(tmp_path):
    write_rows(tmp_path / "in.jsonl", [{"id": "1", "reference": "r", "variant": "rl",
                                        "prediction": "a\nb"}])
    postprocess_predictions(tmp_path / "in.jsonl", tmp_path / "o.jsonl", variant_suffix="_c")
    assert json.loads((tmp_path / "o.jsonl").read_text())["variant"] == "rl_c"
    with pytest.raises(ValueError, match="variant_suffix"):
        postprocess_predictions(tmp_path / "in.jsonl", tmp_path / "o.jsonl", variant_suffix="")


@pytest.mark.parametrize("row, message", [
    ({"id": "x", "variant": "base", "prediction": None}, r"row 1 \(id='x'\).*'prediction'"),
    ({"id": "x", "variant": "", "prediction": "a"}, r"row 1 \(id='x'\).*'variant'"),
    ({"id": "x", "prediction": "a"}, r"row 1 \(id='x'\).*'variant'"),
])
def test_bad_rows_raise_naming_file_and_row(tmp_path, row, message):
    write_rows(tmp_path / "in.jsonl", [row])
    with pytest.raises(ValueError, match=message) as info:
        postprocess_predictions(tmp_path / "in.jsonl", tmp_path / "o.jsonl")
    assert "in.jsonl" in str(info.value)
    assert not (tmp_path / "o.jsonl").exists()


def test_empty_predictions_file_is_an_error(tmp_path):
    (tmp_path / "in.jsonl").write_text("")
    with pytest.raises(ValueError, match="no predictions"):
        postprocess_predictions(tmp_path / "in.jsonl", tmp_path / "o.jsonl")
