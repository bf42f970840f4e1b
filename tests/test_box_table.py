"""detector.tables.BoxTable: lookup by any spelling of a key, schema and checksum refusals, one instance per table."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_warehouse import ROWS, write_box_table, write_manifest

from detector.errors import BoxTableError
from detector.tables import BoxTable
from mgllava.config import ConfigError


@pytest.fixture
def table_dir(tmp_path):
    out = tmp_path / "table"
    write_box_table(out, ROWS, [("e.png", "empty")])
    write_manifest(out)
    return out


def test_lookup_by_key_and_sha256_and_one_shared_instance(table_dir):
    table = BoxTable.open(table_dir)
    assert table.fingerprint == "fp" and len(table) == 4 and table.keys() == ["a.png", "b.png", "c.png", "d.png"]
    assert [d[5] for d in table.get("./a.png")] == ["circle", "circle", "star"]  # normalised like detection's keys
    assert table.get("b.png") == [] and "b.png" in table  # a row without boxes is not a missing row
    assert table.get("zzz.png") is None and table.get("../a.png") is None and "e.png" not in table  # a reject
    assert table.get_by_sha256("0" * 64) is not None and table.get_by_sha256("1" * 64) is None
    assert BoxTable.open(table_dir) is table  # training and every benchmark share one read


def test_other_schema_version_or_column_type_is_refused_naming_the_shard(table_dir):
    shard = table_dir / "boxes" / "part-00001.parquet"
    old = pq.read_table(shard)
    pq.write_table(old.replace_schema_metadata({b"mgllava.schema_version": b"0"}), shard)
    write_manifest(table_dir)  # checksums match: only the version is wrong
    with pytest.raises(BoxTableError, match=rf"^{shard}: box table schema version '0', this reader knows '1'$"):
        BoxTable.open(table_dir)
    retyped = old.set_column(old.schema.get_field_index("sha256"), "sha256", pa.array(range(old.num_rows)))
    pq.write_table(retyped.replace_schema_metadata(old.schema.metadata), shard)
    write_manifest(table_dir)
    with pytest.raises(BoxTableError, match=rf"^{shard}: not the box table schema 1 \(sha256 is int64\)$"):
        BoxTable.open(table_dir)


def test_tampered_shard_is_refused_by_every_reader_with_one_line(table_dir, tmp_path):
    from mgllava.train.job import load_boxes
    from warehouse.db import register_box_table

    BoxTable.open(table_dir)  # cached before the change: the cache must not hide it
    shard = table_dir / "rejects" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(BoxTableError) as refused:  # the warehouse's views: checked before they point at it
        register_box_table(table_dir, tmp_path / "w.duckdb")
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{shard}: content sha256 ") and "differs" in message
    assert not (tmp_path / "w.duckdb").exists()

    shard = table_dir / "boxes" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-1] + b"!")
    with pytest.raises(BoxTableError, match=rf"^{shard}: content sha256 .* differs"):  # evaluation's lookups
        BoxTable.open(table_dir)
    with pytest.raises(ConfigError, match=rf"^data\.boxes_dir={table_dir}: {shard}: content sha256"):  # training
        load_boxes(table_dir)
