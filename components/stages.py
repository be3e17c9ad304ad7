"""The pipeline's stages as plain functions, one per KFP component.

Each function is thin: parse inputs, call one `lastmile` entry point, write artifacts and KFP
metrics. KFP copies each function's source into the compiled pipeline, so every import lives
inside the body and nothing here refers to module globals. `components/__init__.py` turns them
into components for a given container image.

Artifacts are directories: a Dataset/Model output's path is created as a folder holding the
stage's files and its `summary.json` (lastmile/runinfo.py).
"""

from typing import List, Optional

from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output


def resolve_config(
    profile: str,
    overrides: str = "",
    base_model: str = "",
    input_column: str = "",
    output_column: str = "",
    instruction: str = "",
    max_input_tokens: str = "",
    max_train: str = "",
    max_test: str = "",
    test_fraction: str = "",
    strict: str = "",
    seed: str = "",
    reward_learning_rate: str = "",
    reward_head_learning_rate: str = "",
    reward_batch_size: str = "",
    reward_lora_r: str = "",
    reward_max_steps: str = "",
    mle_learning_rate: str = "",
    mle_batch_size: str = "",
    mle_max_steps: str = "",
    ppo_learning_rate: str = "",
    ppo_head_learning_rate: str = "",
    ppo_batch_size: str = "",
    ppo_max_updates: str = "",
    ppo_temperature: str = "",
    ppo_length_penalty: str = "",
    ppo_reference_fraction: str = "",
    precision: str = "",
    mle_precision: str = "",
    max_new_tokens: str = "",
    num_shards: str = "",
    bleurt_checkpoint: str = "",
    train_processes: str = "",
    checkpoint_dir: str = "",
    compiled: str = "{}",
) -> str:
    """Profile + overrides + pipeline parameters -> the run's whole configuration, as JSON.

    Every configuration parameter is text and '' leaves the profile's value, so a run started
    with only `profile` gets exactly that profile (config.resolve, as local runs do).
    `compiled` holds the fields fixed when the pipeline was compiled
    (config.COMPILE_TIME_FIELDS), never run parameters.
    """
    arguments = dict(locals())  # first statement: exactly the parameters above
    import json

    from lastmile import config

    profile = config.resolve(arguments.pop("profile"),
                             config.parse_overrides(arguments.pop("overrides")),
                             compiled=json.loads(arguments.pop("compiled")), **arguments)
    return config.profile_to_json(profile)


def filter_data(config: str, data_source: str, data: Output[Dataset]):
    """Read task data, drop bad rows and inputs over the token budget, split train/test."""
    from pathlib import Path

    from lastmile import data as task_data
    from lastmile import runinfo
    from lastmile.config import profile_from_json
    from lastmile.modeling import load_tokenizer

    profile = profile_from_json(config)
    source = data_source or profile.data.source or str(task_data.DEFAULT_DATA)
    profile.data = task_data.with_known_columns(profile.data, source)
    with runinfo.stage("filter_data", data.path, seed=profile.data.seed,
                       base_model=profile.base_model) as summary:
        tokenizer = load_tokenizer(profile.base_model, trust_remote_code=profile.trust_remote_code,
                                   allow_pickle=profile.allow_pickle)
        summary.update(task_data.prepare(source, Path(data.path), profile.data, tokenizer))
    data.metadata.update({"train": summary["rows_out"]["train"], "test": summary["rows_out"]["test"]})


def check_new_data(config: str, data: Input[Dataset], data_source: str, publish_to: str,
                   force: str, decision: Output[Artifact]) -> bool:
    """Fingerprint data, base model and configuration; compare with the last published run.

    Returns True when the run should train (something is new, force, or nothing to compare).
    """
    import json
    from pathlib import Path

    from lastmile import freshness
    from lastmile.config import as_bool, profile_from_json
    from lastmile.modeling import base_fingerprint

    profile = profile_from_json(config)
    summary = json.loads((Path(data.path) / "summary.json").read_text())
    result = freshness.check(summary, config, profile.base_model,
                             base_fingerprint(profile.base_model),
                             data_source=data_source or str(summary.get("source", "")),
                             publish_to=publish_to,
                             force=as_bool(force, "force"))
    Path(decision.path).write_text(result.to_json())
    decision.metadata.update({"changed": result.changed, "reason": result.reason,
                              "previous_run": result.previous_run or ""})
    print(result.reason, flush=True)
    return result.changed


def no_new_data(decision: Input[Artifact], note: Output[Markdown]) -> str:
    """The run's last step when nothing is new: says so (log, Markdown note, pipeline output)."""
    from pathlib import Path

    from lastmile import freshness

    result = freshness.Decision.from_json(Path(decision.path).read_text())
    Path(note.path).write_text(freshness.skipped_note(result))
    print(result.reason, flush=True)
    return freshness.skipped_outcome(result)


def synthesize_negatives(config: str, data: Input[Dataset], negatives: Output[Dataset]):
    """The paper's five negative classes beside the true examples (reward-model data)."""
    from pathlib import Path

    from lastmile import negatives as neg
    from lastmile import runinfo
    from lastmile.config import profile_from_json
    from lastmile.modeling import load_tokenizer

    profile = profile_from_json(config)
    out = Path(negatives.path)
    train = Path(data.path) / "train.jsonl"
    with runinfo.stage("negatives", out, seed=profile.negatives.seed,
                       inputs={"train.jsonl": train}, outputs={"rm.jsonl": out / "rm.jsonl"},
                       base_model=profile.base_model) as summary:
        tokenizer = load_tokenizer(profile.base_model, trust_remote_code=profile.trust_remote_code,
                                   allow_pickle=profile.allow_pickle)
        summary.update(neg.build_reward_dataset(train, out / "rm.jsonl", profile.negatives,
                                                tokenizer))


def train_reward(config: str, data: Input[Dataset], negatives: Input[Dataset],
                 reward_model: Output[Model], metrics: Output[Metrics]):
    """Reward model: LoRA r=16 + scalar head, token targets 1/0, squared loss (paper §3.2)."""
    from pathlib import Path

    from lastmile import checkpoint, reward, runinfo
    from lastmile.config import profile_from_json
    from lastmile.io import read_jsonl

    profile = profile_from_json(config)
    out = Path(reward_model.path)
    # An s3:// checkpoint prefix is narrowed to this task: a KFP retry (same output URI) finds
    # its checkpoints, another run never does.
    profile.reward.checkpoint_dir = checkpoint.task_scope(profile.reward.checkpoint_dir,
                                                          "train_reward", reward_model.uri)
    rm_path, test_path = Path(negatives.path) / "rm.jsonl", Path(data.path) / "test.jsonl"
    # A retry after bad data or the NaN guard's stop fails at once instead of training again.
    with checkpoint.failing_once(profile.reward.checkpoint_dir), \
            runinfo.stage("train_reward", out, seed=profile.reward.seed,
                          inputs={"rm.jsonl": rm_path, "test.jsonl": test_path},
                          base_model=profile.base_model) as summary:
        held_out = list(read_jsonl(test_path))
        summary.update(reward.train_reward_model(
            rm_path, out, profile.reward, profile.base_model, held_out,
            **profile.training_options()))
    for category, accuracy in summary.get("eval", {}).get("accuracy", {}).items():
        metrics.log_metric(f"rm_accuracy_{category}", float(accuracy))


def train_mle(config: str, data: Input[Dataset], mle_model: Output[Model]):
    """Maximum-likelihood baseline: LoRA r=32 on the true outputs, one epoch (paper §3.4)."""
    from pathlib import Path

    from lastmile import checkpoint, mle, runinfo
    from lastmile.config import profile_from_json

    profile = profile_from_json(config)
    out = Path(mle_model.path)
    profile.mle.checkpoint_dir = checkpoint.task_scope(profile.mle.checkpoint_dir, "train_mle",
                                                       mle_model.uri)
    train = Path(data.path) / "train.jsonl"
    with checkpoint.failing_once(profile.mle.checkpoint_dir), \
            runinfo.stage("train_mle", out, seed=profile.mle.seed,
                          inputs={"train.jsonl": train}, base_model=profile.base_model) as summary:
        summary.update(mle.train_mle(train, out, profile.mle, profile.base_model,
                                     **profile.training_options()))


def train_ppo(config: str, data: Input[Dataset], reward_model: Input[Model],
              ppo_model: Output[Model], mle_model: Optional[Input[Model]] = None):
    """Policy and value adapters trained by PPO against the frozen reward model (paper §3.3)."""
    from pathlib import Path

    from lastmile import checkpoint, ppo, runinfo
    from lastmile.config import profile_from_json

    profile = profile_from_json(config)
    out = Path(ppo_model.path)
    profile.ppo.checkpoint_dir = checkpoint.task_scope(profile.ppo.checkpoint_dir, "train_ppo",
                                                       ppo_model.uri)
    start_from = None
    if profile.ppo.init_policy_from_mle and mle_model is not None:
        start_from = Path(mle_model.path) / "adapter"
    train = Path(data.path) / "train.jsonl"
    with checkpoint.failing_once(profile.ppo.checkpoint_dir), \
            runinfo.stage("train_ppo", out, seed=profile.ppo.seed,
                          inputs={"train.jsonl": train}, base_model=profile.base_model) as summary:
        summary.update(ppo.train_ppo(train, Path(reward_model.path) / "adapter", out,
                                     profile.ppo, profile.base_model, mle_adapter_dir=start_from,
                                     **profile.training_options()))


def plan_shards(config: str, data: Input[Dataset]) -> list:
    """The shard indices generation and scoring fan out over (lastmile.shards.plan)."""
    from pathlib import Path

    from lastmile import shards
    from lastmile.config import profile_from_json
    from lastmile.io import read_jsonl

    profile = profile_from_json(config)
    n_test = sum(1 for _ in read_jsonl(Path(data.path) / "test.jsonl"))
    ranges = shards.plan(n_test, profile.generate)
    print(f"{n_test} test rows in {len(ranges)} shard(s): {ranges}", flush=True)
    return list(range(len(ranges)))


def generate(config: str, data: Input[Dataset], variant: str, predictions: Output[Dataset],
             adapter: Optional[Input[Model]] = None, shard: int = -1):
    """Greedy generation (<= 100 new tokens) on one shard of the test split (-1: all of it)
    with one model variant."""
    from pathlib import Path

    from lastmile import generate as gen
    from lastmile import runinfo
    from lastmile.config import profile_from_json

    profile = profile_from_json(config)
    out = Path(predictions.path)
    adapter_dir = str(Path(adapter.path) / "adapter") if adapter is not None else None
    test_path, written = Path(data.path) / "test.jsonl", out / "predictions.jsonl"
    # Each variant's predictions are labelled by variant: the report groups files by label and
    # would flag five different "predictions.jsonl" contents as a mismatch.
    with runinfo.stage(f"generate_{variant}", out, inputs={"test.jsonl": test_path},
                       outputs={f"{variant}/predictions.jsonl": written},
                       base_model=profile.base_model) as summary:
        summary.update(gen.generate_predictions(
            test_path, written, variant, profile.base_model, adapter_dir, profile.generate,
            shard=shard if shard >= 0 else None, allow_pickle=profile.allow_pickle,
            trust_remote_code=profile.trust_remote_code))


def postprocess(predictions: Input[Dataset], cleaned: Output[Dataset]):
    """The paper's light clean-up (§4.3): base drops a "Sure, ..." first line, MLE is cut at its
    first newline (lastmile.postprocess.PAPER_RULES)."""
    import json
    from pathlib import Path

    from lastmile import postprocess as post
    from lastmile import runinfo

    out = Path(cleaned.path)
    source, written = Path(predictions.path) / "predictions.jsonl", out / "predictions.jsonl"
    # Files are labelled by variant (see generate); generate's summary names it, and the
    # shard it covered, which the cleaned file covers too.
    upstream = Path(predictions.path) / "summary.json"
    upstream = json.loads(upstream.read_text()) if upstream.is_file() else {}
    variant = upstream.get("variant")
    read = f"{variant}/predictions.jsonl" if variant else "predictions.jsonl"
    wrote = f"{variant}_cleaned/predictions.jsonl" if variant else "cleaned/predictions.jsonl"
    with runinfo.stage("postprocess", out, inputs={read: source},
                       outputs={wrote: written}) as summary:
        summary.update(post.postprocess_predictions(source, written))
        if "shard" in upstream:
            summary["shard"] = upstream["shard"]


def score(config: str, base: Input[Dataset], mle: Input[Dataset], rl: Input[Dataset],
          base_cleaned: Input[Dataset], mle_cleaned: Input[Dataset], shard: int,
          examples: Output[Dataset]):
    """Per-example ROUGE, la-ROUGE, BLEURT, semantic similarity, excess length of one shard;
    `gather` turns every shard's into Tables 1-2."""
    from pathlib import Path

    from lastmile import metrics as scoring
    from lastmile import runinfo, shards
    from lastmile.config import profile_from_json
    from lastmile.io import read_json

    profile = profile_from_json(config)
    out = Path(examples.path)
    variants = {"base": base, "mle": mle, "rl": rl, "base_cleaned": base_cleaned,
                "mle_cleaned": mle_cleaned}
    inputs = {f"{name}/predictions.jsonl": Path(a.path) / "predictions.jsonl"
              for name, a in variants.items()}
    record = read_json(Path(base.path) / "summary.json").get("shard")
    if record is None or record["index"] != shard:
        raise ValueError(f"score shard {shard}: the base predictions are not that shard's "
                         f"({record})")
    with runinfo.stage("score", out, inputs=inputs) as summary:
        summary["n"] = scoring.score_examples_file(list(inputs.values()),
                                                   out / shards.EXAMPLE_SCORES, profile.score)
        summary["shard"] = record


def gather(config: str, base_shards: Input[List[Dataset]], mle_shards: Input[List[Dataset]],
           rl_shards: Input[List[Dataset]], base_cleaned_shards: Input[List[Dataset]],
           mle_cleaned_shards: Input[List[Dataset]], example_shards: Input[List[Dataset]],
           base: Output[Dataset], mle: Output[Dataset], rl: Output[Dataset],
           base_cleaned: Output[Dataset], mle_cleaned: Output[Dataset],
           scores: Output[Dataset], metrics: Output[Metrics]):
    """Every shard's predictions and per-example scores, in shard order: the five prediction
    files and scores.json (Tables 1-2) of an unsharded run; every score as a KFP metric."""
    import time
    from pathlib import Path

    from lastmile import results, shards
    from lastmile.config import profile_from_json
    from lastmile.io import write_json

    profile = profile_from_json(config)
    started = time.perf_counter()
    for collected, out in ((base_shards, base), (mle_shards, mle), (rl_shards, rl),
                           (base_cleaned_shards, base_cleaned),
                           (mle_cleaned_shards, mle_cleaned)):
        shards.gather_predictions([a.path for a in collected], out.path)
    folders = [a.path for a in example_shards]
    out = Path(scores.path)
    result = shards.gather_example_scores(folders, out / "scores.json", profile.score)
    summary = shards.merge_summaries([shards.read_summary(f) for _, f in shards.ordered(folders)])
    summary["gather_seconds"] = round(time.perf_counter() - started, 3)
    summary["variants"] = sorted(result["models"])
    write_json(out / "summary.json", summary)
    for name, value in results.metric_items(result).items():
        metrics.log_metric(name, value)


def report(config: str, data: Input[Dataset], negatives: Input[Dataset],
           reward_model: Input[Model], mle_model: Input[Model], ppo_model: Input[Model],
           base: Input[Dataset], mle: Input[Dataset], rl: Input[Dataset],
           base_cleaned: Input[Dataset], mle_cleaned: Input[Dataset], scores: Input[Dataset],
           report_dir: Output[Artifact], markdown: Output[Markdown], html: Output[HTML]) -> str:
    """Tables, plots and examples as Markdown and self-contained HTML (the UI shows both).

    Returns the run's outcome (JSON naming the report's URI): the pipeline's output.
    """
    import shutil
    from pathlib import Path

    from lastmile import freshness
    from lastmile import report as rep
    from lastmile.config import profile_from_json

    stage_dirs = {
        "filter_data": data.path, "negatives": negatives.path, "train_reward": reward_model.path,
        "train_mle": mle_model.path, "train_ppo": ppo_model.path, "generate_base": base.path,
        "generate_mle": mle.path, "generate_rl": rl.path, "postprocess_base": base_cleaned.path,
        "postprocess_mle": mle_cleaned.path, "score": scores.path,
    }
    out = Path(report_dir.path)
    paths = rep.build_report_from_stages(stage_dirs, out, profile_from_json(config))
    shutil.copyfile(paths["markdown"], markdown.path)
    shutil.copyfile(paths["html"], html.path)
    from lastmile import tracking  # MLflow: scores, report, end of run (MLFLOW_TRACKING_URI)

    tracking.log_report(out, config)
    return freshness.trained_outcome(report_dir.uri)


def publish(publish_to: str, decision: Input[Artifact], mle_model: Input[Model],
            ppo_model: Input[Model], report_dir: Input[Artifact], job_name: str,
            job_id: str) -> str:
    """PPO and MLE adapters, scores.json and the report to `<publish_to>/<run name>/`."""
    from pathlib import Path

    from lastmile import freshness, results

    uri = results.publish_run(
        publish_to, ppo_dir=ppo_model.path, mle_dir=mle_model.path, report_dir=report_dir.path,
        decision=freshness.Decision.from_json(Path(decision.path).read_text()),
        job_name=job_name, job_id=job_id)
    print(f"published to {uri}", flush=True)
    return uri
