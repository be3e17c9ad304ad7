"""Can PPO's value head learn a baseline before the policy moves? (issue 20 point 4)

On the docstrings the demo's value head never tracks the returns (`value_explained_variance`
near 0 over all 40 updates, docs/demo-experiments.md), so Eq. 2's advantages are bare
rewards-to-go. This measures the obvious remedy, a critic warm-up as OpenRLHF's
`freezing_actor_steps`: the first `--warmup` outer batches step only the value adapter and
head (the policy's gradient is not computed), then `--updates` ordinary PPO updates follow on
the epoch's batches from its start. Everything else is the PPO stage's own code
(`ppo.build_model`, `PPOTrainer`, `ppo._update`); two knobs beyond the profile:

- `--value-scale S`: V(s) = S x head(h), so the head reaches returns of +-100 (the length
  penalty's scale) S times sooner;
- `--value-lora-lr LR`: the value adapter's own step size (the profile's is the policy's).

It needs a finished run's training rows and reward adapter (a measurement, not a test:
nothing is asserted):

    K=runs/<stamp>/kfp/<pipeline>
    .venv/bin/python bench/critic_warmup.py --train $K/filter-data/data/train.jsonl \\
        --reward-model $K/train-reward/reward_model/adapter --out runs/warmup \\
        --warmup 10 --updates 12 --value-scale 10 --param precision=bfloat16

Writes OUT/log.jsonl (the PPO log's rows, each with "warmup": true/false) and prints one line
per update: kind, excess tokens over the reference, mean return, mean V, explained variance
and the ending action's advantage. `--smoke` trains a smoke reward model first (seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from lastmile import config, ppo  # noqa: E402
from lastmile.modeling import encode_outputs, encode_prompts, resolve_precision  # noqa: E402
from lastmile.ppo_trainer import VALUE, PPOTrainer, batch_kinds  # noqa: E402
from lastmile.reward import adapter_level  # noqa: E402
from lastmile.train_utils import NonFiniteGuard, epoch_batches, seed_everything  # noqa: E402
from reward_options import parse_params  # noqa: E402


def scale_value_head(model, scale: float) -> None:
    """V(s) = scale x head(h): the value head's outputs (and their steps) `scale` times larger."""
    scalar = model.scalar
    model.scalar = lambda hidden, name: scalar(hidden, name) * (scale if name == VALUE else 1.0)


def give_value_lora_its_own_lr(trainer: PPOTrainer, lr: float) -> None:
    """Move the value adapter's LoRA weights (not its head) to a param group of their own."""
    heads = {id(p) for p in trainer.model.heads[VALUE].parameters()}
    lora = [p for p in trainer.value_params if id(p) not in heads]
    moved = {id(p) for p in lora}
    group = trainer.optimizer.param_groups[0]
    group["params"] = [p for p in group["params"] if id(p) not in moved]
    trainer.optimizer.add_param_group({"params": lora, "lr": lr})
    trainer.scheduler.base_lrs.append(lr)
    trainer.scheduler.lr_lambdas.append(trainer.scheduler.lr_lambdas[0])


def run(profile: config.Profile, train: Path, reward_model: Path, out: Path, warmup: int,
        updates: int, value_scale: float = 1.0, value_lora_lr: float | None = None) -> list[dict]:
    cfg = profile.ppo
    precision = resolve_precision(cfg.precision, what="PPO precision")
    rows = ppo.read_train_rows(train)
    seed_everything(cfg.seed)
    model, tokenizer = ppo.build_model(profile.base_model, reward_model, cfg)
    if value_scale != 1.0:
        scale_value_head(model, value_scale)
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows])
    references = encode_outputs(tokenizer, [r["output"] for r in rows], cfg.max_new_tokens)
    batches = epoch_batches(len(rows), cfg.batch_size, cfg.epochs, cfg.seed, cfg.max_updates)
    kinds = batch_kinds(len(batches), cfg.reference_fraction)
    # The warm-up walks the epoch from its start, then the policy's updates walk it again.
    plan = ([(batches[i % len(batches)], kinds[i % len(kinds)], True) for i in range(warmup)]
            + [(batches[i % len(batches)], kinds[i % len(kinds)], False)
               for i in range(updates)])
    trainer = PPOTrainer(model, tokenizer, cfg, len(plan), precision=precision,
                         reward_level=adapter_level(reward_model))
    if value_lora_lr:
        give_value_lora_its_own_lr(trainer, value_lora_lr)
    policy_backward, warming = trainer._policy_backward, {"now": False}

    def frozen_policy_backward(*args, **kwargs):  # no policy gradient: AdamW skips it
        if warming["now"]:
            return {"policy_loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0}
        return policy_backward(*args, **kwargs)

    trainer._policy_backward = frozen_policy_backward
    guard = NonFiniteGuard("PPO", cfg.max_bad_updates)
    out.mkdir(parents=True, exist_ok=True)
    log = []
    with open(out / "log.jsonl", "w") as f:
        for update, (idx, kind, warm) in enumerate(plan, start=1):
            warming["now"] = warm
            row = dict(ppo._update(trainer, guard, update, kind, idx, rows, prompts, references),
                       warmup=warm)
            log.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
            ev = row.get("value_explained_variance")
            print(f"{update:3d} {'value only' if warm else 'PPO       '} {kind:9s} "
                  f"excess {row['excess_tokens_mean']:+6.1f} tokens  return "
                  f"{row['return_mean']:+7.1f}  V {row['value_mean']:+6.2f}  explained "
                  f"{'n/a' if ev is None else f'{ev:+.2f}'}  ending advantage "
                  f"{row['final_advantage_mean']:+6.2f}  {row['seconds']:.0f} s", flush=True)
    return log


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("LASTMILE_NO_PROGRESS", "1")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=Path, help="a run's filter-data/data/train.jsonl")
    p.add_argument("--reward-model", type=Path, help="a run's reward adapter directory")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--warmup", type=int, default=10, help="value-only outer batches first")
    p.add_argument("--updates", type=int, default=12, help="PPO updates after the warm-up")
    p.add_argument("--value-scale", type=float, default=1.0)
    p.add_argument("--value-lora-lr", type=float, default=None)
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--smoke", action="store_true", help="the smoke profile, in seconds")
    args = p.parse_args(argv)
    profile = config.resolve("smoke" if args.smoke else "demo", parse_params(args.param))
    if args.smoke and not (args.train and args.reward_model):
        import reward_options
        from lastmile import data
        reward_options.run(profile, profile.data.source or data.DEFAULT_DATA, args.out / "rm")
        args.train = args.out / "rm" / "data" / "train.jsonl"
        args.reward_model = args.out / "rm" / "reward" / "adapter"
    if not (args.train and args.reward_model):
        p.error("--train and --reward-model are required (or --smoke)")
    if args.warmup < 0 or args.updates < 0 or args.value_scale <= 0:
        p.error("--warmup and --updates must be >= 0 and --value-scale > 0")
    run(profile, args.train, args.reward_model, args.out, args.warmup, args.updates,
        args.value_scale, args.value_lora_lr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
