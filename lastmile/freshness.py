"""Is there anything new to train on? A run's input fingerprint against the last published run.

A scheduled run must not retrain on identical data. After `filter_data`, the pipeline's
`check_new_data` step computes the run's fingerprint:

  * `data_sha256`     - SHA-256 of the filtered train/test files (`filter_data`'s summary), so
    the same rows under other object names count as the same data, and one new usable row
    counts as new data;
  * `base_model_hash` - `lastmile.modeling.base_fingerprint` of the base weights;
  * `config_sha256`   - SHA-256 of the resolved configuration (profile plus every pipeline
    parameter, the base model's name included), less the settings that spread the same work
    over more tasks without changing its result (`SCALE_OUT_SETTINGS`).

and compares it with the fingerprint stored in the manifest of the latest run published under
`publish_to` (`lastmile.results.publish_run` writes it there). Equal fingerprints: nothing is
new, the rest of the DAG is skipped. `force` retrains regardless; without `publish_to` there
is nothing to compare with and every run trains.

`decide` is the pure decision; `latest_published` and `check` add the object-store lookup.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Any, Mapping

FINGERPRINT_FORMAT = "lastmile-fingerprint/1"
#: The fields that decide "new"; base_model, data_source and data_revision (the Hugging Face
#: commit a hub dataset was loaded at) are recorded for messages and provenance only: the
#: filtered rows' data_sha256 already decides whether the data changed.
COMPARED = ("data_sha256", "base_model_hash", "config_sha256")
LABELS = {"data_sha256": "the data", "base_model_hash": "the base model's weights",
          "config_sha256": "the configuration"}
#: Key of the fingerprint in a published run's manifest metadata.
MANIFEST_KEY = "fingerprint"
#: Published run names start with the UTC time of publishing (`run_name`), so name order is
#: publishing order; runs named otherwise (published by hand) are not candidates for "latest".
RUN_NAME = re.compile(r"^(\d{8}T\d{6}Z)(-[A-Za-z0-9._-]*)?$")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


#: Configuration paths that change how many tasks or processes do the work, not its result
#: (shards gather to the unsharded files; N training processes give one process's adapters up
#: to float rounding): a run that only raises them has nothing new to train on.
SCALE_OUT_SETTINGS = (("train_processes",), ("generate", "num_shards"))


def config_sha256(config_json: str) -> str:
    """Of the resolved configuration less `SCALE_OUT_SETTINGS`, independent of key order and
    whitespace."""
    config = json.loads(config_json)
    for path in SCALE_OUT_SETTINGS:
        parent = config
        for key in path[:-1]:
            parent = parent.get(key, {}) if isinstance(parent, dict) else {}
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
    return _sha256(json.dumps(config, sort_keys=True, separators=(",", ":")))


def fingerprint(data_sha256: str, base_model: str, base_model_hash: str, config_json: str,
                data_source: str = "", data_revision: str = "") -> dict[str, str]:
    """The run's input fingerprint; `digest` is one hash over the compared fields."""
    if not data_sha256:
        raise ValueError("fingerprint: data_sha256 is empty (filter_data's summary lacks it)")
    fp = {"format": FINGERPRINT_FORMAT, "data_sha256": data_sha256, "base_model": base_model,
          "base_model_hash": base_model_hash, "config_sha256": config_sha256(config_json),
          "data_source": data_source, "data_revision": data_revision}
    fp["digest"] = _sha256(json.dumps({k: fp[k] for k in COMPARED}, sort_keys=True))
    return fp


@dataclass(frozen=True)
class Decision:
    changed: bool  # True: train; False: nothing new, skip
    reason: str  # one sentence for logs and the UI
    fingerprint: dict[str, str]
    previous_run: str | None = None  # the published run compared with, if any
    forced: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Decision":
        return cls(**json.loads(text))


def decide(current: Mapping[str, str], previous: Mapping[str, Any] | None, *,
           previous_run: str | None = None, publish_to: str = "",
           force: bool = False) -> Decision:
    """Pure: train (changed=True) unless `previous` holds the same compared fields."""
    fp = dict(current)
    if force:
        return Decision(True, "force=true: retraining whatever was published before", fp,
                        previous_run, forced=True)
    if not publish_to:
        return Decision(True, "publish_to is empty: no published run to compare with, so "
                              "this run trains", fp)
    if previous_run is None:
        return Decision(True, f"no run published under {publish_to} yet: this run trains", fp)
    if not isinstance(previous, Mapping) or previous.get("format") != FINGERPRINT_FORMAT:
        return Decision(True, f"the latest published run {previous_run} carries no "
                              f"{FINGERPRINT_FORMAT} fingerprint: this run trains", fp,
                        previous_run)
    differ = [k for k in COMPARED if previous.get(k) != fp[k]]
    if differ:
        what = ", ".join(LABELS[k] for k in differ)
        detail = ""
        if "data_sha256" in differ:
            detail = (f" (data sha256 {str(previous.get('data_sha256'))[:12]} -> "
                      f"{fp['data_sha256'][:12]})")
        return Decision(True, f"{what} changed since run {previous_run}{detail}: this run "
                              "trains", fp, previous_run)
    source = fp.get("data_source") or "the data source"
    return Decision(False, f"no new data under {source} since run {previous_run} (fingerprint "
                           f"{fp['digest'][:12]}: same data, base model and configuration); "
                           "nothing retrained. Start a run with force=true to retrain anyway.",
                    fp, previous_run)


# ----------------------------------------------------------------------------- object store

def _prefix(publish_to: str) -> str:
    return publish_to if publish_to.endswith("/") else publish_to + "/"


def run_uri(publish_to: str, run_name: str) -> str:
    return f"{_prefix(publish_to)}{run_name}/"


def run_name(job_name: str = "", now: _dt.datetime | None = None) -> str:
    """`<UTC time>-<KFP job name>`, e.g. `20250101T030000Z-lastmile-retrain-x7k2p`."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    if now.tzinfo is not None:
        now = now.astimezone(_dt.timezone.utc)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", job_name or "").strip("-._")[:100]
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{slug}" if slug else stamp


def latest_published(publish_to: str, *, config=None) -> tuple[str | None, dict | None]:
    """(name, manifest) of the latest complete run under `publish_to`; (None, None) if none."""
    from . import storage

    names = [n for n in storage.list_runs(publish_to, config=config) if RUN_NAME.match(n)]
    if not names:
        return None, None
    name = names[-1]
    return name, storage.read_manifest(run_uri(publish_to, name), config=config)


def published_fingerprint(manifest: Mapping[str, Any] | None) -> dict | None:
    if not manifest:
        return None
    metadata = manifest.get("metadata")
    return metadata.get(MANIFEST_KEY) if isinstance(metadata, Mapping) else None


def check(data_summary: Mapping[str, Any], config_json: str, base_model: str,
          base_model_hash: str, *, data_source: str = "", publish_to: str = "",
          force: bool = False, config=None) -> Decision:
    """The check_new_data step: fingerprint this run, look up the latest published one."""
    current = fingerprint(str(data_summary.get("data_sha256", "")), base_model,
                          base_model_hash, config_json, data_source,
                          str(data_summary.get("source_revision") or ""))
    if force or not publish_to:  # nothing to look up: spares the store a request
        return decide(current, None, publish_to=publish_to, force=force)
    name, manifest = latest_published(publish_to, config=config)
    return decide(current, published_fingerprint(manifest), previous_run=name,
                  publish_to=publish_to)


# ----------------------------------------------------------------------------- outcomes

def trained_outcome(report_uri: str) -> str:
    """The pipeline's output when it trained: where the report is."""
    return json.dumps({"status": "trained", "report": report_uri})


def skipped_outcome(decision: Decision) -> str:
    """The pipeline's output when nothing was new: why, and which run it matched."""
    return json.dumps({"status": "skipped", "message": decision.reason,
                       "previous_run": decision.previous_run})


def skipped_note(decision: Decision) -> str:
    """Markdown for the UI's Visualizations tab of the skipping step."""
    fp = decision.fingerprint
    return "\n".join([
        "# No new data: nothing retrained", "",
        decision.reason, "",
        "| | fingerprint |", "|---|---|",
        f"| data sha256 | `{fp.get('data_sha256', '')}` |",
        f"| base model | `{fp.get('base_model', '')}` (`{fp.get('base_model_hash', '')}`) |",
        f"| configuration sha256 | `{fp.get('config_sha256', '')}` |",
        f"| matches run | `{decision.previous_run}` |", "",
    ])
