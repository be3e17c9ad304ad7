"""Run `bleurt-pytorch` 0.0.1 (BLEURT [24] ported to PyTorch) under transformers 5.

Why this module exists: bleurt-pytorch has one release, written against transformers 4, and
it does not import under transformers 5 (FINDINGS.md). We keep transformers 5 for the whole
project and bridge the gap here, in one place, instead of pinning everything to transformers 4
for one metric. What transformers 5 removed and what we put back:

  1. `transformers.pytorch_utils.find_pruneable_heads_and_indices` (imported at module level
     by `modeling_bleurt`; only used by head pruning, which scoring never does);
  2. the module `transformers.models.bert.tokenization_bert_fast` (transformers 5 folded
     `BertTokenizerFast` into `tokenization_bert`, where it is an alias of `BertTokenizer`);
  3. `PreTrainedModel.get_extended_attention_mask` and `.get_head_mask`, which BleurtModel's
     forward calls (transformers 5 dropped them from `ModuleUtilsMixin`).

Each patch is applied only where the name is missing, so under transformers 4 this is a no-op.

Loading also guards against a transformers 5 trap: a BERT tokenizer built from a directory
without vocabulary files (or from `vocab_file=` in the constructor, an argument it now
ignores) silently gets a 5-token vocabulary and turns every word into [UNK]. `load_bleurt`
picks the tokenizer class from the files present and refuses a vocabulary that empty.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch

#: Files that carry a BLEURT tokenizer's vocabulary: WordPiece (bleurt-tiny/base/large-128/512)
#: or SentencePiece (BLEURT-20 family).
WORDPIECE_FILES = ("vocab.txt", "tokenizer.json")
SENTENCEPIECE_FILE = "spm.model"


class BleurtLoadError(RuntimeError):
    """A BLEURT checkpoint was named but cannot be loaded."""


# ----------------------------------------------------------------------------- patches

def find_pruneable_heads_and_indices(
    heads: list[int] | set[int], n_heads: int, head_size: int, already_pruned_heads: set[int]
) -> tuple[set[int], torch.LongTensor]:
    """Heads still to prune, and the indices of the rows of q/k/v (columns of the output) to keep.

    Written from the transformers 4 contract: `heads` are indices in the *original* numbering;
    heads pruned earlier are skipped and the rest are shifted down past them.
    """
    heads = set(heads) - already_pruned_heads
    keep = torch.ones(n_heads, head_size, dtype=torch.bool)  # [n_heads, head_size]
    for head in heads:
        shifted = head - sum(1 for h in already_pruned_heads if h < head)
        keep[shifted] = False
    index = torch.arange(n_heads * head_size)[keep.view(-1)].long()  # [kept * head_size]
    return heads, index


def get_extended_attention_mask(self, attention_mask: torch.Tensor, input_shape=None, dtype=None):
    """[B, T] (or [B, T, T]) 1/0 mask -> additive mask broadcastable to [B, heads, T, T].

    Encoder-only (BLEURT is a BERT): 0 where attended, the dtype's most negative value where
    padded, added to the attention logits before the softmax.
    """
    dtype = dtype or self.dtype
    if attention_mask.dim() == 3:
        extended = attention_mask[:, None, :, :]  # [B, 1, T, T]
    elif attention_mask.dim() == 2:
        extended = attention_mask[:, None, None, :]  # [B, 1, 1, T]
    else:
        raise ValueError(f"attention_mask must be [batch, seq] or [batch, seq, seq], got "
                         f"{tuple(attention_mask.shape)}")
    extended = extended.to(dtype=dtype)
    return (1.0 - extended) * torch.finfo(dtype).min


def get_head_mask(self, head_mask: torch.Tensor | None, num_hidden_layers: int, *args, **kwargs):
    """None -> one None per layer; [heads] or [layers, heads] -> [layers, 1, heads, 1, 1]."""
    if head_mask is None:
        return [None] * num_hidden_layers
    if head_mask.dim() == 1:
        head_mask = head_mask[None, None, :, None, None].expand(num_hidden_layers, -1, -1, -1, -1)
    elif head_mask.dim() == 2:
        head_mask = head_mask[:, None, :, None, None]
    else:
        raise ValueError(
            f"head_mask must be [heads] or [layers, heads], got {tuple(head_mask.shape)}")
    return head_mask.to(dtype=self.dtype)


def _patch_transformers() -> None:
    """Patches 1 and 2: names bleurt_pytorch imports at module level."""
    import transformers.pytorch_utils as pytorch_utils

    if not hasattr(pytorch_utils, "find_pruneable_heads_and_indices"):
        pytorch_utils.find_pruneable_heads_and_indices = find_pruneable_heads_and_indices

    fast_name = "transformers.models.bert.tokenization_bert_fast"
    try:
        importlib.import_module(fast_name)
    except ModuleNotFoundError:
        from transformers.models.bert import tokenization_bert

        shim = types.ModuleType(fast_name)
        shim.__doc__ = "lastmile.bleurt_compat: BertTokenizerFast moved into tokenization_bert."
        shim.BertTokenizerFast = tokenization_bert.BertTokenizerFast
        sys.modules[fast_name] = shim


def _patch_bleurt(modeling) -> None:
    """Patch 3: the mask helpers BleurtModel.forward calls on itself."""
    cls = modeling.BleurtPreTrainedModel
    if not hasattr(cls, "get_extended_attention_mask"):
        cls.get_extended_attention_mask = get_extended_attention_mask
    if not hasattr(cls, "get_head_mask"):
        cls.get_head_mask = get_head_mask


def import_bleurt():
    """Import `bleurt_pytorch` with the patches in place; returns the package (idempotent)."""
    _patch_transformers()
    try:
        import bleurt_pytorch
        from bleurt_pytorch.bleurt import modeling_bleurt
    except ImportError as e:
        raise BleurtLoadError(
            f"bleurt-pytorch does not import ({e}); install it with "
            "`pip install --no-deps bleurt-pytorch==0.0.1`") from e
    _patch_bleurt(modeling_bleurt)
    return bleurt_pytorch


# ----------------------------------------------------------------------------- loading

def resolve_checkpoint(checkpoint: str, allow_pickle: bool = False) -> Path:
    """A local directory as is; anything else is a hub id, fetched (or found in the HF cache).

    Hub access happens only here, only because the user named the id. Pickle weights
    (pytorch_model.bin) are downloaded only with `allow_pickle=True`; a directory whose only
    weights are pickle files is refused without it (unpickling can run code).
    """
    from .modeling import UnsafeWeightsError, check_weight_files

    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        if path.exists() or checkpoint.startswith((".", "/", "~")) or checkpoint.count("/") > 1:
            raise BleurtLoadError(
                f"BLEURT checkpoint {checkpoint!r} is not an existing directory")
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.txt", "*.model", "*.safetensors"]
        try:
            path = Path(snapshot_download(
                checkpoint, allow_patterns=patterns + (["*.bin"] if allow_pickle else [])))
        except Exception as e:  # offline, unknown repo, gated: all mean "cannot load"
            raise BleurtLoadError(
                f"BLEURT checkpoint {checkpoint!r} is neither a local directory nor a reachable "
                f"hub id ({type(e).__name__}: {e})") from e
    try:
        check_weight_files(path, f"BLEURT checkpoint {checkpoint!r}", allow_pickle)
    except UnsafeWeightsError as e:
        raise BleurtLoadError(str(e)) from None
    return path


def load_bleurt(checkpoint: str, device: str | torch.device = "cpu", *,
                allow_pickle: bool = False):
    """(model, tokenizer) for a BLEURT checkpoint (hub id or local dir), model in eval mode.

    Weights load from safetensors only unless `allow_pickle=True` (for checkpoints published
    as pytorch_model.bin only, from a source you trust). The classes are bleurt-pytorch's own,
    so no code shipped with a checkpoint is ever run. Raises BleurtLoadError naming the
    checkpoint when anything is missing, unsafe or inconsistent.
    """
    bleurt = import_bleurt()
    from bleurt_pytorch.bleurt.tokenization_bleurt_fast import BleurtTokenizerFast
    from bleurt_pytorch.bleurt.tokenization_bleurt_sp import BleurtSPTokenizer

    path = resolve_checkpoint(checkpoint, allow_pickle)
    if (path / SENTENCEPIECE_FILE).exists():
        # transformers 5 converts spm.model with the sentencepiece library; without it, it
        # falls back to a tiktoken reader that cannot parse it. (Checked: sentencepiece 0.2.1
        # works beside protobuf 6.33; 0.2.3's generated code needs a newer protobuf.)
        if importlib.util.find_spec("sentencepiece") is None:
            raise BleurtLoadError(
                f"BLEURT checkpoint {checkpoint!r} uses a SentencePiece vocabulary "
                f"({SENTENCEPIECE_FILE}, the BLEURT-20 family); install `sentencepiece` to load it")
        tokenizer_cls = BleurtSPTokenizer
    elif any((path / name).exists() for name in WORDPIECE_FILES):
        tokenizer_cls = BleurtTokenizerFast
    else:
        raise BleurtLoadError(
            f"BLEURT checkpoint {checkpoint!r} ({path}) has no tokenizer vocabulary: expected "
            f"one of {', '.join(WORDPIECE_FILES + (SENTENCEPIECE_FILE,))}")
    try:
        tokenizer = tokenizer_cls.from_pretrained(str(path))
        model = bleurt.BleurtForSequenceClassification.from_pretrained(
            str(path), use_safetensors=None if allow_pickle else True)
    except Exception as e:
        raise BleurtLoadError(
            f"BLEURT checkpoint {checkpoint!r} ({path}) failed to load: {type(e).__name__}: {e}"
        ) from e
    _check_vocabulary(checkpoint, tokenizer, model.config)
    return model.to(device).eval(), tokenizer


def _check_vocabulary(checkpoint: str, tokenizer, config) -> None:
    n = len(tokenizer)
    if n <= len(tokenizer.all_special_tokens):
        raise BleurtLoadError(
            f"BLEURT checkpoint {checkpoint!r}: the tokenizer loaded with only {n} tokens "
            "(its vocabulary file was not read)")
    if n > config.vocab_size:
        raise BleurtLoadError(
            f"BLEURT checkpoint {checkpoint!r}: tokenizer has {n} tokens but the model's "
            f"embedding has {config.vocab_size}")


@torch.inference_mode()
def bleurt_score_batch(model, tokenizer, references: list[str],
                       candidates: list[str]) -> list[float]:
    """One BLEURT score per (reference, candidate) pair: the regression head's output.

    The pair is encoded as [CLS] reference [SEP] candidate [SEP], as in the BLEURT reference
    implementation and bleurt-pytorch's README; truncated to the model's position table.
    """
    if len(references) != len(candidates):
        raise ValueError(f"{len(references)} references but {len(candidates)} candidates")
    if not references:
        return []
    max_len = model.config.max_position_embeddings
    enc = tokenizer(references, candidates, padding="longest", truncation=True,
                    max_length=max_len, return_tensors="pt").to(model.device)
    logits = model(**enc).logits  # [B, 1]
    return logits[:, 0].float().cpu().tolist()
