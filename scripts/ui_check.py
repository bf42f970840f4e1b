"""Check in a real headless Chromium that a finished flow run shows its log lines and pictures in the Prefect UI.

    python scripts/ui_check.py [--flow-run ID] [--api-url URL] [--out DIR]       (make ui-check)

It opens the flow run page (default: the newest finished run on the server ``mgllava up`` started, or on
``PREFECT_API_URL``), reads its Logs tab, clicks its Artifacts tab, opens each artifact that holds pictures, and saves a
screenshot of each page under
``$MGLLAVA_HOME/ui-check/``. It fails (exit 1, one line per problem) unless

- the Logs tab shows lines of the project's own loggers (``mgllava.*``, ``detector.*``, ``warehouse.*``),
  and the API holds such lines for the run's tasks;
- the Artifacts tab lists the run's picture artifacts, and each one's page shows all its pictures,
  decoded by the browser (``naturalWidth > 0``).

Chromium is driven over its DevTools protocol (``--remote-debugging-port``) with the ``websockets``
package Prefect already installs: no browser driver to download. Chromium is the distribution's package
(``apt-get install chromium``); exit 2 when it is absent.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PROJECT_LOGGERS = ("mgllava.", "detector.", "warehouse.")
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


class Browser:
    """One headless Chromium page driven over the DevTools protocol."""

    def __init__(self, executable: str, width: int = 1400, height: int = 1600):
        self.profile = tempfile.mkdtemp(prefix="ui-check-")
        self.process = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        port = self._devtools_port()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            page = next(t for t in json.load(response) if t["type"] == "page")
        from websockets.sync.client import connect

        self.socket = connect(page["webSocketDebuggerUrl"], max_size=None)
        self.ids = itertools.count(1)

    def _devtools_port(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        assert self.process.stderr is not None
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            found = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if found:
                return int(found.group(1))
            if not line and self.process.poll() is not None:
                break
        raise RuntimeError("Chromium did not open its DevTools port")

    def call(self, method: str, **params) -> dict:
        ident = next(self.ids)
        self.socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        """Poll ``expression`` until it is truthy; its last value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value or time.monotonic() > deadline:
                return value
            time.sleep(0.5)

    def open(self, url: str) -> None:
        self.call("Page.enable")
        self.call("Page.navigate", url=url)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=20)
        shutil.rmtree(self.profile, ignore_errors=True)


def _api(api_url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(api_url.rstrip("/") + path, data=json.dumps(body or {}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def latest_finished_run(api_url: str) -> dict:
    runs = _api(api_url, "/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}},
                                                              "parent_task_run_id": {"is_null_": True}},
                                               "sort": "END_TIME_DESC", "limit": 1})
    if not runs:
        raise SystemExit(f"ui-check: no finished flow run on {api_url}: run a flow first (e.g. make demo)")
    return runs[0]


def project_log_lines(api_url: str, flow_run_id: str) -> list[dict]:
    """The run's log lines (its tasks' and subflows' included) from the project's own loggers."""
    runs = [flow_run_id] + [r["id"] for r in _api(api_url, "/flow_runs/filter", {
        "flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})]
    logs = _api(api_url, "/logs/filter", {"logs": {"flow_run_id": {"any_": runs}}, "limit": 200, "sort": "TIMESTAMP_ASC"})
    return [line for line in logs if line["name"].startswith(PROJECT_LOGGERS)]


def picture_artifacts(api_url: str, flow_run_id: str) -> list[dict]:
    """The run's artifacts that embed pictures (markdown with ``data:`` images, or image artifacts), each
    with ``pictures``: how many."""
    artifacts = _api(api_url, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
    for artifact in artifacts:
        artifact["pictures"] = str(artifact.get("data") or "").count("data:image/")
    return [a for a in artifacts if a["pictures"]]


CLICK_TAB = """(() => { const tab = [...document.querySelectorAll('button, [role=tab], a, li.p-tab')]
  .find(e => e.textContent.trim() === %s); if (tab) tab.click(); return !!tab; })()"""
PROJECT_LINE_SHOWN = ("[...document.querySelectorAll('*')].some(e => e.children.length === 0 && "
                      "/^(mgllava|detector|warehouse)[.]/.test(e.textContent.trim()))")
RENDERED_IMAGES = """[...document.querySelectorAll('img')].filter(i => i.src.startsWith('data:image/')
  && i.complete && i.naturalWidth > 0).length"""


def check(api_url: str, flow_run: dict, out: Path, chromium: str, ui_url: str, wait: float = 30.0) -> list[str]:
    """Screenshots of the run's Logs tab, Artifacts tab and each picture artifact's page; the problems found."""
    problems = []
    flow_run_id, name = flow_run["id"], flow_run["name"]
    lines = project_log_lines(api_url, flow_run_id)
    if not lines:
        problems.append(f"the API holds no log lines of {', '.join(PROJECT_LOGGERS)} loggers for flow run {flow_run_id}")
    pictures = picture_artifacts(api_url, flow_run_id)
    if not pictures:
        problems.append(f"flow run {flow_run_id} published no picture")
    browser = Browser(chromium)
    shots = []
    try:
        browser.open(f"{ui_url}/runs/flow-run/{flow_run_id}")
        shown = browser.wait_for(PROJECT_LINE_SHOWN, wait)
        shots.append(browser.screenshot(out / f"{name}-logs.png"))
        if not shown:
            problems.append(f"the Logs tab shows no line of the project's loggers (screenshot {shots[-1]})")
        if not browser.wait_for(CLICK_TAB % json.dumps("Artifacts"), wait):
            problems.append("the flow run page has no Artifacts tab")
        keys = [a["key"] for a in pictures if a.get("key")]
        listed = browser.wait_for(f"{json.dumps(keys)}.every(k => document.body.innerText.includes(k))", wait)
        shots.append(browser.screenshot(out / f"{name}-artifacts.png"))
        if not listed:
            problems.append(f"the Artifacts tab does not list all of {', '.join(keys)} (screenshot {shots[-1]})")
        for artifact in pictures:
            browser.open(f"{ui_url}/artifacts/artifact/{artifact['id']}")
            rendered = browser.wait_for(f"({RENDERED_IMAGES}) >= {artifact['pictures']} && ({RENDERED_IMAGES})", wait)
            time.sleep(0.5)  # let the pictures paint
            shots.append(browser.screenshot(out / f"{name}-{artifact.get('key') or artifact['id']}.png"))
            if (rendered or 0) < artifact["pictures"]:
                problems.append(f"artifact {artifact.get('key')}: the browser shows {rendered or 0} of its "
                                f"{artifact['pictures']} pictures (screenshot {shots[-1]})")
    finally:
        browser.close()
    print(f"ui-check: flow run {name} ({flow_run_id}): {len(lines)} project log lines in the API, "
          f"{sum(a['pictures'] for a in pictures)} pictures in {len(pictures)} artifacts; screenshots:")
    for shot in shots:
        print(f"  {shot}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--api-url", help="Prefect API (default: the server `mgllava up` started, else $PREFECT_API_URL)")
    parser.add_argument("--flow-run", help="flow run id (default: the newest finished top-level run)")
    parser.add_argument("--out", help="folder for the screenshots (default $MGLLAVA_HOME/ui-check)")
    parser.add_argument("--wait", type=float, default=30.0, help="seconds to wait for each page to show (default 30)")
    args = parser.parse_args(argv)
    chromium = find_chromium()
    if not chromium:
        print("ui-check: no Chromium found (apt-get install chromium)", file=sys.stderr)
        return 2
    from mgllava.config import mgllava_home

    api_url = args.api_url or os.environ.get("PREFECT_API_URL")
    if not api_url:
        from mgllava import services

        api_url = services.status().get("api_url")
    if not api_url:
        print("ui-check: no Prefect server: start one with `mgllava up` or give --api-url", file=sys.stderr)
        return 2
    flow_run = _api(api_url, f"/flow_runs/{args.flow_run}") if args.flow_run else latest_finished_run(api_url)
    out = Path(args.out) if args.out else mgllava_home() / "ui-check"
    problems = check(api_url, flow_run, out, chromium, api_url.rstrip("/").removesuffix("/api"),
                     args.wait)
    for problem in problems:
        print(f"ui-check: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
