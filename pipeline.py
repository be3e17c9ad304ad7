#!/usr/bin/env python
"""lastmile's Kubeflow pipeline: the DAG and its one entry point.

    pipeline.py run [--profile demo] [--config FILE] [--param K=V]   the DAG, locally (kfp.local)
    pipeline.py tune [--profile demo] [--trials 4] [--max-train N]  equal MLE / RL step-size search
    pipeline.py reproduce [--profile demo] [--seeds 0,1,2]          the run per seed, mean ± sd
    pipeline.py reproduce --from-runs runs/A runs/B ...             the same from finished runs
    pipeline.py config show [--profile demo] [--config FILE]        every field, type, meaning
    pipeline.py compile [-o pipeline.yaml] [--image IMG] ...        IR YAML for the Kubeflow UI
    pipeline.py upload --host URL [--pipeline-name lastmile]        a new version of the pipeline
    pipeline.py submit --host URL [--config FILE] [--param K=V]     a run on a cluster
    pipeline.py schedule --host URL --cron EXPR [...]               a recurring run (retraining)

Configuration: a profile (smoke, demo, paper), then a run configuration file (--config: YAML
with `profile:` and dotted fields), then --param KEY=VALUE (a pipeline parameter or a dotted
field). A run started with only a profile gets exactly that profile, locally and on a cluster.

DAG (DESIGN.md): filter -> check for new data -> [if new: negatives -> reward -> PPO; MLE
beside them; plan shards -> for each shard: base / MLE / RL generate -> post-process (base,
MLE) -> score -> gather shards -> report -> (if publish_to) publish] [else: no new data, the
run ends]. No method logic lives here.
"""

# No `from __future__ import annotations`: KFP reads the pipeline's annotations as types.
import argparse
import dataclasses
import datetime as _dt
import inspect
import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kfp import dsl

import components
from lastmile import config, tune

#: Pipeline parameters beside the configuration ones (config.PIPELINE_PARAMETERS), with their
#: type, default and the description the Kubeflow UI shows. All text, like the configuration
#: parameters: the kfp CLI passes every KEY=VALUE as a string.
RUN_PARAMETERS: dict[str, tuple[type, object, str]] = {
    "data_source": (str, "", "Task data: a JSON Lines, CSV or Parquet file, a directory of them, "
                    "an s3:// prefix or a Hugging Face dataset id. Empty: the bundled Debian "
                    "descriptions."),
    "profile": (str, "paper", "Starting configuration: paper (the paper's sizes, GPUs), demo "
                "(SmolLM2 on a CPU in minutes) or smoke (tests). Parameters left empty keep "
                "its values."),
    "overrides": (str, "", "Any configuration field: a JSON or YAML mapping of dotted fields to "
                  "values, e.g. {\"ppo.optim.head_learning_rate\": 0.003, \"mle.epochs\": 2} "
                  "(`pipeline.py config show` lists every field). Applied before the "
                  "parameters below."),
    "publish_to": (str, "", "s3:// prefix to publish adapters, scores and the report under; a "
                   "run whose data, base model and configuration match the latest published "
                   "run there trains nothing. Empty: not published."),
    "force": (str, "false", "true: train even when the data, base model and configuration "
              "match the latest published run."),
}

#: Kubeflow's own object-store Secret (KFP creates it in each namespace runs execute in); its
#: keys are `accesskey`/`secretkey` and it holds no endpoint.
KUBEFLOW_ARTIFACT_SECRET = "mlpipeline-minio-artifact"
KUBEFLOW_SECRET_KEYS = {"accesskey": "AWS_ACCESS_KEY_ID", "secretkey": "AWS_SECRET_ACCESS_KEY"}
KUBEFLOW_ENDPOINT = "http://minio-service.kubeflow:9000"
#: Our Secret (manifests/base/s3-credentials-secret.template.yaml): keys named as the variables.
LASTMILE_SECRET_KEYS = {key: key for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                             "LASTMILE_S3_ENDPOINT")}
ENDPOINT_VAR = "LASTMILE_S3_ENDPOINT"


#: Steps that read or write object storage (task data, base models, checkpoints, published
#: runs): only they get the object-store credentials.
STORAGE_STEPS = frozenset({"filter_data", "check_new_data", "synthesize_negatives", "train_reward",
                           "train_mle", "train_ppo", "generate", "publish"})
#: Steps that load a tokenizer or model: they mount the model cache.
MODEL_STEPS = frozenset(STORAGE_STEPS - {"publish"} | {"score"})
#: Steps that log to MLflow when a tracking URI is compiled in (lastmile.tracking).
TRACKING_STEPS = frozenset({"train_reward", "train_mle", "train_ppo", "report"})
#: Training steps' default checkpoint prefix (lastmile.checkpoint.task_scope reads it).
CHECKPOINT_PREFIX_VAR = "LASTMILE_CHECKPOINT_PREFIX"
#: The image's user (docker/Dockerfile): steps run as it, never as root.
IMAGE_UID = 1000


@dataclass
class ClusterSettings:
    """Where and how tasks run on a cluster; compile-time choices, never in effect for local
    runs. Requests per GPU scale with the GPUs a training task gets."""

    accelerator_type: str = "nvidia.com/gpu"  # "none": a cluster without GPUs (CPU image)
    # GPUs of each training task (reward, MLE, PPO); with train_processes=0 (the paper
    # profile) the stage runs one data-parallel process per GPU. Generation shards take one.
    train_gpus: int = 1
    gpu_cpu_request: str = "4"  # per GPU of a task (per GPU-step on a CPU-only cluster)
    gpu_memory_request: str = "24Gi"  # per GPU
    gpu_memory_limit: str = "48Gi"  # per GPU
    cpu_request: str = "1"
    memory_request: str = "4Gi"
    # Per step (a components.stages function name): {"cpu": "8", "memory": "64Gi",
    # "memory_limit": "96Gi"}, replacing the requests above for that step.
    step_resources: dict[str, dict[str, str]] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)  # GPU steps only
    tolerations: list[dict[str, str]] = field(default_factory=list)  # GPU steps only
    s3_secret: str | None = None  # a Secret whose keys become environment variables
    s3_endpoint: str | None = None  # plain LASTMILE_S3_ENDPOINT (default for Kubeflow's Secret)
    cache_pvc: str | None = None  # a PersistentVolumeClaim mounted at /cache (model cache)
    training_retries: int = 2
    # Pod deadlines (activeDeadlineSeconds): a hung step frees its node, GPU included.
    training_timeout_s: int = 24 * 3600
    generation_timeout_s: int = 6 * 3600
    step_timeout_s: int = 4 * 3600
    shard_parallelism: int = 4  # generation shards running at once (each holds a GPU)
    # Training checkpoints go here unless the run sets checkpoint_dir, so a retry on a new
    # pod resumes ('' keeps them on the pod's disk).
    checkpoint_prefix: str = "s3://lastmile/checkpoints/"
    security_context: bool = True  # run as IMAGE_UID, runAsNonRoot
    mlflow_uri: str | None = None  # MLFLOW_TRACKING_URI of the training and report steps
    # "kfp": each training stage trains in its own step's pod (train_gpus GPUs, one node).
    # "kubeflow-trainer": the step launches a TrainJob (torchrun on trainer_nodes nodes of
    # train_gpus GPUs each, lastmile.trainjob) and waits for it.
    trainer: str = "kfp"
    trainer_nodes: int = 1
    trainer_runtime: str = "torch-distributed"
    trainer_delete: str = "always"  # lastmile.trainjob.DELETE_POLICIES

    def launcher_settings(self, image: str) -> str:
        """The launcher steps' `trainer` JSON (lastmile.trainjob.LauncherOptions): what each
        TrainJob asks of the cluster, with the object store and placement of the steps."""
        from lastmile import trainjob

        secret_keys, plain = self.s3_environment()
        env = dict(plain)
        if self.checkpoint_prefix:
            env[CHECKPOINT_PREFIX_VAR] = self.checkpoint_prefix
        if self.mlflow_uri:
            env["MLFLOW_TRACKING_URI"] = self.mlflow_uri
        job = trainjob.JobSettings(
            image=image, num_nodes=self.trainer_nodes,
            gpus_per_node=self.train_gpus if self.has_gpus else 0,
            accelerator=self.accelerator_type if self.has_gpus else "nvidia.com/gpu",
            cpu_request=_scale(self.gpu_cpu_request, self.train_gpus),
            memory_request=_scale(self.gpu_memory_request, self.train_gpus),
            memory_limit=_scale(self.gpu_memory_limit, self.train_gpus),
            runtime=self.trainer_runtime, s3_secret=self.s3_secret,
            secret_keys=dict(secret_keys),
            env=env, active_deadline_seconds=self.training_timeout_s,
            # the GPU nodes' labels and taints, as the pipeline's own GPU steps get them
            node_selector=dict(self.node_selector) if self.has_gpus else {},
            tolerations=[{k: v for k, v in t.items() if v is not None}
                         for t in self.tolerations] if self.has_gpus else [])
        options = trainjob.LauncherOptions(job=job, delete=self.trainer_delete,
                                           timeout_s=float(self.training_timeout_s))
        trainjob.LauncherOptions.from_json(options.to_json())  # checked at compile time
        return options.to_json()

    @property
    def has_gpus(self) -> bool:
        return self.accelerator_type != "none"

    def retry_window_s(self) -> int:
        """Argo counts a retry's backoff window from the first attempt, and KFP's default is
        an hour (kubeflow/pipelines#14245): cover every attempt running to its deadline."""
        return (self.training_retries + 1) * self.training_timeout_s + 3600

    def s3_environment(self) -> tuple[dict[str, str], dict[str, str]]:
        """(Secret key -> environment variable, plain environment variables) of every step.

        Kubeflow's `mlpipeline-minio-artifact` maps `accesskey`/`secretkey` to the AWS_* names
        lastmile.storage reads, and the endpoint (which that Secret lacks) becomes a plain
        variable. Any other Secret is expected to hold keys named like the variables.
        """
        plain = {}
        if self.s3_endpoint:
            from lastmile import storage

            storage.S3Config.from_env({ENDPOINT_VAR: self.s3_endpoint})  # fail at compile time
            plain[ENDPOINT_VAR] = self.s3_endpoint
        if not self.s3_secret:
            return {}, plain
        if self.s3_secret == KUBEFLOW_ARTIFACT_SECRET:
            return dict(KUBEFLOW_SECRET_KEYS), plain or {ENDPOINT_VAR: KUBEFLOW_ENDPOINT}
        keys = {k: v for k, v in LASTMILE_SECRET_KEYS.items() if v not in plain}
        return keys, plain


def build_pipeline(image: str = components.DEFAULT_IMAGE,
                   cluster: ClusterSettings | None = None,
                   compiled: dict | None = None, defaults: dict | None = None):
    """The pipeline function, its components running in `image`.

    `compiled` holds the configuration fields fixed at compile time
    (config.COMPILE_TIME_FIELDS). One of them, `ppo.init_policy_from_mle`, starts PPO's policy
    from the MLE adapter (beyond the paper): only then does PPO wait for MLE training,
    otherwise the two train side by side. `defaults` sets parameters' defaults in the IR.
    """
    c = components.build(image)
    init_policy_from_mle = bool((compiled or {}).get("ppo.init_policy_from_mle"))

    def place(task, kind: str, cached: bool = True, gpus: int = 1):
        """Resources, placement, credentials and limits of one step: kind "train", "gpu"
        (generation) or "cpu"."""
        task.set_caching_options(cached)
        if cluster is None:
            return task
        from kfp import kubernetes

        step = task.component_spec.name.replace("-", "_").removesuffix("_trainjob")
        on_gpu = kind in ("train", "gpu") and cluster.has_gpus
        if kind in ("cpu", "launch"):
            cpu_request, memory, limit = cluster.cpu_request, cluster.memory_request, None
        else:  # requests per GPU, for every GPU the task holds
            cpu_request = _scale(cluster.gpu_cpu_request, gpus)
            memory = _scale(cluster.gpu_memory_request, gpus)
            limit = _scale(cluster.gpu_memory_limit, gpus)
        own = cluster.step_resources.get(step, {})
        task.set_cpu_request(own.get("cpu", cpu_request))
        task.set_memory_request(own.get("memory", memory))
        if own.get("memory_limit", limit):
            task.set_memory_limit(own.get("memory_limit", limit))
        if on_gpu:
            task.set_accelerator_type(cluster.accelerator_type).set_accelerator_limit(gpus)
            for key, value in cluster.node_selector.items():
                kubernetes.add_node_selector(task, label_key=key, label_value=value)
            for tol in cluster.tolerations:
                kubernetes.add_toleration(task, key=tol.get("key"),
                                          operator=tol.get("operator", "Equal"),
                                          value=tol.get("value"), effect=tol.get("effect"))
        timeout = {"train": cluster.training_timeout_s, "gpu": cluster.generation_timeout_s,
                   "cpu": cluster.step_timeout_s,
                   # the launcher waits for its TrainJob's attempts, restarts included
                   "launch": cluster.retry_window_s()}[kind]
        kubernetes.set_timeout(task, timeout)
        if kind == "launch":
            kind = "train"  # retries, checkpoints and tracking as a training step's
        if kind == "train" and cluster.checkpoint_prefix:
            # Where checkpoints go unless the run's configuration names a place (placement,
            # like the cache volume: the run's configuration is the profile's).
            task.set_env_variable(CHECKPOINT_PREFIX_VAR, cluster.checkpoint_prefix)
        if cluster.mlflow_uri and step in TRACKING_STEPS:  # lastmile.tracking
            task.set_env_variable("MLFLOW_TRACKING_URI", cluster.mlflow_uri)
        if kind == "train" and cluster.training_retries:
            task.set_retry(num_retries=cluster.training_retries, backoff_duration="60s",
                           backoff_factor=2,
                           backoff_max_duration=f"{cluster.retry_window_s()}s")
        if step in STORAGE_STEPS:
            secret_keys, plain_env = cluster.s3_environment()
            if secret_keys:
                kubernetes.use_secret_as_env(task, secret_name=cluster.s3_secret,
                                             secret_key_to_env=secret_keys)
            for name, value in plain_env.items():
                task.set_env_variable(name, value)
        if cluster.cache_pvc and step in MODEL_STEPS:
            kubernetes.mount_pvc(task, pvc_name=cluster.cache_pvc, mount_path="/cache")
        if cluster.security_context:
            kubernetes.set_security_context(task, run_as_user=IMAGE_UID,
                                            run_as_group=IMAGE_UID, run_as_non_root=True)
        if kind == "train" and gpus > 1:
            # One process per GPU (train_processes=0): NCCL and torch multiprocessing share
            # memory through /dev/shm, which is 64 MiB in a pod unless mounted.
            kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm",
                                       medium="Memory")
        return task

    def cpu(task, cached: bool = True):
        return place(task, "cpu", cached)

    def gpu(task):
        return place(task, "gpu")

    # Training in the step's own pod, or a launcher step that hands it to Kubeflow Trainer
    # (a TrainJob of trainer_nodes nodes) and waits: same inputs and outputs either way.
    on_trainer = cluster is not None and cluster.trainer == "kubeflow-trainer"
    trainers = {name: getattr(c, f"{name}_trainjob" if on_trainer else name)
                for name in ("train_reward", "train_mle", "train_ppo")}
    launch = {"trainer": cluster.launcher_settings(image)} if on_trainer else {}

    def train(task):
        if on_trainer:  # the launcher needs no GPU: the TrainJob's nodes hold them
            return place(task, "launch")
        return place(task, "train", gpus=cluster.train_gpus if cluster is not None else 1)

    compiled_json = json.dumps(dict(sorted((compiled or {}).items())))

    def lastmile_pipeline(*args, **kwargs) -> str:
        p = _PIPELINE_SIGNATURE.bind(*args, **kwargs).arguments
        data_source, publish_to, force = p["data_source"], p["publish_to"], p["force"]
        cfg = cpu(c.resolve_config(
            profile=p["profile"], overrides=p["overrides"], compiled=compiled_json,
            **{name: p[name] for name in config.PIPELINE_PARAMETERS})).output
        # Task data live outside the pipeline (a file, a prefix that grows): never cached.
        data = cpu(c.filter_data(config=cfg, data_source=data_source), cached=False)
        data.set_display_name("filter data")
        # Reads the latest published run: never cached either.
        check = cpu(c.check_new_data(config=cfg, data=data.outputs["data"],
                                     data_source=data_source, publish_to=publish_to,
                                     force=force), cached=False)
        check.set_display_name("check for new data")

        with dsl.If(check.outputs["Output"] == True, name="new data"):  # noqa: E712 (KFP)
            negatives = cpu(c.synthesize_negatives(config=cfg, data=data.outputs["data"]))
            negatives.set_display_name("synthesize negatives")
            reward = train(trainers["train_reward"](
                config=cfg, data=data.outputs["data"], negatives=negatives.outputs["negatives"],
                **launch))
            reward.set_display_name("train reward model")
            mle = train(trainers["train_mle"](config=cfg, data=data.outputs["data"], **launch))
            mle.set_display_name("train MLE baseline")
            start_from = {"mle_model": mle.outputs["mle_model"]} if init_policy_from_mle else {}
            ppo = train(trainers["train_ppo"](config=cfg, data=data.outputs["data"],
                                              reward_model=reward.outputs["reward_model"],
                                              **start_from, **launch))
            ppo.set_display_name("train PPO policy")

            # Generation and scoring fan out over shards of the test rows (lastmile.shards):
            # one task per shard and variant, each its own GPU on a cluster; `gather` puts
            # the shards back in order, as one unsharded run would have written them.
            plan = cpu(c.plan_shards(config=cfg, data=data.outputs["data"]))
            plan.set_display_name("plan shards")
            parallelism = cluster.shard_parallelism if cluster is not None else None
            with dsl.ParallelFor(plan.output, name="shards", parallelism=parallelism) as shard:
                shard_outputs = {}
                for variant, adapter in (("base", None), ("mle", mle.outputs["mle_model"]),
                                         ("rl", ppo.outputs["ppo_model"])):
                    kwargs = {"adapter": adapter} if adapter is not None else {}
                    task = gpu(c.generate(config=cfg, data=data.outputs["data"],
                                          variant=variant, shard=shard, **kwargs))
                    task.set_display_name(f"generate {variant}")
                    shard_outputs[variant] = task.outputs["predictions"]
                for variant in ("base", "mle"):
                    task = cpu(c.postprocess(predictions=shard_outputs[variant]))
                    task.set_display_name(f"post-process {variant}")
                    shard_outputs[f"{variant}_cleaned"] = task.outputs["cleaned"]
                shard_scores = cpu(c.score(config=cfg, shard=shard, **shard_outputs))
                shard_scores.set_display_name("score")
            gathered = cpu(c.gather(
                config=cfg, example_shards=dsl.Collected(shard_scores.outputs["examples"]),
                **{f"{name}_shards": dsl.Collected(output)
                   for name, output in shard_outputs.items()}))
            gathered.set_display_name("gather shards")
            predictions = {name: gathered.outputs[name] for name in shard_outputs}
            report = cpu(c.report(config=cfg, data=data.outputs["data"],
                                  negatives=negatives.outputs["negatives"],
                                  reward_model=reward.outputs["reward_model"],
                                  mle_model=mle.outputs["mle_model"],
                                  ppo_model=ppo.outputs["ppo_model"],
                                  scores=gathered.outputs["scores"], **predictions))
            report.set_display_name("report")

            with dsl.If(publish_to != "", name="publish results"):
                published = cpu(c.publish(
                    publish_to=publish_to, decision=check.outputs["decision"],
                    mle_model=mle.outputs["mle_model"], ppo_model=ppo.outputs["ppo_model"],
                    report_dir=report.outputs["report_dir"],
                    job_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                    job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER), cached=False)
                published.set_display_name("publish")
        with dsl.Else(name="no new data"):
            skipped = cpu(c.no_new_data(decision=check.outputs["decision"]), cached=False)
            skipped.set_display_name("no new data: nothing retrained")
        # The run's outcome: {"status": "trained", "report": URI} or {"status": "skipped", ...}.
        return dsl.OneOf(report.outputs["Output"], skipped.outputs["Output"])

    # KFP reads the parameters, their defaults and descriptions (the docstring's Args) from
    # the function: generated from RUN_PARAMETERS and config, so they cannot drift.
    lastmile_pipeline.__signature__ = _pipeline_signature(defaults or {})
    lastmile_pipeline.__doc__ = _pipeline_docstring()
    return dsl.pipeline(name="lastmile", description=_PIPELINE_DESCRIPTION)(lastmile_pipeline)


_PIPELINE_DESCRIPTION = ("RL fine-tuning without human feedback beside an MLE baseline, scored "
                         "with ROUGE, length-adjusted ROUGE and BLEURT.")


def _scale(quantity: str, factor: int) -> str:
    """A Kubernetes quantity times `factor`: ("24Gi", 2) -> "48Gi", ("4", 2) -> "8"."""
    number = re.match(r"^(\d+(?:\.\d+)?)(.*)$", quantity)
    if not number:
        raise UsageError(f"not a Kubernetes quantity: {quantity!r}")
    value = float(number.group(1)) * factor
    text = str(int(value)) if value == int(value) else f"{value:g}"
    return text + number.group(2)


def _pipeline_signature(defaults: dict) -> inspect.Signature:
    """The pipeline's parameters: the run parameters, then one text parameter per
    configuration parameter ('' = the profile's value). `defaults` replaces defaults (a
    compile --config bakes its profile and settings into the IR this way)."""
    params = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                default=defaults.get(name, default), annotation=kind)
              for name, (kind, default, _) in RUN_PARAMETERS.items()]
    params += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                 default=defaults.get(name, ""), annotation=str)
               for name in config.PIPELINE_PARAMETERS]
    return inspect.Signature(params, return_annotation=str)


_PIPELINE_SIGNATURE = _pipeline_signature({})


def _pipeline_docstring() -> str:
    lines = [_PIPELINE_DESCRIPTION, "", "Args:"]
    lines += [f"    {name}: {text}" for name, (_, _, text) in RUN_PARAMETERS.items()]
    lines += [f"    {name}: {config.parameter_help(name)}" for name in config.PIPELINE_PARAMETERS]
    return "\n".join(lines)


# --------------------------------------------------------------------------- what the user asked

#: `reproduce`'s seeds when --seeds is not given.
DEFAULT_SEEDS = "0,1,2"


class UsageError(Exception):
    """A bad flag, parameter or file: one line naming it, exit status 2, nothing uploaded."""


class ServerError(Exception):
    """The Kubeflow Pipelines host answered, but not as the API does: exit status 1."""


def _answered(obj, field: str, what: str):
    """`obj`'s `field`, which the API always sets. A Dex-fronted endpoint answers a request
    without a session with a redirect to its sign-in page, which the client follows and reads
    as an empty object: say so instead of printing "run None started"."""
    value = getattr(obj, field, None)
    if not value:
        raise ServerError(f"{what}: the host answered without a {field}, as a sign-in page "
                          f"does; pass --cookies 'authservice_session=...' (Dex) or --token")
    return value


@dataclass
class RunSettings:
    """A run as the user asked for it, from --config, --profile, --param and the shorthands.

    `profile` None means the pipeline's default (the compiled IR's `profile`). `parameters`
    holds flat pipeline parameters, `overrides` dotted fields, `compiled` the fields fixed at
    compile time, `run` data_source / publish_to / force.
    """

    profile: str | None = None
    run: dict = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)
    compiled: dict = field(default_factory=dict)

    def set(self, key: str, value, source: str) -> None:
        """Route one setting by its key; an unknown key lists the valid ones."""
        if key == "profile":
            self.profile = str(value)
        elif key in RUN_PARAMETERS and key != "overrides":
            self.run[key] = (_as_text(config.as_bool(value, f"{source} {key}")) if key == "force"
                             else value)
        elif key == "overrides":
            self.overrides.update(config.parse_overrides(value, f"{source} overrides"))
        elif key in config.PIPELINE_PARAMETERS:
            self.parameters[key] = value
        elif key in config.COMPILE_TIME_FIELDS:
            self.compiled[key] = config.as_bool(value, f"{source} {key}")
        elif "." in key or key in _PROFILE_FIELDS:
            self.overrides[key] = value
        else:
            raise UsageError(
                f"{source} {key}: unknown key. Run parameters: {', '.join(RUN_PARAMETERS)}; "
                f"pipeline parameters: {', '.join(config.PIPELINE_PARAMETERS)}; or a dotted "
                f"configuration field such as ppo.optim.head_learning_rate "
                f"(`python pipeline.py config show` lists them)")

    def resolve(self, default_profile: str = "paper") -> config.Profile:
        """The configuration this run gets (the same config.resolve the cluster's
        resolve_config step runs); raises config.ConfigError naming the bad value."""
        return config.resolve(self.profile or default_profile, self.overrides,
                              compiled=self.compiled, **self.parameters)

    def pipeline_arguments(self) -> dict:
        """The run's arguments as the pipeline's parameters take them (configuration as text,
        dotted fields as one JSON `overrides`); unset parameters are left out."""
        arguments = dict(self.run)
        if self.profile:
            arguments["profile"] = self.profile
        if self.overrides:  # as the fields' types read them: "3e-3" from YAML goes as 0.003
            profile = self.resolve()
            typed = {key: _plain(config._get(profile, key)) for key in self.overrides}
            arguments["overrides"] = json.dumps(typed, sort_keys=True)
        arguments.update({key: _as_text(value) for key, value in self.parameters.items()})
        return arguments


_PROFILE_FIELDS = {f.name for f in dataclasses.fields(config.Profile)}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _as_text(value) -> str:
    """A configuration value as a text pipeline parameter ('true', '0.001', 'none', ...)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def load_run_config(path: Path) -> dict:
    """A run configuration file: YAML (or JSON) with `profile` and any dotted or nested
    configuration fields, pipeline parameters or run parameters."""
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"--config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"--config {path}: not valid YAML ({config.yaml_error(exc)})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UsageError(f"--config {path}: expected a mapping (profile: demo, "
                         f"ppo.optim.learning_rate: 3.0e-4, ...), got {type(loaded).__name__}")
    settings = {}
    for key, value in loaded.items():
        if isinstance(value, dict) and key not in ("overrides",):
            settings.update(config.flatten(value, f"{key}."))
        else:
            settings[str(key)] = value
    return settings


def _params(pairs: list[str] | None) -> list[tuple[str, object]]:
    """--param KEY=VALUE pairs; VALUE is read as JSON where it parses (3e-4, true, [1, 2])."""
    params = []
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--param expects KEY=VALUE, got {pair!r}")
        try:
            params.append((key.strip(), json.loads(value)))
        except json.JSONDecodeError:
            params.append((key.strip(), value))
    return params


def settings_from_args(args, default_profile: str = "paper") -> RunSettings:
    """--config, then --profile, then --param, then the shorthand flags; checked by resolving
    the configuration, so a bad value fails here, before any model loads or upload."""
    settings = RunSettings()
    if getattr(args, "config", None):
        for key, value in load_run_config(args.config).items():
            settings.set(key, value, f"--config {args.config}:")
    if getattr(args, "profile", None):
        settings.profile = args.profile
    for key, value in _params(getattr(args, "param", None)):
        settings.set(key, value, "--param")
    shorthands = {"data": "data_source", "input_column": "input_column",
                  "output_column": "output_column", "base_model": "base_model",
                  "publish": "publish_to"}
    for flag, key in shorthands.items():
        if getattr(args, flag, None):
            settings.set(key, getattr(args, flag), f"--{flag.replace('_', '-')}")
    if getattr(args, "force", False):
        settings.run["force"] = "true"
    for dotted in config.COMPILE_TIME_FIELDS:
        if getattr(args, dotted.split(".")[-1], False):
            settings.compiled[dotted] = True
    settings.resolve(default_profile)
    if settings.run.get("publish_to"):
        from lastmile import storage

        try:
            storage.parse_uri(settings.run["publish_to"])
        except (storage.StorageError, ValueError) as exc:
            raise UsageError(f"publish_to: {exc}") from None
    return settings


# --------------------------------------------------------------------------- entry points

def compile_pipeline(out: Path, image: str, cluster: ClusterSettings,
                     settings: RunSettings | None = None) -> Path:
    """The IR YAML; `settings` (from --config/--param) become the parameters' defaults."""
    from kfp import compiler

    settings = settings or RunSettings()
    pipeline = build_pipeline(image, cluster, compiled=settings.compiled,
                              defaults=settings.pipeline_arguments())
    compiler.Compiler().compile(pipeline, str(out))
    return out


@dataclass
class LocalRun:
    """What `run_locally` did: trained (report in out_dir) or skipped (nothing new)."""

    out_dir: Path
    trained: bool
    message: str
    published: str | None = None  # the published run's URI, when publish_to was given


def run_locally(settings: RunSettings, out_dir: Path | None = None,
                verbose: bool = False) -> LocalRun:
    """Run the whole DAG in this environment through kfp.local; copy the report to out_dir.

    The pipeline gets exactly the arguments a cluster run would (RunSettings.
    pipeline_arguments), so the resolve_config step resolves the same configuration. With
    `publish_to`, the results are published there and a run whose data, base model and
    configuration match the latest published run trains nothing (`force` retrains anyway):
    the result then says so and out_dir holds only `no-new-data.md`.

    The screen (lastmile.console) gets one line per stage as it starts and ends, the running
    stage's progress bar and where things are; kfp.local's output and every stage's full log
    go to out_dir/logs/ (`verbose`: shown live too). runs/latest points at the run from its
    start, so a failed run is found too; out_dir/COMPLETE or FAILED says how it ended. A
    failed stage raises console.RunFailed once its error and log path are on the screen.
    """
    from google.protobuf import json_format
    from kfp import local

    from lastmile import console, freshness

    profile = settings.resolve("demo")  # fail fast on a bad parameter, before any stage
    arguments = {"profile": "demo", **settings.pipeline_arguments()}
    out_dir = out_dir or Path("runs") / _stamp()
    out_dir.mkdir(parents=True, exist_ok=True)
    console.point_latest(out_dir)
    pipeline_root = (out_dir / "kfp").resolve()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=True)
    pipeline = build_pipeline(compiled=settings.compiled)
    names = console.display_names(json_format.MessageToDict(pipeline.pipeline_spec))
    title = (f"lastmile run {out_dir} (profile {profile.name}): full logs in "
             f"{out_dir / console.LOG_DIR}/" + ("" if verbose else " (-v shows them here)"))
    with console.RunConsole(out_dir, names=names, verbose=verbose, title=title) as screen:
        try:
            result = pipeline(**arguments)
        except (Exception, KeyboardInterrupt) as exc:  # kfp's "Inner task failed" wrapper
            raise screen.fail(exc) from None
        outcome = json.loads(result.output)
        if outcome["status"] == "skipped":
            (out_dir / "no-new-data.md").write_text(f"# No new data\n\n{outcome['message']}\n")
            screen.finish([f"no new data: {outcome['message']}"], outcome="no new data",
                          status={"note": out_dir / "no-new-data.md"})
            return LocalRun(out_dir, trained=False, message=outcome["message"])
        report_dir = Path(outcome["report"])
        for item in report_dir.iterdir():
            target = out_dir / item.name
            if item.is_dir():
                shutil.copytree(item, target, dirs_exist_ok=True)
            else:
                shutil.copy2(item, target)
        published = None
        publish_to = settings.run.get("publish_to")
        if publish_to:
            name, _ = freshness.latest_published(publish_to)
            published = freshness.run_uri(publish_to, name) if name else None
        # <pipeline run>/report/report_dir: the adapters are its siblings' outputs.
        pipeline_run = out_dir / report_dir.parent.parent.relative_to(out_dir.resolve())
        adapters = {"RL adapter (PPO)": pipeline_run / "train-ppo" / "ppo_model" / "adapter",
                    "MLE adapter": pipeline_run / "train-mle" / "mle_model" / "adapter"}
        lines = console.where_things_are(out_dir, adapters, published)
        screen.finish(lines, status={"report": out_dir / "report.html",
                                     "rl_adapter": adapters["RL adapter (PPO)"],
                                     "mle_adapter": adapters["MLE adapter"],
                                     **({"published": published} if published else {})})
    return LocalRun(out_dir, trained=True, message="\n".join(lines), published=published)


def show_config(profile: config.Profile, out=None) -> None:
    """Every field with its type, value and meaning; '*' marks values that differ from the
    paper's (the paper profile's)."""
    out = out or sys.stdout
    paper = {info.path: info.value for info in config.field_infos(config.get_profile("paper"))}
    infos = config.field_infos(profile)
    width = max(len(info.path) for info in infos)
    twidth = max(len(info.type) for info in infos)
    print(f"profile {profile.name}  ('*': differs from the paper's value; [name]: the pipeline "
          f"parameter that sets it; any field: --param FIELD=VALUE or --config FILE)", file=out)
    for info in infos:
        value = info.value if not isinstance(info.value, str) else repr(info.value)
        value = str(value) if len(str(value)) <= 40 else str(value)[:37] + "..."
        mark = "*" if info.path != "name" and paper.get(info.path) != info.value else " "
        param = f" [{info.parameter}]" if info.parameter else ""
        print(f"{info.path:<{width}}  {info.type:<{twidth}}  {mark}{value:<41} {info.help}{param}",
              file=out)


# --------------------------------------------------------------------------- the cluster

def _client(args):
    """A kfp.Client for --host with the credentials multi-user Kubeflow expects: --token (a
    bearer token), else the service-account token file kfp reads in a pod
    (KF_PIPELINES_SA_TOKEN_PATH, or its default path when that exists), and --cookies for a
    Dex-fronted endpoint (e.g. authservice_session=...)."""
    import os

    import kfp
    from kfp.client import KF_PIPELINES_SA_TOKEN_ENV, KF_PIPELINES_SA_TOKEN_PATH
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    kwargs = {"host": args.host}
    if args.namespace:
        kwargs["namespace"] = args.namespace
    if args.cookies:
        kwargs["cookies"] = args.cookies
    if args.token:
        kwargs["existing_token"] = args.token
    else:
        token_path = os.environ.get(KF_PIPELINES_SA_TOKEN_ENV) or (
            KF_PIPELINES_SA_TOKEN_PATH if Path(KF_PIPELINES_SA_TOKEN_PATH).exists() else None)
        if token_path:
            if not Path(token_path).is_file():
                raise UsageError(f"{KF_PIPELINES_SA_TOKEN_ENV}={token_path}: no such file")
            kwargs["credentials"] = ServiceAccountTokenVolumeCredentials(path=token_path)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP v2.0.0-beta.2+"
        return kfp.Client(**kwargs)


def default_version_name() -> str:
    """lastmile's package version and the git commit of this checkout ('-dirty' when tracked
    files changed), e.g. 0.1.0-3e59738; the UI then shows which code a run ran."""
    import subprocess

    from lastmile import __version__

    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=root, text=True,
                                capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, text=True, capture_output=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"{__version__}-nogit"
    return f"{__version__}-{commit}{'-dirty' if dirty else ''}"


def upload_version(client, package: Path, pipeline_name: str, version_name: str,
                   description: str = "", namespace: str | None = None) -> tuple[str, str]:
    """Upload `package` as version `version_name` of the pipeline `pipeline_name` (created,
    empty, when missing); (pipeline_id, version_id). An existing version name is an error."""
    import kfp_server_api

    pipeline_id = find_pipeline(client, pipeline_name, namespace)
    if pipeline_id is None:
        created = client._pipelines_api.pipeline_service_create_pipeline(
            kfp_server_api.V2beta1Pipeline(display_name=pipeline_name, namespace=namespace,
                                           description=description or _PIPELINE_DESCRIPTION))
        pipeline_id = _answered(created, "pipeline_id", "creating the pipeline")
    elif find_version(client, pipeline_id, version_name) is not None:
        raise UsageError(f"--version-name {version_name}: pipeline {pipeline_name!r} already has "
                         f"that version; commit your change or name another version")
    version = client.upload_pipeline_version(str(package), version_name, pipeline_id=pipeline_id,
                                             description=description or None)
    return pipeline_id, _answered(version, "pipeline_version_id", "uploading the version")


def find_pipeline(client, name: str, namespace: str | None) -> str | None:
    """The id of the pipeline named `name` in `namespace` (multi-user Kubeflow keeps a
    team's pipelines in its profile namespace), or None."""
    name_filter = json.dumps({"predicates": [
        {"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    found = client.list_pipelines(filter=name_filter, namespace=namespace,
                                  page_size=100).pipelines or []
    ids = [p.pipeline_id for p in found if p.display_name == name]
    if len(ids) > 1:
        raise UsageError(f"--pipeline-name {name}: {len(ids)} pipelines have that name")
    return ids[0] if ids else None


def find_version(client, pipeline_id: str, version: str):
    """The version of a pipeline named (or with the id) `version`; 'latest' is the newest."""
    listing = client.list_pipeline_versions(pipeline_id, page_size=200,
                                            sort_by="created_at desc")
    versions = listing.pipeline_versions or []
    if version == "latest":
        return versions[0] if versions else None
    for item in versions:
        if version in (item.display_name, item.pipeline_version_id):
            return item
    return None


def _pipeline_reference(client, args) -> tuple[str, str] | None:
    """(pipeline_id, version_id) of --pipeline-version, or None to compile a package."""
    if not args.pipeline_version:
        return None
    pipeline_id = find_pipeline(client, args.pipeline_name, args.namespace or None)
    if pipeline_id is None:
        raise UsageError(f"--pipeline-name {args.pipeline_name}: no such pipeline on {args.host} "
                         f"(upload it first: python pipeline.py upload)")
    version = find_version(client, pipeline_id, args.pipeline_version)
    if version is None:
        raise UsageError(f"--pipeline-version {args.pipeline_version}: pipeline "
                         f"{args.pipeline_name!r} has no such version")
    return pipeline_id, version.pipeline_version_id


def schedule(client, args, arguments: dict, experiment_id: str, package: Path | None,
             reference: tuple[str, str] | None) -> tuple[str, list[str]]:
    """Create the enabled recurring run `args.name` (cron, one run at a time, no backfill) and
    delete any earlier schedule of that name in the experiment, so running the command again
    updates the schedule instead of adding a second one. (new id, replaced ids)"""
    name_filter = json.dumps({"predicates": [
        {"operation": "EQUALS", "key": "display_name", "stringValue": args.name}]})
    existing = client.list_recurring_runs(experiment_id=experiment_id, page_size=100,
                                          filter=name_filter).recurring_runs or []
    pipeline_id, version_id = reference or (None, None)
    job = client.create_recurring_run(
        experiment_id=experiment_id, job_name=args.name, cron_expression=args.cron,
        pipeline_package_path=str(package) if package else None, pipeline_id=pipeline_id,
        version_id=version_id, params=arguments, max_concurrency=1, no_catchup=True,
        enabled=True, service_account=args.service_account or None)
    _answered(job, "recurring_run_id", f"recurring run {args.name}")
    replaced = []
    for old in existing:
        if old.display_name == args.name and old.recurring_run_id != job.recurring_run_id:
            client.delete_recurring_run(old.recurring_run_id)
            replaced.append(old.recurring_run_id)
    return job.recurring_run_id, replaced


def _cluster_from_args(args) -> ClusterSettings:
    for flag in ("train_gpus", "shard_parallelism", "training_timeout", "generation_timeout",
                 "step_timeout", "trainer_nodes"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.checkpoint_prefix:
        from lastmile import storage

        try:
            storage.parse_uri(args.checkpoint_prefix)
        except (storage.StorageError, ValueError) as exc:
            raise UsageError(f"--checkpoint-prefix: {exc}") from None
    settings = ClusterSettings(s3_secret=args.s3_secret or None, cache_pvc=args.cache_pvc or None,
                               s3_endpoint=args.s3_endpoint or None,
                               accelerator_type=args.accelerator_type,
                               train_gpus=args.train_gpus,
                               training_timeout_s=args.training_timeout,
                               generation_timeout_s=args.generation_timeout,
                               step_timeout_s=args.step_timeout,
                               shard_parallelism=args.shard_parallelism,
                               checkpoint_prefix=args.checkpoint_prefix,
                               security_context=not args.no_security_context,
                               mlflow_uri=args.mlflow_uri or None,
                               trainer=args.trainer, trainer_nodes=args.trainer_nodes,
                               trainer_runtime=args.trainer_runtime,
                               trainer_delete=args.trainjob_delete)
    if args.image is None:  # a cluster without GPUs runs the CPU image (make image-cpu)
        args.image = components.DEFAULT_IMAGE + ("-cpu" if not settings.has_gpus else "")
    stages = set(components.STAGES)
    for item in args.step_resources or []:  # STEP=cpu=8,memory=64Gi,memory_limit=96Gi
        step, _, spec = item.partition("=")
        if step not in stages:
            raise UsageError(f"--step-resources {item}: no step {step!r}; steps: "
                             f"{', '.join(components.STAGES)}")
        values = dict(part.partition("=")[::2] for part in spec.split(",") if part)
        unknown = set(values) - {"cpu", "memory", "memory_limit"}
        if unknown or not values or not all(values.values()):
            raise UsageError(f"--step-resources {item}: expected STEP=cpu=N,memory=Q,"
                             f"memory_limit=Q")
        for value in values.values():
            _scale(value, 1)  # a quantity, or a clear error
        settings.step_resources[step] = values
    for item in args.node_selector or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--node-selector expects KEY=VALUE, got {item!r}")
        settings.node_selector[key] = value
    for item in args.toleration or []:  # key=value:Effect or key:Effect
        keyval, _, effect = item.partition(":")
        key, sep, value = keyval.partition("=")
        if not key:
            raise UsageError(f"--toleration expects KEY[=VALUE]:EFFECT, got {item!r}")
        settings.tolerations.append({"key": key, "operator": "Equal" if sep else "Exists",
                                     "value": value or None, "effect": effect or None})
    return settings


def _compile_time_flags(p):
    p.add_argument("--init-policy-from-mle", action="store_true",
                   help="start PPO's policy from the MLE adapter (PPO then waits for MLE)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="let the steps load the base model's pickle weights (.bin/.pt), "
                        "which run code; fixed in the compiled pipeline, not a run "
                        "parameter")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the steps run the base model's own Python code; fixed in the "
                        "compiled pipeline")
    p.add_argument("--bleurt-allow-pickle", action="store_true",
                   help="let the score step load a BLEURT checkpoint's pickle weights")

def _cluster_flags(p):
    p.add_argument("--image", default=None,
                   help=f"container image of every step (default {components.DEFAULT_IMAGE}, "
                        "with -cpu appended for --accelerator-type none)")
    p.add_argument("--accelerator-type", default="nvidia.com/gpu",
                   help="GPU resource of training and generation steps; 'none' compiles "
                        "for a cluster without GPUs (CPU image, no GPU requests)")
    p.add_argument("--train-gpus", type=int, default=1, metavar="N",
                   help="GPUs per training task (reward, MLE, PPO); the paper profile "
                        "(train_processes=0) runs one data-parallel process per GPU")
    p.add_argument("--node-selector", action="append", metavar="KEY=VALUE")
    p.add_argument("--toleration", action="append", metavar="KEY[=VALUE]:EFFECT")
    p.add_argument("--s3-secret", default="lastmile-s3-credentials",
                   help="Secret providing object-store credentials as env vars ('' for none); "
                        f"{KUBEFLOW_ARTIFACT_SECRET} (keys accesskey/secretkey) is mapped "
                        "to AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    p.add_argument("--s3-endpoint", default="",
                   help=f"object-store endpoint as a plain {ENDPOINT_VAR} variable (default "
                        f"with --s3-secret {KUBEFLOW_ARTIFACT_SECRET}: {KUBEFLOW_ENDPOINT})")
    p.add_argument("--cache-pvc", default="lastmile-model-cache",
                   help="PVC mounted at /cache for the model cache ('' for none)")
    p.add_argument("--step-resources", action="append", metavar="STEP=cpu=N,memory=Q",
                   help="one step's requests (and memory_limit), e.g. "
                        "score=cpu=8,memory=32Gi")
    p.add_argument("--checkpoint-prefix", default="s3://lastmile/checkpoints/",
                   help="where training steps checkpoint unless the run sets "
                        "checkpoint_dir: object storage, so a retry on a new pod resumes "
                        "('' for the pod's disk)")
    p.add_argument("--training-timeout", type=int, default=24 * 3600, metavar="SECONDS",
                   help="deadline of each training attempt (retries get their own)")
    p.add_argument("--generation-timeout", type=int, default=6 * 3600, metavar="SECONDS")
    p.add_argument("--step-timeout", type=int, default=4 * 3600, metavar="SECONDS",
                   help="deadline of every other step")
    p.add_argument("--shard-parallelism", type=int, default=4, metavar="N",
                   help="generation shards running at once (each holds a GPU)")
    p.add_argument("--trainer", choices=("kfp", "kubeflow-trainer"), default="kfp",
                   help="kfp: training runs in its step's pod (one node); "
                        "kubeflow-trainer: the step launches a TrainJob (torchrun on "
                        "--trainer-nodes nodes of --train-gpus GPUs) and waits for it "
                        "(docs/scaling.md; apply manifests/overlays/kubeflow-trainer)")
    p.add_argument("--trainer-nodes", type=int, default=1, metavar="N",
                   help="nodes of each TrainJob (--trainer kubeflow-trainer)")
    p.add_argument("--trainer-runtime", default="torch-distributed",
                   help="the Trainer runtime a TrainJob references")
    p.add_argument("--trainjob-delete", choices=("always", "on-success", "never"),
                   default="always", help="delete a TrainJob when it ends")
    p.add_argument("--mlflow-uri", default="", metavar="URL",
                   help="MLFLOW_TRACKING_URI of the training and report steps: each run "
                        "becomes one MLflow run (docs/tracking.md)")
    p.add_argument("--no-security-context", action="store_true",
                   help="leave out runAsNonRoot/runAsUser (for KFP backends older than "
                        "2.17, docs/deploy.md)")
    _compile_time_flags(p)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def settings_flags(p, profile_default=None):
        default_text = profile_default or "the pipeline's profile parameter: paper"
        # No argparse default: a --config file's `profile:` applies unless --profile is given.
        p.add_argument("--profile", choices=sorted(config.PROFILES), default=None,
                       help=f"starting configuration (default: the --config file's profile, "
                            f"else {default_text})")
        p.add_argument("--config", type=Path, metavar="FILE",
                       help="run configuration: YAML with `profile:` and dotted fields "
                            "(ppo.optim.head_learning_rate: 3.0e-3), pipeline parameters or "
                            "run parameters; --param wins over it")
        p.add_argument("--param", action="append", metavar="KEY=VALUE",
                       help="a pipeline parameter, a run parameter or any dotted configuration "
                            "field (`config show` lists them): "
                            f"{', '.join(config.PIPELINE_PARAMETERS)}")

    def result_flags(p):
        p.add_argument("--publish", default="", metavar="S3_URI",
                       help="publish adapters, scores.json and the report under "
                            "S3_URI<run name>/ (pipeline parameter publish_to); a run whose "
                            "data, base model and configuration match the latest published "
                            "run there trains nothing")
        p.add_argument("--force", action="store_true",
                       help="train even when nothing is new (pipeline parameter force)")

    def server_flags(p):
        p.add_argument("--host", required=True, help="the Kubeflow Pipelines endpoint")
        p.add_argument("--namespace", default="",
                       help="the namespace runs execute in (multi-user Kubeflow: your profile's)")
        p.add_argument("--token", default="",
                       help="bearer token (default: the service-account token file named by "
                            "KF_PIPELINES_SA_TOKEN_PATH, as in a pod)")
        p.add_argument("--cookies", default="",
                       help="cookies for a Dex-fronted endpoint, e.g. "
                            "'authservice_session=...' (copied from a signed-in browser)")

    p = sub.add_parser("run", help="run the pipeline locally through kfp.local")
    settings_flags(p, profile_default="demo")
    p.add_argument("--data", default="",
                   help="file, directory, hub id or s3:// URI (default: bundled)")
    p.add_argument("--input-column")
    p.add_argument("--output-column")
    p.add_argument("--base-model")
    p.add_argument("--out", type=Path, help="report directory (default runs/<timestamp>)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show kfp.local's output and every stage's full log live (always "
                        "written to <run>/logs/)")
    result_flags(p)
    _compile_time_flags(p)

    p = sub.add_parser("tune", help="equal step-size search for MLE and RL on a validation "
                                    "split of the training rows (lastmile.tune)")
    settings_flags(p, profile_default="demo")
    p.add_argument("--data", default="",
                   help="file, directory, hub id or s3:// URI (default: bundled)")
    p.add_argument("--trials", type=int, default=tune.TRIALS, metavar="N",
                   help="trials per method (MLE and RL get the same number; default "
                        f"{tune.TRIALS})")
    p.add_argument("--max-train", type=int, metavar="N",
                   help="training rows before the validation split (default: the profile's)")
    p.add_argument("--validation-fraction", type=float, default=tune.VALIDATION_FRACTION,
                   metavar="F", help="share of the filtered training rows held out for "
                                     f"selection (default {tune.VALIDATION_FRACTION})")
    p.add_argument("--out", type=Path, help="default runs/tune-<timestamp>")

    p = sub.add_parser("reproduce", help="the local run once per seed, then mean and standard "
                                         "deviation per metric (lastmile.reproduce)")
    settings_flags(p, profile_default="demo")
    p.add_argument("--seeds", default=DEFAULT_SEEDS,
                   help=f"comma-separated seeds (default {DEFAULT_SEEDS})")
    p.add_argument("--fixed-data", action="store_true",
                   help="vary only the negatives, reward, MLE and PPO seeds (default: the "
                        "seed parameter, which also draws each run's data rows)")
    p.add_argument("--from-runs", type=Path, nargs="+", metavar="RUN",
                   help="run nothing: summarise these finished run folders (runs/<stamp>), "
                        "each seed read from its run_info.json")
    p.add_argument("--out", type=Path, help="summary folder (default runs/reproduce-<timestamp>)")
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("config", help="show the configuration a run would get")
    what = p.add_subparsers(dest="config_command", required=True)
    show = what.add_parser("show", help="every field with its type, value and meaning")
    settings_flags(show, profile_default=None)

    p = sub.add_parser("compile", help="write the pipeline IR YAML")
    p.add_argument("-o", "--output", type=Path, default=Path("pipeline.yaml"))
    settings_flags(p)
    _cluster_flags(p)

    p = sub.add_parser("upload", help="compile and upload as a new version of a named pipeline")
    server_flags(p)
    p.add_argument("--pipeline-name", default="lastmile")
    p.add_argument("--version-name", default="",
                   help="default: lastmile's version and the git commit, e.g. 0.1.0-3e59738")
    p.add_argument("--description", default="")
    settings_flags(p)
    _cluster_flags(p)

    for name, help_text in (("submit", "start a run on a Kubeflow Pipelines host"),
                            ("schedule",
                             "create or update a recurring run (retraining on new data)")):
        p = sub.add_parser(name, help=help_text)
        server_flags(p)
        p.add_argument("--experiment", default="lastmile")
        p.add_argument("--service-account", default="",
                       help="e.g. lastmile-pipeline-runner (default: the namespace's default; "
                            "the KFP admin must allow it, docs/deploy.md)")
        p.add_argument("--pipeline-name", default="lastmile",
                       help="the uploaded pipeline --pipeline-version belongs to")
        p.add_argument("--pipeline-version", default="", metavar="NAME|ID|latest",
                       help="run an uploaded version (python pipeline.py upload) instead of "
                            "compiling this checkout; the compile flags then do not apply")
        settings_flags(p)
        result_flags(p)
        _cluster_flags(p)
        if name == "submit":
            p.add_argument("--run-name", default="", help="default: lastmile <timestamp>")
        else:
            p.add_argument("--cron", required=True,
                           help="e.g. '0 0 3 * * *' (KFP: 6 fields, seconds first)")
            p.add_argument("--name", default="lastmile-retrain",
                           help="the schedule's name: running the command again with the same "
                                "name replaces that schedule")
    return parser


def _check_cron(expr: str) -> None:
    fields = expr.split()
    if len(fields) != 6:
        raise UsageError(f"--cron {expr!r}: KFP cron has 6 fields, seconds first "
                         f"(e.g. '0 0 3 * * *'), got {len(fields)}")


def _compile_flags_given(args) -> list[str]:
    """Compile flags set to something other than their defaults (they do not apply to an
    uploaded --pipeline-version): the defaults come from a parser holding just those flags."""
    reference = argparse.ArgumentParser(add_help=False)
    _cluster_flags(reference)
    defaults = vars(reference.parse_args([]))
    return [f"--{dest.replace('_', '-')}" for dest, default in defaults.items()
            if getattr(args, dest) != default]


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    from lastmile.storage import StorageError

    try:
        return _main(parser, args)
    except (UsageError, config.ConfigError, StorageError) as exc:
        print(f"pipeline.py {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ServerError as exc:
        print(f"pipeline.py {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the server's answer, in one line instead of a client traceback
        message = _server_error(exc, getattr(args, "host", ""))
        if message is None:
            raise
        print(f"pipeline.py {args.command}: error: {message}", file=sys.stderr)
        return 1


def _server_error(exc: Exception, host: str) -> str | None:
    """One line for a Kubeflow Pipelines API error or an unreachable --host; None otherwise."""
    import kfp_server_api
    import urllib3

    if isinstance(exc, urllib3.exceptions.HTTPError):
        reason = getattr(exc, "reason", None) or exc
        return f"cannot reach --host {host}: {reason}"
    if isinstance(exc, kfp_server_api.ApiException):
        detail = exc.body
        try:
            detail = json.loads(exc.body).get("message") or exc.body
        except (TypeError, ValueError, AttributeError):
            pass
        hint = {401: " (pass --token, or --cookies for a Dex-fronted endpoint)",
                403: " (your identity may not use this namespace: --namespace)"}.get(exc.status, "")
        return f"{host} answered {exc.status} {exc.reason}: {detail}{hint}"
    return None


def _main(parser, args) -> int:
    if args.command == "config":
        settings = settings_from_args(args, default_profile="paper")
        show_config(settings.resolve("paper"))
        return 0
    if args.command == "run":
        from lastmile.console import RunFailed

        try:  # the console prints the stages, where things are and the next commands
            run_locally(settings_from_args(args, default_profile="demo"), args.out, args.verbose)
        except RunFailed as failed:  # its error and log are already the last lines shown
            return failed.exit_code
        return 0
    if args.command == "tune":
        return _tune(args)
    if args.command == "reproduce":
        return _reproduce(args)
    settings = settings_from_args(args)
    if args.command == "compile":
        cluster = _cluster_from_args(args)  # sets the image for --accelerator-type none
        path = compile_pipeline(args.output, args.image, cluster, settings)
        print(f"wrote {path}")
        return 0
    if args.command == "schedule":
        _check_cron(args.cron)
    import tempfile

    namespace = args.namespace or None
    if getattr(args, "pipeline_version", ""):
        given = _compile_flags_given(args)
        if given:
            raise UsageError(f"{', '.join(given)}: fixed when the version was uploaded; drop "
                             f"them or upload a new version (python pipeline.py upload ...)")
    cluster = _cluster_from_args(args)
    with tempfile.TemporaryDirectory() as tmp:
        client = _client(args)
        if args.command == "upload":
            package = compile_pipeline(Path(tmp) / "pipeline.yaml", args.image, cluster, settings)
            version = args.version_name or default_version_name()
            pipeline_id, version_id = upload_version(client, package, args.pipeline_name,
                                                     version, args.description, namespace)
            print(f"pipeline {args.pipeline_name} ({pipeline_id}): version {version} "
                  f"({version_id}) uploaded")
            return 0
        reference = _pipeline_reference(client, args)
        package = None
        if reference is None:
            # The compiled package carries the compile-time fields; the run's settings go
            # in as its arguments, so the UI shows what this run was asked for.
            compile_settings = RunSettings(compiled=settings.compiled)
            package = compile_pipeline(Path(tmp) / "pipeline.yaml", args.image, cluster,
                                       compile_settings)
        elif settings.compiled:
            raise UsageError("--allow-pickle/--trust-remote-code/--bleurt-allow-pickle/"
                             "--init-policy-from-mle: fixed when the version was uploaded")
        arguments = settings.pipeline_arguments()
        experiment = client.create_experiment(args.experiment, namespace=namespace)
        _answered(experiment, "experiment_id", f"experiment {args.experiment}")
        if args.command == "submit":
            run_name = args.run_name or f"lastmile {_dt.datetime.now():%Y-%m-%d %H-%M-%S}"
            pipeline_id, version_id = reference or (None, None)
            run = client.run_pipeline(
                experiment_id=experiment.experiment_id, job_name=run_name,
                pipeline_package_path=str(package) if package else None, params=arguments,
                pipeline_id=pipeline_id, version_id=version_id,
                service_account=args.service_account or None)
            print(f"run {_answered(run, 'run_id', 'the run')} started")
        else:
            job_id, replaced = schedule(client, args, arguments, experiment.experiment_id,
                                        package, reference)
            verb = f"updated (replaced {', '.join(replaced)})" if replaced else "created"
            print(f"recurring run {job_id} {verb}: {args.name}, enabled, cron {args.cron!r}")
    return 0


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--seeds expects comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds expects distinct integers, got {text!r}")
    return seeds


def reproduce_settings(settings: RunSettings, seed: int, fixed_data: bool) -> RunSettings:
    """`settings` with the seed of one reproduce run (lastmile.reproduce.seed_settings)."""
    import copy

    from lastmile import reproduce

    one = copy.deepcopy(settings)
    one.parameters.pop("seed", None)  # the run's own seed wins over a --param seed
    for key, value in reproduce.seed_settings(seed, fixed_data).items():
        one.set(key, value, "reproduce")
    one.resolve("demo")
    return one


def _tune(args) -> int:
    """`tune`: argument handling here, the search in lastmile.tune."""
    settings = settings_from_args(args, default_profile="demo")
    if args.trials < 1:
        raise UsageError(f"--trials must be >= 1, got {args.trials}")
    if args.max_train is not None:
        settings.set("max_train", args.max_train, "--max-train")
    out = args.out or Path("runs") / f"tune-{_stamp()}"
    record = tune.tune(settings.resolve("demo"), out, trials=args.trials,
                       data_source=settings.run.get("data_source", ""),
                       validation_fraction=args.validation_fraction)
    print(f"\ntrials: {out / 'tune.md'}, {out / 'tune.json'}\n"
          f"chosen (pipeline.py run --profile {record['profile']} --config "
          f"{out / 'chosen.yaml'}):\n\n"
          f"{record['chosen_yaml']}", end="")
    return 0


def _reproduce(args) -> int:
    """`reproduce`: one local run per seed (run_locally), the summary in lastmile.reproduce."""
    from lastmile import reproduce
    from lastmile.console import RunFailed

    stamp = _stamp()
    if args.from_runs:
        given = [flag for flag, value in (("--seeds", args.seeds != DEFAULT_SEEDS),
                                          ("--fixed-data", args.fixed_data),
                                          ("--profile", args.profile), ("--config", args.config),
                                          ("--param", args.param)) if value]
        if given:
            raise UsageError(f"--from-runs summarises runs that already ran: drop "
                             f"{', '.join(given)} (each run's folder says how it ran)")
        try:
            reproduce.from_runs(args.from_runs, args.out or Path("runs") / f"reproduce-{stamp}")
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        return 0
    settings = settings_from_args(args, default_profile="demo")
    # every run's configuration checked before the first starts
    per_seed = {seed: reproduce_settings(settings, seed, args.fixed_data)
                for seed in _seeds(args.seeds)}

    def run_one(seed: int) -> Path:
        run = run_locally(per_seed[seed], Path("runs") / f"{stamp}-seed{seed}", args.verbose)
        if not run.trained:
            raise UsageError(f"seed {seed}: the run trained nothing ({run.message})")
        return run.out_dir

    try:
        reproduce.reproduce(run_one, list(per_seed), args.out or Path("runs") /
                            f"reproduce-{stamp}", fixed_data=args.fixed_data)
    except RunFailed as failed:
        return failed.exit_code
    return 0


def _stamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


if __name__ == "__main__":
    sys.exit(main())
