"""``mgllava up`` / ``mgllava down``: the local Prefect server, work pool, deployments and worker.

``up`` starts, in the background and each with a log file under
``$MGLLAVA_HOME/logs``:

1. a Prefect server bound to 127.0.0.1 (SQLite under ``$MGLLAVA_HOME/prefect``),
   unless ``PREFECT_API_URL`` already points at a server (your own, or Prefect
   Cloud): then that one is used and no server is started;
2. the process work pool ``mgllava`` (created if missing);
3. the deployments of ``prefect.yaml`` (``prefect deploy --all``, an upsert);
4. a worker polling that pool.

It is idempotent: what is already running (recorded in
``$MGLLAVA_HOME/services.json`` and alive) is kept. ``down`` stops exactly the
processes ``up`` started, worker first, and nothing else: ``up`` records each
process's identity (PID, start time and command line, from psutil), and a PID
whose start time or command line no longer match (the process ended and the
PID went to another one) is left alone with a message.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from mgllava import child_environment
from mgllava.config import mgllava_home

log = logging.getLogger(__name__)

POOL = "mgllava"
HOST = "127.0.0.1"
DEFAULT_PORT = 4200
REPO_ROOT = Path(__file__).resolve().parent.parent  # where prefect.yaml lives (editable install)


def state_file() -> Path:
    return mgllava_home() / "services.json"


def prefect_home() -> Path:
    """Where every Prefect process of mgllava keeps its state (``PREFECT_HOME``), never ``~/.prefect``."""
    return mgllava_home() / "prefect"


def _read_state() -> dict:
    try:
        return json.loads(state_file().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_state(state: dict) -> None:
    state_file().parent.mkdir(parents=True, exist_ok=True)
    state_file().write_text(json.dumps(state, indent=2))


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited child not yet reaped) is not alive
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return True


def _identity(pid: int, command: list[str] | None = None, timeout: float = 10.0) -> dict:
    """What identifies the live process ``pid``: its PID, start time and command line. With the
    ``command`` it was spawned with, wait (up to ``timeout`` s) until it runs that command: just after
    the fork it still shows its parent's command line, which would not match later."""
    process = psutil.Process(pid)
    deadline = time.monotonic() + timeout
    while command and process.cmdline()[-(len(command) - 1):] != command[1:] and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"pid": pid, "create_time": process.create_time(), "cmdline": process.cmdline()}


def _not_ours(entry: dict) -> str | None:
    """Why the live PID of ``entry`` is not the process ``up`` recorded there, or None when it is."""
    if "create_time" not in entry or "cmdline" not in entry:
        return "no start time or command line was recorded for it"
    try:
        now = _identity(entry["pid"])
    except psutil.Error:
        return None  # gone: nothing of anyone's to stop
    if abs(now["create_time"] - entry["create_time"]) > 0.01:
        return (f"it started at {time.ctime(now['create_time'])}, the recorded process at "
                f"{time.ctime(entry['create_time'])}")
    if now["cmdline"] != entry["cmdline"]:
        return f"its command line is {' '.join(now['cmdline'])!r}, not {' '.join(entry['cmdline'])!r}"
    return None


def _running(entry: dict | None) -> bool:
    """Whether the process ``up`` recorded in ``entry`` is alive (not merely its PID)."""
    return bool(entry) and _alive(entry.get("pid")) and _not_ours(entry) is None


def prefect_env(api_url: str) -> dict[str, str]:
    """The environment for every Prefect process ``up`` starts or runs."""
    return {
        **child_environment(),
        "PREFECT_HOME": str(prefect_home()),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": api_url,
        "MGLLAVA_REPO": str(REPO_ROOT),
    }


def _healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((HOST, port)) == 0


def _wait_healthy(api_url: str, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _healthy(api_url):
            return
        time.sleep(0.5)
    raise RuntimeError(f"Prefect server at {api_url} did not answer within {timeout:.0f} s; see {log_path}")


def _prefect(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "prefect"), *args]


def _spawn(command: list[str], env: dict, log_path: Path) -> int:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            command, env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=REPO_ROOT,
        )
    return process.pid


def _run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True)


def up(port: int = DEFAULT_PORT, server_timeout: float = 180.0) -> dict:
    """Start (or find running) the server, pool, deployments and worker; return the state."""
    state = _read_state()
    logs = mgllava_home() / "logs"
    external = os.environ.get("PREFECT_API_URL")
    if external and not state.get("server"):
        api_url = external
        log.info("using the Prefect API at %s (PREFECT_API_URL): no local server started", api_url)
    else:
        api_url = f"http://{HOST}:{port}/api"
        server = state.get("server") or {}
        if _running(server) and _healthy(server.get("api_url", "")):
            api_url = server["api_url"]
            log.info("Prefect server already running (pid %d) at %s", server["pid"], api_url)
        else:
            from mgllava.cli import UsageError

            if _healthy(api_url):
                raise UsageError("--port", f"a Prefect server `mgllava up` did not start answers at {api_url}: "
                                 f"stop it, use it with PREFECT_API_URL={api_url} mgllava up, or pick another --port")
            if _port_taken(port):
                raise UsageError("--port", f"port {port} on {HOST} is taken by another program: pick another --port")
            command = _prefect("server", "start", "--host", HOST, "--port", str(port))
            pid = _spawn(command, prefect_env(api_url), logs / "prefect-server.log")
            state["server"] = {**_identity(pid, command), "api_url": api_url, "log": str(logs / "prefect-server.log")}
            _write_state(state)
            log.info("starting Prefect server (pid %d) at %s", pid, api_url)
            _wait_healthy(api_url, server_timeout, logs / "prefect-server.log")
    state["api_url"] = api_url
    env = prefect_env(api_url)

    if _run(_prefect("work-pool", "inspect", POOL), env).returncode != 0:
        created = _run(_prefect("work-pool", "create", POOL, "--type", "process"), env)
        if created.returncode != 0:
            raise RuntimeError(f"could not create work pool {POOL!r}: {created.stdout}{created.stderr}")
        log.info("created process work pool %r", POOL)
    deployed = _run(_prefect("--no-prompt", "deploy", "--all"), env)
    if deployed.returncode != 0:
        raise RuntimeError(f"prefect deploy failed:\n{deployed.stdout[-3000:]}{deployed.stderr[-3000:]}")
    log.info("deployed prefect.yaml (%s)", REPO_ROOT / "prefect.yaml")

    worker = state.get("worker") or {}
    if _running(worker):
        log.info("worker already running (pid %d) on pool %r", worker["pid"], POOL)
    else:
        command = _prefect("worker", "start", "--pool", POOL, "--type", "process")
        pid = _spawn(command, env, logs / "prefect-worker.log")
        state["worker"] = {**_identity(pid, command), "pool": POOL, "log": str(logs / "prefect-worker.log")}
        log.info("started worker (pid %d) on pool %r", pid, POOL)
    _write_state(state)
    return state


def _stop(pid: int, name: str, timeout: float = 20.0) -> None:
    if not _alive(pid):
        return
    try:
        os.killpg(pid, signal.SIGTERM)  # the process group: the worker's flow-run children too
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        log.warning("%s (pid %d) did not stop on SIGTERM: killing it", name, pid)
        os.killpg(pid, signal.SIGKILL)


def down() -> dict:
    """Stop the worker and the server that :func:`up` started (and nothing else).

    Returns the state that was recorded, each entry with ``down``: ``stopped``, ``not running``,
    or ``left alone: <why>`` for a PID that now belongs to another process.
    """
    state = _read_state()
    for name in ("worker", "server"):
        entry = state.get(name)
        if not entry:
            continue
        pid, why = entry["pid"], _not_ours(entry)
        if not _alive(pid):
            entry["down"] = "not running"
        elif why:
            entry["down"] = f"left alone: pid {pid} is not the {name} `mgllava up` started: {why}"
            log.warning("%s", entry["down"])
        else:
            _stop(pid, name)
            entry["down"] = "stopped"
            log.info("stopped %s (pid %d)", name, pid)
    state_file().unlink(missing_ok=True)
    return state


def status() -> dict:
    state = _read_state()
    return {
        "api_url": state.get("api_url"),
        "server": _running(state.get("server")),
        "worker": _running(state.get("worker")),
    }


def running_api_url() -> str | None:
    """The API URL of the server `up` started, when it is running and answers; else None."""
    server = _read_state().get("server") or {}
    return server["api_url"] if _running(server) and _healthy(server.get("api_url", "")) else None


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "up",
        help="start the local Prefect server, work pool, deployments and worker (idempotent)",
        description="Start a Prefect server on 127.0.0.1 (state under $MGLLAVA_HOME/prefect), create the "
        f"process work pool '{POOL}', deploy prefect.yaml and start a worker, all in the background with "
        "logs under $MGLLAVA_HOME/logs. Already-running pieces are kept. With PREFECT_API_URL set, that "
        "server (or Prefect Cloud) is used instead of starting one.",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="server port (default 4200)")
    parser.set_defaults(func=_up)
    parser = subparsers.add_parser(
        "down", help="stop what `mgllava up` started", description="Stop the worker and server `up` started."
    )
    parser.set_defaults(func=_down)
    parser = subparsers.add_parser(
        "status", help="the Prefect server and worker, the warehouse and its last runs",
        description="Show whether the Prefect server and worker of `mgllava up` run (and where), where the "
        "DuckDB warehouse is, and the last runs it recorded (box tables, training stages, evaluations).",
    )
    parser.add_argument("--warehouse", metavar="FILE", help="DuckDB warehouse (default $MGLLAVA_HOME/warehouse.duckdb)")
    parser.add_argument("--last", type=int, default=5, metavar="N", help="how many runs to list (default 5)")
    parser.set_defaults(func=_status)


def _up(args) -> int:
    try:
        state = up(port=args.port)
    except RuntimeError as exc:  # the server did not start, or a Prefect command failed: see the log named
        print(f"mgllava up: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    ui = state["api_url"].removesuffix("/api")
    print(f"Prefect API: {state['api_url']}")
    print(f"Prefect UI:  {ui}  (flow runs: {ui}/runs)")
    print(f"worker on pool '{POOL}'; logs in {mgllava_home() / 'logs'}")
    print(f"to use it from this shell: export PREFECT_API_URL={state['api_url']}")
    return 0


def _down(args) -> int:
    state = down()
    entries = [(name, state[name]["down"]) for name in ("worker", "server") if state.get(name)]
    for name, outcome in entries:
        print(f"{name}: {outcome}")
    if not entries:
        print("nothing was running")
    return 0


def _status(args) -> int:
    from mgllava.eval.cli import format_table
    from warehouse.db import WarehouseBusy, default_path
    from warehouse.runs import COLUMNS, last_runs

    state = _read_state()
    server, worker = state.get("server") or {}, state.get("worker") or {}
    external = os.environ.get("PREFECT_API_URL")
    if _running(server):
        answers = "" if _healthy(server["api_url"]) else " (not answering)"
        print(f"server:    running (pid {server['pid']}) at {server['api_url'].removesuffix('/api')}{answers}")
    elif external:
        print(f"server:    PREFECT_API_URL={external} ({'answers' if _healthy(external) else 'does not answer'})")
    else:
        print("server:    not running (start it with `mgllava up`)")
    if _running(worker):
        print(f"worker:    running (pid {worker['pid']}) on pool '{POOL}'")
    else:
        print("worker:    not running")
    path = Path(args.warehouse).expanduser() if args.warehouse else default_path()
    print(f"warehouse: {path}" + ("" if path.is_file() else " (not created yet)"))
    try:
        rows = last_runs(path, args.last)
    except WarehouseBusy as exc:
        print(f"last runs: {exc}")
        return 0
    if rows:
        print("last runs:\n" + format_table(COLUMNS, rows))
    else:
        print("last runs: none recorded")
    return 0
