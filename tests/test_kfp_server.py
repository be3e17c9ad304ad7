"""The fake KFP v2beta1 API server itself (tests/kfp_server.py): its transcribed schema agrees with
the generated client kfp uses, and the REAL kfp.Client and `kfp` CLI drive it end to end (upload,
versions, runs by package and by version, an enabled recurring run) while it refuses what a real
server refuses (unknown fields, wrong JSON types, bad enums, bad runtime parameters, a malformed
pipeline spec, a missing bearer token) with a 400/401 and an entry in server.errors.
(No `from __future__ import annotations` here: kfp's @dsl.component reads real annotations.)"""

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import kfp
import kfp_server_api
import pytest
import yaml
from kfp import compiler, dsl

from kfp_api_schema import ENUMS, MESSAGES, client_class_name
from kfp_server import KfpApiServer, check_cron, invalid, kfp_server  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
KFP_CLI = str(Path(sys.executable).with_name("kfp"))

pytestmark = pytest.mark.filterwarnings("ignore:This client only works:FutureWarning")


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def _echo(count: int, scale: float, label: str, flag: bool) -> str:
    return f"{label} {count} {scale} {flag}"


@dsl.pipeline(name="tiny-typed", description="A pipeline with one parameter of each type.")
def _tiny(count: int, label: str, scale: float = 0.5, flag: bool = True, tags: list = [],
          opts: dict = {}):
    _echo(count=count, scale=scale, label=label, flag=flag)


@dsl.pipeline(name="tiny-defaults")
def _tiny_defaults(count: int = 1, label: str = "x"):
    _echo(count=count, scale=0.5, label=label, flag=True)


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tiny") / "tiny.yaml"
    compiler.Compiler().compile(_tiny, str(out))
    return str(out)


@pytest.fixture(scope="module")
def defaults_yaml(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tiny") / "defaults.yaml"
    compiler.Compiler().compile(_tiny_defaults, str(out))
    return str(out)


def _client(server: KfpApiServer, **kw) -> kfp.Client:
    return kfp.Client(host=server.url, **kw)


def _cli(server: KfpApiServer, *args: str, stdin: str = "", token: str | None = None):
    auth = ["--existing-token", token] if token else []
    proc = subprocess.run([KFP_CLI, "--endpoint", server.url, *auth, "--output", "json", *args],
                          capture_output=True, text=True, input=stdin, timeout=60)
    return proc


def _json_out(stdout: str):
    """The JSON document the CLI prints (after kfp's "Pipeline details: URL" line)."""
    starts = [i for i in (stdout.find("{"), stdout.find("[")) if i >= 0]
    return json.loads(stdout[min(starts):])


def _post(server: KfpApiServer, path: str, body) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + "/apis/v2beta1" + path, method="POST",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


# --- the transcription against the generated client ------------------------------------------

def _client_type(f) -> str:
    """The openapi type string kfp_server_api gives a field of this kind."""
    base = {"string": "str", "int32": "int", "int64": "str", "bool": "bool", "bytes": "str",
            "date-time": "datetime", "struct": "object", "value": "object"}.get(f.kind)
    if base is None:
        base = client_class_name(f.ref)
    if f.repeated:
        return f"list[{base}]"
    if f.map:
        return f"dict(str, {base})"
    return base


@pytest.mark.parametrize("message", sorted(MESSAGES))
def test_schema_fields_and_types_match_the_generated_client(message):
    model = getattr(kfp_server_api.models, client_class_name(message))
    wire = {model.attribute_map[a]: t for a, t in model.openapi_types.items()}
    ours = {name: _client_type(f) for name, f in MESSAGES[message].items()}
    assert ours == wire, message


@pytest.mark.parametrize("enum", sorted(ENUMS))
def test_schema_enums_match_the_generated_client(enum):
    model = getattr(kfp_server_api.models, client_class_name(enum))
    values = {v for k, v in vars(model).items() if k.isupper() and isinstance(v, str)}
    assert set(ENUMS[enum]) == values, enum


def test_every_referenced_message_and_enum_is_transcribed():
    for message, fields in MESSAGES.items():
        for name, f in fields.items():
            if f.kind == "message":
                assert f.ref in MESSAGES, f"{message}.{name} -> {f.ref}"
            if f.kind == "enum":
                assert f.ref in ENUMS, f"{message}.{name} -> {f.ref}"


# --- the real client and CLI, end to end ------------------------------------------------------

def test_client_uploads_versions_and_runs_by_package_and_by_version(kfp_server, tiny_yaml):
    client = _client(kfp_server)
    pipeline = client.upload_pipeline(tiny_yaml, pipeline_name="tiny", description="first")
    version = client.upload_pipeline_version(tiny_yaml, "v2", pipeline_name="tiny")
    assert client.get_pipeline_id("tiny") == pipeline.pipeline_id == version.pipeline_id
    assert client.get_pipeline_id("nope") is None
    versions = client.list_pipeline_versions(pipeline.pipeline_id, sort_by="created_at desc")
    assert [v.display_name for v in versions.pipeline_versions] == ["v2", "tiny"]
    got = client.get_pipeline_version(pipeline.pipeline_id, version.pipeline_version_id)
    assert got.pipeline_spec["pipelineInfo"]["name"] == "tiny-typed"

    by_package = client.create_run_from_pipeline_package(
        tiny_yaml, arguments={"count": 3, "label": "x", "tags": ["a"], "opts": {"k": 1}},
        run_name="by-package", experiment_name="lastmile", service_account="pipeline-runner")
    experiment = client.get_experiment(experiment_name="lastmile")
    by_version = client.run_pipeline(experiment.experiment_id, "by-version",
                                     params={"count": 2, "label": "y", "scale": 1},
                                     pipeline_id=pipeline.pipeline_id,
                                     version_id=version.pipeline_version_id)
    run = client.get_run(by_package.run_id)
    assert run.state == "PENDING" and run.created_at is not None
    assert run.service_account == "pipeline-runner"
    assert by_version.pipeline_version_reference.pipeline_version_id == \
        version.pipeline_version_id
    listed = client.list_runs(experiment_id=experiment.experiment_id)
    assert {r.display_name for r in listed.runs} == {"by-package", "by-version"}

    package_body, version_body = kfp_server.bodies("POST", "/runs")
    assert package_body["runtime_config"]["parameters"] == {
        "count": 3, "label": "x", "tags": ["a"], "opts": {"k": 1}}
    assert package_body["pipeline_spec"]["root"]["inputDefinitions"]["parameters"]["count"] == \
        {"parameterType": "NUMBER_INTEGER"}
    assert "pipeline_spec" not in version_body
    assert version_body["pipeline_version_reference"] == {
        "pipeline_id": pipeline.pipeline_id, "pipeline_version_id": version.pipeline_version_id}
    upload = next(r for r in kfp_server.requests if r.path.endswith("/pipelines/upload"))
    assert upload.query == {"name": "tiny", "description": "first"}
    assert upload.files["uploadfile"]["content"] == Path(tiny_yaml).read_bytes()
    assert kfp_server.errors == []


def test_cli_creates_an_enabled_recurring_run_and_manages_it(kfp_server, defaults_yaml):
    created = _cli(kfp_server, "pipeline", "create", "-p", "tiny", defaults_yaml)
    assert created.returncode == 0, created.stderr
    pipeline_id = _json_out(created.stdout)["pipeline_id"]
    version = _cli(kfp_server, "pipeline", "create-version", "-n", "tiny", "-v", "v2",
                   defaults_yaml)
    assert version.returncode == 0, version.stderr
    version_id = _json_out(version.stdout)["pipeline_version_id"]
    schedule = ["recurring-run", "create", "--experiment-name", "nightly", "--job-name",
                "retrain", "--cron-expression", "0 0 3 * * *", "--enabled", "--no-catchup",
                "--max-concurrency", "1", "--pipeline-id", pipeline_id, "--version-id",
                version_id]

    # `kfp recurring-run create` sends every KEY=VALUE as a JSON string: an integer
    # parameter given that way is refused, a string parameter goes through.
    refused = _cli(kfp_server, *schedule, "count=3")
    assert refused.returncode != 0 and kfp_server.recurring_runs == {}
    assert "count" in kfp_server.errors[-1] and "NUMBER_INTEGER" in kfp_server.errors[-1]
    job = _cli(kfp_server, *schedule, "label=nightly")
    assert job.returncode == 0, job.stderr
    body = kfp_server.bodies("POST", "/recurringruns")[-1]
    assert body["mode"] == "ENABLE" and body["no_catchup"] is True
    assert body["max_concurrency"] == 1
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert body["runtime_config"]["parameters"] == {"label": "nightly"}
    assert body["pipeline_version_reference"] == {"pipeline_id": pipeline_id,
                                                  "pipeline_version_id": version_id}
    job_id = _json_out(job.stdout)["recurring_run_id"]
    stored = kfp_server.recurring_runs[job_id]
    assert stored["status"] == "ENABLED" and stored["max_concurrency"] == "1"

    assert _cli(kfp_server, "recurring-run", "disable", job_id).returncode == 0
    assert kfp_server.recurring_runs[job_id]["status"] == "DISABLED"
    listed = _cli(kfp_server, "recurring-run", "list", "-e", stored["experiment_id"])
    assert [j["recurring_run_id"] for j in _json_out(listed.stdout)] == [job_id]
    assert _cli(kfp_server, "recurring-run", "delete", job_id, stdin="y\n").returncode == 0
    assert kfp_server.recurring_runs == {}


def test_cli_run_create_parses_parameter_values(kfp_server, tiny_yaml):
    run = _cli(kfp_server, "run", "create", "-e", "adhoc", "-r", "one", "-f", tiny_yaml,
               "count=4", "label=hello", "scale=2.5", "flag=false", 'tags=["a","b"]')
    assert run.returncode == 0, run.stderr
    (body,) = kfp_server.bodies("POST", "/runs")
    assert body["runtime_config"]["parameters"] == {
        "count": 4, "label": "hello", "scale": 2.5, "flag": False, "tags": ["a", "b"]}
    assert kfp_server.errors == []


def test_cli_tables_read_what_the_fake_answers(kfp_server, tiny_yaml):
    client = _client(kfp_server)
    pipeline = client.upload_pipeline(tiny_yaml, "tiny")
    run = client.create_run_from_pipeline_package(tiny_yaml, {"count": 1, "label": "x"},
                                                  run_name="shown")
    for args, shown in ((["run", "list"], run.run_id),
                        (["pipeline", "list-versions", pipeline.pipeline_id], "tiny")):
        proc = subprocess.run([KFP_CLI, "--endpoint", kfp_server.url, *args],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and shown in proc.stdout, (args, proc.stderr[-500:])
    assert kfp_server.errors == []


def test_lastmile_pipeline_uploads_and_runs_with_its_defaults(kfp_server, tmp_path):
    package = tmp_path / "lastmile.yaml"
    compiled = subprocess.run([sys.executable, "pipeline.py", "compile", "-o", str(package)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert compiled.returncode == 0, compiled.stderr[-2000:]
    client = _client(kfp_server)
    pipeline = client.upload_pipeline(str(package), pipeline_name="lastmile")
    result = client.create_run_from_pipeline_package(str(package), arguments={},
                                                     experiment_name="lastmile")
    assert client.get_run(result.run_id).state == "PENDING"
    (version,) = client.list_pipeline_versions(pipeline.pipeline_id).pipeline_versions
    # with a platform spec (Kubernetes settings) the API answers both documents, wrapped
    assert set(version.pipeline_spec) == {"pipeline_spec", "platform_spec"}
    assert "kubernetes" in version.pipeline_spec["platform_spec"]["platforms"]
    root = version.pipeline_spec["pipeline_spec"]["root"]
    assert "profile" in root["inputDefinitions"]["parameters"]
    (body,) = kfp_server.bodies("POST", "/runs")
    assert set(body["pipeline_spec"]) == {"pipeline_spec", "platform_spec"}
    assert kfp_server.errors == []


# --- refusals ---------------------------------------------------------------------------------

def _run_body(**overrides) -> dict:
    body = {"display_name": "r", "pipeline_version_reference": {"pipeline_id": "P"},
            "runtime_config": {"parameters": {}}}
    body.update(overrides)
    return body


@pytest.fixture
def uploaded(kfp_server, tiny_yaml):
    pipeline = _client(kfp_server).upload_pipeline(tiny_yaml, pipeline_name="tiny")
    return pipeline.pipeline_id


@pytest.mark.parametrize("body, needle", [
    (_run_body(colour="red"), "unknown field 'colour'"),
    (_run_body(runtime_config={"parameters": {}, "pipelineRoot": 3}), "pipelineRoot"),
    (_run_body(display_name=7), "display_name: invalid value for string field"),
    (_run_body(storage_state="KEPT"), "storage_state: invalid value for enum"),
    (_run_body(runtime_config={"parameters": {"count": 1, "label": "x", "colour": 1}}),
     "unknown runtime parameter(s) colour"),
    (_run_body(runtime_config={"parameters": {"count": 1.5, "label": "x"}}),
     "count: the pipeline declares NUMBER_INTEGER"),
    (_run_body(runtime_config={"parameters": {"count": 1, "label": 2}}),
     "label: the pipeline declares STRING"),
    (_run_body(runtime_config={"parameters": {"label": "x"}}),
     "count: required runtime parameter missing"),
    (_run_body(pipeline_spec={"pipelineInfo": {"name": "x"}}), "oneof pipeline_source"),
], ids=["unknown-field", "wrong-type-nested", "wrong-type", "bad-enum", "unknown-parameter",
        "float-for-integer", "int-for-string", "missing-required", "two-sources"])
def test_run_bodies_a_real_server_refuses_get_400(kfp_server, uploaded, body, needle):
    body["pipeline_version_reference"]["pipeline_id"] = uploaded
    status, answer = _post(kfp_server, "/runs", body)
    assert status == 400 and answer["code"] == 3 and needle in answer["message"], answer
    assert len(kfp_server.errors) == 1 and needle in kfp_server.errors[0]
    assert kfp_server.runs == {}


def test_the_client_surfaces_a_refused_parameter(kfp_server, tiny_yaml):
    client = _client(kfp_server)
    with pytest.raises(kfp_server_api.ApiException) as refused:
        client.create_run_from_pipeline_package(tiny_yaml, arguments={"count": 1.5, "label": "x"})
    assert refused.value.status == 400 and "NUMBER_INTEGER" in refused.value.body
    assert kfp_server.runs == {}


def test_malformed_pipeline_specs_are_refused(kfp_server, tiny_yaml, tmp_path):
    doc = yaml.safe_load(Path(tiny_yaml).read_text())
    doc["root"]["inputDefinitions"]["parameters"]["count"]["parameterType"] = "NUMBER_INT"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    client = _client(kfp_server)
    with pytest.raises(kfp_server_api.ApiException) as refused:
        client._upload_api.upload_pipeline(str(bad), name="bad")
    assert refused.value.status == 400 and "NUMBER_INT" in refused.value.body

    doc = yaml.safe_load(Path(tiny_yaml).read_text())
    doc["root"]["dag"]["tasks"]["echo"]["retryPolicy"] = {"maxRetries": 2}
    status, answer = _post(kfp_server, "/runs", {"display_name": "r", "pipeline_spec": doc,
                                                 "runtime_config": {"parameters": {}}})
    assert status == 400 and "retryPolicy" in answer["message"], answer
    assert len(kfp_server.errors) == 2 and kfp_server.pipelines == {} and kfp_server.runs == {}


@pytest.mark.parametrize("change, needle", [
    ({"max_concurrency": "11"}, "Support 1-10"),
    ({"max_concurrency": "ten"}, "max_concurrency: invalid value for integer field"),
    ({"mode": "ON"}, "mode: invalid value for enum RecurringRunMode"),
    ({"mode": None}, "mode: required"),
    ({"trigger": {"cron_schedule": {"cron": "0 3 * * 0"}}}, "month '0' is outside"),
    ({"trigger": {"cron_schedule": {"cron": "0 3 * *"}}}, "expected 5 to 6 fields"),
    ({"trigger": {"cron_schedule": {"cron": "0 0 3 * * *"},
                  "periodic_schedule": {"interval_second": 60}}}, "oneof trigger"),
    ({"trigger": {"periodic_schedule": {"interval_second": 0}}}, "least 1 second"),
    ({"no_catchup": "yes"}, "no_catchup: invalid value for bool field"),
])
def test_recurring_run_bodies_a_real_server_refuses_get_400(kfp_server, uploaded, change, needle):
    body = {"display_name": "nightly", "mode": "ENABLE", "max_concurrency": "1",
            "pipeline_version_reference": {"pipeline_id": uploaded},
            "runtime_config": {"parameters": {"count": 1, "label": "x"}},
            "trigger": {"cron_schedule": {"cron": "0 0 3 * * *"}}}
    assert _post(kfp_server, "/recurringruns", body)[0] == 200  # the valid body passes
    body.update(change)
    status, answer = _post(kfp_server, "/recurringruns", body)
    assert status == 400 and needle in answer["message"], answer
    assert needle in kfp_server.errors[-1] and len(kfp_server.recurring_runs) == 1


def test_cron_follows_robfig_cron_parse():
    for ok in ("0 0 3 * * *", "0 0 3 * * ?", "0 30 2 * * MON-FRI", "0 0 3 1 JAN *",
               "0 */5 * * *", "@daily", "@every 6h"):
        check_cron(ok, "cron")
    for bad in ("0 3 * * 0", "60 * * * * *", "* * * *", "@sometimes", "0 0 3 ? * ?x"):
        with pytest.raises(type(invalid(""))):
            check_cron(bad, "cron")


def test_filters_on_display_name_and_refuse_unknown_keys(kfp_server, tiny_yaml):
    client = _client(kfp_server)
    client.upload_pipeline(tiny_yaml, pipeline_name="alpha")
    client.upload_pipeline(tiny_yaml, pipeline_name="beta")
    by_substring = json.dumps({"predicates": [
        {"operation": "IS_SUBSTRING", "key": "display_name", "string_value": "ph"}]})
    assert [p.display_name for p in client.list_pipelines(filter=by_substring).pipelines] == \
        ["alpha"]
    in_list = json.dumps({"predicates": [
        {"operation": "IN", "key": "name", "string_values": {"values": ["beta", "gamma"]}}]})
    assert [p.name for p in client.list_pipelines(filter=in_list).pipelines] == ["beta"]
    with pytest.raises(kfp_server_api.ApiException) as refused:
        client.list_pipelines(filter=json.dumps({"predicates": [
            {"operation": "EQUALS", "key": "colour", "string_value": "red"}]}))
    assert refused.value.status == 400 and "invalid filter key 'colour'" in refused.value.body
    with pytest.raises(kfp_server_api.ApiException):
        client.list_pipelines(filter=json.dumps({"predicates": [
            {"op": "EQUALS", "key": "name", "string_value": "alpha"}]}))
    assert len(kfp_server.errors) == 2


def test_names_are_unique_like_the_real_database(kfp_server, tiny_yaml):
    client = _client(kfp_server)
    client.upload_pipeline(tiny_yaml, pipeline_name="tiny")
    client.upload_pipeline_version(tiny_yaml, "v1", pipeline_name="tiny")
    with pytest.raises(kfp_server_api.ApiException) as again:
        client.upload_pipeline_version(tiny_yaml, "v1", pipeline_name="tiny")
    assert again.value.status == 409
    with pytest.raises(kfp_server_api.ApiException) as twice:
        client.upload_pipeline(tiny_yaml, pipeline_name="tiny")
    assert twice.value.status == 409


# --- auth and multi-user ----------------------------------------------------------------------

def test_bearer_token_is_required_and_sent(tiny_yaml):
    with KfpApiServer(require_bearer="s3cr3t") as server:
        with pytest.raises(kfp_server_api.ApiException) as refused:
            _client(server).list_experiments()
        assert refused.value.status == 401
        _client(server, existing_token="s3cr3t").upload_pipeline(tiny_yaml, "tiny")
        upload = server.requests[-1]
        assert upload.status == 200 and upload.headers["authorization"] == "Bearer s3cr3t"
        cli = _cli(server, "pipeline", "list", token="s3cr3t")
        assert cli.returncode == 0 and _json_out(cli.stdout)[0]["display_name"] == "tiny"
        assert _cli(server, "pipeline", "list").returncode != 0


def test_dex_cookie_missing_is_a_silent_redirect_for_kfp(tiny_yaml):
    """Behind Dex (oidc-authservice) a request without the session cookie is redirected to the
    login page; kfp.Client follows the 302 and deserializes the HTML into EMPTY objects instead
    of raising. Callers must check what comes back (an id) or they report success falsely."""
    with KfpApiServer(require_cookie="authservice_session=abc") as server:
        experiment = _client(server).create_experiment("lastmile")
        assert experiment.experiment_id is None and server.experiments == {}
        assert server.errors and "redirected to /dex/auth" in server.errors[0]
        experiment = _client(server, cookies="authservice_session=abc").create_experiment("x")
        assert experiment.experiment_id in server.experiments
        assert server.requests[-1].headers["cookie"] == "authservice_session=abc"
    with KfpApiServer(require_cookie="authservice_session=abc", cookie_rejection="401") as server:
        # (a namespace skips the constructor's healthz call, which kfp retries 5 times 5 s apart)
        with pytest.raises(kfp_server_api.ApiException) as refused:
            _client(server, namespace="x").list_pipelines()
        assert refused.value.status == 401


def test_multi_user_lists_filter_by_namespace(tiny_yaml):
    with KfpApiServer(multi_user=True) as server:
        alice, bob = _client(server, namespace="alice"), _client(server, namespace="bob")
        for client in (alice, bob):
            client.create_run_from_pipeline_package(
                tiny_yaml, arguments={"count": 1, "label": "x"}, experiment_name="e",
                namespace=client.get_user_namespace())
        (mine,) = alice.list_experiments().experiments
        assert mine.namespace == "alice"
        (run,) = alice.list_runs().runs
        assert run.experiment_id == mine.experiment_id
        assert {e["namespace"] for e in server.experiments.values()} == {"alice", "bob"}
        with pytest.raises(kfp_server_api.ApiException) as refused:
            alice._run_api.run_service_list_runs()
        assert refused.value.status == 400 and "namespace is required" in refused.value.body


def test_the_fakes_own_answers_are_checked_against_the_schema(kfp_server, tiny_yaml):
    client = _client(kfp_server)
    run = client.create_run_from_pipeline_package(tiny_yaml, arguments={"count": 1, "label": "x"})
    kfp_server.runs[run.run_id]["state"] = "DONE"  # not a v2beta1RuntimeState
    with pytest.raises(kfp_server_api.ApiException) as broken:
        client.get_run(run.run_id)
    assert broken.value.status == 500 and "state: invalid value for enum" in kfp_server.errors[-1]


def test_create_pipeline_and_versions_from_json_bodies(kfp_server, tiny_yaml):
    status, pipeline = _post(kfp_server, "/pipelines", {"display_name": "made", "tags": {"a": "b"}})
    assert status == 200 and pipeline["name"] == "made"
    url = {"pipeline_url": Path(tiny_yaml).as_uri()}
    status, version = _post(kfp_server, f"/pipelines/{pipeline['pipeline_id']}/versions",
                            {"display_name": "v1", "package_url": url})
    assert status == 200 and version["pipeline_spec"]["pipelineInfo"]["name"] == "tiny-typed"
    status, both = _post(kfp_server, "/pipelines/create", {
        "pipeline": {"display_name": "both"}, "pipeline_version": {"package_url": url}})
    assert status == 200
    found = _client(kfp_server)._pipelines_api.pipeline_service_get_pipeline_by_name("both")
    assert found.pipeline_id == both["pipeline_id"] and len(kfp_server.versions) == 2
    status, answer = _post(kfp_server, "/pipelines", {"display_name": "x", "tags": ["a"]})
    assert status == 400 and "tags: map field must be a JSON object" in answer["message"]
    status, answer = _post(kfp_server, f"/pipelines/{pipeline['pipeline_id']}/versions", {
        "display_name": "v2", "package_url": {"pipeline_url": "https://example.com/p.yaml"}})
    assert status == 400 and "file://" in answer["message"]
