"""Screenshots of the MLflow UI as a user sees it, for the newest cyclemerge pipeline run.

Started by ``checks/ui_check.sh`` once an ``mlflow ui`` server answers at ``--url``. Finds the
newest finished parent run (tag ``cyclemerge.kind = pipeline``), the runs nested in it (stages, and
runs nested in a stage such as one per seed model) and a plot PNG through the REST API, then drives
headless Chromium over the DevTools protocol (on a pipe, so nothing beyond the standard library is
needed) in the UI's "Model training" view with the assistant panel shut. Each page is photographed only after it shows what a user should
see (the run rows, the run name, a metric chart, the image), so a blank or broken page fails the
check and names itself instead of leaving an empty screenshot behind.

Standard library only: it runs with the project's venv or any Python 3.10+.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

VIEWPORT = (1600, 1000)
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
    f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}",
]
# Only the files this script writes are replaced, so a user's own files in the folder survive.
SHOT_NAMES = ("1-run-list.png", "2-parent-overview.png", "3-stage-metrics.png", "4-artifact-plot.png")


class UICheckError(RuntimeError):
    """A failed check; the message says what was expected and what to do."""


# ---------------------------------------------------------------- REST: what to look at

def api(base: str, endpoint: str, body: dict | None = None, query: dict | None = None) -> dict:
    url = f"{base}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        raise UICheckError(f"MLflow REST {endpoint} failed: HTTP {e.code} {e.read()[:300]!r}") from None
    except (urllib.error.URLError, TimeoutError) as e:
        raise UICheckError(f"no answer from the MLflow server at {base} ({endpoint}): {e}") from None


def search_runs(base: str, experiment_ids: list[str], filter_string: str, max_results: int = 1000) -> list[dict]:
    body = {"experiment_ids": experiment_ids, "filter": filter_string, "max_results": max_results,
            "order_by": ["attributes.start_time DESC"]}
    return api(base, "runs/search", body).get("runs", [])


def run_name(run: dict) -> str:
    return run["info"].get("run_name") or run["info"]["run_id"]


def tag(run: dict, key: str) -> str | None:
    return next((t["value"] for t in run.get("data", {}).get("tags", []) if t["key"] == key), None)


def newest_pipeline_run(base: str) -> dict:
    """The newest finished pipeline run that evaluated a merge (a rerun that found every stage up to
    date, or one that reran only a stage or two, has little to show); grid points (experiments named
    ``*-grid``) only when nothing else exists. The newest of any status when none has finished yet."""
    experiments = api(base, "experiments/search", {"max_results": 1000}).get("experiments", [])
    ids = [e["experiment_id"] for e in experiments if not e["name"].endswith("-grid")] or \
        [e["experiment_id"] for e in experiments]
    runs = search_runs(base, ids, "tags.`cyclemerge.kind` = 'pipeline'", max_results=50) if ids else []
    if not runs:
        raise UICheckError("the MLflow store has no cyclemerge pipeline run yet (no run tagged "
                           "cyclemerge.kind = pipeline): run `make run` first")
    evaluated = {tag(r, "mlflow.parentRunId") for r in search_runs(base, ids, "tags.`cyclemerge.stage` = 'evaluate'")}
    runs = [r for r in runs if r["info"]["run_id"] in evaluated] or runs
    finished = [r for r in runs if r["info"]["status"] == "FINISHED"]
    if finished and finished[0] is not runs[0]:
        print(f"ui-check: skipping pipeline run {runs[0]['info']['run_id']} ({runs[0]['info']['status']}); "
              f"showing the newest finished one, {finished[0]['info']['run_id']}")
    return finished[0] if finished else runs[0]


def status_note(run: dict) -> str:
    status = run["info"]["status"]
    return "" if status == "FINISHED" else f" (the run is {status}: wait for `make run` to finish, or run it again)"


def nested_runs(base: str, parent: dict, depth: int = 3) -> list[list[dict]]:
    """The runs below ``parent`` level by level (stages, then runs nested in a stage such as one per
    seed model), each level in start order."""
    exp, levels, above = parent["info"]["experiment_id"], [], [parent["info"]["run_id"]]
    while above and len(levels) < depth:
        # One search per run: MLflow's filter has no IN for tags.
        found = [r for run_id in above for r in search_runs(base, [exp], f"tags.`mlflow.parentRunId` = '{run_id}'")]
        level = sorted(found, key=lambda r: r["info"]["start_time"])
        if level:
            levels.append(level)
        above = [r["info"]["run_id"] for r in level]
    return levels


def metric_steps(base: str, run: dict, key: str) -> int:
    history = api(base, "metrics/get-history", query={"run_id": run["info"]["run_id"], "metric_key": key})
    return len(history.get("metrics", []))


def stage_with_curves(base: str, stages: list[dict]) -> tuple[dict, list[str]] | None:
    """The first stage run with a metric logged at several steps (a chart worth seeing), else the one
    with the most metrics; with the metric keys to look for on its charts page."""
    with_metrics = [s for s in stages if s.get("data", {}).get("metrics")]
    for run in with_metrics:
        keys = [m["key"] for m in run["data"]["metrics"]]
        curves = [k for k in keys[:20] if metric_steps(base, run, k) > 1]
        if curves:
            return run, curves
    if with_metrics:
        run = max(with_metrics, key=lambda r: len(r["data"]["metrics"]))
        return run, [m["key"] for m in run["data"]["metrics"]]
    return None


def find_png(base: str, run: dict, path: str = "", depth: int = 3) -> str | None:
    """Artifact path of a PNG in ``run``, looking in ``plots/`` first."""
    query = {"run_id": run["info"]["run_id"]}
    if path:
        query["path"] = path
    files = api(base, "artifacts/list", query=query).get("files", [])
    pngs = sorted(f["path"] for f in files if not f.get("is_dir") and f["path"].lower().endswith(".png"))
    if pngs:
        return pngs[0]
    dirs = sorted((f["path"] for f in files if f.get("is_dir")), key=lambda p: (p.rstrip("/") != "plots", p))
    for sub in dirs if depth > 1 else []:
        found = find_png(base, run, sub, depth - 1)
        if found:
            return found
    return None


# ---------------------------------------------------------------- Chromium over the DevTools pipe

class Browser:
    """Headless Chromium driven through ``--remote-debugging-pipe`` (fd 3: commands in, fd 4: replies out)."""

    def __init__(self, chromium: str, timeout: float) -> None:
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="ui-check-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def install_pipe_fds() -> None:
            # Dup first: a pipe end may already sit on fd 3 or 4, where dup2 would keep its close-on-exec flag.
            r, w = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.log = tempfile.NamedTemporaryFile(prefix="ui-check-chromium-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-pipe", "about:blank"],
            preexec_fn=install_pipe_fds, close_fds=False, stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buffer = b""
        self._next_id = 0
        self.session = ""

    def __enter__(self) -> "Browser":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.page("Page.enable")
        self.page("Emulation.setDeviceMetricsOverride",
                  {"width": VIEWPORT[0], "height": VIEWPORT[1], "deviceScaleFactor": 1, "mobile": False})
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.send("Browser.close")
        except (UICheckError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            os.close(fd)
        self.log.close()
        os.unlink(self.log.name)
        shutil.rmtree(self.profile, ignore_errors=True)

    def _log_tail(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-1500:]

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        try:
            os.write(self._to_child, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            raise UICheckError(f"Chromium exited (code {self.proc.poll()}); its log:\n{self._log_tail()}") from None
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._from_child], [], [], left)[0]:
                    raise UICheckError(f"Chromium did not answer {method} within {self.timeout:.0f}s")
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise UICheckError(f"Chromium exited (code {self.proc.poll()}); its log:\n{self._log_tail()}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:  # anything else is an event we did not ask for
                if "error" in reply:
                    raise UICheckError(f"Chromium refused {method}: {reply['error'].get('message')}")
                return reply.get("result", {})

    def page(self, method: str, params: dict | None = None) -> dict:
        return self.send(method, params, self.session)

    def evaluate(self, expression: str) -> object:
        result = self.page("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise UICheckError(f"page script failed: {result['exceptionDetails'].get('text')} in {expression[:120]}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        # A full load per page (via about:blank), so nothing left on screen by the previous page can
        # satisfy the next page's check.
        self.page("Page.navigate", {"url": "about:blank"})
        self.page("Page.navigate", {"url": url})

    def _holds(self, predicate: str) -> bool:
        try:
            return bool(self.evaluate(f"Boolean({predicate})"))
        except UICheckError as e:
            if "context" in str(e).lower():  # asked while the page was being replaced: ask again
                return False
            raise

    def wait_for(self, predicate: str, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._holds(predicate):
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText.slice(0, 600) : ''")
                raise UICheckError(f"{what} did not appear within {timeout:.0f}s; the page showed:\n{text}")
            time.sleep(0.25)

    def use_model_training_view(self, base: str, timeout: float) -> None:
        """Switch the UI to its "Model training" view (runs, models, registry) and keep the assistant
        panel shut, as an ML researcher would after the first click; both live in the profile's
        localStorage, so they hold for every page loaded afterwards."""
        self.open(f"{base}/#/")
        self.wait_for(text_shown("Experiments"), "the MLflow UI's home page", timeout)
        self.evaluate("localStorage.setItem('mlflow.workflowType_v1', '\"machine_learning\"');"
                      "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
                      "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false')")

    def close_assistant(self) -> None:
        # MLflow 3 opens an "MLflow Assistant" chat panel by default; it hides a third of the page.
        self.evaluate("document.querySelector('button[data-component-id=\"mlflow.assistant.chat_panel.close\"]')"
                      "?.click()")

    def screenshot(self, path: Path, settle: float) -> None:
        time.sleep(settle)  # charts animate and images decode after the content is in the DOM
        data = self.page("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))


def text_shown(text: str) -> str:
    return f"document.body && document.body.innerText.includes({json.dumps(text)})"


def row_shown(run_id: str) -> str:
    return f"document.querySelector('[row-id={json.dumps(run_id)}]')"


# ---------------------------------------------------------------- the four pages

@dataclass
class Shot:
    path: Path
    url: str
    shows: str


def check_ui(base: str, out: Path, chromium: str, timeout: float, settle: float) -> list[Shot]:
    parent = newest_pipeline_run(base)
    exp, parent_id = parent["info"]["experiment_id"], parent["info"]["run_id"]
    levels = nested_runs(base, parent)
    stages = [run for level in levels for run in level]
    if not stages:
        raise UICheckError(f"pipeline run {parent_id} ({run_name(parent)}) has no stage runs (runs with "
                           f"mlflow.parentRunId set to it){status_note(parent) or ': did `make run` stop early? Run it again'}")
    picked = stage_with_curves(base, stages)
    if picked is None:
        raise UICheckError(f"none of the {len(stages)} stage runs of {parent_id} logged a metric{status_note(parent)}")
    stage, metric_keys = picked
    plot_run, plot = parent, find_png(base, parent)
    for run in stages if plot is None else []:
        plot_run, plot = run, find_png(base, run)
        if plot:
            break
    if plot is None:
        raise UICheckError(f"no PNG artifact in pipeline run {parent_id} or its stage runs (plots are logged "
                           f"under plots/){status_note(parent) or '; run `make run` again'}")

    out.mkdir(parents=True, exist_ok=True)
    for name in SHOT_NAMES:
        (out / name).unlink(missing_ok=True)
    root = f"{base}/#/experiments/{exp}"
    shots = []
    with Browser(chromium, timeout) as browser:
        browser.use_model_training_view(base, timeout)
        # (a) the run list, the newest pipeline run's stage runs unfolded beneath it
        url = f"{root}/runs"
        browser.open(url)
        browser.wait_for(row_shown(parent_id), "the pipeline run's row in the run list", timeout)
        browser.close_assistant()
        rows_above = 1
        for depth, (above, level) in enumerate(zip([[parent], *levels], levels), start=1):
            # Unfold every run that has runs nested in it, one level at a time (rows appear only once
            # their parent is unfolded, and a second click would fold it again).
            for run in above:
                children = [r for r in level if tag(r, "mlflow.parentRunId") == run["info"]["run_id"]]
                if children and not browser.evaluate(row_shown(children[0]["info"]["run_id"])):
                    expander = f"[row-id={json.dumps(run['info']['run_id'])}] button[data-component-id*=\"runnamecellrenderer\"]"
                    browser.evaluate(f"document.querySelector({json.dumps(expander)})?.click()")
            # The grid renders only the rows on screen (about 24): once those are full, one row will do.
            shown = "[" + ", ".join(row_shown(r["info"]["run_id"]) for r in level) + "].filter(Boolean).length"
            browser.wait_for(f"{shown} >= {max(1, min(len(level), 24 - rows_above))}",
                             f"the {len(level)} runs nested {depth} level(s) under the pipeline run", timeout)
            rows_above += len(level)
        names = ", ".join(run_name(r) for r in stages[:12]) + (", …" if len(stages) > 12 else "")
        shots.append(Shot(out / SHOT_NAMES[0], url, f"run list: {run_name(parent)} with its {len(stages)} nested "
                                                    f"runs unfolded ({names})"))
        browser.screenshot(shots[-1].path, settle)

        # (b) the pipeline run's overview
        url = f"{root}/runs/{parent_id}"
        browser.open(url)
        browser.wait_for(f"{text_shown(run_name(parent))} && {text_shown(parent_id)}",
                         f"the overview of {run_name(parent)}", timeout)
        browser.close_assistant()
        shots.append(Shot(out / SHOT_NAMES[1], url, f"overview of pipeline run {run_name(parent)} ({parent_id})"))
        browser.screenshot(shots[-1].path, settle)

        # (c) one stage run's model-metric charts
        url = f"{root}/runs/{stage['info']['run_id']}/model-metrics"
        browser.open(url)
        any_key = " || ".join(text_shown(k) for k in metric_keys[:10])
        browser.wait_for(f"({any_key}) && document.querySelector('.js-plotly-plot, svg.main-svg')",
                         f"the metric charts of stage run {run_name(stage)}", timeout)
        browser.close_assistant()
        shots.append(Shot(out / SHOT_NAMES[2], url, f"model metrics of stage run {run_name(stage)} "
                                                    f"(charts of {', '.join(metric_keys[:6])})"))
        browser.screenshot(shots[-1].path, settle)

        # (d) the artifact browser showing the plot
        url = f"{root}/runs/{plot_run['info']['run_id']}/artifacts/{plot}"
        browser.open(url)
        # The viewer fetches the file and shows it from a blob: URL, with the artifact path as alt text.
        image = f"[...document.images].some(i => i.alt === {json.dumps(plot)} && i.complete && i.naturalWidth > 0)"
        browser.wait_for(f"{text_shown(plot.rsplit('/', 1)[-1])} && {image}",
                         f"the image {plot} in the artifacts of {run_name(plot_run)}", timeout)
        browser.close_assistant()
        shots.append(Shot(out / SHOT_NAMES[3], url, f"artifacts of {run_name(plot_run)} showing {plot}"))
        browser.screenshot(shots[-1].path, settle)
    return shots


def find_chromium() -> str:
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        found = candidate and shutil.which(candidate)
        if found:
            return found
    raise UICheckError("no Chromium found: install Debian's `chromium` package or set CHROMIUM=/path/to/chrome")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="base URL of a running `mlflow ui`, e.g. http://127.0.0.1:5000")
    parser.add_argument("--out", type=Path, default=Path("ui-screenshots"), help="folder for the screenshots")
    parser.add_argument("--timeout", type=float, default=float(os.environ.get("UI_CHECK_TIMEOUT", 90)),
                        help="seconds each page may take to show its content (default 90; env UI_CHECK_TIMEOUT)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds to wait before each screenshot")
    args = parser.parse_args()
    base = args.url.rstrip("/")
    # Stopped by ui_check.sh on Ctrl-C: unwind through the `with Browser` so Chromium is closed too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        shots = check_ui(base, args.out, find_chromium(), args.timeout, args.settle)
    except UICheckError as e:
        print(f"ui-check: FAILED: {e}", file=sys.stderr)
        return 1
    print(f"ui-check: {len(shots)} pages rendered; screenshots in {args.out}/")
    for shot in shots:
        print(f"  {shot.path.name}: {shot.shows}\n      {shot.url.removeprefix(base + '/')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
