"""MLE in bf16 against float32 (issue 21 point 3): where precision is lost, what it costs.

Three measurements, each its own subcommand (a benchmark, not a test: nothing is asserted):

  quality  the demo profile's MLE stage (data/debian-descriptions, 280 train rows, one epoch
           at 1e-4, seed 0) at --precision, then greedy predictions for the 100 demo test rows
           at the demo's generation settings (bf16) and their scores (`lastmile.metrics`):
               .venv/bin/python bench/mle_precision.py quality --precision bfloat16 --out runs/p
           Prints the la-ROUGE-L F1 and writes OUT/result.json.
  errors   one demo batch on SmolLM2 through each precision path: per-token log-prob, loss
           and per-tensor LoRA gradient errors against float32 (cosine, relative error).
  speed    seconds per MLE step (forward + backward) on the demo's first batches, float32 and
           bf16 alternately in one process (median of --repeats).

`--smoke` runs each on the tiny random model in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lastmile import config, mle  # noqa: E402
from lastmile.modeling import (AdapterModel, autocast, bf16_attention,  # noqa: E402
                               float32_lora_sums, load_base)


def demo_rows(tokenizer, out: Path, smoke: bool) -> tuple[Path, Path]:
    """The demo profile's train/test rows (the filter_data stage), written under out/data."""
    from lastmile import data

    profile = config.get_profile("demo")
    if smoke:
        profile.data.max_train, profile.data.max_test = 14, 4
    data.prepare(data.DEFAULT_DATA, out / "data", profile.data, tokenizer)
    return out / "data" / "train.jsonl", out / "data" / "test.jsonl"


def quality(args: argparse.Namespace) -> dict:
    from lastmile.modeling import load_tokenizer

    profile = config.get_profile("smoke" if args.smoke else "demo")
    base = profile.base_model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_path, test_path = demo_rows(load_tokenizer(base), out, args.smoke)
    cfg = profile.mle
    cfg.precision = args.precision
    cfg.checkpoint_every = 0
    started = time.perf_counter()
    summary = mle.train_mle(train_path, out / "mle", cfg, base)
    trained = time.perf_counter() - started
    log = [json.loads(x) for x in (out / "mle" / "train_log.jsonl").read_text().splitlines()]
    result = {"precision": args.precision, "train_seconds": round(trained, 1),
              "steps": summary["train"]["steps"],
              "first8_loss": statistics.mean(x["loss"] for x in log[:8]),
              "last8_loss": statistics.mean(x["loss"] for x in log[-8:]),
              **predict_and_score(profile, test_path, out, args.generate_precision, args.smoke)}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def predict_and_score(profile, test_path: Path, out: Path, precision: str, smoke: bool,
                      tag: str = "") -> dict:
    """Greedy predictions of out/mle/adapter for the test rows, and their corpus scores."""
    from lastmile import generate, metrics

    gen = profile.generate
    gen.precision = precision
    preds = out / f"predictions{tag}.jsonl"
    generate.generate_predictions(test_path, preds, "mle", profile.base_model,
                                  str(out / "mle" / "adapter"), gen)
    scores = metrics.score_file(preds, out / f"scores{tag}.json",
                                config.ScoreConfig(semantic_similarity=not smoke))
    m = scores["models"]["mle"]
    return {"generate_precision": precision, "la_rougeL_f1": m.get("la_rougeL_f1"),
            "rougeL_f1": m.get("rougeL_f1"), "semantic_similarity": m.get("semantic_similarity"),
            "excess_length": m.get("excess_length")}


def rescore(args: argparse.Namespace) -> dict:
    """Generate and score again from OUT/mle/adapter of a `quality` run (the same decoding
    code for runs trained at different times)."""
    profile = config.get_profile("smoke" if args.smoke else "demo")
    out = Path(args.out)
    result = predict_and_score(profile, out / "data" / "test.jsonl", out,
                               args.generate_precision, args.smoke, tag="-rescored")
    (out / "result-rescored.json").write_text(json.dumps(result, indent=2))
    return result


# ----------------------------------------------------------------------------- per-op errors

def _bf16_before_fix(model):
    """modeling.autocast as it was before issue 21.3: bf16 autocast and eager attention only."""
    return _stack(lambda: bf16_attention(model.base), lambda: _torch_bf16(model))


def _bf16_sums_only(model):
    """The fix's first half: float32 LoRA sums, attention still bf16 (eager)."""
    return _stack(lambda: bf16_attention(model.base), lambda: float32_lora_sums(model.base),
                  lambda: _torch_bf16(model))


def _torch_bf16(model):
    return torch.autocast(model.lm_head.weight.device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def _stack(*factories):
    with contextlib.ExitStack() as stack:
        for f in factories:
            stack.enter_context(f())
        yield


MODES = {
    "float32": lambda model: autocast(model, "float32"),
    "bf16, before the fix": _bf16_before_fix,
    "bf16, float32 LoRA sums only": _bf16_sums_only,
    "bf16, fixed (modeling.autocast)": lambda model: autocast(model, "bfloat16"),
}


def _demo_model(args):
    from lastmile.io import read_jsonl
    from lastmile.train_utils import epoch_batches

    profile = config.get_profile("smoke" if args.smoke else "demo")
    base, tokenizer = load_base(profile.base_model)
    model = AdapterModel(base)
    model.add_adapter(mle.ADAPTER, profile.mle.lora, seed=profile.mle.seed)
    out = Path(args.out)
    train_path, _ = demo_rows(tokenizer, out, args.smoke)
    examples = mle.encode_rows(tokenizer, list(read_jsonl(train_path)),
                               profile.mle.max_output_tokens)
    steps = epoch_batches(len(examples), profile.mle.batch_size, 1, profile.mle.seed)
    batches = [[examples[i] for i in idx] for idx in steps]
    return profile, model, tokenizer.pad_token_id, batches


def _pass(model, mode, batch, pad_id, adapter):
    """Per-token log-probs, the mean loss and the LoRA gradients of one forward + backward."""
    from lastmile.modeling import collate

    params = model.adapter_parameters(mle.ADAPTER)
    for p in params:
        p.grad = None
    b = collate([e.prompt_ids for e in batch], [e.output_ids for e in batch], pad_id)
    with MODES[mode](model):
        hidden = model.hidden_states(b.input_ids, b.attention_mask, adapter)
        predicts = b.output_mask[:, 1:]
        logprobs = model.token_logprobs(hidden[:, :-1][predicts], b.input_ids[:, 1:][predicts])
    loss = -logprobs.mean()
    if adapter is not None:
        loss.backward()
    grads = [p.grad.detach().clone() if p.grad is not None else None for p in params]
    return logprobs.detach(), loss.item(), grads


def errors(args: argparse.Namespace) -> dict:
    """After one float32 step of the demo's MLE (batch 1), each precision mode on batch 2: the
    adapter's effect on the loss, per-token log-prob and per-tensor gradient errors."""
    from lastmile.train_utils import make_optimizer

    profile, model, pad_id, batches = _demo_model(args)
    params = model.adapter_parameters(mle.ADAPTER)
    optimizer, _ = make_optimizer(params, profile.mle.optim, len(batches))
    mle.mle_loss(model, batches[0], pad_id).backward()
    torch.nn.utils.clip_grad_norm_(params, profile.mle.optim.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()
    rows = {}
    ref = None
    for mode in MODES:
        base_lp, base_loss, _ = _pass(model, mode, batches[1], pad_id, None)
        lp, loss, grads = _pass(model, mode, batches[1], pad_id, mle.ADAPTER)
        row = {"loss_base": base_loss, "loss": loss, "adapter_effect": loss - base_loss}
        if ref is None:
            ref = (lp, loss, grads, row["adapter_effect"])
        else:
            err = lp - ref[0]
            cos, rel = [], []
            for g0, g in zip(ref[2], grads):
                if g0 is None or g0.norm() == 0:
                    continue
                cos.append(torch.nn.functional.cosine_similarity(g0.flatten(), g.flatten(),
                                                                 0).item())
                rel.append(((g - g0).norm() / g0.norm()).item())
            row.update({"loss_error": loss - ref[1],
                        "effect_seen": row["adapter_effect"] / ref[3],
                        "logprob_error_mean": err.mean().item(),
                        "logprob_error_mean_abs": err.abs().mean().item(),
                        "logprob_error_max_abs": err.abs().max().item(),
                        "grad_cos_min": min(cos), "grad_cos_median": statistics.median(cos),
                        "grad_rel_error_median": statistics.median(rel),
                        "grad_rel_error_max": max(rel)})
        rows[mode] = {k: round(v, 5) for k, v in row.items()}
        print(mode, json.dumps(rows[mode]), flush=True)
    return rows


def speed(args: argparse.Namespace) -> dict:
    """Seconds per MLE forward + backward on the demo's first batches, modes alternating."""
    profile, model, pad_id, batches = _demo_model(args)
    modes = list(MODES)
    times = {m: [] for m in modes}
    for _ in range(args.repeats + 1):  # the first round warms up
        for mode in modes:
            for batch in batches[:args.batches]:
                t0 = time.perf_counter()
                _pass(model, mode, batch, pad_id, mle.ADAPTER)
                times[mode].append(time.perf_counter() - t0)
    n = args.batches
    result = {m: round(statistics.median(t[n:]), 3) for m, t in times.items()}
    result["threads"] = torch.get_num_threads()
    return result


def main(argv=None) -> int:
    # set here, not at import: tests import this file and their pipelines show bars
    os.environ.setdefault("LASTMILE_NO_PROGRESS", "1")
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--precision", choices=list(config.PRECISIONS), required=True)
    q.add_argument("--generate-precision", default="bfloat16", choices=list(config.PRECISIONS))
    q.add_argument("--out", required=True)
    q.add_argument("--smoke", action="store_true")
    r = sub.add_parser("rescore")
    r.add_argument("--generate-precision", default="bfloat16", choices=list(config.PRECISIONS))
    r.add_argument("--out", required=True)
    r.add_argument("--smoke", action="store_true")
    e = sub.add_parser("errors")
    e.add_argument("--out", required=True, help="where the demo rows are written")
    e.add_argument("--smoke", action="store_true")
    sp = sub.add_parser("speed")
    sp.add_argument("--out", required=True, help="where the demo rows are written")
    sp.add_argument("--batches", type=int, default=3)
    sp.add_argument("--repeats", type=int, default=3)
    sp.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    result = {"quality": quality, "rescore": rescore, "errors": errors,
              "speed": speed}[args.cmd](args)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
