"""Object storage: task data, base models and published results in MinIO / SeaweedFS / S3.

Users keep task data and models in the cluster's object store (Kubeflow's default) and
schedule retraining when new data lands there, so `s3://bucket/key` and `s3://bucket/prefix/`
work wherever a local path does:

  * `fetch_task_data` - one object, or every JSON Lines / JSON / CSV / Parquet object under a
    prefix, sorted by key (a scheduled run sees the files added since the last run);
  * `fetch_model`     - a prefix holding a Hugging Face model directory or a GGUF file, into
    a local cache keyed by the objects' ETags (a second run downloads nothing); pickle-based
    weights are refused unless asked for, since unpickling runs code;
  * `fetch_file`      - one object to a local path (e.g. a BLEURT checkpoint archive);
  * `publish`         - a run's adapters, scores and report under `<prefix>/<run_name>/`;
    `read_published`, `read_manifest` and `list_runs` read them back;
  * `list_objects`, `upload_file`, `delete_objects` - small blocks for callers with their own
    layout under a prefix (training checkpoints: `lastmile.checkpoint`).

Guarantees (docs/storage.md has the user-facing version):
  * Streaming: objects go to disk in 1 MiB chunks (uploads through `fput_object`), so a
    multi-GB model never sits in memory.
  * Retries: connection errors, timeouts and 5xx answers are retried with exponential backoff
    and jitter; a download resumes at the byte it reached (HTTP Range, with If-Match on the
    ETag so a replaced object is never spliced). 403/404 are final.
  * Checked bytes: a download's MD5 is compared with the object's ETag where the ETag is an
    MD5, a published file's sha256 with the run manifest's, and a cache hit re-hashes its files
    against the sha256 recorded when they were downloaded; a mismatch is an error naming the
    object, and the bad copy is never returned.
  * A shared cache: many processes (pods on one ReadWriteMany volume) can use one cache
    directory. Each entry has a lock file (`lastmile.cachelock`): exclusive while it is
    downloaded (so exactly one process downloads it, into `<entry>.partial-<random>`, which
    only the lock's holder may delete), shared while a process uses it, and a superseded
    version of the same source and variant is deleted only when no process holds it.
  * Atomic publish: a `_PUBLISHING` claim is created with `If-None-Match: *` (one publisher
    per run name), every file is uploaded, then the `_COMPLETE` object holding the manifest
    (paths, sizes, ETags, sha256) is written last, conditionally too; readers ignore runs
    without it. Multipart uploads retry per part and are aborted when they fail.
  * Disk space: a download checks the free space of its destination first
    (`io.ensure_free_space`), so a full disk fails at once with the sizes and the fix.
  * Secrets: credentials come from the environment only and never appear in a log line, an
    error message or a repr (`redact`).

The store's settings are process environment, not pipeline configuration, so they live here
(`S3Config.from_env`) rather than in `lastmile.config`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import http.client
import json
import logging
import os
import random
import re
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping, TypeVar
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.datatypes import Part
from minio.error import InvalidResponseError, S3Error, ServerError

from . import cachelock
from .io import ensure_free_space

log = logging.getLogger(__name__)

T = TypeVar("T")

# ----------------------------------------------------------------------------- environment

#: Endpoint variables, first set wins. A value is `http(s)://host[:port]` or a bare `host[:port]`.
ENDPOINT_VARS = ("LASTMILE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL",
                 "S3_ENDPOINT_URL", "MINIO_ENDPOINT")
#: (access key, secret key) variable pairs, first pair whose access key is set wins. The last
#: pair are the key names of Kubeflow's `mlpipeline-minio-artifact` Secret, as they appear when
#: the Secret is mounted with `envFrom`; `use_secret_as_env` usually maps them to AWS_*.
CREDENTIAL_VARS = (
    ("LASTMILE_S3_ACCESS_KEY", "LASTMILE_S3_SECRET_KEY"),
    ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
    ("MINIO_ACCESS_KEY", "MINIO_SECRET_KEY"),
    ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"),
    ("accesskey", "secretkey"),
)
#: A directory holding files `accesskey` and `secretkey`: the same Secret mounted as a volume
#: (`kfp.kubernetes.use_secret_as_volume`). Takes precedence over the variables above.
CREDENTIALS_DIR_VAR = "LASTMILE_S3_CREDENTIALS_DIR"
SESSION_TOKEN_VARS = ("LASTMILE_S3_SESSION_TOKEN", "AWS_SESSION_TOKEN")
REGION_VARS = ("LASTMILE_S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION")
SECURE_VAR = "LASTMILE_S3_SECURE"
CA_BUNDLE_VARS = ("LASTMILE_S3_CA_BUNDLE", "AWS_CA_BUNDLE", "SSL_CERT_FILE")
#: Tuning variables -> (S3Config field, type). Short defaults keep failures quick to surface.
TUNING_VARS = {
    "LASTMILE_S3_CONNECT_TIMEOUT": ("connect_timeout", float),
    "LASTMILE_S3_READ_TIMEOUT": ("read_timeout", float),
    "LASTMILE_S3_RETRIES": ("retries", int),
    "LASTMILE_S3_BACKOFF": ("backoff", float),
    "LASTMILE_S3_MAX_BACKOFF": ("max_backoff", float),
}
DEFAULT_ENDPOINT = "s3.amazonaws.com"

TASK_DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")
WEIGHT_SUFFIXES = (".safetensors", ".gguf")
#: Weights stored with pickle: loading them can execute arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: Object written last by `publish`; its body is the run's manifest.
MARKER = "_COMPLETE"
#: Object a publisher creates first (only if absent): one publish per run name at a time.
CLAIM = "_PUBLISHING"
#: A claim older than this (seconds) belongs to a publish that died, and is taken over.
CLAIM_STALE_S = 900.0
MANIFEST_FORMAT = "lastmile-run/1"
#: File inside a local cache entry, written just before the entry is renamed into place.
LOCAL_MARKER = ".lastmile-complete"
CHUNK = 1 << 20
#: Uploads above this size go in parts of this size, each retried on its own (S3 allows
#: 10,000 parts, so parts grow for files over 80 GB).
PART_SIZE = 8 << 20

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class StorageError(Exception):
    """An object-store operation failed. The message names the URI and never a credential.

    `kind` lets callers branch without parsing text: one of "config", "unreachable",
    "access-denied", "no-such-bucket", "no-such-key", "empty-prefix", "unsupported-format",
    "server", "changed", "checksum", "conflict", "not-published", "local".
    """

    def __init__(self, message: str, *, kind: str, uri: str | None = None):
        super().__init__(redact(message))
        self.kind = kind
        self.uri = uri


@dataclass(frozen=True)
class S3Config:
    """Where the store is and how to talk to it. Secrets are excluded from repr()."""

    endpoint: str = DEFAULT_ENDPOINT  # host[:port], no scheme
    secure: bool = True
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    region: str | None = None
    credentials_from: str = "none"  # the variable names that supplied the keys, never values
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    retries: int = 4  # extra attempts after the first, per operation (reset by progress)
    backoff: float = 0.5  # seconds before the first retry; doubles each time
    max_backoff: float = 20.0
    ca_bundle: str | None = None

    def __post_init__(self) -> None:
        _remember_secrets(self.access_key, self.secret_key, self.session_token)

    @property
    def url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "S3Config":
        """Read the settings from environment variables (docs/storage.md lists them)."""
        env = os.environ if env is None else env
        endpoint_var, raw = _first_set(env, ENDPOINT_VARS)
        endpoint, scheme_secure = _parse_endpoint(raw or DEFAULT_ENDPOINT, endpoint_var)
        secure = _resolve_secure(scheme_secure, env.get(SECURE_VAR), endpoint_var)
        access, secret, source = _credentials(env)
        _, token = _first_set(env, SESSION_TOKEN_VARS)
        _, region = _first_set(env, REGION_VARS)
        if region is None and not endpoint.endswith("amazonaws.com"):
            region = "us-east-1"  # MinIO/SeaweedFS default; spares a GetBucketLocation call
        _, ca = _first_set(env, CA_BUNDLE_VARS)
        tuning = {name: _parse_number(env[var], var, kind)
                  for var, (name, kind) in TUNING_VARS.items() if env.get(var, "").strip()}
        return cls(endpoint=endpoint, secure=secure, access_key=access, secret_key=secret,
                   session_token=token, region=region, credentials_from=source,
                   ca_bundle=ca, **tuning)


def _first_set(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str | None, str | None]:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return name, value
    return None, None


def _parse_endpoint(raw: str, var: str | None) -> tuple[str, bool | None]:
    """`http(s)://host[:port]` -> (host:port, secure); a bare `host[:port]` -> (host:port, None)."""
    where = var or "default endpoint"
    if "://" not in raw:
        if "/" in raw or "@" in raw:
            raise StorageError(f"{where}: expected host[:port] or http(s)://host[:port]",
                               kind="config")
        return raw, None
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https"):
        raise StorageError(f"{where}: scheme must be http:// or https://, not {parts.scheme}://",
                           kind="config")
    if parts.username or parts.password:
        raise StorageError(f"{where}: put credentials in their own variables, not in the URL",
                           kind="config")
    if parts.path not in ("", "/") or parts.query or not parts.netloc:
        raise StorageError(f"{where}: expected {parts.scheme}://host[:port] with no path",
                           kind="config")
    return parts.netloc, parts.scheme == "https"


def _resolve_secure(scheme_secure: bool | None, flag: str | None, var: str | None) -> bool:
    """TLS from the URL scheme or LASTMILE_S3_SECURE; both given and disagreeing is an error."""
    flag_secure = None
    if flag is not None and flag.strip():
        value = flag.strip().lower()
        if value not in _TRUE | _FALSE:
            raise StorageError(f"{SECURE_VAR}={flag!r}: expected 1/0, true/false", kind="config")
        flag_secure = value in _TRUE
    if scheme_secure is not None and flag_secure is not None and scheme_secure != flag_secure:
        raise StorageError(f"{var} says {'https' if scheme_secure else 'http'} but "
                           f"{SECURE_VAR}={flag}: make them agree", kind="config")
    for choice in (scheme_secure, flag_secure):
        if choice is not None:
            return choice
    return True


def _credentials(env: Mapping[str, str]) -> tuple[str | None, str | None, str]:
    """(access key, secret key, where they came from); (None, None, "none") is anonymous."""
    secret_dir = env.get(CREDENTIALS_DIR_VAR, "").strip()
    if secret_dir:
        files = [Path(secret_dir) / "accesskey", Path(secret_dir) / "secretkey"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise StorageError(f"{CREDENTIALS_DIR_VAR}: missing {', '.join(missing)}",
                               kind="config")
        access, secret = (f.read_text(encoding="utf-8").strip() for f in files)
        return access, secret, f"{CREDENTIALS_DIR_VAR}/{{accesskey,secretkey}}"
    for access_var, secret_var in CREDENTIAL_VARS:
        access = env.get(access_var, "").strip()
        if not access:
            continue
        secret = env.get(secret_var, "").strip()
        if not secret:
            raise StorageError(f"{access_var} is set but {secret_var} is not", kind="config")
        return access, secret, f"{access_var}/{secret_var}"
    return None, None, "none"


def _parse_number(raw: str, var: str, kind: type) -> Any:
    try:
        value = kind(raw.strip())
    except ValueError:
        raise StorageError(f"{var}={raw!r}: expected a {kind.__name__}", kind="config") from None
    if value < 0:
        raise StorageError(f"{var}={raw!r}: must not be negative", kind="config")
    return value


# ----------------------------------------------------------------------------- redaction

_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()
# Signed URLs and Authorization headers carry the access key and signatures.
_SIGNED_PARTS = re.compile(
    r"((?:X-Amz-(?:Credential|Signature|Security-Token)=)|(?:Credential=)|(?:Signature=))"
    r"[^&\s,'\"]+", re.IGNORECASE)


def _remember_secrets(*values: str | None) -> None:
    with _SECRETS_LOCK:
        _SECRETS.update(v for v in values if v)


def _env_secret_values(env: Mapping[str, str] | None = None) -> set[str]:
    """Every credential value configured in the environment, under any accepted name."""
    env = os.environ if env is None else env
    names = [n for pair in CREDENTIAL_VARS for n in pair] + list(SESSION_TOKEN_VARS)
    values = {env[n].strip() for n in names if env.get(n, "").strip()}
    secret_dir = env.get(CREDENTIALS_DIR_VAR, "").strip()
    for name in ("accesskey", "secretkey") if secret_dir else ():
        try:
            values.add((Path(secret_dir) / name).read_text(encoding="utf-8").strip())
        except OSError:
            pass
    return {v for v in values if v}


def redact(text: str, config: S3Config | None = None) -> str:
    """Replace every configured access key, secret key and session token with '***'."""
    with _SECRETS_LOCK:
        values = set(_SECRETS)
    values |= _env_secret_values()
    if config is not None:
        values |= {v for v in (config.access_key, config.secret_key, config.session_token) if v}
    for value in sorted(values, key=len, reverse=True):  # longest first: no partial leftovers
        text = text.replace(value, "***")
    return _SIGNED_PARTS.sub(r"\1***", text)


class _RedactingFilter(logging.Filter):
    """Every record of this module's logger passes through `redact` before any handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


log.addFilter(_RedactingFilter())


# ----------------------------------------------------------------------------- URIs

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str  # "" or ending in "/" for a prefix

    @property
    def is_prefix(self) -> bool:
        return self.key == "" or self.key.endswith("/")

    def child(self, rel: str) -> "S3Uri":
        return S3Uri(self.bucket, self.key + rel)

    def as_prefix(self) -> "S3Uri":
        return self if self.is_prefix else S3Uri(self.bucket, self.key + "/")

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def is_s3_uri(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("s3://")


def parse_uri(uri: str) -> S3Uri:
    """`s3://bucket/key`, `s3://bucket/prefix/` or `s3://bucket` (the whole bucket)."""
    if not is_s3_uri(uri):
        raise StorageError(f"{uri!r}: not an s3:// URI", kind="config", uri=str(uri))
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise StorageError(f"{uri}: {bucket!r} is not a valid bucket name (3-63 characters: "
                           "lower-case letters, digits, '.', '-')", kind="config", uri=uri)
    return S3Uri(bucket, key)


# ----------------------------------------------------------------------------- transfer stats

@dataclass
class TransferStats:
    """Bytes and objects moved by this process; `transfer_stats()` returns a snapshot."""

    bytes_downloaded: int = 0
    objects_downloaded: int = 0
    bytes_uploaded: int = 0
    objects_uploaded: int = 0
    cache_hits: int = 0  # objects served from the local cache

    def __sub__(self, other: "TransferStats") -> "TransferStats":
        return TransferStats(*(getattr(self, f.name) - getattr(other, f.name)
                               for f in dataclasses.fields(self)))


_STATS = TransferStats()
_STATS_LOCK = threading.Lock()


def transfer_stats() -> TransferStats:
    with _STATS_LOCK:
        return dataclasses.replace(_STATS)


def _count(**deltas: int) -> None:
    with _STATS_LOCK:
        for name, delta in deltas.items():
            setattr(_STATS, name, getattr(_STATS, name) + delta)


Progress = Callable[[str, int, int], None]  # (key, bytes done, object size)


# ----------------------------------------------------------------------------- public API

def fetch_task_data(uri: str, cache_dir: str | os.PathLike | None = None, *,
                    config: S3Config | None = None,
                    progress: Progress | None = None) -> list[Path]:
    """Local copies of the task data at `uri`, in key order.

    A key names one object; a prefix means every object under it whose name ends in one of
    TASK_DATA_SUFFIXES (others are skipped and logged). Each object is cached by (bucket, key,
    ETag), so objects added since the last run are downloaded and the rest are not.
    """
    cfg, s3, client = _open(uri, config)
    objects, prefix = _objects_at(client, cfg, s3)
    if prefix is None:
        if not _is_task_data(objects[0].key):
            raise StorageError(f"{s3}: not a supported task data format (expected a name "
                               f"ending in {', '.join(TASK_DATA_SUFFIXES)})",
                               kind="unsupported-format", uri=str(s3))
        chosen = objects
    else:
        chosen = [o for o in objects if _is_task_data(o.key)]
        skipped = [o.key for o in objects if not _is_task_data(o.key)]
        if not chosen:
            raise StorageError(
                f"{s3}: none of the {len(objects)} objects under this prefix is task data "
                f"({', '.join(TASK_DATA_SUFFIXES)}); found e.g. {', '.join(skipped[:5])}",
                kind="unsupported-format", uri=str(s3))
        if skipped:
            log.info("%s: skipping %d objects that are not task data: %s", s3, len(skipped),
                     ", ".join(skipped[:10]))
    root = _cache_root(cache_dir)
    paths = []
    for obj in chosen:
        name = PurePosixPath(obj.key).name
        entry = root / "objects" / _slug(s3.bucket, obj.key) / _digest([(name, obj)])
        paths.append(_materialize(client, cfg, s3.bucket, entry, [(obj, name)], progress) / name)
    log.info("%s: %d task data file(s) ready under %s", s3, len(paths), root / "objects")
    return paths


def fetch_model(uri: str, cache_dir: str | os.PathLike | None = None, *,
                allow_pickle: bool = False, config: S3Config | None = None,
                progress: Progress | None = None) -> Path:
    """A local directory holding the model at `uri` (a prefix, or one .gguf/.safetensors key).

    Cached under a digest of the sorted (path, ETag, size) list, so an unchanged model is
    never downloaded twice. Pickle-based weights (PICKLE_SUFFIXES) are skipped when
    safetensors/GGUF weights sit beside them, and refused when they are the only weights,
    unless `allow_pickle=True`. A selection that includes pickle files is its own variant of
    the source (`pickle-<digest>`): fetching one variant never prunes the other.
    """
    cfg, s3, client = _open(uri, config)
    objects, prefix = _objects_at(client, cfg, s3)
    if prefix is None:
        files = [(objects[0], PurePosixPath(objects[0].key).name)]
    else:
        files = [(o, _safe_rel(o.key[len(prefix):], s3, o.key)) for o in objects]
    files = _select_model_files(files, allow_pickle, s3)
    variant = "pickle" if any(rel.lower().endswith(PICKLE_SUFFIXES) for _, rel in files) else ""
    entry = (_cache_root(cache_dir) / "models" / _slug(s3.bucket, prefix or s3.key)
             / _entry_name(variant, _digest([(rel, o) for o, rel in files])))
    return _materialize(client, cfg, s3.bucket, entry, files, progress)


def fetch_file(uri: str, dest: str | os.PathLike, *, config: S3Config | None = None,
               progress: Progress | None = None) -> Path:
    """Download one object to `dest` (a file path, or an existing directory to put it in).

    The object is streamed into `<dest>.partial-<pid>-<thread>` and renamed onto `dest`, so
    `dest` is either the whole object or untouched. No cache: use fetch_model for directories.
    """
    cfg, s3, client = _open(uri, config)
    if s3.is_prefix:
        raise StorageError(f"{s3}: names a prefix; fetch_file downloads one object "
                           "(use fetch_model for a directory)", kind="config", uri=str(s3))
    obj = _stat(client, cfg, s3)
    if obj is None:
        raise _no_such_key(client, cfg, s3)
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / PurePosixPath(s3.key).name
    ensure_free_space(dest.parent, obj.size, f"{s3} in {dest.parent}",
                      hint="choose a destination on a larger disk")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}{_partial_suffix()}")
    try:
        _download(client, cfg, s3.bucket, obj, tmp, progress)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def publish(local_dir: str | os.PathLike, uri_prefix: str, run_name: str, *,
            config: S3Config | None = None, metadata: Mapping[str, Any] | None = None,
            owner: str | None = None, stale_claim_after: float = CLAIM_STALE_S) -> str:
    """Upload every file under `local_dir` to `<uri_prefix>/<run_name>/`; returns that URI.

    Atomic from a reader's view, and one winner per run name:
      1. a `_PUBLISHING` claim is created only if absent (`If-None-Match: *`); a second
         publisher of the same run name gets a "conflict" error before it uploads anything.
         A claim older than `stale_claim_after` seconds, or one made with the same `owner`
         (e.g. the KFP run and task, so that a retry of a killed publish step goes on), is
         taken over with `If-Match` on its ETag;
      2. leftovers of an interrupted attempt (files without a marker, incomplete multipart
         uploads) are deleted, then the files are uploaded with their sha256;
      3. the `_COMPLETE` marker holding the manifest is written last, only if absent, and the
         claim is deleted.
    A run that has its marker is never overwritten. `metadata` (JSON values, e.g. the run's
    input fingerprint) is stored in the manifest under "metadata".
    """
    src = Path(local_dir)
    if not src.is_dir():
        raise StorageError(f"publish: {src} is not a directory", kind="local")
    _check_run_name(run_name)
    if metadata is not None:
        try:
            metadata = json.loads(json.dumps(dict(metadata), allow_nan=False))
        except (TypeError, ValueError) as e:
            raise StorageError(f"publish: metadata is not plain JSON ({e})", kind="local") from None
    cfg, base, client = _open(uri_prefix, config)
    run = base.as_prefix().child(run_name + "/")
    files = sorted(p for p in src.rglob("*") if p.is_file())
    if not files:
        raise StorageError(f"publish: {src} holds no files", kind="local", uri=str(run))
    for reserved in (MARKER, CLAIM):
        if (src / reserved).exists():
            raise StorageError(f"publish: {src / reserved} would collide with the publish "
                               "markers", kind="local", uri=str(run))
    _refuse_if_published(client, cfg, run)
    claim = _claim_run(client, cfg, run, owner, stale_claim_after)
    try:
        _refuse_if_published(client, cfg, run)  # finished by someone between the two checks
        _delete_all(client, cfg, run, keep={run.child(CLAIM).key})
        _abort_incomplete_uploads(client, cfg, run)
        entries = [_upload(client, cfg, run, path, path.relative_to(src).as_posix())
                   for path in files]
        manifest = {"format": MANIFEST_FORMAT, "run_name": run_name, "files": entries,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        if metadata is not None:
            manifest["metadata"] = metadata
        body = json.dumps(manifest, indent=2).encode()
        marker = run.child(MARKER)
        if _read_claim(client, cfg, run) != claim:
            raise StorageError(f"{run}: another publish took this run name over while this one "
                               "was uploading (its claim was stale); nothing was marked "
                               "complete by this attempt", kind="conflict", uri=str(run))
        if not _put_if_absent(client, cfg, marker, body, "application/json",
                              "writing the completion marker"):
            raise StorageError(f"{run}: already published by another attempt (it wrote "
                               f"{MARKER} first); runs are immutable, choose another run name",
                               kind="conflict", uri=str(run))
    except BaseException:
        _abandon(client, cfg, run, claim)
        raise
    _release_claim(client, cfg, run, claim)
    log.info("published %d file(s), %.1f MB, to %s", len(entries),
             sum(e["size"] for e in entries) / 1e6, run)
    return str(run)


def _refuse_if_published(client: Minio, cfg: S3Config, run: S3Uri) -> None:
    if _stat(client, cfg, run.child(MARKER)) is not None:
        raise StorageError(f"{run}: already published (it has {MARKER}); runs are immutable, "
                           "choose another run name", kind="conflict", uri=str(run))


def _claim_run(client: Minio, cfg: S3Config, run: S3Uri, owner: str | None,
               stale_after: float) -> dict[str, Any]:
    """Create `<run>/_PUBLISHING` if absent (or take over a stale one); returns its body."""
    claim = {"attempt": secrets.token_hex(8), "host": socket.gethostname(),
             "pid": os.getpid(), "owner": owner,
             "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    body = json.dumps(claim).encode()
    target = run.child(CLAIM)
    if _put_if_absent(client, cfg, target, body, "application/json", "claiming the run name"):
        return claim
    current = _stat_full(client, cfg, target)
    held = _read_claim(client, cfg, run)
    if current is None or held is None:  # released meanwhile: try once more
        if _put_if_absent(client, cfg, target, body, "application/json",
                          "claiming the run name"):
            return claim
        raise StorageError(f"{run}: another publish of this run name started at the same "
                           "moment", kind="conflict", uri=str(run))
    etag, modified = current
    age = (_dt.datetime.now(_dt.timezone.utc) - modified).total_seconds()
    same_owner = owner is not None and held.get("owner") == owner
    if not same_owner and age < stale_after:
        raise StorageError(
            f"{run}: another publish of this run name is in progress (attempt "
            f"{held.get('attempt')} on {held.get('host')}, pid {held.get('pid')}, "
            f"{age:.0f} s ago); choose another run name, or if that publish died, run again "
            f"after {stale_after:.0f} s (its claim is then taken over)",
            kind="conflict", uri=str(run))
    log.warning("%s: taking over the claim of publish attempt %s (%s, %.0f s old)", run,
                held.get("attempt"), "same owner" if same_owner else "stale", age)
    if not _put_if_match(client, cfg, target, body, etag):
        raise StorageError(f"{run}: another publish took over the same stale claim first",
                           kind="conflict", uri=str(run))
    return claim


def _read_claim(client: Minio, cfg: S3Config, run: S3Uri) -> dict[str, Any] | None:
    try:
        return json.loads(_get_bytes(client, cfg, run.child(CLAIM), "reading the claim"))
    except StorageError as e:
        if e.kind == "no-such-key":
            return None
        raise
    except ValueError:
        return {}


def _abandon(client: Minio, cfg: S3Config, run: S3Uri, claim: dict[str, Any]) -> None:
    """A publish failed: if the run is still ours, delete what this attempt uploaded (no
    marker, so readers never saw it) and our claim. Best effort, never raises: what is left
    is cleaned by the next attempt."""
    try:
        if _read_claim(client, cfg, run) != claim:
            return  # taken over by another attempt: its files, not ours to touch
        if _stat(client, cfg, run.child(MARKER)) is None:  # else: published by another
            _abort_incomplete_uploads(client, cfg, run)
            _delete_all(client, cfg, run, keep={run.child(CLAIM).key})
    except Exception as e:  # noqa: BLE001 - the publish's own error is the one to raise
        log.warning("%s: could not clean up after the failed publish (%s); the next attempt "
                    "will", run, e)
    _release_claim(client, cfg, run, claim)


def _release_claim(client: Minio, cfg: S3Config, run: S3Uri, claim: dict[str, Any]) -> None:
    """Delete our claim, if it is still ours; never raises (a stale claim times out)."""
    try:
        if _read_claim(client, cfg, run) == claim:
            target = run.child(CLAIM)
            _retrying(lambda: client.remove_object(target.bucket, target.key), cfg, target,
                      "deleting the claim")
    except Exception as e:  # noqa: BLE001 - cleanup must not hide the real outcome
        log.warning("%s: could not delete the publish claim (%s); it goes stale in %.0f s",
                    run, e, CLAIM_STALE_S)


def read_manifest(uri: str, *, config: S3Config | None = None) -> dict[str, Any]:
    """The manifest of the published run at `uri`; error if it has no `_COMPLETE` marker."""
    cfg, s3, client = _open(uri, config)
    run = s3.as_prefix()
    marker = run.child(MARKER)
    try:
        body = _get_bytes(client, cfg, marker, "reading the run manifest")
    except StorageError as e:
        if e.kind != "no-such-key":
            raise
        raise StorageError(f"{run}: not a complete published run (no {MARKER} marker; its "
                           "upload is still running or was interrupted)",
                           kind="not-published", uri=str(run)) from None
    try:
        manifest = json.loads(body)
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}")
        for entry in manifest["files"]:
            if not isinstance(entry["size"], int) or not isinstance(entry["etag"], str):
                raise ValueError(f"bad entry {entry!r}")
            if "sha256" in entry and not _SHA256.fullmatch(str(entry["sha256"])):
                raise ValueError(f"bad sha256 in {entry!r}")
            _safe_rel(entry["path"], run, entry["path"])
    except StorageError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise StorageError(f"{marker}: not a {MANIFEST_FORMAT} manifest ({e})",
                           kind="unsupported-format", uri=str(marker)) from None
    return manifest


def read_published(uri: str, cache_dir: str | os.PathLike | None = None, *,
                   config: S3Config | None = None, progress: Progress | None = None) -> Path:
    """A local directory holding the published run at `uri`, exactly as its manifest lists it.

    Each file's sha256 is checked against the manifest's (runs published before sha256 was
    recorded are checked by ETag and size), after the download and on every cache hit.
    """
    manifest = read_manifest(uri, config=config)
    cfg, s3, client = _open(uri, config)
    run = s3.as_prefix()
    present = {o.key[len(run.key):]: o for o in _list(client, cfg, run)}
    files, expected = [], {}
    for entry in manifest["files"]:
        obj = present.get(entry["path"])
        if obj is None or obj.etag != _clean_etag(entry["etag"]) or obj.size != entry["size"]:
            raise StorageError(f"{run.child(entry['path'])}: missing or changed since the run "
                               "was published", kind="changed", uri=str(run))
        files.append((obj, entry["path"]))
        if "sha256" in entry:
            expected[entry["path"]] = entry["sha256"]
    entry_dir = (_cache_root(cache_dir) / "runs" / _slug(run.bucket, run.key)
                 / _digest([(rel, o) for o, rel in files]))
    return _materialize(client, cfg, run.bucket, entry_dir, files, progress, expected)


def list_runs(uri_prefix: str, *, config: S3Config | None = None) -> list[str]:
    """Names of the complete published runs directly under `uri_prefix`, sorted."""
    cfg, s3, client = _open(uri_prefix, config)
    prefix = s3.as_prefix()
    runs = set()
    for obj in _list(client, cfg, prefix):
        rel = obj.key[len(prefix.key):]
        name, _, rest = rel.partition("/")
        if rest == MARKER:
            runs.add(name)
    return sorted(runs)


# ----------------------------------------------------------------------------- small objects
#
# Building blocks for callers that keep their own layout under a prefix (training checkpoints,
# `lastmile.checkpoint`): list, upload one file, delete. Same retries and errors as above.

def list_objects(uri_prefix: str, *, config: S3Config | None = None) -> dict[str, int]:
    """{path below the prefix: size} of every object under `uri_prefix`; {} when it is empty
    (unlike fetch_*, an empty prefix is not an error here). A missing bucket raises."""
    cfg, s3, client = _open(uri_prefix, config)
    prefix = s3.as_prefix()
    return {o.key[len(prefix.key):]: o.size for o in _list(client, cfg, prefix)}


def upload_file(path: str | os.PathLike, uri: str, *, config: S3Config | None = None) -> str:
    """Upload the local file `path` to the key `uri` (streamed); returns its ETag."""
    cfg, s3, client = _open(uri, config)
    if s3.is_prefix:
        raise StorageError(f"{s3}: names a prefix; upload_file writes one key", kind="config",
                           uri=str(s3))
    path = Path(path)
    if not path.is_file():
        raise StorageError(f"upload: {path} is not a file", kind="local", uri=str(s3))
    return _upload(client, cfg, S3Uri(s3.bucket, ""), path, s3.key)["etag"]


def delete_objects(uri_prefix: str, paths: list[str], *,
                   config: S3Config | None = None) -> None:
    """Delete `paths` (below `uri_prefix`) in the order given; a missing one is not an error."""
    cfg, s3, client = _open(uri_prefix, config)
    prefix = s3.as_prefix()
    for rel in paths:
        target = prefix.child(rel)
        _retrying(lambda: client.remove_object(target.bucket, target.key), cfg, target,
                  "deleting")


# ----------------------------------------------------------------------------- selection

@dataclass(frozen=True)
class _Obj:
    key: str
    etag: str
    size: int


def _is_task_data(key: str) -> bool:
    return key.lower().endswith(TASK_DATA_SUFFIXES)


def _select_model_files(files: list[tuple[_Obj, str]], allow_pickle: bool,
                        uri: S3Uri) -> list[tuple[_Obj, str]]:
    weights = [rel for _, rel in files if rel.lower().endswith(WEIGHT_SUFFIXES)]
    pickles = [rel for _, rel in files if rel.lower().endswith(PICKLE_SUFFIXES)]
    if pickles and not allow_pickle:
        if not weights:
            raise StorageError(
                f"{uri}: {pickles[0]} holds pickle-based weights, which can run code when "
                "loaded; convert the model to safetensors, or pass allow_pickle=True if you "
                "trust its source", kind="unsupported-format", uri=str(uri))
        log.info("%s: skipping pickle-based files beside safetensors/GGUF weights: %s",
                 uri, ", ".join(pickles))
        files = [(o, rel) for o, rel in files if rel not in pickles]
    if not weights and not (allow_pickle and pickles):
        raise StorageError(
            f"{uri}: no model weights ({', '.join(WEIGHT_SUFFIXES)}) among "
            f"{', '.join(rel for _, rel in files[:8])}", kind="unsupported-format", uri=str(uri))
    return files


def _safe_rel(rel: str, uri: S3Uri, key: str) -> str:
    """A key's path below its prefix, refused when it could escape the local directory."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) \
            or rel == LOCAL_MARKER:
        raise StorageError(f"{uri}: key {key!r} cannot be stored as a local file",
                           kind="unsupported-format", uri=str(uri))
    return rel


def _check_run_name(run_name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", run_name or ""):
        raise StorageError(f"publish: run_name {run_name!r} must be 1-128 characters of "
                           "letters, digits, '.', '_', '-', starting with a letter or digit",
                           kind="config")


# ----------------------------------------------------------------------------- local cache

def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """`cache_dir`, else `$LASTMILE_CACHE/s3` (default ~/.cache/lastmile/s3)."""
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get("LASTMILE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lastmile")
    return Path(base) / "s3"


def _slug(bucket: str, key: str) -> str:
    """A readable, unique directory name for a key or prefix."""
    name = f"{bucket}/{key}".strip("/")
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[-60:].strip("._") or "root"
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"


def _digest(files: list[tuple[str, _Obj]]) -> str:
    """Names a cache entry by content: the sorted (local path, ETag, size) list."""
    items = sorted([rel, o.etag, o.size] for rel, o in files)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:20]


def _entry_name(variant: str, digest: str) -> str:
    return f"{variant}-{digest}" if variant else digest


def _variant(name: str) -> str:
    """The variant part of an entry name (digests hold no '-')."""
    return name.rpartition("-")[0]


def _partial_suffix() -> str:
    return f".partial-{os.getpid()}-{threading.get_ident()}"


_SHA256 = re.compile(r"[0-9a-f]{64}")
_LOCAL_SHA256: dict[tuple[int, int, int, int], str] = {}


def _local_sha256(path: Path) -> str:
    """sha256 of a cached file, memoised per process by (device, inode, size, mtime): a file
    changed in place gets a new mtime and is hashed again."""
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _LOCAL_SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(CHUNK):
                h.update(block)
        _LOCAL_SHA256[key] = h.hexdigest()
    return _LOCAL_SHA256[key]


def _remember_sha256(path: Path, digest: str) -> None:
    st = path.stat()
    _LOCAL_SHA256[(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)] = digest


def release_cache_entries() -> None:
    """Stop holding the cache entries this process has used (exiting does the same), so
    that newer versions can prune them. For long-lived processes and tests."""
    cachelock.release_all()


def _materialize(client: Minio, cfg: S3Config, bucket: str, entry: Path,
                 files: list[tuple[_Obj, str]], progress: Progress | None,
                 expected: Mapping[str, str] | None = None) -> Path:
    """Make `entry` a complete, checked local copy of `files`, downloading only on a miss.

    Returns with this process holding the entry's shared lock (until it exits), so no other
    process deletes it. `expected` maps a file's path to the sha256 it must have.
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    lock = cachelock.entry_lock(entry)
    downloaded = 0
    with lock.thread_lock:
        while True:
            lock.shared()
            problem = _entry_problem(entry, files, expected)
            if problem is None:
                if not downloaded:
                    _count(cache_hits=len(files))
                    log.info("s3://%s: %d object(s) already cached in %s", bucket, len(files),
                             entry)
                _prune_other_versions(entry)  # those the processes that used them let go of
                return entry
            # Between our rename and our shared lock, a process that found a newer version
            # may have pruned the entry: download once more (the objects' ETags decide).
            if downloaded and (problem != "missing" or downloaded >= 2):
                raise StorageError(f"{entry}: the cache entry just downloaded fails its check "
                                   f"({problem})", kind="checksum", uri=f"s3://{bucket}")
            if problem == "missing":
                lock.exclusive()  # waits while another process downloads it
                problem = _entry_problem(entry, files, expected)
                if problem is None:
                    continue  # another process finished it meanwhile
            elif not lock.exclusive(blocking=False):
                raise StorageError(
                    f"{entry}: the cached copy is damaged ({problem}) and another process is "
                    "using it, so it is left in place and not used; run again when that "
                    "process has finished, or delete the entry", kind="checksum",
                    uri=f"s3://{bucket}")
            if problem != "missing":
                log.warning("discarding cache entry %s: %s", entry, problem)
            _download_entry(client, cfg, bucket, entry, files, progress, expected)
            downloaded += 1


def _entry_problem(entry: Path, files: list[tuple[_Obj, str]],
                   expected: Mapping[str, str] | None) -> str | None:
    """None when `entry` is complete and every file has its recorded size and sha256 (and the
    expected sha256, if given); otherwise what is wrong ("missing" when there is no entry)."""
    if not entry.exists():
        return "missing"
    try:
        record = json.loads((entry / LOCAL_MARKER).read_text(encoding="utf-8"))
        recorded = {f["path"]: f.get("sha256") for f in record["files"]}
    except FileNotFoundError:
        return f"no {LOCAL_MARKER} marker (an interrupted download)"
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {LOCAL_MARKER} ({e})"
    for obj, rel in files:
        path = entry / rel
        if not path.is_file() or path.stat().st_size != obj.size:
            return f"{rel} is missing or not {obj.size} bytes"
        want = recorded.get(rel)
        if not want:
            return f"{rel} has no recorded sha256"
        if expected and rel in expected and expected[rel] != want:
            return f"{rel} was downloaded with sha256 {want}, the manifest says {expected[rel]}"
        got = _local_sha256(path)
        if got != want:
            return f"{rel} has sha256 {got}, recorded {want} when it was downloaded"
    return None


def _download_entry(client: Minio, cfg: S3Config, bucket: str, entry: Path,
                    files: list[tuple[_Obj, str]], progress: Progress | None,
                    expected: Mapping[str, str] | None) -> None:
    """With the entry's exclusive lock held: replace whatever is there by a fresh download."""
    shutil.rmtree(entry, ignore_errors=True)
    for partial in entry.parent.glob(entry.name + ".partial-*"):
        # Only the holder of the exclusive lock writes partials, and that is us now.
        log.info("deleting partial download %s left by an interrupted process", partial)
        shutil.rmtree(partial, ignore_errors=True)
    # Before any byte moves: a full disk fails at once, naming the sizes, not mid-download.
    ensure_free_space(entry.parent, sum(o.size for o, _ in files),
                      f"{len(files)} object(s) from s3://{bucket} in {entry.parent}",
                      hint="set LASTMILE_CACHE to a larger disk")
    tmp = entry.with_name(f"{entry.name}.partial-{secrets.token_hex(6)}")
    tmp.mkdir()
    try:
        record = []
        for obj, rel in files:
            digest = _download(client, cfg, bucket, obj, tmp / rel, progress)
            want = (expected or {}).get(rel)
            if want is not None and digest != want:
                raise StorageError(
                    f"s3://{bucket}/{obj.key}: downloaded bytes have sha256 {digest}, the run "
                    f"manifest says {want}; the local copy was discarded",
                    kind="checksum", uri=f"s3://{bucket}/{obj.key}")
            record.append({"path": rel, "key": obj.key, "etag": obj.etag, "size": obj.size,
                           "sha256": digest})
        (tmp / LOCAL_MARKER).write_text(json.dumps({"files": record}, indent=2),
                                        encoding="utf-8")
        os.rename(tmp, entry)  # atomic; `entry` is absent (we hold its lock)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("s3://%s: downloaded %d object(s), %.1f MB, into %s", bucket, len(files),
             sum(o.size for o, _ in files) / 1e6, entry)


def _prune_other_versions(entry: Path) -> None:
    """Delete siblings of `entry` of the same variant (older ETags of the same source) that no
    process holds; another variant (e.g. with pickle files) is never touched."""
    for sibling in entry.parent.iterdir():
        if (sibling == entry or not sibling.is_dir() or ".partial-" in sibling.name
                or _variant(sibling.name) != _variant(entry.name)):
            continue

        def delete(sibling: Path = sibling) -> None:
            for partial in sibling.parent.glob(sibling.name + ".partial-*"):
                shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(sibling, ignore_errors=True)

        if cachelock.try_delete(sibling, delete):
            log.info("removed superseded cache entry %s", sibling)
        else:
            log.info("keeping superseded cache entry %s: a process is using it", sibling)


# ----------------------------------------------------------------------------- S3 operations

def _open(uri: str, config: S3Config | None) -> tuple[S3Config, S3Uri, Minio]:
    s3 = parse_uri(uri)
    cfg = config if config is not None else S3Config.from_env()
    return cfg, s3, _client(cfg)


def _client(cfg: S3Config) -> Minio:
    # urllib3 retries off: `_retrying` owns the policy, so every retry is logged and bounded.
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=cfg.connect_timeout, read=cfg.read_timeout),
        retries=False, maxsize=4, cert_reqs="CERT_REQUIRED",
        ca_certs=cfg.ca_bundle or certifi.where())
    return Minio(cfg.endpoint, access_key=cfg.access_key or None,
                 secret_key=cfg.secret_key or None, session_token=cfg.session_token or None,
                 secure=cfg.secure, region=cfg.region, http_client=http)


def _clean_etag(etag: str | None) -> str:
    return (etag or "").strip('"')


def _list(client: Minio, cfg: S3Config, prefix: S3Uri) -> list[_Obj]:
    """Every object under a prefix (recursive), sorted by key; directory markers excluded."""
    def op() -> list[_Obj]:
        return [_Obj(o.object_name, _clean_etag(o.etag), int(o.size or 0))
                for o in client.list_objects(prefix.bucket, prefix=prefix.key, recursive=True)
                if not o.is_dir and not o.object_name.endswith("/")]

    return sorted(_retrying(op, cfg, prefix, "listing"), key=lambda o: o.key)


def _stat_object(client: Minio, cfg: S3Config, uri: S3Uri):
    """minio's stat of `uri`, or None when the key does not exist (a missing bucket raises)."""
    try:
        return _retrying(lambda: client.stat_object(uri.bucket, uri.key), cfg, uri, "reading")
    except StorageError as e:
        if e.kind == "no-such-key":
            return None
        raise


def _stat(client: Minio, cfg: S3Config, uri: S3Uri) -> _Obj | None:
    """The object at `uri`, or None when the key does not exist."""
    st = _stat_object(client, cfg, uri)
    return None if st is None else _Obj(uri.key, _clean_etag(st.etag), int(st.size or 0))


def _objects_at(client: Minio, cfg: S3Config, s3: S3Uri) -> tuple[list[_Obj], str | None]:
    """([the object], None) for a key; (objects, prefix) for a prefix.

    A URI without the trailing slash that names no object but has objects under `key/` is
    read as that prefix, which is what `s3://bucket/data` usually means.
    """
    if not s3.is_prefix:
        obj = _stat(client, cfg, s3)
        if obj is not None:
            return [obj], None
        objects = _list(client, cfg, s3.as_prefix())
        if not objects:
            raise StorageError(f"{s3}: no such key (and no objects under {s3.as_prefix()})",
                               kind="no-such-key", uri=str(s3))
        return objects, s3.key + "/"
    objects = _list(client, cfg, s3)
    if not objects:
        raise StorageError(f"{s3}: the prefix is empty (no objects under it)",
                           kind="empty-prefix", uri=str(s3))
    return objects, s3.key


def _no_such_key(client: Minio, cfg: S3Config, s3: S3Uri) -> StorageError:
    if _list(client, cfg, s3.as_prefix()):
        return StorageError(f"{s3}: no such key, but a prefix of that name exists "
                            "(use fetch_model for a directory)", kind="no-such-key", uri=str(s3))
    return StorageError(f"{s3}: no such key", kind="no-such-key", uri=str(s3))


class _Truncated(ConnectionError):
    """The body ended before the object's size: retried like a dropped connection."""


_MD5_ETAG = re.compile(r"[0-9a-f]{32}")


def _etag_is_md5(etag: str, headers: Mapping[str, str] | None, parts: bool = False) -> bool:
    """Whether an object's ETag is the MD5 of its bytes (`parts`: the MD5 of its parts' MD5s
    and "-<count>"): not for objects encrypted with SSE-KMS or SSE-C, whose ETags S3 documents
    as something else."""
    headers = headers or {}
    sse = (headers.get("x-amz-server-side-encryption") or "").lower()
    md5, dash, count = etag.partition("-")
    shape = bool(_MD5_ETAG.fullmatch(md5)) and (count.isdigit() if parts else not dash)
    return (shape and not sse.startswith("aws:kms")
            and not headers.get("x-amz-server-side-encryption-customer-algorithm"))


def _download(client: Minio, cfg: S3Config, bucket: str, obj: _Obj, dest: Path,
              progress: Progress | None) -> str:
    """Stream one object to `dest` in CHUNK pieces, resuming at the byte reached on retry;
    returns its sha256. The bytes are checked against the ETag where it is an MD5."""
    uri = S3Uri(bucket, obj.key)
    dest.parent.mkdir(parents=True, exist_ok=True)
    done = 0
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    check_md5: list[bool] = []
    with open(dest, "wb") as f:
        def attempt() -> None:
            nonlocal done, sha, md5
            if done and done == obj.size:
                return
            # If-Match: a resumed range must come from the same object version we started.
            response = client.get_object(bucket, obj.key, offset=done,
                                         request_headers={"If-Match": f'"{obj.etag}"'})
            try:
                served = _clean_etag(response.headers.get("ETag"))
                if served and served != obj.etag:  # a server that ignored If-Match
                    raise StorageError(f"{uri}: the object changed while it was being "
                                       f"downloaded (ETag {served}, expected {obj.etag}); "
                                       "run again", kind="changed", uri=str(uri))
                if not check_md5:
                    check_md5.append(_etag_is_md5(obj.etag, response.headers))
                if done and response.status != 206:  # Range ignored: the body starts at 0
                    f.seek(0)
                    f.truncate()
                    done = 0
                    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
                for chunk in response.stream(CHUNK):
                    if done + len(chunk) > obj.size:
                        raise StorageError(f"{uri}: the server sent more than the object's "
                                           f"{obj.size} bytes", kind="server", uri=str(uri))
                    f.write(chunk)
                    sha.update(chunk)
                    md5.update(chunk)
                    done += len(chunk)
                    _count(bytes_downloaded=len(chunk))
                    if progress is not None:
                        progress(obj.key, done, obj.size)
            finally:
                response.close()
                response.release_conn()
            if done != obj.size:
                raise _Truncated(f"got {done} of {obj.size} bytes")

        _retrying(attempt, cfg, uri, "downloading", progress_of=lambda: done)
    if check_md5 and check_md5[0] and md5.hexdigest() != obj.etag:
        dest.unlink(missing_ok=True)
        raise StorageError(f"{uri}: the downloaded bytes have MD5 {md5.hexdigest()}, not the "
                           f"object's ETag {obj.etag} (corrupted in transit, or the object "
                           "changed during the download); the local copy was discarded, run "
                           "again", kind="checksum", uri=str(uri))
    _count(objects_downloaded=1)
    _remember_sha256(dest, sha.hexdigest())
    return sha.hexdigest()


def _upload(client: Minio, cfg: S3Config, run: S3Uri, path: Path, rel: str) -> dict[str, Any]:
    """Upload `path` to `run`/`rel` (one PUT, or parts retried one by one); its manifest
    entry {path, size, etag, sha256}. The server's ETag is checked against the bytes sent."""
    target = run.child(rel)
    size = path.stat().st_size
    sha = hashlib.sha256()
    if size <= PART_SIZE:
        data = path.read_bytes()
        sha.update(data)
        # One PUT (put_object would go multipart above 5 MiB, outside these retries).
        result = _retrying(lambda: client._put_object(
            run.bucket, target.key, data, {"Content-Type": "application/octet-stream"}),
            cfg, target, "uploading")
        want_etag = hashlib.md5(data, usedforsecurity=False).hexdigest()
        parts = False
    else:
        result, want_etag = _upload_parts(client, cfg, target, path, size, sha)
        parts = True
    etag = _clean_etag(result.etag)
    if _etag_is_md5(etag, result.http_headers, parts) and etag != want_etag:
        raise StorageError(f"{target}: the server reports ETag {etag} for the upload, the bytes "
                           f"sent give {want_etag}; the file changed while it was uploaded, or "
                           "the transfer was corrupted", kind="checksum", uri=str(target))
    _count(bytes_uploaded=size, objects_uploaded=1)
    return {"path": rel, "size": size, "etag": etag, "sha256": sha.hexdigest()}


def _upload_parts(client: Minio, cfg: S3Config, target: S3Uri, path: Path, size: int,
                  sha: Any) -> tuple[Any, str]:
    """A multipart upload that retries each part on its own and is aborted if it fails, so
    no incomplete upload is left behind. Returns (the server's result, the expected ETag).

    Uses minio's multipart primitives (`_create_multipart_upload`, `_upload_part`, ...):
    the public `fput_object` retries nothing and loses the upload id when its abort fails.
    """
    part_size = max(PART_SIZE, -(-size // 10_000))
    upload_id = _retrying(lambda: client._create_multipart_upload(
        target.bucket, target.key, {"Content-Type": "application/octet-stream"}),
        cfg, target, "starting a multipart upload")
    try:
        parts, md5s = [], []
        with open(path, "rb") as f:
            while data := f.read(part_size):
                number = len(parts) + 1
                sha.update(data)
                md5s.append(hashlib.md5(data, usedforsecurity=False).digest())
                etag = _retrying(lambda: client._upload_part(
                    target.bucket, target.key, data, None, upload_id, number),
                    cfg, target, f"uploading part {number}")
                parts.append(Part(number, _clean_etag(etag)))
        result = _retrying(lambda: client._complete_multipart_upload(
            target.bucket, target.key, upload_id, parts), cfg, target,
            "completing a multipart upload")
    except BaseException:
        _abort_upload(client, cfg, target, upload_id)
        raise
    want = hashlib.md5(b"".join(md5s), usedforsecurity=False).hexdigest() + f"-{len(parts)}"
    return result, want


def _abort_upload(client: Minio, cfg: S3Config, target: S3Uri, upload_id: str) -> None:
    """Abort a multipart upload (its parts are deleted); logs, never raises."""
    try:
        _retrying(lambda: client._abort_multipart_upload(target.bucket, target.key, upload_id),
                  cfg, target, "aborting a multipart upload")
        log.info("%s: aborted the incomplete multipart upload", target)
    except Exception as e:  # noqa: BLE001 - the upload's own error is the one to raise
        if not (isinstance(e, S3Error) and e.code == "NoSuchUpload"):
            log.warning("%s: could not abort multipart upload %s (%s); a bucket lifecycle "
                        "rule (AbortIncompleteMultipartUpload) removes it later", target,
                        upload_id, redact(str(e))[:200])


def _abort_incomplete_uploads(client: Minio, cfg: S3Config, prefix: S3Uri) -> int:
    """Abort every multipart upload under `prefix` (left by a publisher that was killed)."""
    aborted = 0
    for _ in range(100):  # each round aborts what one listing returned
        try:
            uploads = _retrying(lambda: client._list_multipart_uploads(
                prefix.bucket, prefix=prefix.key).uploads, cfg, prefix,
                "listing incomplete uploads")
        except StorageError as e:
            log.warning("%s: could not list incomplete uploads (%s)", prefix, e)
            return aborted
        if not uploads:
            break
        for upload in uploads:
            _abort_upload(client, cfg, S3Uri(prefix.bucket, upload.object_name),
                          upload.upload_id)
            aborted += 1
    return aborted


def _get_bytes(client: Minio, cfg: S3Config, uri: S3Uri, action: str) -> bytes:
    def get() -> bytes:
        response = client.get_object(uri.bucket, uri.key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    return _retrying(get, cfg, uri, action)


def _stat_full(client: Minio, cfg: S3Config,
               uri: S3Uri) -> tuple[str, _dt.datetime] | None:
    """(ETag, last modified) of `uri`, None if absent."""
    st = _stat_object(client, cfg, uri)
    return None if st is None else (_clean_etag(st.etag), st.last_modified)


class _Precondition(Exception):
    """A conditional write found the condition false (HTTP 412)."""


class _NoConditionalWrites(Exception):
    """The server refused the conditional header itself (HTTP 501 NotImplemented)."""


_warned_unconditional: set[str] = set()


def _conditional_put(client: Minio, cfg: S3Config, uri: S3Uri, body: bytes, content_type: str,
                     condition: dict[str, str], action: str) -> bool:
    """PUT `body` only if `condition` holds; False when it does not. A 412 after a retry is
    checked against the stored object: our own earlier attempt that succeeded counts."""
    headers = {"Content-Type": content_type, **condition}
    attempts = []

    def put() -> None:
        attempts.append(1)
        try:
            client._put_object(uri.bucket, uri.key, body, headers)
        except S3Error as e:
            if e.code == "PreconditionFailed":
                raise _Precondition() from None
            if e.code == "NotImplemented":
                raise _NoConditionalWrites() from None
            raise

    try:
        _retrying(put, cfg, uri, action)
        return True
    except _NoConditionalWrites:
        if cfg.endpoint not in _warned_unconditional:
            _warned_unconditional.add(cfg.endpoint)
            log.warning("%s does not support conditional writes (%s): two publishes of one "
                        "run name at the same moment are not arbitrated", cfg.endpoint,
                        ", ".join(condition))
        if "If-None-Match" in condition and _stat(client, cfg, uri) is not None:
            return False
        _retrying(lambda: client._put_object(uri.bucket, uri.key, body,
                                             {"Content-Type": content_type}), cfg, uri, action)
        return True
    except _Precondition:
        if len(attempts) > 1:  # was the one that "failed" our own write, answered late?
            try:
                return _get_bytes(client, cfg, uri, action) == body
            except StorageError:
                return False
        return False


def _put_if_absent(client: Minio, cfg: S3Config, uri: S3Uri, body: bytes, content_type: str,
                   action: str) -> bool:
    """Create `uri` only if no object has that key (`If-None-Match: *`); False if one has."""
    return _conditional_put(client, cfg, uri, body, content_type, {"If-None-Match": "*"},
                            action)


def _put_if_match(client: Minio, cfg: S3Config, uri: S3Uri, body: bytes, etag: str) -> bool:
    """Replace `uri` only if it still has `etag`; False if it changed meanwhile."""
    return _conditional_put(client, cfg, uri, body, "application/json",
                            {"If-Match": f'"{etag}"'}, "taking over the claim")


def _delete_all(client: Minio, cfg: S3Config, prefix: S3Uri, keep: set[str] = frozenset()) -> None:
    """Remove what an interrupted publish left under `prefix` (it has no marker)."""
    leftovers = [o for o in _list(client, cfg, prefix) if o.key not in keep]
    if leftovers:
        log.info("%s: removing %d object(s) left by an interrupted publish", prefix,
                 len(leftovers))
    for obj in leftovers:
        _retrying(lambda: client.remove_object(prefix.bucket, obj.key), cfg,
                  S3Uri(prefix.bucket, obj.key), "deleting")


# ----------------------------------------------------------------------------- retries, errors

#: S3 error codes that mean "try again later".
TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
                   "Throttling", "ThrottlingException", "XMinioServerNotInitialized"}
#: S3 error codes that mean the credentials (or their rights) are wrong.
ACCESS_CODES = {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken",
                "ExpiredToken", "TokenRefreshRequired", "AllAccessDisabled",
                "InvalidSecurity", "AccountProblem"}
_CONNECTION_ERRORS = (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError,
                      http.client.HTTPException)
_PERMANENT_HTTP_ERRORS = (urllib3.exceptions.SSLError, urllib3.exceptions.LocationValueError,
                          urllib3.exceptions.ProxySchemeUnknown)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, S3Error):
        status = exc.response.status if exc.response is not None else 0
        return exc.code in TRANSIENT_CODES or status >= 500
    if isinstance(exc, ServerError):
        return exc.status_code >= 500
    if isinstance(exc, InvalidResponseError):  # e.g. an HTML 502 from a proxy
        return True
    if isinstance(exc, _PERMANENT_HTTP_ERRORS):
        return False
    return isinstance(exc, _CONNECTION_ERRORS)


def _retrying(op: Callable[[], T], cfg: S3Config, uri: S3Uri, action: str,
              progress_of: Callable[[], int] | None = None) -> T:
    """Run `op`, retrying transient failures with exponential backoff and jitter.

    `progress_of` (bytes done) resets the failure count when an attempt moved forward, so a
    long download over a flaky link is bounded per stall, not per object.
    """
    failures = 0
    last = progress_of() if progress_of else 0
    while True:
        try:
            return op()
        except Exception as exc:  # noqa: BLE001 - classified below, unknown ones re-raised
            if not _is_transient(exc):
                mapped = _storage_error(exc, uri, cfg, action, failures + 1)
                if mapped is exc:
                    raise
                raise mapped from None
            if progress_of is not None and progress_of() != last:
                failures, last = 0, progress_of()
            failures += 1
            if failures > cfg.retries:
                raise _storage_error(exc, uri, cfg, action, failures) from None
            delay = min(cfg.max_backoff, cfg.backoff * 2 ** (failures - 1))
            delay *= random.uniform(0.5, 1.0)  # jitter: parallel steps don't retry in lockstep
            log.warning("%s %s failed (%s); retry %d of %d in %.2f s", action, uri,
                        _reason(exc), failures, cfg.retries, delay)
            time.sleep(delay)


def _reason(exc: BaseException) -> str:
    inner = getattr(exc, "reason", None)
    inner = inner if isinstance(inner, BaseException) else exc
    text = str(inner).split("Failed to establish a new connection: ")[-1]
    text = re.sub(r"<[^>]* object at 0x[0-9a-f]+>:?\s*", "", text)
    return redact(f"{type(inner).__name__}: {text}")[:300]


def _storage_error(exc: Exception, uri: S3Uri, cfg: S3Config, action: str,
                   attempts: int) -> Exception:
    """Map an SDK/HTTP failure to a StorageError naming the URI; unknown ones pass through."""
    where = cfg.endpoint
    if isinstance(exc, S3Error):
        status = exc.response.status if exc.response is not None else 0
        if exc.code == "NoSuchBucket":
            return StorageError(f"{uri}: no such bucket {uri.bucket!r} at {where}",
                                kind="no-such-bucket", uri=str(uri))
        if exc.code in ("NoSuchKey", "ResourceNotFound"):
            return StorageError(f"{uri}: no such key", kind="no-such-key", uri=str(uri))
        if exc.code in ACCESS_CODES:
            creds = ("no credentials are configured (see docs/storage.md)"
                     if cfg.credentials_from == "none"
                     else f"check the credentials from {cfg.credentials_from}")
            return StorageError(f"{uri}: access denied by {where} ({exc.code}) while {action}; "
                                f"{creds} and the bucket's policy",
                                kind="access-denied", uri=str(uri))
        if exc.code == "PreconditionFailed":
            return StorageError(f"{uri}: the object changed while it was being downloaded; "
                                "run again", kind="changed", uri=str(uri))
        if _is_transient(exc):
            return StorageError(f"{uri}: {where} answered {exc.code} (HTTP {status}) "
                                f"{attempts} times while {action}", kind="server", uri=str(uri))
        return StorageError(f"{uri}: {exc.code} (HTTP {status}) from {where} while {action}: "
                            f"{exc.message}", kind="server", uri=str(uri))
    if isinstance(exc, (ServerError, InvalidResponseError)):
        return StorageError(f"{uri}: {where} failed {attempts} times while {action} "
                            f"({_reason(exc)})", kind="server", uri=str(uri))
    if isinstance(exc, urllib3.exceptions.SSLError):
        return StorageError(f"{uri}: TLS with {where} failed ({_reason(exc)}); if the endpoint "
                            f"serves plain HTTP, use http:// or {SECURE_VAR}=0",
                            kind="config", uri=str(uri))
    if isinstance(exc, _CONNECTION_ERRORS):
        return StorageError(f"{uri}: the S3 endpoint {where} is unreachable while {action} "
                            f"({_reason(exc)}; {attempts} attempts)",
                            kind="unreachable", uri=str(uri))
    return exc
