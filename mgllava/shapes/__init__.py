"""The embedded default's demo kit: a synthetic world and the tiny models built on it.

Everything here exists only so that the whole pipeline runs, and learns, on a CPU in minutes:

- :mod:`mgllava.shapes.world`: the shapes world, images of coloured shapes and small numbers with
  YOLO labels, LLaVA-format corpora and benchmark sets in the public formats (``mgllava world``);
- :mod:`mgllava.shapes.zoo`: tiny checkpoints in the full-size public layouts (a Hugging Face LLM and
  tokenizer, a CLIP ViT, an open_clip ConvNeXt) trained on that world (``mgllava zoo``);
- :mod:`mgllava.shapes.towers`: the pretraining of the tiny vision towers, and its small ``fit`` loop.

The product (``mgllava.model``, ``mgllava.train``, ``mgllava.eval``, ``detector``, ``warehouse``)
never imports this package; the flows and the CLI do. Its settings are the config's ``shapes``
section, which only the tiny preset carries.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path


def prepare(config) -> dict:
    """Generate the shapes world and build the tiny zoo where the config asks for them (idempotent: each
    is rebuilt only if missing, incomplete or made with other settings). Without a ``shapes`` section
    nothing is made. An LLM path that exists but is no zoo of ours (no ``zoo.json`` beside it) is left alone."""
    return {"world": prepare_world(config), "zoo": prepare_zoo(config)}


def prepare_world(config) -> str | None:
    """Generate the shapes world of the config's ``shapes.world`` (skipped when complete); its path."""
    from mgllava.shapes.world import generate_world

    if config.shapes is None:
        return None
    world = config.shapes.world
    return str(generate_world(world.dir, n_images=world.n_images, seed=world.seed, progress=False,
                              conversations_per_image=world.conversations_per_image))


def zoo_pending(config) -> bool:
    """True when :func:`prepare_zoo` has a zoo to build (none yet, an unfinished one, or other settings)."""
    from mgllava.shapes.zoo import zoo_is_built

    if config.shapes is None:
        return False
    zoo = Path(config.model.llm.path).parent
    if Path(config.model.llm.path).exists() and not (zoo / "zoo.json").exists():
        return False  # not ours: left alone
    return not zoo_is_built(zoo, **_zoo_arguments(config))


def prepare_zoo(config) -> str | None:
    """Build the tiny zoo beside the config's LLM path when :func:`zoo_pending`; its path."""
    from mgllava.shapes.zoo import build_zoo

    if config.shapes is None:
        return None
    zoo = Path(config.model.llm.path).parent
    if zoo_pending(config):
        build_zoo(zoo, **_zoo_arguments(config))
    return str(zoo)


def _zoo_arguments(config) -> dict:
    vision = config.model.vision
    return {"world_dir": config.shapes.world.dir, "high_res": vision.high_res, "low_res": vision.low_res,
            "max_length": config.model.max_length, "recipe": config.shapes.zoo}


class BackgroundZoo:
    """The tiny zoo built beside other work of this process (the full-train flow trains the detector and
    detects meanwhile), when :func:`zoo_pending`; used as a context manager, which stops the child if
    the work beside it fails.

    The LLM, the long part, trains in a child process of its own (no shared interpreter lock or torch
    threads) with ``threads`` torch threads. :meth:`result`, called when the work beside it is done,
    pretrains the vision towers in this process with the other ``later_threads - threads`` threads,
    then lets the child use ``later_threads``: a thread count is a per-thread OpenMP setting that only
    the child's main thread can change, so that is a signal (SIGUSR1), handled between two of its steps.
    ``child_logging`` (picklable, called in the child) sets where the child's log lines go besides stderr
    (the flow passes one that sends them to its run's Prefect logs)."""

    def __init__(self, config, threads: int, later_threads: int, child_logging: Callable[[], None] | None = None):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self._config, self._pool = config, None
        self._threads, self._later_threads = threads, later_threads
        if zoo_pending(config):
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_zoo_child_setup,
                                             initargs=(threads, later_threads, child_logging))
            self._pid = self._pool.submit(os.getpid).result()
            self._llm = self._pool.submit(_build_zoo_llm, config)

    @property
    def running(self) -> bool:
        """True while the child trains the LLM."""
        return self._pool is not None and not self._llm.done()

    def result(self) -> str | None:
        """Build the towers here, wait for the LLM, write ``zoo.json``; the zoo's path (a failure in the
        child is raised here). Without a child (nothing pending) :func:`prepare_zoo`."""
        import torch

        from mgllava.shapes.zoo import build_zoo_towers, write_zoo_record

        if self._pool is None:
            return prepare_zoo(self._config)
        arguments = _zoo_arguments(self._config)
        zoo, recipe = Path(self._config.model.llm.path).parent, arguments["recipe"]
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, self._later_threads - self._threads))
        try:
            towers = build_zoo_towers(zoo, arguments["high_res"], arguments["low_res"], recipe)
        finally:
            torch.set_num_threads(threads)
        if self.running:
            os.kill(self._pid, signal.SIGUSR1)  # the child may use every core now
        try:
            llm = self._llm.result()
        finally:
            self._pool.shutdown()
        write_zoo_record(zoo, llm=llm, towers=towers, **arguments)
        return str(zoo)

    def __enter__(self) -> BackgroundZoo:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is not None and self.running:  # the work beside it failed: stop the child, do not wait for it
            os.kill(self._pid, signal.SIGTERM)
            self._pool.shutdown(cancel_futures=True)


def _build_zoo_llm(config) -> dict:
    from mgllava.shapes.zoo import build_zoo_llm

    arguments = _zoo_arguments(config)
    return build_zoo_llm(Path(config.model.llm.path).parent, arguments["world_dir"], arguments["max_length"],
                         arguments["recipe"])


def _zoo_child_setup(threads: int, later_threads: int, child_logging: Callable[[], None] | None) -> None:
    import logging

    import torch

    torch.set_num_threads(threads)
    signal.signal(signal.SIGUSR1, lambda *_: torch.set_num_threads(later_threads))
    handler = logging.StreamHandler()  # the kit's progress lines, as the parent logs them
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("mgllava")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    if child_logging:
        child_logging()
