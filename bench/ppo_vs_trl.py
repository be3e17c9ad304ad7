"""Ours vs TRL 0.29.1's PPOTrainer on the same prompts, alternately, in one invocation (issue 8).

Each side runs in a fresh subprocess of its own, so its peak RSS is that process's ru_maxrss:
  * ours: the project venv running bench/ppo_step.py --json (sampled and reference updates);
  * TRL:  TRL's venv (`make bench-trl` builds .venv-trl, outside the project's dependencies)
          running this file as `--worker trl`.
The sides alternate (ours, TRL, ours, TRL, ...) for `--rounds` rounds; each run does one warm-up
update and `--updates` measured ones. The table gives the median seconds per update over every
measured update of every round, the largest peak RSS of any round, sampling tokens per second,
and the ratios ours/TRL against the targets (time <= 0.5x, RSS <= 0.25x).

TRL's side is the anchor's setting (bench/README.md): `trl.experimental.ppo.PPOTrainer` with
num_ppo_epochs=1, num_mini_batches=1, batch 7 (per_device_train_batch_size=7, no gradient
accumulation), response_length=100, temperature 1.0, kl_coef=0, no stop token (every response is
the full 100 tokens, like ours), fp32 (bf16=False: TRL's default bf16 refuses to start on a CPU
without use_cpu, and the base is the dequantized fp32 SmolLM2). The policy is the base with a
peft LoRA r=32 alpha=16 on all linear layers (the reference is the adapter disabled); value and
reward models are full AutoModelForSequenceClassification copies of the base. An update is timed
from one `on_step_end` callback to the next (the first from `on_train_begin`); sampling is timed
by wrapping TRL's `batch_generation`.

    make bench-trl                                         # the full comparison (slow: ~30 min)
    .venv/bin/python bench/ppo_vs_trl.py --trl-python .venv-trl/bin/python
    .venv/bin/python bench/ppo_vs_trl.py --smoke           # tiny model, seconds (CI, tests)
A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TRL_VERSION = "0.29.1"
DEFAULT_TRL_PYTHON = ROOT / ".venv-trl" / "bin" / "python"
TARGET_TIME = 0.5  # ours/TRL seconds per update
TARGET_RSS = 0.25  # ours/TRL peak RSS
ANCHOR_SECONDS, ANCHOR_RSS_GIB = 61.0, 18.2  # TRL on the reference machine (issue 8)
SMOKE = dict(updates=2, rounds=1, prompt_tokens=64, new_tokens=8)
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
             "LASTMILE_NO_PROGRESS": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
             "CUDA_VISIBLE_DEVICES": ""}  # a CPU benchmark on both sides


# ----------------------------------------------------------------------------- pure parts

def median(values) -> float:
    values = [float(v) for v in values]
    return statistics.median(values) if values else math.nan


def ratio(ours: float, theirs: float) -> float:
    try:
        return float(ours) / float(theirs)
    except (ZeroDivisionError, TypeError, ValueError):
        return math.nan


def summarize(ours_runs: list[dict], trl_runs: list[dict]) -> dict:
    """One figure per quantity from the per-run JSON of both sides (pools every measured update)."""
    s = {
        "rounds": max(len(ours_runs), len(trl_runs)),
        "ours_sampled_update_seconds": median(
            t for r in ours_runs for t in r["sampled_update_seconds_all"]),
        "ours_reference_update_seconds": median(
            t for r in ours_runs for t in r["reference_update_seconds_all"]),
        "ours_peak_rss_gib": max((r["peak_rss_gib"] for r in ours_runs), default=math.nan),
        "ours_sampling_tokens_per_second": median(
            r["sampling_tokens_per_second"] for r in ours_runs),
        "trl_update_seconds": median(t for r in trl_runs for t in r["update_seconds_all"]),
        "trl_peak_rss_gib": max((r["peak_rss_gib"] for r in trl_runs), default=math.nan),
        "trl_sampling_tokens_per_second": median(
            r["sampling_tokens_per_second"] for r in trl_runs),
    }
    s["time_ratio"] = ratio(s["ours_sampled_update_seconds"], s["trl_update_seconds"])
    s["reference_time_ratio"] = ratio(s["ours_reference_update_seconds"], s["trl_update_seconds"])
    s["rss_ratio"] = ratio(s["ours_peak_rss_gib"], s["trl_peak_rss_gib"])
    s["sampling_speedup"] = ratio(s["ours_sampling_tokens_per_second"],
                                  s["trl_sampling_tokens_per_second"])
    return s


def _verdict(value: float, target: float) -> str:
    if math.isnan(value):
        return "n/a"
    return "met" if value <= target else "NOT met"


def format_table(s: dict) -> str:
    """The human table: ours, TRL, ours/TRL and the target for each figure."""
    rows = [
        ("s/update, sampled", s["ours_sampled_update_seconds"], s["trl_update_seconds"],
         s["time_ratio"], TARGET_TIME),
        ("s/update, reference", s["ours_reference_update_seconds"], s["trl_update_seconds"],
         s["reference_time_ratio"], None),
        ("peak RSS, GiB", s["ours_peak_rss_gib"], s["trl_peak_rss_gib"], s["rss_ratio"],
         TARGET_RSS),
        ("sampling, tok/s", s["ours_sampling_tokens_per_second"],
         s["trl_sampling_tokens_per_second"], s["sampling_speedup"], None),
    ]
    head = f"{'':22} {'ours':>9} {'TRL ' + TRL_VERSION:>11} {'ours/TRL':>9}  target"
    lines = [head, "-" * (len(head) + 12)]
    for name, ours, theirs, r, target in rows:
        goal = f"<= {target:.2f}x {_verdict(r, target)}" if target is not None else ""
        lines.append(f"{name:22} {ours:9.2f} {theirs:11.2f} {r:8.2f}x  {goal}".rstrip())
    return "\n".join(lines)


def figure_lines(s: dict) -> list[str]:
    """`name value unit` lines, one per figure (what scripts and tests parse)."""
    units = [("ours_sampled_update_seconds", "s"), ("ours_reference_update_seconds", "s"),
             ("ours_peak_rss_gib", "GiB"), ("ours_sampling_tokens_per_second", "tok/s"),
             ("trl_update_seconds", "s"), ("trl_peak_rss_gib", "GiB"),
             ("trl_sampling_tokens_per_second", "tok/s")]
    lines = [f"{k} {s[k]:.3f} {u}" for k, u in units]
    lines.append(f"time_ratio {s['time_ratio']:.3f} x (target <= {TARGET_TIME})")
    lines.append(f"reference_time_ratio {s['reference_time_ratio']:.3f} x")
    lines.append(f"rss_ratio {s['rss_ratio']:.3f} x (target <= {TARGET_RSS})")
    lines.append(f"sampling_speedup {s['sampling_speedup']:.3f} x")
    return lines


UNITS = ("s", "GiB", "tok/s", "x")


def parse_figures(text: str) -> dict[str, float]:
    """The inverse of `figure_lines` (and of ppo_step.py's output): {name: value} from every
    `name value unit` line whose unit is one of UNITS."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] in UNITS and parts[0].isidentifier():
            try:
                out[parts[0]] = float(parts[1])
            except ValueError:
                continue
    return out


def machine() -> dict:
    """The CPU, cores and memory this ran on (for bench/README.md)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = math.nan
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) / 2**20
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = math.nan
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "load_1min": load,
            "python": platform.python_version(), "os": platform.platform()}


# ----------------------------------------------------------------------------- TRL worker

def _pad_token_id(tokenizer, prompts: list[list[int]]) -> int:
    """A pad id that no prompt contains. TRL treats every pad-id token as padding (it masks it
    out of attention), and SmolLM2 pads with <|im_end|>, which the chat template puts inside
    every prompt; so use the tokenizer's pad only when it is absent from the prompts, else
    <|endoftext|>, else a new [PAD] token (the model's embeddings are then resized)."""
    used = {t for p in prompts for t in p}
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in used:
        return tokenizer.pad_token_id
    vocab = tokenizer.get_vocab()
    for candidate in ("<|endoftext|>", tokenizer.unk_token):
        if candidate in vocab and vocab[candidate] not in used:
            tokenizer.pad_token = candidate
            return vocab[candidate]
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return tokenizer.pad_token_id


def trl_worker(args) -> dict:
    """TRL's PPO update in the anchor's setting; run with TRL's venv python."""
    os.environ.update({k: v for k, v in CHILD_ENV.items() if k not in os.environ})
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer, TrainerCallback)

    import peft
    import trl
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prompts = json.loads(Path(args.prompts).read_text(encoding="utf-8"))["prompts"]
    if len(prompts) != args.batch:
        raise SystemExit(f"{args.prompts}: {len(prompts)} prompts, --batch is {args.batch}")

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.base_dir)
    tokenizer.padding_side = "left"
    pad_id = _pad_token_id(tokenizer, prompts)
    policy = AutoModelForCausalLM.from_pretrained(args.base_dir, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(args.base_dir, num_labels=1,
                                                               dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(args.base_dir, num_labels=1,
                                                                dtype=torch.float32)
    for model in (policy, value, reward):
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = pad_id
    policy.generation_config.pad_token_id = pad_id
    dataset = Dataset.from_dict({"input_ids": prompts})

    total_updates = args.updates + 1  # the first is the warm-up
    with tempfile.TemporaryDirectory(prefix="trl-ppo-") as out:
        config = PPOConfig(
            output_dir=out, report_to="none", save_strategy="no", disable_tqdm=True,
            seed=0, use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0,
            per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
            num_mini_batches=1, num_ppo_epochs=1, total_episodes=args.batch * total_updates,
            local_rollout_forward_batch_size=64,  # TRL's default: the 7 rows in one pass
            response_length=args.new_tokens, temperature=1.0, kl_coef=0.0,
            stop_token=None, missing_eos_penalty=None, num_sample_generations=0)
        peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                                 target_modules="all-linear", lora_dropout=0.0,
                                 task_type="CAUSAL_LM")

        marks: list[float] = []
        samples: list[tuple[float, int]] = []

        class Clock(TrainerCallback):
            def on_train_begin(self, *a, **k):
                marks.append(time.perf_counter())

            def on_step_end(self, *a, **k):
                marks.append(time.perf_counter())

        generate = trl_ppo.batch_generation

        def timed_generation(model, queries, *a, **k):
            t = time.perf_counter()
            result = generate(model, queries, *a, **k)
            new = (result[0].shape[1] - queries.shape[1]) * queries.shape[0]
            samples.append((time.perf_counter() - t, new))
            return result

        trl_ppo.batch_generation = timed_generation  # train() looks it up in its module
        trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy,
                             ref_model=None, reward_model=reward, value_model=value,
                             train_dataset=dataset, eval_dataset=dataset,
                             peft_config=peft_config, callbacks=[Clock()])
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        load_seconds = time.perf_counter() - start
        trainer.train()
    updates = [b - a for a, b in zip(marks, marks[1:])]
    if len(updates) != total_updates or len(samples) != total_updates:
        raise SystemExit(f"TRL ran {len(updates)} updates and {len(samples)} generations, "
                         f"expected {total_updates}")
    measured, measured_samples = updates[1:], samples[1:]
    return {
        "side": "trl", "trl": trl.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "base_dir": str(args.base_dir), "batch": args.batch, "new_tokens": args.new_tokens,
        "prompt_tokens_mean": statistics.fmean(len(p) for p in prompts),
        "pad_token_id": pad_id, "trainable_parameters": trainable,
        "load_seconds": load_seconds, "warmup_update_seconds": updates[0],
        "update_seconds_all": measured, "update_seconds": statistics.median(measured),
        "sampling_seconds": statistics.median(t for t, _ in measured_samples),
        "new_tokens_per_row": statistics.fmean(n for _, n in measured_samples) / args.batch,
        "sampling_tokens_per_second": statistics.median(n / t for t, n in measured_samples),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


# ----------------------------------------------------------------------------- driver

def _load_ppo_step():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ppo_step", BENCH / "ppo_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare(args, work: Path) -> tuple[str, Path, Path, str]:
    """(our --base, TRL's base directory, prompts file, prompt source), in the project venv."""
    ppo_step = _load_ppo_step()  # sets up sys.path and imports lastmile
    from lastmile.config import EMBEDDED_BASE, TINY_BASE
    from lastmile.modeling import load_base, load_tokenizer, resolve_base

    if args.smoke:  # lastmile's tiny random Llama, saved so that both sides load the same weights
        base_dir = work / "tiny-base"
        model, tokenizer = load_base(TINY_BASE)
        model.save_pretrained(base_dir, safe_serialization=True)
        tokenizer.save_pretrained(base_dir)
        ours_base = str(base_dir)
    else:
        ours_base = args.base or EMBEDDED_BASE
        base_dir = Path(resolve_base(ours_base))
        tokenizer = load_tokenizer(ours_base)
    prompts, references, source = ppo_step.bench_batch(tokenizer, args.batch, args.prompt_tokens,
                                                       args.new_tokens)
    path = work / "prompts.json"
    path.write_text(json.dumps({"prompts": prompts, "references": references,
                                "source": source}) + "\n", encoding="utf-8")
    return ours_base, base_dir, path, source


def _run(cmd: list[str], log: Path, verbose: bool) -> None:
    env = {**os.environ, **CHILD_ENV}
    if verbose:
        print("$ " + shlex.join(cmd), file=sys.stderr, flush=True)
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if verbose or proc.returncode:
        sys.stderr.write(log.read_text(errors="replace")[-6000:])
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {shlex.join(cmd)}  (log above)")


def compare(args) -> dict:
    trl_python = Path(args.trl_python)
    if not trl_python.exists():
        raise SystemExit(f"{trl_python}: no TRL venv; `make bench-trl` builds .venv-trl "
                         f"(TRL {TRL_VERSION}), or pass --trl-python")
    keep = Path(args.keep) if args.keep else None
    with tempfile.TemporaryDirectory(prefix="ppo-vs-trl-") as tmp:
        work = keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ours_base, base_dir, prompts, source = prepare(args, work)
        common = ["--batch", str(args.batch), "--new-tokens", str(args.new_tokens),
                  "--updates", str(args.updates), "--threads", str(args.threads),
                  "--prompts", str(prompts)]
        ours_runs, trl_runs = [], []
        for r in range(1, args.rounds + 1):
            for side in ("ours", "trl"):
                out = work / f"{side}-{r}.json"
                if side == "ours":
                    cmd = [args.ours_python, str(BENCH / "ppo_step.py"), "--base", ours_base,
                           "--prompt-tokens", str(args.prompt_tokens), *common,
                           "--json", str(out), *shlex.split(args.ours_args)]
                else:
                    cmd = [str(trl_python), str(Path(__file__).resolve()), "--worker", "trl",
                           "--base-dir", str(base_dir), *common, "--json", str(out)]
                t = time.perf_counter()
                _run(cmd, work / f"{side}-{r}.log", args.verbose)
                result = json.loads(out.read_text())
                (ours_runs if side == "ours" else trl_runs).append(result)
                if side == "ours":
                    line = (f"sampled {result['sampled_update_seconds']:.2f} s/update, "
                            f"reference {result['reference_update_seconds']:.2f} s/update")
                else:
                    line = f"{result['update_seconds']:.2f} s/update"
                print(f"round {r} {side:4} {line}, peak RSS {result['peak_rss_gib']:.2f} GiB "
                      f"({time.perf_counter() - t:.0f} s wall)", flush=True)
    return {"base": ours_base, "base_dir": str(base_dir), "prompts": source,
            "ours": ours_runs, "trl": trl_runs, "summary": summarize(ours_runs, trl_runs),
            "machine": machine()}


def report(result: dict, args) -> None:
    ours, trl = result["ours"][0], result["trl"][0]
    m = result["machine"]
    print(f"setting batch={args.batch} prompt_tokens={ours['prompt_tokens_mean']:.0f} "
          f"new_tokens={args.new_tokens} updates={args.updates}/run (+1 warm-up) "
          f"rounds={args.rounds} threads={ours['threads']}/{trl['threads']} (ours/TRL) "
          f"prompts={result['prompts']} base={result['base']}")
    print(f"machine cpu=\"{m['cpu']}\" cores={m['cores']} memory={m['memory_gib']:.1f}GiB "
          f"load_1min={m['load_1min']:.1f} python={m['python']}")
    print(f"versions trl={trl['trl']} transformers={trl['transformers']} peft={trl['peft']} "
          f"torch={trl['torch']} (TRL venv); TRL rows {trl['new_tokens_per_row']:.0f} new "
          f"tokens, {trl['trainable_parameters']} trainable parameters")
    print(format_table(result["summary"]))
    for line in figure_lines(result["summary"]):
        print(line)
    if args.smoke:
        print("note smoke run: a tiny random model, the figures say nothing about the real one")
    else:
        print(f"note TRL on the reference machine (issue 8): {ANCHOR_SECONDS} s/update, "
              f"{ANCHOR_RSS_GIB} GiB")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", choices=["trl"], help=argparse.SUPPRESS)
    p.add_argument("--base-dir", help=argparse.SUPPRESS)  # worker: the base model directory
    p.add_argument("--prompts", help=argparse.SUPPRESS)  # worker: the prompts JSON
    p.add_argument("--lora-r", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--lora-alpha", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true",
                   help="tiny random model, 2 updates, 1 round, short prompts (CI)")
    p.add_argument("--rounds", type=int, default=2, help="alternations ours/TRL")
    p.add_argument("--updates", type=int, default=5, help="measured updates per run")
    p.add_argument("--batch", type=int, default=7)
    p.add_argument("--prompt-tokens", type=int, default=250)
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads on both sides (0: torch's default)")
    p.add_argument("--base", default=None,
                   help="our base model (default: the embedded SmolLM2); TRL loads its directory")
    p.add_argument("--trl-python", default=str(DEFAULT_TRL_PYTHON),
                   help="the TRL venv's python (make bench-trl builds .venv-trl)")
    p.add_argument("--ours-python", default=sys.executable,
                   help="the project venv's python (default: this one)")
    p.add_argument("--ours-args", default="",
                   help="extra arguments for bench/ppo_step.py, e.g. --ours-args='--micro-batch 0'")
    p.add_argument("--keep", default=None, help="keep prompts, per-run JSON and logs here")
    p.add_argument("--json", default=None, help="also write every run's figures to this file")
    p.add_argument("-v", "--verbose", action="store_true", help="commands and child output")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if args.updates < 1 or args.rounds < 1:
        p.error("--updates and --rounds must be >= 1")
    if args.worker and not (args.base_dir and args.prompts and args.json):
        p.error("--worker needs --base-dir, --prompts and --json")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker == "trl":
        result = trl_worker(args)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    result = compare(args)
    report(result, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
