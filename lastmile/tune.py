"""An equal tuning budget for the MLE baseline and RL (issue 20, point 1).

`tune` gives each method the same number of trials over its own step sizes and selects each
on a validation split carved from the *training* rows; the test split is never read:

* MLE: `mle.optim.learning_rate` (the LoRA's step size; the paper's 1e-5, §3.1);
* RL: `ppo.optim.learning_rate` (policy and value LoRAs) and `ppo.optim.head_learning_rate`
  (the value head), the two that moved the demo's RL results (docs/demo-experiments.md).

The reward model has no tuned step size here: it is trained once, at the profile's values, on
the same training rows and shared by every RL trial (its held-out accuracy is measured on the
validation rows). Each trial calls the stages' own lastmile functions (mle.train_mle,
ppo.train_ppo, generate.generate_predictions, metrics.score_file) on files, as the pipeline's
steps do, and is recorded (settings, validation scores, seconds) in tune.json and tune.md as
soon as it ends.

Selection, on the variant's raw outputs (no post-processing) for the validation rows:
* MLE: the highest length-adjusted ROUGE-L F1 (paper §4.1);
* RL: the same, among trials whose mean excess length is within +-MAX_RL_EXCESS words; a
  trial outside that band ranks below every trial inside it (among those, by la-ROUGE-L F1
  too). RL is meant to produce outputs of the reference's length (the length penalty, §3.2);
  a step size that wins on ROUGE while writing far too long or short is not the method.

Grids (`log_grid`): n points log-spaced around the profile's value, half a decade apart by
default, the profile's value among them ((n - 1) // 2 points below it, the rest above). RL's
two step sizes: with n a square m*m, the m x m grid of both axes' m-point grids (n = 4: each
at the profile's value and half a decade above); otherwise n points moving both together
(their ratio fixed, as in the profile).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config as cfgmod
from .io import read_jsonl, write_json, write_jsonl

#: RL trials whose mean excess length on the validation rows is beyond this many words rank
#: below every trial within it (the demo's target: RL within +-3 words of the reference).
MAX_RL_EXCESS = 3.0
#: Share of the filtered training rows held out for selection (hash of the row id).
VALIDATION_FRACTION = 0.1
#: trials per method (MLE and RL get the same number)
TRIALS = 4
#: Neighbouring grid points differ by this factor (half a decade).
GRID_FACTOR = math.sqrt(10.0)
METRIC = "la_rougeL_f1"
MLE_FIELDS = ("mle.optim.learning_rate",)
RL_FIELDS = ("ppo.optim.learning_rate", "ppo.optim.head_learning_rate")


# ----------------------------------------------------------------------------- the split

def _validation_key(row_id: Any) -> bytes:
    # A salt of its own: train/test hash splits (data.split_of) hash the input text; this
    # ranks the rows already on the train side independently of that.
    return hashlib.sha256(f"lastmile-validation\0{row_id}".encode("utf-8")).digest()


def split_validation(rows: Sequence[dict], fraction: float = VALIDATION_FRACTION
                     ) -> tuple[list[dict], list[dict]]:
    """(fit rows, validation rows): the round(fraction * n) rows (at least 1, and at least one
    row left to train on) whose salted hash of the id ranks lowest, in their input order.
    Deterministic: the same rows give the same split, whatever the seed."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be between 0 and 1, got {fraction}")
    if len(rows) < 2:
        raise ValueError(f"{len(rows)} training row(s): too few to hold any out for validation")
    ids = [row["id"] for row in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("training rows need unique ids to be split for validation")
    k = min(max(1, round(fraction * len(rows))), len(rows) - 1)
    held = set(sorted(ids, key=_validation_key)[:k])
    return ([r for r in rows if r["id"] not in held], [r for r in rows if r["id"] in held])


# ----------------------------------------------------------------------------- the grids

def _round(value: float) -> float:
    return float(f"{value:.2g}")  # 1.7782794e-4 -> 1.8e-4: values a person would type


def log_grid(center: float, n: int, factor: float = GRID_FACTOR) -> list[float]:
    """n values log-spaced around `center`, neighbours `factor` apart, `center` among them:
    center * factor ** (k - (n - 1) // 2) for k = 0..n-1 ((n - 1) // 2 below it, the rest
    above), to two significant digits. n = 4, center 1e-4: 3.2e-5, 1e-4, 3.2e-4, 1e-3."""
    if n < 1 or center <= 0 or factor <= 1:
        raise ValueError(f"log_grid needs n >= 1, center > 0 and factor > 1, got {n}, "
                         f"{center}, {factor}")
    return [_round(center * factor ** (k - (n - 1) // 2)) for k in range(n)]


def mle_grid(profile: cfgmod.Profile, n: int, factor: float = GRID_FACTOR) -> list[dict]:
    """n MLE trials: {"mle.optim.learning_rate": lr} around the profile's value."""
    return [{MLE_FIELDS[0]: lr} for lr in log_grid(profile.mle.optim.learning_rate, n, factor)]


def rl_grid(profile: cfgmod.Profile, n: int, factor: float = GRID_FACTOR) -> list[dict]:
    """n RL trials over the LoRA and value-head step sizes around the profile's values: the
    m x m grid when n = m * m, else n points moving both together (their ratio fixed)."""
    lr = profile.ppo.optim.learning_rate
    head = profile.ppo.optim.head_learning_rate or lr  # None: the head shares the LoRAs'
    m = math.isqrt(n)
    if m > 1 and m * m == n:
        return [{RL_FIELDS[0]: a, RL_FIELDS[1]: b}
                for a in log_grid(lr, m, factor) for b in log_grid(head, m, factor)]
    return [{RL_FIELDS[0]: a, RL_FIELDS[1]: b}
            for a, b in zip(log_grid(lr, n, factor), log_grid(head, n, factor))]


# ----------------------------------------------------------------------------- selection

def rank_key(method: str, trial: dict, max_excess: float = MAX_RL_EXCESS) -> tuple:
    """Sort key, best first: MLE by la-ROUGE-L F1; RL within +-max_excess words first, then
    by la-ROUGE-L F1. A failed trial (no scores) ranks last."""
    scores = trial.get("validation")
    if not scores:
        return (2, 0.0)
    within = method != "rl" or abs(scores["excess_length"]) <= max_excess
    return (0 if within else 1, -scores[METRIC])


def select(method: str, trials: Sequence[dict], max_excess: float = MAX_RL_EXCESS
           ) -> dict | None:
    """The chosen trial (the best by `rank_key`; the first of equals), or None if none ran."""
    ranked = sorted(trials, key=lambda t: rank_key(method, t, max_excess))
    return ranked[0] if ranked and ranked[0].get("validation") else None


def selection_rule(max_excess: float = MAX_RL_EXCESS) -> str:
    return (f"MLE: the highest validation length-adjusted ROUGE-L F1 of its raw outputs. "
            f"RL: the same, among trials whose mean validation excess length is within "
            f"+-{max_excess:g} words; a trial outside that band ranks below every trial "
            f"inside it (then by la-ROUGE-L F1).")


def chosen_yaml(profile_name: str, chosen: dict[str, dict | None]) -> str:
    """A run configuration for `pipeline.py run --config FILE`: the profile and the chosen
    step sizes as dotted fields (pipeline.load_run_config reads them)."""
    lines = ["# chosen by `pipeline.py tune` on a validation split of the training rows",
             f"profile: {profile_name}"]
    for method in ("mle", "rl"):
        trial = chosen.get(method)
        if trial is None:
            lines.append(f"# {method}: no trial finished; the profile's values stand")
            continue
        for key, value in trial["settings"].items():
            lines.append(f"{key}: {value:.1e}")  # 1.0e-05: YAML 1.1 reads it as a float
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- one trial

@dataclass
class Workspace:
    """The files every trial shares: fit and validation rows, the reward model."""

    out: Path
    profile: cfgmod.Profile
    fit_path: Path
    validation_path: Path
    reward_dir: Path | None = None
    prepared: dict = field(default_factory=dict)


def _configured(profile: cfgmod.Profile, settings: dict) -> cfgmod.Profile:
    trial = copy.deepcopy(profile)
    cfgmod.apply(trial, settings, source="tune")
    for stage in (trial.reward, trial.mle, trial.ppo):
        # Each trial checkpoints in its own folder: a configured checkpoint_dir shared by
        # every trial would let one resume from another's state.
        stage.checkpoint_dir = None
    return cfgmod.validate(trial)


def _validation_scores(ws: Workspace, variant: str, adapter_dir: Path, trial_dir: Path) -> dict:
    """Greedy predictions on the validation rows and their Table 1-2 scores (raw outputs)."""
    from . import generate, metrics

    p = ws.profile
    predictions = trial_dir / "validation_predictions.jsonl"
    generated = generate.generate_predictions(
        ws.validation_path, predictions, variant, p.base_model, str(adapter_dir), p.generate,
        allow_pickle=p.allow_pickle, trust_remote_code=p.trust_remote_code)
    # Selection reads ROUGE and length only: no BLEURT model per trial.
    scoring = dataclasses.replace(p.score, bleurt_checkpoint=None)
    scores = metrics.score_file(predictions, trial_dir / "validation_scores.json", scoring)
    means = scores["models"][variant]
    return {"n": means["n"], "excess_length": means["excess_length"], METRIC: means[METRIC],
            "rougeL_f1": means["rougeL_f1"],
            "semantic_similarity": means.get("semantic_similarity"),
            "generate_seconds": generated["seconds"]}


def run_mle_trial(ws: Workspace, settings: dict, trial_dir: Path) -> dict:
    from . import mle

    p = _configured(ws.profile, settings)
    summary = mle.train_mle(ws.fit_path, trial_dir, p.mle, p.base_model,
                            **p.training_options())
    trained = {"steps": summary["train"].get("steps"),
               "final_loss": summary["train"].get("final_loss")}
    return {"training": trained,
            "validation": _validation_scores(ws, "mle", trial_dir / "adapter", trial_dir)}


def run_rl_trial(ws: Workspace, settings: dict, trial_dir: Path) -> dict:
    from . import ppo

    p = _configured(ws.profile, settings)
    summary = ppo.train_ppo(ws.fit_path, ws.reward_dir / "adapter", trial_dir, p.ppo,
                            p.base_model, **p.training_options())
    final = summary.get("final_sampled") or {}  # the last sampled update's means
    trained = {"updates": summary.get("updates"), "final_reward": final.get("reward_mean"),
               "final_excess_length": final.get("excess_length_mean")}
    return {"training": trained,
            "validation": _validation_scores(ws, "rl", trial_dir / "adapter", trial_dir)}


# ----------------------------------------------------------------------------- the search

def prepare(profile: cfgmod.Profile, out: Path, data_source: str = "",
            validation_fraction: float = VALIDATION_FRACTION) -> Workspace:
    """Filter the task data as the filter_data step does, then split its training rows into
    fit (fit.jsonl) and validation (validation.jsonl). Only train.jsonl is read afterwards."""
    from . import data as task_data
    from .modeling import load_tokenizer

    source = data_source or profile.data.source or str(task_data.DEFAULT_DATA)
    profile.data = task_data.with_known_columns(profile.data, source)
    tokenizer = load_tokenizer(profile.base_model, trust_remote_code=profile.trust_remote_code,
                               allow_pickle=profile.allow_pickle)
    data_dir = out / "data"
    summary = task_data.prepare(source, data_dir, profile.data, tokenizer)
    # The filter writes the test split too; gone at once, so no trial can read it.
    (data_dir / "test.jsonl").unlink()
    fit, validation = split_validation(list(read_jsonl(data_dir / "train.jsonl")),
                                       validation_fraction)
    ws = Workspace(out, profile, data_dir / "fit.jsonl", data_dir / "validation.jsonl")
    write_jsonl(ws.fit_path, fit)
    write_jsonl(ws.validation_path, validation)
    ws.prepared = {"source": str(source), "data_sha256": summary["data_sha256"],
                   "train_rows": len(fit) + len(validation), "fit_rows": len(fit),
                   "validation_rows": len(validation), "validation_fraction": validation_fraction,
                   "validation_ids": [r["id"] for r in validation]}
    return ws


def train_shared_reward(ws: Workspace) -> dict:
    """The reward model every RL trial uses, at the profile's settings: negatives from the fit
    rows, held-out accuracy on the validation rows."""
    from . import negatives, reward
    from .modeling import load_tokenizer

    p = ws.profile
    started = time.perf_counter()
    tokenizer = load_tokenizer(p.base_model, trust_remote_code=p.trust_remote_code,
                               allow_pickle=p.allow_pickle)
    rm_path = ws.out / "reward" / "rm.jsonl"
    rm_path.parent.mkdir(parents=True, exist_ok=True)
    negatives.build_reward_dataset(ws.fit_path, rm_path, p.negatives, tokenizer)
    ws.reward_dir = ws.out / "reward" / "model"  # checkpoints: its own folder (_configured)
    summary = reward.train_reward_model(rm_path, ws.reward_dir, p.reward, p.base_model,
                                        list(read_jsonl(ws.validation_path)),
                                        **p.training_options())
    accuracy = (summary.get("eval") or {}).get("accuracy") or {}
    return {"seconds": round(time.perf_counter() - started, 1),
            "learning_rate": p.reward.optim.learning_rate,
            "head_learning_rate": p.reward.optim.head_learning_rate,
            "validation_accuracy": {k: round(v, 3) for k, v in accuracy.items()}}


def _trial(method: str, index: int, settings: dict,
           runner: Callable[[Workspace, dict, Path], dict], ws: Workspace) -> dict:
    trial_dir = ws.out / method / f"trial-{index}"
    record: dict[str, Any] = {"method": method, "trial": index, "settings": settings}
    started = time.perf_counter()
    try:
        record.update(runner(ws, settings, trial_dir))
    except FloatingPointError as exc:  # the NaN guard stopped it: diverged, ranks last
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def tune(profile: cfgmod.Profile, out: str | Path, *, trials: int = TRIALS, data_source: str = "",
         validation_fraction: float = VALIDATION_FRACTION, factor: float = GRID_FACTOR,
         max_excess: float = MAX_RL_EXCESS, log: Callable[[str], None] = print) -> dict:
    """The whole search: data, the shared reward model, `trials` MLE and `trials` RL trials,
    each recorded in out/tune.json and out/tune.md as it ends; the choice in out/chosen.yaml.
    Returns the record (tune.json's content)."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if profile.ppo.init_policy_from_mle:
        raise cfgmod.ConfigError("tune: init_policy_from_mle is not supported (each RL trial "
                                 "starts from the base, as the demo does)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    profile = _configured(profile, {})
    started = time.perf_counter()
    ws = prepare(profile, out, data_source, validation_fraction)
    log(f"tune: {ws.prepared['fit_rows']} training rows, {ws.prepared['validation_rows']} "
        f"validation rows (held out of train.jsonl; the test split is not read)")
    record: dict[str, Any] = {
        "profile": profile.name, "base_model": profile.base_model,
        "max_train": profile.data.max_train, "trials_per_method": trials,
        "grid_factor": factor, "selection": selection_rule(max_excess),
        "max_rl_excess": max_excess, "data": ws.prepared, "trials": [], "chosen": {},
        "fields": {"mle": list(MLE_FIELDS), "rl": list(RL_FIELDS)},
        "profile_values": {k: cfgmod._get(profile, k) for k in MLE_FIELDS + RL_FIELDS},
    }
    record["reward"] = train_shared_reward(ws)
    log(f"tune: reward model trained once in {record['reward']['seconds']} s "
        f"(validation accuracy: {_accuracies(record['reward']['validation_accuracy'])})")
    plan = ([("mle", s, run_mle_trial) for s in mle_grid(profile, trials, factor)]
            + [("rl", s, run_rl_trial) for s in rl_grid(profile, trials, factor)])
    counts: dict[str, int] = {}
    for method, settings, runner in plan:
        counts[method] = counts.get(method, 0) + 1
        trial = _trial(method, counts[method], settings, runner, ws)
        record["trials"].append(trial)
        log(f"tune: {trial_line(trial)}")
        _finish(record, out, max_excess, started)
    return record


def _finish(record: dict, out: Path, max_excess: float, started: float) -> None:
    """Choose from the trials so far and write tune.json, tune.md and chosen.yaml."""
    for method in ("mle", "rl"):
        chosen = select(method, [t for t in record["trials"] if t["method"] == method],
                        max_excess)
        record["chosen"][method] = chosen
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["chosen_yaml"] = chosen_yaml(record["profile"], record["chosen"])
    write_json(out / "tune.json", record)
    (out / "tune.md").write_text(markdown(record))
    (out / "chosen.yaml").write_text(record["chosen_yaml"])


# ----------------------------------------------------------------------------- reporting

def _number(value: Any) -> str:
    if value is None:  # a head step size left unset: the LoRAs' (OptimConfig)
        return "none (the LoRAs')"
    return f"{value:g}" if isinstance(value, float) else str(value)


_SHORT = {"mle.optim.learning_rate": "lr", "ppo.optim.learning_rate": "lr",
          "ppo.optim.head_learning_rate": "value head lr"}


def trial_line(trial: dict) -> str:
    settings = ", ".join(f"{_SHORT.get(k, k)} {v:g}" for k, v in trial["settings"].items())
    if "error" in trial:
        return f"{trial['method']} trial {trial['trial']} ({settings}) failed: {trial['error']}"
    v = trial["validation"]
    return (f"{trial['method']} trial {trial['trial']} ({settings}): validation la-ROUGE-L F1 "
            f"{v[METRIC]:.3f}, excess length {v['excess_length']:+.2f} words, "
            f"{trial['seconds']:.0f} s")


def _accuracies(accuracy: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v:.0%}" for k, v in accuracy.items()) or "n/a"


def markdown(record: dict) -> str:
    """tune.md: both searches side by side, every trial, the rule and the choice."""
    data = record["data"]
    lines = [f"# Step-size search: MLE and RL, {record['trials_per_method']} trials each",
             "",
             f"Profile `{record['profile']}` ({record['base_model']}), "
             f"{data['fit_rows']} rows to train on, {data['validation_rows']} validation rows "
             f"held out of the filtered training rows by a hash of their id (the test split "
             f"is not read). Total {record.get('seconds', 0) / 60:.1f} min.",
             "",
             f"Selection: {record['selection']}",
             "",
             "The profile's values: " + ", ".join(
                 f"`{k}` {_number(v)}"
                 for k, v in record["profile_values"].items()) + ".",
             "",
             f"Reward model: trained once at the profile's step sizes (LoRA "
             f"{record['reward']['learning_rate']:g}, head "
             f"{_number(record['reward']['head_learning_rate'])}) and shared by every RL "
             f"trial; not tuned here. Held-out accuracy on the validation rows: "
             f"{_accuracies(record['reward']['validation_accuracy'])}.",
             ""]
    for method, title in (("mle", "MLE"), ("rl", "RL (PPO)")):
        trials = [t for t in record["trials"] if t["method"] == method]
        keys = record["fields"][method]
        lines += [f"## {title}", "",
                  "| trial | " + " | ".join(f"`{k}`" for k in keys)
                  + " | la-ROUGE-L F1 | excess length (words) | ROUGE-L F1 | seconds | |",
                  "|---:|" + "---:|" * len(keys) + "---:|---:|---:|---:|---|"]
        chosen = record["chosen"].get(method)
        for t in trials:
            values = " | ".join(f"{t['settings'][k]:g}" for k in keys)
            if "error" in t:
                lines.append(f"| {t['trial']} | {values} | failed | | | {t['seconds']:.0f} | "
                             f"{t['error'][:60]} |")
                continue
            v = t["validation"]
            mark = "**chosen**" if chosen is not None and chosen["trial"] == t["trial"] else ""
            lines.append(f"| {t['trial']} | {values} | {v[METRIC]:.3f} | "
                         f"{v['excess_length']:+.2f} | {v['rougeL_f1']:.3f} | "
                         f"{t['seconds']:.0f} | {mark} |")
        lines.append("")
    lines += [f"## Chosen values (`pipeline.py run --profile {record['profile']} --config "
              f"chosen.yaml`)", "", "```yaml",
              record["chosen_yaml"].rstrip("\n"), "```", ""]
    return "\n".join(lines)
