"""Shared fixtures. Nothing here touches a network: hub access is switched off for the suite."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's real tokenizer (chat template, eos/pad <|im_end|>), left-padded."""
    from lastmile.modeling import load_tokenizer

    return load_tokenizer("tiny-random")


@pytest.fixture
def tiny_model(tokenizer):
    """A fresh ~3 M-parameter random Llama over SmolLM2's vocabulary, frozen like a base."""
    from lastmile.modeling import load_base

    model, _ = load_base("tiny-random")
    return model


@pytest.fixture
def precision_pair():
    """loss_fn's loss and flattened gradient of `params` at float32 and at bfloat16 autocast
    (modeling.autocast), each from zeroed gradients: ({precision: loss}, {precision: grad})."""
    import torch

    from lastmile.modeling import autocast

    def run(model, params, loss_fn):
        losses, grads = {}, {}
        for precision in ("float32", "bfloat16"):
            for p in params:
                p.grad = None
            with autocast(model, precision):
                loss = loss_fn()
            loss.backward()
            assert loss.dtype == torch.float32, precision
            losses[precision] = loss.item()
            grads[precision] = torch.cat([p.grad.flatten() for p in params])
        return losses, grads

    return run
