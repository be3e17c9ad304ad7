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
def assert_bf16_close():
    """Check that bfloat16 autocast (modeling.autocast) changes loss_fn's step by rounding only:
    from zeroed gradients of `params`, the loss within `loss_rel` of float32's and the
    gradient's cosine with float32's above 0.99."""
    import torch

    from lastmile.modeling import autocast

    def check(model, params, loss_fn, loss_rel):
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
        assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=loss_rel)
        cosine = torch.nn.functional.cosine_similarity(grads["float32"], grads["bfloat16"], 0)
        assert cosine > 0.99, cosine

    return check
