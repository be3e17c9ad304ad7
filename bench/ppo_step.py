"""Seconds per PPO update, peak RSS and sampling speed on SmolLM2-135M (issue 8's setting).

The setting of TRL's anchor run (bench/README.md): batch 7, prompts of about 250 tokens through
the chat template, 100 new tokens at temperature 1, policy and value LoRA r=32 α=16, a reward
LoRA r=16 + head, one PPO epoch, one minibatch, no KL. Every sample is forced to the full 100
tokens (EOS is forbidden until then, `min_new_tokens`), so each sampled update does the same
work. Reference updates score the true outputs (+ EOS) instead of sampling.

Prompts come from data/debian-descriptions/train.jsonl.gz (input/output rows) when it is
bundled, otherwise from synthetic text; either way the input text is cut so the formatted prompt
is about `--prompt-tokens` tokens. `--prompts FILE` takes the token ids from a JSON file instead
(bench/ppo_vs_trl.py writes one, so that both sides of the comparison see the same prompts).
The reward adapter is random unless `--reward-adapter` names a trained one: the work per update
does not depend on its weights.

Run in a fresh process (peak RSS is the process's ru_maxrss):
    .venv/bin/python bench/ppo_step.py                 # 1 warm-up + 5 measured updates per kind
    .venv/bin/python bench/ppo_step.py --smoke         # tiny model, 2 updates, seconds (CI)
Prints one `name value unit` line per figure (`--json FILE` also writes them, with every
measured update's time). A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lastmile import config, ppo, ppo_equations  # noqa: E402
from lastmile.config import DEFAULT_INSTRUCTION, EMBEDDED_BASE, TINY_BASE, LoraSpec, PPOConfig  # noqa: E402
from lastmile.io import read_jsonl  # noqa: E402
from lastmile.modeling import AdapterModel, encode_outputs, load_base  # noqa: E402

TRL_SECONDS = 61.0  # TRL 0.29.1 PPOTrainer, same setting, this kind of machine (issue 8)
TRL_RSS_GIB = 18.2
DEBIAN = ROOT / "data" / "debian-descriptions"
FILLER = ("This package provides a library and command line tools for parsing, converting and "
          "validating configuration files, with bindings for several languages, a plugin "
          "interface, extensive documentation and a test suite. ")


def chat_prompt(tokenizer, text: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{instruction}\n\n{text}"}], add_generation_prompt=True,
        tokenize=False)


def fit_prompt(tokenizer, text: str, tokens: int) -> list[int]:
    """Token ids of the chat prompt with `text` cut so the whole is about `tokens` long."""
    overhead = len(tokenizer(chat_prompt(tokenizer, ""), add_special_tokens=False)["input_ids"])
    body = tokenizer(text, add_special_tokens=False)["input_ids"][: max(1, tokens - overhead)]
    prompt = chat_prompt(tokenizer, tokenizer.decode(body))
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def source_files() -> list[Path]:
    """The bundled Debian rows: the train split (.jsonl or .jsonl.gz), else every split."""
    if not DEBIAN.is_dir():
        return []
    return sorted(DEBIAN.glob("train.jsonl*")) or sorted(DEBIAN.glob("*.jsonl*"))


def source_rows(n: int, seed: int) -> tuple[list[dict], str]:
    """(input, output) rows: Debian descriptions when bundled, else synthetic text."""
    files = source_files()
    rows = []
    for f in files:
        for row in read_jsonl(f):  # reads .jsonl.gz too
            if isinstance(row.get("input"), str) and isinstance(row.get("output"), str):
                rows.append({"input": row["input"], "output": row["output"]})
    if len(rows) >= n:
        random.Random(seed).shuffle(rows)
        # several descriptions per prompt, so short ones still reach the prompt length
        return [{"input": " ".join(r["input"] for r in rows[i::n][:8]),
                 "output": rows[i]["output"]} for i in range(n)], \
            ",".join(str(f.relative_to(ROOT)) for f in files)
    return [{"input": FILLER * 12, "output": f"library and tools for configuration files {i}"}
            for i in range(n)], "synthetic"


def bench_batch(tokenizer, batch: int, prompt_tokens: int, new_tokens: int, seed: int = 0
                ) -> tuple[list[list[int]], list[list[int]], str]:
    """(prompt ids, reference output ids, where the text came from) for one PPO batch."""
    rows, source = source_rows(batch, seed=seed)
    prompts = [fit_prompt(tokenizer, r["input"], prompt_tokens) for r in rows]
    references = encode_outputs(tokenizer, [r["output"] for r in rows], new_tokens)
    return prompts, references, source


def load_batch(path: str | os.PathLike, batch: int) -> tuple[list[list[int]], list[list[int]], str]:
    """The batch `bench_batch` made, from the JSON file bench/ppo_vs_trl.py writes."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    prompts, references = data["prompts"], data["references"]
    if len(prompts) != batch or len(references) != batch:
        raise SystemExit(f"{path}: {len(prompts)} prompts and {len(references)} references, "
                         f"--batch is {batch}")
    return prompts, references, data.get("source", str(path))


def build(args) -> tuple[AdapterModel, object, PPOConfig]:
    base, tokenizer = load_base(args.base)
    model = AdapterModel(base)
    if args.reward_adapter:
        model.load_adapter("reward", args.reward_adapter, trainable=False)
    else:
        model.add_adapter("reward", LoraSpec(r=16, alpha=16), head=True, seed=1, trainable=False)
    cfg = PPOConfig(batch_size=args.batch, max_new_tokens=args.new_tokens, temperature=1.0)
    model.add_adapter("policy", cfg.policy_lora, seed=2)
    model.add_adapter("value", cfg.value_lora, head=True, seed=3)
    return model, tokenizer, cfg


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tokenizer, cfg = build(args)
    load_seconds = time.perf_counter() - t0
    if args.prompts:
        prompts, references, source = load_batch(args.prompts, args.batch)
    else:
        prompts, references, source = bench_batch(tokenizer, args.batch, args.prompt_tokens,
                                                  cfg.max_new_tokens)
    trainer = ppo.PPOTrainer(model, tokenizer, cfg, total_updates=2 * (args.updates + 1),
                             micro_batch_size=args.micro_batch or None,
                             merge=not args.no_merge, fast=not args.textbook,
                             precision=args.precision)
    times: dict[str, list[dict]] = {ppo.SAMPLED: [], ppo.REFERENCE: []}
    for i in range(args.updates + 1):  # the first update of each kind is the warm-up
        for kind in (ppo.SAMPLED, ppo.REFERENCE):
            t = {}
            start = time.perf_counter()
            if kind == ppo.SAMPLED:
                outputs = trainer.sample(prompts, min_new_tokens=cfg.max_new_tokens)
                t["new_tokens"] = sum(len(o) for o in outputs)
            else:
                outputs = references
            t["sample"] = time.perf_counter() - start
            mark = time.perf_counter()
            rollout = trainer.rollout(kind, prompts, outputs, references)
            t["reward"] = time.perf_counter() - mark
            mark = time.perf_counter()
            trainer.step(rollout)
            t["train"] = time.perf_counter() - mark
            t["total"] = time.perf_counter() - start
            if i > 0:
                times[kind].append(t)
            if args.verbose:
                print(f"# update {i} {kind}: " + " ".join(f"{k}={v:.2f}" for k, v in t.items()),
                      file=sys.stderr, flush=True)

    def med(kind, key):
        return statistics.median(t[key] for t in times[kind])

    sampled_tokens = [t["new_tokens"] / t["sample"] for t in times[ppo.SAMPLED]]
    return {
        "source": source, "base": args.base, "batch": args.batch,
        "prompt_tokens_mean": statistics.fmean(len(p) for p in prompts),
        "reference_tokens_mean": statistics.fmean(len(r) for r in references),
        "new_tokens": cfg.max_new_tokens, "updates_per_kind": args.updates,
        "threads": torch.get_num_threads(), "micro_batch": args.micro_batch,
        "merge": not args.no_merge, "precision": args.precision, "textbook": args.textbook,
        "load_seconds": load_seconds,
        "sampled_update_seconds": med(ppo.SAMPLED, "total"),
        "reference_update_seconds": med(ppo.REFERENCE, "total"),
        "sampling_seconds": med(ppo.SAMPLED, "sample"),
        "sampled_reward_seconds": med(ppo.SAMPLED, "reward"),
        "sampled_train_seconds": med(ppo.SAMPLED, "train"),
        "reference_reward_seconds": med(ppo.REFERENCE, "reward"),
        "reference_train_seconds": med(ppo.REFERENCE, "train"),
        "sampling_tokens_per_second": statistics.median(sampled_tokens),
        "peak_rss_gib": rss_gib(),
        "sampled_update_seconds_all": [t["total"] for t in times[ppo.SAMPLED]],
        "reference_update_seconds_all": [t["total"] for t in times[ppo.REFERENCE]],
    }


def precision_check(args) -> dict:
    """How far bf16 moves one update: losses and gradient cosine vs float32, same rollout."""
    torch.manual_seed(0)
    model, tokenizer, cfg = build(args)
    if args.prompts:
        prompts, references, _ = load_batch(args.prompts, args.batch)
    else:
        prompts, references, _ = bench_batch(tokenizer, args.batch, args.prompt_tokens,
                                             cfg.max_new_tokens)
    fp32 = ppo.PPOTrainer(model, tokenizer, cfg, 1, micro_batch_size=args.micro_batch or None)
    outputs = fp32.sample(prompts)  # the policy's own samples, float32
    rollouts = {p: ppo.PPOTrainer(model, tokenizer, cfg, 1, precision=p,
                                  micro_batch_size=args.micro_batch or None)
                for p in config.PRECISIONS}
    result = {}
    grads = {}
    for precision, trainer in rollouts.items():
        rollout = trainer.rollout(ppo.SAMPLED, prompts, outputs, references)
        stats = trainer.gradients(rollout)
        result[f"{precision}_rm_reward_per_token"] = float(ppo_equations.masked_mean(rollout.rm_rewards,
                                                                           rollout.mask))
        result[f"{precision}_policy_loss"] = stats["policy_loss"]
        result[f"{precision}_value_loss"] = stats["value_loss"]
        grads[precision] = {name: torch.cat([p.grad.flatten() for p in params])
                            for name, params in (("policy", trainer.policy_params),
                                                 ("value", trainer.value_params))}
    for name in ("policy", "value"):
        a, b = grads["float32"][name], grads["bfloat16"][name]
        result[f"{name}_grad_cosine"] = float(torch.nn.functional.cosine_similarity(a, b, 0))
        result[f"{name}_grad_norm_ratio"] = float(b.norm() / a.norm())
    return result


def report(result: dict) -> None:
    print(f"setting base={result['base']} batch={result['batch']} "
          f"prompt_tokens={result['prompt_tokens_mean']:.0f} "
          f"reference_tokens={result['reference_tokens_mean']:.1f} "
          f"new_tokens={result['new_tokens']} prompts={result['source']} "
          f"threads={result['threads']} micro_batch={result['micro_batch']} "
          f"merge={result['merge']} precision={result['precision']} textbook={result['textbook']} updates={result['updates_per_kind']}/kind")
    for key, unit in (("sampled_update_seconds", "s"), ("reference_update_seconds", "s"),
                      ("sampling_seconds", "s"), ("sampled_reward_seconds", "s"),
                      ("sampled_train_seconds", "s"), ("reference_reward_seconds", "s"),
                      ("reference_train_seconds", "s"),
                      ("sampling_tokens_per_second", "tok/s"), ("peak_rss_gib", "GiB")):
        print(f"{key} {result[key]:.2f} {unit}")
    if result["base"] == EMBEDDED_BASE:
        print(f"sampled_vs_trl {result['sampled_update_seconds'] / TRL_SECONDS:.2f} x "
              f"(TRL {TRL_SECONDS} s)")
        print(f"rss_vs_trl {result['peak_rss_gib'] / TRL_RSS_GIB:.2f} x (TRL {TRL_RSS_GIB} GiB)")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--updates", type=int, default=5, help="measured updates per batch kind")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 2 updates (CI)")
    p.add_argument("--base", default=EMBEDDED_BASE)
    p.add_argument("--batch", type=int, default=7)
    p.add_argument("--prompt-tokens", type=int, default=250)
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--micro-batch", type=int, default=ppo.DEFAULT_MICRO_BATCH,
                   help="rows per forward/backward (0: the whole batch)")
    p.add_argument("--no-merge", action="store_true",
                   help="sample and score with the LoRA unmerged")
    p.add_argument("--precision", choices=sorted(config.PRECISIONS), default="float32",
                   help="compute precision of the frozen base (see lastmile.ppo.PPOTrainer)")
    p.add_argument("--textbook", action="store_true",
                   help="extra no-grad forwards for pi_old and V (the unoptimised PPO step)")
    p.add_argument("--precision-check", action="store_true",
                   help="instead: one update's losses and gradients, float32 vs bfloat16")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--reward-adapter", default=None, help="a trained reward adapter directory")
    p.add_argument("--prompts", default=None,
                   help="prompt and reference token ids from this JSON file (ppo_vs_trl.py)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("-v", "--verbose", action="store_true", help="per-update times on stderr")
    args = p.parse_args(argv)
    if args.smoke:
        args.base, args.updates, args.new_tokens, args.prompt_tokens = TINY_BASE, 2, 8, 64
    if args.updates < 1:
        p.error("--updates must be >= 1")
    return args


def main(argv=None) -> int:
    # set here, not at import: tests import this file and their pipelines show bars
    os.environ.setdefault("LASTMILE_NO_PROGRESS", "1")
    args = parse(argv)
    if args.precision_check:
        for key, value in precision_check(args).items():
            print(f"{key} {value:.6f}")
        return 0
    result = run(args)
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
