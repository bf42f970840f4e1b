"""The paper's ablation: variants as configuration, slices in the benchmark records, the comparison."""

from __future__ import annotations

from pathlib import Path

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
    from warehouse.ablation import ABLATION_SQL, COLUMNS, ablation_table, record_variant
    from warehouse.eval import read_only_query

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
    documented = Path(__file__).parents[1].joinpath("docs", "warehouse.md").read_text().split("## Ablation")[1]
    documented = documented.split("```sql\n")[1].split("```")[0]
    assert documented.strip() == ABLATION_SQL + ";"  # docs/warehouse.md shows the query the code runs
    columns, found = read_only_query(documented, db_path=db)
    assert [dict(zip(columns, row)) for row in found] == rows
    table = comparison_markdown(rows)
    assert "| gqa | object:small | 4 | 0.250 ± 0.217 | 0.750 ± 0.217 (+0.500 ± 0.306) |" in table
    assert comparison_chart(rows, tmp_path / "ablation.png").stat().st_size > 1000


def test_variant_overrides_change_only_the_variant_seed_and_output() -> None:
    from mgllava.ablation import parse_variants, variant_overrides

    base = load_config()
    config = load_config(overrides=variant_overrides(base, "low+objects", 3))
    assert config.model.granularities == ["low", "objects"] and config.train.seed == 3
    assert config.train.output_dir == f"{base.train.output_dir}/ablation/low+objects/seed-3"
    changed = {k for k, v in config.model_dump().items() if v != base.model_dump()[k]}
    assert changed == {"model", "train"}
    assert config.model.model_copy(update={"granularities": base.model.granularities}) == base.model
    assert parse_variants("low+high+objects") == ["low", "low+high+objects"]  # the baseline always runs
    with pytest.raises(ValueError, match="unknown variant"):
        parse_variants(["low", "high"])


@pytest.mark.slow
def test_miniature_ablation_of_two_variants(tiny_world, tiny_zoo, tmp_path, capsys, monkeypatch) -> None:
    """`mgllava ablate` (the ablate flow) on two variants: the shared stages once, each variant trained and
    evaluated on the same questions, its export recording the variant, the table in the warehouse."""
    import json

    from conftest import tiny_overrides
    from prefect.testing.utilities import prefect_test_harness

    from mgllava.cli import main
    from warehouse.ablation import ablation_table
    from warehouse.db import connect

    overrides = [*tiny_overrides(tiny_world, tiny_zoo, tmp_path / "work"), "shapes=null",  # the session's kit
                 "detector.train.epochs=1", "detector.train.min_map50=0", "detector.conf=0.01",
                 "train.pretrain.max_steps=2", "train.finetune.max_steps=2", "eval.limit=6"]
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with prefect_test_harness(server_startup_timeout=180):
        code = main(["ablate", "--variants", "low+high+objects", "--benchmarks", "pope",
                     *(arg for item in overrides for arg in ("--set", item))])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| benchmark | slice | n | low | low+high+objects |" in out
    rows = ablation_table()
    by = {(r["variant"], r["benchmark"], r["slice"]): r for r in rows}
    assert by[("low", "pope", "all")]["n"] == by[("low+high+objects", "pope", "all")]["n"] == 6
    full = by[("low+high+objects", "pope", "all")]
    assert full["delta"] == pytest.approx(full["accuracy"] - by[("low", "pope", "all")]["accuracy"])
    with connect(read_only=True) as con:
        variants = con.execute("SELECT variant, granularities, checkpoint FROM ablation_variants ORDER BY variant").fetchall()
        detectors = con.execute("SELECT count(*) FROM box_runs").fetchone()[0]
        stages = con.execute("SELECT stage, count(*), min(steps), max(steps) FROM train_stages "
                             "WHERE status = 'completed' GROUP BY stage ORDER BY stage").fetchall()
    assert [v[0] for v in variants] == ["low", "low+high+objects"] and detectors == 1  # one box table for both
    assert [stage for stage, n, fewest, most in stages if n == 2 and fewest == most] == ["finetune", "pretrain"]
    for _, granularities, checkpoint in variants:  # each export records its variant
        assert json.loads((Path(checkpoint) / "config.json").read_text())["granularities"] == json.loads(granularities)


@pytest.mark.slow  # builds, trains a step and exports a tiny model per variant
@pytest.mark.parametrize("variant", ["low", "low+high", "low+objects"])
def test_a_variant_builds_trains_exports_and_loads(tiny_config, tmp_path, variant) -> None:
    """The variant has exactly its modules and object tokens, trains them, and its export records it."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mgllava.ablation import VARIANTS
    from mgllava.model import OBJECT_TOKEN_INDEX, Boxes, MGLLaVAForConditionalGeneration, MGLLaVAProcessor

    granularities = list(VARIANTS[variant])
    config = tiny_config.model.model_copy(update={"granularities": granularities})
    torch.manual_seed(0)
    model = MGLLaVAForConditionalGeneration.from_config(config)
    processor = MGLLaVAProcessor.from_config(config)
    assert (model.fusion is not None, model.box_projector is not None) == ("high" in granularities,
                                                                          "objects" in granularities)
    image = Image.new("RGB", (120, 90), (200, 40, 40))
    boxes = Boxes([[10, 10, 60, 50], [70, 20, 110, 80]], ["square", "circle"], [0.9, 0.8])
    record = processor([("human", "<image>\nWhat shapes?"), ("gpt", "A red square.")], [image], [boxes])
    assert int((record["input_ids"] == OBJECT_TOKEN_INDEX).sum()) == (2 if "objects" in granularities else 0)
    batch = processor.collate([record])
    model.set_stage("finetune")
    trained = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert {name.split(".")[0] for name in trained} == {"llm", "projector"} | (
        {"fusion"} if "high" in granularities else set()) | ({"box_projector"} if "objects" in granularities else set())
    convnext_calls = []
    model.high_res_encoder.register_forward_hook(lambda *args: convnext_calls.append(1))
    frozen = model.encode_frozen(batch["pixel_values"], batch["boxes"])  # only what the variant reads
    assert len(convnext_calls) == (0 if variant == "low" else 1)
    assert (frozen.high_map is not None) == ("high" in granularities)
    assert [len(f) for f in frozen.box_features] == [2 if "objects" in granularities else 0]
    cached = processor.with_image_features([("human", "<image>\nWhat shapes?"), ("gpt", "A red square.")],
                                           frozen.unbind())
    assert torch.equal(cached["input_ids"], record["input_ids"])  # cached features expand the same placeholders
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(**batch).loss.backward()
    optimizer.step()
    assert not torch.equal(model.projector[0].weight, trained["projector.0.weight"])  # it trains
    model.eval()
    export = model.export(tmp_path / "export", processor)
    loaded = AutoModelForImageTextToText.from_pretrained(export).eval()
    assert loaded.config.granularities == granularities
    assert AutoProcessor.from_pretrained(export).object_tokens == ("objects" in granularities)
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, model(**batch).logits, atol=1e-5)
