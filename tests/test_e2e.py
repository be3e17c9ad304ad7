"""The whole DAG through kfp.local on a tiny random model and a few dozen rows (profile smoke)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("base", "mle", "rl", "base_cleaned", "mle_cleaned")
REPORT_FILES = ("report.md", "report.html", "scores.json", "ppo_curves.png", "length_hist.png",
                "rm_accuracy.png")


def _check_report(out: Path) -> dict:
    for name in REPORT_FILES:
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
        assert (out / name).stat().st_size > 0, name
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["models"]) == set(VARIANTS)
    for variant, values in scores["models"].items():
        assert values["n"] > 0
        for key, value in values.items():
            if key == "bleurt":
                assert value is None  # no checkpoint given: reported as not computed
                continue
            assert isinstance(value, (int, float)) and math.isfinite(value), (variant, key, value)
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html
    summaries = list((out / "summaries").glob("*.json"))
    assert len(summaries) >= 9, summaries  # one per stage
    return scores


@pytest.mark.e2e
def test_smoke_pipeline_end_to_end(tmp_path):
    import pipeline

    out = pipeline.run_locally("smoke", tmp_path / "run")
    _check_report(out)
