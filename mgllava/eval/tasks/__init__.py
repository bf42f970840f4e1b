"""The 13 image benchmarks of SPEC section 7 as local lmms-eval tasks.

Each :class:`Benchmark` names the stock lmms-eval 0.7.3 task file it reuses (its prompts,
filters, ``process_results`` and metrics, untouched) and the split it reads. At run time
:func:`plan_tasks` decides, per benchmark, where its data comes from and
:func:`write_task_files` writes one task file per runnable benchmark into an
``--include_path`` folder::

    include: <site-packages>/lmms_eval/tasks/pope/pope.yaml   # absolute: written at run time
    task: pope_mgllava
    tag: [mgllava]
    dataset_path: /data/pope                                  # a datasets.save_to_disk directory
    dataset_kwargs: {load_from_disk: true}

Data, in order of preference:

1. ``config.eval.data_dirs[<benchmark>]``: real benchmark data the user saved locally
   (``DatasetDict.save_to_disk``) in the stock task's schema, with the split named below;
   (the tiny preset points it at the shapes world's sets);
2. none: the benchmark is *skipped*, with that reason.

The GPT-judged benchmarks (MM-Vet, LLaVA-Bench-in-the-wild, MathVista) are skipped unless
the judge's API key variable (``config.eval.judge_api_key_env``) is set. MMVP is listed
with them in SPEC section 7, but lmms-eval 0.7.3 scores it by extracting the option letter
(no judge), so it runs like the others.

Notes on individual tasks:

- ``mmbench`` uses the stock ``mmbench_en_dev_static`` (option letters extracted by rules);
  the stock ``mmbench_en_dev`` falls back to a GPT call for every unparsable answer.
- ``gqa`` sets ``process_docs: null``: the stock task downloads the images set and joins it
  on ``imageId``; local GQA data must already carry the ``image`` column (as the shapes
  world's set does).
- ``mathvista`` is ``mathvista_testmini_format`` (the stock default prompt of the testmini
  group).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

TASK_SUFFIX = "_mgllava"
TAG = "mgllava"


@dataclass(frozen=True)
class Benchmark:
    name: str  # the name used in config.eval.tasks / data_dirs and in the warehouse
    stock_yaml: str  # relative to lmms_eval/tasks/
    split: str  # the stock task's test_split: the split a local DatasetDict must hold
    judge: bool = False  # needs the GPT judge's API key
    extra: dict = field(default_factory=dict)  # further keys of the task file

    @property
    def task(self) -> str:
        return self.name + TASK_SUFFIX


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("mmbench", "mmbench/mmbench_en_dev_static.yaml", "dev"),
        Benchmark("seedbench", "seedbench/seedbench.yaml", "test"),
        Benchmark("scienceqa_img", "scienceqa/scienceqa_img.yaml", "test"),
        Benchmark("ai2d", "ai2d/ai2d.yaml", "test"),
        Benchmark("textvqa", "textvqa/textvqa_val.yaml", "validation"),
        Benchmark("pope", "pope/pope.yaml", "test"),
        Benchmark("gqa", "gqa/gqa.yaml", "testdev", extra={"process_docs": None}),
        Benchmark("vqav2", "vqav2/vqav2_val.yaml", "validation"),
        Benchmark("mme", "mme/mme.yaml", "test"),
        Benchmark("mmvet", "mmvet/mmvet.yaml", "test", judge=True),
        Benchmark("llava_in_the_wild", "llava-in-the-wild/llava-in-the-wild.yaml", "train", judge=True),
        Benchmark("mmvp", "mmvp/mmvp.yaml", "train"),
        Benchmark("mathvista", "mathvista/mathvista_testmini_format.yaml", "testmini", judge=True),
    )
}
"""The image benchmarks of SPEC section 7, by name."""


def stock_tasks_dir() -> Path:
    import lmms_eval  # the package's __init__ is light; its tasks subpackage is not imported here

    return Path(lmms_eval.__file__).parent / "tasks"


@dataclass
class TaskPlan:
    """What one evaluation run does with one benchmark."""

    name: str
    task: str  # the local lmms-eval task name
    status: Literal["ready", "skipped"]
    reason: str = ""
    data_dir: str | None = None


def plan_tasks(config, names: list[str] | None = None) -> list[TaskPlan]:
    """One :class:`TaskPlan` per benchmark in ``names`` (default ``config.eval.tasks``).

    An unknown name raises ``ValueError``. A configured data directory is used as given: if it
    is missing or broken the benchmark fails when it loads, and is recorded as failed.
    """
    names = list(names or config.eval.tasks)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from: {', '.join(BENCHMARKS)}")
    key_env = config.eval.judge_api_key_env
    plans = []
    for name in names:
        bench = BENCHMARKS[name]
        plan = TaskPlan(name, bench.task, "ready")
        if name in config.eval.data_dirs:
            plan.data_dir = str(Path(config.eval.data_dirs[name]).expanduser())
        else:
            plan.status = "skipped"
            plan.reason = (
                f"no local data: save the benchmark's '{bench.split}' split (stock lmms-eval schema of "
                f"{bench.stock_yaml}) with datasets' save_to_disk and set eval.data_dirs.{name}=DIR"
            )
        if bench.judge and not os.environ.get(key_env):
            plan.status = "skipped"
            plan.reason = f"GPT-judged benchmark: set ${key_env} to the judge's API key to run it"
        plans.append(plan)
    return plans


def task_file(bench: Benchmark, data_dir: str) -> dict:
    """The content of a local task file for ``bench`` reading ``data_dir``."""
    stock = stock_tasks_dir() / bench.stock_yaml
    if not stock.is_file():
        raise FileNotFoundError(f"stock lmms-eval task file not found: {stock}")
    return {
        "include": str(stock),
        "task": bench.task,
        "tag": [TAG],
        "dataset_path": str(Path(data_dir).resolve()),
        "dataset_kwargs": {"load_from_disk": True},
        **bench.extra,
    }


def write_task_files(plans: list[TaskPlan], folder: str | Path) -> Path:
    """Write ``<folder>/<task>.yaml`` for every ready plan; return the folder (an include path)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for plan in plans:
        if plan.status == "ready":
            content = task_file(BENCHMARKS[plan.name], plan.data_dir)
            (folder / f"{plan.task}.yaml").write_text(yaml.safe_dump(content, sort_keys=False))
    return folder
