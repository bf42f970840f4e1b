"""``mgllava detect import``: a box file in the reference's format (a JSON list of {id, boxes, scores,
labels}, original-image pixels, keyed by the LLaVA sample id), generated here with every kind of bad
entry, imported into a box table that the readers and training use like a detected one."""

from __future__ import annotations

import json

import duckdb
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from detector.box_import import import_boxes
from detector.tables import BoxTable
from mgllava.cli import main
from mgllava.config import ConfigError
from mgllava.model.boxes import map_boxes_to_frame
from mgllava.train.data import ConversationDataset
from mgllava.train.job import load_boxes

TURNS = [{"from": "human", "value": "<image>\nWhat is there?"}, {"from": "gpt", "value": "Shapes."}]


def _corpus(root):
    """Images (nested folder, JPEG and PNG, non-square) and a LLaVA corpus with string and integer ids."""
    (root / "images" / "coco" / "train2017").mkdir(parents=True)
    Image.new("RGB", (80, 40), "red").save(root / "images" / "coco" / "train2017" / "a.png")
    Image.new("L", (30, 50), 128).save(root / "images" / "b.jpg")
    Image.new("RGB", (20, 20), "blue").save(root / "images" / "c.png")
    records = [
        {"id": "a1", "image": "coco/train2017/a.png", "conversations": TURNS},
        {"id": 7, "image": "b.jpg", "conversations": TURNS},  # an integer id; the box file says "7"
        {"id": "c3", "image": "c.png", "conversations": TURNS},  # no box entry
        {"id": "t4", "conversations": TURNS},  # text only, yet the box file has an entry for it
        {"id": "d5", "image": "gone.png", "conversations": TURNS},  # no such file
        {"id": "e6", "image": "./coco/train2017/a.png", "conversations": TURNS},  # a.png again, other boxes
        {"id": "f7", "image": ["a.png", "b.jpg"], "conversations": TURNS},  # a list: malformed image field
        {"id": "g8", "image": "../../etc/passwd", "conversations": TURNS},  # leaves the image root
        {"image": "c.png", "conversations": TURNS},  # no id
        {"id": "h9", "image": "b.jpg", "conversations": TURNS},  # one id, two images: its entry is ambiguous
        {"id": "h9", "image": "c.png", "conversations": TURNS},
    ]
    (root / "corpus.json").write_text(json.dumps(records))
    return records


def _entry(sample_id, boxes, scores=None, labels=None):
    return {"id": sample_id, "boxes": boxes, "scores": [0.5] * len(boxes) if scores is None else scores,
            "labels": ["thing"] * len(boxes) if labels is None else labels}


BOX_FILE = [
    _entry("a1", [[0, 0, 1, 1]]),  # superseded by the later "a1" (the reference keeps the last)
    _entry("7", [[2, 3, 20, 30]], [0.8], ["grey square"]),
    _entry("t4", [[0, 0, 5, 5]]),
    _entry("d5", [[0, 0, 5, 5]]),
    _entry("e6", [[1, 1, 9, 9]]),
    _entry("f7", [[0, 0, 5, 5]]),
    _entry("g8", [[0, 0, 5, 5]]),
    _entry("h9", [[0, 0, 5, 5]]),
    _entry("zzz", [[0, 0, 5, 5]]),  # unknown ids
    _entry(12345, [[0, 0, 5, 5]]),
    _entry("bad1", [[1, 2, 3]]),  # malformed entries
    {"boxes": [], "scores": [], "labels": []},
    "not an object",
    {"id": "bad2", "boxes": [[0, 0, 1, 1]], "scores": [], "labels": []},
    _entry("bad3", [[0, 0, float("nan"), 1]]),
    _entry("bad4", [[0, 0, 1, 1]], [0.5], [3]),
    _entry(True, [[0, 0, 1, 1]]),
    # the entry used for a1: one box reaching into OWLv2's padding (clipped), one empty (dropped)
    _entry("a1", [[10, 5, 50, 35], [60, 20, 95, 45], [40, 10, 40, 30]], [0.4, 0.9, 0.7], ["car", "tree", "pole"]),
]


@pytest.fixture
def imported(tmp_path):
    records = _corpus(tmp_path)
    (tmp_path / "boxes.json").write_text(json.dumps(BOX_FILE))
    result = import_boxes(tmp_path / "boxes.json", tmp_path / "corpus.json", tmp_path / "images", tmp_path / "table")
    return tmp_path, records, result


def test_import_counts_reconcile_and_reader_sees_the_boxes(imported, fault_ledger):
    root, records, result = imported
    counts, totals = result.manifest["import"]["counts"], result.manifest["totals"]
    assert {k: counts[k] for k in ("entries", "matched", "unknown_id", "text_only_id", "ambiguous_id",
                                   "duplicate_id", "malformed")} == {
        "entries": 18, "matched": 6, "unknown_id": 2, "text_only_id": 1, "ambiguous_id": 1, "duplicate_id": 1,
        "malformed": 7}
    assert {k: counts[k] for k in ("records", "text_only_records", "records_with_entry", "records_without_entry")} == {
        "records": 11, "text_only_records": 1, "records_with_entry": 6, "records_without_entry": 4}
    assert (counts["images"], counts["shared_image_entries"], counts["conflicting_entries"]) == (5, 1, 1)
    assert (totals["images"], totals["rows"], totals["rejects"]) == (5, 2, 3)
    assert totals["reject_reasons"] == {"malformed_image_field": 1, "missing": 1, "path_escapes_root": 1}
    assert (counts["boxes_clipped"], counts["boxes_dropped_empty"]) == (1, 1)
    assert sorted(counts["examples"]["unknown_id"]) == ["12345", "zzz"]
    malformed = counts["examples"]["malformed"]
    assert len(malformed) == 7 and all(e.startswith("entry ") for e in malformed)
    assert "entry 10: id bad1: box 0 is not four finite numbers: [1, 2, 3]" in malformed
    assert sorted(counts["examples"]["records_without_entry"]) == [
        "id c3", "id h9", "id h9", "record 8: no text or integer 'id'"]
    assert counts["examples"]["ambiguous_id"] == ["h9: its records name b.jpg, c.png"]

    table = BoxTable.open(root / "table")  # checks the manifest's per-shard sha256 too
    assert table.get("coco/train2017/a.png") == [(60.0, 20.0, 80.0, 40.0, pytest.approx(0.9), "tree"),
                                                 (10.0, 5.0, 50.0, 35.0, pytest.approx(0.4), "car")]
    assert table.get("b.jpg") == [(2.0, 3.0, 20.0, 30.0, pytest.approx(0.8), "grey square")]
    rows = pq.read_table(root / "table" / "boxes").to_pylist()
    assert {(r["image_key"], r["width"], r["height"]) for r in rows} == {("coco/train2017/a.png", 80, 40),
                                                                         ("b.jpg", 30, 50)}
    assert {r["detector"] for r in rows} == {"import:boxes.json"}
    assert result.manifest["detector"]["weights_sha256"] == __import__("hashlib").sha256(
        (root / "boxes.json").read_bytes()).hexdigest()
    for fault in ("unknown ids", "malformed entries", "list image field", "image path leaving the root",
                  "duplicate id", "id of a text-only record", "id naming two images"):
        fault_ledger.record(f"detect import: {fault}", survived=True)


def test_imported_boxes_reach_a_training_sample_and_train(imported, tiny_config):
    from mgllava.model import MGLLaVAForConditionalGeneration, MGLLaVAProcessor
    from mgllava.train.data import Collate

    root, records, _ = imported
    boxes = load_boxes(root / "table")
    processor = MGLLaVAProcessor.from_config(tiny_config.model)
    dataset = ConversationDataset(records, root / "images", boxes, processor)
    sample = dataset[1]  # id 7, b.jpg (30 x 50, greyscale JPEG)
    expected = map_boxes_to_frame(torch.tensor([[2.0, 3.0, 20.0, 30.0]]), 30, 50, processor.high_res)
    assert torch.allclose(sample["boxes"][0], expected, atol=1.0)
    assert len(dataset[0]["boxes"][0]) == 2  # a1's two boxes after the filter

    # one pretrain step on the imported boxes: the box projector learns from them
    torch.manual_seed(0)
    model = MGLLaVAForConditionalGeneration.from_config(tiny_config.model)
    model.set_stage("pretrain")
    batch = Collate(processor)([dataset[0], dataset[1], dataset[4]])  # a1, 7 and a missing image
    assert [s.reason for s in batch.pop("skipped")] == ["missing"]
    batch.pop("n_tokens")
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.box_projector[0].weight.grad.abs().sum() > 0


def test_cli_imports_then_skips_and_refuses_a_broken_file(tmp_path, capsys, fault_ledger):
    _corpus(tmp_path)
    (tmp_path / "boxes.json").write_text(json.dumps(BOX_FILE))
    args = ["detect", "import", "--boxes", str(tmp_path / "boxes.json"), "--corpus", str(tmp_path / "corpus.json"),
            "--image-root", str(tmp_path / "images"), "--out", str(tmp_path / "table"),
            "--warehouse", str(tmp_path / "warehouse.duckdb")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "18 entries: 6 matched, 2 unknown ids" in out and "unknown_id: zzz; 12345" in out
    with duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True) as con:  # recorded like a detection
        assert con.execute("SELECT detector, n_images, n_rows, n_rejects FROM box_runs").fetchall() == [
            ("import:boxes.json", 5, 2, 3)]
        assert con.execute("SELECT count(*) FROM box_detections").fetchone() == (3,)
    assert main(args) == 0 and "already imported, skipped" in capsys.readouterr().out

    (tmp_path / "boxes.json").write_text(json.dumps({"id": "a1"}))
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "boxes.json" in errors[0] and "JSON list" in errors[0]
    (tmp_path / "boxes.json").write_text(json.dumps([_entry("nobody", [[0, 0, 1, 1]])]))
    assert main(args) == 2 and "none of its 1 entries matches" in capsys.readouterr().err
    BoxTable.open(tmp_path / "table")  # the earlier table is untouched by the refused imports
    fault_ledger.record("detect import: box file that is not a list", survived=True)
    fault_ledger.record("detect import: box file for another corpus", survived=True)


def test_import_that_dies_midway_is_refused_until_redone(tmp_path, monkeypatch, fault_ledger):
    import detector.box_import as box_import
    from detector.errors import BoxTableError

    _corpus(tmp_path)
    (tmp_path / "boxes.json").write_text(json.dumps(BOX_FILE))
    args = (tmp_path / "boxes.json", tmp_path / "corpus.json", tmp_path / "images", tmp_path / "table")
    real_rows = box_import._rows

    def dies_at_shard_3(table, keys, index, *rest):
        if index == 3:
            raise KeyboardInterrupt("killed")
        return real_rows(table, keys, index, *rest)

    monkeypatch.setattr(box_import, "_rows", dies_at_shard_3)
    with pytest.raises(KeyboardInterrupt):
        import_boxes(*args, shard_size=1)
    with pytest.raises(BoxTableError, match="not finished"):
        BoxTable.open(tmp_path / "table")
    with pytest.raises(ConfigError, match=r"data\.boxes_dir=.*not finished"):  # training: one configuration error
        load_boxes(tmp_path / "table")
    monkeypatch.setattr(box_import, "_rows", real_rows)
    redone = import_boxes(*args, shard_size=1)
    assert not redone.skipped and redone.manifest["totals"]["rows"] == 2
    assert len(BoxTable.open(tmp_path / "table")) == 2
    fault_ledger.record("detect import: killed between shards, then rerun", survived=True, rows_lost=0)


def test_finished_import_with_a_damaged_shard_is_redone_not_skipped(tmp_path, caplog):
    _corpus(tmp_path)
    (tmp_path / "boxes.json").write_text(json.dumps(BOX_FILE))
    args = (tmp_path / "boxes.json", tmp_path / "corpus.json", tmp_path / "images", tmp_path / "table")
    first = import_boxes(*args)
    shard = tmp_path / "table" / "boxes" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-1] + b"!")
    again = import_boxes(*args)
    assert not again.skipped and f"{shard}: content sha256" in caplog.text
    assert again.manifest["totals"] == first.manifest["totals"] and len(BoxTable.open(tmp_path / "table")) == 2
    assert import_boxes(*args).skipped  # whole again: skipped
