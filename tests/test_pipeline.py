"""The compiled pipeline IR: stages, edges, gating, GPU requests, no run-time installs, defaults,
Secrets; one configuration semantics for local and cluster runs; the command line's checks.
(submit, schedule and upload against a KFP API server: tests/test_cluster.py.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402
from lastmile import config, storage  # noqa: E402

TRAINING = ("train-reward", "train-mle", "train-ppo")
GENERATION = ("generate", "generate-2", "generate-3")
STAGES = {"resolve-config", "filter-data", "check-new-data", "synthesize-negatives",
          "train-reward", "train-mle", "train-ppo", "generate", "generate-2", "generate-3",
          "postprocess", "postprocess-2", "score", "plan-shards", "gather", "report", "publish",
          "no-new-data"}
#: Run once per shard (dsl.ParallelFor over plan-shards' output), gathered by `gather`.
SHARDED = set(GENERATION) | {"postprocess", "postprocess-2", "score"}
#: Everything that runs only when check-new-data says something is new.
GATED = STAGES - {"resolve-config", "filter-data", "check-new-data", "no-new-data"}
NEW_DATA = "inputs.parameter_values['pipelinechannel--check-new-data-Output'] == true"
PUBLISH_SET = "inputs.parameter_values['pipelinechannel--publish_to'] != ''"


def _compile(tmp_path: Path, cluster: pipeline.ClusterSettings | None = None,
             settings: pipeline.RunSettings | None = None) -> tuple[str, dict, dict]:
    out = tmp_path / "pipeline.yaml"
    pipeline.compile_pipeline(out, "registry.example/lastmile:test",
                              cluster or pipeline.ClusterSettings(), settings)
    docs = list(yaml.safe_load_all(out.read_text()))
    return out.read_text(), docs[0], docs[1] if len(docs) > 1 else {}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    settings = pipeline.ClusterSettings(
        s3_secret="lastmile-s3-credentials", cache_pvc="lastmile-model-cache",
        node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    return _compile(tmp_path_factory.mktemp("ir"), settings)


def _dags(spec) -> dict[str, dict]:
    """Every DAG of the IR by component name ("root" for the pipeline's own)."""
    dags = {"root": spec["root"]["dag"]}
    dags.update({name: comp["dag"] for name, comp in spec["components"].items() if "dag" in comp})
    return dags


def _tasks(spec) -> dict[str, dict]:
    """Every task of every DAG (task names are unique across the IR), stages and conditions."""
    return {name: task for dag in _dags(spec).values() for name, task in dag["tasks"].items()}


def _is_control(name: str) -> bool:
    return name.startswith(("condition-", "for-loop-"))


def _stages(spec) -> dict[str, dict]:
    return {name: task for name, task in _tasks(spec).items() if not _is_control(name)}


def _producer_of_channel(channel: str, names: set[str]) -> str | None:
    """`pipelinechannel--train-mle-mle_model` -> `train-mle` (the longest task-name prefix)."""
    rest = channel.removeprefix("pipelinechannel--")
    found = [n for n in names if rest.startswith(n + "-")]
    return max(found, key=len) if found else None


def _upstream(task: dict, names: set[str]) -> set[str]:
    """The stage tasks whose outputs `task` consumes, through condition DAGs too."""
    deps = {d for d in task.get("dependentTasks", []) if not _is_control(d)}
    inputs = task.get("inputs", {})
    for arg in [*inputs.get("artifacts", {}).values(), *inputs.get("parameters", {}).values()]:
        producer = (arg.get("taskOutputArtifact") or arg.get("taskOutputParameter") or {}).get(
            "producerTask")
        channel = arg.get("componentInputArtifact") or arg.get("componentInputParameter")
        if producer is None and channel:
            producer = _producer_of_channel(channel, names)
        elif producer and _is_control(producer):  # collected from a ParallelFor: the key names it
            key = (arg.get("taskOutputArtifact") or arg.get("taskOutputParameter") or {}).get(
                "outputArtifactKey") or ""
            producer = _producer_of_channel(key, names)
        if producer and not _is_control(producer):
            deps.add(producer)
    return deps - {"resolve-config"}


def _upstream_map(spec) -> dict[str, set[str]]:
    names = set(_stages(spec))
    return {name: _upstream(task, names) for name, task in _stages(spec).items()}


def _conditions(spec, task_name: str) -> list[str]:
    """The trigger conditions a task runs under, innermost first."""
    dags = _dags(spec)
    where = {t: comp for comp, dag in dags.items() for t in dag["tasks"]}
    found, name = [], task_name
    while where[name] != "root":
        comp = where[name]
        (name,) = [t for t, task in _tasks(spec).items() if task["componentRef"]["name"] == comp]
        condition = _tasks(spec)[name].get("triggerPolicy", {}).get("condition")
        if condition:
            found.append(condition)
    return found


def test_every_stage_is_a_task(compiled):
    _, spec, _ = compiled
    assert set(_stages(spec)) == STAGES


def test_dependency_edges(compiled):
    _, spec, _ = compiled
    tasks = _stages(spec)
    up = _upstream_map(spec)
    assert up["check-new-data"] == {"filter-data"}
    assert "filter-data" in up["synthesize-negatives"]
    assert {"filter-data", "synthesize-negatives"} <= up["train-reward"]
    assert "train-reward" in up["train-ppo"]
    assert up["train-mle"] == {"filter-data"}  # runs beside reward and PPO
    variants = {tasks[g]["inputs"]["parameters"]["variant"]["runtimeValue"]["constant"]: g
                for g in GENERATION}
    assert up[variants["base"]] == {"filter-data", "plan-shards"}
    assert "train-mle" in up[variants["mle"]]
    assert "train-ppo" in up[variants["rl"]]
    assert {up["postprocess"].pop(), up["postprocess-2"].pop()} == {variants["base"], variants["mle"]}
    assert set(GENERATION) | {"postprocess", "postprocess-2"} <= up["score"]
    assert up["plan-shards"] == {"filter-data"}
    assert {"plan-shards"} <= up["score"] and all("plan-shards" in up[g] for g in GENERATION)
    assert SHARDED <= up["gather"]
    assert "gather" in up["report"] and not SHARDED & up["report"]
    assert {"report", "train-mle", "train-ppo", "check-new-data"} <= up["publish"]
    assert up["no-new-data"] == {"check-new-data"}


def test_generation_and_scoring_fan_out_over_shards_and_are_gathered(compiled):
    _, spec, _ = compiled
    dags = _dags(spec)
    (loop,) = [t for dag in dags.values() for name, t in dag["tasks"].items()
               if name.startswith("for-loop-")]
    assert loop["parameterIterator"]["items"]["inputParameter"] == (
        "pipelinechannel--plan-shards-Output")
    inside = set(dags[loop["componentRef"]["name"]]["tasks"])
    assert inside == SHARDED
    gather = _stages(spec)["gather"]
    collected = gather["inputs"]["artifacts"]
    assert set(collected) == {"base_shards", "mle_shards", "rl_shards", "base_cleaned_shards",
                              "mle_cleaned_shards", "example_shards"}
    assert all(a["taskOutputArtifact"]["producerTask"].startswith("for-loop-")
               for a in collected.values())
    for name in SHARDED:  # each shard's tasks learn which shard they are
        params = _stages(spec)[name]["inputs"].get("parameters", {})
        if name.startswith(("generate", "score")):
            assert params["shard"]["componentInputParameter"].endswith("-loop-item"), name


def test_ppo_does_not_wait_for_mle(compiled, tmp_path):
    _, spec, _ = compiled
    up = _upstream_map(spec)
    assert "train-mle" not in up["train-ppo"]
    assert "mle_model" not in _stages(spec)["train-ppo"]["inputs"].get("artifacts", {})
    resolve = _stages(spec)["resolve-config"]["inputs"]["parameters"]
    assert resolve["compiled"]["runtimeValue"]["constant"] == "{}"

    # Asked for at compile time: PPO starts from the MLE adapter, so it waits for it, and the
    # resolved configuration says so (train_ppo reads the flag from it).
    settings = pipeline.RunSettings(compiled={"ppo.init_policy_from_mle": True})
    _, spec, _ = _compile(tmp_path, settings=settings)
    assert "train-mle" in _upstream_map(spec)["train-ppo"]
    resolve = _stages(spec)["resolve-config"]["inputs"]["parameters"]
    assert resolve["compiled"]["runtimeValue"]["constant"] == '{"ppo.init_policy_from_mle": true}'
    from components import stages

    resolved = stages.resolve_config(profile="smoke",
                                     compiled=resolve["compiled"]["runtimeValue"]["constant"])
    assert config.profile_from_json(resolved).ppo.init_policy_from_mle is True


def test_training_runs_only_on_new_data_and_publish_only_with_a_destination(compiled):
    _, spec, _ = compiled
    for name in GATED:
        assert _conditions(spec, name)[-1] == NEW_DATA, name
    assert _conditions(spec, "publish") == [PUBLISH_SET, NEW_DATA]
    assert _conditions(spec, "no-new-data") == [f"!({NEW_DATA})"]
    for name in ("resolve-config", "filter-data", "check-new-data"):
        assert _conditions(spec, name) == [], name
    # The pipeline's output is whichever branch ran: the report's outcome or the skip message.
    selectors = spec["root"]["dag"]["outputs"]["parameters"]["Output"]
    assert selectors["valueFromParameter"]["producerSubtask"].startswith("condition-branches")


def test_gpu_requests_on_training_and_generation(compiled):
    _, spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    tasks = _stages(spec)
    for name in TRAINING + GENERATION:
        executor = executors[f"exec-{tasks[name]['componentRef']['name'][5:]}"]
        resources = executor["container"]["resources"]
        assert resources["accelerator"]["resourceCount"] == "1", name
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu", name
    for name in ("filter-data", "check-new-data", "plan-shards", "score", "gather", "report",
                 "publish", "no-new-data"):
        executor = executors[f"exec-{tasks[name]['componentRef']['name'][5:]}"]
        assert "accelerator" not in executor["container"].get("resources", {}), name


def test_training_tasks_get_n_gpus_and_shared_memory(tmp_path):
    _, spec, platform = _compile(tmp_path, pipeline.ClusterSettings(train_gpus=4))
    executors = spec["deploymentSpec"]["executors"]
    tasks = _stages(spec)
    for name in TRAINING + GENERATION:
        executor = executors[f"exec-{tasks[name]['componentRef']['name'][5:]}"]
        expected = "4" if name in TRAINING else "1"  # a generation shard takes one GPU
        assert executor["container"]["resources"]["accelerator"]["resourceCount"] == expected
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in TRAINING:
        mounts = k8s[f"exec-{tasks[name]['componentRef']['name'][5:]}"]["emptyDirMounts"]
        assert mounts == [{"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory"}]
    assert pipeline.main(["compile", "-o", str(tmp_path / "x.yaml"), "--train-gpus", "0"]) == 2
    assert not (tmp_path / "x.yaml").exists()


def test_training_retries_and_caching(compiled):
    _, spec, _ = compiled
    tasks = _stages(spec)
    for name in TRAINING:
        retry = tasks[name]["retryPolicy"]
        assert retry["maxRetryCount"] == 2 and retry["backoffDuration"] == "60s"
        # Argo's window counts from the first attempt: it covers 3 attempts of 24 h.
        assert retry["backoffMaxDuration"] == f"{3 * 86400 + 3600}s"
    # Read what changes between runs (task data, the published runs) or write outside: never cached.
    for name in ("filter-data", "check-new-data", "publish", "no-new-data"):
        assert tasks[name]["cachingOptions"] == {}, name
    assert tasks["synthesize-negatives"]["cachingOptions"]["enableCache"] is True


def test_no_runtime_installs_and_one_image(compiled):
    text, spec, _ = compiled
    assert "pip install" not in text
    assert "pip3 install" not in text
    for executor in spec["deploymentSpec"]["executors"].values():
        assert executor["container"]["image"] == "registry.example/lastmile:test"


def test_configuration_parameters_default_to_the_profile_and_are_described(compiled):
    _, spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == set(config.PIPELINE_PARAMETERS) | set(pipeline.RUN_PARAMETERS)
    for name in config.PIPELINE_PARAMETERS:  # text, empty: the profile's value
        assert params[name]["parameterType"] == "STRING", name
        assert params[name]["defaultValue"] == "", name
    assert params["profile"]["defaultValue"] == "paper"
    assert params["overrides"]["defaultValue"] == ""
    assert params["publish_to"]["defaultValue"] == ""
    assert params["force"]["defaultValue"] == "false"
    # Every parameter is text: the kfp CLI passes each KEY=VALUE as a string.
    assert {p["parameterType"] for p in params.values()} == {"STRING"}
    for name, param in params.items():  # the Kubeflow UI shows these
        assert len(param.get("description", "")) > 20, name
    assert "demo 280" in params["max_train"]["description"]
    assert "0.003" in params["ppo_head_learning_rate"]["description"]


@pytest.mark.parametrize("profile", sorted(config.PROFILES))
def test_a_run_with_only_a_profile_resolves_to_that_profile(compiled, profile):
    """The cluster path (the IR's defaults, `profile` set, the resolve_config step's own
    function) and `pipeline.py run --profile X` resolve to the same configuration."""
    from components import stages

    _, spec, _ = compiled
    defaults = {name: p.get("defaultValue")
                for name, p in spec["root"]["inputDefinitions"]["parameters"].items()}
    task = _stages(spec)["resolve-config"]["inputs"]["parameters"]
    arguments = {name: defaults[arg["componentInputParameter"]] if "componentInputParameter" in arg
                 else arg["runtimeValue"]["constant"] for name, arg in task.items()}
    arguments["profile"] = profile
    on_cluster = config.profile_from_json(stages.resolve_config(**arguments))

    args = pipeline._build_parser().parse_args(["run", "--profile", profile])
    local = pipeline.settings_from_args(args, default_profile="demo").resolve("demo")
    assert config.field_infos(on_cluster) == config.field_infos(local)
    assert on_cluster == config.get_profile(profile)


def test_settings_reach_the_cluster_as_the_local_run_resolves_them(compiled):
    """--config and --param become pipeline arguments that resolve_config turns into the
    configuration the local run gets, field by field."""
    from components import stages

    args = pipeline._build_parser().parse_args([
        "submit", "--host", "h", "--profile", "demo", "--param", "max_train=50",
        "--param", "ppo_temperature=1", "--param", "ppo.optim.head_learning_rate=1e-3",
        "--param", "negatives.categories=shuffled,repaired", "--param", "mle_max_steps=0"])
    settings = pipeline.settings_from_args(args)
    arguments = settings.pipeline_arguments()
    assert all(isinstance(v, str) for v in arguments.values())  # text parameters
    assert arguments["ppo_temperature"] == "1"  # an int for a float: fine as text
    on_cluster = config.profile_from_json(stages.resolve_config(**arguments))
    assert on_cluster == settings.resolve()
    assert on_cluster.ppo.temperature == 1.0 and isinstance(on_cluster.ppo.temperature, float)
    assert on_cluster.ppo.optim.head_learning_rate == 1e-3
    assert on_cluster.negatives.categories == ("shuffled", "repaired")
    assert on_cluster.mle.max_steps is None and on_cluster.data.max_train == 50


def test_run_configuration_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("profile: demo\n"
                    "ppo:\n  optim:\n    head_learning_rate: 3e-3\n"
                    "data.max_train: 500\n"
                    "ppo_max_updates: 10\n"
                    "data_source: s3://bucket/data/\n")
    args = pipeline._build_parser().parse_args(["compile", "--config", str(path),
                                                "--param", "max_train=600"])
    settings = pipeline.settings_from_args(args)
    profile = settings.resolve()
    assert profile.name == "demo" and profile.ppo.optim.head_learning_rate == 3e-3
    assert profile.data.max_train == 600  # --param wins over the file
    assert profile.ppo.max_updates == 10
    assert settings.run == {"data_source": "s3://bucket/data/"}
    # Compiled with --config, the file's settings become the IR's defaults.
    _, spec, _ = _compile(tmp_path, settings=settings)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["profile"]["defaultValue"] == "demo"
    assert params["data_source"]["defaultValue"] == "s3://bucket/data/"
    assert params["max_train"]["defaultValue"] == "600"
    assert '"ppo.optim.head_learning_rate": 0.003' in params["overrides"]["defaultValue"]


@pytest.mark.parametrize("command", ["run", "tune", "reproduce"])
def test_a_configuration_files_profile_applies_unless_profile_is_given(tmp_path, command):
    """`run` defaults to demo, but a --config file naming its profile is not overridden by
    that default; an explicit --profile still wins over the file."""
    path = tmp_path / "run.yaml"
    path.write_text("profile: smoke\nmax_train: 12\n")
    parse = pipeline._build_parser().parse_args
    from_file = pipeline.settings_from_args(parse([command, "--config", str(path)]),
                                            default_profile="demo").resolve("demo")
    assert (from_file.name, from_file.data.max_train) == ("smoke", 12)
    flag = pipeline.settings_from_args(parse([command, "--config", str(path), "--profile",
                                              "paper"]), default_profile="demo").resolve("demo")
    assert (flag.name, flag.data.max_train) == ("paper", 12)
    plain = pipeline.settings_from_args(parse([command]), default_profile="demo")
    assert plain.resolve("demo").name == "demo"


@pytest.mark.parametrize("argv, message", [
    (["--param", "max_train=lots"], "max_train: expected an integer, got 'lots'"),
    (["--param", "max_trian=5"], "--param max_trian: unknown key. Run parameters: data_source"),
    (["--param", "ppo.optim.bogus=1"], "no configuration field 'ppo.optim.bogus'"),
    (["--param", "precision=fp8"], "precision must be one of"),
    (["--param", "strict=maybe"], "strict expects true or false"),
    (["--param", "reward_head_learning_rate=-1e-5"], "reward_head_learning_rate must be >= 0"),
    (["--param", "overrides={not: [valid"], "overrides: not a JSON or YAML mapping"),
    (["--param", "max_train"], "--param expects KEY=VALUE"),
    (["--config", "/no/such/run.yaml"], "--config /no/such/run.yaml: No such file"),
    (["--param", "publish_to=/local/dir"], "publish_to: "),
])
def test_bad_settings_name_the_parameter_and_fail_before_anything_runs(tmp_path, capsys, argv,
                                                                       message):
    for command in (["run", "--out", str(tmp_path / "run")], ["compile", "-o", str(tmp_path / "p.yaml")],
                    ["submit", "--host", "http://127.0.0.1:9"],
                    ["schedule", "--host", "http://127.0.0.1:9", "--cron", "0 0 3 * * *"]):
        assert pipeline.main([*command, *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "p.yaml").exists()


def test_config_show_prints_every_field_with_type_value_and_meaning(capsys):
    assert pipeline.main(["config", "show", "--profile", "demo"]) == 0
    out = capsys.readouterr().out
    infos = config.field_infos(config.get_profile("demo"))
    for info in infos:
        line = next(l for l in out.splitlines() if l.startswith(info.path + " "))
        assert info.type in line and info.help in line, info.path
    head_lr = next(l for l in out.splitlines() if l.startswith("ppo.optim.head_learning_rate"))
    assert "*0.003" in head_lr and "[ppo_head_learning_rate]" in head_lr


def test_every_configuration_field_has_a_meaning():
    for info in config.field_infos(config.get_profile("paper")):
        assert info.help and len(info.help) > 10, info.path


def test_unsafe_loading_is_fixed_at_compile_time_not_by_run_parameters(compiled, tmp_path):
    from components import stages

    _, spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name in ("allow_pickle", "trust_remote_code", "bleurt_allow_pickle"):
        assert name not in params, name
    smoke = config.resolve("smoke")
    assert not (smoke.allow_pickle or smoke.trust_remote_code or smoke.score.bleurt_allow_pickle)
    # Not through the overrides parameter either.
    with pytest.raises(config.ConfigError, match="fixed when the pipeline is compiled"):
        stages.resolve_config(profile="smoke", overrides='{"allow_pickle": true}')
    with pytest.raises(config.ConfigError, match="fixed when the pipeline is compiled"):
        config.resolve("smoke", trust_remote_code="true")
    # Whoever compiles decides.
    assert pipeline.main(["compile", "-o", str(tmp_path / "p.yaml"), "--allow-pickle",
                          "--trust-remote-code", "--bleurt-allow-pickle"]) == 0
    spec = next(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))
    compiled_json = _stages(spec)["resolve-config"]["inputs"]["parameters"]["compiled"][
        "runtimeValue"]["constant"]
    profile = config.profile_from_json(stages.resolve_config(profile="smoke",
                                                             compiled=compiled_json))
    assert profile.allow_pickle and profile.trust_remote_code and profile.score.bleurt_allow_pickle


STORAGE = {"filter-data", "check-new-data", "synthesize-negatives", "train-reward",
           "train-mle", "train-ppo", "generate", "generate-2", "generate-3", "publish"}


def _executor(spec: dict, platform: dict, task: str) -> tuple[dict, dict]:
    """(container, Kubernetes executor config) of a task."""
    name = f"exec-{_stages(spec)[task]['componentRef']['name'][5:]}"
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return spec["deploymentSpec"]["executors"][name]["container"], k8s.get(name, {})


def test_kubernetes_settings_in_platform_spec(compiled):
    _, spec, platform = compiled
    _, reward = _executor(spec, platform, "train-reward")
    assert reward["secretAsEnv"][0]["secretName"] == "lastmile-s3-credentials"
    assert {(k["secretKey"], k["envVar"]) for k in reward["secretAsEnv"][0]["keyToEnv"]} == {
        ("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"), ("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
        ("LASTMILE_S3_ENDPOINT", "LASTMILE_S3_ENDPOINT")}
    assert reward["pvcMount"][0]["mountPath"] == "/cache"
    assert reward["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert reward["tolerations"][0]["key"] == "nvidia.com/gpu"
    for task in STAGES:
        container, k8s = _executor(spec, platform, task)
        # Credentials only where object storage is read or written.
        assert ("secretAsEnv" in k8s) == (task in STORAGE), task
        # GPU nodes only for the steps that use a GPU.
        gpu = task in TRAINING + GENERATION
        assert ("nodeSelector" in k8s) == gpu and ("tolerations" in k8s) == gpu, task
        assert ("accelerator" in container["resources"]) == gpu, task
        assert float(container["resources"]["cpuRequest"]) >= 1, task  # every step asks
        # Non-root; the compiler adds no privilege escalation, no capabilities, RuntimeDefault.
        assert k8s["securityContext"] == {"runAsUser": "1000", "runAsGroup": "1000",
                                          "runAsNonRoot": True}, task
        # A hung step gives its node back.
        deadline = int(k8s["activeDeadlineSeconds"])
        assert deadline == (86400 if task in TRAINING else 21600 if gpu else 14400), task
        plain = {e["name"]: e["value"] for e in container.get("env", [])}
        assert plain == ({"LASTMILE_CHECKPOINT_PREFIX": "s3://lastmile/checkpoints/"}
                         if task in TRAINING else {}), task
    # At most 4 shards (each holding a GPU) at once.
    loop = next(t for t in _tasks(spec).values() if "parameterIterator" in t)
    assert loop["iteratorPolicy"]["parallelismLimit"] == 4


def test_the_configuration_is_the_profiles_whatever_the_placement(compiled):
    """Checkpoint placement is the cluster's, not the run's configuration: the resolved
    profile stays the profile (test_a_run_with_only_a_profile_resolves_to_that_profile) and
    the training step finds the prefix in its environment."""
    import os

    from lastmile import checkpoint

    old = os.environ.get(checkpoint.PREFIX_VAR)
    os.environ[checkpoint.PREFIX_VAR] = "s3://bucket/ckpt/"
    try:
        scoped = checkpoint.task_scope(None, "train_mle", "minio://mlpipeline/v2/x/train-mle")
        assert scoped.startswith("s3://bucket/ckpt/train_mle-")
        assert checkpoint.task_scope("/local/dir", "train_mle", "u") == "/local/dir"
    finally:
        os.environ.pop(checkpoint.PREFIX_VAR) if old is None else os.environ.update(
            {checkpoint.PREFIX_VAR: old})


def test_cpu_only_cluster_step_resources_and_limits(tmp_path, capsys):
    out = tmp_path / "cpu.yaml"
    assert pipeline.main(["compile", "-o", str(out), "--accelerator-type", "none",
                          "--train-gpus", "2", "--node-selector", "pool=gpu",
                          "--step-resources", "score=cpu=8,memory=32Gi,memory_limit=40Gi",
                          "--training-timeout", "7200", "--shard-parallelism", "2",
                          "--checkpoint-prefix", "", "--no-security-context",
                          "--mlflow-uri", "http://mlflow.mlflow:5000"]) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    for task in STAGES:
        container, k8s = _executor(spec, platform, task)
        assert container["image"] == "ghcr.io/lastmile-ml/lastmile:0.1.0-cpu", task
        assert "accelerator" not in container["resources"], task
        assert "nodeSelector" not in k8s and "securityContext" not in k8s, task
        # No checkpoint prefix (the pod's disk); the tracking server where runs log.
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        tracked = task in TRAINING or task == "report"
        assert env == ({"MLFLOW_TRACKING_URI": "http://mlflow.mlflow:5000"} if tracked else {})
    reward, _ = _executor(spec, platform, "train-reward")
    # Requests per GPU-step, times the 2 "GPUs" (processes) of a training task.
    assert reward["resources"]["resourceCpuRequest"] == "8"
    assert reward["resources"]["resourceMemoryRequest"] == "48Gi"
    assert reward["resources"]["resourceMemoryLimit"] == "96Gi"
    score, _ = _executor(spec, platform, "score")
    assert (score["resources"]["resourceCpuRequest"], score["resources"]["resourceMemoryRequest"],
            score["resources"]["resourceMemoryLimit"]) == ("8", "32Gi", "40Gi")
    _, k8s = _executor(spec, platform, "train-ppo")
    assert k8s["activeDeadlineSeconds"] == "7200"
    retry = _stages(spec)["train-ppo"]["retryPolicy"]
    assert retry["backoffMaxDuration"] == f"{3 * 7200 + 3600}s"  # every attempt to its deadline
    loop = next(t for t in _tasks(spec).values() if "parameterIterator" in t)
    assert loop["iteratorPolicy"]["parallelismLimit"] == 2
    for bad, message in ((["--step-resources", "nosuch=cpu=1"], "no step 'nosuch'"),
                         (["--step-resources", "score=gpu=1"], "expected STEP=cpu=N"),
                         (["--step-resources", "score=cpu=lots"], "not a Kubernetes quantity"),
                         (["--shard-parallelism", "0"], "--shard-parallelism must be >= 1"),
                         (["--checkpoint-prefix", "/local"], "--checkpoint-prefix")):
        assert pipeline.main(["compile", "-o", str(tmp_path / "bad.yaml"), *bad]) == 2
        assert message in capsys.readouterr().err, bad
    assert not (tmp_path / "bad.yaml").exists()


def _secret_env(platform: dict, spec: dict) -> dict[str, tuple[dict, dict]]:
    """Per executor that gets credentials: ({env var: secret key}, {env var: plain value})."""
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    found = {}
    for name, executor in spec["deploymentSpec"]["executors"].items():
        if "secretAsEnv" not in executors.get(name, {}):
            continue  # a step that does not touch object storage
        (secret,) = executors[name]["secretAsEnv"]
        from_secret = {k["envVar"]: (secret["secretName"], k["secretKey"]) for k in secret["keyToEnv"]}
        plain = {e["name"]: e["value"] for e in executor["container"].get("env", [])
                 if e["name"] != "LASTMILE_CHECKPOINT_PREFIX"}
        found[name] = (from_secret, plain)
    return found


def test_kubeflow_artifact_secret_is_mapped_to_the_names_storage_reads(tmp_path):
    out = tmp_path / "kf.yaml"
    assert pipeline.main(["compile", "-o", str(out), "--s3-secret", "mlpipeline-minio-artifact",
                          "--cache-pvc", ""]) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    per_executor = _secret_env(platform, spec)
    assert len(per_executor) == 10  # the steps that read or write object storage
    for name, (from_secret, plain) in per_executor.items():
        assert from_secret == {
            "AWS_ACCESS_KEY_ID": ("mlpipeline-minio-artifact", "accesskey"),
            "AWS_SECRET_ACCESS_KEY": ("mlpipeline-minio-artifact", "secretkey")}, name
        assert plain == {"LASTMILE_S3_ENDPOINT": "http://minio-service.kubeflow:9000"}, name
    # What a step sees is a complete lastmile.storage configuration.
    env = {var: f"value-of-{key}" for var, (_, key) in per_executor["exec-publish"][0].items()}
    env.update(per_executor["exec-publish"][1])
    cfg = storage.S3Config.from_env(env)
    assert (cfg.endpoint, cfg.secure) == ("minio-service.kubeflow:9000", False)
    assert (cfg.access_key, cfg.secret_key) == ("value-of-accesskey", "value-of-secretkey")

    # Another endpoint, given as a plain variable, replaces the default (and the Secret's key).
    out = tmp_path / "ep.yaml"
    assert pipeline.main(["compile", "-o", str(out), "--s3-secret", "mlpipeline-minio-artifact",
                          "--s3-endpoint", "https://minio.example.org"]) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    for from_secret, plain in _secret_env(platform, spec).values():
        assert plain == {"LASTMILE_S3_ENDPOINT": "https://minio.example.org"}
    out = tmp_path / "own.yaml"
    assert pipeline.main(["compile", "-o", str(out), "--s3-endpoint", "http://store:9000"]) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    for from_secret, plain in _secret_env(platform, spec).values():
        assert set(from_secret) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert plain == {"LASTMILE_S3_ENDPOINT": "http://store:9000"}


def test_bad_endpoint_fails_at_compile_time(tmp_path, capsys):
    assert pipeline.main(["compile", "-o", str(tmp_path / "x.yaml"), "--s3-endpoint",
                          "ftp://store:9000"]) == 2
    assert "LASTMILE_S3_ENDPOINT" in capsys.readouterr().err


def test_credentials_in_the_environment_never_reach_the_yaml(tmp_path, monkeypatch):
    secret = "s3cr3t-value-that-must-not-leak"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-MUST-NOT-LEAK")
    out = tmp_path / "p.yaml"
    pipeline.compile_pipeline(out, "img", pipeline.ClusterSettings(s3_secret="creds"))
    text = out.read_text()
    assert secret not in text and "AKIA-MUST-NOT-LEAK" not in text
    assert "AWS_SECRET_ACCESS_KEY" in text  # only the variable name, filled from the Secret


def test_compile_cli_writes_yaml(tmp_path):
    out = tmp_path / "p.yaml"
    assert pipeline.main(["compile", "-o", str(out), "--s3-secret", "", "--cache-pvc", ""]) == 0
    spec = next(yaml.safe_load_all(out.read_text()))
    assert spec["pipelineInfo"]["name"] == "lastmile"


def test_precision_fans_out_to_the_rl_stages_and_mle_has_its_own():
    stages = ("reward", "mle", "ppo", "generate")
    # bf16 everywhere the CPU computes it natively (modeling.resolve_precision), float32 elsewhere
    demo = config.get_profile("demo")
    assert [getattr(demo, s).precision for s in stages] == ["auto"] * 4
    assert config.resolve("paper", precision="auto").ppo.precision == "auto"
    paper = config.get_profile("paper")
    assert {getattr(paper, s).precision for s in stages} == {"float32"}
    resolved = config.resolve("paper", precision="bfloat16", mle_precision="bfloat16")
    assert {getattr(resolved, s).precision for s in stages} == {"bfloat16"}
    with pytest.raises(ValueError, match="precision must be one of"):
        config.resolve("demo", precision="float16")
    with pytest.raises(ValueError, match="mle_precision must be one of"):
        config.resolve("demo", mle_precision="fp8")


def test_reward_head_learning_rate_is_optional_and_checked():
    assert config.get_profile("paper").reward.optim.head_learning_rate is None
    assert config.resolve("paper", reward_head_learning_rate=0).reward.optim.head_learning_rate is None
    assert config.resolve("paper", reward_head_learning_rate="3e-5").reward.optim.head_learning_rate == 3e-5
    demo = config.get_profile("demo")
    assert demo.reward.optim.head_learning_rate < demo.reward.optim.learning_rate
    with pytest.raises(ValueError, match="reward_head_learning_rate must be >= 0"):
        config.resolve("paper", reward_head_learning_rate=-1e-5)


def test_training_handed_to_kubeflow_trainer(tmp_path):
    """--trainer kubeflow-trainer: each training step becomes a launcher (same inputs and
    outputs, no GPU of its own) whose TrainJob settings carry the nodes, GPUs, object store
    and checkpoint prefix; the rest of the DAG is unchanged."""
    from lastmile import trainjob

    out = tmp_path / "trainer.yaml"
    assert pipeline.main(["compile", "-o", str(out), "--trainer", "kubeflow-trainer",
                          "--trainer-nodes", "4", "--train-gpus", "8", "--image", "reg/x:1",
                          "--trainjob-delete", "on-success", "--node-selector", "pool=gpu",
                          "--toleration", "nvidia.com/gpu:NoSchedule"]) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    tasks = _stages(spec)
    launchers = {f"{name}-trainjob" for name in TRAINING}
    assert set(tasks) == STAGES - set(TRAINING) | launchers
    for name in launchers:
        task = tasks[name]
        options = trainjob.LauncherOptions.from_json(
            task["inputs"]["parameters"]["trainer"]["runtimeValue"]["constant"])
        assert (options.job.num_nodes, options.job.gpus_per_node) == (4, 8)
        assert options.job.image == "reg/x:1" and options.delete == "on-success"
        assert options.job.cpu_request == "32" and options.job.memory_request == "192Gi"
        assert options.job.s3_secret == "lastmile-s3-credentials"
        assert options.job.env == {"LASTMILE_CHECKPOINT_PREFIX": "s3://lastmile/checkpoints/"}
        # The job's nodes are placed where the pipeline's GPU steps would be.
        assert options.job.node_selector == {"pool": "gpu"}
        assert options.job.tolerations == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                            "effect": "NoSchedule"}]
        container, k8s = _executor(spec, platform, name)
        assert "accelerator" not in container["resources"] and "nodeSelector" not in k8s
        assert "secretAsEnv" in k8s  # it reads the job's published output
        assert task["retryPolicy"]["maxRetryCount"] == 2
    up = _upstream_map(spec)
    assert "train-reward-trainjob" in up["train-ppo-trainjob"]
    assert pipeline.main(["compile", "-o", str(tmp_path / "bad.yaml"), "--trainer",
                          "kubeflow-trainer", "--trainer-nodes", "0"]) == 2


def test_the_paper_profile_is_the_paper_and_fails_offline_in_one_line(tmp_path, capsys):
    """profile=paper: the paper's base model and data as hub ids and its prompt without a
    length hint; xsum is one parameter away; without the hub (the suite runs offline) the
    first step says in one line what to set."""
    from components import stages
    from kfp.dsl import Dataset

    from lastmile import data as task_data

    paper = config.get_profile("paper")
    assert paper.base_model == "TheBloke/Llama-2-7B-Chat-GPTQ"
    assert paper.data.source == "Samsung/samsum"
    assert "short" not in paper.data.instruction and "sentence" not in paper.data.instruction
    assert (paper.data.max_train, paper.data.max_test) == (15000, 3000)
    xsum = task_data.with_known_columns(paper.data, "EdinburghNLP/xsum")
    assert (xsum.input_column, xsum.output_column) == ("document", "summary")
    samsum = task_data.with_known_columns(paper.data, paper.data.source)
    assert (samsum.input_column, samsum.output_column) == ("dialogue", "summary")
    own = config.resolve("paper", input_column="text").data  # the user's own columns win
    assert task_data.with_known_columns(own, "EdinburghNLP/xsum").input_column == "text"

    out = Dataset(name="data", uri=str(tmp_path / "data"))
    out.path = str(tmp_path / "data")
    with pytest.raises(ValueError) as info:
        stages.filter_data(config=config.profile_to_json(paper), data_source="", data=out)
    message = str(info.value)
    assert "TheBloke/Llama-2-7B-Chat-GPTQ" in message and "set base_model" in message
    assert "\n" not in message
    # With a base that is here, the hub dataset is the one thing left to set.
    offline_base = config.resolve("paper", base_model="tiny-random")
    with pytest.raises(ValueError) as info:
        stages.filter_data(config=config.profile_to_json(offline_base), data_source="",
                           data=out)
    assert "Samsung/samsum" in str(info.value) and "set data_source" in str(info.value)
    assert "\n" not in str(info.value)
