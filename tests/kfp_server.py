"""A local fake of the Kubeflow Pipelines v2beta1 REST API server that validates what real clients
send: the contract test lastmile's cluster path runs against (issue 17 point 6).

`KfpApiServer` is a threaded http.server on 127.0.0.1 (a free port) implementing what kfp 2.17's
`kfp.Client` and the `kfp` CLI call: healthz; experiments; pipelines (multipart upload of a
pipeline and of a version, create, get, get by name, list with `filter`, versions); runs; and
recurring runs (create, get, list, delete, enable, disable). Every JSON body is checked against
the API's field definitions transcribed in tests/kfp_api_schema.py the way grpc-gateway's
protojson unmarshal checks it (unknown fields, JSON types, int64 as number or string, enum names,
oneofs), every pipeline spec is parsed with kfp's own IR proto (unknown IR fields rejected), and
a run's or recurring run's runtime parameters are checked against the pipeline's root
inputDefinitions. A refused request gets the HTTP status of its google.rpc code with a
google.rpc.Status-like body ({"code": 3, "message": "...field path..."}) and its message is
appended to `server.errors`. What this does NOT prove is listed in docs/contract-tests.md.

    from kfp_server import kfp_server  # noqa: F401  (pytest fixture: a started server, no auth)

    with KfpApiServer(require_bearer="TOKEN") as server:
        kfp.Client(host=server.url, existing_token="TOKEN").upload_pipeline("p.yaml", "p")
        server.bodies("POST", "/runs"), server.requests, server.errors, server.runs, ...
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import io
import json
import math
import re
import tarfile
import threading
import urllib.parse
import uuid
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format

from kfp_api_schema import ENUMS, MESSAGES, ONEOFS, Field

API = "/apis/v2beta1"
# google.rpc.Code -> HTTP status, as grpc-gateway maps them.
HTTP_STATUS = {3: 400, 5: 404, 6: 409, 9: 400, 12: 501, 13: 500, 16: 401}
INT32 = (-(2 ** 31), 2 ** 31 - 1)
INT64 = (-(2 ** 63), 2 ** 63 - 1)
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")
_ID, _VID = r"(?P<id>[^/:]+)", r"(?P<vid>[^/:]+)"  # path ids in ROUTES
MAX_CONCURRENCY = (1, 10)  # recurring_run_server.go: "Support 1-10"


class ApiError(Exception):
    """A refused request: a google.rpc code and a message naming the field."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ApiError:
    return ApiError(3, message)  # INVALID_ARGUMENT


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- protojson-like validation of a JSON body against the transcribed schema -----------------

def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _check_int(value: Any, bounds: tuple[int, int], path: str) -> int:
    # protojson: a JSON number or a string holding one, integral, in range (not a bool).
    if isinstance(value, bool):
        raise invalid(f"{path}: invalid value for integer field: {json.dumps(value)}")
    number = value
    if isinstance(value, str):
        try:
            number = float(value) if re.search(r"[.eE]", value) else int(value)
        except ValueError:
            raise invalid(f"{path}: invalid value for integer field: {json.dumps(value)}") from None
    if isinstance(number, float):
        if not math.isfinite(number) or not number.is_integer():
            raise invalid(f"{path}: invalid value for integer field: {json.dumps(value)}")
        number = int(number)
    if not isinstance(number, int):
        raise invalid(f"{path}: invalid value for integer field: {json.dumps(value)}")
    if not bounds[0] <= number <= bounds[1]:
        raise invalid(f"{path}: integer out of range: {value}")
    return number


def _check_scalar(f: Field, value: Any, path: str) -> None:
    kind = f.kind
    if kind == "string":
        if not isinstance(value, str):
            raise invalid(f"{path}: invalid value for string field: {json.dumps(value)}")
    elif kind in ("int32", "int64"):
        _check_int(value, INT32 if kind == "int32" else INT64, path)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise invalid(f"{path}: invalid value for bool field: {json.dumps(value)}")
    elif kind == "date-time":
        if not isinstance(value, str) or not RFC3339.match(value):
            raise invalid(f"{path}: invalid google.protobuf.Timestamp value {json.dumps(value)}")
    elif kind == "bytes":
        try:
            base64.b64decode(value, validate=True)
        except (TypeError, ValueError):
            raise invalid(f"{path}: invalid value for bytes field") from None
    elif kind == "struct":
        if not isinstance(value, dict):
            raise invalid(f"{path}: google.protobuf.Struct must be a JSON object")
    elif kind == "value":
        pass  # any JSON
    elif kind == "enum":
        names = ENUMS[f.ref]
        ok = value in names if isinstance(value, str) else (
            isinstance(value, int) and not isinstance(value, bool) and value in names.values())
        if not ok:
            raise invalid(f"{path}: invalid value for enum {f.ref}: {json.dumps(value)} "
                          f"(one of {', '.join(names)})")
    elif kind == "message":
        validate_message(f.ref, value, path)
    else:  # pragma: no cover - a schema slip
        raise AssertionError(f"unknown field kind {kind}")


def _check_field(f: Field, value: Any, path: str) -> None:
    if value is None:
        return  # protojson: null means "not set" for every field kind
    if f.repeated:
        if not isinstance(value, list):
            raise invalid(f"{path}: repeated field must be a JSON array")
        for i, item in enumerate(value):
            _check_scalar(f, item, f"{path}[{i}]")
    elif f.map:
        if not isinstance(value, dict):
            raise invalid(f"{path}: map field must be a JSON object")
        for key, item in value.items():
            if item is None and f.kind != "value":
                raise invalid(f"{path}[{key}]: map value must not be null")
            _check_scalar(f, item, f"{path}[{key}]")
    else:
        _check_scalar(f, value, path)


def validate_message(name: str, value: Any, path: str) -> dict:
    """Check `value` as JSON for message `name`; return it keyed by proto field names."""
    if not isinstance(value, dict):
        raise invalid(f"{path or name}: expected a JSON object for {name}")
    fields = MESSAGES[name]
    by_json_name = {_camel(n): n for n in fields}
    out: dict[str, Any] = {}
    for key, item in value.items():
        proto_name = key if key in fields else by_json_name.get(key)
        where = f"{path}.{key}" if path else key
        if proto_name is None:
            raise invalid(f"{where}: unknown field {key!r} in {name} "
                          f"(fields: {', '.join(fields)})")
        if proto_name in out:
            raise invalid(f"{where}: duplicate field {proto_name!r}")
        _check_field(fields[proto_name], item, where)
        out[proto_name] = item
    for group, members in ONEOFS.get(name, {}).items():
        present = [m for m in members if out.get(m) is not None]
        if len(present) > 1:
            raise invalid(f"{path or name}: oneof {group} is already set "
                          f"({' and '.join(present)} both given)")
    return out


# --- pipeline specs (kfp's own IR proto) and runtime parameters -------------------------------

def parse_pipeline_spec(doc: Any, path: str):
    """Parse a pipeline spec JSON/YAML document with kfp's IR proto (unknown fields refused).

    A run body carries either the PipelineSpec itself or, when the package has a platform
    spec, {"pipeline_spec": ..., "platform_spec": ...} (kfp.client's _PipelineDoc.to_dict)."""
    from kfp.pipeline_spec import pipeline_spec_pb2

    if not isinstance(doc, dict):
        raise invalid(f"{path}: a pipeline spec must be a JSON object")
    platform = None
    if "pipeline_spec" in doc and set(doc) <= {"pipeline_spec", "platform_spec"}:
        doc, platform = doc["pipeline_spec"], doc.get("platform_spec")
    spec = pipeline_spec_pb2.PipelineSpec()
    try:
        json_format.ParseDict(doc, spec, ignore_unknown_fields=False)
        if platform is not None:
            json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec(),
                                  ignore_unknown_fields=False)
    except (json_format.ParseError, TypeError, ValueError) as e:
        raise invalid(f"{path}: invalid pipeline spec: {e}") from None
    if not spec.pipeline_info.name:
        raise invalid(f"{path}: invalid pipeline spec: pipelineInfo.name is empty")
    if not spec.schema_version:
        raise invalid(f"{path}: invalid pipeline spec: schemaVersion is empty")
    if not spec.HasField("root"):
        raise invalid(f"{path}: invalid pipeline spec: no root component")
    return spec


PARAMETER_TYPES = {
    "NUMBER_INTEGER": ("an integer", lambda v: not isinstance(v, bool) and (
        isinstance(v, int) or (isinstance(v, float) and v.is_integer()))),
    "NUMBER_DOUBLE": ("a number", lambda v: isinstance(v, (int, float))
                      and not isinstance(v, bool)),
    "STRING": ("a string", lambda v: isinstance(v, str)),
    "BOOLEAN": ("a boolean", lambda v: isinstance(v, bool)),
    "LIST": ("a JSON array", lambda v: isinstance(v, list)),
    "STRUCT": ("a JSON object", lambda v: isinstance(v, dict)),
}


def check_runtime_parameters(spec, parameters: dict | None, path: str) -> None:
    """Names, types and required-ness of runtime parameters against the root inputDefinitions."""
    from kfp.pipeline_spec import pipeline_spec_pb2

    defined = spec.root.input_definitions.parameters
    parameters = parameters or {}
    unknown = sorted(set(parameters) - set(defined))
    if unknown:
        raise invalid(f"{path}: unknown runtime parameter(s) {', '.join(unknown)}; the "
                      f"pipeline's parameters are: {', '.join(sorted(defined))}")
    type_names = pipeline_spec_pb2.ParameterType.ParameterTypeEnum
    for name, definition in defined.items():
        if name not in parameters:
            if not definition.is_optional and not definition.HasField("default_value"):
                raise invalid(f"{path}.{name}: required runtime parameter missing")
            continue
        type_name = type_names.Name(definition.parameter_type)
        if type_name not in PARAMETER_TYPES:
            continue  # PARAMETER_TYPE_ENUM_UNSPECIFIED or a task-final-status input
        wanted, ok = PARAMETER_TYPES[type_name]
        if not ok(parameters[name]):
            raise invalid(f"{path}.{name}: the pipeline declares {type_name}, so the value "
                          f"must be {wanted}; got {json.dumps(parameters[name])}")


def load_package(filename: str, content: bytes) -> list[dict]:
    """The YAML documents of an uploaded package (.yaml/.yml/.json, or one inside .tar.gz/.zip)."""
    if content[:2] == b"\x1f\x8b":
        with tarfile.open(fileobj=io.BytesIO(content), mode="r:gz") as tar:
            members = [m for m in tar if m.isfile() and m.name.endswith((".yaml", ".yml"))]
            if len(members) != 1:
                raise invalid(f"uploadfile {filename}: want one YAML file in the archive")
            content = tar.extractfile(members[0]).read()
    elif content[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            names = [n for n in archive.namelist() if n.endswith((".yaml", ".yml"))]
            if len(names) != 1:
                raise invalid(f"uploadfile {filename}: want one YAML file in the archive")
            content = archive.read(names[0])
    try:
        docs = [d for d in yaml.safe_load_all(content.decode("utf-8")) if d is not None]
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise invalid(f"uploadfile {filename}: not a YAML/JSON pipeline package: {e}") from None
    if not docs:
        raise invalid(f"uploadfile {filename}: empty pipeline package")
    return docs


def package_spec_doc(docs: list[dict], where: str) -> dict:
    """Validate an uploaded package's documents; return the spec as the API answers it: the
    PipelineSpec itself, or {"pipeline_spec", "platform_spec"} when the package has a platform
    spec (the real server's YamlStringToPipelineSpecStruct)."""
    if len(docs) == 1:
        parse_pipeline_spec(docs[0], where)
        return docs[0]
    platform: dict = {}
    for doc in docs[1:]:
        platform.update(doc)
    spec = {"pipeline_spec": docs[0], "platform_spec": platform}
    parse_pipeline_spec(spec, where)
    return spec


# --- cron: robfig/cron v1's Parse, which KFP's recurring run server calls --------------------

CRON_FIELDS = (("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31),
               ("month", 1, 12), ("day of week", 0, 6))
CRON_NAMES = {"month": ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT",
                        "NOV", "DEC"],
              "day of week": ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]}
CRON_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight",
                    "@hourly"}


def check_cron(expr: str, path: str) -> None:
    """robfig/cron v1 `cron.Parse`: seconds first, 5 or 6 fields (day of week optional), or a
    descriptor. Note "0 3 * * *" parses (second 0, minute 3, every hour), not 03:00 daily."""
    def fail(why: str) -> ApiError:
        return invalid(f"{path}: Schedule cron is not a supported format "
                       f"(https://godoc.org/github.com/robfig/cron): {expr!r}: {why}")

    expr = expr.strip()
    if expr.startswith("@"):
        if expr in CRON_DESCRIPTORS:
            return
        if expr.startswith("@every "):
            if re.fullmatch(r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+", expr[7:].strip()):
                return
            raise fail("bad @every duration")
        raise fail("unrecognized descriptor")
    parts = expr.split()
    if len(parts) not in (5, 6):
        raise fail(f"expected 5 to 6 fields (seconds first), found {len(parts)}")
    for text, (name, low, high) in zip(parts, CRON_FIELDS):
        for item in text.split(","):
            _check_cron_item(item, name, low, high, fail)


def _check_cron_item(item: str, name: str, low: int, high: int, fail) -> None:
    def number(token: str) -> int:
        names = CRON_NAMES.get(name, [])
        if token.upper() in names:
            return names.index(token.upper()) + (1 if name == "month" else 0)
        if not token.isdigit():
            raise fail(f"bad {name} value {token!r}")
        return int(token)

    span, _, step = item.partition("/")
    if step and (not step.isdigit() or int(step) == 0):
        raise fail(f"bad step in {name}: {item!r}")
    if span in ("*", "?"):  # robfig takes '?' as '*' in any field
        return
    first, _, last = span.partition("-")
    a = number(first)
    b = number(last) if last else a
    if not (low <= a <= high and low <= b <= high) or a > b:
        raise fail(f"{name} {item!r} is outside [{low}, {high}]")


# --- list requests: filter, sort, page ---------------------------------------------------------

def parse_filter(encoded: str | None) -> list[dict]:
    """The predicates of a `filter` query parameter (JSON of v2beta1Filter, as jsonpb reads it)."""
    if not encoded:
        return []
    try:
        value = json.loads(encoded)
    except json.JSONDecodeError as e:
        raise invalid(f"failed to parse valid filter from {encoded!r}: {e}") from None
    predicates = validate_message("v2beta1Filter", value, "filter").get("predicates") or []
    out = []
    for i, raw in enumerate(predicates):
        p = validate_message("v2beta1Predicate", raw, f"filter.predicates[{i}]")
        op = p.get("operation", 0)
        op = op if isinstance(op, str) else {v: k for k, v in
                                             ENUMS["v2beta1PredicateOperation"].items()}[op]
        if op == "OPERATION_UNSPECIFIED":
            raise invalid(f"filter.predicates[{i}]: operation is unspecified")
        values = [k for k in ONEOFS["v2beta1Predicate"]["value"] if p.get(k) is not None]
        if not p.get("key") or len(values) != 1:
            raise invalid(f"filter.predicates[{i}]: want a key and exactly one value")
        out.append({"op": op, "key": p["key"], "kind": values[0], "value": p[values[0]]})
    return out


def _comparable(kind: str, value: Any) -> Any:
    if kind in ("int_value", "long_value"):
        return int(value)
    if kind == "timestamp_value":
        return datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    return value


# The keys a list request may filter and sort on: the scalar fields of each stored resource.
LIST_KEYS = {
    "experiments": {"experiment_id", "display_name", "description", "created_at", "namespace",
                    "storage_state"},
    "pipelines": {"pipeline_id", "name", "display_name", "description", "created_at",
                  "namespace"},
    "pipeline versions": {"pipeline_id", "pipeline_version_id", "name", "display_name",
                          "description", "created_at"},
    "runs": {"run_id", "display_name", "description", "experiment_id", "service_account",
             "created_at", "scheduled_at", "state", "storage_state", "recurring_run_id"},
    "recurring runs": {"recurring_run_id", "display_name", "description", "experiment_id",
                       "namespace", "service_account", "max_concurrency", "mode", "status",
                       "created_at", "updated_at", "no_catchup"},
}


def _key(resource: str, key: str, what: str) -> str:
    if key not in LIST_KEYS[resource]:
        raise invalid(f"{what}: invalid {what} key {key!r} for {resource} "
                      f"(keys: {', '.join(sorted(LIST_KEYS[resource]))})")
    return key


def _matches(item: dict, pred: dict, resource: str) -> bool:
    key, op, kind, want = pred["key"], pred["op"], pred["kind"], pred["value"]
    _key(resource, key, "filter")
    have = item.get(key, "")
    if op == "IN":
        wanted = {"int_values", "long_values", "string_values"}
        if kind not in wanted:
            raise invalid(f"filter: IN needs int_values, long_values or string_values")
        return str(have) in {str(v) for v in (want.get("values") or [])}
    if op == "IS_SUBSTRING":
        if kind != "string_value":
            raise invalid("filter: IS_SUBSTRING needs string_value")
        return want in str(have)
    if kind in ("int_values", "long_values", "string_values"):
        raise invalid(f"filter: {op} needs a single value, not {kind}")
    try:
        a, b = _comparable(kind, have), _comparable(kind, want)
    except (TypeError, ValueError):
        raise invalid(f"filter: {key} = {have!r} cannot be compared as a {kind}") from None
    return {"EQUALS": a == b, "NOT_EQUALS": a != b, "GREATER_THAN": a > b,
            "GREATER_THAN_EQUALS": a >= b, "LESS_THAN": a < b, "LESS_THAN_EQUALS": a <= b}[op]


def list_page(items: list[dict], query: dict, resource: str, response_field: str) -> dict:
    predicates = parse_filter(query.get("filter"))
    for p in predicates:
        _key(resource, p["key"], "filter")
    items = [i for i in items if all(_matches(i, p, resource) for p in predicates)]
    sort_by = (query.get("sort_by") or "").split()
    if sort_by:
        key = _key(resource, sort_by[0], "sort_by")
        desc = len(sort_by) > 1 and sort_by[1].lower() == "desc"
        if len(sort_by) > 2 or (len(sort_by) == 2 and sort_by[1].lower() not in ("asc", "desc")):
            raise invalid(f"sort_by {query['sort_by']!r}: want 'field', 'field asc' or "
                          f"'field desc'")
        items = sorted(items, key=lambda i: str(i.get(key, "")), reverse=desc)
    size = _check_int(query.get("page_size") or 20, INT32, "page_size") or 20
    start = _check_int(query.get("page_token") or 0, INT32, "page_token")
    page = items[start:start + size]
    out: dict[str, Any] = {response_field: page, "total_size": len(items)}
    if start + size < len(items):
        out["next_page_token"] = str(start + size)
    return out


# --- the server ----------------------------------------------------------------------------

@dataclass
class Recorded:
    """One request as it reached the server."""
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]           # lower-case names
    body: Any = None                  # parsed JSON body (None when there is none)
    fields: dict[str, str] = field(default_factory=dict)    # multipart form fields
    files: dict[str, dict] = field(default_factory=dict)    # name -> {"filename", "content"}
    status: int = 0                   # the HTTP status answered


class KfpApiServer:
    """The fake KFP API on 127.0.0.1; use as a context manager (or start()/stop())."""

    def __init__(self, require_bearer: str | None = None, require_cookie: str | None = None,
                 multi_user: bool = False, cookie_rejection: str = "redirect"):
        if cookie_rejection not in ("redirect", "401"):
            raise ValueError("cookie_rejection is 'redirect' (oauth2-proxy/Dex style) or '401'")
        self.require_bearer = require_bearer
        self.require_cookie = require_cookie
        self.cookie_rejection = cookie_rejection
        self.multi_user = multi_user
        self.requests: list[Recorded] = []
        self.errors: list[str] = []
        self.experiments: dict[str, dict] = {}
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}
        # a v2beta1 Run has no namespace field: the fake remembers its experiment's
        self._namespaces: dict[str, str] = {}
        self.lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle
    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "KfpApiServer":
        handler = type("Handler", (_Handler,), {"api": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> "KfpApiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # what reached the server
    def bodies(self, method: str, path_suffix: str) -> list[Any]:
        """Parsed JSON bodies of the requests with this method whose path ends with the suffix,
        refused ones included (their `Recorded.status` says which)."""
        return [r.body for r in self.requests
                if r.method == method.upper() and r.path.endswith(path_suffix)]

    # routing: (method, path under /apis/v2beta1, handler, the response message)
    ROUTES = [
        ("GET", r"/healthz", "healthz", "v2beta1GetHealthzResponse"),
        ("POST", r"/experiments", "create_experiment", "v2beta1Experiment"),
        ("GET", r"/experiments", "list_experiments", "v2beta1ListExperimentsResponse"),
        ("GET", rf"/experiments/{_ID}", "get_experiment", "v2beta1Experiment"),
        ("DELETE", rf"/experiments/{_ID}", "delete_experiment", None),
        ("POST", rf"/experiments/{_ID}:(?P<verb>archive|unarchive)", "archive_experiment", None),
        ("POST", r"/pipelines/upload", "upload_pipeline", "v2beta1Pipeline"),
        ("POST", r"/pipelines/upload_version", "upload_pipeline_version",
         "v2beta1PipelineVersion"),
        ("POST", r"/pipelines", "create_pipeline", "v2beta1Pipeline"),
        ("POST", r"/pipelines/create", "create_pipeline_and_version", "v2beta1Pipeline"),
        ("GET", r"/pipelines", "list_pipelines", "v2beta1ListPipelinesResponse"),
        ("GET", r"/pipelines/names/(?P<name>[^/]+)", "get_pipeline_by_name", "v2beta1Pipeline"),
        ("GET", rf"/pipelines/{_ID}", "get_pipeline", "v2beta1Pipeline"),
        ("DELETE", rf"/pipelines/{_ID}", "delete_pipeline", None),
        ("POST", rf"/pipelines/{_ID}/versions", "create_pipeline_version",
         "v2beta1PipelineVersion"),
        ("GET", rf"/pipelines/{_ID}/versions", "list_pipeline_versions",
         "v2beta1ListPipelineVersionsResponse"),
        ("GET", rf"/pipelines/{_ID}/versions/{_VID}", "get_pipeline_version",
         "v2beta1PipelineVersion"),
        ("DELETE", rf"/pipelines/{_ID}/versions/{_VID}", "delete_pipeline_version", None),
        ("POST", r"/runs", "create_run", "v2beta1Run"),
        ("GET", r"/runs", "list_runs", "v2beta1ListRunsResponse"),
        ("GET", rf"/runs/{_ID}", "get_run", "v2beta1Run"),
        ("DELETE", rf"/runs/{_ID}", "delete_run", None),
        ("POST", rf"/runs/{_ID}:(?P<verb>archive|unarchive|terminate)", "run_action", None),
        ("POST", r"/recurringruns", "create_recurring_run", "v2beta1RecurringRun"),
        ("GET", r"/recurringruns", "list_recurring_runs", "v2beta1ListRecurringRunsResponse"),
        ("GET", rf"/recurringruns/{_ID}", "get_recurring_run", "v2beta1RecurringRun"),
        ("DELETE", rf"/recurringruns/{_ID}", "delete_recurring_run", None),
        ("POST", rf"/recurringruns/{_ID}:(?P<verb>enable|disable)", "toggle_recurring_run", None),
    ]

    def dispatch(self, req: Recorded) -> tuple[int, Any]:
        if not req.path.startswith(API):
            raise ApiError(5, f"{req.method} {req.path}: not a v2beta1 API path")
        rest = req.path[len(API):]
        for method, pattern, name, response in self.ROUTES:
            match = re.fullmatch(pattern, rest)
            if match and method == req.method:
                with self.lock:
                    payload = getattr(self, "_" + name)(req, **{
                        k: urllib.parse.unquote(v) for k, v in match.groupdict().items()})
                    # the fake's own answers must be what the API defines (else: a 500)
                    if response is not None:
                        try:
                            validate_message(response, payload, "")
                        except ApiError as e:
                            raise ApiError(13, f"the fake's {response} answer: {e.message}")
                    return 200, json.loads(json.dumps(payload))
        raise ApiError(5, f"{req.method} {req.path}: no such v2beta1 method in the fake")

    # helpers
    def _body(self, req: Recorded, message: str) -> dict:
        if req.body is None:
            raise invalid(f"{req.method} {req.path}: a JSON {message} body is required")
        return validate_message(message, req.body, "")

    def _namespace_query(self, req: Recorded, what: str) -> str | None:
        namespace = req.query.get("namespace") or None
        if self.multi_user and namespace is None:
            raise invalid(f"{what}: namespace is required in multi-user mode")
        return namespace if self.multi_user else None

    def _get(self, store: dict, key: str, what: str) -> dict:
        if key not in store:
            raise ApiError(5, f"{what} {key} not found")
        return store[key]

    # healthz
    def _healthz(self, req):
        return {"multi_user": self.multi_user, "pipeline_store": "database"}

    # experiments
    def _create_experiment(self, req):
        body = self._body(req, "v2beta1Experiment")
        name = body.get("display_name") or ""
        if not name.strip():
            raise invalid("display_name: an experiment needs a display_name")
        namespace = body.get("namespace") or ""
        if self.multi_user and not namespace:
            raise invalid("namespace: an experiment needs a namespace in multi-user mode")
        if any(e["display_name"] == name and e["namespace"] == namespace
               for e in self.experiments.values()):
            raise ApiError(6, f"display_name: experiment {name!r} already exists")
        return self._new_experiment(name, body.get("description") or "", namespace)

    def _new_experiment(self, name: str, description: str, namespace: str) -> dict:
        experiment = {"experiment_id": str(uuid.uuid4()), "display_name": name,
                      "description": description, "created_at": now_rfc3339(),
                      "namespace": namespace, "storage_state": "AVAILABLE"}
        self.experiments[experiment["experiment_id"]] = experiment
        return experiment

    def _list_experiments(self, req):
        namespace = self._namespace_query(req, "ListExperiments")
        items = [e for e in self.experiments.values()
                 if namespace is None or e["namespace"] == namespace]
        return list_page(items, req.query, "experiments", "experiments")

    def _get_experiment(self, req, id):
        return self._get(self.experiments, id, "experiment")

    def _delete_experiment(self, req, id):
        self._get(self.experiments, id, "experiment")
        del self.experiments[id]
        return {}

    def _archive_experiment(self, req, id, verb):
        experiment = self._get(self.experiments, id, "experiment")
        experiment["storage_state"] = "ARCHIVED" if verb == "archive" else "AVAILABLE"
        return {}

    # pipelines and versions
    def _uploaded(self, req) -> tuple[str, list[dict]]:
        upload = req.files.get("uploadfile")
        if upload is None:
            raise invalid("uploadfile: the multipart form needs an 'uploadfile' file")
        return upload["filename"] or "pipeline", load_package(upload["filename"],
                                                              upload["content"])

    def _new_pipeline(self, name: str, display_name: str, description: str, namespace: str,
                      tags: dict | None = None) -> dict:
        if not (display_name or name).strip():
            raise invalid("display_name: a pipeline needs a name")
        if any(p["name"] == name and p["namespace"] == namespace for p in self.pipelines.values()):
            raise ApiError(6, f"name: a pipeline named {name!r} already exists"
                              + (f" in namespace {namespace!r}" if namespace else ""))
        pipeline = {"pipeline_id": str(uuid.uuid4()), "name": name,
                    "display_name": display_name or name, "description": description,
                    "created_at": now_rfc3339(), "namespace": namespace}
        if tags:
            pipeline["tags"] = tags
        self.pipelines[pipeline["pipeline_id"]] = pipeline
        return pipeline

    def _new_version(self, pipeline_id: str, name: str, display_name: str, description: str,
                     spec: dict, package_url: str | None = None) -> dict:
        if not (display_name or name).strip():
            raise invalid("display_name: a pipeline version needs a name")
        if any(v["pipeline_id"] == pipeline_id and v["name"] == name
               for v in self.versions.values()):
            raise ApiError(6, f"name: pipeline {pipeline_id} already has a version named {name!r}")
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": str(uuid.uuid4()),
                   "name": name, "display_name": display_name or name,
                   "description": description, "created_at": now_rfc3339(),
                   "pipeline_spec": spec}
        if package_url:
            version["package_url"] = {"pipeline_url": package_url}
        self.versions[version["pipeline_version_id"]] = version
        return version

    def _upload_pipeline(self, req):
        filename, docs = self._uploaded(req)
        spec = package_spec_doc(docs, "uploadfile")
        q = req.query
        name = q.get("name") or q.get("display_name") or Path(filename).name.split(".")[0]
        pipeline = self._new_pipeline(name, q.get("display_name") or name,
                                      q.get("description") or "", q.get("namespace") or "")
        self._new_version(pipeline["pipeline_id"], name, q.get("display_name") or name,
                          q.get("description") or "", spec)
        return pipeline

    def _upload_pipeline_version(self, req):
        q = req.query
        if not q.get("pipelineid"):
            raise invalid("pipelineid: upload_version needs the parent pipeline's id")
        self._get(self.pipelines, q["pipelineid"], "pipeline")
        filename, docs = self._uploaded(req)
        spec = package_spec_doc(docs, "uploadfile")
        name = q.get("name") or q.get("display_name") or Path(filename).name.split(".")[0]
        return self._new_version(q["pipelineid"], name, q.get("display_name") or name,
                                 q.get("description") or "", spec)

    def _create_pipeline(self, req):
        body = self._body(req, "v2beta1Pipeline")
        name = body.get("name") or body.get("display_name") or ""
        return self._new_pipeline(name, body.get("display_name") or name,
                                  body.get("description") or "", body.get("namespace") or "",
                                  body.get("tags"))

    def _spec_from_url(self, version: dict, where: str) -> tuple[str, dict]:
        url = ((version.get("package_url") or {}).get("pipeline_url") or "")
        if not url:
            raise invalid(f"{where}.package_url.pipeline_url: required")
        if not url.startswith("file://"):
            raise invalid(f"{where}.package_url.pipeline_url: the fake fetches only file:// "
                          f"URLs (a real server downloads {url})")
        path = Path(urllib.parse.urlparse(url).path)
        return url, package_spec_doc(load_package(path.name, path.read_bytes()),
                                     f"{where}.package_url")

    def _create_pipeline_version(self, req, id):
        self._get(self.pipelines, id, "pipeline")
        body = self._body(req, "v2beta1PipelineVersion")
        url, spec = self._spec_from_url(body, "pipeline_version")
        name = body.get("name") or body.get("display_name") or ""
        return self._new_version(id, name, body.get("display_name") or name,
                                 body.get("description") or "", spec, url)

    def _create_pipeline_and_version(self, req):
        body = self._body(req, "v2beta1CreatePipelineAndVersionRequest")
        p = body.get("pipeline") or {}
        url, spec = self._spec_from_url(body.get("pipeline_version") or {}, "pipeline_version")
        name = p.get("name") or p.get("display_name") or ""
        pipeline = self._new_pipeline(name, p.get("display_name") or name,
                                      p.get("description") or "", p.get("namespace") or "",
                                      p.get("tags"))
        self._new_version(pipeline["pipeline_id"], name, pipeline["display_name"],
                          pipeline["description"], spec, url)
        return pipeline

    def _list_pipelines(self, req):
        namespace = req.query.get("namespace") or ""
        items = [p for p in self.pipelines.values() if p["namespace"] == namespace]
        return list_page(items, req.query, "pipelines", "pipelines")

    def _get_pipeline_by_name(self, req, name):
        namespace = req.query.get("namespace") or ""
        for p in self.pipelines.values():
            if p["name"] == name and p["namespace"] == namespace:
                return p
        raise ApiError(5, f"pipeline named {name!r} not found")

    def _get_pipeline(self, req, id):
        return self._get(self.pipelines, id, "pipeline")

    def _delete_pipeline(self, req, id):
        self._get(self.pipelines, id, "pipeline")
        owned = [v for v, ver in self.versions.items() if ver["pipeline_id"] == id]
        if owned and req.query.get("cascade") != "true":
            raise ApiError(9, f"pipeline {id} still has {len(owned)} version(s)")
        for v in owned:
            del self.versions[v]
        del self.pipelines[id]
        return {}

    def _list_pipeline_versions(self, req, id):
        self._get(self.pipelines, id, "pipeline")
        items = [v for v in self.versions.values() if v["pipeline_id"] == id]
        return list_page(items, req.query, "pipeline versions", "pipeline_versions")

    def _version(self, pipeline_id: str, version_id: str, where: str) -> dict:
        version = self._get(self.versions, version_id, f"{where}: pipeline version")
        if pipeline_id and version["pipeline_id"] != pipeline_id:
            raise ApiError(5, f"{where}: pipeline version {version_id} is not a version of "
                              f"pipeline {pipeline_id}")
        return version

    def _get_pipeline_version(self, req, id, vid):
        return self._version(id, vid, "pipeline_version_id")

    def _delete_pipeline_version(self, req, id, vid):
        self._version(id, vid, "pipeline_version_id")
        del self.versions[vid]
        return {}

    # runs and recurring runs share the pipeline source, runtime config and experiment checks
    def _resolve_job(self, body: dict) -> dict:
        """Check display_name, pipeline source, runtime parameters and the experiment of a run or
        recurring run body; return the fields the stored resource gets from them."""
        if not (body.get("display_name") or "").strip():
            raise invalid("display_name: required")
        sources = [k for k in ("pipeline_spec", "pipeline_version_reference",
                               "pipeline_version_id") if body.get(k) is not None]
        if not sources:
            raise invalid("pipeline_spec or pipeline_version_reference: one is required")
        if "pipeline_version_id" in sources:
            raise invalid("pipeline_version_id: deprecated in v2beta1; use "
                          "pipeline_version_reference")
        if "pipeline_spec" in sources:
            spec = parse_pipeline_spec(body["pipeline_spec"], "pipeline_spec")
        else:
            ref = body["pipeline_version_reference"]
            pipeline_id = ref.get("pipeline_id") or ""
            if not pipeline_id:
                raise invalid("pipeline_version_reference.pipeline_id: required")
            self._get(self.pipelines, pipeline_id, "pipeline_version_reference.pipeline_id: "
                                                   "pipeline")
            version_id = ref.get("pipeline_version_id") or self._latest_version(pipeline_id)
            version = self._version(pipeline_id, version_id,
                                    "pipeline_version_reference.pipeline_version_id")
            spec = parse_pipeline_spec(version["pipeline_spec"], "stored pipeline version")
        runtime = body.get("runtime_config") or {}
        check_runtime_parameters(spec, runtime.get("parameters"), "runtime_config.parameters")
        experiment_id = body.get("experiment_id") or self._default_experiment()
        experiment = self._get(self.experiments, experiment_id, "experiment_id: experiment")
        return {"experiment_id": experiment_id, "namespace": experiment["namespace"]}

    def _latest_version(self, pipeline_id: str) -> str:
        versions = [v for v in self.versions.values() if v["pipeline_id"] == pipeline_id]
        if not versions:
            raise ApiError(5, f"pipeline {pipeline_id} has no versions")
        return max(versions, key=lambda v: v["created_at"])["pipeline_version_id"]

    def _default_experiment(self) -> str:
        for e in self.experiments.values():
            if e["display_name"] == "Default" and e["namespace"] == "":
                return e["experiment_id"]
        return self._new_experiment("Default", "", "")["experiment_id"]

    def _create_run(self, req):
        body = self._body(req, "v2beta1Run")
        resolved = self._resolve_job(body)
        created = now_rfc3339()
        run = {k: v for k, v in body.items() if v is not None and k in (
            "display_name", "description", "pipeline_spec", "pipeline_version_reference",
            "runtime_config", "service_account")}
        run.update(run_id=str(uuid.uuid4()), experiment_id=resolved["experiment_id"],
                   storage_state="AVAILABLE", created_at=created, scheduled_at=created,
                   state="PENDING", state_history=[{"update_time": created, "state": "PENDING"}])
        self.runs[run["run_id"]] = run
        self._namespaces[run["run_id"]] = resolved["namespace"]
        return run

    def _list_runs(self, req):
        experiment_id = req.query.get("experiment_id")
        namespace = None if experiment_id else self._namespace_query(req, "ListRuns")
        items = [r for r in self.runs.values()
                 if (not experiment_id or r["experiment_id"] == experiment_id)
                 and (namespace is None or self._namespaces.get(r["run_id"]) == namespace)]
        return list_page(items, req.query, "runs", "runs")

    def _get_run(self, req, id):
        return self._get(self.runs, id, "run")

    def _delete_run(self, req, id):
        self._get(self.runs, id, "run")
        del self.runs[id]
        return {}

    def _run_action(self, req, id, verb):
        run = self._get(self.runs, id, "run")
        if verb == "terminate":
            run["state"] = "CANCELING"
            run["state_history"].append({"update_time": now_rfc3339(), "state": "CANCELING"})
        else:
            run["storage_state"] = "ARCHIVED" if verb == "archive" else "AVAILABLE"
        return {}

    def _create_recurring_run(self, req):
        body = self._body(req, "v2beta1RecurringRun")
        resolved = self._resolve_job(body)
        mode = body.get("mode")
        mode = mode if isinstance(mode, str) or mode is None else {
            v: k for k, v in ENUMS["RecurringRunMode"].items()}[mode]
        if mode in (None, "MODE_UNSPECIFIED"):
            raise invalid("mode: required input (ENABLE or DISABLE)")
        concurrency = _check_int(body.get("max_concurrency") or 0, INT64, "max_concurrency")
        if not MAX_CONCURRENCY[0] <= concurrency <= MAX_CONCURRENCY[1]:
            raise invalid(f"max_concurrency: The max concurrency of the recurring run is out of "
                          f"range. Support 1-10. Received {concurrency}.")
        trigger = body.get("trigger") or {}
        if trigger.get("cron_schedule") is not None:
            check_cron(trigger["cron_schedule"].get("cron") or "", "trigger.cron_schedule.cron")
        elif trigger.get("periodic_schedule") is not None:
            interval = _check_int(trigger["periodic_schedule"].get("interval_second") or 0,
                                  INT64, "trigger.periodic_schedule.interval_second")
            if interval < 1:
                raise invalid("trigger.periodic_schedule.interval_second: Set at interval to "
                              f"least 1 second (got {interval}).")
        else:
            raise invalid("trigger: a cron_schedule or a periodic_schedule is required")
        created = now_rfc3339()
        job = {k: v for k, v in body.items() if v is not None and k in (
            "display_name", "description", "pipeline_spec", "pipeline_version_reference",
            "runtime_config", "service_account", "trigger", "no_catchup")}
        job.update(recurring_run_id=str(uuid.uuid4()), experiment_id=resolved["experiment_id"],
                   namespace=resolved["namespace"], max_concurrency=str(concurrency), mode=mode,
                   status="ENABLED" if mode == "ENABLE" else "DISABLED",
                   created_at=created, updated_at=created)
        job.setdefault("no_catchup", False)
        self.recurring_runs[job["recurring_run_id"]] = job
        return job

    def _list_recurring_runs(self, req):
        experiment_id = req.query.get("experiment_id")
        namespace = None if experiment_id else self._namespace_query(req, "ListRecurringRuns")
        items = [j for j in self.recurring_runs.values()
                 if (not experiment_id or j["experiment_id"] == experiment_id)
                 and (namespace is None or j["namespace"] == namespace)]
        return list_page(items, req.query, "recurring runs", "recurringRuns")

    def _get_recurring_run(self, req, id):
        return self._get(self.recurring_runs, id, "recurring run")

    def _delete_recurring_run(self, req, id):
        policy = req.query.get("propagation_policy")
        if policy is not None and policy not in ("DELETE_PROPAGATION_POLICY_UNSPECIFIED",
                                                 "FOREGROUND", "BACKGROUND", "ORPHAN"):
            raise invalid(f"propagation_policy: invalid value {policy!r}")
        self._get(self.recurring_runs, id, "recurring run")
        del self.recurring_runs[id]
        return {}

    def _toggle_recurring_run(self, req, id, verb):
        job = self._get(self.recurring_runs, id, "recurring run")
        job.update(mode="ENABLE" if verb == "enable" else "DISABLE",
                   status="ENABLED" if verb == "enable" else "DISABLED",
                   updated_at=now_rfc3339())
        return {}


class _Handler(BaseHTTPRequestHandler):
    api: KfpApiServer
    protocol_version = "HTTP/1.1"
    timeout = 10  # seconds an idle keep-alive connection holds its thread

    def log_message(self, *args) -> None:  # quiet: tests read server.requests instead
        pass

    def _handle(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        headers = {k.lower(): v for k, v in self.headers.items()}
        length = int(headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        req = Recorded(self.command, url.path, query, headers)
        with self.api.lock:
            self.api.requests.append(req)
        try:
            if url.path == "/dex/auth":
                return self._send(req, 200, b"<html><body>Log in to Dex</body></html>",
                                  "text/html")
            self._authenticate(req)
            self._parse_body(req, raw)
            status, payload = self.api.dispatch(req)
            self._send(req, status, json.dumps(payload).encode())
        except _Redirect:
            raise
        except Exception as e:  # noqa: BLE001 - a fake's bug must reach the test, not hang it
            if not isinstance(e, ApiError):
                e = ApiError(13, f"the fake server failed: {type(e).__name__}: {e}")
            with self.api.lock:
                self.api.errors.append(f"{req.method} {req.path}: {e.message}")
            status = HTTP_STATUS.get(e.code, 500)
            self._send(req, status, json.dumps({"error": e.message, "code": e.code,
                                                "message": e.message, "details": []}).encode())

    def _authenticate(self, req: Recorded) -> None:
        api = self.api
        if api.require_cookie:
            name, _, value = api.require_cookie.partition("=")
            cookies = dict(c.strip().partition("=")[::2]
                           for c in req.headers.get("cookie", "").split(";") if "=" in c)
            if cookies.get(name) != value:
                if api.cookie_rejection == "redirect":
                    with api.lock:
                        api.errors.append(f"{req.method} {req.path}: no {name} session cookie; "
                                          f"redirected to /dex/auth")
                    raise _Redirect(req)
                raise ApiError(16, f"no valid {name} session cookie")
        # The API server itself answers healthz without authorizing (kfp.Client() calls it while
        # it is constructed); behind Dex/oauth2-proxy every path needs the session cookie.
        if api.require_bearer and req.path != API + "/healthz":
            if req.headers.get("authorization") != f"Bearer {api.require_bearer}":
                raise ApiError(16, "Unauthenticated: a valid 'Authorization: Bearer' token "
                                   "is required")

    def _parse_body(self, req: Recorded, raw: bytes) -> None:
        ctype = req.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + raw)
            for part in message.iter_parts():
                name = part.get_param("name", header="content-disposition")
                content = part.get_payload(decode=True) or b""
                if part.get_filename() is not None:
                    req.files[name] = {"filename": part.get_filename(), "content": content}
                else:
                    req.fields[name] = content.decode("utf-8", "replace")
        elif raw:
            try:
                req.body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise invalid(f"request body is not JSON: {e}") from None

    def _send(self, req: Recorded, status: int, payload: bytes,
              ctype: str = "application/json") -> None:
        req.status = status
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _dispatch_safely(self) -> None:
        try:
            self._handle()
        except _Redirect as redirect:
            redirect.req.status = 302
            self.send_response(302)
            self.send_header("Location", "/dex/auth?client_id=kubeflow-oidc-authservice")
            self.send_header("Content-Length", "0")
            self.end_headers()

    do_GET = do_POST = do_DELETE = do_PATCH = do_PUT = _dispatch_safely


class _Redirect(Exception):
    """A request without the Dex session cookie: answered 302 to /dex/auth like oauth2-proxy."""

    def __init__(self, req: Recorded):
        super().__init__(req.path)
        self.req = req


@pytest.fixture
def kfp_server():
    """A started KfpApiServer without auth, stopped after the test."""
    with KfpApiServer() as server:
        yield server
