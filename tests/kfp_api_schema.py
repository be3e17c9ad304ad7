"""The Kubeflow Pipelines v2beta1 REST messages lastmile's clients send and receive, transcribed
by hand into a compact form the fake server (tests/kfp_server.py) validates request bodies with.

Transcribed from kubeflow/pipelines (read with the search tool; nothing copied into this repo):

  backend/api/v2beta1/swagger/run.swagger.json              d8e9da08f646f9cd55977f1a6fa62ecb03dea6d5
  backend/api/v2beta1/swagger/recurring_run.swagger.json    b9178ad594e4de7a6da372b42fc70bac2344cd13
  backend/api/v2beta1/swagger/pipeline.swagger.json         8b2a099e8c9f216a139602be3d349f5b1aab9d2c
  backend/api/v2beta1/swagger/pipeline.upload.swagger.json  34da377733497cb4dbe0a18ade2cd22716b17f6b
  backend/api/v2beta1/swagger/experiment.swagger.json       c04308feb6c2db7b3989a5f70c335076698f4178
  backend/api/v2beta1/swagger/filter.swagger.json           faa834bd2ccefeb506f892b10a57368e38b45685
  backend/api/v2beta1/swagger/healthz.swagger.json          3ec23c3bbcefeb099b89efa9b20314d17b285513
  backend/api/v2beta1/run.proto                             c6f3ec16edae391c580be1e7bee44c4437d24fbd
  backend/api/v2beta1/recurring_run.proto                   d8e9da08f646f9cd55977f1a6fa62ecb03dea6d5

The .proto files give what swagger cannot show: the `oneof` groups (ONEOFS) and enum numbers.
Those commits are older than the API kfp 2.17 speaks; the fields marked NEWER below are what
kfp-server-api 2.17.3 (the generated client kfp.Client uses) has on top of them: Pipeline and
PipelineVersion `name`/`tags`, Run/RecurringRun `plugins_input`, Run `plugins_output`, healthz
`pipeline_store`, Any's `@type`, and the filter's `operation` enum (the transcribed filter still
called it `op` with an UNKNOWN zero value; kfp.Client sends `operation`). For those we took the
field names and types from the client's models; tests/test_kfp_server.py checks every message
here against kfp_server_api's `openapi_types`/`attribute_map`, so a slip in either fails.

Field kinds are protojson's: "string", "int32", "int64" (a JSON number or a decimal string),
"bool", "date-time" (RFC 3339 string), "bytes" (base64 string), "struct" (google.protobuf.Struct:
a JSON object), "value" (google.protobuf.Value: any JSON), "enum" and "message" (with `ref`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Field:
    kind: str
    ref: str | None = None        # the enum or message name for kind "enum"/"message"
    repeated: bool = False        # a JSON array of the kind
    map: bool = False             # a JSON object: string keys, values of the kind
    read_only: bool = False       # swagger's readOnly (accepted in requests, ignored there)
    newer: bool = False           # in kfp-server-api 2.17.3, not in the transcribed swagger


S, I32, I64 = Field("string"), Field("int32"), Field("int64")
BOOL, TIME, STRUCT, VALUE = Field("bool"), Field("date-time"), Field("struct"), Field("value")


def msg(name: str, **kw) -> Field:
    return Field("message", name, **kw)


def enum(name: str, **kw) -> Field:
    return Field("enum", name, **kw)


def newer(f: Field) -> Field:
    return Field(f.kind, f.ref, f.repeated, f.map, f.read_only, newer=True)


# Enum name -> {value name: number} (numbers from the .proto files; JSON may carry either).
ENUMS: dict[str, dict[str, int]] = {
    "v2beta1ExperimentStorageState": {"STORAGE_STATE_UNSPECIFIED": 0, "AVAILABLE": 1,
                                      "ARCHIVED": 2},
    "v2beta1RunStorageState": {"STORAGE_STATE_UNSPECIFIED": 0, "AVAILABLE": 1, "ARCHIVED": 2},
    "v2beta1RuntimeState": {name: i for i, name in enumerate(
        ["RUNTIME_STATE_UNSPECIFIED", "PENDING", "RUNNING", "SUCCEEDED", "SKIPPED", "FAILED",
         "CANCELING", "CANCELED", "PAUSED"])},
    "RecurringRunMode": {"MODE_UNSPECIFIED": 0, "ENABLE": 1, "DISABLE": 2},
    "v2beta1RecurringRunStatus": {"STATUS_UNSPECIFIED": 0, "ENABLED": 1, "DISABLED": 3},
    # NEWER: the transcribed filter.swagger.json calls this PredicateOp with zero value UNKNOWN.
    "v2beta1PredicateOperation": {"OPERATION_UNSPECIFIED": 0, "EQUALS": 1, "NOT_EQUALS": 2,
                                  "GREATER_THAN": 3, "GREATER_THAN_EQUALS": 5, "LESS_THAN": 6,
                                  "LESS_THAN_EQUALS": 7, "IN": 8, "IS_SUBSTRING": 9},
    # NEWER (plugins_output of a run); numbers assumed sequential, the names are checked.
    "v2beta1PluginState": {"PLUGIN_STATE_UNSPECIFIED": 0, "PLUGIN_RUNNING": 1,
                           "PLUGIN_SUCCEEDED": 2, "PLUGIN_FAILED": 3},
    "MetadataValueRenderType": {"UNSPECIFIED": 0, "URL": 1},
}

MESSAGES: dict[str, dict[str, Field]] = {
    # healthz.swagger.json
    "v2beta1GetHealthzResponse": {"multi_user": BOOL, "pipeline_store": newer(S)},
    # experiment.swagger.json
    "v2beta1Experiment": {
        "experiment_id": S, "display_name": S, "description": S, "created_at": TIME,
        "namespace": S, "storage_state": enum("v2beta1ExperimentStorageState"),
        "last_run_created_at": TIME,
    },
    "v2beta1ListExperimentsResponse": {
        "experiments": msg("v2beta1Experiment", repeated=True), "total_size": I32,
        "next_page_token": S,
    },
    # pipeline.swagger.json, pipeline.upload.swagger.json
    "v2beta1Pipeline": {
        "pipeline_id": S, "display_name": S, "name": newer(S), "description": S,
        "created_at": TIME, "namespace": S, "error": msg("googlerpcStatus"),
        "tags": newer(Field("string", map=True)),
    },
    "v2beta1PipelineVersion": {
        "pipeline_id": S, "pipeline_version_id": S, "display_name": S, "name": newer(S),
        "description": S, "created_at": TIME, "package_url": msg("v2beta1Url"),
        "code_source_url": S, "pipeline_spec": STRUCT, "error": msg("googlerpcStatus"),
        "tags": newer(Field("string", map=True)),
    },
    "v2beta1Url": {"pipeline_url": S},
    "v2beta1ListPipelinesResponse": {
        "pipelines": msg("v2beta1Pipeline", repeated=True), "total_size": I32,
        "next_page_token": S,
    },
    "v2beta1ListPipelineVersionsResponse": {
        "pipeline_versions": msg("v2beta1PipelineVersion", repeated=True),
        "next_page_token": S, "total_size": I32,
    },
    "v2beta1CreatePipelineAndVersionRequest": {
        "pipeline": msg("v2beta1Pipeline"), "pipeline_version": msg("v2beta1PipelineVersion"),
    },
    # run.swagger.json
    "v2beta1Run": {
        "experiment_id": S, "run_id": S, "display_name": S,
        "storage_state": enum("v2beta1RunStorageState"), "description": S,
        "pipeline_version_id": S, "pipeline_spec": STRUCT,
        "pipeline_version_reference": msg("v2beta1PipelineVersionReference"),
        "runtime_config": msg("v2beta1RuntimeConfig"), "service_account": S,
        "created_at": TIME, "scheduled_at": TIME, "finished_at": TIME,
        "state": enum("v2beta1RuntimeState"), "error": msg("googlerpcStatus"),
        "run_details": msg("v2beta1RunDetails"), "recurring_run_id": S,
        "state_history": msg("v2beta1RuntimeStatus", repeated=True),
        "plugins_input": newer(Field("value", map=True)),
        "plugins_output": newer(msg("v2beta1PluginOutput", map=True)),
    },
    "v2beta1PipelineVersionReference": {"pipeline_id": S, "pipeline_version_id": S},
    "v2beta1RuntimeConfig": {"parameters": Field("value", map=True), "pipeline_root": S},
    "v2beta1RuntimeStatus": {
        "update_time": TIME, "state": enum("v2beta1RuntimeState"),
        "error": msg("googlerpcStatus"),
    },
    "v2beta1RunDetails": {
        "pipeline_context_id": I64, "pipeline_run_context_id": I64,
        "task_details": msg("v2beta1PipelineTaskDetail", repeated=True),
    },
    "v2beta1PipelineTaskDetail": {
        "run_id": S, "task_id": S, "display_name": S, "create_time": TIME, "start_time": TIME,
        "end_time": TIME, "executor_detail": msg("v2beta1PipelineTaskExecutorDetail"),
        "state": enum("v2beta1RuntimeState"), "execution_id": I64,
        "error": msg("googlerpcStatus"), "inputs": msg("v2beta1ArtifactList", map=True),
        "outputs": msg("v2beta1ArtifactList", map=True), "parent_task_id": S,
        "state_history": msg("v2beta1RuntimeStatus", repeated=True), "pod_name": S,
        "child_tasks": msg("PipelineTaskDetailChildTask", repeated=True),
    },
    "v2beta1PipelineTaskExecutorDetail": {
        "main_job": S, "pre_caching_check_job": S,
        "failed_main_jobs": Field("string", repeated=True),
        "failed_pre_caching_check_jobs": Field("string", repeated=True),
    },
    "PipelineTaskDetailChildTask": {"task_id": S, "pod_name": S},
    "v2beta1ArtifactList": {"artifact_ids": Field("int64", repeated=True)},
    "v2beta1ListRunsResponse": {
        "runs": msg("v2beta1Run", repeated=True), "total_size": I32, "next_page_token": S,
    },
    "v2beta1PluginOutput": {  # NEWER, whole message
        "entries": msg("v2beta1MetadataValue", map=True),
        "state": enum("v2beta1PluginState"), "state_message": S,
    },
    "v2beta1MetadataValue": {  # NEWER, whole message
        "value": VALUE, "render_type": enum("MetadataValueRenderType"),
    },
    "googlerpcStatus": {
        "code": I32, "message": S, "details": msg("protobufAny", repeated=True),
    },
    "protobufAny": {"@type": newer(S), "type_url": S, "value": Field("bytes")},
    # recurring_run.swagger.json
    "v2beta1RecurringRun": {
        "recurring_run_id": S, "display_name": S, "description": S, "pipeline_version_id": S,
        "pipeline_spec": STRUCT,
        "pipeline_version_reference": msg("v2beta1PipelineVersionReference"),
        "runtime_config": msg("v2beta1RuntimeConfig"), "service_account": S,
        "max_concurrency": I64, "trigger": msg("v2beta1Trigger"),
        "mode": enum("RecurringRunMode"), "created_at": TIME, "updated_at": TIME,
        "status": enum("v2beta1RecurringRunStatus"), "error": msg("googlerpcStatus"),
        "no_catchup": BOOL, "namespace": Field("string", read_only=True), "experiment_id": S,
        "plugins_input": newer(Field("value", map=True)),
    },
    "v2beta1Trigger": {
        "cron_schedule": msg("v2beta1CronSchedule"),
        "periodic_schedule": msg("v2beta1PeriodicSchedule"),
    },
    "v2beta1CronSchedule": {"start_time": TIME, "end_time": TIME, "cron": S},
    "v2beta1PeriodicSchedule": {"start_time": TIME, "end_time": TIME, "interval_second": I64},
    "v2beta1ListRecurringRunsResponse": {
        "recurringRuns": msg("v2beta1RecurringRun", repeated=True), "total_size": I32,
        "next_page_token": S,
    },
    # filter.swagger.json (+ the NEWER `operation`; the query parameter `filter` carries it)
    "v2beta1Filter": {"predicates": msg("v2beta1Predicate", repeated=True)},
    "v2beta1Predicate": {
        "operation": newer(enum("v2beta1PredicateOperation")), "key": S, "int_value": I32,
        "long_value": I64, "string_value": S, "timestamp_value": TIME,
        "int_values": msg("PredicateIntValues"), "long_values": msg("PredicateLongValues"),
        "string_values": msg("PredicateStringValues"),
    },
    "PredicateIntValues": {"values": Field("int32", repeated=True)},
    "PredicateLongValues": {"values": Field("int64", repeated=True)},
    "PredicateStringValues": {"values": Field("string", repeated=True)},
}

# oneof groups from the .proto files: at most one member may be set (protojson refuses two).
ONEOFS: dict[str, dict[str, tuple[str, ...]]] = {
    "v2beta1Run": {"pipeline_source": ("pipeline_version_id", "pipeline_spec",
                                       "pipeline_version_reference")},
    "v2beta1RecurringRun": {"pipeline_source": ("pipeline_version_id", "pipeline_spec",
                                                "pipeline_version_reference")},
    "v2beta1Trigger": {"trigger": ("cron_schedule", "periodic_schedule")},
    "v2beta1Predicate": {"value": ("int_value", "long_value", "string_value", "timestamp_value",
                                   "int_values", "long_values", "string_values")},
}

# The kfp_server_api class each message is generated as (the rest: first letter upper-cased).
CLIENT_CLASS = {"googlerpcStatus": "GoogleRpcStatus", "protobufAny": "ProtobufAny"}


def client_class_name(message: str) -> str:
    return CLIENT_CLASS.get(message, message[0].upper() + message[1:])
