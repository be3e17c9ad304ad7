"""What every stage records about itself: wall time, seed, library versions, input hashes.

Each stage writes `summary.json` into its output directory; the report gathers them into the
stage-timing and reproducibility tables.
"""

from __future__ import annotations

import contextlib
import hashlib
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from .io import write_json

TRACKED_PACKAGES = ("lastmile", "torch", "transformers", "peft", "kfp", "rouge-score")
SUMMARY_FILE = "summary.json"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def stage(name: str, out_dir: str | Path, seed: int | None = None,
          **fields: Any) -> Iterator[dict[str, Any]]:
    """Time a stage; the caller fills the yielded dict; summary.json is written on success."""
    summary: dict[str, Any] = {"stage": name}
    started = time.perf_counter()
    yield summary
    summary.update(fields)
    summary.setdefault("seed", seed)
    if summary.get("base_model") and "base_model_hash" not in summary:
        from .modeling import base_fingerprint

        summary["base_model_hash"] = base_fingerprint(summary["base_model"])
    summary["seconds"] = round(time.perf_counter() - started, 3)
    summary["versions"] = versions()
    write_json(Path(out_dir) / SUMMARY_FILE, summary)
