"""The paper's ablation: variants as configuration, slices in the benchmark records, the comparison."""

from __future__ import annotations

import datasets
import pytest

from mgllava.config import ConfigError, load_config
from mgllava.shapes.world.benchmarks import BENCHMARKS, SPLITS
from mgllava.shapes.world.generate import load_annotations


def test_granularities_are_validated_and_canonical() -> None:
    assert load_config().model.granularities == ["low", "high", "objects"]
    assert load_config(overrides=["model.granularities=[objects,low]"]).model.granularities == ["low", "objects"]
    for bad, says in (("[high,objects]", "lacks 'low'"), ("[low,low]", "twice"), ("[low,pixels]", "granularities")):
        with pytest.raises(ConfigError, match=says):
            load_config(overrides=[f"model.granularities={bad}"])


def test_benchmark_records_carry_their_slice(tiny_world) -> None:
    """Every question names the size class of the object asked about (or none) and whether it reads the number."""
    sizes = {ann["image"]: {o["size"] for o in ann["objects"]} for ann in load_annotations(tiny_world, "bench")}
    seen = set()
    for name in BENCHMARKS:
        table = datasets.load_from_disk(str(tiny_world / "bench" / name))[SPLITS[name]]
        assert {"object_size", "small_text"} <= set(table.column_names)
        key_column = {"pope": "image_source", "textvqa": "image_id", "gqa": "imageId"}.get(name)
        for row in table.remove_columns("image"):
            assert row["object_size"] in (None, "small", "medium", "large")
            if key_column:  # the size asked about is one of that image's objects' sizes
                assert row["object_size"] is None or row["object_size"] in sizes[row[key_column]]
            if name == "textvqa":
                assert row["small_text"] and row["object_size"] is None
            elif name in ("pope", "gqa"):
                assert not row["small_text"]
                # a yes/no existence question about an absent shape is about no object
                if row.get("answer") == "no" and row["question"].startswith("Is there"):
                    assert row["object_size"] is None
            seen.add((name, row["object_size"], row["small_text"]))
    assert {("pope", "small", False), ("gqa", "large", False), ("textvqa", None, True)} <= seen


def _evaluated(db, checkpoint: str, task: str, answers: list[tuple[float, str | None, bool | None]]) -> None:
    """Store one benchmark's outcome with per-question scores and slices, as an evaluation does."""
    from warehouse.eval import write_task_result

    predictions = [{"doc_id": i, "score": score, "n_boxes": 1, "question": "q", "prompt": "p", "target": "t",
                    "prediction": "a", "box_origin": "table", "object_size": size, "small_text": text}
                   for i, (score, size, text) in enumerate(answers)]
    write_task_result("run", checkpoint, {"name": task, "task": task, "status": "completed", "n": len(answers),
                                          "metrics": {"acc": 0.0}, "predictions": predictions, "seconds": 1.0},
                      db_path=db)


def test_the_documented_query_gives_deltas_and_standard_errors(tmp_path) -> None:
    from mgllava.ablation import comparison_chart, comparison_markdown
    from warehouse.ablation import COLUMNS, ablation_table, record_variant

    db, config = tmp_path / "w.duckdb", load_config()
    small, text = ("small", False), (None, True)
    # baseline: 1 of 4 small-object questions, 1 of 2 text ones; full model: 3 of 4 and 1 of 2
    _evaluated(db, "/x/low", "gqa", [(1.0, *small), (0.0, *small), (0.0, *small), (0.0, *small),
                                     (1.0, *text), (0.0, *text)])
    _evaluated(db, "/x/full", "gqa", [(1.0, *small), (1.0, *small), (1.0, *small), (0.0, *small),
                                      (0.0, *text), (1.0, *text)])
    _evaluated(db, "/x/other", "gqa", [(1.0, *small)] * 6)  # not in the ablation
    record_variant("ab", "low", ["low"], 0, "low", "/x/low", config, db_path=db)
    record_variant("ab", "low+high+objects", ["low", "high", "objects"], 0, "low", "/x/full", config, db_path=db)
    rows = ablation_table(db_path=db)  # the latest ablation
    assert rows and list(rows[0]) == COLUMNS
    by = {(r["variant"], r["benchmark"], r["slice"]): r for r in rows}
    full_small = by[("low+high+objects", "gqa", "object:small")]
    assert (full_small["n"], full_small["accuracy"], full_small["delta"]) == (4, 0.75, 0.5)
    assert full_small["delta_se"] == pytest.approx(((0.75 * 0.25 + 0.25 * 0.75) / 4) ** 0.5)
    assert by[("low+high+objects", "gqa", "small text")]["delta"] == 0.0
    assert by[("low", "gqa", "all")]["n"] == 6 and by[("low", "gqa", "all")]["delta"] is None  # the baseline
    assert by[("low+high+objects", "(all)", "all")]["accuracy"] == pytest.approx(4 / 6)
    assert {r["variant"] for r in rows} == {"low", "low+high+objects"}
    table = comparison_markdown(rows)
    assert "| gqa | object:small | 4 | 0.250 ± 0.217 | 0.750 ± 0.217 (+0.500 ± 0.306) |" in table
    assert comparison_chart(rows, tmp_path / "ablation.png").stat().st_size > 1000
