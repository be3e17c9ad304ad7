#!/usr/bin/env python
"""lastmile's Kubeflow pipeline: the DAG and its one entry point.

    python pipeline.py compile [-o pipeline.yaml] [--image IMG] ...   IR YAML for the Kubeflow UI
    python pipeline.py run [--profile demo] [--data URI] ...           the same DAG, locally (kfp.local)
    python pipeline.py submit --host URL [--param KEY=VALUE ...]       a run on a cluster
    python pipeline.py schedule --host URL --cron EXPR [...]           a recurring run (retraining)

DAG (DESIGN.md): filter -> check for new data -> [if new: negatives -> reward -> PPO; MLE
beside them; plan shards -> for each shard: base / MLE / RL generate -> post-process (base,
MLE) -> score -> gather shards -> report -> (if publish_to) publish] [else: no new data, the
run ends]. No method logic lives here.
"""

# No `from __future__ import annotations`: KFP reads the pipeline's annotations as types.
import argparse
import datetime as _dt
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kfp import dsl

import components
from lastmile import config

_PAPER = config.pipeline_arguments(config.get_profile("paper"))

#: Pipeline parameters beside the configuration ones (config.PIPELINE_PARAMETERS).
RUN_PARAMETERS = ("data_source", "profile", "publish_to", "force")

#: Kubeflow's own object-store Secret (KFP creates it in each namespace runs execute in); its
#: keys are `accesskey`/`secretkey` and it holds no endpoint.
KUBEFLOW_ARTIFACT_SECRET = "mlpipeline-minio-artifact"
KUBEFLOW_SECRET_KEYS = {"accesskey": "AWS_ACCESS_KEY_ID", "secretkey": "AWS_SECRET_ACCESS_KEY"}
KUBEFLOW_ENDPOINT = "http://minio-service.kubeflow:9000"
#: Our Secret (manifests/base/s3-credentials-secret.template.yaml): keys named as the variables.
LASTMILE_SECRET_KEYS = {key: key for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                             "LASTMILE_S3_ENDPOINT")}
ENDPOINT_VAR = "LASTMILE_S3_ENDPOINT"


@dataclass
class ClusterSettings:
    """Where tasks run on a cluster; compile-time choices, never in effect for local runs."""

    accelerator_type: str = "nvidia.com/gpu"
    # GPUs of each training task (reward, MLE, PPO); with train_processes=0 (the paper
    # profile) the stage runs one data-parallel process per GPU. Generation shards take one.
    train_gpus: int = 1
    gpu_cpu_request: str = "4"
    gpu_memory_request: str = "24Gi"
    gpu_memory_limit: str = "48Gi"
    cpu_request: str = "1"
    memory_request: str = "4Gi"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, str]] = field(default_factory=list)
    s3_secret: str | None = None  # a Secret whose keys become environment variables
    s3_endpoint: str | None = None  # plain LASTMILE_S3_ENDPOINT (default for Kubeflow's Secret)
    cache_pvc: str | None = None  # a PersistentVolumeClaim mounted at /cache (model cache)
    training_retries: int = 2

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
                   init_policy_from_mle: bool = False):
    """The pipeline function, its components running in `image`.

    `init_policy_from_mle` starts PPO's policy from the MLE adapter (beyond the paper); only
    then does PPO wait for MLE training, otherwise the two train side by side.
    """
    c = components.build(image)

    def gpu(task, retries: int = 0, gpus: int = 1):
        if cluster is not None:
            task.set_accelerator_type(cluster.accelerator_type).set_accelerator_limit(gpus)
            task.set_cpu_request(cluster.gpu_cpu_request)
            task.set_memory_request(cluster.gpu_memory_request)
            task.set_memory_limit(cluster.gpu_memory_limit)
            if retries:
                task.set_retry(num_retries=retries, backoff_duration="60s")
        return _platform(task, cached=True)

    def cpu(task, cached: bool = True):
        if cluster is not None:
            task.set_cpu_request(cluster.cpu_request).set_memory_request(cluster.memory_request)
        return _platform(task, cached=cached)

    def _platform(task, cached: bool):
        task.set_caching_options(cached)
        if cluster is None:
            return task
        from kfp import kubernetes

        secret_keys, plain_env = cluster.s3_environment()
        if secret_keys:
            kubernetes.use_secret_as_env(task, secret_name=cluster.s3_secret,
                                         secret_key_to_env=secret_keys)
        for name, value in plain_env.items():
            task.set_env_variable(name, value)
        if cluster.cache_pvc:
            kubernetes.mount_pvc(task, pvc_name=cluster.cache_pvc, mount_path="/cache")
        for key, value in cluster.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for tol in cluster.tolerations:
            kubernetes.add_toleration(task, key=tol.get("key"), operator=tol.get("operator", "Equal"),
                                      value=tol.get("value"), effect=tol.get("effect"))
        return task

    retries = cluster.training_retries if cluster is not None else 0
    train_gpus = cluster.train_gpus if cluster is not None else 1

    def train(task):
        task = gpu(task, retries, train_gpus)
        if cluster is not None and train_gpus > 1:
            # One process per GPU (train_processes=0): NCCL and torch multiprocessing share
            # memory through /dev/shm, which is 64 MiB in a pod unless mounted.
            from kfp import kubernetes

            kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm",
                                       medium="Memory")
        return task

    @dsl.pipeline(name="lastmile",
                  description="RL fine-tuning without human feedback beside an MLE baseline, "
                              "scored with ROUGE, length-adjusted ROUGE and BLEURT.")
    def lastmile_pipeline(
        data_source: str = "",
        profile: str = "paper",
        publish_to: str = "",
        force: bool = False,
        base_model: str = _PAPER["base_model"],
        input_column: str = _PAPER["input_column"],
        output_column: str = _PAPER["output_column"],
        instruction: str = _PAPER["instruction"],
        max_input_tokens: int = _PAPER["max_input_tokens"],
        max_train: int = _PAPER["max_train"],
        max_test: int = _PAPER["max_test"],
        test_fraction: float = _PAPER["test_fraction"],
        strict: bool = _PAPER["strict"],
        seed: int = _PAPER["seed"],
        reward_learning_rate: float = _PAPER["reward_learning_rate"],
        reward_head_learning_rate: float = _PAPER["reward_head_learning_rate"],
        reward_batch_size: int = _PAPER["reward_batch_size"],
        reward_lora_r: int = _PAPER["reward_lora_r"],
        reward_max_steps: int = _PAPER["reward_max_steps"],
        mle_learning_rate: float = _PAPER["mle_learning_rate"],
        mle_batch_size: int = _PAPER["mle_batch_size"],
        mle_max_steps: int = _PAPER["mle_max_steps"],
        ppo_learning_rate: float = _PAPER["ppo_learning_rate"],
        ppo_batch_size: int = _PAPER["ppo_batch_size"],
        ppo_max_updates: int = _PAPER["ppo_max_updates"],
        ppo_temperature: float = _PAPER["ppo_temperature"],
        ppo_length_penalty: float = _PAPER["ppo_length_penalty"],
        ppo_reference_fraction: float = _PAPER["ppo_reference_fraction"],
        precision: str = _PAPER["precision"],
        mle_precision: str = _PAPER["mle_precision"],
        max_new_tokens: int = _PAPER["max_new_tokens"],
        num_shards: int = _PAPER["num_shards"],
        bleurt_checkpoint: str = _PAPER["bleurt_checkpoint"],
        allow_pickle: bool = _PAPER["allow_pickle"],
        trust_remote_code: bool = _PAPER["trust_remote_code"],
        train_processes: int = _PAPER["train_processes"],
        bleurt_allow_pickle: bool = _PAPER["bleurt_allow_pickle"],
    ) -> str:
        cfg = cpu(c.resolve_config(
            profile=profile, base_model=base_model, input_column=input_column,
            output_column=output_column, instruction=instruction,
            max_input_tokens=max_input_tokens, max_train=max_train, max_test=max_test,
            test_fraction=test_fraction, strict=strict, seed=seed,
            reward_learning_rate=reward_learning_rate,
            reward_head_learning_rate=reward_head_learning_rate,
            reward_batch_size=reward_batch_size,
            reward_lora_r=reward_lora_r, reward_max_steps=reward_max_steps,
            mle_learning_rate=mle_learning_rate, mle_batch_size=mle_batch_size,
            mle_max_steps=mle_max_steps, ppo_learning_rate=ppo_learning_rate,
            ppo_batch_size=ppo_batch_size, ppo_max_updates=ppo_max_updates,
            ppo_temperature=ppo_temperature, ppo_length_penalty=ppo_length_penalty,
            ppo_reference_fraction=ppo_reference_fraction, precision=precision,
            mle_precision=mle_precision,
            max_new_tokens=max_new_tokens,
            num_shards=num_shards,
            bleurt_checkpoint=bleurt_checkpoint, allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code, bleurt_allow_pickle=bleurt_allow_pickle,
            train_processes=train_processes, init_policy_from_mle=init_policy_from_mle)).output
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
            reward = train(c.train_reward(config=cfg, data=data.outputs["data"],
                                          negatives=negatives.outputs["negatives"]))
            reward.set_display_name("train reward model")
            mle = train(c.train_mle(config=cfg, data=data.outputs["data"]))
            mle.set_display_name("train MLE baseline")
            start_from = {"mle_model": mle.outputs["mle_model"]} if init_policy_from_mle else {}
            ppo = train(c.train_ppo(config=cfg, data=data.outputs["data"],
                                    reward_model=reward.outputs["reward_model"], **start_from))
            ppo.set_display_name("train PPO policy")

            # Generation and scoring fan out over shards of the test rows (lastmile.shards):
            # one task per shard and variant, each its own GPU on a cluster; `gather` puts
            # the shards back in order, as one unsharded run would have written them.
            plan = cpu(c.plan_shards(config=cfg, data=data.outputs["data"]))
            plan.set_display_name("plan shards")
            with dsl.ParallelFor(plan.output, name="shards") as shard:
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

    return lastmile_pipeline


# --------------------------------------------------------------------------- entry points

def compile_pipeline(out: Path, image: str, cluster: ClusterSettings,
                     init_policy_from_mle: bool = False) -> Path:
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(image, cluster, init_policy_from_mle), str(out))
    return out


@dataclass
class LocalRun:
    """What `run_locally` did: trained (report in out_dir) or skipped (nothing new)."""

    out_dir: Path
    trained: bool
    message: str
    published: str | None = None  # the published run's URI, when publish_to was given


def run_locally(profile_name: str, out_dir: Path | None, data: str = "",
                overrides: dict | None = None, *, publish_to: str = "", force: bool = False,
                init_policy_from_mle: bool = False) -> LocalRun:
    """Run the whole DAG in this environment through kfp.local; copy the report to out_dir.

    With `publish_to`, the results are published there and a run whose data, base model and
    configuration match the latest published run trains nothing (`force` retrains anyway):
    the result then says so and out_dir holds only `no-new-data.md`.
    """
    from kfp import local

    from lastmile import freshness, storage

    profile = config.get_profile(profile_name)
    arguments = config.pipeline_arguments(profile)
    arguments.update(overrides or {})
    config.resolve(profile_name, **arguments)  # fail fast on a bad parameter, before any stage
    if publish_to:
        storage.parse_uri(publish_to)  # fail fast on a bad URI too
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = out_dir or Path("runs") / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str((out_dir / "kfp").resolve()), raise_on_error=True)
    result = build_pipeline(init_policy_from_mle=init_policy_from_mle)(
        data_source=data, profile=profile_name, publish_to=publish_to, force=force, **arguments)
    outcome = json.loads(result.output)
    if outcome["status"] == "skipped":
        (out_dir / "no-new-data.md").write_text(f"# No new data\n\n{outcome['message']}\n")
        return LocalRun(out_dir, trained=False, message=outcome["message"])
    report_dir = Path(outcome["report"])
    for item in report_dir.iterdir():
        target = out_dir / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target)
    published = None
    if publish_to:
        name, _ = freshness.latest_published(publish_to)
        published = freshness.run_uri(publish_to, name) if name else None
    return LocalRun(out_dir, trained=True,
                    message=f"report: {out_dir / 'report.html'}\n        {out_dir / 'report.md'}",
                    published=published)


def _client(host: str, namespace: str | None = None):
    import kfp

    return kfp.Client(host=host, namespace=namespace) if namespace else kfp.Client(host=host)


def _params(pairs: list[str]) -> dict:
    params = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--param expects KEY=VALUE, got {pair!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def _cluster_from_args(args) -> ClusterSettings:
    if args.train_gpus < 1:
        raise SystemExit(f"--train-gpus must be >= 1, got {args.train_gpus}")
    settings = ClusterSettings(s3_secret=args.s3_secret or None, cache_pvc=args.cache_pvc or None,
                               s3_endpoint=args.s3_endpoint or None,
                               accelerator_type=args.accelerator_type,
                               train_gpus=args.train_gpus)
    for item in args.node_selector or []:
        key, _, value = item.partition("=")
        settings.node_selector[key] = value
    for item in args.toleration or []:  # key=value:Effect or key:Effect
        keyval, _, effect = item.partition(":")
        key, sep, value = keyval.partition("=")
        settings.tolerations.append({"key": key, "operator": "Equal" if sep else "Exists",
                                     "value": value or None, "effect": effect or None})
    return settings


def _run_arguments(args) -> dict:
    """--param pairs plus the --publish and --force shorthands, for submit and schedule."""
    params = _params(args.param)
    if args.publish:
        params["publish_to"] = args.publish
    if args.force:
        params["force"] = True
    unknown = set(params) - set(config.PIPELINE_PARAMETERS) - set(RUN_PARAMETERS)
    if unknown:
        raise SystemExit(f"unknown pipeline parameter(s): {', '.join(sorted(unknown))}")
    return params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipeline.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def dag_flags(p):
        p.add_argument("--init-policy-from-mle", action="store_true",
                       help="start PPO's policy from the MLE adapter (PPO then waits for MLE)")

    def cluster_flags(p):
        p.add_argument("--image", default=components.DEFAULT_IMAGE, help="container image of every step")
        p.add_argument("--accelerator-type", default="nvidia.com/gpu")
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
        dag_flags(p)

    def result_flags(p):
        p.add_argument("--publish", default="", metavar="S3_URI",
                       help="publish adapters, scores.json and the report under "
                            "S3_URI<run name>/ (pipeline parameter publish_to); a run whose "
                            "data, base model and configuration match the latest published "
                            "run there trains nothing")
        p.add_argument("--force", action="store_true",
                       help="train even when nothing is new (pipeline parameter force)")

    p = sub.add_parser("compile", help="write the pipeline IR YAML")
    p.add_argument("-o", "--output", type=Path, default=Path("pipeline.yaml"))
    cluster_flags(p)

    p = sub.add_parser("run", help="run the pipeline locally through kfp.local")
    p.add_argument("--profile", choices=sorted(config.PROFILES), default="demo")
    p.add_argument("--data", default="", help="file, directory, hub id or s3:// URI (default: bundled)")
    p.add_argument("--input-column")
    p.add_argument("--output-column")
    p.add_argument("--base-model")
    p.add_argument("--out", type=Path, help="report directory (default runs/<timestamp>)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help=f"any pipeline parameter: {', '.join(config.PIPELINE_PARAMETERS)}")
    result_flags(p)
    dag_flags(p)

    for name, help_text in (("submit", "start a run on a Kubeflow Pipelines host"),
                            ("schedule", "create a recurring run (retraining on new data)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--host", required=True)
        p.add_argument("--namespace", default="",
                       help="the namespace runs execute in (multi-user Kubeflow: the profile's)")
        p.add_argument("--experiment", default="lastmile")
        p.add_argument("--service-account", default="",
                       help="e.g. lastmile-pipeline-runner (default: the namespace's default)")
        p.add_argument("--param", action="append", metavar="KEY=VALUE")
        result_flags(p)
        cluster_flags(p)
        if name == "submit":
            p.add_argument("--run-name", default="", help="default: lastmile <timestamp>")
        else:
            p.add_argument("--cron", required=True, help="e.g. '0 0 3 * * *' (KFP: 6 fields, seconds first)")
            p.add_argument("--name", default="lastmile-retrain")

    args = parser.parse_args(argv)
    if args.command == "compile":
        path = compile_pipeline(args.output, args.image, _cluster_from_args(args),
                                args.init_policy_from_mle)
        print(f"wrote {path}")
    elif args.command == "run":
        overrides = _params(args.param)
        run_args = {key: overrides.pop(key) for key in RUN_PARAMETERS if key in overrides}
        for key in ("input_column", "output_column", "base_model"):
            if getattr(args, key):
                overrides[key] = getattr(args, key)
        result = run_locally(
            run_args.get("profile", args.profile), args.out,
            data=args.data or run_args.get("data_source", ""), overrides=overrides,
            publish_to=args.publish or run_args.get("publish_to", ""),
            force=args.force or config.as_bool(run_args.get("force", False), "force"),
            init_policy_from_mle=args.init_policy_from_mle)
        print(result.message if result.trained else f"no new data: {result.message}")
        if result.published:
            print(f"published: {result.published}")
    else:
        import tempfile

        arguments = _run_arguments(args)
        namespace = args.namespace or None
        with tempfile.TemporaryDirectory() as tmp:
            package = compile_pipeline(Path(tmp) / "pipeline.yaml", args.image,
                                       _cluster_from_args(args), args.init_policy_from_mle)
            client = _client(args.host, namespace)
            experiment = client.create_experiment(args.experiment, namespace=namespace)
            if args.command == "submit":
                run_name = args.run_name or f"lastmile {_dt.datetime.now():%Y-%m-%d %H-%M-%S}"
                run = client.create_run_from_pipeline_package(
                    str(package), arguments=arguments, run_name=run_name,
                    experiment_id=experiment.experiment_id, namespace=namespace,
                    service_account=args.service_account or None)
                print(f"run {run.run_id} started")
            else:
                job = client.create_recurring_run(
                    experiment_id=experiment.experiment_id, job_name=args.name,
                    cron_expression=args.cron, pipeline_package_path=str(package),
                    params=arguments, max_concurrency=1, no_catchup=True,
                    service_account=args.service_account or None)
                print(f"recurring run {job.recurring_run_id} created ({args.cron})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
