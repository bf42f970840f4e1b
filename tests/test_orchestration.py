"""`mgllava up`, the `mgllava/full-train` deployment through a real worker, caching, `mgllava down`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mgllava import services

pytestmark = pytest.mark.slow  # a real Prefect server, worker and a miniature full run: minutes

MINIATURE = {
    "overrides": [
        "shapes.world.n_images=24",
        "shapes.zoo.tower_scenes=16",
        "shapes.zoo.tower_epochs=1",
        "shapes.zoo.llm_instruct_steps=2",
        "detector.train.epochs=1",
        "detector.train.min_map50=0",  # one epoch cannot detect; the quality bar is the demo's
        "detector.conf=0.01",
        "train.pretrain.max_steps=2",
        "train.finetune.max_steps=2",
        "eval.limit=6",
    ],
    "benchmarks": ["pope", "mmbench"],
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_deployment(env: dict, params: dict) -> subprocess.CompletedProcess:
    prefect = str(Path(sys.executable).parent / "prefect")
    return subprocess.run(
        [prefect, "deployment", "run", "mgllava/full-train", "--params", json.dumps(params), "--watch",
         "--watch-timeout", "900"],
        env=env, capture_output=True, text=True, timeout=1000,
    )


def test_up_run_cache_down(tmp_path, monkeypatch):
    monkeypatch.setenv("MGLLAVA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    try:
        state = services.up(port=_free_port())
        assert state["api_url"].startswith("http://127.0.0.1:")
        again = services.up()  # idempotent: finds both running
        assert again["server"]["pid"] == state["server"]["pid"]
        assert again["worker"]["pid"] == state["worker"]["pid"]

        env = {**services.prefect_env(state["api_url"])}
        params = {**MINIATURE, "work_dir": str(tmp_path / "work")}
        first = _run_deployment(env, params)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        assert "Completed" in first.stdout

        from warehouse.db import connect

        with connect(read_only=True) as con:
            tasks = {row[0] for row in con.execute("SELECT DISTINCT task FROM scores").fetchall()}
            logged = dict(con.execute("SELECT stage, count(*) FROM train_steps GROUP BY stage").fetchall())
            planned = dict(con.execute("SELECT stage, steps FROM train_stages WHERE status = 'completed'").fetchall())
        assert {"pope", "mmbench"} <= tasks
        assert logged == planned and set(planned) == {"pretrain", "finetune"}  # a loss row per step

        second = _run_deployment(env, params)
        assert second.returncode == 0, second.stdout[-3000:]
        worker_log = Path(state["worker"]["log"]).read_text()
        assert worker_log.count("reused the cached result") >= 3  # pretrain, finetune, evaluate
    finally:
        stopped = services.down()
    for name in ("server", "worker"):
        assert not services._alive(stopped[name]["pid"])
    assert services.down() == {}  # nothing left to stop
    assert not os.path.exists(services.state_file())
