"""Prefect flows ``pretrain`` and ``finetune``: one training stage as a ``deepspeed`` launcher job.

Wiring only: the command comes from :func:`mgllava.train.launch.launch_command`, the
job's output lines are streamed into the flow run's logs, and a non-zero exit fails
the flow with the job's last lines. The job resumes from the stage's last
checkpoint by itself, so a retried flow run continues where the crash left it.
"""

from __future__ import annotations

import json

from prefect import flow, get_run_logger

RESULT_PREFIX = "MGLLAVA_STAGE_RESULT "


def _run_stage(
    stage: str,
    preset: str | None,
    config_file: str | None,
    overrides: list[str] | None,
    run_id: str | None,
    num_gpus: int | None,
    hostfile: str | None,
    fresh: bool,
) -> dict:
    from mgllava.config import load_config
    from mgllava.train.job import check_stage_inputs, new_run_id
    from mgllava.train.launch import launch_command, run_job

    logger = get_run_logger()
    config = load_config(preset=preset, path=config_file, overrides=overrides or [])
    check_stage_inputs(config, stage)
    command = launch_command(config, stage, run_id or new_run_id(), num_gpus, hostfile, fresh)
    logger.info("launching: %s", " ".join(command))
    result: dict = {}

    def on_line(line: str) -> None:
        nonlocal result
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line.removeprefix(RESULT_PREFIX))
        elif line.strip():
            logger.info(line)

    run_job(command, on_line)
    logger.info(
        "%s finished: %s steps, final loss %s; checkpoints %s",
        stage,
        result.get("steps"),
        result.get("final_loss"),
        result.get("checkpoint_dir"),
    )
    return result


@flow(name="pretrain", log_prints=True)
def pretrain(
    preset: str | None = None,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    run_id: str | None = None,
    num_gpus: int | None = None,
    hostfile: str | None = None,
    fresh: bool = False,
) -> dict:
    """Stage 1: train the fusion, projector and box projector (LLM and encoders frozen)."""
    return _run_stage("pretrain", preset, config_file, overrides, run_id, num_gpus, hostfile, fresh)


@flow(name="finetune", log_prints=True)
def finetune(
    preset: str | None = None,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    run_id: str | None = None,
    num_gpus: int | None = None,
    hostfile: str | None = None,
    fresh: bool = False,
) -> dict:
    """Stage 2: train those and the LLM from the pretrain weights; export the model directory."""
    return _run_stage("finetune", preset, config_file, overrides, run_id, num_gpus, hostfile, fresh)
