"""What a local run shows: one line per stage as it starts and as it ends (its wall time and a
headline figure), the running stage's progress bar, a summary; the rest goes to files.

How kfp.local (2.17, SubprocessRunner) prints, read from kfp/local/*.py and checked on smoke
runs: each task runs as a subprocess with stderr merged into stdout, and the thread that runs
the task re-prints every line of it with `print` (indented four spaces by a patched
`builtins.print`); kfp's own records ("Executing task 'x'", "Task 'x' finished with status
SUCCESS", the task's outputs) go through a root logging handler it installs on `sys.stdout`
around each task; its runner warnings ("Consider using the DockerRunner", "settings
['display_name'] have no effect") go through `warnings` (the console takes
`warnings.showwarning` for the run: a test runner's recording would hide them). Nothing is
written to the process's file descriptors directly, so `RunConsole` swaps `sys.stdout` and
`sys.stderr` for the run with streams that buffer lines per thread, writes every line to
`logs/kfp.log`, and `KfpParser` sorts them: which task a line belongs to (its thread's open
task), where the task writes (the executor's `outputFile`), its tqdm updates, its start and
end.

Two quirks of kfp.local shape the parser. ParallelFor iterations run in two threads that each
swap the root logger's handlers and patch `builtins.print` around their tasks, so a "finished"
record can be lost (one of the two shards' 'score' records was missing on a smoke run with two
shards), the indent nests (8 and 12 spaces seen; the streams drop it, as kfp writes it apart),
and kfp can leave print patched and its handler on the root logger after the run
(`RunConsole` puts them back). The executor's own last line, "Wrote executor output file to
DIR/executor_output.json", is printed, never lost: it is the success marker. A failure is the
task's FAILURE record or, when that is lost, a task still open when the pipeline raises.

Headline figures come from the stage's `summary.json` (lastmile.runinfo) or its executor output
(parameters), read when the stage ends. This module never imports kfp.
"""

from __future__ import annotations

import builtins
import collections
import datetime as _dt
import io
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, TextIO

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: kfp.local's log records: "23:57:29.916 - INFO - Executing task 'filter-data'".
KFP_RECORD = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} - (?P<level>[A-Z]+) - (?P<message>.*)$")
EXECUTING = re.compile(r"^Executing task '(?P<task>[^']+)'")
FINISHED = re.compile(r"^Task '(?P<task>[^']+)' finished with status (?P<status>[A-Z]+)")
#: The executor's last line (success) and the line of its input naming the same folder.
WROTE = re.compile(r"Wrote executor output file to (?P<dir>.+)/executor_output\.json\.?\s*$")
OUTPUT_FILE = re.compile(r'"outputFile": "(?P<dir>.+)/executor_output\.json"')
#: The executor's first line, for a task whose "Executing" record was lost.
LOOKING = re.compile(r"\[KFP Executor .*\]: Looking for component `(?P<component>\w+)`")
#: A tqdm bar with a total: "PPO:  50%|█████     | 1/2 [00:04<00:04,  4.46s/update, ...]".
PROGRESS = re.compile(r"^(?P<desc>[^|]*?):?\s*(?P<pct>\d{1,3})%\|[^|]*\|\s*(?P<count>\S+/\S+)"
                      r"\s*\[(?P<rest>[^\]]*)\]\s*$")
RULE = re.compile(r"^-{10,}$")
ITERATION = re.compile(r"^for-loop-\d+-iteration-(?P<index>\d+)$")
TRACEBACK = "Traceback (most recent call last):"
KFP_INDENT = " " * 4  # kfp.local's logging_utils.indented_print

LOG_DIR = "logs"
KFP_LOG = "kfp.log"
FAILED_FILE = "FAILED"
COMPLETE_FILE = "COMPLETE"
LATEST = "latest"


# ----------------------------------------------------------------------------- parsing

@dataclass
class Task:
    """One task execution as kfp.local printed it (a ParallelFor iteration is its own)."""

    key: str | None  # kfp's task name, e.g. "generate-2"; None until its folder is known
    source: object  # who printed it (the thread)
    dir: Path | None = None  # the task's folder under the pipeline root
    status: str = "running"  # running, succeeded, failed
    started: float = 0.0
    ended: float | None = None
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=400))
    progress: str | None = None
    indent: str | None = None  # kfp.local's indent of its lines (as a screen recording has it)

    @property
    def shard(self) -> int | None:
        """The ParallelFor iteration (the shard index) the task ran in, if any."""
        match = ITERATION.match(self.dir.parent.name) if self.dir is not None else None
        return int(match["index"]) if match else None


@dataclass
class Event:
    """kind: kfp (kfp's own line), start, located (the task's folder is known), line (the
    task's own output), progress (a tqdm update), end (task.status says how)."""

    kind: str
    task: Task | None
    text: str = ""


class KfpParser:
    """Sorts the lines kfp.local prints, per source (the thread that printed them), into
    `Event`s. Pure: no files, no screen."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.open: dict[object, Task] = {}
        self.tasks: list[Task] = []

    def feed(self, source: object, raw: str) -> list[Event]:
        line = ANSI.sub("", raw).rstrip("\r\n")
        record = KFP_RECORD.match(line)
        task = self.open.get(source)
        if record:
            return self._record(source, task, record["message"], line)
        if task is None:
            if LOOKING.search(line):  # the task's "Executing" record was lost
                task = self._start(source, None)
                return [Event("start", task), *self._task_line(task, line)]
            return [Event("kfp", None, line)]
        if not line.strip() or RULE.match(line.strip()):
            return [Event("kfp", None, line)]
        return self._task_line(task, line)

    def _record(self, source, task: Task | None, message: str, line: str) -> list[Event]:
        events = [Event("kfp", None, line)]
        if match := EXECUTING.match(message):
            if task is not None and task.status == "running":  # never ended: call it failed
                events += self._end(task, ok=False)
            events.append(Event("start", self._start(source, match["task"])))
        elif (match := FINISHED.match(message)) and task is not None and (
                task.key in (None, match["task"])):
            ok = match["status"] == "SUCCESS"
            if task.status == "running" or (task.status == "succeeded" and not ok):
                events += self._end(task, ok)
            del self.open[source]  # what follows on this thread is kfp's own
        return events

    def _start(self, source, key: str | None) -> Task:
        task = Task(key=key, source=source, started=self.clock())
        self.open[source] = task
        self.tasks.append(task)
        return task

    def _end(self, task: Task, ok: bool) -> list[Event]:
        task.status = "succeeded" if ok else "failed"
        task.ended = self.clock()
        return [Event("end", task)]

    def _task_line(self, task: Task, line: str) -> list[Event]:
        if task.indent is None:  # its first line: kfp's indent, in a recording of the screen
            task.indent = line[:len(line) - len(line.lstrip(" "))]
        text = line[len(task.indent):] if line.startswith(task.indent) else line
        events = []
        found = OUTPUT_FILE.search(text) or WROTE.search(text)
        if found and task.dir is None:
            task.dir = Path(found["dir"])
            task.key = task.key or task.dir.name
            events.append(Event("located", task))
        bar = PROGRESS.match(text.strip())
        if bar:
            task.progress = text.strip()
            events.append(Event("progress", task, task.progress))
        else:
            task.tail.append(text)
            events.append(Event("line", task, text))
        if WROTE.search(text) and task.status == "running":
            events += self._end(task, ok=True)
        return events

    def finish(self) -> list[Event]:
        """The pipeline is over: tasks still running failed (their FAILURE record was lost)."""
        events = []
        for task in self.tasks:
            if task.status == "running":
                events += self._end(task, ok=False)
        self.open.clear()
        return events


def error_excerpt(lines: Iterable[str], frames: int = 2, limit: int = 12) -> list[str]:
    """The stage's own error from its output: the last traceback's exception line(s) and its
    innermost `frames` frames above them (file, line and code; Python's ^^^ markers left out);
    without a traceback, its last lines."""
    lines = [line.rstrip() for line in lines if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.strip() == TRACEBACK]
    if not starts:
        return lines[-(frames + 2):]
    body = lines[starts[-1] + 1:]
    end = 0
    while end < len(body) and body[end][:1].isspace():
        end += 1
    exception = body[end:end + limit]
    frame_starts = [i for i in range(end) if body[i].lstrip().startswith('File "')]
    first = frame_starts[-frames] if len(frame_starts) >= frames else 0
    shown = [line for line in body[first:end] if set(line.strip()) - set("^~ ")]
    return shown + (exception or ["(the traceback ends without its exception line)"])


# ----------------------------------------------------------------------------- headlines

def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _summary(task_dir: Path) -> dict:
    for path in sorted(task_dir.glob("*/summary.json")):
        found = _read_json(path)
        if isinstance(found, dict) and "stage" in found:
            return found
    return {}


def _parameter(task_dir: Path, name: str = "Output"):
    output = _read_json(task_dir / "executor_output.json") or {}
    return (output.get("parameterValues") or {}).get(name)


def _figure(value, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"


def headline(task_dir: Path | None) -> str:
    """The stage's headline figure, from its summary.json or executor output; '' when there
    is none (a figure is a nicety: it never fails the run)."""
    if task_dir is None:
        return ""
    try:
        return _headline(Path(task_dir))
    except Exception:  # noqa: BLE001 - a half-written or unexpected summary
        return ""


def _headline(task_dir: Path) -> str:
    scores = _read_json(task_dir / "scores" / "scores.json")
    if isinstance(scores, dict):  # gather: the whole run's scores (Table 2's headline row)
        models = scores.get("models", {})
        rl, mle = models.get("rl", {}), models.get("mle", {})
        return (f"la-ROUGE-L F1 RL {_figure(rl.get('la_rougeL_f1'))} vs MLE "
                f"{_figure(mle.get('la_rougeL_f1'))}; excess length RL "
                f"{_figure(rl.get('excess_length'), 2)} vs MLE "
                f"{_figure(mle.get('excess_length'), 2)} words")
    summary = _summary(task_dir)
    stage = summary.get("stage", "")
    if stage == "filter_data":
        rows = summary["rows_out"]
        dropped = sum(summary.get("dropped", {}).values())
        text = (f"{rows['train']} train + {rows['test']} test rows kept of "
                f"{summary['rows_in']}, {dropped} dropped")
        capped = sum(split.get("capped", 0) for split in summary.get("splits", {}).values())
        return text + (f", {capped} beyond max_train/max_test" if capped else "")
    if stage == "negatives":
        categories = len(summary.get("categories", []))
        return (f"{summary['rows_out']} reward-model rows from {summary['rows_in']} examples, "
                f"{categories} negative categories")
    if stage == "train_reward":
        accuracy = summary.get("eval", {}).get("accuracy", {})
        text = f"final loss {_figure(summary['train']['final_loss'], 4)}"
        if accuracy:
            mean = sum(accuracy.values()) / len(accuracy)
            text += (f", held-out accuracy {mean:.0%} on {summary['eval'].get('n', '?')} "
                     f"inputs")
        return text
    if stage == "train_mle":
        train = summary["train"]
        return f"final loss {_figure(train['final_loss'], 4)} after {train['steps']} steps"
    if stage == "train_ppo":
        final = summary.get("final_sampled") or {}
        return (f"final reward {_figure(final.get('reward_mean'))}, excess length "
                f"{final.get('excess_length_mean', float('nan')):+.2f} words after "
                f"{summary['updates']} updates")
    if stage.startswith("generate_"):
        return f"{summary['n']} rows, {summary.get('tokens_per_second', '?')} tokens/s"
    if stage == "postprocess":
        return f"{summary['rows']} rows, {summary['changed']} changed"
    if stage == "score":
        return f"{summary['n']} predictions scored"
    return _parameter_headline(task_dir)


def _parameter_headline(task_dir: Path) -> str:
    """Stages without a summary.json: their returned value says what they did."""
    key, output = task_dir.name, _parameter(task_dir)
    if key == "resolve-config" and isinstance(output, str):
        profile = json.loads(output)
        return f"profile {profile['name']}, base model {profile['base_model']}"
    if key == "check-new-data":
        decision = _read_json(task_dir / "executor_output.json") or {}
        for artifact in decision.get("artifacts", {}).get("decision", {}).get("artifacts", []):
            reason = artifact.get("metadata", {}).get("reason")
            if reason:
                return reason
        return "new data: training" if output else "nothing new"
    if key == "plan-shards" and isinstance(output, list):
        return f"{len(output)} shard(s)"
    if key == "report" and (task_dir / "report_dir").is_dir():
        return "report.md and report.html written"
    if key == "publish" and isinstance(output, str):
        return f"published to {output}"
    if key == "no-new-data" and isinstance(output, str):
        return json.loads(output).get("message", "")
    return ""


# ----------------------------------------------------------------------------- formatting

def duration(seconds: float) -> str:
    """'0.4 s', '12 s', '3 min 27 s', '1 h 02 min'."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def clock_text(seconds: float) -> str:
    """Time since the run started, as a wall clock shows it: 0:07, 12:31, 1:02:03."""
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return (f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours
            else f"{rest // 60}:{rest % 60:02d}")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "stage"


def display_names(pipeline_spec: Mapping) -> dict[str, str]:
    """{kfp task name: its display name} of every task in a compiled pipeline spec (as a dict:
    `root.dag.tasks` and every component's dag), e.g. {"generate-2": "generate mle"}."""
    names = {}
    dags = [pipeline_spec.get("root", {})]
    dags += list(pipeline_spec.get("components", {}).values())
    for component in dags:
        for key, task in component.get("dag", {}).get("tasks", {}).items():
            name = task.get("taskInfo", {}).get("name")
            if name and not name.startswith("condition-") and not name.startswith("for-loop-"):
                names[key] = name if name != key else key.replace("-", " ")  # none was set
    return names


def point_latest(run_dir: Path) -> Path | None:
    """`runs/latest` -> this run (a relative symlink, replaced atomically) when the run's
    folder sits in a folder named runs (the default runs/<timestamp>); None otherwise."""
    parent = Path(run_dir).absolute().parent
    if parent.name != "runs":
        return None
    link = parent / LATEST
    if link.exists() and not link.is_symlink():
        return None  # someone's real folder: leave it
    temporary = parent / f".{LATEST}-{os.getpid()}"
    try:
        if temporary.is_symlink():
            temporary.unlink()
        os.symlink(Path(run_dir).name, temporary)
        os.replace(temporary, link)
    except OSError:
        return None
    return link


def write_status(run_dir: Path, name: str, fields: Mapping[str, object]) -> Path:
    """runs/<ts>/FAILED or COMPLETE: what happened, as `key: value` lines; the other file of
    the pair (an earlier attempt's) is removed."""
    for stale in (FAILED_FILE, COMPLETE_FILE):
        (Path(run_dir) / stale).unlink(missing_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [f"{key}: {value}" for key, value in {**fields, "at": stamp}.items()]
    path = Path(run_dir) / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_status(path: Path) -> dict[str, str]:
    """A FAILED or COMPLETE file (`write_status`) back as {key: value}; {} when absent."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    pairs = (line.partition(": ") for line in text.splitlines())
    return {key: value for key, sep, value in pairs if sep}


def where_things_are(run_dir: Path, adapters: Mapping[str, Path],
                     published: str | None = None) -> list[str]:
    """The end of a local run that trained: the report, the adapters, the next commands
    (`lastmile export`, `lastmile predict`, lastmile/cli.py)."""
    import shlex

    run = shlex.quote(str(run_dir))
    lines = [f"report: {Path(run_dir) / 'report.html'}", f"        {Path(run_dir) / 'report.md'}"]
    width = max([len(label) for label in adapters] + [0]) + 1
    lines += [f"{label + ':':<{width}} {path}" for label, path in adapters.items()]
    if published:
        lines.append(f"published: {published}")
    export = f"lastmile export {run} --out export/rl"
    predict = f"lastmile predict {run} --input new.jsonl --out predictions.jsonl"
    width = max(len(export), len(predict)) + 2
    lines += ["next (docs/using-the-model.md):",  # shell comments: the lines paste as they are
              f"  {export:<{width}}# the RL adapter, PEFT; --merged: a whole HF model",
              f"  {predict:<{width}}# the RL model on new inputs"]
    return lines


# ----------------------------------------------------------------------------- the console

class RunFailed(Exception):
    """A local run failed; the console has shown why and written runs/<ts>/FAILED."""

    def __init__(self, stage: str, error: str, log: Path, interrupted: bool = False):
        super().__init__(f"{stage}: {error} (log: {log})")
        self.stage, self.error, self.log = stage, error, log
        self.exit_code = 130 if interrupted else 1  # 130: as a shell reports Ctrl-C


class _LineStream(io.TextIOBase):
    """sys.stdout or sys.stderr during a run: whole lines per thread to the console (no file
    descriptor: fileno() raises io.UnsupportedOperation, as io.StringIO's does)."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, console: "RunConsole", kind: str):
        self.console, self.kind = console, kind
        self.buffers: dict[int, str] = {}

    def write(self, text: str) -> int:
        if not text:
            return 0
        with self.console.lock:
            ident = threading.get_ident()
            if text == KFP_INDENT and not self.buffers.get(ident):
                # kfp.local's indented print writes its indent on its own, once per level: it
                # nests when two threads patch builtins.print at once (up to 12 spaces seen).
                return len(text)
            pending = self.buffers.get(ident, "") + text
            *lines, rest = pending.split("\n")
            self.buffers[ident] = rest
            for line in lines:
                self.console.feed(self.kind, ident, line)
        return len(text)

    def flush(self) -> None:
        pass

    def drain(self) -> None:
        with self.console.lock:
            for ident, rest in list(self.buffers.items()):
                if rest:
                    self.console.feed(self.kind, ident, rest)
            self.buffers.clear()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True


class _TaskLog:
    """One stage's full output in logs/<stage>.log. Lines wait in memory until the stage's
    folder (and so its shard) is known; of a run of tqdm updates only the last is kept."""

    def __init__(self):
        self.path: Path | None = None
        self.file: TextIO | None = None
        self.pending: list[str] = []
        self.progress: str | None = None

    def open(self, path: Path) -> None:
        self.path = path
        self.file = path.open("w", encoding="utf-8")
        pending, self.pending = self.pending, []
        self._write(pending)

    def line(self, text: str) -> None:
        progress, self.progress = self.progress, None
        self._write(([progress] if progress is not None else []) + [text])

    def close(self) -> None:
        progress, self.progress = self.progress, None
        self._write([progress] if progress is not None else [])
        if self.file is not None:
            self.file.close()
            self.file = None

    def _write(self, lines: list[str]) -> None:
        if self.path is None:
            self.pending += lines
            return
        if self.file is None:  # a line after the stage ended (a warning at exit)
            self.file = self.path.open("a", encoding="utf-8")
        self.file.writelines(line + "\n" for line in lines)
        self.file.flush()


class RunConsole:
    """The screen of a local run. Use as a context manager around the kfp.local pipeline call:

        with RunConsole(run_dir, names=display_names(spec)) as console:
            try:
                run pipeline
            except Exception as exc:
                raise console.fail(exc) from None
            console.finish([...])

    Inside, sys.stdout/sys.stderr are the console's: every line goes to logs/kfp.log, each
    stage's to logs/<stage>.log; the screen gets a start and an end line per stage, the
    running stage's progress bar (redrawn in place on a terminal, every `progress_every`
    seconds otherwise) and the summary. `verbose` also shows every line as kfp printed it.
    """

    def __init__(self, run_dir: Path, *, names: Mapping[str, str] | None = None,
                 verbose: bool = False, screen: TextIO | None = None,
                 errors: TextIO | None = None, live: bool | None = None,
                 progress_every: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 title: str = ""):
        self.run_dir = Path(run_dir)
        self.logs = self.run_dir / LOG_DIR
        self.names = dict(names or {})
        self.verbose = verbose
        self.screen, self.errors, self.live = screen, errors, live
        self.progress_every = progress_every
        self.clock = clock
        self.title = title
        self.lock = threading.RLock()
        self.parser = KfpParser(clock)
        self.task_logs: dict[int, _TaskLog] = {}
        self.used_names: set[str] = set()
        self.shards: int | None = None
        self.progress_shown = False
        self.last_progress = -1e9
        self.started = 0.0
        self._saved: tuple | None = None

    # ---------------------------------------------------------------- set-up and tear-down

    def __enter__(self) -> "RunConsole":
        self.screen = self.screen or sys.stdout
        self.errors = self.errors or sys.stderr
        if self.live is None:
            self.live = bool(getattr(self.screen, "isatty", lambda: False)()) and not self.verbose
        self.logs.mkdir(parents=True, exist_ok=True)
        self.kfp_log = (self.logs / KFP_LOG).open("w", encoding="utf-8")
        root = logging.getLogger()
        self._saved = (sys.stdout, sys.stderr, builtins.print, root.handlers[:], root.level,
                       warnings.showwarning)
        self.streams = (_LineStream(self, "out"), _LineStream(self, "err"))
        sys.stdout, sys.stderr = self.streams
        warnings.showwarning = self._warning  # wins over a test runner's recording too
        self.started = self.last_progress = self.clock()
        if self.title:
            self.say(self.title)
        return self

    def __exit__(self, *exc_info) -> None:
        for stream in self.streams:
            stream.drain()
        with self.lock:
            for event in self.parser.finish():
                self._render(event)
            self._clear_progress()
            for log in self.task_logs.values():
                log.close()
            self.kfp_log.close()
        out, err, printer, handlers, level, show = self._saved
        sys.stdout, sys.stderr, builtins.print, warnings.showwarning = out, err, printer, show
        root = logging.getLogger()
        root.handlers[:] = handlers  # kfp.local can leave its own handler behind
        root.setLevel(level)

    # ---------------------------------------------------------------- lines in

    def _warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        """kfp.local's runner warnings: kfp.log (and the screen with -v), as stderr lines."""
        text = warnings.formatwarning(message, category, filename, lineno, line)
        for piece in text.rstrip("\n").split("\n"):
            self.feed("err", threading.get_ident(), piece)

    def feed(self, kind: str, source: object, line: str) -> None:
        """One line printed during the run: to kfp.log, then sorted (stderr is kfp's)."""
        with self.lock:
            clean = ANSI.sub("", line).rstrip("\r")
            self.kfp_log.write(clean + "\n")
            self.kfp_log.flush()
            if self.verbose:
                self._clear_progress()
                target = self.screen if kind == "out" else self.errors
                target.write(line + "\n")
                target.flush()
            if kind != "out":
                return
            for event in self.parser.feed(source, line):
                self._render(event)

    def _render(self, event: Event) -> None:
        task = event.task
        if event.kind == "start":
            self.task_logs[id(task)] = _TaskLog()
        elif event.kind == "located":
            self._open_log(task)
            self.say(f"{self._when(task.started)}  start  {self.label(task)}")
        elif event.kind == "line":
            self._log(task).line(event.text)
        elif event.kind == "progress":
            self._log(task).progress = event.text
            self._show_progress(task, event.text)
        elif event.kind == "end":
            self._end(task)

    def _log(self, task: Task) -> _TaskLog:
        return self.task_logs.setdefault(id(task), _TaskLog())

    def _open_log(self, task: Task) -> None:
        log = self._log(task)
        if log.path is not None:
            return
        base = slug(self.name(task))
        if task.shard is not None and self.shards != 1:
            base += f".shard-{task.shard + 1}"
        name, n = base, 1
        while name in self.used_names:
            n += 1
            name = f"{base}-{n}"
        self.used_names.add(name)
        log.open(self.logs / f"{name}.log")

    def _end(self, task: Task) -> None:
        log = self._log(task)
        if log.path is None:  # ended before its folder was known: announce it now
            self._open_log(task)
            self.say(f"{self._when(task.started)}  start  {self.label(task)}")
        log.close()
        took = duration((task.ended or self.clock()) - task.started)
        if task.status == "succeeded":
            figure = headline(task.dir)
            if task.key == "plan-shards" and task.dir is not None:
                planned = _parameter(task.dir)
                self.shards = len(planned) if isinstance(planned, list) else None
            self.say(f"{self._when(task.ended)}  done   {self.label(task)} in {took}"
                     + (f": {figure}" if figure else ""))
        else:
            self.say(f"{self._when(task.ended)}  FAILED {self.label(task)} after {took}")

    # ---------------------------------------------------------------- the screen

    def name(self, task: Task) -> str:
        """The stage's display name (kfp.local ignores them; the pipeline spec has them)."""
        if task.key is None:
            return "a stage"
        return self.names.get(task.key) or task.key.replace("-", " ")

    def label(self, task: Task) -> str:
        name = self.name(task)
        if task.shard is None or self.shards == 1:  # one shard: the stage is the whole of it
            return name
        total = f"/{self.shards}" if self.shards else ""
        return f"{name} (shard {task.shard + 1}{total})"

    def _when(self, moment: float | None) -> str:
        return f"{clock_text((moment or self.clock()) - self.started):>7}"

    def say(self, text: str, error: bool = False) -> None:
        """A line on the screen (the progress line, if shown, is cleared first)."""
        with self.lock:
            self._clear_progress()
            stream = self.errors if error else self.screen
            stream.write(text + "\n")
            stream.flush()

    def _show_progress(self, task: Task, bar: str) -> None:
        if self.verbose:
            return
        text = f"{'':7}  ...    {bar}"  # the stages' bars name themselves (PPO, generate rl [1/2])
        if self.live:
            width = shutil.get_terminal_size((100, 24)).columns - 1
            self.screen.write("\r\x1b[K" + text[:width])
            self.screen.flush()
            self.progress_shown = True
        elif min(self.clock() - self.last_progress,
                 self.clock() - task.started) >= self.progress_every:  # not a 0% bar
            self.last_progress = self.clock()
            self.say(text)

    def _clear_progress(self) -> None:
        if self.progress_shown:
            self.screen.write("\r\x1b[K")
            self.progress_shown = False

    # ---------------------------------------------------------------- the outcome

    @property
    def tasks(self) -> list[Task]:
        return self.parser.tasks

    def elapsed(self) -> float:
        return self.clock() - self.started

    def finish(self, lines: Iterable[str] = (), status: Mapping[str, object] | None = None,
               outcome: str = "done") -> None:
        """The run ended well: the summary line, `lines` (where things are), COMPLETE."""
        total = duration(self.elapsed())
        count = sum(1 for task in self.tasks if task.status == "succeeded")
        self.say(f"{outcome} in {total}: {count} stages, logs in {self.logs}/")
        for line in lines:
            self.say(line)
        write_status(self.run_dir, COMPLETE_FILE,
                     {"status": outcome, "seconds": round(self.elapsed(), 1), "stages": count,
                      **(status or {}), "logs": f"{self.logs}/"})

    def fail(self, exc: BaseException) -> RunFailed:
        """The pipeline raised: the failed stage's own error and its log as the last lines on
        the screen, kfp's wrapper exception to kfp.log, runs/<ts>/FAILED. Returns RunFailed to
        raise."""
        for stream in self.streams:
            stream.drain()
        with self.lock:
            for event in self.parser.finish():
                self._render(event)
            self.kfp_log.write("".join(traceback.format_exception(exc)))
            self.kfp_log.flush()
            failed = [task for task in self.tasks if task.status == "failed"]
            total = duration(self.elapsed())
            if failed:
                task = failed[0]
                stage, log = self.label(task), self._log(task).path or self.logs / KFP_LOG
                excerpt = error_excerpt(task.tail) or ["(the stage printed no error)"]
            elif isinstance(exc, KeyboardInterrupt):
                stage, log, excerpt = "the run", self.logs / KFP_LOG, ["interrupted"]
            else:  # kfp.local itself failed, before or between stages
                stage, log = "kfp.local", self.logs / KFP_LOG
                excerpt = [ANSI.sub("", f"{type(exc).__name__}: {exc}")]
            # FAILED's one line: the exception's first line (a message can run over several).
            traced = failed and any(line.strip() == TRACEBACK for line in failed[0].tail)
            error = (next((line for line in excerpt if not line[:1].isspace()), excerpt[-1])
                     if traced else excerpt[-1]).strip()
            write_status(self.run_dir, FAILED_FILE,
                         {"status": "failed", "stage": stage, "error": error, "log": log,
                          "seconds": round(self.elapsed(), 1)})
            self.say(f"run failed after {total} in {stage} (recorded in "
                     f"{self.run_dir / FAILED_FILE}):", error=True)
            for line in excerpt:
                self.say(line, error=True)
            others = [self._log(t).path for t in failed[1:] if self._log(t).path]
            if others:
                self.say(f"also failed: {', '.join(map(str, others))}", error=True)
            self.say(f"log: {log}", error=True)
            return RunFailed(stage, error, log, interrupted=isinstance(exc, KeyboardInterrupt))
