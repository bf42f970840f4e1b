"""The Prefect UI in a real headless Chromium (scripts/ui_check.py): a finished run's page shows the
project's log lines and its pictures. Skipped only where no Chromium is installed."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("ui_check", ROOT / "scripts" / "ui_check.py")
ui_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ui_check)

pytestmark = [
    pytest.mark.ui,
    pytest.mark.slow,  # a Prefect server with its UI and a browser: ~30 s
    pytest.mark.skipif(ui_check.find_chromium() is None, reason="no Chromium installed (apt-get install chromium)"),
]


@pytest.fixture
def server(tmp_path):
    """A real ``prefect server start`` (the UI included) on a free port, state under tmp_path."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api_url,
           "PREFECT_UI_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    process = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                                "127.0.0.1", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(api_url + "/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the Prefect server did not start") from None
                time.sleep(0.5)
        yield env
    finally:
        process.terminate()
        process.wait(timeout=30)


RUN_A_FLOW = """
import logging, sys
from prefect import flow, task
from flows import reports
from mgllava import plots

@task
def train_something(out):
    logging.getLogger("mgllava.train.engine").info("pretrain step 1/1: loss 1.0000, lr 1.000e-03, 2.00 samples/s")
    return str(plots.loss_curves([("pretrain", 1, 1.0, 1e-3), ("pretrain", 2, 0.5, 1e-3)], out))

@flow(name="ui-check-probe")
def probe(out):
    reports.project_logs()
    png = train_something(out)
    reports.publish_picture("loss-curves", "Loss", png, "a picture")

probe(sys.argv[1])
"""


def test_ui_shows_the_runs_log_lines_and_pictures(server, tmp_path, capsys):
    probe = subprocess.run([sys.executable, "-c", RUN_A_FLOW, str(tmp_path / "loss.png")], env=server, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]

    shots = tmp_path / "shots"
    assert ui_check.main(["--api-url", server["PREFECT_API_URL"], "--out", str(shots)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "1 project log lines in the API, 1 pictures in 1 artifacts" in printed
    names = sorted(p.name for p in shots.glob("*.png"))
    assert len(names) == 3 and any(n.endswith("-logs.png") for n in names)
    assert any(n.endswith("-artifacts.png") for n in names) and any(n.endswith("-loss-curves.png") for n in names)
    for name in names:
        assert (shots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (shots / name).stat().st_size > 20_000

    # a run without pictures or project log lines fails the check, naming both
    quiet = "from prefect import flow\nflow(name='quiet')(lambda: None)()"
    subprocess.run([sys.executable, "-c", quiet], env=server, cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert ui_check.main(["--api-url", server["PREFECT_API_URL"], "--out", str(tmp_path / "quiet"), "--wait", "3"]) == 1
    err = capsys.readouterr().err
    assert "published no picture" in err and "no log lines" in err and "Logs tab shows no line" in err
