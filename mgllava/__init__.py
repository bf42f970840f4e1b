"""mgllava."""

import os

USER_OMP_NUM_THREADS = os.environ.get("OMP_NUM_THREADS")
"""``OMP_NUM_THREADS`` as this process started. Importing ultralytics sets it to 1 when it is
unset, and training jobs launched from this process must not inherit that
(:func:`mgllava.train.launch.job_env`)."""

DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What makes a process a rank of a torch.distributed world (a plain process that trained in-process
sets them for its world of one, :func:`mgllava.train.engine.ensure_distributed_env`)."""


def child_environment() -> dict[str, str]:
    """This process's environment for a process it starts, without this process's own distributed world:
    a child that inherited ``MASTER_PORT`` would try to rendezvous on a port this process holds."""
    return {key: value for key, value in os.environ.items() if key not in DISTRIBUTED_ENV}
