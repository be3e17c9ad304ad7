"""Small file helpers every stage shares: JSON Lines, JSON summaries, atomic writes."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename onto it only if the block succeeds.

    A reader never sees a half-written file, and a failure leaves the old file untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give what open() would
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open_text(path: Path, mode: str, gz: bool | None = None):
    if path.suffix == ".gz" if gz is None else gz:
        return gzip.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def read_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Yield one dict per non-empty line; a bad line raises naming the file and line number."""
    path = Path(path)
    with _open_text(path, "r") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None


def is_valid_unicode(text: str) -> bool:
    """False for a str holding a lone surrogate: Python strings can (json.loads makes one from
    an escaped "\\ud800"), but UTF-8 files and the tokenizers cannot."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _dumps(obj: Any, **kwargs: Any) -> str:
    """JSON text UTF-8 can encode: non-ASCII stays readable, but an object holding a lone
    surrogate (json.loads makes one from an escaped "\\ud800") is written with ASCII escapes,
    valid JSON that reads back to the same string, where writing it raw would raise."""
    text = json.dumps(obj, ensure_ascii=False, **kwargs)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, **kwargs)
    return text


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows atomically; returns how many were written. A row holding a lone surrogate
    is written with ASCII escapes (see `_dumps`) instead of failing the whole file."""
    path = Path(path)
    n = 0
    with atomic_path(path) as tmp:
        with _open_text(tmp, "w", gz=path.suffix == ".gz") as f:
            for row in rows:
                line = json.dumps(row, ensure_ascii=False) + "\n"
                try:
                    f.write(line)  # the text layer encodes the whole line before writing any
                except UnicodeEncodeError:
                    f.write(json.dumps(row, ensure_ascii=True) + "\n")
                n += 1
    return n


def write_reproducible_jsonl_gz(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """JSON Lines in gzip that is byte-identical for the same rows (no file name, mtime 0 in
    the header): the bundled datasets' format, so a rebuild can be checked by its sha256."""
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
            gz.write(lines.encode("utf-8"))


def sha256_file(path: str | os.PathLike) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(_dumps(obj, indent=2, default=_json_default) + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ----------------------------------------------------------------------------- disk space

class DiskSpaceError(OSError):
    """Not enough free disk space for a write; the message gives needed and free sizes."""


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; binary units, one decimal (bytes as an integer)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _existing_ancestor(path: Path) -> Path:
    """`path` or its nearest ancestor that exists (the filesystem a new file would land on)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def ensure_free_space(path: str | os.PathLike, needed_bytes: int, what: str,
                      hint: str = "") -> int:
    """Raise DiskSpaceError unless the filesystem holding `path` (which need not exist yet) has
    at least `needed_bytes` free; returns the free bytes. Call before a large write, so a full
    disk fails at once with a clear message instead of leaving a truncated file."""
    import errno
    import shutil

    probe = _existing_ancestor(Path(path))
    free = shutil.disk_usage(probe).free
    if needed_bytes > free:
        raise DiskSpaceError(
            errno.ENOSPC,
            f"not enough disk space for {what}: need {human_bytes(needed_bytes)}, "
            f"{human_bytes(free)} free on the filesystem of {probe}"
            + (f" ({hint})" if hint else ""))
    return free
