"""The flows are wiring: no SQL of their own, no configuration changed in place, the detector's weights
passed on explicitly; cache keys from flows/keys.py over mgllava/lineage.py's digests."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from mgllava.config import ConfigError, load_config

FLOWS = Path(__file__).resolve().parents[1] / "flows"
SQL = re.compile(r"\bSELECT\b.+\bFROM\b|\bINSERT\s+(OR\s+\w+\s+)?INTO\b|\bUPDATE\s+\w+\s+SET\b|\bDELETE\s+FROM\b",
                 re.IGNORECASE | re.DOTALL)


def _assigned_roots(tree: ast.AST) -> set[str]:
    """The names at the root of every attribute or item assigned to (``config`` of ``config.a.b = ...``)."""
    roots = set()
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            while isinstance(target, (ast.Attribute, ast.Subscript)):
                target = target.value
                if isinstance(target, ast.Name):
                    roots.add(target.id)
    return roots


@pytest.mark.parametrize("path", sorted(FLOWS.glob("*.py")), ids=lambda p: p.name)
def test_flows_run_no_sql_and_change_no_config_in_place(path):
    tree = ast.parse(path.read_text())
    sql = [n.value[:40] for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
           and SQL.search(n.value)]
    assert not sql, f"{path.name} holds SQL (it belongs in warehouse/): {sql}"
    assert "config" not in _assigned_roots(tree), f"{path.name} changes a loaded configuration in place"


def test_detector_weights_are_the_configured_ones_or_a_clear_error(tmp_path):
    from flows.full_train import detector_weights

    weights = tmp_path / "det.pt"
    weights.write_bytes(b"weights")
    config = load_config(overrides=[f"work_dir={tmp_path}", f"detector.model={weights}"])
    before = config.model_dump()
    assert detector_weights(config, {}, logger=None) == str(weights)  # no training task when they exist
    assert config.model_dump() == before
    missing = load_config(overrides=[f"work_dir={tmp_path}", f"detector.model={tmp_path / 'none.pt'}",
                                     "detector.train.data=null"])
    with pytest.raises(ConfigError, match=r"'detector\.model': weights not found: .*none\.pt"):
        detector_weights(missing, {}, logger=None)


def test_cached_stages_are_keyed_by_where_they_write(tmp_path):
    """The ablation's full variant once got the demo's cached pretrain (same inputs, other directory) and its
    finetune found no pretrain weights in its own: a stage's cache key includes its output directory."""
    from flows.keys import evaluate_key, train_stage_key
    from mgllava.config import load_config
    from mgllava.lineage import train_key

    config = load_config(preset="tiny", overrides=[f"work_dir={tmp_path}"])
    variant = load_config(preset="tiny", overrides=[f"work_dir={tmp_path}",
                                                    f"train.output_dir={tmp_path}/train/ablation/all/seed-0"])
    assert train_key(config, "pretrain") == train_key(variant, "pretrain")  # the same inputs...
    assert train_stage_key(config, "pretrain") != train_stage_key(variant, "pretrain")  # ...written elsewhere
    assert train_stage_key(config, "pretrain") == train_stage_key(load_config(
        preset="tiny", overrides=[f"work_dir={tmp_path}"]), "pretrain")  # and stable
    for export in ("a", "b"):  # two exports with the same files
        (tmp_path / export).mkdir()
        (tmp_path / export / "config.json").write_text("{}")
    assert evaluate_key(config, str(tmp_path / "a")) != evaluate_key(config, str(tmp_path / "b"))


def test_a_cached_result_whose_files_are_gone_is_computed_again(tmp_path, monkeypatch):
    """A cached detector result named weights in a deleted directory and the flow failed on them: the flow's
    cached tasks are recomputed when a file their result names no longer exists."""
    import logging

    from prefect import task
    from prefect.testing.utilities import prefect_test_harness

    from flows.full_train import _run_cached

    calls = []

    @task(cache_key_fn=lambda context, parameters: parameters["key"], persist_result=True)
    def write(out: str, key: str) -> dict:
        calls.append(out)
        Path(out).write_text("weights")
        return {"weights": out}

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(tmp_path / "storage"))
    logger = logging.getLogger("test")
    out, key = str(tmp_path / "best.pt"), f"key-{tmp_path.name}"
    with prefect_test_harness(server_startup_timeout=180):
        def run():
            return _run_cached(write, "write", {}, logger, lambda r: [r["weights"]], out, key=key)

        assert run() == {"weights": out} and len(calls) == 1
        assert run() == {"weights": out} and len(calls) == 1  # cached: its file is there
        Path(out).unlink()
        assert run() == {"weights": out} and len(calls) == 2 and Path(out).exists()  # gone: computed again
