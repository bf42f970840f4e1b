"""Prefect flows ``pretrain`` and ``finetune``: one training stage as a ``deepspeed`` launcher job.

Wiring only: :func:`mgllava.train.launch.run_stage_job` builds the command, streams
the job's output lines into the flow run's logs and raises
:class:`~mgllava.train.launch.JobFailed` with the job's last lines when it exits
non-zero. The job resumes from the stage's last checkpoint by itself, so a retried
flow run continues where the crash left it.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows import reports


def _stage_flow(stage: str, description: str):
    """The Prefect flow named ``stage`` that runs that training stage."""

    def run_stage(
        preset: str | None = None,
        config_file: str | None = None,
        overrides: list[str] | None = None,
        run_id: str | None = None,
        num_gpus: int | None = None,
        hostfile: str | None = None,
        fresh: bool = False,
    ) -> dict:
        from mgllava.config import load_config
        from mgllava.train.job import new_run_id, stage_dir
        from mgllava.train.launch import run_stage_job

        reports.project_logs()
        logger = get_run_logger()
        config = load_config(preset=preset, path=config_file, overrides=overrides or [])
        run_id = run_id or new_run_id()
        progress = reports.Progress(f"{stage}-progress", f"Training stage {stage} (run {run_id})")
        result = run_stage_job(config, stage, run_id, logger.info, num_gpus, hostfile, fresh, progress=progress,
                               quiet=True)
        logger.info(
            "%s finished: %s steps, final loss %s; checkpoints in %s",
            stage,
            result.get("steps"),
            result.get("final_loss"),
            result.get("checkpoint_dir"),
        )
        reports.publish_training([run_id], {stage: result}, stage_dir(config, stage))
        return result

    run_stage.__doc__ = description
    return flow(name=stage, description=description)(run_stage)


pretrain = _stage_flow("pretrain", "Stage 1: train the fusion, projector and box projector (LLM and encoders frozen).")
finetune = _stage_flow(
    "finetune", "Stage 2: train those and the LLM from the pretrain weights; export the model directory."
)
