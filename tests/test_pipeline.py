"""The compiled pipeline IR: stages, edges, GPU requests, no run-time installs, defaults."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402
from lastmile import config  # noqa: E402

TRAINING = ("train-reward", "train-mle", "train-ppo")
GENERATION = ("generate", "generate-2", "generate-3")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("ir") / "pipeline.yaml"
    settings = pipeline.ClusterSettings(
        s3_secret="lastmile-s3-credentials", cache_pvc="lastmile-model-cache",
        node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    pipeline.compile_pipeline(out, "registry.example/lastmile:test", settings)
    spec, platform = yaml.safe_load_all(out.read_text())
    return out.read_text(), spec, platform


def _tasks(spec):
    return spec["root"]["dag"]["tasks"]


def _upstream(task: dict) -> set[str]:
    deps = set(task.get("dependentTasks", [])) - {"resolve-config"}
    for arg in task.get("inputs", {}).get("artifacts", {}).values():
        producer = arg.get("taskOutputArtifact", {}).get("producerTask")
        if producer:
            deps.add(producer)
    return deps


def test_every_stage_is_a_task(compiled):
    _, spec, _ = compiled
    assert set(_tasks(spec)) == {
        "resolve-config", "filter-data", "synthesize-negatives", "train-reward", "train-mle",
        "train-ppo", "generate", "generate-2", "generate-3", "postprocess", "postprocess-2",
        "score", "report"}


def test_dependency_edges(compiled):
    _, spec, _ = compiled
    tasks = _tasks(spec)
    up = {name: _upstream(task) for name, task in tasks.items()}
    assert "filter-data" in up["synthesize-negatives"]
    assert {"filter-data", "synthesize-negatives"} <= up["train-reward"]
    assert "train-reward" in up["train-ppo"]
    assert up["train-mle"] == {"filter-data"}  # runs beside reward and PPO
    variants = {tasks[g]["inputs"]["parameters"]["variant"]["runtimeValue"]["constant"]: g
                for g in GENERATION}
    assert up[variants["base"]] == {"filter-data"}
    assert "train-mle" in up[variants["mle"]]
    assert "train-ppo" in up[variants["rl"]]
    assert {up["postprocess"].pop(), up["postprocess-2"].pop()} == {variants["base"], variants["mle"]}
    assert set(GENERATION) | {"postprocess", "postprocess-2"} <= up["score"]
    assert "score" in up["report"]


def test_gpu_requests_on_training_and_generation(compiled):
    _, spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    tasks = _tasks(spec)
    for name in TRAINING + GENERATION:
        executor = executors[f"exec-{tasks[name]['componentRef']['name'][5:]}"]
        resources = executor["container"]["resources"]
        assert resources["accelerator"]["resourceCount"] == "1", name
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu", name
    for name in ("filter-data", "score", "report"):
        executor = executors[f"exec-{tasks[name]['componentRef']['name'][5:]}"]
        assert "accelerator" not in executor["container"].get("resources", {}), name


def test_training_retries_and_caching(compiled):
    _, spec, _ = compiled
    tasks = _tasks(spec)
    for name in TRAINING:
        assert tasks[name]["retryPolicy"]["maxRetryCount"] == 2
    assert tasks["filter-data"]["cachingOptions"] == {}  # reads data that change between runs
    assert tasks["synthesize-negatives"]["cachingOptions"]["enableCache"] is True


def test_no_runtime_installs_and_one_image(compiled):
    text, spec, _ = compiled
    assert "pip install" not in text
    assert "pip3 install" not in text
    for executor in spec["deploymentSpec"]["executors"].values():
        assert executor["container"]["image"] == "registry.example/lastmile:test"


def test_parameter_defaults_are_the_papers(compiled):
    _, spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    paper = config.pipeline_arguments(config.get_profile("paper"))
    for name, value in paper.items():
        assert params[name]["defaultValue"] == value, name
    assert params["profile"]["defaultValue"] == "paper"
    assert params["ppo_length_penalty"]["defaultValue"] == -2.5
    assert params["reward_batch_size"]["defaultValue"] == 14


def test_kubernetes_settings_in_platform_spec(compiled):
    _, _, platform = compiled
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    reward = executors["exec-train-reward"]
    assert reward["secretAsEnv"][0]["secretName"] == "lastmile-s3-credentials"
    assert reward["pvcMount"][0]["mountPath"] == "/cache"
    assert reward["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert reward["tolerations"][0]["key"] == "nvidia.com/gpu"


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


def test_bad_parameter_fails_before_running(tmp_path):
    with pytest.raises(ValueError, match="unknown pipeline parameter"):
        pipeline.run_locally("smoke", tmp_path, overrides={"not_a_parameter": 1})
