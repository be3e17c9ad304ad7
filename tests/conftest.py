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
