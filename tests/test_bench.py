"""The benchmarks keep working (issue 8): tiny smoke runs of bench/*.py, whose output lines must
parse and be finite, and the comparison script's pure parts. Never a time assertion: these are
benchmarks, not timed tests."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
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


def _load(name: str, register: bool = False):
    """Import bench/<name>.py. The environment is restored afterwards: a script's import-time
    settings (HF_HUB_OFFLINE, TRANSFORMERS_VERBOSITY) must not reach later tests."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    if register:  # its dataclasses look their module up in sys.modules
        sys.modules[spec.name] = module
    saved = dict(os.environ)
    try:
        spec.loader.exec_module(module)
    finally:
        os.environ.clear()
        os.environ.update(saved)
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


@pytest.fixture(scope="module")
def scaling():
    return _load("scaling")  # the standard library only, at import


def test_scaling_starts_a_pipeline_run_the_cli_accepts_with_each_size(scaling, tmp_path):
    """The command run_once starts parses and resolves as `pipeline.py run` does (the figures
    of a real run are checked on test_e2e's sharded run: `scaling.py --runs`)."""
    import pipeline

    args = scaling.parse(["--smoke", "--param", "seed=3"])
    cmd = scaling.pipeline_command(args, 28, 8, 2, tmp_path / "out")
    assert cmd[1:3] == [str(BENCH.parent / "pipeline.py"), "run"]
    parsed = pipeline._build_parser().parse_args(cmd[2:])
    profile = pipeline.settings_from_args(parsed).resolve()
    assert (profile.name, profile.data.max_train, profile.data.max_test) == ("smoke", 28, 8)
    assert profile.generate.num_shards == 2 and profile.ppo.seed == 3
    uncapped = scaling.pipeline_command(scaling.parse([]), 56, 16, 1, tmp_path / "out")
    profile = pipeline.settings_from_args(pipeline._build_parser().parse_args(uncapped[2:]))
    profile = profile.resolve()
    assert profile.ppo.max_updates is None and profile.mle.max_steps is None


def _finished_run(folder: Path, seconds: float = 12.0) -> Path:
    """A run folder as pipeline.py leaves it, with two stage summaries."""
    from lastmile import config, console

    (folder / "summaries").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config.get_profile("smoke").to_dict()))
    summaries = _summaries(28, 8, 1)
    for stage in ("filter_data", "train_reward"):
        (folder / "summaries" / f"{stage}.json").write_text(json.dumps(summaries[stage]))
    console.write_status(folder, console.COMPLETE_FILE, {"status": "done", "seconds": seconds})
    return folder


def test_scaling_reads_finished_runs_and_refuses_unfinished_or_twin_ones(scaling, tmp_path):
    run = _finished_run(tmp_path / "a")
    result = scaling.measure(scaling.parse(["--runs", str(run)]))
    (record,) = result["runs"]
    assert (record["profile"], record["shards"], record["wall_seconds"]) == ("smoke", 1, 12.0)
    assert record["stages"]["train_reward"]["seconds"] == 5 + 0.5 * 28
    assert result["setting"]["profile"] == "smoke"
    twin = _finished_run(tmp_path / "b", seconds=13.0)
    with pytest.raises(SystemExit, match="the same size .* and shard count"):
        scaling.measure(scaling.parse(["--runs", str(run), str(twin)]))
    (tmp_path / "c").mkdir()
    with pytest.raises(SystemExit, match="not a finished run"):
        scaling.record_from_run(tmp_path / "c")


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


# ----------------------------------------------------------------------------- stage_costs.py

@pytest.fixture(scope="module")
def costs():
    return _load("stage_costs", register=True)


def _stage(name: str, folder: Path, run: Path, fn):
    """Run one stage function as its component does (runinfo.stage writes summary.json) and
    file the summary where `pipeline.py run` puts it (summaries/<stage>.json)."""
    from lastmile import runinfo

    with runinfo.stage(name, folder) as summary:
        summary.update(fn())
    (run / "summaries").mkdir(exist_ok=True)
    (run / "summaries" / f"{name}.json").write_text(json.dumps(summary))
    return summary


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder laid out as `pipeline.py run` writes it, made by the real stage functions
    on the tiny random Llama (profile smoke, 2 steps each): kfp/<run>/<task>/<output>/ with
    each stage's files and summary.json, summaries/, config.json, ppo_log.jsonl,
    predictions/<variant>.jsonl and a kfp.log naming the tasks."""
    import shutil

    from lastmile import config, generate, metrics, mle, negatives, ppo, reward
    from lastmile import data as task_data
    from lastmile.io import read_jsonl
    from lastmile.modeling import load_tokenizer

    run = tmp_path_factory.mktemp("run")
    kfp = run / "kfp" / "lastmile-tiny"
    p = config.get_profile("smoke")
    p.data.max_train, p.data.max_test = 14, 4
    p.reward.eval_examples = 2
    tok = load_tokenizer(p.base_model)
    d = {t: kfp / t / o for t, o in (("filter-data", "data"), ("synthesize-negatives", "negatives"),
                                     ("train-reward", "reward_model"), ("train-mle", "mle_model"),
                                     ("train-ppo", "ppo_model"), ("generate", "predictions"),
                                     ("generate-2", "predictions"), ("generate-3", "predictions"))}
    for folder in d.values():
        folder.mkdir(parents=True)
    _stage("filter_data", d["filter-data"], run,
           lambda: task_data.prepare(task_data.DEFAULT_DATA, d["filter-data"], p.data, tok))
    train, test = d["filter-data"] / "train.jsonl", d["filter-data"] / "test.jsonl"
    _stage("negatives", d["synthesize-negatives"], run, lambda: negatives.build_reward_dataset(
        train, d["synthesize-negatives"] / "rm.jsonl", p.negatives, tok))
    _stage("train_reward", d["train-reward"], run, lambda: reward.train_reward_model(
        d["synthesize-negatives"] / "rm.jsonl", d["train-reward"], p.reward, p.base_model,
        list(read_jsonl(test))))
    _stage("train_mle", d["train-mle"], run,
           lambda: mle.train_mle(train, d["train-mle"], p.mle, p.base_model))
    _stage("train_ppo", d["train-ppo"], run, lambda: ppo.train_ppo(
        train, d["train-reward"] / "adapter", d["train-ppo"], p.ppo, p.base_model))
    shutil.copyfile(d["train-ppo"] / "ppo_log.jsonl", run / "ppo_log.jsonl")
    (run / "predictions").mkdir()
    for task, variant, adapter in (("generate", "base", None), ("generate-2", "mle", "train-mle"),
                                   ("generate-3", "rl", "train-ppo")):
        out = d[task] / "predictions.jsonl"
        _stage(f"generate_{variant}", d[task], run, lambda: generate.generate_predictions(
            test, out, variant, p.base_model,
            str(d[adapter] / "adapter") if adapter else None, p.generate))
        shutil.copyfile(out, run / "predictions" / f"{variant}.jsonl")
    (kfp / "score" / "examples").mkdir(parents=True)
    _stage("score", kfp / "score" / "examples", run, lambda: {"n": metrics.score_examples_file(
        sorted((run / "predictions").glob("*.jsonl")),
        kfp / "score" / "examples" / "example_scores.jsonl", p.score)})
    (run / "config.json").write_text(json.dumps(p.to_dict()))
    (run / "logs").mkdir()
    (run / "logs" / "kfp.log").write_text(
        "23:59:58.500 - INFO - Running pipeline: 'lastmile'\n"
        "23:59:58.500 - INFO - Executing task 'train-mle'\n"
        "00:00:01.000 - INFO - Task 'train-mle' finished with status SUCCESS\n")
    return run


def test_stage_costs_account_a_run(costs, tiny_run):
    """The account of a (tiny) run: its token counts are those the stages logged, and every
    row's arithmetic is the stated formula: FLOPs from tokens, FLOP/s = FLOPs / compute
    seconds, share of the bound = FLOP/s / the bound at the stage's precision."""
    run = costs.RunFolder(tiny_run)
    assert run.task_seconds == {"train-mle": pytest.approx(2.5)}  # across midnight
    assert run.task_wall("train_mle") == pytest.approx(2.5)
    assert costs.run_wall(tiny_run / "logs" / "kfp.log") == pytest.approx(2.5)
    by_stage = {c.stage: c for c in costs.account(run)}
    assert {"filter_data", "negatives", "train_reward", "reward_eval", "train_mle", "train_ppo",
            "generate_base", "generate_mle", "generate_rl", "score"} <= by_stage.keys()
    # the replayed batches carry the tokens the training logs counted, step by step
    for stage in ("train_reward", "train_mle"):
        assert by_stage[stage].checks == {"log_tokens_match": True, "steps": 2}, stage
    assert by_stage["train_ppo"].checks["updates"] == 2
    assert by_stage["reward_eval"].checks["rows"] == 2 * 6  # 2 held-out rows + 5 negatives each

    shape = costs.base_shape("tiny-random")
    n, vh = shape.linear_params, shape.vocab * shape.hidden
    # MLE by hand: a right-padded forward per micro-batch (the stage's token-budget split),
    # logits at the output tokens, LoRA r=32, backward through the same positions.
    import statistics

    from lastmile import config, mle
    from lastmile.io import read_jsonl
    from lastmile.modeling import load_tokenizer
    from lastmile.train_utils import DEFAULT_TOKEN_BUDGET, epoch_batches, micro_batches

    p = config.get_profile("smoke")
    tok = load_tokenizer("tiny-random")
    rows = list(read_jsonl(run.folder("filter_data") / "train.jsonl"))
    examples = mle.encode_rows(tok, rows, p.mle.max_output_tokens)
    lora = shape.lora_params(32)

    def flops(tokens, logits, context):  # forward + backward
        return (2 * (n + lora) * tokens + 2 * vh * logits + 4 * shape.layers * shape.attn * context
                + 2 * n * tokens + 4 * lora * tokens + 2 * vh * logits
                + 8 * shape.layers * shape.attn * context)

    tokens = logits = context = 0
    steps = []
    for idx in epoch_batches(len(rows), p.mle.batch_size, 1, p.mle.seed, p.mle.max_steps):
        step = [0, 0, 0]
        for micro in micro_batches([examples[i] for i in idx], None, DEFAULT_TOKEN_BUDGET):
            width = max(e.length for e in micro)
            step[0] += len(micro) * width
            step[1] += sum(len(e.output_ids) for e in micro)
            step[2] += len(micro) * width * width
        steps.append(flops(*step))
        tokens, logits, context = tokens + step[0], logits + step[1], context + step[2]
    c = by_stage["train_mle"]
    assert c.tokens_fwd == c.tokens_bwd == tokens
    assert c.flops_fwd == pytest.approx(2 * (n + lora) * tokens + 2 * vh * logits
                                        + 4 * shape.layers * shape.attn * context)
    assert c.flops_bwd == pytest.approx(2 * n * tokens + 4 * lora * tokens + 2 * vh * logits
                                        + 8 * shape.layers * shape.attn * context)
    logged = list(read_jsonl(run.folder("train_mle") / "train_log.jsonl"))
    assert c.median_step_flops_per_second == pytest.approx(
        statistics.median(f / r["seconds"] for f, r in zip(steps, logged)))
    # forward-only stages have no backward; text-only stages no FLOPs
    for stage in ("reward_eval", "generate_base", "generate_rl", "score"):
        assert by_stage[stage].tokens_fwd > 0 and by_stage[stage].tokens_bwd == 0, stage
        assert by_stage[stage].flops_bwd == 0
    assert by_stage["filter_data"].flops == 0 and by_stage["filter_data"].precision is None
    # generation: as many real new tokens as the stage's summary counted (less each row's
    # last, never fed back; the accounting re-encodes the decoded text: within a token a row)
    gen = run.summaries["generate_base"]
    real_new = by_stage["generate_base"].real_fwd - sum(
        len(x) for x in tok([r["prompt"] for r in read_jsonl(run.folder("filter_data") /
                                                            "test.jsonl")],
                            add_special_tokens=False)["input_ids"])
    assert real_new == pytest.approx(gen["mean_new_tokens"] * gen["n"] - gen["n"], abs=gen["n"])

    peaks = {"float32": 2e9, "bfloat16": 5e9}
    for cost in by_stage.values():
        row = cost.row(peaks)
        if not cost.flops:
            assert row["flops_per_second"] is None and row["fraction_of_peak"] is None
            continue
        assert cost.compute_seconds, cost.stage
        assert row["flops_per_second"] == pytest.approx(cost.flops / cost.compute_seconds)
        assert row["fraction_of_peak"] == pytest.approx(row["flops_per_second"]
                                                        / peaks[cost.precision])
    table = costs.markdown_table(list(by_stage.values()), peaks, "Stages")
    assert all(f"| {stage} |" in table for stage in by_stage)


def test_flop_formula_and_shapes(costs):
    """The formula on numbers small enough to check by hand, and a config's shape equal to the
    real model's linear weights."""
    shape = costs.Shape("toy", layers=2, hidden=4, attn=4, vocab=10, linears=((4, 4), (4, 8)))
    assert shape.linear_params == 2 * (16 + 32)
    assert shape.lora_params(1) == 2 * (8 + 12)
    w = costs.Work(tokens=10, real=7, context=30, logits=3, lora=40, backward=True)
    assert costs.forward_flops(shape, w) == 2 * (96 + 40) * 10 + 2 * 10 * 4 * 3 + 4 * 2 * 4 * 30
    assert costs.backward_flops(shape, w) == (2 * 96 * 10 + 4 * 40 * 10 + 2 * 10 * 4 * 3
                                              + 8 * 2 * 4 * 30)
    w.backward = False
    assert costs.backward_flops(shape, w) == 0
    # decoding: a [2, 5] prefill, then 2 one-position steps attending to 6 and 7 positions;
    # real: the prompts (5 + 4) and the tokens fed back before each row's last (2 + 0)
    d = costs.decoding([5, 4], [3, 1])
    assert (d.tokens, d.logits, d.context) == (2 * 5 + 2 * 2, 2 + 2 * 2, 2 * 25 + 2 * (6 + 7))
    assert d.real == 5 + 4 + 2

    import torch

    from lastmile.modeling import load_base

    model, _ = load_base("tiny-random")
    real = sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in name)
    assert costs.base_shape("tiny-random").linear_params == real


def test_ppo_parts_time_the_trainers_own_gradients(costs, tiny_run):
    """The PPO parts table times a copy of the trainer's fast path: it must leave the same
    gradients as `PPOTrainer.gradients` on the same rollout."""
    import torch

    from lastmile import ppo
    from lastmile.train_utils import seed_everything

    run = costs.RunFolder(tiny_run)
    cfg = run.profile.ppo
    seed_everything(0)
    model, tok = ppo.build_model(run.profile.base_model, run.folder("train_reward") / "adapter",
                                 cfg)
    trainer = ppo.PPOTrainer(model, tok, cfg, 4, micro_batch_size=2)
    prompts = tok([r["prompt"] for r in costs.read_jsonl(run.folder("filter_data") /
                                                         "train.jsonl")[:3]],
                  add_special_tokens=False)["input_ids"]
    outputs = trainer.sample(prompts, update=1)
    rollout = trainer.rollout(ppo.SAMPLED, prompts, outputs, outputs)
    trainer.gradients(rollout)
    expected = [p.grad.clone() for p in trainer.policy_params + trainer.value_params]
    times = {}
    costs.value_and_policy_gradients(trainer, rollout, times)
    for want, p in zip(expected, trainer.policy_params + trainer.value_params):
        torch.testing.assert_close(p.grad, want)
    assert set(times) == {"value forward", "value backward", "policy forward", "policy backward"}
    parts = costs.ppo_update_works(costs.base_shape("tiny-random"), prompts,
                                   [len(o) for o in outputs], True, 1, 1, 2)
    assert len(parts["value"]) == len(parts["policy"]) == 2  # 3 rows in micro-batches of 2
    assert sum(w.logits for w in parts["policy"]) == sum(len(o) for o in outputs)
    assert [w.backward for w in parts["reward"]] == [False, False]


def test_importing_a_bench_script_leaves_the_environment_alone(costs):
    """A bench script hides progress bars when run, not when imported: an import-time
    LASTMILE_NO_PROGRESS=1 once reached the end-to-end test and emptied its stage logs' bars."""
    before = dict(os.environ)
    for name in ("critic_warmup", "mle_precision", "ppo_step", "reward_options", "stage_costs"):
        _load(name, register=True)
    assert dict(os.environ) == before
    source = (BENCH / "stage_costs.py").read_text()
    main_at = source.index("\ndef main(")
    assert 'setdefault("LASTMILE_NO_PROGRESS"' not in source[:main_at]


def test_stage_costs_reads_auto_precision_as_the_stages_recorded_it(costs, tiny_run, tmp_path):
    """A profile at precision "auto" (the demo's): each stage's cost is at the precision its
    summary says it computed in, not "auto" (which has no matmul peak)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, symlinks=True)
    values = json.loads((run / "config.json").read_text())
    for stage in ("reward", "mle", "ppo", "generate"):
        values[stage]["precision"] = "auto"
    (run / "config.json").write_text(json.dumps(values))
    summary = json.loads((run / "summaries" / "train_ppo.json").read_text())
    (run / "summaries" / "train_ppo.json").write_text(json.dumps(dict(summary,
                                                                      precision="bfloat16")))
    profile = costs.RunFolder(run).profile
    assert profile.ppo.precision == "bfloat16"  # as its summary says
    assert profile.reward.precision == profile.mle.precision == "float32"
    assert profile.generate.precision == "float32"  # the merged model's weights_dtype


def test_critic_warmup_steps_only_the_value_until_the_policy_s_turn(tmp_path):
    """bench/critic_warmup.py (issue 20 point 4): during the warm-up the policy gets no
    gradient and the value does; afterwards both; --value-scale multiplies V itself."""
    warmup = _load("critic_warmup", register=True)
    args = ["--smoke", "--warmup", "2", "--updates", "2", "--value-lora-lr", "1e-3"]
    assert warmup.main(args + ["--out", str(tmp_path / "a"), "--value-scale", "10"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["warmup"] for r in rows] == [True, True, False, False]
    assert [r["batch_kind"] for r in rows] == ["sampled", "reference"] * 2
    for r in rows:
        assert r["value_grad_norm"] > 0
        assert (r["policy_grad_norm"] == 0) == r["warmup"]
    assert warmup.main(["--smoke", "--out", str(tmp_path / "b"), "--warmup", "1",
                        "--updates", "0", "--train", str(tmp_path / "a" / "rm" / "data" /
                                                         "train.jsonl"),
                        "--reward-model", str(tmp_path / "a" / "rm" / "reward" / "adapter")]) == 0
    first = json.loads((tmp_path / "b" / "log.jsonl").read_text().splitlines()[0])
    assert first["value_mean"] * 10 == pytest.approx(rows[0]["value_mean"], rel=1e-4)
