"""A training stage handed to Kubeflow Trainer: build, create, watch and delete its TrainJob.

Why. A stage whose base model or data outgrow one node trains on N nodes. Kubeflow Trainer v2
runs that: a `TrainJob` (trainer.kubeflow.org/v1alpha1) that references the
`torch-distributed` ClusterTrainingRuntime starts the job's command on `numNodes` pods and
gives each pod torchrun's rendezvous (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
PET_MASTER_ADDR, PET_MASTER_PORT). The command is `torchrun ... -m lastmile.train STAGE`
(`lastmile.train`), reading its inputs from and publishing its output to object storage.
The pipeline's step becomes a launcher (components/trainer.py) that calls `run`:

  1. `build` makes the TrainJob with the Trainer API's own models (`kubeflow-trainer-api`),
     never YAML text: image, command, node count, processes and resources per node, the
     object-store Secret as environment variables, the runtime reference;
  2. `run` creates it through the Kubernetes API (`kubernetes` client) under a name derived
     from the step's output, so a retried launcher step finds its job: a running or complete
     one is adopted, a failed one is deleted and created again;
  3. it polls the job and logs every change of its conditions and child-job counts (a
     preemption shows as Suspended, then Resumed; a restarted node as a failed child job);
  4. on `Complete` it returns; on `Failed` it raises `TrainJobFailed` with the job's reason
     and message; past `timeout_s` it raises `TrainJobTimeout`;
  5. it deletes the job when it ends (`delete`: "always", "on-success" keeps a failed job for
     `kubectl logs`, "never").

Trainer's conditions (kubeflow/trainer pkg/apis/trainer/v1alpha1/trainjob_types.go): types
Complete, Failed, Suspended; Suspended's reasons Suspended and Resumed; Failed's reasons include
DeadlineExceeded and TrainingRuntimeNotSupported, or the JobSet's failure reason.

Nothing here was run against a real cluster: tests/test_trainer.py validates what `build`
makes against the models and the CRD's documented limits, and runs `run` with the real
`kubernetes` client against tests/k8s_fake.py, a local API server that plays back status
transitions.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

log = logging.getLogger(__name__)

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TrainJob"
PLURAL = "trainjobs"
DEFAULT_RUNTIME = "torch-distributed"
#: The Secret the pipeline's steps read (manifests/base/s3-credentials-secret.template.yaml):
#: its keys are the variables lastmile.storage reads.
DEFAULT_SECRET = "lastmile-s3-credentials"
DEFAULT_SECRET_KEYS = {k: k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "LASTMILE_S3_ENDPOINT")}
DELETE_POLICIES = ("always", "on-success", "never")
#: The CRD's rules for a TrainJob's name (an RFC 1035 label, at most 63 characters) and for
#: the trainer's command/args/env lists (trainjob_types.go kubebuilder markers).
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = 63
MAX_LIST_ITEMS = 128
MAX_ITEM_CHARS = 65536
MAX_IMAGE_CHARS = 500
#: Consecutive failed status reads (API server restarting, a network blip) before giving up.
MAX_READ_ERRORS = 5
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class TrainJobError(RuntimeError):
    """The TrainJob could not be created or followed."""


class TrainJobFailed(TrainJobError):
    """The TrainJob ended Failed; the message holds its reason and message."""

    def __init__(self, name: str, reason: str, message: str):
        super().__init__(f"TrainJob {name} failed: {reason}: {message}")
        self.name, self.reason, self.message = name, reason, message


class TrainJobTimeout(TrainJobError):
    """The TrainJob did not end within the launcher's timeout."""


# ----------------------------------------------------------------------------- the job

@dataclass
class JobSettings:
    """What a TrainJob for one stage asks of the cluster (pipeline.py compile flags)."""

    image: str
    num_nodes: int = 1
    #: Accelerators per node; the torch runtime starts one process per accelerator. 0: CPU
    #: nodes, with `procs_per_node` processes each.
    gpus_per_node: int = 1
    procs_per_node: int | None = None  # None: gpus_per_node (1 on CPU nodes)
    accelerator: str = "nvidia.com/gpu"
    cpu_request: str | None = "4"
    memory_request: str | None = "24Gi"
    memory_limit: str | None = "48Gi"
    runtime: str = DEFAULT_RUNTIME
    #: A Secret whose keys become environment variables ({key: variable}); None: none.
    s3_secret: str | None = DEFAULT_SECRET
    secret_keys: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SECRET_KEYS))
    env: dict[str, str] = field(default_factory=dict)  # plain variables
    active_deadline_seconds: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    #: Pod placement, as the pipeline's GPU steps get it (pipeline.py --node-selector,
    #: --toleration): {label: value} and [{key, operator, value, effect}].
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, str]] = field(default_factory=list)
    #: /dev/shm as a memory emptyDir (NCCL and torch multiprocessing share memory there; a
    #: pod's default is 64 MiB). None: mounted, without a size limit, when a node runs more
    #: than one process; "" never; a quantity ("16Gi") always, with that limit.
    shm_size: str | None = None

    def processes(self) -> int:
        n = self.procs_per_node if self.procs_per_node is not None else max(1, self.gpus_per_node)
        if n < 1:
            raise ValueError(f"procs_per_node must be >= 1, got {n}")
        return n

    def check(self) -> None:
        if not self.image:
            raise ValueError("TrainJob: an image is required")
        if self.num_nodes < 1:
            raise ValueError(f"TrainJob: num_nodes must be >= 1, got {self.num_nodes}")
        if self.gpus_per_node < 0:
            raise ValueError(f"TrainJob: gpus_per_node must be >= 0, got {self.gpus_per_node}")
        if self.gpus_per_node and self.procs_per_node not in (None, self.gpus_per_node):
            raise ValueError(f"TrainJob: {self.procs_per_node} processes on "
                             f"{self.gpus_per_node} GPUs per node; one process per GPU")
        self.processes()


def job_name(stage: str, key: str) -> str:
    """`lastmile-<stage>-<12 hex of key>`: the same for a retry of the same step (key: the
    step's output URI), another for anything else; a valid TrainJob name."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    name = f"lastmile-{stage.replace('_', '-').lower()}-{digest}"
    if not NAME_RE.match(name) or len(name) > MAX_NAME:
        raise ValueError(f"TrainJob name {name!r} is not an RFC 1035 label of <= 63 characters")
    return name


def torchrun_command(stage: str, stage_args: Sequence[str], settings: JobSettings) -> list[str]:
    """torchrun with the node and process counts; the node's rank and the rendezvous address
    come from the torch runtime's PET_* variables, which torchrun reads itself."""
    return ["torchrun", f"--nnodes={settings.num_nodes}",
            f"--nproc-per-node={settings.processes()}", "-m", "lastmile.train", stage,
            *stage_args]


def build(name: str, stage: str, stage_args: Sequence[str], settings: JobSettings,
          namespace: str | None = None):
    """The TrainJob (a `TrainerV1alpha1TrainJob` model) that trains `stage` with `stage_args`
    (lastmile.train's options) on `settings.num_nodes` nodes."""
    from kubeflow_trainer_api import models as m

    settings.check()
    quantity = m.IoK8sApimachineryPkgApiResourceQuantity
    requests, limits = {}, {}
    if settings.cpu_request:
        requests["cpu"] = quantity(settings.cpu_request)
    if settings.memory_request:
        requests["memory"] = quantity(settings.memory_request)
    if settings.memory_limit:
        limits["memory"] = quantity(settings.memory_limit)
    if settings.gpus_per_node:
        limits[settings.accelerator] = quantity(str(settings.gpus_per_node))
    env = [m.IoK8sApiCoreV1EnvVar(name=var, value_from=m.IoK8sApiCoreV1EnvVarSource(
               secret_key_ref=m.IoK8sApiCoreV1SecretKeySelector(name=settings.s3_secret,
                                                                key=key)))
           for key, var in (settings.secret_keys.items() if settings.s3_secret else ())]
    plain = dict(settings.env)
    # One bar in a log that nobody watches live; the job's status is what the launcher shows.
    plain.setdefault("LASTMILE_NO_PROGRESS", "1")
    env += [m.IoK8sApiCoreV1EnvVar(name=k, value=v) for k, v in plain.items()]
    trainer = m.TrainerV1alpha1Trainer(
        image=settings.image, command=torchrun_command(stage, stage_args, settings),
        env=env, num_nodes=settings.num_nodes, num_proc_per_node=settings.processes(),
        resources_per_node=m.IoK8sApiCoreV1ResourceRequirements(
            requests=requests or None, limits=limits or None))
    labels = {"app.kubernetes.io/part-of": "lastmile", "lastmile/stage": stage,
              **settings.labels}
    patch = _node_patch(settings)
    return m.TrainerV1alpha1TrainJob(
        api_version=API_VERSION, kind=KIND,
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(name=name, namespace=namespace,
                                                            labels=labels),
        spec=m.TrainerV1alpha1TrainJobSpec(
            runtime_ref=m.TrainerV1alpha1RuntimeRef(name=settings.runtime),
            trainer=trainer, active_deadline_seconds=settings.active_deadline_seconds,
            runtime_patches=[patch] if patch is not None else None))


#: The torch runtime's replicated job and container that run the trainer (Trainer's and the
#: Kubeflow SDK's name for them: "node").
NODE = "node"
#: Who owns our runtime patch (Trainer keys runtimePatches by manager).
PATCH_MANAGER = "lastmile.trainjob"


def _node_patch(settings: JobSettings):
    """A runtime patch of the trainer pods (`spec.runtimePatches`, Trainer's way to change
    the runtime's pod template per job): node selector, tolerations, /dev/shm. None when
    there is nothing to patch."""
    from kubeflow_trainer_api import models as m

    shm = settings.shm_size
    mount_shm = bool(shm) or (shm is None and settings.processes() > 1)
    pod = {}
    if settings.node_selector:
        pod["node_selector"] = dict(settings.node_selector)
    if settings.tolerations:
        pod["tolerations"] = [m.IoK8sApiCoreV1Toleration(**{k: v for k, v in t.items() if v})
                              for t in settings.tolerations]
    if mount_shm:
        limit = m.IoK8sApimachineryPkgApiResourceQuantity(shm) if shm else None
        pod["volumes"] = [m.IoK8sApiCoreV1Volume(
            name="dshm", empty_dir=m.IoK8sApiCoreV1EmptyDirVolumeSource(medium="Memory",
                                                                        size_limit=limit))]
        pod["containers"] = [m.TrainerV1alpha1ContainerPatch(name=NODE, volume_mounts=[
            m.IoK8sApiCoreV1VolumeMount(name="dshm", mount_path="/dev/shm")])]
    if not pod:
        return None
    return m.TrainerV1alpha1RuntimePatch(
        manager=PATCH_MANAGER,
        training_runtime_spec=m.TrainerV1alpha1TrainingRuntimeSpecPatch(
            template=m.TrainerV1alpha1JobSetTemplatePatch(spec=m.TrainerV1alpha1JobSetSpecPatch(
                replicated_jobs=[m.TrainerV1alpha1ReplicatedJobPatch(
                    name=NODE, template=m.TrainerV1alpha1JobTemplatePatch(
                        spec=m.TrainerV1alpha1JobSpecPatch(
                            template=m.TrainerV1alpha1PodTemplatePatch(
                                spec=m.TrainerV1alpha1PodSpecPatch(**pod)))))]))))


def validate(body: Mapping) -> list[str]:
    """Problems of a TrainJob body (a dict, as sent to the API server); [] when none.

    Checked: it parses as the Trainer API's TrainJob model with strict types and survives a
    round trip unchanged (an unknown or misspelt field is dropped by the model, so it shows
    up as a difference), and the CRD's limits that the models do not carry (name, list
    lengths, image length)."""
    from kubeflow_trainer_api import models as m

    problems = []
    try:
        parsed = m.TrainerV1alpha1TrainJob.from_dict(dict(body))
    except Exception as e:  # noqa: BLE001 - pydantic's ValidationError, reported as text
        return [f"not a TrainJob: {' '.join(str(e).split())}"]
    again = parsed.to_dict()
    if again != body:
        problems.append(f"fields the TrainJob model does not know or types it changes: "
                        f"{_diff(body, again)}")
    if body.get("apiVersion") != API_VERSION or body.get("kind") != KIND:
        problems.append(f"apiVersion/kind must be {API_VERSION}/{KIND}")
    name = (body.get("metadata") or {}).get("name", "")
    if not NAME_RE.match(name or "") or len(name) > MAX_NAME:
        problems.append(f"metadata.name {name!r} must be an RFC 1035 label of <= 63 characters")
    spec = body.get("spec") or {}
    if not (spec.get("runtimeRef") or {}).get("name"):
        problems.append("spec.runtimeRef.name is required")
    trainer = spec.get("trainer") or {}
    for key in ("command", "args", "env"):
        items = trainer.get(key) or []
        if len(items) > MAX_LIST_ITEMS:
            problems.append(f"spec.trainer.{key}: {len(items)} items, at most {MAX_LIST_ITEMS}")
        if key != "env" and any(len(s) > MAX_ITEM_CHARS for s in items):
            problems.append(f"spec.trainer.{key}: an item over {MAX_ITEM_CHARS} characters")
    names = [e.get("name") for e in trainer.get("env") or []]
    if len(names) != len(set(names)):
        problems.append("spec.trainer.env: a variable is listed twice (a map keyed by name)")
    if len(trainer.get("image") or "") > MAX_IMAGE_CHARS:
        problems.append(f"spec.trainer.image: over {MAX_IMAGE_CHARS} characters")
    for key in ("numNodes", "numProcPerNode"):
        if key in trainer and trainer[key] < 1:
            problems.append(f"spec.trainer.{key} must be >= 1")
    return problems


def _diff(a, b, path: str = "") -> str:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _diff(a.get(key), b.get(key), f"{path}.{key}" if path else key)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _diff(x, y, f"{path}[{i}]")
    return f"{path or '<root>'}: {a!r} -> {b!r}"


# ----------------------------------------------------------------------------- the API

def connect(host: str | None = None, token: str | None = None):
    """A `kubernetes` ApiClient: `host` (+ bearer `token`) when given, else the pod's service
    account (in a cluster), else ~/.kube/config."""
    from kubernetes import client, config

    if host:
        cfg = client.Configuration()
        cfg.host = host
        if token:
            cfg.api_key = {"authorization": token}
            cfg.api_key_prefix = {"authorization": "Bearer"}
        return client.ApiClient(cfg)
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        config.load_kube_config()
    return client.ApiClient()


def current_namespace(default: str = "default") -> str:
    """The pod's own namespace (where KFP runs its steps), else `default`."""
    try:
        with open(SA_NAMESPACE_FILE) as f:
            return f.read().strip() or default
    except OSError:
        return default


@dataclass(frozen=True)
class State:
    """What the launcher reads from a TrainJob's status."""

    phase: str  # Created | Running | Restarting | Suspended | Complete | Failed
    reason: str = ""
    message: str = ""
    jobs: tuple = ()  # (name, active, ready, succeeded, failed, suspended) per child job

    @property
    def done(self) -> bool:
        return self.phase in ("Complete", "Failed")

    def describe(self) -> str:
        text = self.phase
        if self.reason or self.message:
            text += f" ({self.reason}: {self.message})" if self.message else f" ({self.reason})"
        if self.jobs:
            text += "; " + ", ".join(f"{n}: active {a}, ready {r}, succeeded {s}, failed {f}"
                                     + (f", suspended {u}" if u else "")
                                     for n, a, r, s, f, u in self.jobs)
        return text


def state_of(obj: Mapping) -> State:
    """The job's phase from its conditions (Complete and Failed are final; Suspended=True is a
    suspended or preempted job) and child jobs (Running once one is active, Restarting while
    a failed one is being recreated, else Created)."""
    status = obj.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    jobs = tuple((j.get("name", "?"), j.get("active", 0), j.get("ready", 0),
                  j.get("succeeded", 0), j.get("failed", 0), j.get("suspended", 0))
                 for j in status.get("jobsStatus") or [])
    for phase in ("Failed", "Complete", "Suspended"):
        c = conditions.get(phase)
        if c and c.get("status") == "True":
            return State(phase, c.get("reason", ""), c.get("message", ""), jobs)
    resumed = conditions.get("Suspended")
    reason = resumed.get("reason", "") if resumed else ""
    message = resumed.get("message", "") if resumed else ""
    if any(j[1] for j in jobs):
        phase = "Running"
    elif any(j[4] for j in jobs):  # a child job failed, the job did not: JobSet restarts it
        phase = "Restarting"
    else:
        phase = "Created"
    return State(phase, reason, message, jobs)


def _api(api_client):
    from kubernetes import client

    return client.CustomObjectsApi(api_client)


def create(api_client, body: Mapping, namespace: str) -> dict:
    return _api(api_client).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                            dict(body))


def get(api_client, name: str, namespace: str) -> dict:
    return _api(api_client).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                         name)


def delete(api_client, name: str, namespace: str) -> None:
    """Delete the job and, through the garbage collector, its JobSet and pods (gone already
    is fine)."""
    from kubernetes.client.exceptions import ApiException

    try:
        _api(api_client).delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background")
    except ApiException as e:
        if e.status != 404:
            raise


def _wait_gone(api_client, name: str, namespace: str, poll_s: float, timeout_s: float) -> None:
    from kubernetes.client.exceptions import ApiException

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            get(api_client, name, namespace)
        except ApiException as e:
            if e.status == 404:
                return
            raise
        time.sleep(poll_s)
    raise TrainJobError(f"TrainJob {namespace}/{name} was deleted but is still there after "
                        f"{timeout_s:.0f} s (finalizers?)")


def submit(api_client, job, namespace: str, *, poll_s: float = 5.0,
           say: Callable[[str], None] = print) -> dict:
    """Create the job; when one of that name exists (a retried launcher step), adopt it unless
    it failed, in which case it is deleted and created again."""
    from kubernetes.client.exceptions import ApiException

    body = job.to_dict()
    problems = validate(body)
    if problems:
        raise TrainJobError(f"TrainJob {job.metadata.name}: " + "; ".join(problems))
    from urllib3.exceptions import HTTPError

    name = job.metadata.name
    for attempt in range(1, MAX_READ_ERRORS + 1):
        try:
            created = create(api_client, body, namespace)
            say(f"created TrainJob {namespace}/{name} (runtime {job.spec.runtime_ref.name}, "
                f"{job.spec.trainer.num_nodes} node(s) x {job.spec.trainer.num_proc_per_node} "
                f"process(es))")
            return created
        except (ApiException, HTTPError, OSError) as e:
            status = getattr(e, "status", None)
            if status == 409:  # it exists: maybe created by the attempt whose answer was lost
                break
            detail = _api_error(e) if status is not None else f"{type(e).__name__}: {e}"
            if (status is not None and status < 500) or attempt == MAX_READ_ERRORS:
                raise TrainJobError(f"creating TrainJob {namespace}/{name}: {detail}") from None
            say(f"creating TrainJob {name} failed ({detail}); retrying")
            time.sleep(poll_s)
    existing = get(api_client, name, namespace)
    state = state_of(existing)
    if state.phase != "Failed":
        say(f"TrainJob {namespace}/{name} exists ({state.describe()}): following it")
        return existing
    say(f"TrainJob {namespace}/{name} exists and failed earlier ({state.describe()}): "
        "deleting it and starting again")
    delete(api_client, name, namespace)
    _wait_gone(api_client, name, namespace, poll_s, timeout_s=max(60.0, 30 * poll_s))
    return submit(api_client, job, namespace, poll_s=poll_s, say=say)


def _api_error(e) -> str:
    import json

    try:
        return json.loads(e.body).get("message") or f"HTTP {e.status}"
    except (TypeError, ValueError, AttributeError):
        return f"HTTP {e.status} {e.reason}"


def wait(api_client, name: str, namespace: str, *, poll_s: float = 10.0,
         timeout_s: float | None = None, say: Callable[[str], None] = print) -> State:
    """Poll the job until it ends; log each change of its state. Returns the final State
    (Complete or Failed). Transient read errors (5xx, connection) are retried up to
    MAX_READ_ERRORS in a row."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    started = time.monotonic()
    last, errors = None, 0
    while True:
        try:
            state = state_of(get(api_client, name, namespace))
            errors = 0
        except (ApiException, HTTPError, OSError) as e:
            status = getattr(e, "status", None)
            if status is not None and status < 500:
                raise TrainJobError(f"reading TrainJob {namespace}/{name}: "
                                    f"{_api_error(e)}") from None
            errors += 1
            if errors >= MAX_READ_ERRORS:
                raise TrainJobError(f"reading TrainJob {namespace}/{name} failed "
                                    f"{errors} times in a row: {e}") from None
            say(f"TrainJob {name}: status read failed ({type(e).__name__}); retrying")
            time.sleep(poll_s)
            continue
        elapsed = time.monotonic() - started
        if state != last:
            say(f"[{elapsed:7.0f} s] TrainJob {name}: {state.describe()}")
            last = state
        if state.done:
            return state
        if timeout_s is not None and elapsed > timeout_s:
            raise TrainJobTimeout(f"TrainJob {namespace}/{name} did not finish in "
                                  f"{timeout_s:.0f} s (last: {state.describe()})")
        time.sleep(poll_s)


def run(api_client, job, namespace: str, *, delete_policy: str = "always",
        poll_s: float = 10.0, timeout_s: float | None = None,
        say: Callable[[str], None] = print) -> State:
    """Create (or adopt) the job, wait for it, delete it per `delete_policy`; raise
    TrainJobFailed with its reason when it failed, TrainJobTimeout past `timeout_s`."""
    if delete_policy not in DELETE_POLICIES:
        raise ValueError(f"delete_policy must be one of {DELETE_POLICIES}, got {delete_policy!r}")
    name = job.metadata.name
    submit(api_client, job, namespace, poll_s=poll_s, say=say)
    state = None
    try:
        state = wait(api_client, name, namespace, poll_s=poll_s, timeout_s=timeout_s, say=say)
    finally:
        keep = delete_policy == "never" or (
            delete_policy == "on-success" and (state is None or state.phase != "Complete"))
        if keep:
            say(f"TrainJob {namespace}/{name} kept (delete policy {delete_policy})")
        else:
            delete(api_client, name, namespace)
            say(f"TrainJob {namespace}/{name} deleted")
    if state.phase == "Failed":
        raise TrainJobFailed(name, state.reason or "Failed", state.message)
    return state


# ----------------------------------------------------------------------------- artifacts

def artifact_location(uri: str, path: str) -> str:
    """Where a TrainJob's pods find a KFP artifact: its object-store URI (`minio://` is the
    same bucket and key as `s3://` to lastmile.storage), else its local path (a local run,
    whose "nodes" share this machine's disk)."""
    for scheme in ("s3://", "minio://"):
        if uri.startswith(scheme):
            return "s3://" + uri[len(scheme):].rstrip("/") + "/"
    return path


# ----------------------------------------------------------------------------- a pipeline step

@dataclass
class LauncherOptions:
    """A launcher step's settings, fixed when the pipeline is compiled (its `trainer` JSON)."""

    job: JobSettings
    namespace: str | None = None  # None: the step's own namespace
    delete: str = "always"  # DELETE_POLICIES
    poll_s: float = 15.0
    timeout_s: float | None = None
    #: The Kubernetes API (tests; None: the pod's service account).
    api_host: str | None = None
    api_token: str | None = None

    @classmethod
    def from_json(cls, text: str) -> "LauncherOptions":
        import json

        values = json.loads(text or "{}")
        job = values.pop("job", None)
        if not isinstance(job, dict) or not job.get("image"):
            raise ValueError("trainer settings: job.image is required (pipeline.py compile "
                             "--image)")
        unknown = set(job) - set(JobSettings.__dataclass_fields__)
        unknown |= set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"trainer settings: unknown fields {sorted(unknown)}")
        options = cls(job=JobSettings(**job), **values)
        if options.delete not in DELETE_POLICIES:
            raise ValueError(f"trainer settings: delete must be one of {DELETE_POLICIES}")
        options.job.check()
        return options

    def to_json(self) -> str:
        import dataclasses
        import json

        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def output_location(uri: str, path: str) -> str:
    """Where the job publishes the stage's output: beside the step's output artifact in the
    object store (`<artifact>.trainjob/`; the launcher then copies it into the artifact), or
    the artifact's own local directory on a shared disk."""
    found = artifact_location(uri, path)
    return found.rstrip("/") + ".trainjob/" if found.startswith("s3://") else path


def launch_stage(stage: str, config: str, inputs: Mapping[str, tuple[str, str]],
                 output: tuple[str, str], launcher: str, *, api_client=None,
                 say: Callable[[str], None] = print) -> dict:
    """The body of a launcher step: train `stage` as a TrainJob and fill the step's output.

    `inputs`: {lastmile.train option name (data, negatives, reward_model, mle_model): (artifact
    URI, local path)}; `output`: the output artifact's (URI, local path); `config`: the run's
    resolved configuration (JSON); `launcher`: LauncherOptions as JSON. Returns the stage's
    summary (summary.json), now also in the output directory.
    """
    import json
    import shutil
    from pathlib import Path

    from . import checkpoint, storage
    from .config import profile_from_json
    from .train import STAGE_NAMES

    options = LauncherOptions.from_json(launcher)
    profile = profile_from_json(config)
    uri, path = output
    out = output_location(uri, path)
    args = ["--config", config]
    for key, (in_uri, in_path) in inputs.items():
        args += ["--" + key.replace("_", "-"), artifact_location(in_uri, in_path)]
    args += ["--out", out]
    # As components/stages.py does: an s3:// checkpoint prefix narrowed to this step, so a
    # retried step resumes its own checkpoints and no other step's.
    ckpt = checkpoint.task_scope(getattr(profile, stage).checkpoint_dir, STAGE_NAMES[stage], uri)
    if ckpt:
        args += ["--checkpoint-dir", ckpt]
    namespace = options.namespace or current_namespace()
    job = build(job_name(stage, uri), stage, args, options.job, namespace)
    api = api_client or connect(options.api_host, options.api_token)
    run(api, job, namespace, delete_policy=options.delete, poll_s=options.poll_s,
        timeout_s=options.timeout_s, say=say)
    target = Path(path)
    if out.startswith("s3://"):
        fetched = storage.read_published(out)
        target.mkdir(parents=True, exist_ok=True)
        for item in fetched.iterdir():
            if item.name.startswith(".lastmile"):  # the cache entry's own marker
                continue
            dest = target / item.name
            if item.is_dir():
                shutil.copytree(item, dest, dirs_exist_ok=True)
            else:
                shutil.copy2(item, dest)
        say(f"copied {out} into the step's output")
    summary_file = target / "summary.json"
    if not summary_file.is_file():
        raise TrainJobError(f"TrainJob {job.metadata.name} completed but {out} holds no "
                            "summary.json")
    return json.loads(summary_file.read_text())
