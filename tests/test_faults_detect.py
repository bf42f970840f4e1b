"""Fault injection for detection: a detect process killed with SIGKILL at several points, then restarted,
writes exactly the rows of an uninterrupted run; nothing partial is ever visible under a ``*.parquet`` name,
and readers refuse the table until it is finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_detect import make_images, settings
from test_detect_flow import _same, _table

from detector import pipeline
from detector.errors import BoxTableError
from detector.tables import BoxTable

pytestmark = pytest.mark.slow  # each killed run is a fresh Python process importing torch and Ultralytics

REPO = Path(__file__).resolve().parents[1]
SHARD_SIZE = 4  # 20 images: 5 shards; batch 2: two detector calls per shard

# Runs detection in a child process and SIGKILLs itself at the point named by argv[5]:
#   predict:N         the N-th detector call (mid-shard)
#   rename:SUFFIX:N   the N-th rename onto a path ending in SUFFIX (its temporary file written, not renamed)
#   slow              no self-kill; each detector call sleeps, so the test can kill it from outside
CHILD = r"""
import json, os, signal, sys, time
from detector import model, pipeline

out, images, settings, shard_size, point = sys.argv[1:6]
calls = [0]

def count_and_maybe_die(nth):
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)

kind, _, arg = point.partition(":")
if kind == "predict":
    real_predict = model.Detector.predict
    def predict(self, images):
        count_and_maybe_die(int(arg))
        return real_predict(self, images)
    model.Detector.predict = predict
elif kind == "rename":
    suffix, nth = arg.rsplit(":", 1)
    real_replace = os.replace
    def replace(src, dst):
        if str(dst).endswith(suffix):
            count_and_maybe_die(int(nth))
        real_replace(src, dst)
    os.replace = replace
elif kind == "slow":
    real_predict = model.Detector.predict
    def predict(self, images):
        time.sleep(0.3)
        return real_predict(self, images)
    model.Detector.predict = predict
pipeline.run_detection([images], out, pipeline.settings_from_manifest({"settings": json.loads(settings)}),
                       shard_size=int(shard_size))
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, boxy):
    """20 images (one of them an empty file, i.e. a reject) and the box table of an uninterrupted run."""
    root = tmp_path_factory.mktemp("faults")
    images = root / "images"
    make_images(images, 19)
    (images / "empty.png").write_bytes(b"")
    s = settings(boxy, batch=2)
    ref = pipeline.run_detection([images], root / "reference", s, shard_size=SHARD_SIZE)
    assert ref.manifest["totals"]["images"] == 20 and ref.manifest["totals"]["boxes"] > 0
    return images, s, root / "reference", ref.manifest


def _start(out: Path, images: Path, s, point: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [str(out), str(images), json.dumps(s.to_json()), str(SHARD_SIZE), point]
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _assert_nothing_partial_visible(out: Path) -> None:
    """Every ``*.parquet`` parses whole; the unfinished table is refused by readers."""
    for path in out.rglob("*.parquet"):
        pq.read_table(path)
    with pytest.raises(BoxTableError, match="not finished"):
        BoxTable.open(out)


def _restart_and_compare(out: Path, images: Path, s, reference: Path, ref_manifest: dict, fault: str, ledger):
    res = pipeline.run_detection([images], out, s, shard_size=SHARD_SIZE)
    got = _table(out)
    keys = [row["image_key"] for row in got[0]] + [row["image_key"] for row in got[1]]
    ref_keys = {row["image_key"] for rows in _table(reference) for row in rows}
    lost = len(ref_keys - set(keys)) + len(keys) - len(set(keys))
    ledger.record(f"kill -9 detection: {fault}", survived=lost == 0, rows_lost=lost)
    assert lost == 0 and len(keys) == 20
    _same(got, _table(reference))
    t = res.manifest["totals"]
    assert t == ref_manifest["totals"] and t["rows"] + t["rejects"] == res.manifest["inputs"]["distinct_images"]
    assert not [p for p in out.rglob("*") if pipeline.TMP_MARK in p.name]
    assert len(BoxTable.open(out)) == t["rows"]
    return res


@pytest.mark.parametrize(
    ("fault", "point", "done_before_restart"),
    [
        ("mid-shard (shard 1's first detector call)", "predict:3", [0]),
        ("between a shard's writes (rejects renamed, boxes written to a temporary file)",
         "rename:boxes/part-00002.parquet:1", [0, 1]),
        ("after a shard's files, before its record", "rename:shards/part-00001.json:1", [0]),
        ("mid-manifest write (finishing the run)", "rename:manifest.json:2", [0, 1, 2, 3, 4]),
    ],
)
def test_killed_detection_resumes_to_the_uninterrupted_table(tmp_path, corpus, fault_ledger, fault, point,
                                                              done_before_restart):
    images, s, reference, ref_manifest = corpus
    out = tmp_path / "out"
    child = _start(out, images, s, point)
    _, err = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, err[-2000:]
    done = [i for i in range(5) if pipeline.shard_done(out, i, ref_manifest["fingerprint"])]
    if point.startswith("predict"):  # the shard before is written beside this detection: its write may be cut
        done_before_restart = done_before_restart if done == done_before_restart else done_before_restart[:-1]
    assert done == done_before_restart
    _assert_nothing_partial_visible(out)
    if point.startswith("rename:boxes"):  # the killed write's temporary file is there, under a hidden name
        assert [p.name for p in (out / "boxes").iterdir() if pipeline.TMP_MARK in p.name]
    res = _restart_and_compare(out, images, s, reference, ref_manifest, fault, fault_ledger)
    assert res.computed_shards == [i for i in range(5) if i not in done_before_restart]


def test_detection_killed_from_outside_resumes(tmp_path, corpus, fault_ledger):
    images, s, reference, ref_manifest = corpus
    out = tmp_path / "out"
    child = _start(out, images, s, "slow")
    deadline = time.monotonic() + 240
    while not (out / pipeline.shard_record(1)).exists():  # two shards written, three to go
        assert child.poll() is None and time.monotonic() < deadline, "the detection ended before it could be killed"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    _assert_nothing_partial_visible(out)
    res = _restart_and_compare(out, images, s, reference, ref_manifest, "from outside, after 2 of 5 shards",
                               fault_ledger)
    assert 0 < len(res.computed_shards) < 5
