"""What a run leaves behind besides its KFP artifacts: metrics and the published run.

* `metric_items(scores)` - every numeric value of scores.json as `<variant>_<key>`, the names
  the `score` step logs as KFP metrics (the UI's Compare runs shows them side by side);
* `publish_run(...)`     - the PPO and MLE adapters, scores.json and the report under
  `<publish_to>/<run name>/` through `lastmile.storage.publish` (atomic: a `_COMPLETE`
  manifest last), the run's input fingerprint in the manifest for `lastmile.freshness`.

Published layout:

    <publish_to>/<run name>/ppo/...          policy and value adapters, PPO log and summary
                            mle/...          MLE adapter and summary
                            scores.json      Tables 1-2 as numbers
                            report/...       report.md, report.html, plots, stage summaries
                            _COMPLETE        the manifest (files, sizes, ETags, fingerprint)
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from . import freshness

#: Training-time leftovers that are not results (resumable checkpoints), never published.
SKIPPED_DIRS = ("checkpoints",)


def metric_items(scores: Mapping[str, Any]) -> dict[str, float]:
    """{f"{variant}_{key}": value} for every finite number in scores["models"] (bools, None,
    text and NaN are left out: KFP metrics are finite floats)."""
    found: dict[str, float] = {}
    for variant, values in sorted(scores.get("models", {}).items()):
        for key, value in sorted(values.items()):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                found[f"{variant}_{key}"] = float(value)
    return found


def _copy_tree(src: Path, dest: Path) -> None:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(*SKIPPED_DIRS), dirs_exist_ok=True)


def stage_run(out: Path, ppo_dir: str | Path, mle_dir: str | Path,
              report_dir: str | Path) -> Path:
    """Lay out the published files under `out` (see the module docstring)."""
    report = Path(report_dir)
    if not (report / "scores.json").is_file():
        raise FileNotFoundError(f"{report}: no scores.json (is this the report step's output?)")
    _copy_tree(Path(ppo_dir), out / "ppo")
    _copy_tree(Path(mle_dir), out / "mle")
    _copy_tree(report, out / "report")
    shutil.copy2(report / "scores.json", out / "scores.json")
    return out


def publish_run(publish_to: str, *, ppo_dir: str | Path, mle_dir: str | Path,
                report_dir: str | Path, decision: freshness.Decision | None = None,
                job_name: str = "", job_id: str = "", run_name: str | None = None,
                config=None) -> str:
    """Publish one run; returns its URI `<publish_to>/<run name>/`."""
    from . import storage

    name = run_name or freshness.run_name(job_name)
    metadata: dict[str, Any] = {"kfp_run": {"job_name": job_name, "job_id": job_id}}
    if decision is not None:
        metadata[freshness.MANIFEST_KEY] = decision.fingerprint
        metadata["decision"] = {"reason": decision.reason, "forced": decision.forced,
                                "previous_run": decision.previous_run}
    with tempfile.TemporaryDirectory(prefix="lastmile-publish-") as tmp:
        staged = stage_run(Path(tmp), ppo_dir, mle_dir, report_dir)
        # A KFP retry of this step (same job id) may take over its own unfinished claim.
        return storage.publish(staged, publish_to, name, config=config, metadata=metadata,
                               owner=f"{job_id}/publish" if job_id else None)
