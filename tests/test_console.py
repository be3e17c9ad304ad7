"""The console of a local run (lastmile.console): kfp.local's output recorded from real smoke
runs (tests/data/console/, the executor JSON trimmed) sorted into stages, logs and screen
lines; the headline figures from real stage summaries; runs/latest; and one real failing run
through `pipeline.py run` (the successful one is in test_e2e.py)."""

from __future__ import annotations

import builtins
import io
import json
import logging
import os
import re
import sys
import threading
import warnings
from pathlib import Path

import pytest

from lastmile import console

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "console"
RECORDED = "/tmp/recorded/run"  # the run folder the recordings name, replaced per test
TRACEBACK_LINE = "Traceback (most recent call last):"
NAMES = {"train-mle": "train MLE baseline", "filter-data": "filter data",
         "generate-3": "generate rl"}
DOCKER_WARNING = ('You may be attemping to run a task that uses custom or non-Python base image '
                  '"ghcr.io/lastmile-ml/lastmile:0.1.0" in a Python environment. This may result '
                  'in incorrect dependencies and/or incorrect behavior. Consider using the '
                  '"DockerRunner" to run this task in a container.')


def _recorded(name: str, run: Path) -> list[str]:
    text = (DATA / name).read_text(encoding="utf-8").replace(RECORDED, str(run))
    return text.splitlines()


def _events(lines, source="main"):
    parser = console.KfpParser()
    events = [e for line in lines for e in parser.feed(source, line)]
    return parser, events


# ----------------------------------------------------------------------------- the parser

def test_parser_sorts_recorded_output_into_tasks(tmp_path):
    lines = _recorded("kfp_local_success.txt", tmp_path)
    parser, events = _events(lines)
    assert [(e.task.key) for e in events if e.kind == "start"] == ["resolve-config", "train-mle"]
    ends = [e.task for e in events if e.kind == "end"]
    assert [(t.key, t.status) for t in ends] == [("resolve-config", "succeeded"),
                                                 ("train-mle", "succeeded")]
    pipeline_run = tmp_path / "kfp" / "lastmile-2026-12-06-23-57-29-911206"
    assert [t.dir for t in ends] == [pipeline_run / "resolve-config", pipeline_run / "train-mle"]
    assert all(t.shard is None for t in ends)
    # Every tqdm update is a progress event, none a log line; the last one is the bar's end.
    bars = [e.text for e in events if e.kind == "progress"]
    assert len(bars) == 6 and bars[-1].startswith("MLE: 100%|") and "loss=10.8118" in bars[-1]
    task_lines = [e.text for e in events if e.kind == "line"]
    assert not any(console.PROGRESS.match(line.strip()) for line in task_lines)
    assert any("Got executor_input" in line for line in task_lines)  # the stage's full log
    # kfp's own records (and the outputs they list) are never a stage's line.
    kfp = [e.text for e in events if e.kind == "kfp"]
    assert any("Task 'train-mle' outputs:" in line for line in kfp)
    assert any(line.startswith("    mle_model: Model(") for line in kfp)
    assert not any("Task 'train-mle'" in line or "\x1b[" in line for line in task_lines)
    assert parser.finish() == []  # nothing left running


def test_parser_failure_and_error_excerpt(tmp_path):
    parser, events = _events(_recorded("kfp_local_failure.txt", tmp_path))
    (failed,) = [e.task for e in events if e.kind == "end" and e.task.status == "failed"]
    assert failed.key == "filter-data"
    excerpt = console.error_excerpt(failed.tail)
    assert excerpt[-1] == ("lastmile.data.DataError: /tmp/recorded/bad.jsonl: line 2 is not "
                           "valid JSON (Expecting ':' delimiter)")
    assert excerpt[0].strip().startswith('File "/work/main/lastmile/data.py", line 327')
    assert len(excerpt) == 5 and not any(set(line.strip()) <= set("^~ ") for line in excerpt)


def _shard_lines(run: Path, key: str, index: int, finished: bool) -> list[str]:
    folder = run / "kfp" / "lastmile-1" / f"for-loop-2-iteration-{index}" / key
    lines = [f"00:00:0{index}.000 - INFO - Executing task \x1b[96m'{key}'\x1b[0m",
             "00:00:00.001 - INFO - Streamed logs:", "",
             f"    [KFP Executor 2026-12-06 00:00:00,000 INFO]: Looking for component `generate`",
             f'                    "outputFile": "{folder}/executor_output.json"',
             f"    generate rl [{index + 1}/2]:  50%|#####     | 2/4 [00:01<00:01,  1.6row/s]",
             f"    [KFP Executor 2026-12-06 00:00:01,000 INFO]: Wrote executor output file to "
             f"{folder}/executor_output.json.", "    ", ""]
    if finished:
        lines.append(f"00:00:02.000 - INFO - Task \x1b[96m'{key}'\x1b[0m finished with status "
                     f"\x1b[92mSUCCESS\x1b[0m")
    return lines


def test_parallel_shards_interleaved_and_a_lost_finished_record(tmp_path):
    """Two ParallelFor iterations print at once; kfp.local loses one 'finished' record (its
    threads swap the root logger's handlers): both still end, each with its shard."""
    parser = console.KfpParser()
    a = _shard_lines(tmp_path, "generate-3", 0, finished=True)
    b = _shard_lines(tmp_path, "generate-3", 1, finished=False)
    events = []
    for line_a, line_b in zip(a, b + [""]):
        events += parser.feed("thread-a", line_a) + parser.feed("thread-b", line_b)
    ended = [e.task for e in events if e.kind == "end"]
    assert sorted((t.shard, t.status) for t in ended) == [(0, "succeeded"), (1, "succeeded")]
    bars = {e.task.shard: e.text for e in events if e.kind == "progress"}
    assert bars[0].startswith("generate rl [1/2]") and bars[1].startswith("generate rl [2/2]")


def test_shards_named_by_the_plan_and_not_at_all_when_there_is_one(tmp_path):
    for count in (1, 2):
        run = tmp_path / str(count)
        plan = run / "kfp" / "lastmile-1" / "plan-shards"
        plan.mkdir(parents=True)
        (plan / "executor_output.json").write_text(
            json.dumps({"parameterValues": {"Output": list(range(count))}}))
        lines = ["00:00:00.000 - INFO - Executing task 'plan-shards'",
                 "    [KFP Executor 2026-12-06 00:00:00,000 INFO]: Looking for component "
                 "`plan_shards`",
                 f"    [KFP Executor 2026-12-06 00:00:00,000 INFO]: Wrote executor output file "
                 f"to {plan}/executor_output.json.",
                 *_shard_lines(run, "generate-3", 0, finished=True)]
        screen = io.StringIO()
        with console.RunConsole(run, names=NAMES, screen=screen, errors=io.StringIO(),
                                live=False):
            for line in lines:
                print(line)
        text = screen.getvalue()
        assert "done   plan shards in" in text and f": {count} shard(s)" in text
        label = "generate rl" if count == 1 else "generate rl (shard 1/2)"
        assert re.search(rf"start  {re.escape(label)}\n.*done   {re.escape(label)} in", text)
        log = "generate-rl.log" if count == 1 else "generate-rl.shard-1.log"
        assert (run / "logs" / log).is_file()


def test_a_task_whose_executing_record_was_lost_is_found_by_its_first_line(tmp_path):
    lines = _shard_lines(tmp_path, "generate-3", 1, finished=True)[3:]
    parser, events = _events(lines)
    (task,) = [e.task for e in events if e.kind == "start"]
    assert task.key == "generate-3" and task.shard == 1 and task.status == "succeeded"


def test_failed_names_the_first_line_of_a_multiline_exception(tmp_path):
    lines = _shard_lines(tmp_path, "generate-3", 0, finished=False)[:5] + [
        "    Traceback (most recent call last):", '      File "x.py", line 3, in f',
        "    ValueError: the first line", "    and the second"]
    errors = io.StringIO()
    with console.RunConsole(tmp_path, names=NAMES, screen=io.StringIO(), errors=errors,
                            live=False) as run:
        for line in lines:
            print(line)
        failed = run.fail(RuntimeError("Inner task failed"))
    assert failed.error == "ValueError: the first line"
    assert "error: ValueError: the first line\n" in (tmp_path / "FAILED").read_text()
    assert errors.getvalue().splitlines()[-3:] == [
        "ValueError: the first line", "and the second",
        f"log: {tmp_path / 'logs' / 'generate-rl.shard-1.log'}"]


def test_error_excerpt_without_traceback_chained_and_multiline():
    assert console.error_excerpt(["a", "", "b", "c", "d", "e"]) == ["b", "c", "d", "e"]
    chained = ["Traceback (most recent call last):", '  File "x.py", line 1, in f',
               "KeyError: 'a'", "", "During handling of the above exception, another "
               "exception occurred:", "", "Traceback (most recent call last):",
               '  File "y.py", line 2, in g', "    raise ValueError(...)", "    ^^^^^^^^",
               "ValueError: first line", "second line of the message"]
    assert console.error_excerpt(chained) == [
        '  File "y.py", line 2, in g', "    raise ValueError(...)", "ValueError: first line",
        "second line of the message"]


# ----------------------------------------------------------------------------- the console

def _summary(folder: Path, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(fields))


def _replay(lines: list[str], run: Path, **kwargs):
    screen, errors = io.StringIO(), io.StringIO()
    kwargs.setdefault("names", NAMES)
    with console.RunConsole(run, screen=screen, errors=errors, live=False, title="title line",
                            **kwargs) as screen_console:
        for line in lines:
            print(line)
        # What warnings.showwarning writes (pytest records warnings instead of showing them).
        sys.stderr.write(warnings.formatwarning(DOCKER_WARNING, RuntimeWarning, "x.py", 81))
    return screen_console, screen.getvalue(), errors.getvalue()


def test_console_shows_stages_and_headlines_and_logs_the_rest(tmp_path):
    pipeline_run = tmp_path / "kfp" / "lastmile-2026-12-06-23-57-29-911206"
    # train_mle's summary.json as the smoke run wrote it (the fields the headline reads).
    _summary(pipeline_run / "train-mle" / "mle_model", stage="train_mle", rows=28,
             train={"steps": 2, "first_loss": 10.838608264923096,
                    "final_loss": 10.811814785003662})
    saved = (sys.stdout, sys.stderr, builtins.print, logging.getLogger().handlers[:])
    _, screen, errors = _replay(_recorded("kfp_local_success.txt", tmp_path), tmp_path)
    assert (sys.stdout, sys.stderr, builtins.print, logging.getLogger().handlers) == saved
    lines = screen.splitlines()
    assert lines[0] == "title line" and errors == ""
    assert re.fullmatch(r" +0:00  start  resolve config", lines[1])
    assert re.fullmatch(r" +0:00  done   resolve config in \d\.\d s", lines[2])
    assert re.fullmatch(r" +0:00  start  train MLE baseline", lines[3])
    # Not on a terminal: a progress line at most every 60 s, so none in this replay.
    assert re.fullmatch(r" +0:00  done   train MLE baseline in \d\.\d s: final loss 10\.8118 "
                        r"after 2 steps", lines[4]), lines[4]
    assert len(lines) == 5
    logs = tmp_path / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["kfp.log", "resolve-config.log",
                                                      "train-mle-baseline.log"]
    kfp_log = (logs / "kfp.log").read_text()
    assert "DockerRunner" in kfp_log and "Got executor_input" in kfp_log
    assert "Task 'train-mle' finished with status SUCCESS" in kfp_log and "\x1b[" not in kfp_log
    stage_log = (logs / "train-mle-baseline.log").read_text()
    assert "Got executor_input" in stage_log and "Wrote executor output file" in stage_log
    assert "DockerRunner" not in stage_log and "Task 'train-mle'" not in stage_log
    bars = [line for line in stage_log.splitlines() if "MLE:" in line]
    assert len(bars) == 1 and bars[0].startswith("MLE: 100%|") and "loss=10.8118" in bars[0]


def test_verbose_shows_everything_live(tmp_path):
    _, screen, errors = _replay(_recorded("kfp_local_success.txt", tmp_path), tmp_path,
                                verbose=True)
    assert "Got executor_input" in screen and "MLE:  50%|" in screen
    assert "done   train MLE baseline" in screen and "DockerRunner" in errors


def test_progress_redrawn_in_place_on_a_terminal(tmp_path):
    screen = io.StringIO()
    with console.RunConsole(tmp_path, names=NAMES, screen=screen, errors=io.StringIO(),
                            live=True):
        for line in _recorded("kfp_local_success.txt", tmp_path):
            print(line)
    text = screen.getvalue()
    assert "\r\x1b[K" + f"{'':7}  ...    MLE: 100%|" in text
    # The next stage line clears the bar first.
    assert re.search(r"\r\x1b\[K +0:00  done   train MLE baseline", text)


def test_progress_once_a_minute_when_not_on_a_terminal(tmp_path):
    """Piped to a file (make run | tee): a stage's bar at most every 60 s, and not before the
    stage has run that long (no 0% bars)."""
    now = [0.0]
    screen = io.StringIO()
    with console.RunConsole(tmp_path, names=NAMES, screen=screen, errors=io.StringIO(),
                            live=False, clock=lambda: now[0]):
        for line in _recorded("kfp_local_success.txt", tmp_path):
            if "Executing task" in line and "train-mle" in line:
                now[0] = 100.0  # the stage starts 100 s into the run
            if console.PROGRESS.match(line.strip()):
                now[0] += 30  # six updates, 30 s apart, from 30 s to 180 s into the stage
            print(line)
    shown = [line for line in screen.getvalue().splitlines() if "MLE:" in line]
    bars = [line.split("|")[0].strip() for line in shown]
    assert bars == ["...    MLE:  50%", "...    MLE: 100%", "...    MLE: 100%"]
    assert re.search(r" 4:40  done   train MLE baseline in 3 min 0 s", screen.getvalue())


def test_threads_write_partial_lines_without_mixing(tmp_path):
    """kfp's indented print writes '    ' and the line in two calls; another thread's line in
    between must not split them."""
    screen = io.StringIO()
    with console.RunConsole(tmp_path, screen=screen, errors=io.StringIO(), live=False):
        first_half, other_done = threading.Event(), threading.Event()

        def thread_a():
            sys.stdout.write("    part one ")
            first_half.set()
            other_done.wait(5)
            sys.stdout.write("and two\n")

        def thread_b():
            first_half.wait(5)
            sys.stdout.write("a whole line from b\n")
            other_done.set()

        threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert (tmp_path / "logs" / "kfp.log").read_text().splitlines() == [
        "a whole line from b", "    part one and two"]


def test_failure_ends_with_the_stages_error_and_its_log(tmp_path):
    screen, errors = io.StringIO(), io.StringIO()
    with console.RunConsole(tmp_path, names=NAMES, screen=screen, errors=errors,
                            live=False) as run:
        for line in _recorded("kfp_local_failure.txt", tmp_path):
            print(line)
        wrapper = RuntimeError("Pipeline \x1b[95m'lastmile'\x1b[0m finished with status "
                               "FAILURE. Inner task failed: 'filter-data'.")
        failed = run.fail(wrapper)
    log = tmp_path / "logs" / "filter-data.log"
    assert (failed.stage, failed.log, failed.exit_code) == ("filter data", log, 1)
    last = errors.getvalue().splitlines()
    assert last[-1] == f"log: {log}"
    assert last[-2].startswith("lastmile.data.DataError: /tmp/recorded/bad.jsonl: line 2")
    assert last[0].startswith("run failed after") and "in filter data" in last[0]
    assert "Inner task failed" not in errors.getvalue() + screen.getvalue()
    assert re.search(r"FAILED filter data after \d", screen.getvalue())
    status = (tmp_path / "FAILED").read_text()
    assert "stage: filter data" in status and f"log: {log}" in status
    assert "error: lastmile.data.DataError: /tmp/recorded/bad.jsonl" in status
    assert "Inner task failed" in (tmp_path / "logs" / "kfp.log").read_text()  # kept there
    assert "DataError" in log.read_text()


def test_kfp_indentation_nested_by_two_threads_is_removed(tmp_path):
    """kfp.local indents a task's lines with a patched print; two ParallelFor threads patching
    it at once nest the indent (8, 12 spaces), which can change in the middle of a task (here
    at the traceback). The stage's log and error come out unindented."""
    from kfp.local import logging_utils

    def replay(lines):
        for line in lines:
            if console.KFP_RECORD.match(console.ANSI.sub("", line)):
                sys.stdout.write(line + "\n")  # a log record: kfp's handler writes it whole
            else:  # the subprocess's line, re-printed by kfp
                print(line[4:] if line.startswith("    ") else line)

    lines = _recorded("kfp_local_failure.txt", tmp_path)
    cut = next(i for i, line in enumerate(lines) if line.strip() == TRACEBACK_LINE)
    errors = io.StringIO()
    with console.RunConsole(tmp_path, names=NAMES, screen=io.StringIO(), errors=errors,
                            live=False) as run:
        with logging_utils.indented_print():
            replay(lines[:cut])
            with logging_utils.indented_print():  # another thread patched print meanwhile
                replay(lines[cut:])
        run.fail(RuntimeError("Inner task failed"))
    log = (tmp_path / "logs" / "filter-data.log").read_text().splitlines()
    assert log[0].startswith("[KFP Executor ") and TRACEBACK_LINE in log
    assert errors.getvalue().splitlines()[-2].startswith("lastmile.data.DataError: ")
    assert errors.getvalue().splitlines()[1].startswith('  File "/work/main/lastmile/data.py"')


# ----------------------------------------------------------------------------- headlines

def test_headlines_from_recorded_summaries(tmp_path):
    """Each stage's figure from its own output, as the smoke run wrote it."""
    stage = tmp_path / "filter-data"
    _summary(stage / "data", stage="filter_data", rows_in=3500,
             rows_out={"train": 28, "test": 8}, dropped={"null": 1, "too_long": 2},
             splits={"train": {"capped": 2972}, "test": {"capped": 492}})
    assert console.headline(stage) == ("28 train + 8 test rows kept of 3500, 3 dropped, 3464 "
                                       "beyond max_train/max_test")
    stage = tmp_path / "train-reward"
    _summary(stage / "reward_model", stage="train_reward", train={"final_loss": 0.2906364},
             eval={"n": 8, "accuracy": {"copy_input": 0.875, "random_tokens": 0.75}})
    assert console.headline(stage) == "final loss 0.2906, held-out accuracy 81% on 8 inputs"
    stage = tmp_path / "train-ppo"
    _summary(stage / "ppo_model", stage="train_ppo", updates=2, final_sampled={
        "reward_mean": -4.0192998, "response_length_mean": 12.0, "excess_length_mean": -0.2857})
    assert console.headline(stage) == ("final reward -4.019, excess length -0.29 words after 2 "
                                       "updates")
    stage = tmp_path / "gather"
    _summary(stage / "base", stage="generate_base", n=8)  # sorted before scores/
    _summary(stage / "scores", stage="score", n=40, variants=["mle", "rl"])
    (stage / "scores" / "scores.json").write_text(json.dumps({"models": {
        "rl": {"la_rougeL_f1": 0.2321, "excess_length": 1.34},
        "mle": {"la_rougeL_f1": 0.2012, "excess_length": 2.6}}}))
    assert console.headline(stage) == ("la-ROUGE-L F1 RL 0.232 vs MLE 0.201; excess length RL "
                                       "1.34 vs MLE 2.60 words")
    stage = tmp_path / "plan-shards"
    stage.mkdir()
    (stage / "executor_output.json").write_text('{"parameterValues": {"Output": [0, 1]}}')
    assert console.headline(stage) == "2 shard(s)"
    broken = tmp_path / "train-mle"
    _summary(broken / "mle_model", stage="train_mle")  # no "train": no figure, no error
    assert console.headline(broken) == "" and console.headline(None) == ""


def test_display_names_from_the_compiled_pipeline():
    from google.protobuf import json_format

    sys.path.insert(0, str(ROOT))
    import pipeline

    spec = json_format.MessageToDict(pipeline.build_pipeline().pipeline_spec)
    names = console.display_names(spec)
    assert names["train-ppo"] == "train PPO policy" and names["train-mle"] == "train MLE baseline"
    assert {names[k] for k in ("generate", "generate-2", "generate-3")} == {
        "generate base", "generate mle", "generate rl"}
    assert names["filter-data"] == "filter data" and "condition-1" not in names
    assert names["resolve-config"] == "resolve config"  # no display name: its key, in words


# ----------------------------------------------------------------------------- run folder

def test_runs_latest_points_at_the_newest_run(tmp_path):
    runs = tmp_path / "runs"
    first, second = runs / "20261207-000000", runs / "20261207-000100"
    first.mkdir(parents=True)
    second.mkdir()
    assert console.point_latest(first) == runs / "latest"
    assert console.point_latest(second) == runs / "latest"
    assert os.readlink(runs / "latest") == second.name  # relative: the folder can move
    assert (runs / "latest").resolve() == second.resolve()
    elsewhere = tmp_path / "x"
    elsewhere.mkdir()
    assert console.point_latest(elsewhere) is None and not (tmp_path / "latest").exists()
    (runs / "latest").unlink()
    (runs / "latest").mkdir()  # a real folder of that name is left alone
    assert console.point_latest(first) is None and (runs / "latest").is_dir()


def test_status_files_replace_each_other(tmp_path):
    console.write_status(tmp_path, console.FAILED_FILE, {"stage": "score"})
    console.write_status(tmp_path, console.COMPLETE_FILE, {"status": "done"})
    assert not (tmp_path / "FAILED").exists()
    assert (tmp_path / "COMPLETE").read_text().startswith("status: done\nat: ")
    console.write_status(tmp_path, console.COMPLETE_FILE,
                         {"status": "done", "seconds": 130.0, "logs": "runs/x: y/"})
    status = console.read_status(tmp_path / "COMPLETE")
    assert (status["status"], status["seconds"], status["logs"]) == ("done", "130.0", "runs/x: y/")
    assert console.read_status(tmp_path / "FAILED") == {}


def test_where_things_are_names_report_adapters_and_next_commands(tmp_path):
    run = Path("runs/20261207-000000")
    adapters = {"RL adapter (PPO)": run / "rl", "MLE adapter": run / "m"}
    lines = console.where_things_are(run, adapters, published="s3://b/runs/x/")
    assert lines[0] == "report: runs/20261207-000000/report.html"
    assert "RL adapter (PPO): runs/20261207-000000/rl" in lines
    assert "MLE adapter:      runs/20261207-000000/m" in lines
    assert "published: s3://b/runs/x/" in lines
    commands = [line.split("  ")[1] for line in lines if line.startswith("  lastmile ")]
    assert commands == ["lastmile export runs/20261207-000000 --out export/rl",
                        "lastmile predict runs/20261207-000000 --input new.jsonl --out "
                        "predictions.jsonl"]


# ----------------------------------------------------------------------------- a real run

def test_failing_run_ends_with_the_stages_error_and_log(tmp_path, capsys):
    """A data file that passes the up-front checks (it exists, the configuration resolves)
    and fails inside filter_data: exit 1, the stage's DataError and its log are the last
    lines, no kfp traceback, FAILED in the run folder, runs/latest pointing at it."""
    sys.path.insert(0, str(ROOT))
    import pipeline

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a b c d e f", "output": "a b"}\n{"input": "x y", "output"\n')
    run = tmp_path / "runs" / "bad"
    assert pipeline.main(["run", "--profile", "smoke", "--data", str(bad),
                          "--out", str(run)]) == 1
    captured = capsys.readouterr()
    last = captured.err.splitlines()
    log = run / "logs" / "filter-data.log"
    assert last[-1] == f"log: {log}"
    assert last[-2] == f"lastmile.data.DataError: {bad}: line 2 is not valid JSON (Expecting ':' " \
                       "delimiter)"
    screen = captured.out + captured.err
    for noise in ("Traceback", "Inner task failed", "kfp/local", "executor_input",
                  "DockerRunner", "[KFP Executor"):
        assert noise not in screen, noise
    assert re.search(r"start  resolve config\n.*done   resolve config in .*: profile smoke",
                     captured.out)
    assert re.search(r"FAILED filter data after \d", captured.out)
    assert "DataError" in log.read_text() and "DockerRunner" in (log.parent / "kfp.log").read_text()
    assert "stage: filter data" in (run / "FAILED").read_text()
    assert not (run / "COMPLETE").exists()
    assert (tmp_path / "runs" / "latest").resolve() == run.resolve()
