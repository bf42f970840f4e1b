"""mgllava."""

import importlib
import importlib.util
import os
import sys

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


class _RegisterWithTransformers:
    """Registers the model with transformers' Auto classes (:mod:`mgllava.model`) right after transformers
    is first imported, so ``import mgllava`` stays fast (no torch) and ``AutoConfig`` /
    ``AutoModelForImageTextToText`` / ``AutoProcessor`` know ``model_type = "mgllava"`` once used. A
    ``sys.meta_path`` finder (``importlib.abc.MetaPathFinder``'s protocol, without importing it)."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            if "mgllava.model" not in sys.modules:  # otherwise its import, under way, registers at its end
                importlib.import_module("mgllava.model")

        spec.loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    importlib.import_module("mgllava.model")
else:
    sys.meta_path.insert(0, _RegisterWithTransformers())
