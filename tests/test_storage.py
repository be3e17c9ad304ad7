"""lastmile.storage against a real S3 server (SeaweedFS, started once per session)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from lastmile import storage
from lastmile.storage import S3Config, StorageError
from s3server import (OTHER_CREDENTIAL_VARS, bucket, free_ports,  # noqa: F401
                      s3_env)  # the fixtures: the server's env, a bucket (s3_server: conftest)

def moved(before: storage.TransferStats) -> storage.TransferStats:
    return storage.transfer_stats() - before


def jsonl(*rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- configuration

def test_config_reads_kubeflow_and_aws_names_and_tls_from_scheme(tmp_path):
    cfg = S3Config.from_env({"S3_ENDPOINT_URL": "http://minio-service.kubeflow:9000",
                             "accesskey": "kf-access", "secretkey": "kf-secret-value"})
    assert (cfg.endpoint, cfg.secure, cfg.access_key, cfg.secret_key) == (
        "minio-service.kubeflow:9000", False, "kf-access", "kf-secret-value")
    assert cfg.credentials_from == "accesskey/secretkey"

    cfg = S3Config.from_env({"AWS_ENDPOINT_URL": "https://s3.example.org",
                             "MINIO_ACCESS_KEY": "m-access", "MINIO_SECRET_KEY": "m-secret",
                             "AWS_REGION": "eu-west-3"})
    assert (cfg.endpoint, cfg.secure, cfg.region, cfg.access_key) == (
        "s3.example.org", True, "eu-west-3", "m-access")

    # A bare host takes TLS from LASTMILE_S3_SECURE; contradicting the scheme is an error.
    assert not S3Config.from_env({"MINIO_ENDPOINT": "minio:9000", "LASTMILE_S3_SECURE": "0"}).secure
    assert S3Config.from_env({"MINIO_ENDPOINT": "minio:9000"}).secure
    with pytest.raises(StorageError, match="LASTMILE_S3_SECURE"):
        S3Config.from_env({"LASTMILE_S3_ENDPOINT": "http://minio:9000", "LASTMILE_S3_SECURE": "1"})

    # The Secret mounted as a volume wins over the variables.
    (tmp_path / "accesskey").write_text("vol-access\n")
    (tmp_path / "secretkey").write_text("vol-secret\n")
    cfg = S3Config.from_env({"LASTMILE_S3_CREDENTIALS_DIR": str(tmp_path),
                             "AWS_ACCESS_KEY_ID": "env-access", "AWS_SECRET_ACCESS_KEY": "x"})
    assert (cfg.access_key, cfg.secret_key) == ("vol-access", "vol-secret")

    assert S3Config.from_env({}).endpoint == "s3.amazonaws.com"
    assert S3Config.from_env({"LASTMILE_S3_RETRIES": "7"}).retries == 7


def test_config_errors_name_the_variable_never_the_value():
    with pytest.raises(StorageError, match="AWS_SECRET_ACCESS_KEY is not") as e:
        S3Config.from_env({"AWS_ACCESS_KEY_ID": "lonely-access-key"})
    assert "lonely-access-key" not in str(e.value)
    with pytest.raises(StorageError, match="not in the URL") as e:
        S3Config.from_env({"LASTMILE_S3_ENDPOINT": "http://user:pw-in-url-123@host:9000"})
    assert "pw-in-url-123" not in str(e.value)
    with pytest.raises(StorageError, match="LASTMILE_S3_RETRIES"):
        S3Config.from_env({"LASTMILE_S3_RETRIES": "many"})
    with pytest.raises(StorageError, match="scheme"):
        S3Config.from_env({"LASTMILE_S3_ENDPOINT": "ftp://host"})


def test_repr_and_redact_hide_secrets(caplog):
    cfg = S3Config(endpoint="h:1", access_key="AKIAREPRTEST", secret_key="repr-secret-9f",
                   session_token="tok-abc-123", credentials_from="AWS_ACCESS_KEY_ID/...")
    for text in (repr(cfg), str(cfg)):
        assert "repr-secret-9f" not in text and "tok-abc-123" not in text
        assert "AKIAREPRTEST" not in text
    line = ("key AKIAREPRTEST secret repr-secret-9f token tok-abc-123 "
            "url ?X-Amz-Credential=AKIA%2F2024&X-Amz-Signature=deadbeef")
    out = storage.redact(line)
    for secret in ("AKIAREPRTEST", "repr-secret-9f", "tok-abc-123", "deadbeef", "AKIA%2F2024"):
        assert secret not in out
    assert out.count("***") == 5
    with caplog.at_level(logging.DEBUG):
        storage.log.warning("leaking %s?", "repr-secret-9f")
    assert "repr-secret-9f" not in caplog.text and "leaking ***?" in caplog.text


def test_parse_uri():
    assert storage.parse_uri("s3://bkt/a/b.jsonl") == storage.S3Uri("bkt", "a/b.jsonl")
    assert storage.parse_uri("s3://bkt/a/").is_prefix
    assert storage.parse_uri("s3://bkt").is_prefix
    assert not storage.parse_uri("s3://bkt/a").is_prefix
    for bad in ("s3://B/x", "s3://ab/x", "/local/path", "s3:///x"):
        with pytest.raises(StorageError):
            storage.parse_uri(bad)


# ----------------------------------------------------------------------------- task data

def test_task_data_prefix_sorted_and_new_objects_picked_up(s3_env, bucket):
    s3_env.put(bucket, "data/b.csv", b"input,output\nx,y\n")
    s3_env.put(bucket, "data/a.jsonl", jsonl({"input": "a", "output": "b"}))
    s3_env.put(bucket, "data/notes.txt", b"not task data")
    s3_env.put(bucket, "data/sub/c.jsonl.gz", gzip.compress(jsonl({"input": "c"})))
    s3_env.put(bucket, "other/z.jsonl", jsonl({"input": "elsewhere"}))

    before = storage.transfer_stats()
    paths = storage.fetch_task_data(f"s3://{bucket}/data/")
    assert [p.name for p in paths] == ["a.jsonl", "b.csv", "c.jsonl.gz"]  # key order
    assert paths[0].read_bytes() == jsonl({"input": "a", "output": "b"})
    assert gzip.decompress(paths[2].read_bytes()) == jsonl({"input": "c"})
    assert moved(before).objects_downloaded == 3

    # New data lands: the next read picks it up and downloads only that object.
    s3_env.put(bucket, "data/a2.parquet", b"PAR1fake")
    before = storage.transfer_stats()
    paths = storage.fetch_task_data(f"s3://{bucket}/data")  # no slash: read as the prefix
    assert [p.name for p in paths] == ["a.jsonl", "a2.parquet", "b.csv", "c.jsonl.gz"]
    delta = moved(before)
    assert (delta.objects_downloaded, delta.bytes_downloaded, delta.cache_hits) == (1, 8, 3)

    # A replaced object (new ETag) is downloaded again; the superseded copy is kept while a
    # process (this one) holds it, and pruned once none does.
    old_a = paths[0]
    s3_env.put(bucket, "data/a.jsonl", jsonl({"input": "a", "output": "new"}))
    paths = storage.fetch_task_data(f"s3://{bucket}/data/")
    assert paths[0].read_bytes() == jsonl({"input": "a", "output": "new"})
    assert old_a.read_bytes() == jsonl({"input": "a", "output": "b"})
    storage.release_cache_entries()  # what exiting does
    storage.fetch_task_data(f"s3://{bucket}/data/")
    assert not old_a.exists() and not Path(f"{old_a.parent}.lock").exists()


def test_task_data_single_key_and_unsupported_key(s3_env, bucket):
    s3_env.put(bucket, "t/train.jsonl", jsonl({"input": "x"}))
    s3_env.put(bucket, "t/readme.md", b"# hi")
    [path] = storage.fetch_task_data(f"s3://{bucket}/t/train.jsonl")
    assert path.name == "train.jsonl" and path.read_bytes() == jsonl({"input": "x"})

    uri = f"s3://{bucket}/t/readme.md"
    with pytest.raises(StorageError, match="not a supported task data format") as e:
        storage.fetch_task_data(uri)
    assert e.value.kind == "unsupported-format" and uri in str(e.value)

    s3_env.put(bucket, "docs/readme.md", b"# only docs")
    with pytest.raises(StorageError, match="none of the 1 objects") as e:
        storage.fetch_task_data(f"s3://{bucket}/docs/")
    assert e.value.kind == "unsupported-format" and f"s3://{bucket}/docs/" in str(e.value)


# ----------------------------------------------------------------------------- models

def put_model(server, bucket, prefix, weights: bytes, extra: dict[str, bytes] | None = None):
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": weights,
             "tokenizer.json": b'{"version": "1.0"}', **(extra or {})}
    for name, data in files.items():
        server.put(bucket, prefix + name, data)
    return files


def test_model_downloaded_once_then_served_from_cache(s3_env, bucket, tmp_path):
    files = put_model(s3_env, bucket, "models/m1/", os.urandom(3 << 20),
                      {"pytorch_model.bin": b"pickle!", "sub/extra.json": b"{}"})
    uri = f"s3://{bucket}/models/m1/"
    cache = tmp_path / "model-cache"

    before = storage.transfer_stats()
    local = storage.fetch_model(uri, cache)
    first = moved(before)
    assert first.objects_downloaded == 4 and first.bytes_downloaded > 3 << 20
    for name in ("config.json", "model.safetensors", "tokenizer.json", "sub/extra.json"):
        assert (local / name).read_bytes() == files[name]
    assert not (local / "pytorch_model.bin").exists()  # pickle skipped beside safetensors
    assert (local / storage.LOCAL_MARKER).is_file()

    before = storage.transfer_stats()
    assert storage.fetch_model(uri, cache) == local
    second = moved(before)
    assert (second.bytes_downloaded, second.objects_downloaded, second.cache_hits) == (0, 0, 4)

    # Changed weights: a new entry; the old version is pruned once no process holds it.
    s3_env.put(bucket, "models/m1/model.safetensors", b"new weights")
    storage.release_cache_entries()
    newer = storage.fetch_model(uri, cache)
    assert newer != local and (newer / "model.safetensors").read_bytes() == b"new weights"
    assert not local.exists()


def test_model_single_gguf_key(s3_env, bucket):
    s3_env.put(bucket, "gguf/tiny.Q4.gguf", b"GGUF" + bytes(100))
    local = storage.fetch_model(f"s3://{bucket}/gguf/tiny.Q4.gguf")
    assert [p.name for p in local.iterdir() if not p.name.startswith(".")] == ["tiny.Q4.gguf"]
    via_prefix = storage.fetch_model(f"s3://{bucket}/gguf/")
    assert (via_prefix / "tiny.Q4.gguf").read_bytes() == b"GGUF" + bytes(100)


def test_model_pickle_refused_unless_allowed_and_weights_required(s3_env, bucket):
    s3_env.put(bucket, "bleurt/config.json", b"{}")
    s3_env.put(bucket, "bleurt/pytorch_model.bin", b"\x80\x04pickle")
    uri = f"s3://{bucket}/bleurt/"
    with pytest.raises(StorageError, match="pytorch_model.bin holds pickle-based") as e:
        storage.fetch_model(uri)
    assert e.value.kind == "unsupported-format" and uri in str(e.value)
    local = storage.fetch_model(uri, allow_pickle=True)
    assert (local / "pytorch_model.bin").read_bytes() == b"\x80\x04pickle"

    s3_env.put(bucket, "noweights/config.json", b"{}")
    with pytest.raises(StorageError, match="no model weights") as e:
        storage.fetch_model(f"s3://{bucket}/noweights/")
    assert e.value.kind == "unsupported-format"


def test_incomplete_entry_and_dead_partials_are_never_used(s3_env, bucket, tmp_path):
    put_model(s3_env, bucket, "m/", b"W" * 5000)
    uri, cache = f"s3://{bucket}/m/", tmp_path / "c"
    entry = storage.fetch_model(uri, cache)

    # As a crash between writing files and the marker would leave it: truncated, no marker.
    (entry / storage.LOCAL_MARKER).unlink()
    (entry / "model.safetensors").write_bytes(b"W" * 10)
    dead = subprocess.Popen(["true"])
    dead.wait()
    partial = entry.with_name(f"{entry.name}.partial-{dead.pid}-1")
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"junk")

    before = storage.transfer_stats()
    again = storage.fetch_model(uri, cache)
    assert again == entry and (entry / "model.safetensors").read_bytes() == b"W" * 5000
    assert moved(before).objects_downloaded == 3
    assert not partial.exists()

    # Files of the right size but no marker (the rename raced a crash): still not trusted.
    (entry / storage.LOCAL_MARKER).unlink()
    (entry / "model.safetensors").write_bytes(b"X" * 5000)
    storage.fetch_model(uri, cache)
    assert (entry / "model.safetensors").read_bytes() == b"W" * 5000

    # A marker with a file of the wrong size does not count either.
    (entry / "config.json").write_bytes(b"{}")
    before = storage.transfer_stats()
    storage.fetch_model(uri, cache)
    assert moved(before).objects_downloaded == 3


def test_fetch_file(s3_env, bucket, tmp_path):
    s3_env.put(bucket, "ckpt/bleurt-tiny.zip", b"PK" + bytes(3000))
    (tmp_path / "into").mkdir()
    path = storage.fetch_file(f"s3://{bucket}/ckpt/bleurt-tiny.zip", tmp_path / "into")
    assert path == tmp_path / "into" / "bleurt-tiny.zip" and path.stat().st_size == 3002
    path = storage.fetch_file(f"s3://{bucket}/ckpt/bleurt-tiny.zip", tmp_path / "x" / "b.zip")
    assert path.read_bytes()[:2] == b"PK"
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["b.zip"]  # no partial left
    with pytest.raises(StorageError, match="a prefix of that name exists"):
        storage.fetch_file(f"s3://{bucket}/ckpt", tmp_path)
    with pytest.raises(StorageError, match="names a prefix"):
        storage.fetch_file(f"s3://{bucket}/ckpt/", tmp_path)


def _disk_free(monkeypatch, free: int, asked: list) -> None:
    """shutil.disk_usage reporting `free` bytes, recording the paths it was asked about."""
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")

    def fake(path):
        asked.append(Path(path))
        return usage(10 * free + 1, 9 * free + 1, free)

    monkeypatch.setattr(shutil, "disk_usage", fake)


def test_full_disk_fails_before_any_download_naming_sizes_and_the_fix(s3_env, bucket, tmp_path,
                                                                       monkeypatch):
    from lastmile.io import DiskSpaceError

    put_model(s3_env, bucket, "big/", b"W" * (3 << 20))  # + config + tokenizer: ~3 MiB
    s3_env.put(bucket, "ckpt/bleurt.zip", b"PK" + bytes(2 << 20))
    asked: list = []
    _disk_free(monkeypatch, 1 << 20, asked)
    cache = tmp_path / "cache"
    before = storage.transfer_stats()
    with pytest.raises(DiskSpaceError, match=r"3 object\(s\) from s3://.* need 3\.0 MiB, "
                       r"1\.0 MiB free .*\(set LASTMILE_CACHE to a larger disk\)"):
        storage.fetch_model(f"s3://{bucket}/big/", cache)
    assert asked and all(cache in [a, *a.parents] for a in asked)  # the cache's disk
    with pytest.raises(DiskSpaceError, match=r"bleurt\.zip .*need 2\.0 MiB, 1\.0 MiB free"):
        storage.fetch_file(f"s3://{bucket}/ckpt/bleurt.zip", tmp_path / "x" / "b.zip")
    assert moved(before).bytes_downloaded == 0  # refused before any byte moved
    assert not list(cache.rglob("*.safetensors")) and not (tmp_path / "x").exists()

    _disk_free(monkeypatch, 4 << 20, asked)  # enough: both go through
    local = storage.fetch_model(f"s3://{bucket}/big/", cache)
    assert (local / "model.safetensors").stat().st_size == 3 << 20
    assert storage.fetch_file(f"s3://{bucket}/ckpt/bleurt.zip",
                              tmp_path / "x" / "b.zip").stat().st_size == (2 << 20) + 2
    before = storage.transfer_stats()
    _disk_free(monkeypatch, 0, asked)  # a cache hit needs no space
    assert storage.fetch_model(f"s3://{bucket}/big/", cache) == local
    assert moved(before).cache_hits == 3


def test_ckpt_counts_as_pickle(s3_env, bucket):
    s3_env.put(bucket, "lightning/config.json", b"{}")
    s3_env.put(bucket, "lightning/model.ckpt", b"\x80\x04pickle")
    with pytest.raises(StorageError, match="model.ckpt holds pickle-based"):
        storage.fetch_model(f"s3://{bucket}/lightning/")
    s3_env.put(bucket, "lightning/model.safetensors", b"safe")
    local = storage.fetch_model(f"s3://{bucket}/lightning/")
    assert (local / "model.safetensors").exists() and not (local / "model.ckpt").exists()


# ----------------------------------------------------------------------------- publish

def make_run_dir(root: Path) -> Path:
    (root / "adapters" / "rl").mkdir(parents=True)
    (root / "adapters" / "rl" / "adapter_model.safetensors").write_bytes(os.urandom(7 << 20))
    (root / "adapters" / "rl" / "adapter_config.json").write_text('{"r": 32}')
    (root / "scores.json").write_text('{"rl": {"rouge1": 0.4}}')
    (root / "report.html").write_text("<html>report</html>")
    return root


def test_publish_read_back_and_list_only_complete_runs(s3_env, bucket, tmp_path):
    src = make_run_dir(tmp_path / "out")
    prefix = f"s3://{bucket}/results"
    uri = storage.publish(src, prefix, "run-2026-01-01")
    assert uri == f"s3://{bucket}/results/run-2026-01-01/"

    manifest = storage.read_manifest(uri)
    assert sorted(f["path"] for f in manifest["files"]) == [
        "adapters/rl/adapter_config.json", "adapters/rl/adapter_model.safetensors",
        "report.html", "scores.json"]
    local = storage.read_published(uri, tmp_path / "cache")
    for rel in ("adapters/rl/adapter_model.safetensors", "scores.json", "report.html"):
        assert sha(local / rel) == sha(src / rel)

    # A run whose upload never finished (files, no marker) is invisible to readers.
    s3_env.put(bucket, "results/run-partial/scores.json", b"{}")
    assert storage.list_runs(prefix + "/") == ["run-2026-01-01"]
    with pytest.raises(StorageError, match="not a complete published run") as e:
        storage.read_published(f"{prefix}/run-partial/")
    assert e.value.kind == "not-published"

    # Publishing that run again replaces the leftovers; then it is listed.
    s3_env.put(bucket, "results/run-partial/stale.txt", b"from the interrupted attempt")
    storage.publish(src, prefix, "run-partial")
    assert storage.list_runs(prefix) == ["run-2026-01-01", "run-partial"]
    keys = {o.object_name for o in s3_env.client().list_objects(
        bucket, prefix="results/run-partial/", recursive=True)}
    assert "results/run-partial/stale.txt" not in keys and "results/run-partial/_COMPLETE" in keys

    with pytest.raises(StorageError, match="already published") as e:
        storage.publish(src, prefix, "run-2026-01-01")
    assert e.value.kind == "conflict"
    with pytest.raises(StorageError, match="run_name"):
        storage.publish(src, prefix, "../escape")

    # A published file replaced afterwards is detected, not silently mixed in.
    s3_env.put(bucket, "results/run-2026-01-01/scores.json", b"{}")
    with pytest.raises(StorageError, match="changed since the run was published"):
        storage.read_published(uri, tmp_path / "cache2")


# ----------------------------------------------------------------------------- errors

def all_error_cases(server, bucket, tmp_path, monkeypatch):
    """(expected kind, text the message must hold, callable) for every failure we name."""
    server.put(bucket, "d/a.txt", b"x")
    server.client().make_bucket(bucket + "-empty")
    closed_port = free_ports(1)[0]

    def with_env(**env):
        def run(fn):
            with monkeypatch.context() as m:
                for k, v in env.items():
                    m.setenv(k, v)
                return fn()
        return run

    def wrong_secret(fn):
        return with_env(AWS_SECRET_ACCESS_KEY="wrong-" + server.secret_key[::-1])(fn)

    def unknown_key(fn):
        return with_env(AWS_ACCESS_KEY_ID="nobody-key-4242",
                        AWS_SECRET_ACCESS_KEY="nobody-secret-4242")(fn)

    def unreachable(fn):
        return with_env(LASTMILE_S3_ENDPOINT=f"http://127.0.0.1:{closed_port}")(fn)

    def tls_to_plain_http(fn):
        return with_env(LASTMILE_S3_ENDPOINT=server.endpoint.replace("http:", "https:"))(fn)

    def direct(fn):
        return fn()

    b = f"s3://{bucket}"
    return [
        ("unreachable", f"127.0.0.1:{closed_port} is unreachable", unreachable,
         lambda: storage.fetch_task_data(f"{b}/d/")),
        ("config", "use http:// or LASTMILE_S3_SECURE=0", tls_to_plain_http,
         lambda: storage.fetch_task_data(f"{b}/d/")),
        ("access-denied", "SignatureDoesNotMatch", wrong_secret,
         lambda: storage.fetch_model(f"{b}/d/")),
        ("access-denied", "access denied", unknown_key,
         lambda: storage.fetch_task_data(f"{b}/d/a.txt")),
        ("access-denied", "access denied", wrong_secret,
         lambda: storage.publish(tmp_path, f"{b}/r", "run1")),
        ("no-such-bucket", "no such bucket 'no-such-bucket-x'", direct,
         lambda: storage.fetch_task_data("s3://no-such-bucket-x/d/")),
        ("no-such-bucket", "no such bucket", direct,
         lambda: storage.fetch_file("s3://no-such-bucket-x/k.bin", tmp_path)),
        ("no-such-key", "no such key", direct,
         lambda: storage.fetch_file(f"{b}/d/missing.bin", tmp_path)),
        ("no-such-key", "no such key", direct,
         lambda: storage.fetch_task_data(f"{b}/d/missing.jsonl")),
        ("empty-prefix", "the prefix is empty", direct,
         lambda: storage.fetch_task_data(f"s3://{bucket}-empty/data/")),
        ("unsupported-format", "not a supported task data format", direct,
         lambda: storage.fetch_task_data(f"{b}/d/a.txt")),
    ]


def test_each_error_is_clear_names_the_uri_and_never_a_secret(s3_env, bucket, tmp_path,
                                                              monkeypatch, caplog):
    (tmp_path / "f.txt").write_text("x")
    cases = all_error_cases(s3_env, bucket, tmp_path, monkeypatch)
    secrets = [s3_env.secret_key, s3_env.access_key, "wrong-" + s3_env.secret_key[::-1],
               "nobody-secret-4242", "nobody-key-4242"]
    with caplog.at_level(logging.DEBUG):
        for kind, text, env, call in cases:
            started = time.monotonic()
            with pytest.raises(StorageError) as e:
                env(call)
            message = str(e.value)
            assert e.value.kind == kind, message
            assert text in message, message
            assert re.search(r"s3://[a-z0-9.-]+/", message), message  # names the URI
            assert time.monotonic() - started < 10, f"{kind} took too long"
            for secret in secrets:
                assert secret not in message and secret not in repr(e.value)
    for secret in secrets:
        assert secret not in caplog.text
    assert "retry" in caplog.text  # the unreachable case was retried, and logged


# ----------------------------------------------------------------------------- interruptions

def test_download_killed_midway_leaves_nothing_usable_and_retry_after_restart_works(
        s3_env, bucket, tmp_path):
    weights = os.urandom(24 << 20)
    put_model(s3_env, bucket, "big/", weights)
    uri, cache = f"s3://{bucket}/big/", tmp_path / "c"
    killed = []

    def kill_after_first_chunk(key, done, total):
        if key.endswith(".safetensors") and not killed:
            killed.append(done)
            s3_env.kill()

    try:
        with pytest.raises(StorageError) as e:
            storage.fetch_model(uri, cache, progress=kill_after_first_chunk)
        assert killed and killed[0] < len(weights)
        assert e.value.kind == "unreachable" and uri in str(e.value)
        leftovers = [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".lock"]
        assert leftovers == []  # no partial file, no entry, no marker (only the lock file)
    finally:
        s3_env.ensure_running()

    before = storage.transfer_stats()
    local = storage.fetch_model(uri, cache)
    assert (local / "model.safetensors").read_bytes() == weights
    assert moved(before).objects_downloaded == 3
    before = storage.transfer_stats()
    storage.fetch_model(uri, cache)
    assert moved(before).bytes_downloaded == 0


def test_stalled_download_resumes_where_it_stopped(s3_env, bucket, tmp_path):
    """SIGSTOP the server mid-object: reads time out, and the retry resumes by Range."""
    data = os.urandom(24 << 20)
    s3_env.put(bucket, "stall/train.jsonl", data)
    cfg = dataclasses.replace(S3Config.from_env(), read_timeout=1.0, retries=8, backoff=0.1)
    paused = []

    def pause_once(key, done, total):
        if not paused:
            paused.append(done)
            s3_env.pause()
            threading.Timer(2.5, s3_env.resume).start()

    before = storage.transfer_stats()
    try:
        [path] = storage.fetch_task_data(f"s3://{bucket}/stall/", tmp_path / "c", config=cfg,
                                         progress=pause_once)
    finally:
        s3_env.resume()
    assert paused and path.read_bytes() == data
    assert moved(before).bytes_downloaded == len(data)  # resumed, nothing fetched twice
