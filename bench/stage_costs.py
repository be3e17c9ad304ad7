"""The cost account of a whole run (issue 21 point 1): per stage, time, tokens, FLOPs, and how far
that is from this machine's matmul bound.

    .venv/bin/python bench/stage_costs.py --run runs/latest      # account a finished run
    .venv/bin/python bench/stage_costs.py                        # run `pipeline.py run --profile
                                                                 # demo`, then account it
    .venv/bin/python bench/stage_costs.py --run runs/latest --json costs.json --no-ppo-parts

What it reads (nothing is re-run): the run folder `pipeline.py run` writes - config.json (the
resolved profile), summaries/<stage>.json (each stage's seconds), ppo_log.jsonl,
predictions/<variant>.jsonl - and the stage folders under kfp/ (train.jsonl, test.jsonl,
rm.jsonl, the reward and MLE train_log.jsonl) plus logs/kfp.log (each task's wall time, its
process start and imports included). Token counts are rebuilt from those artifacts with the
stage's own code: the tokenizer, the seeded batches (`train_utils.epoch_batches`), the
micro-batch split (`train_utils.micro_batches`), the reward model's shared-prompt forward
(`reward.length_buckets`); the rebuilt real tokens are checked against the `tokens` column of
the training logs.

Per stage it prints: seconds (the task's wall time, the stage's own timer, and the compute part
the tokens went through), the positions processed forward and backward (padding included; the
share of padding beside them), the FLOPs they imply, the achieved FLOP/s, and that as a share of
the matmul bound measured in this same process at the stage's precision. A second table splits
the PPO update into its parts on the run's own first batches (sampling, reward scoring, value
forward/backward, policy forward/backward, optimiser), timed here with the run's thread count.

What a FLOP count includes (per position through the model; N = parameters of the decoder
layers' linear maps - q, k, v, o, gate, up, down - so not the embedding lookup; L layers,
A = heads x head_dim, V x H the vocabulary projection):

    forward   2 N + 2 N_lora + 2 V H [if the position's logits are computed]
              + 4 L A c   (QK^T and AV over the c positions it attends to, as computed:
                           padded and masked ones included)
    backward  2 N         (the input gradients through the frozen base; no weight gradients)
              + 4 N_lora  (LoRA's weight and input gradients)
              + 2 V H [logit positions] + 8 L A c

The 2 N forward and the "backward = 2 x forward" of full training are Kaplan et al. 2020,
"Scaling Laws for Neural Language Models", Table 1 (C_forward ~ 2N + 2 n_layer n_ctx d_attn,
the attention term per token of a causal context of n_ctx; here c is the context the kernel
really multiplies over). With a frozen base only the input-gradient half of the backward
remains for the base's weights (Hu et al. 2021, LoRA, §4.2: no gradients or optimiser state
for the frozen weights); the activations' gradient must still flow through every layer to the
adapters below. N_lora = r (d_in + d_out) summed over the adapted linear maps; a LoRA merged
into the weights (generation, PPO's sampling and reward scoring) adds nothing. Norms,
activations, softmax, embedding lookups and the optimiser are not counted (< 1% here).

The bound. The same matmuls the model runs - one decoder layer's linear maps, F.linear on
[M, d_in] x [d_out, d_in] - timed at float32 and bfloat16, M = 1024 positions (a training
micro-batch or a prefill) and M = 16 (one decoding step of a 16-row generation batch), each map
alone, its best time kept. The bound is the larger of the figure at the run's torch thread count
and thread count x the one-thread figure (`measure_peaks`), the best of `--peak-repeats`
(other processes share the CPU). A stage's share of the bound uses its base precision (bf16
stages keep LoRA sums, heads and losses in float32). The PPO and training rates are against the
M = 1024 figure; the M = 16 one says how far decoding's small matmuls can go.

A benchmark, not a test: nothing is asserted. tests/test_bench.py checks the arithmetic on a
tiny run folder made by the real stage functions. Measured output: bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PRECISIONS = ("float32", "bfloat16")
PEAK_M = 1024  # positions per matmul of a training micro-batch or a prefill
DECODE_M = 16  # rows of one generation decoding step (GenerateConfig.batch_size)
#: Stages in pipeline order, and which kfp task folder / config section each belongs to.
STAGES = ("filter_data", "negatives", "train_reward", "reward_eval", "train_mle", "train_ppo",
          "generate_base", "generate_mle", "generate_rl", "postprocess_base", "postprocess_mle",
          "score")


# ============================================================================ model shapes

@dataclass(frozen=True)
class Shape:
    """What the FLOP formula needs of a model (see the module docstring)."""

    name: str
    layers: int
    hidden: int
    attn: int  # heads x head_dim: the width of QK^T and AV
    vocab: int
    linears: tuple[tuple[int, int], ...]  # (d_in, d_out) of one layer's linear maps

    @property
    def linear_params(self) -> int:
        """N: the decoder layers' linear weights."""
        return self.layers * sum(i * o for i, o in self.linears)

    def lora_params(self, r: int) -> int:
        """N_lora of a rank-r LoRA on every linear map of every layer (all-linear)."""
        return self.layers * r * sum(i + o for i, o in self.linears)


def shape_from_config(config, name: str) -> Shape:
    """The shape of a transformers config's model, built on the meta device (no weights)."""
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(config)
    first = re.compile(r"(^|\.)layers?\.0\.")
    linears = tuple((m.in_features, m.out_features) for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and first.search(n))
    if not linears:
        raise ValueError(f"{name}: no linear maps found in its first layer")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Shape(name, config.num_hidden_layers, config.hidden_size, heads * head_dim,
                 config.vocab_size, linears)


def base_shape(base_model: str) -> Shape:
    from transformers import AutoConfig, LlamaConfig

    from lastmile import modeling
    from lastmile.config import TINY_BASE

    if base_model == TINY_BASE:
        tok = modeling.load_tokenizer(base_model)
        return shape_from_config(LlamaConfig(vocab_size=len(tok), **modeling.TINY_CONFIG),
                                 base_model)
    return shape_from_config(AutoConfig.from_pretrained(modeling.resolve_base(base_model)),
                             base_model)


def minilm_shape() -> Shape:
    from transformers import AutoConfig

    from lastmile import metrics

    return shape_from_config(AutoConfig.from_pretrained(metrics.minilm_dir()), "all-MiniLM-L6-v2")


# ============================================================================ FLOPs

@dataclass
class Work:
    """Positions through one model in some forwards (and, `backward`, their backwards)."""

    tokens: int = 0  # positions through the layers, padding included
    real: int = 0  # of them, real tokens
    context: int = 0  # sum over positions of the positions each attends to
    logits: int = 0  # positions whose vocabulary logits are computed
    lora: int = 0  # N_lora on the path (0: none, or merged into the weights)
    backward: bool = False


def forward_flops(shape: Shape, w: Work) -> float:
    return (2.0 * (shape.linear_params + w.lora) * w.tokens
            + 2.0 * shape.vocab * shape.hidden * w.logits
            + 4.0 * shape.layers * shape.attn * w.context)


def backward_flops(shape: Shape, w: Work) -> float:
    if not w.backward:
        return 0.0
    return (2.0 * shape.linear_params * w.tokens + 4.0 * w.lora * w.tokens
            + 2.0 * shape.vocab * shape.hidden * w.logits
            + 8.0 * shape.layers * shape.attn * w.context)


def dense(rows: int, width: int, real: int, logits: int = 0, lora: int = 0,
          backward: bool = False) -> Work:
    """One right- or left-padded [rows, width] forward without a cache."""
    return Work(rows * width, real, rows * width * width, logits, lora, backward)


def cached(rows: int, width: int, past: int, real: int, logits: int = 0, lora: int = 0,
           backward: bool = False) -> Work:
    """[rows, width] new positions after a cache of `past` positions (each attends to all)."""
    return Work(rows * width, real, rows * width * (past + width), logits, lora, backward)


def decoding(prompt_lengths: Sequence[int], new_lengths: Sequence[int], lora: int = 0) -> Work:
    """Generating a batch: a left-padded [rows, longest prompt] prefill (logits of its last
    position, which gives each row's first token), then one-position steps until the longest
    output is complete; every row goes through every step, finished or not. Real positions:
    the prompts, and each row's tokens before its last (those that produced a token)."""
    rows, width = len(prompt_lengths), max(prompt_lengths)
    w = dense(rows, width, sum(prompt_lengths), logits=rows, lora=lora)
    steps = max(max(new_lengths) - 1, 0)
    w.tokens += rows * steps
    w.real += sum(max(n - 1, 0) for n in new_lengths)
    w.logits += rows * steps
    w.context += rows * sum(width + s for s in range(1, steps + 1))  # step s: width + s keys
    return w


@dataclass
class Cost:
    """One row of the table."""

    stage: str
    precision: str | None = None  # the base's matmul precision; None: no model compute
    model: str = ""
    task_seconds: float | None = None  # the kfp task's wall time (process, imports, loading)
    stage_seconds: float | None = None  # the stage's own timer (summary.json "seconds")
    compute_seconds: float | None = None  # the part the counted tokens went through
    tokens_fwd: int = 0
    real_fwd: int = 0
    tokens_bwd: int = 0
    flops_fwd: float = 0.0
    flops_bwd: float = 0.0
    note: str = ""
    part_of: str | None = None  # a part of that stage's row (left out of the totals)
    #: median over the stage's steps of step FLOPs / step seconds (the logs' per-step times):
    #: what a step achieves when nothing else holds the cores (a shared machine's stalls
    #: inflate some steps' seconds many times over)
    median_step_flops_per_second: float | None = None
    checks: dict = field(default_factory=dict)

    def add(self, shape: Shape, work: Work) -> "Cost":
        self.tokens_fwd += work.tokens
        self.real_fwd += work.real
        self.tokens_bwd += work.tokens if work.backward else 0
        self.flops_fwd += forward_flops(shape, work)
        self.flops_bwd += backward_flops(shape, work)
        return self

    @property
    def flops(self) -> float:
        return self.flops_fwd + self.flops_bwd

    @property
    def padding(self) -> float | None:
        return 1.0 - self.real_fwd / self.tokens_fwd if self.tokens_fwd else None

    def achieved(self) -> float | None:
        if not self.flops or not self.compute_seconds:
            return None
        return self.flops / self.compute_seconds

    def row(self, peaks: dict[str, float]) -> dict:
        achieved = self.achieved()
        peak = peaks.get(self.precision) if self.precision else None
        out = {k: v for k, v in asdict(self).items()}
        out.update(flops=self.flops, padding=self.padding, flops_per_second=achieved,
                   peak_flops_per_second=peak,
                   fraction_of_peak=achieved / peak if achieved and peak else None)
        return out


# ============================================================================ the run folder

class RunFolder:
    """What `pipeline.py run` wrote under runs/<stamp>/ (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        from lastmile import config as cfg_mod

        self.root = Path(root).resolve()
        # stage name -> the folders that wrote it (several when sharded), from kfp/'s summaries
        self.dirs: dict[str, list[Path]] = {}
        found: dict[str, dict] = {}
        for path in sorted(self.root.glob("kfp/*/**/summary.json")):
            if path.parent.parent.name in ("gather", "report"):  # merged copies of the shards'
                continue
            summary = json.loads(path.read_text())
            stage = summary.get("stage")
            if stage == "postprocess":  # one stage name for both: the report's are per variant
                read = next(iter(summary.get("input_sha256") or {}), "")
                stage = f"postprocess_{read.split('/')[0]}" if "/" in read else stage
            if stage:
                self.dirs.setdefault(stage, []).append(path.parent)
                found.setdefault(stage, summary)
        # a training stage that failed or is still going has no summary yet: its folder by name
        for stage, (task, output, log) in TRAINING_FOLDERS.items():
            if stage not in self.dirs:
                self.dirs[stage] = [d for d in sorted(self.root.glob(f"kfp/*/{task}/{output}"))
                                    if (d / log).is_file()]
                if not self.dirs[stage]:
                    del self.dirs[stage]
        summaries = self.root / "summaries"
        # a finished run: the report's summaries (shards merged); a run still going or failed:
        # the stage folders' own, for the stages that finished
        self.complete = summaries.is_dir()
        self.summaries = ({p.stem: json.loads(p.read_text()) for p in summaries.glob("*.json")}
                          if self.complete else found)
        if not self.summaries:
            raise SystemExit(f"{self.root}: no stage summaries (summaries/ or kfp/*/*/*/)")
        config = self.root / "config.json"
        if config.is_file():
            values = json.loads(config.read_text())
        else:  # the resolve-config task's output: the same profile, as JSON
            out = next(self.root.glob("kfp/*/resolve-config/executor_output.json"), None)
            if out is None:
                raise SystemExit(f"{self.root}: no config.json nor resolve-config output")
            values = json.loads(json.loads(out.read_text())["parameterValues"]["Output"])
        self.profile = cfg_mod.from_dict(cfg_mod.Profile, values)
        self._resolve_auto_precision()
        self.task_seconds = task_walls(self.root / "logs" / "kfp.log")

    def _resolve_auto_precision(self) -> None:
        """A stage set to "auto" computed in what its summary records (a training stage's
        "precision", generation's "weights_dtype" of its merged model); not recorded: as
        "auto" resolves on this machine (modeling.resolve_precision)."""
        from lastmile import config as cfg_mod
        from lastmile.modeling import resolve_precision

        recorded = {"reward": ("train_reward", "precision"), "mle": ("train_mle", "precision"),
                    "ppo": ("train_ppo", "precision"), "generate": ("generate_rl", "weights_dtype")}
        for stage, (name, key) in recorded.items():
            cfg = getattr(self.profile, stage)
            if cfg.precision != cfg_mod.AUTO_PRECISION:
                continue
            value = self.summaries.get(name, {}).get(key)
            cfg.precision = value if value in cfg_mod.PRECISIONS else resolve_precision(
                cfg.precision)

    def has(self, *stages: str) -> bool:
        return all(s in self.dirs for s in stages)

    def file(self, name: str, stage: str) -> Path:
        """`name` at the run's root (the report's copy) or in the stage's folder."""
        return self.root / name if (self.root / name).is_file() else self.folder(stage) / name

    def folder(self, stage: str) -> Path:
        found = self.dirs.get(stage)
        if not found:
            raise SystemExit(f"{self.root}: no stage folder of {stage} under kfp/")
        return found[0]

    def task_wall(self, stage: str) -> float | None:
        """The kfp task's wall time, summed over its shards' tasks."""
        names = {d.parent.name for d in self.dirs.get(stage, [])}
        walls = [self.task_seconds.get(n) for n in names]
        return sum(walls) if walls and all(w is not None for w in walls) else None

    def seconds(self, stage: str) -> float | None:
        s = self.summaries.get(stage, {}).get("seconds")
        return float(s) if isinstance(s, (int, float)) else None


#: stage -> (kfp task folder, output folder, the log it writes step by step)
TRAINING_FOLDERS = {"train_reward": ("train-reward", "reward_model", "train_log.jsonl"),
                    "train_mle": ("train-mle", "mle_model", "train_log.jsonl"),
                    "train_ppo": ("train-ppo", "ppo_model", "ppo_log.jsonl")}


def logged_seconds(summary: dict, logged: Sequence[dict]) -> float | None:
    """The training loop's seconds: the summary's, else (a stage that did not finish) the sum
    of the logged steps' seconds."""
    seconds = (summary.get("train") or {}).get("seconds")
    if seconds is None and logged:
        seconds = sum(float(r.get("seconds") or 0.0) for r in logged)
    return seconds


_KFP_LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) - [A-Z]+ - (?:Executing task '([^']+)'|"
                       r"Task '([^']+)' finished)")


def task_walls(log: Path) -> dict[str, float]:
    """{task: seconds} from kfp.local's log: 'Executing task' to 'Task ... finished' (a task
    name that runs once per shard: the sum of its runs; a failed task counts too)."""
    if not log.is_file():
        return {}
    started, walls = {}, {}
    previous = None
    day = 0.0
    for line in log.read_text(errors="replace").splitlines():
        m = _KFP_LINE.match(line)
        if not m:
            continue
        h, mi, s = m.group(1).split(":")
        t = int(h) * 3600 + int(mi) * 60 + float(s) + day
        if previous is not None and t < previous:  # past midnight
            day += 86400
            t += 86400
        previous = t
        if m.group(2):
            started[m.group(2)] = t
        elif m.group(3) in started:
            walls[m.group(3)] = walls.get(m.group(3), 0.0) + t - started.pop(m.group(3))
    return walls


def run_wall(log: Path) -> float | None:
    """First to last timestamp of kfp.local's log: the pipeline's wall time."""
    if not log.is_file():
        return None
    stamps = [m.group(1) for m in map(re.compile(r"^(\d\d:\d\d:\d\d\.\d+) - ").match,
                                      log.read_text(errors="replace").splitlines()) if m]
    if len(stamps) < 2:
        return None
    secs = [int(a) * 3600 + int(b) * 60 + float(c) for a, b, c in (s.split(":") for s in stamps)]
    total = secs[-1] - secs[0]
    return total + 86400 if total < 0 else total


# ============================================================================ the stages

def read_jsonl(path: Path) -> list[dict]:
    from lastmile.io import read_jsonl as read

    return list(read(path))


def no_model(run: RunFolder, stage: str, note: str) -> Cost:
    return Cost(stage, task_seconds=run.task_wall(stage), stage_seconds=run.seconds(stage),
                note=note)


def reward_micro_batches(examples, rows, cfg) -> Iterable[tuple[list[int], list]]:
    """(row indices, micro-batches) of every step the reward stage's train_loop ran: the
    seeded batches with a true row and its negatives together, split by the token budget."""
    from lastmile import reward
    from lastmile.train_utils import epoch_batches, micro_batches

    steps = epoch_batches(len(examples), cfg.batch_size, cfg.epochs, cfg.seed, cfg.max_steps,
                          [reward._source(r) for r in rows])
    for indices in steps:
        yield indices, micro_batches([examples[i] for i in indices], cfg.micro_batch_size,
                                     cfg.token_budget, reward.forward_tokens)


def reward_forward(group, lora: int, backward: bool) -> list[Work]:
    """`reward.output_states` on one group of rows: the distinct prompts once ([U, P]), then
    each length bucket's outputs after the gathered cache ([b, w] after P)."""
    from lastmile import reward

    prompts = list(dict.fromkeys(tuple(e.prompt_ids) for e in group))
    width = max(len(p) for p in prompts)
    works = [dense(len(prompts), width, sum(len(p) for p in prompts), lora=lora,
                   backward=backward)]
    lengths = [len(e.output_ids) for e in group]
    for bucket in reward.length_buckets(lengths):
        w = lengths[bucket[-1]]
        works.append(cached(len(bucket), w, width, sum(lengths[i] for i in bucket), lora=lora,
                            backward=backward))
    return works


def train_reward(run: RunFolder, shape: Shape, tokenizer) -> tuple[Cost, Cost]:
    """The reward stage: training (train_log.jsonl) and the held-out evaluation."""
    from lastmile import reward

    cfg = run.profile.reward
    out = run.folder("train_reward")
    summary = run.summaries.get("train_reward", {})
    rows = reward.read_reward_rows(run.folder("negatives") / "rm.jsonl")
    examples = reward.encode_rows(tokenizer, rows, cfg.max_output_tokens)
    lora = shape.lora_params(cfg.lora.r)
    logged = [r for r in read_jsonl(out / "train_log.jsonl") if "tokens" in r]
    train = Cost("train_reward", cfg.precision, shape.name, run.task_wall("train_reward"),
                 run.seconds("train_reward"), logged_seconds(summary, logged),
                 note=f"LoRA r={cfg.lora.r}, shared-prompt forward, budget {cfg.token_budget}")
    rebuilt, step_flops = [], []
    for indices, micros in reward_micro_batches(examples, rows, cfg):
        rebuilt.append(sum(examples[i].length for i in indices))
        before = train.flops
        for micro in micros:
            for w in reward_forward(micro, lora, backward=True):
                train.add(shape, w)
        step_flops.append(train.flops - before)
    train.checks["log_tokens_match"] = rebuilt[:len(logged)] == [r["tokens"] for r in logged]
    train.median_step_flops_per_second = median_rate(step_flops, logged)
    train.checks["steps"] = len(logged)

    evaluation = Cost("reward_eval", cfg.precision, shape.name, None, None,
                      summary.get("eval_seconds"), note="held-out rows + negatives, forward "
                      "only; inside train_reward's task and stage seconds")
    test = read_jsonl(run.folder("filter_data") / "test.jsonl")
    if cfg.eval_examples and test:  # also what an evaluation that did not finish would do
        trained = sorted({r["category"] for r in rows} - {reward.TRUE})
        held = reward.held_out_reward_rows(test, cfg, tokenizer, categories=trained or None)
        held_examples = reward.encode_rows(tokenizer, held, cfg.max_output_tokens)
        # score_outputs: rows of one prompt together, similar lengths together, 16 per forward
        order = sorted(range(len(held)), key=lambda i: (len(held_examples[i].prompt_ids),
                                                        held[i]["prompt"],
                                                        len(held_examples[i].output_ids)))
        batch = _default(reward.score_outputs, "batch_size", 16)
        for start in range(0, len(order), batch):
            group = [held_examples[i] for i in order[start: start + batch]]
            for w in reward_forward(group, lora, backward=False):
                evaluation.add(shape, w)
        evaluation.checks["rows"] = len(held)
    return train, evaluation


def _default(fn, name: str, fallback):
    import inspect

    p = inspect.signature(fn).parameters.get(name)
    return p.default if p is not None and p.default is not inspect.Parameter.empty else fallback


def train_mle(run: RunFolder, shape: Shape, tokenizer) -> Cost:
    """MLE: right-padded prompt + output per row, logits at the output positions only."""
    from lastmile import mle
    from lastmile.train_utils import DEFAULT_TOKEN_BUDGET, epoch_batches, micro_batches

    cfg = run.profile.mle
    summary = run.summaries.get("train_mle", {})
    rows = read_jsonl(run.folder("filter_data") / "train.jsonl")
    examples = mle.encode_rows(tokenizer, rows, cfg.max_output_tokens)
    lora = shape.lora_params(cfg.lora.r)
    logged = [r for r in read_jsonl(run.folder("train_mle") / "train_log.jsonl")
              if "tokens" in r]
    cost = Cost("train_mle", cfg.precision, shape.name, run.task_wall("train_mle"),
                run.seconds("train_mle"), logged_seconds(summary, logged),
                note=f"LoRA r={cfg.lora.r}, logits at output tokens")
    rebuilt, step_flops = [], []
    for indices in epoch_batches(len(examples), cfg.batch_size, cfg.epochs, cfg.seed,
                                 cfg.max_steps):
        batch = [examples[i] for i in indices]
        rebuilt.append(sum(e.length for e in batch))
        step_flops.append(cost.flops)
        for micro in micro_batches(batch, cfg.micro_batch_size, DEFAULT_TOKEN_BUDGET):
            width = max(e.length for e in micro)
            cost.add(shape, dense(len(micro), width, sum(e.length for e in micro),
                                  logits=sum(len(e.output_ids) for e in micro), lora=lora,
                                  backward=True))
    cost.checks["log_tokens_match"] = rebuilt[:len(logged)] == [r["tokens"] for r in logged]
    cost.checks["steps"] = len(logged)
    step_flops = [b - a for a, b in zip(step_flops, step_flops[1:] + [cost.flops])]
    cost.median_step_flops_per_second = median_rate(step_flops, logged)
    return cost


def median_rate(step_flops: Sequence[float], logged: Sequence[dict]) -> float | None:
    """The median over steps of FLOPs / the logged step seconds."""
    rates = [f / float(r["seconds"]) for f, r in zip(step_flops, logged)
             if r.get("seconds") and not r.get("skipped")]
    return statistics.median(rates) if rates else None


def ppo_update_works(shape: Shape, prompts: Sequence[Sequence[int]],
                     out_lengths: Sequence[int], sampled: bool, policy_lora: int,
                     value_lora: int, micro: int) -> dict[str, list[Work]]:
    """The passes of one fast-path PPO update (lastmile.ppo.PPOTrainer): sampling (merged
    policy, left-padded prefill + decoding), reward scoring (merged reward LoRA), the value
    and the policy forward + backward, in micro-batches of `micro` rows (right-padded)."""
    parts: dict[str, list[Work]] = {"sampling": [], "reward": [], "value": [], "policy": []}
    n = len(prompts)
    if sampled:
        parts["sampling"].append(decoding([len(p) for p in prompts], out_lengths))
    for start in range(0, n, micro):
        idx = range(start, min(start + micro, n))
        width = max(len(prompts[i]) + out_lengths[i] for i in idx)
        real = sum(len(prompts[i]) + out_lengths[i] for i in idx)
        outs = sum(out_lengths[i] for i in idx)
        parts["reward"].append(dense(len(idx), width, real))
        parts["value"].append(dense(len(idx), width, real, lora=value_lora, backward=True))
        parts["policy"].append(dense(len(idx), width, real, logits=outs, lora=policy_lora,
                                     backward=True))
    return parts


def train_ppo(run: RunFolder, shape: Shape, tokenizer) -> list[Cost]:
    """PPO from ppo_log.jsonl: each update's rows (the seeded batches), their prompts, and its
    mean response length (the log keeps no per-row lengths: every sampled row is taken at the
    mean, so the sampled updates' decoding and padding are lower bounds)."""
    from lastmile import ppo_trainer as pt
    from lastmile.modeling import encode_outputs, encode_prompts
    from lastmile.train_utils import epoch_batches

    cfg = run.profile.ppo
    rows = read_jsonl(run.folder("filter_data") / "train.jsonl")
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows])
    references = encode_outputs(tokenizer, [r["output"] for r in rows], cfg.max_new_tokens)
    batches = epoch_batches(len(rows), cfg.batch_size, cfg.epochs, cfg.seed, cfg.max_updates)
    log = read_jsonl(run.file("ppo_log.jsonl", "train_ppo"))
    micro = pt.DEFAULT_MICRO_BATCH
    cost = Cost("train_ppo", cfg.precision, shape.name, run.task_wall("train_ppo"),
                run.seconds("train_ppo"), sum(float(r["seconds"]) for r in log),
                note=f"policy/value LoRA r={cfg.policy_lora.r}/{cfg.value_lora.r}; sampled rows "
                     "at the logged mean length")
    split = {k: Cost(f"train_ppo: {k}", cfg.precision, shape.name, part_of="train_ppo",
                     compute_seconds=0.0) for k in ("sampling", "reward + update")}
    split["sampling"].note = "the log's sample_seconds"
    step_flops = []
    for row in log:
        step_flops.append(cost.flops)
        idx = batches[row["update"] - 1]
        sampled = row["batch_kind"] == pt.SAMPLED
        if sampled:
            mean = max(1, round(float(row["response_length_mean"])))
            lengths = [mean] * len(idx)
        else:
            lengths = [len(references[i]) for i in idx]
        parts = ppo_update_works(shape, [prompts[i] for i in idx], lengths, sampled,
                                 shape.lora_params(cfg.policy_lora.r),
                                 shape.lora_params(cfg.value_lora.r), micro)
        sample_s = float(row.get("sample_seconds") or 0.0)
        split["sampling"].compute_seconds += sample_s
        split["reward + update"].compute_seconds += float(row["seconds"]) - sample_s
        for name, works in parts.items():
            for w in works:
                cost.add(shape, w)
                split["sampling" if name == "sampling" else "reward + update"].add(shape, w)
    cost.checks["updates"] = len(log)
    step_flops = [b - a for a, b in zip(step_flops, step_flops[1:] + [cost.flops])]
    cost.median_step_flops_per_second = median_rate(step_flops, log)
    return [cost, *split.values()]


def generation(run: RunFolder, shape: Shape, tokenizer, variant: str) -> Cost | None:
    """Greedy generation: windows of batch_size x window_batches rows sorted by length,
    left-padded prefill, then every row of a batch decodes until its longest stops. Output
    lengths: the predictions re-encoded (+ EOS when under the budget), scaled to the
    summary's exact mean."""
    from lastmile.modeling import encode_prompts
    from lastmile.train_utils import chunked

    stage = f"generate_{variant}"
    summary = run.summaries.get(stage)
    if summary is None:
        return None
    cfg = run.profile.generate
    test = read_jsonl(run.folder("filter_data") / "test.jsonl")
    preds = {r.get("id"): r["prediction"]
             for d in run.dirs.get(stage, []) for r in read_jsonl(d / "predictions.jsonl")}
    n = int(summary.get("n") or len(preds))
    new = float(summary["mean_new_tokens"]) * n
    compute = (new / summary["tokens_per_second"] if summary.get("tokens_per_second") else None)
    cost = Cost(stage, cfg.precision, shape.name, run.task_wall(stage), run.seconds(stage),
                compute, note=f"batch {cfg.batch_size}, LoRA merged, greedy")
    test = [r for r in test if r.get("id") in preds] if preds else test
    encoded = tokenizer([preds.get(r.get("id"), "") for r in test],
                        add_special_tokens=False)["input_ids"]
    lengths = [min(len(e) + 1, cfg.max_new_tokens) for e in encoded]
    scale = new / sum(lengths) if sum(lengths) else 1.0
    lengths = [max(1, round(x * scale)) for x in lengths]
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in test])
    for window in chunked(range(len(test)), cfg.batch_size * cfg.window_batches):
        order = sorted(window, key=lambda i: len(prompts[i]))
        for idx in chunked(order, cfg.batch_size):
            cost.add(shape, decoding([len(prompts[i]) for i in idx], [lengths[i] for i in idx]))
    cost.checks["rows"] = len(test)
    return cost


def scoring(run: RunFolder) -> Cost:
    """The score stage's model: all-MiniLM-L6-v2 embeddings of every prediction and reference
    (metrics.Embedder: BATCH_SIZE rows, predictions and references padded separately);
    ROUGE and the rest are not model compute. BLEURT, when configured, is not counted."""
    from transformers import AutoTokenizer

    from lastmile import metrics

    summary = run.summaries.get("score", {})
    cost = Cost("score", "float32", "all-MiniLM-L6-v2", run.task_wall("score"),
                run.seconds("score"), run.seconds("score"),
                note="MiniLM embeddings (compute s = the whole stage: ROUGE included)")
    if not run.profile.score.semantic_similarity:
        cost.precision = None
        return cost
    shape = minilm_shape()
    tok = AutoTokenizer.from_pretrained(metrics.minilm_dir(), local_files_only=True)
    limit = 256
    st = metrics.minilm_dir() / "sentence_bert_config.json"
    if st.exists():
        limit = json.loads(st.read_text())["max_seq_length"]
    pairs = []
    files = sorted((run.root / "predictions").glob("*.jsonl")) or [
        d / "predictions.jsonl" for stage, dirs in sorted(run.dirs.items())
        if stage.startswith(("generate_", "postprocess_")) for d in dirs]
    for path in files:
        pairs += [(r["prediction"], r["reference"]) for r in read_jsonl(path)]
    for start in range(0, len(pairs), metrics.BATCH_SIZE):
        chunk = pairs[start: start + metrics.BATCH_SIZE]
        for texts in zip(*chunk):
            ids = tok(list(texts), truncation=True, max_length=limit)["input_ids"]
            width = max(len(i) for i in ids)
            cost.add(shape, dense(len(ids), width, sum(len(i) for i in ids)))
    cost.checks["pairs"] = len(pairs)
    cost.checks["rows_scored"] = summary.get("n")
    return cost


def account(run: RunFolder) -> list[Cost]:
    """Every stage's Cost, in pipeline order."""
    from lastmile.modeling import load_tokenizer

    profile = run.profile
    tokenizer = load_tokenizer(profile.base_model, trust_remote_code=profile.trust_remote_code)
    shape = base_shape(profile.base_model)
    costs = [no_model(run, "filter_data", "tokenizer only"),
             no_model(run, "negatives", "tokenizer only")]
    if run.has("train_reward", "negatives"):
        costs += train_reward(run, shape, tokenizer)
    if run.has("train_mle"):
        costs.append(train_mle(run, shape, tokenizer))
    if run.has("train_ppo"):
        costs += train_ppo(run, shape, tokenizer)
    for variant in ("base", "mle", "rl"):
        cost = generation(run, shape, tokenizer, variant)
        if cost is not None:
            costs.append(cost)
    for variant in ("base", "mle"):
        if f"postprocess_{variant}" in run.summaries:
            costs.append(no_model(run, f"postprocess_{variant}", "text only"))
    if run.has("score"):
        costs.append(scoring(run))
    return costs
    costs.append(scoring(run))
    return costs


# ============================================================================ the bound

def matmul_peak(shape: Shape, precision: str, m: int, seconds: float = 1.0) -> float:
    """FLOP/s of one decoder layer's linear maps on [m, d_in] inputs at `precision`: each map
    timed alone, many times, its best time kept (short timings catch the moments the shared
    cores are free); the layer's FLOPs over the sum of the best times."""
    dtype = getattr(torch, precision)
    gen = torch.Generator().manual_seed(0)
    total = 0.0
    with torch.inference_mode():
        for d_in, d_out in shape.linears:
            w = torch.randn(d_out, d_in, generator=gen).to(dtype)
            x = torch.randn(m, d_in, generator=gen).to(dtype)
            for _ in range(3):
                torch.nn.functional.linear(x, w)
            best, spent = math.inf, 0.0
            while spent < seconds / len(shape.linears):
                t0 = time.perf_counter()
                torch.nn.functional.linear(x, w)
                took = time.perf_counter() - t0
                best, spent = min(best, took), spent + took
            total += best
    return 2.0 * m * sum(i * o for i, o in shape.linears) / total


def measure_peaks(shape: Shape, repeats: int, seconds: float = 2.0) -> dict:
    """{precision: {m: FLOP/s}}: the best over `repeats` of `matmul_peak` with torch's
    current thread count (the run's), and of `threads` x the one-thread figure (perfect
    scaling, what the cores can do: on a shared machine, one thread of a pair held up by
    another process stalls both, and one-thread timings are the steadier). The bound is the
    larger; both are kept ("threads", "one_thread_scaled")."""
    threads = torch.get_num_threads()
    found = {p: {str(m): 0.0 for m in (PEAK_M, DECODE_M)} for p in PRECISIONS}
    detail = {"threads": threads, "at_threads": {p: {str(m): 0.0 for m in (PEAK_M, DECODE_M)}
                                                 for p in PRECISIONS},
              "one_thread_scaled": {p: {str(m): 0.0 for m in (PEAK_M, DECODE_M)}
                                    for p in PRECISIONS}}
    try:
        for _ in range(repeats):
            for p in PRECISIONS:
                for m in (PEAK_M, DECODE_M):
                    torch.set_num_threads(threads)
                    at = matmul_peak(shape, p, m, seconds)
                    torch.set_num_threads(1)
                    one = threads * matmul_peak(shape, p, m, seconds)
                    for key, value in (("at_threads", at), ("one_thread_scaled", one)):
                        detail[key][p][str(m)] = max(detail[key][p][str(m)], value)
                    found[p][str(m)] = max(found[p][str(m)], at, one)
    finally:
        torch.set_num_threads(threads)
    return {**found, "detail": detail}


# ============================================================================ PPO's parts

PPO_PARTS = ("sampling", "reward", "value forward", "value backward", "policy forward",
             "policy backward", "optimiser")


def _clock(times: dict, key: str, t0: float) -> float:
    now = time.perf_counter()
    times[key] = times.get(key, 0.0) + now - t0
    return now


def timed_update(trainer, kind: str, prompt_ids, reference_ids, update: int) -> tuple[dict, list]:
    """One fast-path PPO update as `PPOTrainer.step` does it (the value pass, then the policy
    pass, micro-batch by micro-batch), with each part timed; (seconds per part, outputs).

    A copy of `PPOTrainer.gradients`' fast path with clocks between its pieces
    (tests/test_bench.py checks that it leaves the gradients `gradients` computes).
    """
    from lastmile import ppo_trainer as pt

    times: dict[str, float] = {}
    t = time.perf_counter()
    outputs = (trainer.sample(prompt_ids, update=update) if kind == pt.SAMPLED
               else reference_ids)
    t = _clock(times, "sampling", t)
    rollout = trainer.rollout(kind, prompt_ids, outputs, reference_ids)
    t = _clock(times, "reward", t)
    value_and_policy_gradients(trainer, rollout, times)
    t = time.perf_counter()
    trainer.apply()
    _clock(times, "optimiser", t)
    return times, outputs


def value_and_policy_gradients(trainer, rollout, times: dict) -> None:
    from lastmile import ppo_equations as eq
    from lastmile import ppo_trainer as pt

    cfg, model = trainer.cfg, trainer.model
    trainer.optimizer.zero_grad(set_to_none=True)
    n = rollout.mask.shape[0]
    total = int(rollout.mask.sum())
    returns = eq.discounted_returns(rollout.rewards, rollout.mask, cfg.gamma)
    values = torch.zeros_like(rollout.rewards)
    for idx in trainer._micro_batches(n):
        t = time.perf_counter()
        mask = rollout.mask[idx]
        v = model.scalar(trainer._states(pt._rows(rollout.batch, idx), pt.VALUE), pt.VALUE)
        loss = eq.value_loss(v.float(), returns[idx][mask], torch.ones_like(v, dtype=torch.bool))
        t = _clock(times, "value forward", t)
        (loss * (int(mask.sum()) / total)).backward()
        _clock(times, "value backward", t)
        values[idx] = pt.to_output_space(v.detach().float(), mask)
    advantages, _ = trainer._advantages(rollout, values)
    for idx in trainer._micro_batches(n):
        t = time.perf_counter()
        mask = rollout.mask[idx]
        logp = trainer._logprobs(pt._rows(rollout.batch, idx), pt.POLICY).float()
        loss, _, _ = eq.policy_loss(logp, logp.detach(), advantages[idx][mask],
                                     torch.ones_like(logp, dtype=torch.bool), cfg.clip_eps)
        t = _clock(times, "policy forward", t)
        (loss * (int(mask.sum()) / total)).backward()
        _clock(times, "policy backward", t)


def ppo_parts(run: RunFolder, updates: int) -> dict:
    """PPO's parts on the run's first batches: the run's reward adapter, fresh policy and value
    (the run's start), its precision and micro-batches; one warm-up update per kind, then
    `updates` measured per kind. Tokens of each part from the real outputs."""
    from lastmile import ppo_trainer as pt
    from lastmile import ppo as stage
    from lastmile.modeling import encode_outputs, encode_prompts
    from lastmile.train_utils import default_device, epoch_batches, seed_everything

    cfg = run.profile.ppo
    rows = read_jsonl(run.folder("filter_data") / "train.jsonl")
    seed_everything(cfg.seed)
    model, tokenizer = stage.build_model(run.profile.base_model,
                                       run.folder("train_reward") / "adapter", cfg)
    model.to(default_device())
    shape = base_shape(run.profile.base_model)
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows])
    references = encode_outputs(tokenizer, [r["output"] for r in rows], cfg.max_new_tokens)
    # the run's batches in the run's order (past its max_updates when it made fewer)
    batches = epoch_batches(len(rows), cfg.batch_size, cfg.epochs, cfg.seed)
    n_updates = len(batches) + 4 * (updates + 1)
    kinds = pt.batch_kinds(n_updates, cfg.reference_fraction)
    trainer = pt.PPOTrainer(model, tokenizer, cfg, n_updates,
                             micro_batch_size=pt.DEFAULT_MICRO_BATCH, precision=cfg.precision)
    wanted = {k: updates + 1 for k in (pt.SAMPLED, pt.REFERENCE)}
    measured: dict[str, list[tuple[dict, dict]]] = {pt.SAMPLED: [], pt.REFERENCE: []}
    for update, kind in enumerate(kinds, start=1):
        idx = batches[(update - 1) % len(batches)]
        if not any(wanted.values()):
            break
        if not wanted[kind]:
            continue
        wanted[kind] -= 1
        p = [prompts[i] for i in idx]
        r = [references[i] for i in idx]
        times, outputs = timed_update(trainer, kind, p, r, update)
        print(f"# PPO update {update} ({kind}{', warm-up' if wanted[kind] >= updates else ''}): "
              + " ".join(f"{k}={v:.2f}s" for k, v in times.items()), file=sys.stderr, flush=True)
        if wanted[kind] < updates:  # not the warm-up
            works = ppo_update_works(shape, p, [len(o) for o in outputs], kind == pt.SAMPLED,
                                     shape.lora_params(cfg.policy_lora.r),
                                     shape.lora_params(cfg.value_lora.r),
                                     pt.DEFAULT_MICRO_BATCH)
            measured[kind].append((times, works))
    return {"precision": cfg.precision, "shape": shape, "measured": measured,
            "updates": updates, "threads": torch.get_num_threads()}


def ppo_part_costs(parts: dict) -> list[Cost]:
    """Per kind and part: the median update's seconds; tokens and FLOPs of the median-time
    update (the work of one update; sampled updates differ in their output lengths)."""
    costs = []
    shape, precision = parts["shape"], parts["precision"]
    for kind, runs in parts["measured"].items():
        if not runs:
            continue
        ordered = sorted(runs, key=lambda r: sum(r[0].values()))
        works = ordered[len(ordered) // 2][1]
        whole = Cost(f"{kind}: whole update", precision, shape.name,
                     compute_seconds=statistics.median(sum(t.values()) for t, _ in runs))
        for part in PPO_PARTS:
            if kind != "sampled" and part == "sampling":
                continue
            cost = Cost(f"{kind}: {part}", precision if part != "optimiser" else None,
                        shape.name, part_of=whole.stage,
                        compute_seconds=statistics.median(t.get(part, 0.0) for t, _ in runs))
            for w in works.get(part.split()[0], []):
                if part.endswith("backward"):  # the backward of the forward timed above
                    cost.tokens_bwd += w.tokens
                    cost.flops_bwd += backward_flops(shape, w)
                else:
                    forward = Work(w.tokens, w.real, w.context, w.logits, w.lora, False)
                    cost.add(shape, forward)
                    whole.add(shape, w)
            costs.append(cost)
        costs.append(whole)
    return costs


# ============================================================================ output

def _num(x, fmt: str, none: str = "—") -> str:
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def _gflop(flops: float) -> str:
    g = flops / 1e9
    return "—" if not g else f"{g:,.0f}" if g >= 100 else f"{g:.3g}"


def markdown_table(costs: Sequence[Cost], peaks: dict[str, float], title: str,
                   task_column: bool = True) -> str:
    head = ["stage", "precision"]
    if task_column:
        head += ["task s", "stage s"]
    head += ["compute s", "tokens fwd", "tokens bwd", "padding", "GFLOP fwd", "GFLOP bwd",
             "GFLOP/s", "of peak"]
    if task_column:
        head += ["median step: GFLOP/s", "of peak"]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |",
             "|" + "|".join("---" for _ in head) + "|"]
    for c in costs:
        r = c.row(peaks)
        cells = [c.stage, c.precision or "—"]
        if task_column:
            cells += [_num(c.task_seconds, "{:.1f}"), _num(c.stage_seconds, "{:.1f}")]
        cells += [_num(c.compute_seconds, "{:.2f}" if not task_column else "{:.1f}"),
                  _num(c.tokens_fwd or None, "{:,}"), _num(c.tokens_bwd or None, "{:,}"),
                  _num(c.padding, "{:.0%}"), _gflop(c.flops_fwd), _gflop(c.flops_bwd),
                  _num(r["flops_per_second"] and r["flops_per_second"] / 1e9, "{:.1f}"),
                  _num(r["fraction_of_peak"], "{:.0%}")]
        if task_column:
            step = c.median_step_flops_per_second
            peak = peaks.get(c.precision) if c.precision else None
            cells += [_num(step and step / 1e9, "{:.1f}"),
                      _num(step / peak if step and peak else None, "{:.0%}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def totals(costs: Sequence[Cost]) -> Cost:
    total = Cost("all stages")
    for c in costs:
        if c.part_of or (c.flops and not c.compute_seconds):  # parts; work without a time
            continue
        for key in ("task_seconds", "stage_seconds", "compute_seconds"):
            v = getattr(c, key)
            if v is not None:
                setattr(total, key, (getattr(total, key) or 0.0) + v)
        total.tokens_fwd += c.tokens_fwd
        total.real_fwd += c.real_fwd
        total.tokens_bwd += c.tokens_bwd
        total.flops_fwd += c.flops_fwd
        total.flops_bwd += c.flops_bwd
    return total


def report(result: dict) -> str:
    peaks = result["peaks"]
    bound = {p: peaks[p][str(PEAK_M)] for p in PRECISIONS}
    costs = [Cost(**{k: v for k, v in c.items() if k in Cost.__dataclass_fields__})
             for c in result["stages"]]
    out = [f"run {result['run']}  (profile {result['profile']}, base {result['base_model']}, "
           f"{'' if result.get('complete', True) else 'UNFINISHED: stages done so far; '}"
           f"torch threads {result['threads']}, wall {_num(result['run_wall_seconds'], '{:.0f}')}"
           " s by kfp.log)"]
    m = result.get("machine") or {}
    out += [f"machine cpu=\"{m.get('cpu')}\" cores={m.get('cores')} "
            f"memory={_num(m.get('memory_gib'), '{:.1f}')}GiB "
            f"load_1min={_num(m.get('load_1min'), '{:.1f}')} torch={torch.__version__}", ""]
    out.append("matmul bound (one decoder layer's linear maps, F.linear, best of "
               f"{result['peak_repeats']}): " + "; ".join(
                   f"{p} {peaks[p][str(PEAK_M)] / 1e9:.1f} GFLOP/s at M={PEAK_M}, "
                   f"{peaks[p][str(DECODE_M)] / 1e9:.1f} at M={DECODE_M}" for p in PRECISIONS))
    detail = peaks.get("detail")
    if detail:
        for key, label in (("at_threads", f"at {detail['threads']} threads"),
                           ("one_thread_scaled", f"{detail['threads']} x one thread")):
            out.append(f"  {label}: " + "; ".join(
                f"{p} {detail[key][p][str(PEAK_M)] / 1e9:.1f} (M={PEAK_M}), "
                f"{detail[key][p][str(DECODE_M)] / 1e9:.1f} (M={DECODE_M})" for p in PRECISIONS))
    out.append("")
    out.append(markdown_table(costs + [totals(costs)], bound, "Stages"))
    checks = {c.stage: c.checks for c in costs if c.checks}
    out += ["", "checks: " + json.dumps(checks)]
    if result.get("ppo_parts"):
        parts = [Cost(**{k: v for k, v in c.items() if k in Cost.__dataclass_fields__})
                 for c in result["ppo_parts"]]
        out += ["", markdown_table(parts, bound,
                                   f"PPO update parts (median of {result['ppo_updates']} per "
                                   "kind after a warm-up, per update)", task_column=False)]
    return "\n".join(out)


def machine() -> dict:
    """CPU, cores, memory, load (bench/ppo_vs_trl.py's `machine`, the standard library only)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_ppo_vs_trl", BENCH / "ppo_vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.machine()


def result_of(run: RunFolder, costs: Sequence[Cost], peaks: dict, repeats: int,
              parts: dict | None) -> dict:
    bound = {p: peaks[p][str(PEAK_M)] for p in PRECISIONS}
    return {
        "machine": machine(),
        "run": str(run.root), "complete": run.complete, "profile": run.profile.name, "base_model": run.profile.base_model,
        "threads": torch.get_num_threads(), "peak_repeats": repeats,
        "run_wall_seconds": run_wall(run.root / "logs" / "kfp.log"),
        "peaks": peaks,
        "stages": [c.row(bound) for c in costs],
        "total": totals(costs).row(bound),
        "ppo_parts": [c.row(bound) for c in ppo_part_costs(parts)] if parts else None,
        "ppo_updates": parts["updates"] if parts else None,
        "formula": {"forward": "2(N + N_lora) t + 2 V H t_logits + 4 L A c",
                    "backward": "2 N t + 4 N_lora t + 2 V H t_logits + 8 L A c"},
    }


def run_pipeline(profile: str, threads: int, params: Sequence[str]) -> Path:
    out = ROOT / "runs" / f"costs-{dt.datetime.now():%Y%m%d-%H%M%S}"
    cmd = [sys.executable, str(ROOT / "pipeline.py"), "run", "--profile", profile,
           "--out", str(out)] + [x for p in params for x in ("--param", p)]
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return out


def main(argv=None) -> int:
    # set here, not at import: tests import this file and their pipelines show bars
    os.environ.setdefault("LASTMILE_NO_PROGRESS", "1")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", help="a finished run's folder (runs/<stamp>); without it the "
                                 "pipeline runs first")
    p.add_argument("--profile", default="demo", help="the profile to run (without --run)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to pipeline.py run (without --run)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for the bound and PPO's parts (0: torch's default, "
                        "what the run's stages used unless OMP_NUM_THREADS was set)")
    p.add_argument("--peak-repeats", type=int, default=3)
    p.add_argument("--peak-seconds", type=float, default=2.0,
                   help="per precision, M and repeat (shared by the layer's maps)")
    p.add_argument("--ppo-updates", type=int, default=2,
                   help="measured PPO updates per kind for the parts table")
    p.add_argument("--no-ppo-parts", action="store_true")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.run) if args.run else run_pipeline(args.profile, args.threads, args.param)
    run = RunFolder(root)
    costs = account(run)
    peaks = measure_peaks(base_shape(run.profile.base_model), args.peak_repeats,
                          args.peak_seconds)
    parts = (ppo_parts(run, args.ppo_updates)
             if not args.no_ppo_parts and run.has("train_reward") else None)
    result = result_of(run, costs, peaks, args.peak_repeats, parts)
    print(report(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
