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
