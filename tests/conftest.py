"""Shared test set-up: offline everywhere, a private MGLLAVA_HOME, and the tiny world and zoo."""

from __future__ import annotations

import os

# nothing in the tests may try to reach a hub or phone home
for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "YOLO_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _private_home(tmp_path_factory, monkeypatch):
    """Each test sees its own MGLLAVA_HOME, so nothing touches ~/.mgllava."""
    monkeypatch.setenv("MGLLAVA_HOME", str(tmp_path_factory.mktemp("mgllava_home")))


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A small shapes world (30 images), generated once per test session."""
    from mgllava.shapes.world import generate_world

    return generate_world(tmp_path_factory.mktemp("tiny") / "world", n_images=30, seed=0, progress=False)


TINY_TOWER_SCENES = 16
"""Vision-tower pretraining in the test zoos: a few scenes, so the code path runs, fast."""


@pytest.fixture(scope="session")
def tiny_zoo(tiny_world):
    """The tiny model zoo built on :func:`tiny_world` at the tiny preset's sizes."""
    from mgllava.config import ZooConfig, load_config
    from mgllava.shapes.zoo import build_zoo

    model = load_config(preset="tiny").model
    return build_zoo(
        tiny_world.parent / "zoo",
        tiny_world,
        high_res=model.vision.high_res,
        low_res=model.vision.low_res,
        max_length=model.max_length,
        recipe=ZooConfig(tower_scenes=TINY_TOWER_SCENES, tower_epochs=1),
    )


def tiny_overrides(world, zoo, work_dir) -> list[str]:
    """``--set`` overrides that point the tiny preset at a test's world, zoo and work directory."""
    return [
        f"work_dir={work_dir}",
        f"shapes.world.dir={world}",
        f"detector.train.data={world}/data.yaml",
        *(f"eval.data_dirs.{name}={world}/bench/{name}" for name in ("pope", "mmbench", "textvqa", "gqa")),
        f"data.image_root={world}/images",
        f"data.pretrain_json={world}/pretrain.json",
        f"data.finetune_json={world}/instruct.json",
        f"model.llm.path={zoo}/llm",
        f"model.vision.clip_path={zoo}/clip",
        f"model.vision.convnext_path={zoo}/convnext",
    ]


@pytest.fixture
def tiny_config(tiny_world, tiny_zoo, tmp_path):
    """The tiny preset on the session's world and zoo, writing under this test's tmp_path."""
    from mgllava.config import load_config

    return load_config(overrides=tiny_overrides(tiny_world, tiny_zoo, tmp_path / "work"))


class FaultLedger:
    """Tally of the fault-injection and hostile-input tests, printed at the end of the run.

    A test records each fault it injected (a kill -9, a corrupt file, a hostile input), whether the
    pipeline survived it (recovered, or refused it with a clear error), and how many rows it lost.
    """

    def __init__(self):
        self.rows: list[tuple[str, bool, int]] = []

    def record(self, fault: str, survived: bool, rows_lost: int = 0) -> None:
        self.rows.append((fault, bool(survived), int(rows_lost)))

    def totals(self) -> dict:
        return {
            "faults_injected": len(self.rows),
            "survived": sum(s for _, s, _ in self.rows),
            "rows_lost": sum(n for _, _, n in self.rows),
        }


_LEDGER = FaultLedger()


@pytest.fixture(scope="session")
def fault_ledger() -> FaultLedger:
    return _LEDGER


def pytest_terminal_summary(terminalreporter):
    if _LEDGER.rows:
        t = _LEDGER.totals()
        terminalreporter.write_line(
            f"fault injection: {t['faults_injected']} faults injected, {t['survived']} survived, "
            f"{t['rows_lost']} rows lost"
        )


@pytest.fixture(scope="module")
def prefect_server():
    """A temporary Prefect server for the flows of one test module."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def boxy(tmp_path_factory):
    """yolo11n with random weights and a raised class bias: it 'detects' boxes everywhere."""
    import torch
    from ultralytics import YOLO

    torch.manual_seed(0)
    model = YOLO("yolo11n.yaml")
    with torch.no_grad():
        for seq in model.model.model[-1].cv3:  # classes 0-4 score high everywhere, the others stay near 0
            seq[-1].bias[:5] = 3.0
    path = tmp_path_factory.mktemp("weights") / "boxy.pt"
    model.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def exported(tiny_world, tiny_zoo, tmp_path_factory):
    """An untrained tiny MG-LLaVA, exported (the pipeline does not need a trained one)."""
    from mgllava.config import load_config
    from mgllava.model import MGLLaVAForConditionalGeneration, MGLLaVAProcessor

    config = load_config(overrides=tiny_overrides(tiny_world, tiny_zoo, tmp_path_factory.mktemp("w")))
    model = MGLLaVAForConditionalGeneration.from_config(config.model)
    return str(model.export(tmp_path_factory.mktemp("export") / "model", MGLLaVAProcessor.from_config(config.model)))


@pytest.fixture
def sleeper():
    """A live process that `up` did not start (its own process group, as `up`'s children are)."""
    import subprocess

    process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield process
    process.kill()
    process.wait()
