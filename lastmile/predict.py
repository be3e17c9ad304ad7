"""`lastmile predict`: the trained model on new inputs, as the pipeline's generate stage runs it.

The model is an export (`lastmile export`; its lastmile.json says how to prompt and decode)
or a run (local or s3://; its RL adapter, prompted and decoded as the run's configuration says).
Everything that decides a prediction is the pipeline's own code: the prompt is
`data.format_prompt` of the stripped input, the model is `generate.load_variant` (LoRA merged
into the base, cast to the run's generation precision), decoding is `generate.generate_texts`
(greedy, at most max_new_tokens), and `--postprocess` is `postprocess.clean`. Rows go through
in windows of batch_size * window_batches, each sorted by prompt length into batches, as the
generate stage forms them: the same input file gives the pipeline's predictions exactly.

Inputs: JSON Lines / JSON / CSV / Parquet (`data.read_file`), text in a named column and an
optional `id` column (else the row's 1-based number). Output: JSON Lines
{id, input, prediction} (and raw_prediction with --postprocess), written atomically.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import export

log = logging.getLogger(__name__)


class PredictError(ValueError):
    """Bad input for predict; the message names the file, row, column or flag."""


@dataclass
class LoadedModel:
    model: Any  # modeling.AdapterModel
    tokenizer: Any
    adapter: str | None  # None: merged (or no adapter); else the adapter to activate
    settings: dict[str, Any]  # lastmile.json's prompt and generation sections
    description: str


# ----------------------------------------------------------------------------- the model

def read_settings(export_dir: Path) -> dict[str, Any]:
    path = export_dir / export.SETTINGS_FILE
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise PredictError(f"{path}: cannot read the export's settings ({e})") from None
    if settings.get("format") != export.EXPORT_FORMAT:
        raise PredictError(f"{path}: format {settings.get('format')!r}, expected "
                           f"{export.EXPORT_FORMAT!r}")
    return settings


def model_source(model: str) -> tuple[str, str | None, dict[str, Any], dict[str, Any]]:
    """(base source, adapter dir or None, base options, settings) for an export or a run."""
    path = Path(model).expanduser()
    if not model.startswith("s3://") and (path / export.SETTINGS_FILE).is_file():
        settings = read_settings(path)
        base = settings["base_model"]
        options = {"allow_pickle": bool(base.get("allow_pickle")),
                   "trust_remote_code": bool(base.get("trust_remote_code"))}
        if settings.get("merged"):  # the directory is the whole model
            return str(path), None, options, settings
        export.check_base(base["source"], base.get("hash"), f"export {model}")
        return base["source"], str(path / settings.get("adapter", ".")), options, settings
    files = export.locate_run(model)
    adapter = files.adapter("rl")
    export.check_base(files.base_model, files.summaries.get("train_ppo", {}).get(
        "base_model_hash"), f"run {model}")
    options = {"allow_pickle": bool(files.config.get("allow_pickle")),
               "trust_remote_code": bool(files.config.get("trust_remote_code"))}
    return files.base_model, str(adapter), options, export.settings_from_config(files.config)


def load_model(model: str, precision: str | None = None) -> LoadedModel:
    """The model as the pipeline's generate stage holds it: merged unless the base is
    quantized, on the default device, cast to the generation precision."""
    from .generate import load_variant
    from .modeling import cast_for_decoding, resolve_precision
    from .train_utils import default_device

    base, adapter_dir, options, settings = model_source(model)
    precision = precision or settings["generation"]["precision"]
    precision = resolve_precision(precision, what="--precision")
    settings["generation"]["precision"] = precision
    lm, tokenizer, adapter = load_variant(base, adapter_dir, **options)
    lm.to(default_device())
    if adapter is None:  # one dense model to decode from, as in generate_predictions
        cast_for_decoding(lm.base, precision)
    what = f"{model} (base {base}" + (f", adapter {adapter_dir})" if adapter_dir else ")")
    return LoadedModel(lm, tokenizer, adapter, settings, what)


# ----------------------------------------------------------------------------- the inputs

_REASONS = {"missing_column": "missing", "null": "null", "non_string": "not text",
            "empty": "empty", "invalid_unicode": "not valid Unicode"}


def read_inputs(path: str | os.PathLike, column: str) -> list[dict[str, str]]:
    """[{id, input}] from a JSON Lines / JSON / CSV / Parquet file; the first unusable row is
    an error naming the file, its line or row and the column."""
    from .data import DataError, bad_reason, read_file

    path = Path(path)
    try:
        part = read_file(path)
    except DataError as e:
        raise PredictError(str(e)) from None
    if column not in part.columns:
        raise PredictError(f"--input-column {column!r} not found in {path}; its columns are: "
                           f"{', '.join(map(str, part.columns)) or '(none)'}")
    rows = []
    for index, (number, record) in enumerate(part.records, start=1):
        reason = bad_reason(record, column)
        if reason is not None:
            raise PredictError(f"{path}: {part.unit} {number}: column {column!r} is "
                               f"{_REASONS[reason]}")
        rid = record.get("id")
        rows.append({"id": index if rid is None else rid, "input": record[column].strip()})
    return rows


# ----------------------------------------------------------------------------- predicting

def check_flags(batch_size: int | None, max_new_tokens: int | None) -> None:
    for flag, value in (("--batch-size", batch_size), ("--max-new-tokens", max_new_tokens)):
        if value is not None and value < 1:
            raise PredictError(f"{flag} must be >= 1, got {value}")


def predict_rows(loaded: LoadedModel, rows: list[dict[str, Any]], *, postprocess: bool = False,
                 batch_size: int | None = None, max_new_tokens: int | None = None):
    """Yield output rows in input order, one window at a time (see the module docstring)."""
    from .config import GenerateConfig
    from .data import format_prompt
    from .generate import generate_texts
    from .modeling import encode_prompts
    from .postprocess import clean
    from .train_utils import chunked, progress

    check_flags(batch_size, max_new_tokens)
    gen = loaded.settings["generation"]
    cfg = GenerateConfig(
        max_new_tokens=gen["max_new_tokens"] if max_new_tokens is None else max_new_tokens,
        batch_size=gen["batch_size"] if batch_size is None else batch_size, do_sample=False,
        precision=gen["precision"], window_batches=gen["window_batches"])
    instruction = loaded.settings["prompt"]["instruction"]
    tok = loaded.tokenizer
    bar = progress(len(rows), "predict", unit="row")
    try:
        for window in chunked(rows, cfg.batch_size * cfg.window_batches):
            prompts = [format_prompt(tok, instruction, r["input"]) for r in window]
            lengths = [len(ids) for ids in encode_prompts(tok, prompts)]
            texts: list[str] = [""] * len(window)
            # generate_texts sorts by the same key (stably), so these are the stage's batches.
            order = sorted(range(len(window)), key=lambda i: lengths[i])
            for batch in chunked(order, cfg.batch_size):
                out = generate_texts(loaded.model, tok, [prompts[i] for i in batch],
                                     loaded.adapter, cfg)
                for i, text in zip(batch, out):
                    texts[i] = text
                bar.update(len(batch))
            for row, text in zip(window, texts):
                result = {"id": row["id"], "input": row["input"], "prediction": text}
                if postprocess:
                    result = {**result, "prediction": clean(text), "raw_prediction": text}
                yield result
    finally:
        bar.close()


def too_long(loaded: LoadedModel, rows: list[dict[str, Any]]) -> int:
    """Rows whose prompt is longer than the run's max_input_tokens (filtered out of training
    and evaluation there; predicted anyway here, with a warning)."""
    from .data import format_prompt, prompt_lengths

    limit = loaded.settings["prompt"].get("max_input_tokens")
    if not limit:
        return 0
    instruction = loaded.settings["prompt"]["instruction"]
    prompts = [format_prompt(loaded.tokenizer, instruction, r["input"]) for r in rows]
    return sum(n > limit for n in prompt_lengths(loaded.tokenizer, prompts))


def predict_file(model: str, input_path: str | os.PathLike, out_path: str | os.PathLike, *,
                 input_column: str = "input", postprocess: bool = False,
                 batch_size: int | None = None, max_new_tokens: int | None = None,
                 precision: str | None = None) -> dict[str, Any]:
    """`lastmile predict`: read, check, predict, write. Returns a summary."""
    import time

    from .io import atomic_path

    check_flags(batch_size, max_new_tokens)  # bad input fails before the model loads
    rows = read_inputs(input_path, input_column)
    started = time.perf_counter()
    loaded = load_model(model, precision)
    long_rows = too_long(loaded, rows)
    if long_rows:
        log.warning("%d of %d inputs are longer than %d prompt tokens, the run's "
                    "max_input_tokens: the model was not trained or evaluated on such inputs",
                    long_rows, len(rows), loaded.settings["prompt"]["max_input_tokens"])
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in predict_rows(loaded, rows, postprocess=postprocess, batch_size=batch_size,
                                max_new_tokens=max_new_tokens):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"rows": len(rows), "model": loaded.description, "too_long": long_rows,
            "load_seconds": round(load_seconds, 2),
            "seconds": round(time.perf_counter() - started, 2)}
