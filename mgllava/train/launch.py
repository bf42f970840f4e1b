"""Running a training stage as a job under the ``deepspeed`` launcher.

The resolved configuration is written to ``<stage dir>/config.yaml`` and the job is
``deepspeed [--num_gpus N | --hostfile FILE] --module mgllava.train --config ...``.
Multi-node training is the launcher's hostfile (one ``host slots=N`` line per
node, passwordless ssh between them; see the README). :func:`run_job` streams the
job's output line by line (to a callback, e.g. a Prefect logger) and raises
:class:`JobFailed` with the last lines of output when it exits non-zero.
:func:`run_stage_job` holds the stage's lock (:func:`mgllava.train.job.stage_lock`)
for the whole job, so its ranks never contend for it, and marks the stage
``failed`` in the warehouse when the job dies before it could (a killed rank).
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import mgllava
from mgllava.config import Config
from mgllava.train.job import LOCK_ENV, check_stage_inputs, stage_dir, stage_lock, warehouse_spool

RESULT_PREFIX = "MGLLAVA_STAGE_RESULT "  # the job prints its result on one line behind this
STEP_PATTERN = re.compile(r"(?P<stage>\w+) step (?P<step>\d+)/(?P<total>\d+): loss (?P<loss>\S+), lr (?P<lr>\S+), "
                          r"(?P<samples_per_s>\S+) samples/s")
"""A logging step's line in the job's output (:data:`mgllava.train.engine.STEP_LINE`)."""


class JobFailed(RuntimeError):
    def __init__(self, returncode: int, tail: list[str]):
        self.returncode, self.tail = returncode, tail
        super().__init__(f"training job exited with code {returncode}; last lines:\n" + "\n".join(tail))


def free_port() -> int:
    """A TCP port free on this machine now (for a single-node job's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(
    config: Config,
    stage: str,
    run_id: str,
    num_gpus: int | None = None,
    hostfile: str | None = None,
    fresh: bool = False,
    quiet: bool = False,
) -> list[str]:
    """The ``deepspeed`` launcher command line for one stage (the config is written next to it); ``quiet``:
    no progress bars in the job's output (its log lines remain)."""
    config_path = config.save(stage_dir(config, stage) / "config.yaml")
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    command = [launcher]
    if hostfile:
        command += ["--hostfile", hostfile]
    else:
        command += ["--num_gpus", str(num_gpus or 1)]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())] if not hostfile else []
    command += ["--module", "mgllava.train", "--config", str(config_path), "--stage", stage, "--run-id", run_id]
    return command + (["--fresh"] if fresh else []) + (["--quiet"] if quiet else [])




def job_env() -> dict[str, str]:
    """This process's environment for a job, unbuffered, with ``OMP_NUM_THREADS`` as the user set it
    (or unset): the 1 that importing ultralytics leaves behind (the detect stage runs in the flow's
    process) would make a CPU training job single-threaded. Without this process's own distributed
    world (``RANK``, ``MASTER_PORT``... set if it trained in-process): a job's ranks get theirs from
    the launcher, and a plain job is a world of one of its own."""
    env = mgllava.child_environment()
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("OMP_NUM_THREADS", None)
    if mgllava.USER_OMP_NUM_THREADS is not None:
        env["OMP_NUM_THREADS"] = mgllava.USER_OMP_NUM_THREADS
    return env


def run_job(command: list[str], on_line: Callable[[str], None], tail_lines: int = 40,
            extra_env: dict[str, str] | None = None) -> None:
    """Run ``command``, passing each output line to ``on_line``; raise :class:`JobFailed` on failure.

    If this process is interrupted (an exception while it streams, SIGTERM made one), the job is sent
    SIGTERM (the ``deepspeed`` launcher passes it to every rank) and waited for, not left running.
    """
    env = {**job_env(), **(extra_env or {})}
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
    ) as process:
        assert process.stdout is not None
        try:
            for line in process.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                on_line(line)
        except BaseException:
            process.terminate()
            raise
    if process.returncode:
        raise JobFailed(process.returncode, list(tail))


def run_stage_job(
    config: Config,
    stage: str,
    run_id: str,
    on_line: Callable[[str], None],
    num_gpus: int | None = None,
    hostfile: str | None = None,
    fresh: bool = False,
    progress: Callable[[float, str], None] | None = None,
    quiet: bool = False,
) -> dict:
    """Check the stage's inputs, launch it under ``deepspeed``, stream its output; return its result.

    Each logging step's line (loss, lr, samples/s) also goes to ``progress(fraction of the steps, line)``;
    ``quiet`` leaves the progress bars out of the output (one line per refresh in a log)."""
    from warehouse.training import record_stage_failed

    check_stage_inputs(config, stage)
    with stage_lock(stage_dir(config, stage).resolve()) as lock:
        command = launch_command(config, stage, run_id, num_gpus, hostfile, fresh, quiet)
        on_line("launching: " + " ".join(command))
        result: dict = {}

        def forward(line: str) -> None:
            nonlocal result
            if line.startswith(RESULT_PREFIX):
                result = json.loads(line.removeprefix(RESULT_PREFIX))
            elif line.strip():
                on_line(line)
                step = STEP_PATTERN.search(line)
                if step and progress:
                    progress(int(step["step"]) / int(step["total"]), line[step.start():])

        try:
            run_job(command, forward, extra_env={LOCK_ENV: str(lock)})
        except JobFailed as exc:
            reason = f"JobFailed: exit code {exc.returncode}" + (f"; last line: {exc.tail[-1]}" if exc.tail else "")
            record_stage_failed(run_id, stage, reason, warehouse_spool(config, stage))
            raise
    return result
