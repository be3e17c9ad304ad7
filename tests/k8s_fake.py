"""A fake Kubernetes API server for TrainJobs (trainer.kubeflow.org/v1alpha1), on 127.0.0.1.

Enough of the API for lastmile.trainjob, served over real HTTP so the real `kubernetes`
client talks to it: create (POST), get (GET), delete (DELETE) and list of `trainjobs` in a
namespace. It

  * checks a bearer token when one is set (401 otherwise, as an API server does);
  * validates every created body against the Trainer API's models (`kubeflow-trainer-api`,
    strict types, an unknown field fails) and the CRD's name rule, answering 422 Invalid
    like the real server, and 409 AlreadyExists for a name in use;
  * fills in what the server would (uid, resourceVersion, creationTimestamp, namespace);
  * plays back a status script per job: each GET of the job moves it one step along a list of
    `status` objects (the last one stays), so a test decides exactly what the launcher sees;
  * can answer the next N requests with 500 (an API server restarting);
  * records every request (method, path, query, body, Authorization) for the test to read.

Scripts: `succeeded()`, `failed(reason, message)`, `preempted_then_succeeded()` build the
status sequences Trainer's controller writes (condition types Complete, Failed, Suspended with
reasons Suspended/Resumed; jobsStatus per child job).

Bounded and self-stopping: a daemon thread, stopped by the fixture (or `stop()`).
"""

from __future__ import annotations

import datetime
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

PATH_RE = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/(?P<ns>[a-z0-9-]+)"
                     r"/trainjobs(?:/(?P<name>[^/]+))?$")
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type_: str, status: str, reason: str, message: str = "") -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": _now()}


def jobs(active: int = 0, ready: int = 0, succeeded: int = 0, failed: int = 0,
         suspended: int = 0, name: str = "node") -> list[dict]:
    return [{"name": name, "active": active, "ready": ready, "succeeded": succeeded,
             "failed": failed, "suspended": suspended}]


def succeeded(nodes: int = 2) -> list[dict]:
    """Created, pods starting, running, complete."""
    return [{},
            {"jobsStatus": jobs(active=1)},
            {"jobsStatus": jobs(active=1, ready=1)},
            {"jobsStatus": jobs(succeeded=1),
             "conditions": [condition("Complete", "True", "JobSetCompleted",
                                      f"jobset completed successfully ({nodes} nodes)")]}]


def failed(reason: str = "FailedJobs", message: str = "jobset failed: node-0 exited 1") -> list:
    """Running, then Failed with `reason` and `message`."""
    return [{"jobsStatus": jobs(active=1)},
            {"jobsStatus": jobs(active=1, ready=1)},
            {"jobsStatus": jobs(failed=1),
             "conditions": [condition("Failed", "True", reason, message)]}]


def preempted_then_succeeded() -> list[dict]:
    """Running; preempted (Kueue suspends the job: Suspended=True); resumed (Suspended=False,
    reason Resumed); a node's pod dies and JobSet restarts the child job (failed 1, then active
    again); complete."""
    return [{"jobsStatus": jobs(active=1, ready=1)},
            {"jobsStatus": jobs(suspended=1),
             "conditions": [condition("Suspended", "True", "Suspended",
                                      "preempted by a higher-priority workload")]},
            {"jobsStatus": jobs(active=1),
             "conditions": [condition("Suspended", "False", "Resumed", "admitted again")]},
            {"jobsStatus": jobs(failed=1),
             "conditions": [condition("Suspended", "False", "Resumed", "admitted again")]},
            {"jobsStatus": jobs(active=1, ready=1),
             "conditions": [condition("Suspended", "False", "Resumed", "admitted again")]},
            {"jobsStatus": jobs(succeeded=1),
             "conditions": [condition("Suspended", "False", "Resumed", "admitted again"),
                            condition("Complete", "True", "JobSetCompleted",
                                      "jobset completed successfully")]}]


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class FakeKubernetes:
    """The server; `url` for the client, `requests` recorded, `scripts` by job name."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.objects: dict[tuple[str, str], dict] = {}
        self.requests: list[dict] = []
        self.scripts: dict[str, list[dict]] = {}
        self.default_script = succeeded()
        #: Plays the torch runtime (runs the job's command) instead of a script: LocalRuntime.
        self.runtime = None
        self.errors_left = 0
        self.errors: list[str] = []  # the fake's own failures (tests assert there are none)
        self.lock = threading.Lock()
        self._steps: dict[tuple[str, str], int] = {}
        self._script: dict[tuple[str, str], list[dict]] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FakeKubernetes":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def fail_next(self, n: int) -> None:
        """Answer the next `n` requests with 500."""
        self.errors_left = n

    def calls(self, method: str | None = None) -> list[dict]:
        return [r for r in self.requests if method is None or r["method"] == method]

    # ------------------------------------------------------------------ requests

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                with fake.lock:
                    fake.requests.append({"method": method, "path": url.path,
                                          "query": parse_qs(url.query), "body": body,
                                          "authorization": self.headers.get("Authorization")})
                    try:
                        code, answer = fake._answer(method, url.path, body,
                                                    self.headers.get("Authorization"))
                    except Exception as e:  # noqa: BLE001 - a bug of the fake: 500, and kept
                        fake.errors.append(f"{method} {url.path}: {type(e).__name__}: {e}")
                        code, answer = 500, _status(500, "FakeError", fake.errors[-1])
                self._send(code, answer)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_DELETE(self):
                self._handle("DELETE")

        return Handler

    def _answer(self, method: str, path: str, body, auth: str | None) -> tuple[int, dict]:
        if self.token and auth != f"Bearer {self.token}":
            return 401, _status(401, "Unauthorized", "Unauthorized")
        if self.errors_left > 0:
            self.errors_left -= 1
            return 500, _status(500, "InternalError", "etcdserver: leader changed")
        m = PATH_RE.match(path)
        if not m:
            return 404, _status(404, "NotFound", f"the server could not find {path}")
        ns, name = m.group("ns"), m.group("name")
        if method == "POST" and name is None:
            return self._create(ns, body)
        if method == "GET" and name is None:
            items = [o for (n, _), o in sorted(self.objects.items()) if n == ns]
            return 200, {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJobList",
                         "metadata": {"resourceVersion": "1"}, "items": items}
        key = (ns, name)
        if key not in self.objects:
            return 404, _status(404, "NotFound",
                                f'trainjobs.trainer.kubeflow.org "{name}" not found')
        if method == "GET":
            return 200, self._advance(key)
        if method == "DELETE":
            if self.runtime is not None:
                self.runtime.stop(name)
            del self.objects[key]
            self._steps.pop(key, None)
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success",
                         "details": {"name": name, "group": "trainer.kubeflow.org",
                                     "kind": "trainjobs", "uid": str(uuid.uuid4())}}
        return 405, _status(405, "MethodNotAllowed", f"{method} is not supported here")

    def _create(self, ns: str, body) -> tuple[int, dict]:
        from kubeflow_trainer_api import models

        problems = []
        try:
            parsed = models.TrainerV1alpha1TrainJob.from_dict(body).to_dict()
            if parsed != body:
                problems.append("unknown fields or wrong types: the body changes when parsed "
                                "as a TrainJob")
        except Exception as e:  # noqa: BLE001 - the validation error, as the server's message
            problems.append(" ".join(str(e).split()))
        if (body or {}).get("apiVersion") != "trainer.kubeflow.org/v1alpha1" or \
                (body or {}).get("kind") != "TrainJob":
            problems.append("apiVersion/kind must be trainer.kubeflow.org/v1alpha1 TrainJob")
        name = ((body or {}).get("metadata") or {}).get("name", "")
        if not NAME_RE.match(name) or len(name) > 63:
            problems.append("metadata.name must match RFC 1035 DNS label format")
        if problems:
            return 422, _status(422, "Invalid", f'TrainJob.trainer.kubeflow.org "{name}" is '
                                                f'invalid: {"; ".join(problems)}')
        if (ns, name) in self.objects:
            return 409, _status(409, "AlreadyExists",
                                f'trainjobs.trainer.kubeflow.org "{name}" already exists')
        obj = json.loads(json.dumps(body))
        obj["metadata"].update(namespace=ns, uid=str(uuid.uuid4()), resourceVersion="1",
                               creationTimestamp=_now(), generation=1)
        obj["status"] = {}
        self.objects[(ns, name)] = obj
        self._steps[(ns, name)] = 0
        # The script is the job's from its creation on (a job created again gets the script
        # in force then).
        self._script[(ns, name)] = self.scripts.get(name, self.default_script)
        if self.runtime is not None:
            self.runtime.start(obj)
        return 201, obj

    def _advance(self, key: tuple[str, str]) -> dict:
        """The job as it is now, then one step further along its script."""
        obj = self.objects[key]
        if self.runtime is not None:
            obj["status"] = self.runtime.status(key[1])
            return obj
        script = self._script[key]
        step = self._steps[key]
        obj["status"] = json.loads(json.dumps(script[min(step, len(script) - 1)]))
        self._steps[key] = step + 1
        return obj


class LocalRuntime:
    """Trainer's torch runtime, played on this machine: a created TrainJob's command runs as
    `numNodes` processes (its "nodes"), each with the PET_* variables the runtime gives its
    pods (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT),
    its own TMPDIR (nodes share no disk), the job's env with secretKeyRef values looked up in
    `secrets` ({secret: {key: value}}), and `bin_dir` first on PATH (torchrun). Its status is
    the processes': Running while any runs, Complete when all exit 0, Failed (reason
    "FailedJobs", the failing node and exit code) otherwise; `log(name)` reads the nodes'
    output, as `kubectl logs` would."""

    def __init__(self, root: Path, secrets: dict[str, dict[str, str]], bin_dir: str,
                 extra_env: dict[str, str] | None = None, timeout: float = 300.0):
        import os

        self.root, self.secrets, self.bin_dir = root, secrets, bin_dir
        self.extra_env = dict(extra_env or {})
        self.timeout = timeout
        self.procs: dict[str, list] = {}
        self.logs: dict[str, list] = {}
        self._base_env = dict(os.environ)

    def _env(self, obj: dict, node: int, port: int) -> dict:
        import os

        trainer = obj["spec"]["trainer"]
        env = {k: v for k, v in self._base_env.items() if not k.startswith(("AWS_", "LASTMILE_S3"))}
        env.update(self.extra_env)
        for var in trainer.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
            else:
                ref = var["valueFrom"]["secretKeyRef"]
                env[var["name"]] = self.secrets[ref["name"]][ref["key"]]
        tmp = self.root / obj["metadata"]["name"] / f"node-{node}"
        tmp.mkdir(parents=True, exist_ok=True)
        env.update(PET_NNODES=str(trainer.get("numNodes", 1)),
                   PET_NPROC_PER_NODE=str(trainer.get("numProcPerNode", 1)),
                   PET_NODE_RANK=str(node), PET_MASTER_ADDR="127.0.0.1",
                   PET_MASTER_PORT=str(port), TMPDIR=str(tmp),
                   PATH=self.bin_dir + os.pathsep + env.get("PATH", ""))
        return env

    def start(self, obj: dict) -> None:
        import socket
        import subprocess

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        name, trainer = obj["metadata"]["name"], obj["spec"]["trainer"]
        self.root.mkdir(parents=True, exist_ok=True)
        procs, logs = [], []
        for node in range(trainer.get("numNodes", 1)):
            log = open(self.root / f"{name}-node-{node}.log", "w+")
            procs.append(subprocess.Popen(trainer["command"] + trainer.get("args", []),
                                          env=self._env(obj, node, port), stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
            logs.append(log)
        self.procs[name], self.logs[name] = procs, logs

    def log(self, name: str) -> str:
        return "\n".join((self.root / f"{name}-node-{i}.log").read_text()
                         for i in range(len(self.procs.get(name, []))))

    def status(self, name: str) -> dict:
        procs = self.procs[name]
        codes = [p.poll() for p in procs]
        running = sum(c is None for c in codes)
        bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if bad:  # the pods' logs stay in the pods, as on a cluster: not in the message
            self.stop(name)
            node, code = bad[0]
            return {"jobsStatus": jobs(failed=1),
                    "conditions": [condition("Failed", "True", "FailedJobs",
                                             f"jobset failed: node-{node} exited with code "
                                             f"{code}")]}
        if running:
            return {"jobsStatus": jobs(active=1, ready=1)}
        return {"jobsStatus": jobs(succeeded=1),
                "conditions": [condition("Complete", "True", "JobSetCompleted",
                                         "jobset completed successfully")]}

    def stop(self, name: str) -> None:
        import os
        import signal

        for p in self.procs.get(name, []):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for log in self.logs.get(name, []):
            log.close()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)
