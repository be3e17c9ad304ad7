"""Many processes on one cache directory, and storage that checks what it moves (issue 18).

Real parts only: SeaweedFS (tests/s3server.py, one server for the session), real OS processes
racing on one cache directory as pods on a ReadWriteMany volume do, and tests/faultproxy.py
between the client and the server for the faults a cluster's network and store produce.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from faultproxy import FaultProxy, Rule
from lastmile import storage
from lastmile.storage import StorageError
from s3server import bucket, s3_env  # noqa: F401 - the fixtures (s3_server: conftest)

REPO = Path(__file__).resolve().parents[1]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def moved(before: storage.TransferStats) -> storage.TransferStats:
    return storage.transfer_stats() - before


# ----------------------------------------------------------------------------- child processes

#: A process that fetches (or reads a published run) from a shared cache at a given moment,
#: reports what it got, and optionally keeps using it until its stdin is closed.
CHILD = r"""
import hashlib, json, sys, time
from lastmile import storage
args = json.loads(sys.argv[1])
while time.time() < args["start_at"]:
    time.sleep(0.002)
if args["op"] == "fetch_model":
    path = storage.fetch_model(args["uri"], args.get("cache"), allow_pickle=args["allow_pickle"])
else:
    path = storage.read_published(args["uri"], args.get("cache"))
files = {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
         for p in path.rglob("*") if p.is_file() and p.name != storage.LOCAL_MARKER}
stats = storage.transfer_stats()
print(json.dumps({"path": str(path), "files": files, "downloaded": stats.objects_downloaded,
                  "hits": stats.cache_hits}), flush=True)
if args.get("hold"):
    sys.stdin.read()
"""


def child_env(server, endpoint: str, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "LASTMILE_S3_", "MINIO_"))}
    env.update(server.env())
    env.update(LASTMILE_S3_ENDPOINT=endpoint, LASTMILE_CACHE=str(cache),
               LASTMILE_S3_RETRIES="4", LASTMILE_S3_BACKOFF="0.05")
    return env


def spawn(env: dict[str, str], **args) -> subprocess.Popen:
    args.setdefault("start_at", 0)
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], env=env, cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen, timeout: float = 90) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.splitlines()[-1])


def put_files(server, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        server.put(bucket, prefix + name, data)


def model_entry(server, cache: Path, bucket: str, prefix: str, names: list[str],
                variant: str = "") -> Path:
    """Where fetch_model caches `names` of `prefix` (the layout of lastmile.storage)."""
    listed = {o.object_name: o for o in server.client().list_objects(bucket, prefix=prefix,
                                                                     recursive=True)}
    files = [(n, storage._Obj(prefix + n, listed[prefix + n].etag.strip('"'),
                              listed[prefix + n].size)) for n in names]
    return (cache / "s3" / "models" / storage._slug(bucket, prefix)
            / storage._entry_name(variant, storage._digest(files)))


# ----------------------------------------------------------------------------- the shared cache

def test_processes_racing_on_a_cold_shared_cache_download_each_variant_once(
        s3_server, bucket, tmp_path):
    """Four processes, alternating allow_pickle, start at one instant on an empty cache while a
    fifth uses the previous version and a partial from a PID that exists here lies around:
    one download per variant, every process reads a correct copy, nothing in use deleted."""
    v0 = {"config.json": b'{"model_type": "llama"}', "model.safetensors": os.urandom(3 << 20),
          "pytorch_model.bin": os.urandom(1 << 20), "tokenizer.json": b'{"version": "1.0"}'}
    put_files(s3_server, bucket, "m/", v0)
    uri, cache = f"s3://{bucket}/m/", tmp_path / "shared-cache"
    with FaultProxy(s3_server.endpoint, lifetime=240) as proxy:
        # Slow the weights down, so that the racers overlap with the download in progress.
        proxy.add(Rule("slow", method="GET", path=r"model\.safetensors$", times=None,
                       before=lambda seen: time.sleep(0.5)))
        env = child_env(s3_server, proxy.endpoint, cache)
        holder = spawn(env, op="fetch_model", uri=uri, allow_pickle=False, hold=True)
        try:
            old = json.loads(holder.stdout.readline())
            v1 = dict(v0, **{"model.safetensors": os.urandom(3 << 20)})
            s3_server.put(bucket, "m/model.safetensors", v1["model.safetensors"])
            safe_names = ["config.json", "model.safetensors", "tokenizer.json"]
            entry = model_entry(s3_server, cache, bucket, "m/", safe_names)
            stale = entry.with_name(f"{entry.name}.partial-{os.getpid()}-1")  # a live PID
            stale.mkdir(parents=True)
            (stale / "model.safetensors").write_bytes(b"junk from a dead download")
            proxy.wait_idle()
            requests_before = len(proxy.requests)

            start_at = time.time() + 3.0  # all four imported and waiting by then
            racers = [spawn(env, op="fetch_model", uri=uri, allow_pickle=i % 2 == 1,
                            start_at=start_at) for i in range(4)]
            results = [result(p) for p in racers]

            proxy.wait_idle()
            got = proxy.requests[requests_before:]
            gets = [s.path.rsplit("/", 1)[1] for s in got if s.method == "GET" and s.query == {}]
            # one download per variant: the safetensors by each variant, the pickle by one
            assert sorted(gets) == sorted(safe_names * 2 + ["pytorch_model.bin"]), gets
            assert sum(r["downloaded"] for r in results) == 7
            want_safe = {n: sha(v1[n]) for n in safe_names}
            want_pickle = dict(want_safe, **{"pytorch_model.bin": sha(v1["pytorch_model.bin"])})
            for i, r in enumerate(results):
                assert r["files"] == (want_pickle if i % 2 else want_safe), i
            assert {results[0]["path"], results[2]["path"]} == {str(entry)}
            assert {results[1]["path"], results[3]["path"]} != {str(entry)}
            assert sum(r["hits"] for r in results) == 3 + 4  # the two that waited
            assert not stale.exists()  # owned by no lock: removed by the downloader

            # The holder's version 0 is still whole while it is in use.
            kept = Path(old["path"])
            assert (kept / storage.LOCAL_MARKER).is_file()
            assert sha((kept / "model.safetensors").read_bytes()) == sha(v0["model.safetensors"])
        finally:
            holder.stdin.close()
            holder.wait(timeout=30)
        # Once no process uses version 0, the next fetch of that variant prunes it, and only it.
        last = result(spawn(env, op="fetch_model", uri=uri, allow_pickle=False))
        assert last["downloaded"] == 0 and not kept.exists()
        assert Path(results[0]["path"]).is_dir() and Path(results[1]["path"]).is_dir()


GGUF_CHILD = r"""
import json, logging, sys, time
from pathlib import Path
args = json.loads(sys.argv[1])
from lastmile import modeling  # torch is imported before the start line: they race on the lock
import safetensors.torch
wrote = []
class Seen(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("dequantizing"):
            wrote.append(1)
modeling.log.addHandler(Seen())
modeling.log.setLevel(logging.INFO)
ready = Path(args["ready"])  # a barrier: go when every process has imported torch
(ready / str(args["i"])).touch()
while len(list(ready.iterdir())) < args["n"]:
    time.sleep(0.002)
target = modeling._dequantized_gguf(Path(args["gguf"]))
tensors = safetensors.torch.load_file(target / "model.safetensors")
print(json.dumps({"target": str(target), "wrote": len(wrote), "tensors": len(tensors),
                  "complete": (target / "COMPLETE").is_file(),
                  "tokenizer": (target / "tokenizer.json").is_file()}), flush=True)
"""


def write_tiny_gguf(path: Path) -> Path:
    """A 1-layer Llama GGUF (about 75 kB) with a byte-level BPE tokenizer, which transformers
    dequantizes in seconds instead of the real model's twenty."""
    import gguf
    import numpy as np

    hidden, ff, heads, kv = 32, 64, 4, 2
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    byte_chars = [chr(b) for b in printable] + [
        chr(256 + i) for i in range(256 - len(printable))]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *byte_chars, "hi"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(hidden // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["h i"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(tokens), hidden),
              "blk.0.attn_q.weight": (hidden, hidden),
              "blk.0.attn_k.weight": (hidden // heads * kv, hidden),
              "blk.0.attn_v.weight": (hidden // heads * kv, hidden),
              "blk.0.attn_output.weight": (hidden, hidden), "blk.0.ffn_gate.weight": (ff, hidden),
              "blk.0.ffn_up.weight": (ff, hidden), "blk.0.ffn_down.weight": (hidden, ff)}
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32) * 0.02)
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        w.add_tensor(name, np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_processes_racing_on_one_gguf_dequantize_it_once(tmp_path):
    """Three processes dequantize one GGUF into one cache at the same instant, over the
    leftovers of a writer that died (a half-written entry and a temporary directory): one
    writes, all three read the complete entry."""
    from lastmile import modeling

    (tmp_path / "src").mkdir()
    gguf = write_tiny_gguf(tmp_path / "src" / "tiny.Q8.gguf")
    cache = tmp_path / "shared-cache"
    target = cache / "bases" / f"{gguf.stem}-{modeling.file_sha256(gguf)[:16]}"
    target.mkdir(parents=True)  # no COMPLETE: a writer died before its rename
    (target / "model.safetensors").write_bytes(b"half")
    (target.parent / f"{target.name}.tmp-deadbeef").mkdir()
    env = dict(os.environ, LASTMILE_CACHE=str(cache), HF_HUB_OFFLINE="1")
    (tmp_path / "ready").mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", GGUF_CHILD,
                               json.dumps({"gguf": str(gguf), "ready": str(tmp_path / "ready"),
                                           "i": i, "n": 3})],
                              env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    results = [result(p, timeout=180) for p in procs]
    assert sum(r["wrote"] for r in results) == 1, results
    assert {r["target"] for r in results} == {str(target)}
    assert all(r["complete"] and r["tokenizer"] and r["tensors"] == 11 for r in results)
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name,
                                                                f"{target.name}.lock"]


def test_fingerprint_and_both_variants_of_one_prefix_keep_their_entries(
        s3_env, bucket, tokenizer, tmp_path):
    """A prefix holding safetensors and pickle weights: fingerprinting, loading and loading
    with allow_pickle no longer prune each other's cache entry (each downloaded once)."""
    import torch

    from lastmile import modeling

    model = modeling.tiny_llama(len(tokenizer), seed=3)
    local = tmp_path / "both"
    model.save_pretrained(local)
    torch.save(model.state_dict(), local / "pytorch_model.bin")
    tokenizer.save_pretrained(local)
    put_files(s3_env, bucket, "both/", {p.name: p.read_bytes() for p in local.iterdir()})
    uri = f"s3://{bucket}/both/"

    before = storage.transfer_stats()
    fingerprint = modeling.base_fingerprint(uri)
    safe = Path(modeling.resolve_base(uri))
    with_pickle = Path(modeling.resolve_base(uri, allow_pickle=True))
    first = moved(before).objects_downloaded
    assert safe != with_pickle and (with_pickle / "pytorch_model.bin").is_file()
    before = storage.transfer_stats()
    assert modeling.base_fingerprint(uri) == fingerprint
    loaded, _ = modeling.load_base(uri)
    modeling.resolve_base(uri, allow_pickle=True)
    assert moved(before).objects_downloaded == 0  # every variant still cached
    n_safe = sum(1 for p in safe.iterdir() if p.name != storage.LOCAL_MARKER)
    assert first == 2 * n_safe + 1
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, msg=name)


# ----------------------------------------------------------------------------- publishing

def run_dir(root: Path, who: int, big: bool = False) -> Path:
    (root / "adapters").mkdir(parents=True)
    (root / "scores.json").write_text(json.dumps({"who": who}))
    size = (20 << 20) if big else (1 << 20)  # 20 MiB: a multipart upload of 3 parts
    (root / "adapters" / "adapter_model.safetensors").write_bytes(os.urandom(size))
    return root


def keys_under(server, bucket: str, prefix: str) -> set[str]:
    return {o.object_name[len(prefix):] for o in server.client().list_objects(
        bucket, prefix=prefix, recursive=True)}


def files_of(src: Path) -> dict[str, str]:
    return {p.relative_to(src).as_posix(): sha(p.read_bytes())
            for p in src.rglob("*") if p.is_file()}


def test_concurrent_publishes_of_one_run_name_have_exactly_one_winner(s3_env, bucket,
                                                                      tmp_path):
    prefix = f"s3://{bucket}/runs"
    srcs = [run_dir(tmp_path / f"src{i}", i) for i in range(4)]
    for round_ in range(3):
        name = f"race-{round_}"
        barrier = threading.Barrier(len(srcs))
        outcomes: list = [None] * len(srcs)

        def publish(i: int) -> None:
            barrier.wait()
            try:
                outcomes[i] = storage.publish(srcs[i], prefix, name)
            except StorageError as e:
                outcomes[i] = e

        threads = [threading.Thread(target=publish, args=(i,)) for i in range(len(srcs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        winners = [i for i, o in enumerate(outcomes) if isinstance(o, str)]
        assert len(winners) == 1, outcomes
        for o in outcomes:
            if not isinstance(o, str):
                assert o.kind == "conflict" and f"runs/{name}/" in str(o), o
        won = srcs[winners[0]]
        # Exactly the winner's files, its manifest, no claim, no loser's object.
        assert keys_under(s3_env, bucket, f"runs/{name}/") == {*files_of(won), storage.MARKER}
        manifest = storage.read_manifest(f"{prefix}/{name}/")
        assert {f["path"]: f["sha256"] for f in manifest["files"]} == files_of(won)
        local = storage.read_published(f"{prefix}/{name}/", tmp_path / "read")
        assert files_of(local) == files_of(won) | {storage.LOCAL_MARKER: sha(
            (local / storage.LOCAL_MARKER).read_bytes())}
    assert storage.list_runs(prefix) == ["race-0", "race-1", "race-2"]


def test_a_killed_publish_is_taken_over_by_its_retry_and_cleaned(s3_env, bucket, tmp_path):
    """What a publisher killed mid-upload leaves - its claim, some files, an incomplete
    multipart upload - blocks another publisher while fresh, and is cleaned by a retry of
    the same owner or by anyone once stale."""
    client, prefix = s3_env.client(), f"s3://{bucket}/runs"
    src = run_dir(tmp_path / "src", 1)
    for name in ("killed", "stale"):
        claim = {"attempt": "dead", "host": "pod-x", "pid": 1, "owner": "kfp-run-7/publish",
                 "created": "2026-01-01T00:00:00+00:00"}
        s3_env.put(bucket, f"runs/{name}/{storage.CLAIM}", json.dumps(claim).encode())
        s3_env.put(bucket, f"runs/{name}/scores.json", b'{"who": "dead"}')
        upload = client._create_multipart_upload(bucket, f"runs/{name}/adapters/x.bin", {})
        client._upload_part(bucket, f"runs/{name}/adapters/x.bin", b"p" * (5 << 20), None,
                            upload, 1)

    with pytest.raises(StorageError, match="another publish of this run name is in progress "
                       r"\(attempt dead on pod-x") as e:
        storage.publish(src, prefix, "killed", owner="kfp-run-8/publish")
    assert e.value.kind == "conflict"
    storage.publish(src, prefix, "killed", owner="kfp-run-7/publish")  # the retry
    storage.publish(src, prefix, "stale", stale_claim_after=0)  # anyone, once stale
    for name in ("killed", "stale"):
        assert keys_under(s3_env, bucket, f"runs/{name}/") == {*files_of(src), storage.MARKER}
        assert client._list_multipart_uploads(bucket, prefix=f"runs/{name}/").uploads == []
        assert storage.read_manifest(f"{prefix}/{name}/")["files"][0]["sha256"]


# ----------------------------------------------------------------------------- checked bytes

def test_published_sha256_is_checked_on_download_and_on_cache_hits(s3_env, bucket, tmp_path):
    prefix, cache = f"s3://{bucket}/runs", tmp_path / "cache"
    src = run_dir(tmp_path / "src", 1)
    uri = storage.publish(src, prefix, "r1")
    local = storage.read_published(uri, cache)
    scores = local / "scores.json"

    # A cached file damaged in place (same size): found on the next hit, not used, replaced.
    scores.write_bytes(scores.read_bytes().replace(b"1", b"7"))
    before = storage.transfer_stats()
    assert storage.read_published(uri, cache) == local
    assert moved(before).objects_downloaded == 2 and scores.read_bytes() == b'{"who": 1}'

    # Damaged while another process uses the entry: an error naming the file, never the path.
    proc = spawn(child_env(s3_env, s3_env.endpoint, tmp_path / "unused"), op="read_published",
                 uri=uri, cache=str(cache), hold=True)
    try:
        assert json.loads(proc.stdout.readline())["path"] == str(local)
        storage.release_cache_entries()  # this process lets go; the child still holds it
        scores.write_bytes(b'{"who": 9}')
        with pytest.raises(StorageError, match=r"damaged \(scores.json has sha256 .*another "
                           "process is using it") as e:
            storage.read_published(uri, cache)
        assert e.value.kind == "checksum"
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)

    # A manifest whose sha256 disagrees with the bytes: the download is refused, not cached.
    manifest = storage.read_manifest(uri)
    for entry in manifest["files"]:
        if entry["path"] == "scores.json":
            entry["sha256"] = sha(b"something else")
    s3_env.put(bucket, f"runs/r1/{storage.MARKER}", json.dumps(manifest).encode())
    with pytest.raises(StorageError, match=rf"s3://{bucket}/runs/r1/scores.json: downloaded "
                       "bytes have sha256 .* the run manifest says") as e:
        storage.read_published(uri, tmp_path / "fresh")
    assert e.value.kind == "checksum"
    assert not [p for p in (tmp_path / "fresh").rglob("*") if p.is_file()
                and p.suffix != ".lock"]


# ----------------------------------------------------------------------------- injected faults

@pytest.fixture
def proxy(s3_env, monkeypatch):
    """The S3 client talks to SeaweedFS through a fault-injecting proxy."""
    with FaultProxy(s3_env.endpoint, lifetime=180) as p:
        monkeypatch.setenv("LASTMILE_S3_ENDPOINT", p.endpoint)
        monkeypatch.setenv("LASTMILE_S3_RETRIES", "4")
        yield p


def test_bursts_of_503_slowdown_are_retried(s3_env, bucket, proxy, tmp_path):
    src = run_dir(tmp_path / "src", 1, big=True)
    for method, skip in (("HEAD", 0), ("PUT", 0), ("PUT", 3), ("POST", 0), ("GET", 0),
                         ("GET", 4)):
        proxy.add(Rule(f"slowdown-{method}-{skip}", method=method, skip=skip, times=3,
                       status=503, code="SlowDown"))
    uri = storage.publish(src, f"s3://{bucket}/runs", "slow")
    local = storage.read_published(uri, tmp_path / "cache")
    injected = sum(r.fired for r in proxy.rules)
    assert injected == 18 and proxy.count(fault=None) > 0
    assert {k: v for k, v in files_of(local).items() if k != storage.LOCAL_MARKER} == \
        files_of(src)


def test_connection_reset_mid_multipart_upload_is_retried_or_aborted_cleanly(
        s3_env, bucket, proxy, tmp_path):
    src = run_dir(tmp_path / "src", 1, big=True)
    prefix = f"s3://{bucket}/runs"
    reset = proxy.add(Rule("reset-part-2", method="PUT", query_has="partNumber", skip=1,
                           times=1, reset_request_after=1 << 20))
    uri = storage.publish(src, prefix, "reset-once")
    proxy.wait_idle()
    assert reset.fired == 1 and proxy.count("PUT", query_has="partNumber") == 4  # 3 + 1 retry
    local = storage.read_published(uri, tmp_path / "cache")
    assert files_of(local)["adapters/adapter_model.safetensors"] == \
        files_of(src)["adapters/adapter_model.safetensors"]

    # A link that always breaks on part 2: the publish fails, its multipart upload is
    # aborted, its other objects deleted, and readers never see the run.
    proxy.add(Rule("reset-always", method="PUT", query_has="partNumber", skip=1, times=None,
                   reset_request_after=1 << 20))
    with pytest.raises(StorageError) as e:
        storage.publish(src, prefix, "reset-always")
    assert e.value.kind == "unreachable" and "runs/reset-always/adapters" in str(e.value)
    assert s3_env.client()._list_multipart_uploads(bucket, prefix="runs/").uploads == []
    assert keys_under(s3_env, bucket, "runs/reset-always/") == set()
    assert storage.list_runs(prefix) == ["reset-once"]


@pytest.mark.parametrize("second_read", ["if-match-honoured", "new-version-served",
                                         "bytes-corrupted"])
def test_object_replaced_between_two_range_reads_is_detected_not_mixed(
        s3_env, bucket, proxy, tmp_path, second_read):
    """A download cut after 2 of 4 MiB resumes with a range read; meanwhile the object was
    replaced. The server answers 412 to If-Match, or (a server that ignores If-Match) serves
    the new version's bytes under its new ETag, or (a corrupting middlebox) other bytes under
    the old ETag: each is an error naming the object, and no mixed file is kept."""
    old, new = os.urandom(4 << 20), os.urandom(4 << 20)  # one PUT each: the ETag is the MD5
    s3_env.put(bucket, "d/train.jsonl", old)
    cache = tmp_path / "cache"

    def serve(seen):
        start = int(seen.headers["Range"].split("=")[1].rstrip("-"))
        etag = hashlib.md5(new if second_read == "new-version-served" else old).hexdigest()
        return 206, {"ETag": f'"{etag}"', "Content-Range": f"bytes {start}-{len(new) - 1}/"
                     f"{len(new)}", "Content-Type": "application/octet-stream"}, new[start:]

    proxy.add(Rule("cut", method="GET", path=r"train\.jsonl$", cut_response_after=2 << 20))
    proxy.add(Rule("replace", method="GET", path=r"train\.jsonl$",
                   before=lambda seen: s3_env.put(bucket, "d/train.jsonl", new),
                   respond=None if second_read == "if-match-honoured" else serve))
    with pytest.raises(StorageError) as e:
        storage.fetch_task_data(f"s3://{bucket}/d/", cache)
    resumed = [s.headers.get("Range") for s in proxy.requests if s.fault == "replace"]
    assert resumed == [f"bytes={2 << 20}-"]  # the second read: a range from where the cut was
    assert f"s3://{bucket}/d/train.jsonl" in str(e.value)
    if second_read == "bytes-corrupted":
        assert e.value.kind == "checksum" and "not the object's ETag" in str(e.value)
    else:
        assert e.value.kind == "changed" and "changed while it was being downloaded" in str(
            e.value)
    assert not [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".lock"]
    [path] = storage.fetch_task_data(f"s3://{bucket}/d/", cache)  # run again: the new object
    assert sha(path.read_bytes()) == sha(new)


def test_an_entry_held_survives_a_forked_child_and_is_deletable_after_release(tmp_path):
    """A forked child (a DataLoader worker, say) shares its parent's open lock files: nothing
    it does with them (release_all, exiting) may release the parent's hold, as flock(LOCK_UN)
    on a shared open file would; the parent's release_all (or exit) does."""
    import multiprocessing

    from lastmile import cachelock

    entry = tmp_path / "entry"
    entry.mkdir()
    lock = cachelock.entry_lock(entry)
    lock.shared()
    child = multiprocessing.get_context("fork").Process(target=cachelock.release_all)
    child.start()
    child.join(timeout=30)
    assert child.exitcode == 0
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, shutil; from pathlib import Path; "
         "from lastmile import cachelock; e = Path(sys.argv[1]); "
         "print(cachelock.try_delete(e, lambda: shutil.rmtree(e)))", str(entry)],
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert probe.stdout.strip() == "False" and entry.is_dir()  # still held by this process
    cachelock.release_all()
    assert cachelock.try_delete(entry, lambda: entry.rmdir())
    assert not entry.exists() and not cachelock.lock_path(entry).exists()
