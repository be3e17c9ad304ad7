"""The benchmarks keep working (issue 8): tiny smoke runs of bench/*.py, whose output lines must
parse and be finite, and the comparison script's pure parts. Never a time assertion: these are
benchmarks, not timed tests."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
TRL_PYTHON = ROOT / ".venv-trl" / "bin" / "python"

PPO_STEP_FIGURES = {
    "sampled_update_seconds", "reference_update_seconds", "sampling_seconds",
    "sampled_reward_seconds", "sampled_train_seconds", "reference_reward_seconds",
    "reference_train_seconds", "sampling_tokens_per_second", "peak_rss_gib"}
COMPARISON_FIGURES = {
    "ours_sampled_update_seconds", "ours_reference_update_seconds", "ours_peak_rss_gib",
    "ours_sampling_tokens_per_second", "trl_update_seconds", "trl_peak_rss_gib",
    "trl_sampling_tokens_per_second", "time_ratio", "reference_time_ratio", "rss_ratio",
    "sampling_speedup"}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def vs():
    return _load("ppo_vs_trl")  # the standard library only, at import


def _run(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + "\n" + proc.stderr[-4000:]
    return proc.stdout


def _finite(figures: dict[str, float]) -> None:
    bad = {k: v for k, v in figures.items() if not math.isfinite(v) or v < 0}
    assert not bad, bad


# ----------------------------------------------------------------------------- smoke runs

def test_ppo_step_smoke(tmp_path, vs):
    out = _run([str(BENCH / "ppo_step.py"), "--smoke", "--json", str(tmp_path / "r.json")])
    figures = vs.parse_figures(out)
    assert PPO_STEP_FIGURES <= figures.keys(), out
    _finite(figures)
    assert figures["peak_rss_gib"] > 0 and figures["sampling_tokens_per_second"] > 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert len(result["sampled_update_seconds_all"]) == 2  # --smoke: 2 measured updates
    assert len(result["reference_update_seconds_all"]) == 2
    # the bundled prompts are gzipped JSON Lines; they must be read, not replaced by filler
    assert result["source"] == "data/debian-descriptions/train.jsonl.gz"


def test_ppo_step_reads_a_prompts_file(tmp_path, vs):
    """--prompts: the comparison hands both sides the same token ids through this file."""
    prompts = {"prompts": [[1, 9690, 198, 28, 29]] * 2, "references": [[28, 2]] * 2,
               "source": "a test"}
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    out = _run([str(BENCH / "ppo_step.py"), "--smoke", "--batch", "2",
                "--prompts", str(tmp_path / "p.json"), "--json", str(tmp_path / "r.json")])
    _finite(vs.parse_figures(out))
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["source"] == "a test" and result["prompt_tokens_mean"] == 5
    assert result["batch"] == 2


@pytest.mark.skipif(not TRL_PYTHON.exists(),
                    reason=".venv-trl absent: `make bench-trl` builds TRL 0.29.1's venv (CI has "
                           "none; the comparison's pure parts are tested below)")
def test_ppo_vs_trl_smoke(tmp_path, vs):
    out = _run([str(BENCH / "ppo_vs_trl.py"), "--smoke", "--trl-python", str(TRL_PYTHON),
                "--json", str(tmp_path / "r.json")])
    figures = vs.parse_figures(out)
    assert COMPARISON_FIGURES <= figures.keys(), out
    _finite(figures)
    result = json.loads((tmp_path / "r.json").read_text())
    trl = result["trl"][0]
    assert trl["trl"] == vs.TRL_VERSION
    assert len(trl["update_seconds_all"]) == 2
    assert trl["new_tokens_per_row"] == 8  # no stop token: every response is full length
    assert result["ours"][0]["base"] == trl["base_dir"]  # the same weights on both sides


# ----------------------------------------------------------------------------- pure parts

def _ours(sampled, reference, rss, tps):
    return {"sampled_update_seconds_all": sampled, "reference_update_seconds_all": reference,
            "peak_rss_gib": rss, "sampling_tokens_per_second": tps}


def _trl(updates, rss, tps):
    return {"update_seconds_all": updates, "peak_rss_gib": rss, "sampling_tokens_per_second": tps}


def test_summarize_pools_rounds_and_takes_ratios(vs):
    s = vs.summarize([_ours([10, 12], [4, 6], 2.0, 40), _ours([14, 30], [5, 5], 3.0, 50)],
                     [_trl([60, 62], 18.0, 10), _trl([58, 64], 17.0, 20)])
    assert s["rounds"] == 2
    assert s["ours_sampled_update_seconds"] == 13  # median of 10, 12, 14, 30
    assert s["ours_reference_update_seconds"] == 5
    assert s["ours_peak_rss_gib"] == 3.0  # the largest peak of any round
    assert s["trl_update_seconds"] == 61
    assert s["trl_peak_rss_gib"] == 18.0
    assert s["time_ratio"] == pytest.approx(13 / 61)
    assert s["reference_time_ratio"] == pytest.approx(5 / 61)
    assert s["rss_ratio"] == pytest.approx(3 / 18)
    assert s["sampling_speedup"] == pytest.approx(45 / 15)


def test_table_and_figure_lines(vs):
    s = vs.summarize([_ours([20], [8], 4.0, 40)], [_trl([61], 18.2, 10)])
    table = vs.format_table(s)
    assert "TRL 0.29.1" in table
    sampled = next(line for line in table.splitlines() if line.startswith("s/update, sampled"))
    rss = next(line for line in table.splitlines() if line.startswith("peak RSS"))
    assert "0.33x" in sampled and "<= 0.50x met" in sampled
    assert "0.22x" in rss and "<= 0.25x met" in rss
    slow = vs.format_table(vs.summarize([_ours([40], [8], 9.0, 40)], [_trl([61], 18.2, 10)]))
    assert slow.count("NOT met") == 2
    # the `name value unit` lines parse back to the summary (3 decimals), and nothing else does
    parsed = vs.parse_figures("\n".join([table, *vs.figure_lines(s)]))
    assert parsed.keys() == COMPARISON_FIGURES
    for key, value in parsed.items():
        assert value == pytest.approx(s[key], abs=1e-3)


def test_ratio_of_nothing_is_nan_not_an_error(vs):
    assert math.isnan(vs.ratio(1.0, 0.0))
    s = vs.summarize([_ours([1], [1], 1.0, 1)], [_trl([0], 0.0, 0)])
    assert math.isnan(s["time_ratio"]) and math.isnan(s["rss_ratio"])
    assert "n/a" in vs.format_table(s)


def test_parse_figures_reads_ppo_step_output(vs):
    text = ("setting base=tiny-random batch=7 prompt_tokens=65\n"
            "sampled_update_seconds 1.99 s\npeak_rss_gib 0.45 GiB\n"
            "sampling_tokens_per_second 84.57 tok/s\nsampled_vs_trl 0.20 x (TRL 61.0 s)\n"
            "round 1 ours sampled 1.99 s/update\n")
    assert vs.parse_figures(text) == {"sampled_update_seconds": 1.99, "peak_rss_gib": 0.45,
                                      "sampling_tokens_per_second": 84.57,
                                      "sampled_vs_trl": 0.20}


def test_smoke_arguments(vs):
    args = vs.parse(["--smoke"])
    assert (args.updates, args.rounds, args.new_tokens, args.prompt_tokens) == (2, 1, 8, 64)
    full = vs.parse([])
    assert (full.batch, full.new_tokens, full.prompt_tokens, full.updates) == (7, 100, 250, 5)
    assert (full.lora_r, full.lora_alpha) == (32, 16)
    with pytest.raises(SystemExit):
        vs.parse(["--worker", "trl"])  # a worker needs its base, prompts and output


def test_trl_pad_token_is_not_in_the_prompts(vs, tokenizer):
    """SmolLM2 pads with <|im_end|>, which every chat prompt holds; TRL masks pad ids as padding,
    so the worker must pick another."""
    tok = copy.deepcopy(tokenizer)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                     add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.pad_token_id in ids
    pad = vs._pad_token_id(tok, [ids])
    assert pad not in ids and tok.pad_token_id == pad
    other = copy.deepcopy(tokenizer)
    assert vs._pad_token_id(other, [[5, 6]]) == other.pad_token_id  # absent: kept


def test_machine_description(vs):
    m = vs.machine()
    assert m["cores"] >= 1 and m["cpu"]


# ----------------------------------------------------------------------------- scaling.py

SCALING_STAGES = {"filter_data", "negatives", "train_reward", "train_mle", "train_ppo",
                  "generate_base", "generate_mle", "generate_rl", "postprocess_base",
                  "postprocess_mle", "score"}


@pytest.fixture(scope="module")
def scaling():
    return _load("scaling")  # the standard library only, at import


@pytest.mark.e2e  # the whole pipeline through kfp.local, once (about 2 minutes on 2 cores)
def test_scaling_smoke(tmp_path, scaling):
    out = _run([str(BENCH / "scaling.py"), "--smoke", "--keep", str(tmp_path / "runs"),
                "--json", str(tmp_path / "r.json")])
    assert "machine cpu=" in out and "s per example, 2 shards" in out, out
    result = json.loads((tmp_path / "r.json").read_text())  # strict: no NaN is written
    (run,) = result["runs"]
    assert (run["train"], run["test"], run["shards"], run["planned_shards"]) == (28, 8, 2, 2)
    assert set(run["stages"]) == SCALING_STAGES, sorted(run["stages"])
    for stage in ("generate_base", "generate_rl", "postprocess_mle", "score"):
        assert run["stages"][stage]["tasks"] == 2, stage
    assert run["stages"]["train_reward"]["unit"] == "train"
    assert run["stages"]["generate_rl"]["examples"] == 8
    figures = scaling.figures(result)
    assert len(figures) >= 3 * len(SCALING_STAGES)
    bad = {k: v for k, v in figures.items() if not math.isfinite(v)}
    assert not bad, bad
    assert run["wall_seconds"] > 0 and result["machine"]["cores"] >= 1


def _summaries(train: int, test: int, shards: int) -> dict:
    sharded = {"shards": shards, "wall_seconds": (1 + 0.25 * test) / shards,
               "shard_seconds": [(1 + 0.25 * test) / shards] * shards}
    return {"filter_data": {"seconds": 2.0, "rows_in": {"train": 3000, "test": 500},
                            "rows_out": {"train": train, "test": test}},
            "train_reward": {"seconds": 5 + 0.5 * train, "rows": 6 * train},
            "generate_base": {"seconds": 1 + 0.25 * test, "n": test, **sharded},
            "score": {"seconds": 3.0, "n": 5 * test}}


def test_scaling_fits_the_cost_per_example(scaling):
    runs = [scaling.run_record(tr, te, k, 60 + 0.1 * (tr + te), _summaries(tr, te, k))
            for tr, te in ((28, 8), (56, 16), (112, 32)) for k in (1, 2)]
    reward = runs[0]["stages"]["train_reward"]
    assert reward["unit"] == "train" and reward["examples"] == 28
    assert reward["seconds_per_example"] == pytest.approx((5 + 14) / 28)
    assert reward["stage_rows"] == 168
    generate = runs[1]["stages"]["generate_base"]  # 28:8, 2 shards
    assert generate["tasks"] == 2 and generate["wall_seconds"] == pytest.approx(1.5)
    assert runs[1]["planned_shards"] == 2
    fits = scaling.fits(runs)
    assert fits["1"]["train_reward"]["slope_seconds_per_example"] == pytest.approx(0.5)
    assert fits["1"]["train_reward"]["fixed_seconds"] == pytest.approx(5)
    assert fits["2"]["generate_base"]["slope_seconds_per_example"] == pytest.approx(0.25)
    assert fits["1"]["score"]["slope_seconds_per_example"] == pytest.approx(0, abs=1e-9)
    assert fits["1"]["run_wall"]["slope_seconds_per_example"] == pytest.approx(0.1)
    result = {"runs": runs, "fits": fits}
    table = scaling.format_tables(result)
    assert "generate_base x2" in table and "2 shards, slowest shard" in table
    assert all(math.isfinite(v) for v in scaling.figures(result).values())


def test_scaling_one_size_fits_nothing(scaling):
    assert scaling.fit_line([8], [3.0]) == (None, None)
    assert scaling.fit_line([8, 8], [3.0, 4.0]) == (None, None)
    run = scaling.run_record(28, 8, 1, 90.0, _summaries(28, 8, 1))
    result = {"runs": [run], "fits": scaling.fits([run])}
    assert "n/a" in scaling.format_tables(result)
    json.dumps(result, allow_nan=False)  # what --json writes: strict JSON
    assert not any(k.startswith("fit_") for k in scaling.figures(result))


def test_scaling_arguments(scaling):
    assert scaling.parse_sizes("28:8, 56:16") == [(28, 8), (56, 16)]
    for bad in ("28", "0:8", "28:x"):
        with pytest.raises(ValueError):
            scaling.parse_sizes(bad)
    assert scaling.parse_shards("1,2") == [1, 2]
    smoke = scaling.parse(["--smoke"])
    assert (smoke.sizes, smoke.shards, smoke.capped) == ("28:8", "2", True)
    full = scaling.parse([])
    assert len(scaling.parse_sizes(full.sizes)) >= 3 and full.shards == "1,2" and not full.capped
    with pytest.raises(SystemExit):
        scaling.parse(["--shards", "0"])
