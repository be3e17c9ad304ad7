"""What the bundled datasets' build scripts share: the dedupe and sampling rules that make a
bundle's rows and order reproducible (scripts/build_debian_dataset.py,
scripts/build_python_dataset.py). Writing goes through lastmile.io.write_reproducible_jsonl_gz."""

from __future__ import annotations

import hashlib
from typing import Callable, Hashable, Sequence, TypeVar

T = TypeVar("T")


def normalised(text: str) -> str:
    """Case- and whitespace-insensitive form, for duplicate checks."""
    return " ".join(text.casefold().split())


def dedupe(items: Sequence[T], key: Callable[[T], Hashable]) -> list[T]:
    """The first item of each key, in order."""
    seen: set = set()
    kept = []
    for item in items:
        k = key(item)
        if k not in seen:
            seen.add(k)
            kept.append(item)
    return kept


def sample(items: Sequence[T], n: int, seed: int, name: Callable[[T], str]) -> list[T]:
    """The first n by a seeded hash of each item's name, written sorted by name."""
    def rank(item: T) -> bytes:
        return hashlib.sha256(f"{seed}:{name(item)}".encode()).digest()

    ranked = sorted(items, key=rank)
    return sorted(ranked[:n], key=name)
