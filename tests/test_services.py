"""`mgllava down` stops only the processes `mgllava up` recorded: same PID, start time and command line."""

from __future__ import annotations

import json
import subprocess

import psutil
import pytest

from mgllava import services


def _record(**entries) -> None:
    services.state_file().parent.mkdir(parents=True, exist_ok=True)
    services.state_file().write_text(json.dumps(entries))


def _running(process) -> bool:
    return process.poll() is None


@pytest.mark.parametrize("recorded", [
    pytest.param(lambda me: {**me, "create_time": me["create_time"] - 3600}, id="another start time"),
    pytest.param(lambda me: {**me, "cmdline": ["prefect", "worker", "start"]}, id="another command line"),
    pytest.param(lambda me: {"pid": me["pid"]}, id="no identity recorded"),
])
def test_down_leaves_an_unrelated_process_alone(sleeper, capsys, fault_ledger, recorded):
    _record(worker=recorded(services._identity(sleeper.pid)))
    assert services._down(None) == 0
    out = capsys.readouterr().out
    fault_ledger.record("mgllava down with a recycled PID", _running(sleeper))
    assert _running(sleeper)
    assert f"worker: left alone: pid {sleeper.pid}" in out
    assert not services.state_file().exists()
    _record(worker=recorded(services._identity(sleeper.pid)))
    assert services.status()["worker"] is False  # `up` would start a new worker, not adopt this one


def test_down_stops_the_recorded_process(sleeper, capsys):
    _record(worker=services._identity(sleeper.pid), server={"pid": 2**22 + 7, "create_time": 0.0, "cmdline": []})
    assert services.status()["worker"] is True
    state = services.down()
    assert sleeper.wait(timeout=10) is not None
    assert state["worker"]["down"] == "stopped" and state["server"]["down"] == "not running"
    assert not psutil.pid_exists(sleeper.pid) or psutil.Process(sleeper.pid).status() == psutil.STATUS_ZOMBIE
    assert services.down() == {}


def test_a_busy_warehouse_is_one_line_from_any_command(monkeypatch, capsys, tmp_path):
    """Commands that do not catch WarehouseBusy themselves still end with one line, exit 1, no traceback."""
    from mgllava.cli import main
    from warehouse.db import WarehouseBusy

    def busy():
        raise WarehouseBusy(tmp_path / "warehouse.duckdb", 0.5, RuntimeError("Conflicting lock is held in x (PID 7)"))

    monkeypatch.setattr(services, "down", busy)
    assert main(["down"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "process 7" in err and "Traceback" not in err


def test_prefect_processes_do_not_inherit_this_process_s_distributed_world(monkeypatch):
    """A process that trained in-process holds its rendezvous port: a worker's flow runs must not reuse it."""
    monkeypatch.setenv("MASTER_PORT", "29512")
    monkeypatch.setenv("RANK", "0")
    env = services.prefect_env("http://127.0.0.1:4200/api")
    assert "MASTER_PORT" not in env and "RANK" not in env and env["PREFECT_API_URL"].endswith("/api")


def test_up_records_the_command_line_the_process_runs_not_the_one_before_its_exec():
    """``up`` records a spawned process's identity once it runs the spawned command (a process still
    showing another command line would later be mistaken for someone else's and left running)."""
    process = subprocess.Popen(["sh", "-c", "sleep 0.5; exec sleep 60"], start_new_session=True)
    try:
        recorded = services._identity(process.pid, ["sleep", "60"])
        assert recorded["cmdline"] == ["sleep", "60"]
        assert services._not_ours(recorded) is None
    finally:
        process.kill()
        process.wait()
