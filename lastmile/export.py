"""After the run: a trained adapter as a standard Hugging Face export with a model card.

`export_run(run, out_dir, variant, merged)` is `lastmile export`. The run is

  * a local run directory (`pipeline.py run --out`, `runs/<timestamp>`, or the `runs/latest`
    symlink): its kfp.local folder holds the stages' outputs (`kfp/<pipeline run>/train-ppo/
    ppo_model/adapter`, `.../train-mle/mle_model/adapter`, `.../report/report_dir`);
  * a published run `s3://bucket/prefix/<run name>/` (`lastmile.results.publish_run`),
    fetched with `storage.read_published`, or such a run already copied to a local directory:
    `ppo/adapter`, `mle/adapter` and `report/`.

What `out_dir` gets:

  * without `merged`: the adapter as a PEFT directory (`adapter_config.json`,
    `adapter_model.safetensors`) that `peft.PeftModel.from_pretrained(base, out_dir)` loads
    and vLLM serves as a LoRA; the tokenizer (with its chat template) beside it;
  * with `merged`: the base with the LoRA merged in (W + s·BA, as the pipeline's generate stage
    decodes with) as a plain Hugging Face safetensors model with tokenizer, chat template and
    greedy generation defaults; the PEFT adapter under `adapter/` (not at the top: transformers
    would find an adapter_config.json there and apply the LoRA a second time). A quantized
    (GPTQ) base is refused: its packed integer weights have nothing to merge into;
  * `lastmile.json` (`SETTINGS_FILE`): what `lastmile predict` needs to reproduce the pipeline's
    predictions - the base model and its hash, the instruction and prompt format, greedy
    decoding settings, precision, the post-processing rules - and where the model came from;
  * `README.md`: the model card (base and hash, data fingerprint, configuration, Tables 1-2,
    intended use and limits).

The adapter is copied tensor for tensor (names, shapes and values checked against its own
config), with two fields of adapter_config.json filled in: `task_type` CAUSAL_LM (peft's and
vLLM's loaders expect it) and `base_model_name_or_path` (null in the pipeline's copy).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import EMBEDDED_BASE, TINY_BASE

log = logging.getLogger(__name__)

EXPORT_FORMAT = "lastmile-export/1"
SETTINGS_FILE = "lastmile.json"
CARD_FILE = "README.md"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: Where a merged export keeps the PEFT adapter (see the module docstring).
MERGED_ADAPTER_DIR = "adapter"
#: variant -> the training stage output holding its adapter (local: `<x>_model`; published: x).
VARIANTS = {"rl": "ppo", "mle": "mle"}
#: variant -> the stage summary that recorded the base model's hash when it was trained.
TRAINING_SUMMARY = {"rl": "train_ppo", "mle": "train_mle"}
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


class ExportError(ValueError):
    """A run or export that cannot be used; the message names the path, flag or field."""


# ----------------------------------------------------------------------------- finding a run

@dataclass
class RunFiles:
    """The parts of a finished run that export and predict use."""

    source: str  # as the user named it
    adapters: dict[str, Path]  # variant -> adapter directory (adapter_config.json inside)
    config: dict[str, Any]  # the run's resolved configuration (config.Profile as a dict)
    scores: dict[str, Any] | None  # scores.json (Tables 1-2)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> summary.json
    test_path: Path | None = None  # the filtered test split (local runs only)
    published: dict[str, Any] | None = None  # the published manifest's metadata (s3 runs)

    def adapter(self, variant: str) -> Path:
        if variant not in VARIANTS:
            raise ExportError(f"--variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        path = self.adapters.get(variant)
        if path is None:
            raise ExportError(f"run {self.source}: no {variant} adapter "
                              f"({VARIANTS[variant]}/adapter/{ADAPTER_CONFIG} missing)")
        return path

    @property
    def base_model(self) -> str:
        return str(self.config.get("base_model") or EMBEDDED_BASE)


def locate_run(run: str | os.PathLike) -> RunFiles:
    """The run's adapters, configuration, scores and summaries, local or published."""
    text = str(run)
    if text.startswith("s3://"):
        from . import storage

        try:
            root = storage.read_published(text)
            manifest = storage.read_manifest(text)
        except storage.StorageError as e:
            raise ExportError(str(e)) from None
        files = _published_layout(root, text)
        files.published = manifest.get("metadata") or {}
        return files
    root = Path(text).expanduser()
    if not root.exists():
        raise ExportError(f"run {text}: no such directory (a run is runs/<timestamp>, "
                          "runs/latest or s3://bucket/prefix/<run name>/)")
    root = root.resolve()  # runs/latest is a symlink
    if not root.is_dir():
        raise ExportError(f"run {text}: not a directory")
    if (root / "ppo").is_dir() and (root / "report").is_dir():  # a published run, copied
        return _published_layout(root, text)
    return _local_layout(root, text)


def _local_layout(root: Path, source: str) -> RunFiles:
    """A `pipeline.py run` directory: the newest kfp.local pipeline run that got to its report
    (an earlier attempt in the same directory may have failed half-way)."""
    candidates = sorted(d for d in (root / "kfp").glob("lastmile-*") if d.is_dir())
    finished = [d for d in candidates if _report_dir(d) is not None]
    if not finished:
        if (root / "no-new-data.md").is_file():
            raise ExportError(f"run {source} trained nothing (no new data, see "
                              f"{root / 'no-new-data.md'}); export the run it matched instead")
        what = (f"{len(candidates)} pipeline run(s) under {root / 'kfp'}, none finished "
                "(no report)") if candidates else f"no kfp/lastmile-* folder in {root}"
        raise ExportError(f"run {source}: not a finished lastmile run ({what})")
    pipeline_run = finished[-1]
    adapters = {}
    for variant, stage in VARIANTS.items():
        hits = sorted(pipeline_run.glob(f"*/{stage}_model/adapter/{ADAPTER_CONFIG}"))
        if hits:
            adapters[variant] = hits[-1].parent
    tests = sorted(pipeline_run.glob("*/data/test.jsonl"))
    return _with_report(RunFiles(source, adapters, {}, None,
                                 test_path=tests[-1] if tests else None),
                        _report_dir(pipeline_run))


def _report_dir(pipeline_run: Path) -> Path | None:
    hits = sorted(pipeline_run.glob("*/report_dir/config.json"))
    return hits[-1].parent if hits else None


def _published_layout(root: Path, source: str) -> RunFiles:
    adapters = {variant: root / stage / "adapter" for variant, stage in VARIANTS.items()
                if (root / stage / "adapter" / ADAPTER_CONFIG).is_file()}
    report = root / "report"
    if not (report / "config.json").is_file():
        raise ExportError(f"run {source}: {report / 'config.json'} is missing (published by a "
                          "lastmile version that did not keep the configuration?)")
    return _with_report(RunFiles(source, adapters, {}, None), report)


def _with_report(files: RunFiles, report: Path) -> RunFiles:
    files.config = _read_json(report / "config.json")
    if (report / "scores.json").is_file():
        files.scores = _read_json(report / "scores.json")
    for path in sorted((report / "summaries").glob("*.json")):
        files.summaries[path.stem] = _read_json(path)
    return files


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: cannot read it as JSON ({e})") from None


# ----------------------------------------------------------------------------- settings

def settings_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """How the pipeline turns an input into a prediction, from the run's configuration: what
    `lastmile predict` (and anyone reproducing it by hand) needs. Written to lastmile.json."""
    data, generate = config.get("data", {}), config.get("generate", {})
    return {
        "prompt": {
            "instruction": data.get("instruction", ""),
            # lastmile.data.format_prompt: the input stripped of surrounding whitespace, one
            # user turn "<instruction>\n\n<input>" in the tokenizer's chat template, with the
            # assistant header; tokenized without adding special tokens (the template has them).
            "format": "chat_template",
            "user_turn": "{instruction}\n\n{input}",
            "add_generation_prompt": True,
            "add_special_tokens": False,
            "strip_input": True,
            "max_input_tokens": data.get("max_input_tokens"),
        },
        "generation": {
            # lastmile.generate: greedy, at most max_new_tokens, stop at EOS; rows sorted by
            # prompt length within windows of batch_size * window_batches rows, left-padded.
            "do_sample": False,
            "num_beams": 1,
            "max_new_tokens": generate.get("max_new_tokens", 100),
            "batch_size": generate.get("batch_size", 16),
            "window_batches": generate.get("window_batches", 8),
            "padding_side": "left",
            "precision": generate.get("precision", "float32"),
            "skip_special_tokens": True,
            "strip_output": True,
        },
        # lastmile.postprocess.clean: optional, as in the pipeline's *_cleaned variants.
        "postprocess": ["drop a first line starting with 'Sure,' when there is a newline",
                        "keep only the first non-blank line, stripped"],
    }


# ----------------------------------------------------------------------------- the adapter

def convert_adapter(src: Path, dest: Path, base_reference: str | None) -> dict[str, Any]:
    """Copy lastmile's adapter directory `src` to a standard PEFT directory `dest`: the same
    tensors under the same names, the same r/alpha/targets; returns the written config."""
    from safetensors.torch import load_file, save_file

    config = _read_json(src / ADAPTER_CONFIG)
    spec_path = src / "lastmile_adapter.json"
    spec = _read_json(spec_path).get("lora", {}) if spec_path.is_file() else {}
    for ours, theirs in (("r", "r"), ("alpha", "lora_alpha")):
        if ours in spec and spec[ours] != config.get(theirs):
            raise ExportError(f"{src}: {ADAPTER_CONFIG} has {theirs}={config.get(theirs)}, "
                              f"lastmile_adapter.json {ours}={spec[ours]}")
    if config.get("peft_type") != "LORA":
        raise ExportError(f"{src}: peft_type {config.get('peft_type')!r}, expected LORA")
    tensors = load_file(str(src / ADAPTER_WEIGHTS))
    _check_lora_tensors(src, config, tensors)
    config = {**config, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_reference}
    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    (dest / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def _check_lora_tensors(src: Path, config: dict[str, Any], tensors: dict) -> None:
    """Every tensor is lora_A/lora_B of a targeted module, rank r, both halves present."""
    r, targets = config.get("r"), config.get("target_modules")
    seen: dict[str, set[str]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise ExportError(f"{src / ADAPTER_WEIGHTS}: tensor {key!r} is not a LoRA weight "
                              "(base_model.model.<module>.lora_A/B.weight)")
        module, half = match["module"], match["ab"]
        rank = tensor.shape[0] if half == "A" else tensor.shape[-1]
        if rank != r:
            raise ExportError(f"{src / ADAPTER_WEIGHTS}: {key} has rank {rank}, the config "
                              f"says r={r}")
        if isinstance(targets, list) and not any(module == t or module.endswith("." + t)
                                                 for t in targets):
            raise ExportError(f"{src / ADAPTER_WEIGHTS}: {key} is not among target_modules")
        seen.setdefault(module, set()).add(half)
    broken = sorted(m for m, halves in seen.items() if halves != {"A", "B"})
    if not seen or broken:
        raise ExportError(f"{src / ADAPTER_WEIGHTS}: incomplete LoRA pairs "
                          f"({', '.join(broken) or 'no tensors'})")


# ----------------------------------------------------------------------------- the base

def base_reference(source: str, *, allow_pickle: bool = False) -> str | None:
    """What adapter_config.json's base_model_name_or_path names: the local directory the base
    loads from (a GGUF's dequantized cache on this machine), a hub id as given, or None for the
    tiny random test model, which exists only inside lastmile."""
    if source == TINY_BASE:
        return None
    from .modeling import resolve_base

    return resolve_base(source, allow_pickle=allow_pickle)


def check_base(source: str, expected_hash: str | None, what: str) -> str:
    """The base's fingerprint, which must be the one the adapter was trained on."""
    from .modeling import base_fingerprint

    actual = base_fingerprint(source)
    if expected_hash and not str(expected_hash).startswith("unavailable") \
            and actual != expected_hash:
        raise ExportError(f"{what}: base model {source} now has hash {actual}, but the adapter "
                          f"was trained on {expected_hash}; its weights changed since the run")
    return actual


def quantization_method(source: str, *, allow_pickle: bool = False,
                        trust_remote_code: bool = False) -> str | None:
    """The quantization method the base's config names (e.g. "gptq"), None when dense. Read
    from the config alone, before loading any weights (a GPTQ base needs its kernels to load).
    """
    if source in (TINY_BASE, EMBEDDED_BASE):
        return None
    from transformers import AutoConfig

    from .modeling import resolve_base

    path = resolve_base(source, allow_pickle=allow_pickle)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # loading reports the real problem later
        log.debug("cannot read the config of %s: %s", path, e)
        return None
    quant = getattr(config, "quantization_config", None)
    if not quant:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(
        quant, "quant_method", None)
    return str(getattr(method, "value", method) or "quantized")


def _refuse_quantized_merge(source: str, method: str) -> ExportError:
    return ExportError(
        f"--merged: the base model {source} is {method}-quantized; its packed integer weights "
        "have no dense matrix to add the LoRA update to, and dequantizing it would give a "
        "different model from the one the run evaluated. The PEFT adapter is the export: run "
        "without --merged and serve the adapter on this base (vLLM --enable-lora, or "
        "peft.PeftModel.from_pretrained)")


def _write_merged(adapter_dir: Path, out: Path, source: str, settings: dict[str, Any], *,
                  allow_pickle: bool, trust_remote_code: bool) -> None:
    """The base with the adapter merged, exactly as generate.load_variant builds it for the
    pipeline's generate stage, saved in float32 with tokenizer and generation defaults."""
    from .generate import load_variant
    from .modeling import is_quantized

    model, tokenizer, adapter = load_variant(source, adapter_dir, allow_pickle=allow_pickle,
                                             trust_remote_code=trust_remote_code)
    if adapter is not None or is_quantized(model):  # load_variant keeps quantized unmerged
        raise _refuse_quantized_merge(source, "quantized")
    lm = model.base
    gen = settings["generation"]
    # Greedy, as the pipeline decodes: `model.generate(**inputs)` then needs no arguments.
    lm.generation_config.update(do_sample=False, num_beams=1, temperature=None, top_k=None,
                                top_p=None, max_new_tokens=gen["max_new_tokens"],
                                eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
    lm.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ----------------------------------------------------------------------------- export

def export_run(run: str | os.PathLike, out_dir: str | os.PathLike, variant: str = "rl",
               merged: bool = False) -> dict[str, Any]:
    """`lastmile export`: see the module docstring. Returns what lastmile.json holds."""
    files = locate_run(run)
    adapter_dir = files.adapter(variant)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out}: exists and is not empty (choose a new directory)")
    source = files.base_model
    allow_pickle = bool(files.config.get("allow_pickle", False))
    trust_remote_code = bool(files.config.get("trust_remote_code", False))
    if merged:
        method = quantization_method(source, allow_pickle=allow_pickle,
                                     trust_remote_code=trust_remote_code)
        if method:
            raise _refuse_quantized_merge(source, method)
    trained_on = files.summaries.get(TRAINING_SUMMARY[variant], {}).get("base_model_hash")
    base_hash = check_base(source, trained_on, f"run {files.source}")
    settings = {"format": EXPORT_FORMAT, "variant": variant, "merged": merged,
                "adapter": MERGED_ADAPTER_DIR if merged else ".",
                "base_model": {"source": source, "hash": base_hash,
                               "allow_pickle": allow_pickle,
                               "trust_remote_code": trust_remote_code},
                **settings_from_config(files.config), "run": _provenance(files)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        reference = base_reference(source, allow_pickle=allow_pickle)
        lora = convert_adapter(adapter_dir, tmp / (MERGED_ADAPTER_DIR if merged else ""),
                               reference)
        settings["lora"] = {"r": lora["r"], "alpha": lora["lora_alpha"],
                            "target_modules": lora["target_modules"]}
        if merged:
            _write_merged(adapter_dir, tmp, source, settings, allow_pickle=allow_pickle,
                          trust_remote_code=trust_remote_code)
        else:
            from .modeling import load_tokenizer

            load_tokenizer(source, trust_remote_code=trust_remote_code,
                           allow_pickle=allow_pickle).save_pretrained(tmp)
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
        (tmp / CARD_FILE).write_text(model_card(settings, files), encoding="utf-8")
        _readable(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return settings


def _readable(root: Path) -> None:
    """Give every file the permissions open() would (safetensors writes 0600): an export is
    copied into images and served by other users."""
    umask = os.umask(0)
    os.umask(umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _provenance(files: RunFiles) -> dict[str, Any]:
    data = files.summaries.get("filter_data", {})
    fingerprint = (files.published or {}).get("fingerprint", {})
    return {"source": files.source, "profile": files.config.get("name"),
            "data_source": data.get("source") or fingerprint.get("data_source"),
            "data_sha256": data.get("data_sha256") or fingerprint.get("data_sha256"),
            "rows": data.get("rows_out"),
            "kfp_run": (files.published or {}).get("kfp_run")}


# ----------------------------------------------------------------------------- model card

def model_card(settings: dict[str, Any], files: RunFiles) -> str:
    """README.md of an export: what it is, how to run it, how it scored, what it is not for."""
    from .metrics import markdown_tables

    variant = settings["variant"]
    base, run = settings["base_model"], settings["run"]
    prompt, gen = settings["prompt"], settings["generation"]
    name = "RL (PPO, no human feedback)" if variant == "rl" else "MLE baseline"
    kind = "merged model" if settings["merged"] else "LoRA adapter (PEFT)"
    lines = [
        "---",
        f"library_name: {'transformers' if settings['merged'] else 'peft'}",
        "pipeline_tag: text-generation",
        "tags: [lastmile, lora, summarization]",
        "---", "",
        f"# lastmile {name}: {kind}", "",
        f"A {kind} from the lastmile run `{run['source']}` (profile `{run['profile']}`): the "
        f"{name} model of Tables 1-2 below, trained to summarize an input in one short "
        "sentence (arXiv 2408.16753).", "",
        "## Base model", "",
        f"- source: `{base['source']}`",
        f"- hash: `{base['hash']}` (lastmile.modeling.base_fingerprint; the adapter was "
        "trained on exactly these weights)",
        f"- LoRA: r={settings['lora']['r']}, alpha={settings['lora']['alpha']}, on "
        f"{_targets(settings['lora']['target_modules'])}", "",
        "## Training data", "",
        f"- source: `{run['data_source'] or 'not recorded'}`",
        f"- data sha256 (filtered train and test files): `{run['data_sha256'] or 'not recorded'}`",
        f"- rows: {_rows(run['rows'])}", "",
        "## Prompt and decoding (as the pipeline evaluated it)", "",
        f"- instruction: {prompt['instruction']!r}",
        "- prompt: one user turn `<instruction>\\n\\n<input>` (input stripped) in the "
        "tokenizer's chat template, with the assistant header; no extra special tokens",
        f"- decoding: greedy, at most {gen['max_new_tokens']} new tokens, stop at EOS, "
        + (f"{gen['precision']} weights" if gen["precision"] != "auto" else
           "bf16 weights where the machine computes bf16 faster than float32, else float32 "
           "(precision auto)") + "; `lastmile.json` has every setting",
        "- optional post-processing (`lastmile predict --postprocess`): drop a first "
        "'Sure, ...' line, keep the first line", "",
        "## Use", "",
        "```bash",
        "lastmile predict . --input inputs.jsonl --input-column input --out predictions.jsonl",
        "```", "",
        _usage(settings), "",
        "## Evaluation (Tables 1 and 2 of the run)", "",
        markdown_tables(files.scores).strip() if files.scores else "(the run has no scores)",
        "",
        "## Intended use and limits", "",
        "- Intended: one-sentence summaries of inputs like the training data, with the prompt "
        "above. Other instructions or input kinds were not evaluated.",
        "- Trained without human feedback: the reward model learned to tell true outputs from "
        "synthetic negatives (random tokens, re-paired, shuffled, repetitive, copied input). "
        "The summaries can be wrong, invented or incomplete; check them before relying on "
        "them.",
        f"- Inputs longer than {prompt['max_input_tokens']} prompt tokens were filtered out "
        "of training and evaluation.",
        "- The scores above are automatic metrics on the run's own test split, not human "
        "judgement.",
        "- Licence: the base model's (SmolLM2: Apache-2.0) and the training data's terms "
        "apply.", "",
        "## Configuration of the run", "",
        "```json", json.dumps(files.config, indent=2, sort_keys=True), "```", "",
    ]
    return "\n".join(lines)


def _rows(rows: Any) -> str:
    if isinstance(rows, dict):
        return ", ".join(f"{n} {split}" for split, n in rows.items())
    return "not recorded" if rows is None else str(rows)


def _targets(modules: Any) -> str:
    """peft records "all-linear" as the layer names (q_proj, ...) or, for a small model, as
    every module's full name: the first are worth listing, the second only counting."""
    if isinstance(modules, str):
        return modules
    if all("." not in m for m in modules):
        return ", ".join(sorted(modules))
    return f"{len(modules)} linear modules (listed in adapter_config.json)"


def _usage(settings: dict[str, Any]) -> str:
    if settings["merged"]:
        return ("With transformers alone: `AutoModelForCausalLM.from_pretrained(DIR)` and "
                "`AutoTokenizer.from_pretrained(DIR)`; format the prompt with the chat template "
                "as above, tokenize with `add_special_tokens=False`, and `generate` (greedy by "
                "default here). The PEFT adapter is in `adapter/`.")
    return ("With peft: `PeftModel.from_pretrained(base, DIR)` on the base above; vLLM: "
            "`--enable-lora --lora-modules lastmile=DIR` on the same base.")
