"""report.html in a real browser: headless Chromium (Debian's `chromium` package) opens a report
built by lastmile.report from small synthetic inputs, and the test asserts what a reader
would see: no console errors or uncaught exceptions, every <img> decoded with a size, the
best values in bold, no sideways scrolling at a laptop's width; a full-page screenshot is
kept as an artifact (tests/artifacts/report_browser/, ignored by git).

How the browser is driven: the DevTools protocol over `--remote-debugging-pipe` (Chromium
reads JSON commands, each ended by a NUL byte, on fd 3 and writes replies and events on
fd 4). That needs no websocket library and no port, and it sees what `--dump-dom` or the
stderr log cannot: console messages and exceptions as structured events (Runtime, Log),
and each image's own decode result (`HTMLImageElement.decode()` rejects for a broken one).
A first page with a broken image and a console.error checks that the harness catches
both, so a pass means something.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import random
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from lastmile import report
from lastmile.config import ScoreConfig, get_profile
from lastmile.io import write_json, write_jsonl
from lastmile.metrics import score_file

ARTIFACTS = Path(os.environ.get("LASTMILE_TEST_ARTIFACTS",
                                Path(__file__).parent / "artifacts")) / "report_browser"
#: Install line for the browser (the test setup runs it on a fresh machine).
INSTALL = "apt-get update && apt-get install -y chromium"
WIDTH, HEIGHT = 1280, 900  # a laptop's viewport, CSS pixels
TIMEOUT = 30.0  # seconds for any one protocol reply


def _chromium() -> str | None:
    return next(filter(None, (shutil.which(n) for n in ("chromium", "chromium-browser"))), None)


class DevTools:
    """A headless Chromium and its DevTools protocol over the debugging pipe."""

    def __init__(self, binary: str, profile_dir: Path, log_path: Path):
        to_browser, self._write = os.pipe()  # the browser reads commands on fd 3
        self._read, from_browser = os.pipe()  # and writes replies and events on fd 4
        args = [binary, "--headless", "--remote-debugging-pipe", "--disable-gpu",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-sync", "--hide-scrollbars",
                "--mute-audio", f"--user-data-dir={profile_dir}", f"--window-size={WIDTH},{HEIGHT}",
                "--enable-logging=stderr", "--v=0", "about:blank"]
        if os.geteuid() == 0:  # Chromium refuses to start as root with its sandbox on
            args.insert(1, "--no-sandbox")

        def pipe_fds() -> None:  # in the child: the two pipe ends become fds 3 and 4
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in (to_browser, from_browser)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, pass_fds=(3, 4),
                                     preexec_fn=pipe_fds)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError("no reply from Chromium within the deadline")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise ConnectionError(f"Chromium closed the pipe (exit {self.proc.poll()})")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        command = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            command["sessionId"] = session
        os.write(self._write, json.dumps(command).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT
        while True:
            message = self._message(deadline)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, session: str) -> dict:
        deadline = time.monotonic() + TIMEOUT
        for i, event in enumerate(self.events):
            if event.get("method") == method and event.get("sessionId") == session:
                return self.events.pop(i)
        while True:
            message = self._message(deadline)
            if message.get("method") == method and message.get("sessionId") == session:
                return message
            self.events.append(message)

    def open(self, url: str) -> str:
        """A new tab at `url`, loaded, with console and log events on; its session id."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target,
                                                      "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride", {"width": WIDTH, "height": HEIGHT,
                                                         "deviceScaleFactor": 1,
                                                         "mobile": False}, session)
        self.send("Page.navigate", {"url": url}, session)
        self.wait_for("Page.loadEventFired", session)
        return session

    def evaluate(self, session: str, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True}, session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def errors(self, session: str) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors seen on the page."""
        found = []
        for event in self.events:
            if event.get("sessionId") != session:
                continue
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error",
                                                                               "assert"):
                found.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                    for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                found.append("exception: " + str(details.get("exception", {}).get(
                    "description", details.get("text"))))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                found.append(f"log ({entry.get('source')}): {entry.get('text')} "
                             f"{entry.get('url', '')}".strip())
        return found

    def screenshot(self, session: str, path: Path) -> Path:
        """The whole page, not just the viewport."""
        size = self.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        shot = self.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"],
                     "scale": 1}}, session)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.send("Browser.close")
        except (OSError, TimeoutError, ConnectionError, RuntimeError):
            pass
        finally:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            for fd in (self._read, self._write):
                os.close(fd)
            self._log.close()


#: Each <img>: decoded (decode() resolves), complete, with its natural size.
IMAGES = """Promise.all([...document.images].map(img => img.decode().then(
    () => ({alt: img.alt, ok: true, complete: img.complete, width: img.naturalWidth,
            height: img.naturalHeight}),
    () => ({alt: img.alt, ok: false, complete: img.complete, width: img.naturalWidth,
            height: img.naturalHeight}))))"""
#: What a reader sees of the tables: bold best cells, verdicts, and the page's widths.
LAYOUT = """({
    best: [...document.querySelectorAll('td.best')].map(td => [td.textContent,
        getComputedStyle(td).fontWeight]),
    captions: [...document.querySelectorAll('caption')].map(c => c.textContent),
    scrollWidth: document.documentElement.scrollWidth,
    viewport: window.innerWidth,
    title: document.title})"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = _chromium()
    if binary is None:
        pytest.skip(f"no chromium binary on PATH (Debian: `{INSTALL}`; make test's setup "
                    "installs it)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS.parent / ".gitignore").write_text("*\n")  # artifacts never reach git
    tools = DevTools(binary, tmp_path_factory.mktemp("chromium-profile"),
                     ARTIFACTS / "chromium.log")
    try:
        yield tools
    finally:
        tools.close()


def _synthetic_run(run: Path) -> Path:
    """A run folder in the report's layout: 30 test inputs scored for real (lexical metrics,
    so the paired bootstrap has per-example data), a reward-model evaluation, a PPO log, stage
    summaries and the demo profile's configuration."""
    rnd = random.Random(0)
    words = "tool library package data file system network parser render manager".split()
    rows = []
    for i in range(30):
        ref = " ".join(rnd.choice(words) for _ in range(6))
        filler = " ".join(rnd.choice(words) for _ in range(12))
        outputs = {"base": f"Sure, here is a summary:\n{ref} {filler}",
                   "mle": f"{ref} {ref}", "rl": ref if i % 4 else filler[:40],
                   "base_cleaned": f"{ref} {filler}", "mle_cleaned": ref + " tool"}
        rows += [{"id": i, "input": f"{filler} {ref} " * 4, "reference": ref,
                  "prediction": text, "variant": v} for v, text in outputs.items()]
    write_jsonl(run / "predictions.jsonl", rows)
    score_file(run / "predictions.jsonl", run / "scores.json",
               ScoreConfig(semantic_similarity=False))
    categories = ("random_tokens", "repaired", "shuffled", "repetitive", "copy_input")
    write_json(run / "rm_eval.json", {
        "n": 30, "accuracy": dict(zip(categories, (1.0, 0.9, 0.8, 1.0, 1.0))),
        "mean_reward": {"true": 0.8, **dict(zip(categories, (0.0, 0.3, 0.4, 0.1, 0.0)))},
        "pairs": dict.fromkeys(categories, 30)})
    write_jsonl(run / "ppo_log.jsonl", [
        {"update": u, "batch_kind": kind, "reward_mean": 0.05 * u, "response_length_mean": 60 - u,
         "excess_length_mean": 20 - u, "policy_loss": 1 / (u + 1), "value_loss": 2 / (u + 1),
         "approx_kl": 0.0, "clip_fraction": 0.0}
        for u in range(16) for kind in ("sampled", "reference")])
    write_json(run / "summaries" / "filter_data.json", {"seconds": 2.0, "rows_in": 40, "seed": 0})
    write_json(run / "summaries" / "train_ppo.json", {"seconds": 60.0, "rows": 280, "seed": 0})
    write_json(run / "config.json", get_profile("demo").to_dict())
    write_json(run / "run_info.json", {"profile": "demo", "base_model": "embedded:smollm2"})
    return run


def test_harness_catches_console_errors_and_broken_images(browser, tmp_path):
    """The negative control: a page with a broken image and a console error fails both checks."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>broken</title>'
                    '</head><body><img alt="broken" src="data:image/png;base64,AAAA">'
                    '<script>console.error("boom")</script></body></html>')
    session = browser.open(page.as_uri())
    images = browser.evaluate(session, IMAGES)
    assert images == [{"alt": "broken", "ok": False, "complete": True, "width": 0,
                       "height": 0}]
    assert any("boom" in e for e in browser.errors(session)), browser.errors(session)


def test_report_html_in_chromium(browser, tmp_path):
    run = _synthetic_run(tmp_path / "run")
    paths = report.build_report_from_dir(run)
    shutil.copyfile(paths["html"], ARTIFACTS / "report.html")
    session = browser.open(paths["html"].as_uri())
    shot = browser.screenshot(session, ARTIFACTS / "report.png")
    print(f"screenshot: {shot}")

    assert browser.errors(session) == []
    images = browser.evaluate(session, IMAGES)
    assert [i["alt"] for i in images] == [
        "reward-model accuracy per negative category",
        "PPO reward, response length and excess length per update",
        "prediction vs reference length per variant, in words"]
    for image in images:
        assert image["ok"] and image["complete"] and image["width"] > 0 and image["height"] > 0, \
            image

    layout = browser.evaluate(session, LAYOUT)
    assert layout["title"] == "lastmile run report"
    assert layout["scrollWidth"] <= layout["viewport"], layout  # no sideways scrolling
    assert layout["best"], "no cell marked best"
    assert all(int(weight) >= 700 for _, weight in layout["best"]), layout["best"]
    assert {"Table 1: Extra length relative to the reference (words)",
            "Table 2: Evaluation metrics", "RL against MLE",
            "RL against MLE, post-processed"} <= set(layout["captions"])
    # The screenshot holds the whole page: taller than one screen, a laptop's width.
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width == WIDTH and height > 3 * HEIGHT, (width, height)
