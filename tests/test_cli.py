"""The `lastmile` command line: `score` end to end, and bad input as exit 2 with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lastmile.cli import build_parser, main

ROWS = [
    {"id": 1, "input": "x", "reference": "the cat sat down",
     "prediction": "the cat sat on the mat all day", "variant": "base"},
    {"id": 1, "input": "x", "reference": "the cat sat down",
     "prediction": "the cat sat", "variant": "rl"},
    {"id": 2, "input": "y", "reference": "markets fell on monday",
     "prediction": "markets fell", "variant": "rl"},
    {"id": 1, "input": "x", "reference": "the cat sat down",
     "prediction": "a cat sat down", "variant": "mle"},
]


def _write(path, rows, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(extra_lines))
    return path


def test_score_prints_tables_and_writes_every_key(tmp_path, capsys):
    src = _write(tmp_path / "predictions.jsonl", ROWS)
    out = tmp_path / "scores.json"
    assert main(["score", "--input", str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "|  | Base | MLE | RL |" in printed
    assert "| extra length (words) | 4.0 | **0.0** | -1.5 |" in printed
    assert "| BLEURT | n/a | n/a | n/a |" in printed
    assert "RL against MLE" in printed  # the paired bootstrap's table
    assert "BLEURT not computed" in printed

    scores = json.loads(out.read_text())
    assert set(scores) == {"models", "bleurt_checkpoint", "notes", "paired_bootstrap"}
    assert list(scores["models"]) == ["base", "rl", "mle"]
    expected = {"n", "excess_length", "bleurt", "semantic_similarity"} | {
        f"{la}{k}_{p}" for la in ("", "la_") for k in ("rouge1", "rouge2", "rougeL")
        for p in ("precision", "recall", "f1")}
    for variant, values in scores["models"].items():
        assert set(values) == expected, variant
        assert values["bleurt"] is None
        assert all(isinstance(values[k], (int, float)) for k in expected - {"bleurt"})
    assert scores["models"]["rl"]["n"] == 2
    assert scores["models"]["rl"]["rouge1_precision"] == pytest.approx(1.0)
    assert 0.0 < scores["models"]["mle"]["semantic_similarity"] <= 1.0


def test_score_no_semantic_default_out(tmp_path, capsys, monkeypatch):
    src = _write(tmp_path / "predictions.jsonl", ROWS[:1])
    monkeypatch.chdir(tmp_path)
    assert main(["score", "--input", str(src), "--no-semantic"]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["models"]["base"]["semantic_similarity"] is None
    assert "| semantic similarity | n/a |" in capsys.readouterr().out


def test_bad_line_exits_2_naming_file_and_line(tmp_path, capsys):
    src = _write(tmp_path / "predictions.jsonl", ROWS[:2], ['{"prediction": "only"}\n'])
    args = ["score", "--input", str(src), "--out", str(tmp_path / "s.json"), "--no-semantic"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{src}:3" in err and "missing field 'reference'" in err
    assert not (tmp_path / "s.json").exists()


def test_missing_file_and_bad_checkpoint_exit_2(tmp_path, capsys):
    assert main(["score", "--input", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    src = _write(tmp_path / "p.jsonl", ROWS[:1])
    args = ["score", "--input", str(src), "--no-semantic", "--bleurt", str(tmp_path / "nockpt")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "nockpt" in err and err.count("\n") == 1


def test_console_entry_no_traceback(tmp_path):
    src = _write(tmp_path / "p.jsonl", [], ["{broken\n"])
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "lastmile.cli", "score", "--input", str(src),
                           "--no-semantic", "--out", str(tmp_path / "s.json")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{src}:1: not valid JSON" in proc.stderr


def test_help_documents_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([])  # a subcommand is required
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "scores.json in the current directory" in help_text
    assert "--bleurt" in help_text and "--no-semantic" in help_text


def test_export_and_predict_are_subcommands_with_documented_flags(capsys):
    for command, flags in (("export", ("--out", "--variant", "--merged", "runs/latest",
                                       "s3://")),
                           ("predict", ("--input", "--out", "--input-column", "--postprocess",
                                        "--batch-size", "--max-new-tokens", "--precision",
                                        ".parquet"))):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        help_text = " ".join(capsys.readouterr().out.split())
        for flag in flags:
            assert flag in help_text, (command, flag)
    with pytest.raises(SystemExit):
        main(["export", "runs/latest", "--out", "x", "--variant", "base"])  # rl or mle only
    assert "invalid choice: 'base'" in capsys.readouterr().err


def test_console_predict_and_export_errors_are_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    inputs = tmp_path / "in.csv"
    inputs.write_text("text\nhello\n")
    for args, message in (
            (["export", str(tmp_path / "no-run"), "--out", str(tmp_path / "e")],
             f"lastmile export: error: run {tmp_path / 'no-run'}: no such directory"),
            (["predict", str(tmp_path), "--input", str(inputs), "--out",
              str(tmp_path / "p.jsonl"), "--input-column", "body"],
             f"lastmile predict: error: --input-column 'body' not found in {inputs}")):
        proc = subprocess.run([sys.executable, "-m", "lastmile.cli", *args], capture_output=True,
                              text=True, env=env, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert message in proc.stderr
