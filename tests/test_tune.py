"""lastmile.tune: the equal MLE / RL step-size search on a validation split of the training rows
(issue 20, point 1), and `pipeline.py tune` on the smoke profile (tiny random Llama)."""

from __future__ import annotations

import json

import pytest

import pipeline
from lastmile import config, tune
from lastmile.io import read_jsonl


def _rows(n: int) -> list[dict]:
    return [{"id": f"r{i}", "input": f"input {i}", "output": f"output {i}"} for i in range(n)]


def test_validation_split_is_deterministic_disjoint_and_sized():
    rows = _rows(50)
    fit, validation = tune.split_validation(rows, 0.1)
    assert len(validation) == 5 and len(fit) == 45
    assert {r["id"] for r in fit}.isdisjoint(r["id"] for r in validation)
    assert {r["id"] for r in fit} | {r["id"] for r in validation} == {r["id"] for r in rows}
    # the same rows in another order: the same held-out ids (a hash of the id, no seed)
    again = tune.split_validation(list(reversed(rows)), 0.1)[1]
    assert {r["id"] for r in again} == {r["id"] for r in validation}
    # at least one row each side, even when 10% rounds to none
    fit, validation = tune.split_validation(_rows(3), 0.1)
    assert (len(fit), len(validation)) == (2, 1)
    with pytest.raises(ValueError, match="too few"):
        tune.split_validation(_rows(1), 0.1)
    with pytest.raises(ValueError, match="unique ids"):
        tune.split_validation(_rows(4) + _rows(1), 0.1)


def test_grids_hold_the_profiles_values_half_a_decade_apart():
    # 1e-4 * 10 ** (k / 2) for k = -1, 0, 1, 2, to two significant digits
    assert tune.log_grid(1e-4, 4) == [3.2e-5, 1e-4, 3.2e-4, 1e-3]
    assert tune.log_grid(1e-4, 3) == [3.2e-5, 1e-4, 3.2e-4]
    assert tune.log_grid(3e-4, 1) == [3e-4]
    demo = config.get_profile("demo")  # MLE 1e-4; PPO 3e-4, value head 3e-3
    assert [t["mle.optim.learning_rate"] for t in tune.mle_grid(demo, 4)] == \
        [3.2e-5, 1e-4, 3.2e-4, 1e-3]
    # 4 = 2 x 2: each step size at the profile's value and half a decade above
    assert [tuple(t.values()) for t in tune.rl_grid(demo, 4)] == \
        [(3e-4, 3e-3), (3e-4, 9.5e-3), (9.5e-4, 3e-3), (9.5e-4, 9.5e-3)]
    # not a square: both move together, their ratio fixed
    assert [tuple(t.values()) for t in tune.rl_grid(demo, 2)] == [(3e-4, 3e-3), (9.5e-4, 9.5e-3)]
    assert len(tune.mle_grid(demo, 3)) == len(tune.rl_grid(demo, 3)) == 3


def _trial(n: int, la: float, excess: float) -> dict:
    return {"trial": n, "settings": {}, "validation": {"la_rougeL_f1": la,
                                                       "excess_length": excess}}


def test_selection_rule_puts_rl_outside_three_words_below_every_trial_inside():
    trials = [_trial(1, 0.30, 5.0), _trial(2, 0.20, -2.9), _trial(3, 0.25, 3.0),
              {"trial": 4, "settings": {}, "error": "FloatingPointError: nan"}]
    assert tune.select("rl", trials)["trial"] == 3  # 1 scores higher but is 5 words long
    assert tune.select("mle", trials)["trial"] == 1  # MLE: la-ROUGE-L F1 alone
    ranked = sorted(trials, key=lambda t: tune.rank_key("rl", t))
    assert [t["trial"] for t in ranked] == [3, 2, 1, 4]
    assert tune.select("rl", [_trial(1, 0.3, 9.0)])["trial"] == 1  # none inside: still one
    assert tune.select("rl", [trials[3]]) is None
    assert "+-3 words" in tune.selection_rule()


def test_tune_smoke_records_every_trial_on_train_rows_only(tmp_path, capsys, tokenizer):
    """2 MLE + 2 RL trials; validation rows come from train.jsonl, never the test split; the
    printed configuration is one `pipeline.py run --config` accepts."""
    out = tmp_path / "tune"
    assert pipeline.main(["tune", "--profile", "smoke", "--trials", "2", "--max-train", "30",
                          "--out", str(out)]) == 0
    record = json.loads((out / "tune.json").read_text())
    assert [(t["method"], t["trial"]) for t in record["trials"]] == \
        [("mle", 1), ("mle", 2), ("rl", 1), ("rl", 2)]
    for t in record["trials"]:
        assert "error" not in t, t
        assert set(t["validation"]) >= {"la_rougeL_f1", "excess_length", "n"}
        assert t["validation"]["n"] == record["data"]["validation_rows"] == 3
        assert t["seconds"] > 0
    assert set(record["trials"][0]["settings"]) == {"mle.optim.learning_rate"}
    assert set(record["trials"][2]["settings"]) == {"ppo.optim.learning_rate",
                                                    "ppo.optim.head_learning_rate"}

    # The validation rows: a subset of the filtered training rows, none of the test rows.
    data = out / "data"
    train_ids = {r["id"] for r in read_jsonl(data / "train.jsonl")}
    validation_ids = {r["id"] for r in read_jsonl(data / "validation.jsonl")}
    fit_ids = {r["id"] for r in read_jsonl(data / "fit.jsonl")}
    assert validation_ids == set(record["data"]["validation_ids"])
    assert validation_ids <= train_ids and fit_ids == train_ids - validation_ids
    assert not (data / "test.jsonl").exists()  # deleted as soon as the filter wrote it
    from lastmile import data as task_data

    profile = config.resolve("smoke", {}, max_train=30)
    task_data.prepare(task_data.DEFAULT_DATA, tmp_path / "filtered", profile.data, tokenizer)
    test_ids = {r["id"] for r in read_jsonl(tmp_path / "filtered" / "test.jsonl")}
    assert test_ids and validation_ids.isdisjoint(test_ids)

    # The chosen values as a run configuration: printed, written, and accepted by `run`.
    printed = capsys.readouterr().out
    chosen_yaml = (out / "chosen.yaml").read_text()
    assert chosen_yaml in printed
    assert f"run --profile smoke --config {out / 'chosen.yaml'}" in printed
    # the file alone names its profile: `run` takes it (not its own demo default)
    args = pipeline._build_parser().parse_args(["run", "--config", str(out / "chosen.yaml")])
    resolved = pipeline.settings_from_args(args, default_profile="demo").resolve("demo")
    assert resolved.name == "smoke"
    chosen = record["chosen"]
    assert resolved.mle.optim.learning_rate == \
        chosen["mle"]["settings"]["mle.optim.learning_rate"]
    for key, value in chosen["rl"]["settings"].items():
        assert config._get(resolved, key) == value
    markdown = (out / "tune.md").read_text()
    assert markdown.count("**chosen**") == 2 and "+-3 words" in markdown
