"""lastmile.reproduce: mean ± sd over seeds from each run's scores.json, the paired-bootstrap
winners counted over seeds (issue 20, point 3), and `pipeline.py reproduce`'s arguments."""

from __future__ import annotations

import json
import math

import pytest

import pipeline
from lastmile import reproduce
from lastmile.io import write_json


def _scores(rl_la: float, rl_excess: float, mle_la: float, winner: str | None,
            low: float, high: float) -> dict:
    """A scores.json as gather writes it, cut down to what reproduce reads."""
    return {
        "models": {
            "mle": {"n": 100, "excess_length": 2.0, "la_rougeL_f1": mle_la, "bleurt": None},
            "rl": {"n": 100, "excess_length": rl_excess, "la_rougeL_f1": rl_la,
                   "bleurt": None},
        },
        "paired_bootstrap": {"comparisons": {"rl-mle": {
            "a": "rl", "b": "mle", "n": 100,
            "metrics": {"la_rougeL_f1": {"a": rl_la, "b": mle_la,
                                         "difference": rl_la - mle_la, "low": low,
                                         "high": high, "winner": winner}}}}},
    }


SEEDS = {0: _scores(0.20, 1.0, 0.20, None, -0.01, 0.01),
         1: _scores(0.23, 2.0, 0.20, "a", 0.01, 0.05),
         2: _scores(0.26, 4.0, 0.20, "a", 0.03, 0.09)}


def test_mean_and_sample_sd_by_hand():
    assert reproduce.mean_sd([]) == (None, None)
    assert reproduce.mean_sd([0.5]) == (0.5, None)
    mean, sd = reproduce.mean_sd([1.0, 2.0, 4.0])
    # mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9 over n - 1 = 2: sd = sqrt(7/3)
    assert mean == pytest.approx(7 / 3) and sd == pytest.approx(math.sqrt(7 / 3))


def test_aggregate_hand_made_scores():
    result = reproduce.aggregate(SEEDS)
    assert result["seeds"] == [0, 1, 2]
    rl = result["models"]["rl"]
    # la-ROUGE-L F1 0.20, 0.23, 0.26: mean 0.23, deviations -0.03, 0, 0.03 -> sd 0.03
    assert rl["la_rougeL_f1"]["mean"] == pytest.approx(0.23)
    assert rl["la_rougeL_f1"]["sd"] == pytest.approx(0.03)
    assert rl["excess_length"]["mean"] == pytest.approx(7 / 3)
    assert rl["excess_length"]["sd"] == pytest.approx(1.5275, abs=1e-4)
    assert rl["la_rougeL_f1"]["values"] == {0: 0.20, 1: 0.23, 2: 0.26}
    assert result["models"]["mle"]["la_rougeL_f1"]["sd"] == pytest.approx(0.0)
    assert "bleurt" not in rl  # null (not computed) is not averaged
    metric = result["comparisons"]["rl-mle"]["metrics"]["la_rougeL_f1"]
    assert metric["winners"] == {"a": 2, "b": 0, "none": 1}
    assert metric["difference_mean"] == pytest.approx(0.03)
    assert metric["per_seed"][2] == {"difference": pytest.approx(0.06), "low": 0.03,
                                     "high": 0.09, "winner": "a"}


def test_reproduce_reads_each_runs_scores_and_writes_the_tables(tmp_path):
    def run_one(seed: int):
        run = tmp_path / f"run-seed{seed}"  # a finished local run: scores.json in its folder
        run.mkdir()
        write_json(run / "scores.json", SEEDS[seed])
        return run

    lines = []
    result = reproduce.reproduce(run_one, [0, 1, 2], tmp_path / "summary", log=lines.append)
    assert len(lines) == 3 and result["runs"][2] == str(tmp_path / "run-seed2")
    written = json.loads((tmp_path / "summary" / "reproduce.json").read_text())
    assert written["models"]["rl"]["la_rougeL_f1"]["mean"] == pytest.approx(0.23)
    table = (tmp_path / "summary" / "reproduce.md").read_text()
    assert "| length-adjusted ROUGE-L F1 | 0.200 ± 0.000 | 0.230 ± 0.030 |" in table
    assert "| extra length (words) | 2.00 ± 0.00 | 2.33 ± 1.53 |" in table
    assert "+0.060 [+0.030, +0.090]" in table and "| +0.030 ± 0.030 | 2 / 0 / 1 |" in table
    with pytest.raises(ValueError, match="distinct seeds"):
        reproduce.reproduce(run_one, [1, 1], tmp_path / "again")
    with pytest.raises(FileNotFoundError, match="no scores.json"):
        reproduce.reproduce(lambda seed: tmp_path, [5], tmp_path / "none")


def test_reproduce_arguments_set_each_runs_seeds(capsys):
    args = pipeline._build_parser().parse_args(
        ["reproduce", "--profile", "smoke", "--param", "seed=7", "--param", "max_train=20"])
    settings = pipeline.settings_from_args(args, default_profile="demo")
    assert args.seeds == "0,1,2" and pipeline._seeds(args.seeds) == [0, 1, 2]
    one = pipeline.reproduce_settings(settings, 2, fixed_data=False).resolve("demo")
    assert one.name == "smoke" and one.data.max_train == 20
    # the seed parameter: every seeded stage, the data's too (the run's seed beats --param)
    assert [one.data.seed, one.negatives.seed, one.reward.seed, one.mle.seed, one.ppo.seed] \
        == [2] * 5
    fixed = pipeline.reproduce_settings(settings, 2, fixed_data=True).resolve("demo")
    assert fixed.data.seed == 0 and [fixed.negatives.seed, fixed.reward.seed, fixed.mle.seed,
                                     fixed.ppo.seed] == [2] * 4
    assert settings.parameters["seed"] == 7  # the caller's settings are left as they were
    for bad in ("0,x", "1,1", ""):
        assert pipeline.main(["reproduce", "--profile", "smoke", "--seeds", bad]) == 2
        assert "--seeds expects" in capsys.readouterr().err, bad


def test_reproduce_command_runs_each_seed_with_its_own_settings(tmp_path, monkeypatch, capsys):
    """`pipeline.py reproduce` end to end with the local run replaced by one that writes a
    finished run's scores (the real run is test_e2e's): each seed's run gets that seed in every
    seeded stage and its own folder, and the summary reads them."""
    monkeypatch.chdir(tmp_path)
    runs = []

    def run_locally(settings, out_dir, verbose):
        profile = settings.resolve("demo")
        runs.append((profile.reward.seed, profile.ppo.seed, out_dir))
        out_dir.mkdir(parents=True)
        write_json(out_dir / "scores.json", SEEDS[len(runs) - 1])
        return pipeline.LocalRun(out_dir, trained=True, message="")

    monkeypatch.setattr(pipeline, "run_locally", run_locally)
    code = pipeline.main(["reproduce", "--profile", "smoke", "--seeds", "4,9,1",
                          "--out", str(tmp_path / "summary")])
    assert code == 0
    assert [(r, p) for r, p, _ in runs] == [(4, 4), (9, 9), (1, 1)]
    assert [out.name.split("-seed")[1] for _, _, out in runs] == ["4", "9", "1"]
    written = json.loads((tmp_path / "summary" / "reproduce.json").read_text())
    assert written["models"]["rl"]["la_rougeL_f1"]["mean"] == pytest.approx(0.23)

    def skipped(settings, out_dir, verbose):
        return pipeline.LocalRun(out_dir, trained=False, message="no new data")

    monkeypatch.setattr(pipeline, "run_locally", skipped)
    assert pipeline.main(["reproduce", "--profile", "smoke", "--seeds", "0"]) == 2
    assert "seed 0: the run trained nothing (no new data)" in capsys.readouterr().err


def _finished_run(path, seed: int, scores: dict, data_seed: int | None = None):
    """A finished local run folder as pipeline.py run leaves it, cut down to what reproduce
    reads: run_info.json (its stages' seeds) and scores.json."""
    path.mkdir(parents=True)
    seeds = {stage: seed for stage in ("negatives", "reward", "mle", "ppo")}
    write_json(path / "run_info.json", {"profile": "demo", "seeds": {
        "data": seed if data_seed is None else data_seed, **seeds}})
    write_json(path / "scores.json", scores)
    return path


def test_reproduce_from_runs_that_already_finished(tmp_path, capsys):
    """`reproduce --from-runs`: runs made side by side or elsewhere give the same summary as
    `reproduce` running them, each seed read from the run's own run_info.json."""
    runs = [_finished_run(tmp_path / name, seed, SEEDS[seed])
            for name, seed in (("b", 2), ("a", 0), ("c", 1))]
    out = tmp_path / "summary"
    assert pipeline.main(["reproduce", "--from-runs", *map(str, runs), "--out", str(out)]) == 0
    written = json.loads((out / "reproduce.json").read_text())
    assert written["seeds"] == [0, 1, 2] and written["runs"]["1"] == str(tmp_path / "c")
    assert written["fixed_data"] is False
    table = (out / "reproduce.md").read_text()
    assert "| length-adjusted ROUGE-L F1 | 0.200 ± 0.000 | 0.230 ± 0.030 |" in table
    assert "| +0.030 ± 0.030 | 2 / 0 / 1 |" in table
    assert "3 runs (seeds 0, 1, 2)" in capsys.readouterr().out

    # `reproduce --fixed-data --seeds 0,1,2`: every run on data seed 0, the seed-0 run included
    fixed = [_finished_run(tmp_path / f"fixed{seed}", seed, SEEDS[seed], data_seed=0)
             for seed in (0, 1, 2)]
    assert reproduce.run_seed(fixed[1]) == (1, 0)
    assert pipeline.main(["reproduce", "--from-runs", *map(str, fixed),
                          "--out", str(tmp_path / "fixed")]) == 0
    assert json.loads((tmp_path / "fixed" / "reproduce.json").read_text())["fixed_data"] is True
    capsys.readouterr()
    for bad, message in (([runs[0], fixed[1]], "some runs drew their rows with their own seed"),
                         ([runs[0], runs[0]], "both ran seed 2"),
                         ([tmp_path / "nowhere"], "no run_info.json")):
        assert pipeline.main(["reproduce", "--from-runs", *map(str, bad),
                              "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
    assert pipeline.main(["reproduce", "--from-runs", str(runs[0]), "--seeds", "4,5",
                          "--param", "seed=1", "--out", str(tmp_path / "bad")]) == 2
    assert "drop --seeds, --param" in capsys.readouterr().err
    mixed = _finished_run(tmp_path / "mixed", 3, SEEDS[0])
    info = json.loads((mixed / "run_info.json").read_text())
    info["seeds"]["ppo"] = 4
    write_json(mixed / "run_info.json", info)
    with pytest.raises(ValueError, match="different seeds"):
        reproduce.run_seed(mixed)
    assert not (tmp_path / "bad").exists()  # nothing written for a bad set of runs
