"""Hostile image inputs: one key normaliser and one image loader for detection, training and evaluation.

A corpus may name files outside the image root (``..``, absolute paths, symbolic links), hold an
``image`` that is not a path (a list, a number), or point at decompression bombs. Detection and
training must refuse each the same way, with the same reason, and count it.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from collections import Counter

import pytest
from PIL import Image

from detector.images import decode_image, load_image
from detector.inputs import collect_inputs
from detector.keys import KeyRefused, normalize_key
from detector.schema import REJECT_REASONS

CONVERSATION = [{"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": "shapes"}]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def greyscale_png(width: int, height: int, full: bool) -> bytes:
    """A greyscale PNG of ``width`` x ``height``: with every (black) row when ``full`` (a real
    decompression bomb: tiny file, huge image), else only a header and a few bytes of data."""
    stream = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte + pixels
    data = b"".join(stream.compress(row) for _ in range(height if full else 1)) + stream.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An image root with good images (RGB, CMYK, greyscale, palette), bombs, a truncated file and a
    link out of the root; a secret image lies outside it."""
    base = tmp_path_factory.mktemp("hostile")
    root, img = base / "root", base / "root" / "img"
    img.mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(img / "a.png")
    Image.new("RGB", (32, 32), (30, 200, 30)).save(img / "b.png")
    Image.new("CMYK", (24, 16), (0, 120, 200, 10)).save(img / "cmyk.jpg")
    Image.new("L", (20, 20), 128).save(img / "grey.png")
    Image.new("P", (16, 24), 3).save(img / "palette.gif")
    (img / "header_bomb.png").write_bytes(greyscale_png(100_000, 100_000, full=False))
    (img / "bomb.png").write_bytes(greyscale_png(12_000, 12_000, full=True))
    good = (img / "a.png").read_bytes()
    (img / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (8, 8), (1, 2, 3)).save(base / "secret.png")
    (img / "link.png").symlink_to(base / "secret.png")
    return root


# image value -> (detection's reason or None for a box row, training's reason or None for a sample)
CASES = {
    "./img/a.png": (None, None),
    "img//b.png": (None, None),
    "img/cmyk.jpg": (None, None),
    "img\\grey.png": (None, None),
    "img/palette.gif": (None, None),
    "../../../etc/passwd": ("path_escapes_root", "path_escapes_root"),
    "img/../../secret.png": ("path_escapes_root", "path_escapes_root"),
    "img/link.png": ("path_escapes_root", "path_escapes_root"),
    "img/header_bomb.png": ("too_large", "too_large"),
    "img/bomb.png": ("too_large", "too_large"),
    "img/truncated.png": ("truncated", "truncated"),
    "/etc/passwd": ("absolute_path", "absolute_path"),
    7: ("malformed_image_field", "malformed_image_field"),
    "": ("malformed_image_field", "malformed_image_field"),
    (("path", "img/a.png"),): ("malformed_image_field", "malformed_image_field"),  # a JSON object
}


def _value(case):
    return dict(case) if isinstance(case, tuple) else case


def write_corpus(path, values) -> None:
    records = [{"id": f"r{i}", "image": _value(v), "conversations": CONVERSATION} for i, v in enumerate(values)]
    path.write_text(json.dumps(records))


# --------------------------------------------------------------------------- the normaliser


@pytest.mark.parametrize("value", ["./img/a.png", "img//a.png", "img\\a.png", " img/./a.png", "img/x/../a.png"])
def test_spellings_of_one_path_give_one_key(value):
    assert normalize_key(value) == "img/a.png"


@pytest.mark.parametrize("value, reason", [
    ("../../../etc/passwd", "path_escapes_root"), ("img/../../x.png", "path_escapes_root"), ("..", "path_escapes_root"),
    ("/etc/passwd", "absolute_path"), ("\\etc\\passwd", "absolute_path"),
    (["img/a.png"], "malformed_image_field"), (7, "malformed_image_field"), ({}, "malformed_image_field"),
    ("", "malformed_image_field"), ("img/a\0.png", "malformed_image_field"),
])
def test_hostile_values_are_refused_with_a_reason(value, reason):
    refused = normalize_key(value)
    assert isinstance(refused, KeyRefused) and refused.reason == reason and refused.detail
    assert reason in REJECT_REASONS  # detection's rejects table knows the reason


def test_allowing_absolute_paths_keeps_refusing_dot_dot():
    assert normalize_key("/data//coco/a.png", allow_absolute=True) == "/data/coco/a.png"
    assert normalize_key("../a.png", allow_absolute=True).reason == "path_escapes_root"


# --------------------------------------------------------------------------- detection and training agree


@pytest.mark.slow
def test_detection_and_training_refuse_the_same_images_for_the_same_reasons(world, tmp_path, fault_ledger):
    from detector.model import DetectorSettings
    from detector.pipeline import run_detection
    from detector.tables import BoxTable
    from mgllava.train.data import ConversationDataset, Skipped, load_conversations

    corpus = tmp_path / "corpus.json"
    write_corpus(corpus, list(CASES))
    res = run_detection([corpus], tmp_path / "boxes", DetectorSettings(model="yolo11n.yaml", conf=0.99, imgsz=64,
                                                                       device="cpu"), image_root=world)
    totals = res.manifest["totals"]
    assert totals["rows"] + totals["rejects"] == res.manifest["inputs"]["distinct_images"] == len(CASES)
    assert totals["rows"] == 5  # a.png, b.png, cmyk.jpg, grey.png, palette.gif
    by_key = dict(BoxTable.open(tmp_path / "boxes").items())
    assert sorted(by_key) == ["img/a.png", "img/b.png", "img/cmyk.jpg", "img/grey.png", "img/palette.gif"]

    records, report = load_conversations(corpus)
    assert report.kept + sum(report.rejected.values()) == report.records == len(CASES)
    dataset = ConversationDataset(records, world, by_key, processor=None)
    # ./img/a.png and img//b.png find detection's rows; only the images both refuse have none
    assert dataset.keys_without_boxes == ["img/bomb.png", "img/header_bomb.png", "img/link.png", "img/truncated.png"]
    training = Counter(report.rejected)
    for i in range(len(records)):
        found = dataset.load_image(dataset.keys[i], records[i]["id"])
        if isinstance(found, Skipped):
            training[found.reason] += 1
        else:
            assert found.mode == "RGB"  # CMYK, greyscale and palette images too
    # evaluation looks the same key up in the box table under any spelling
    from mgllava.eval.boxes import BoxSource, ImageRef

    spelled = ImageRef(Image.new("RGB", (4, 4)), keys=("./img//a.png",))
    assert [origin for _, origin in BoxSource(tmp_path / "boxes").boxes([spelled])] == ["table"]

    detection = Counter(res.manifest["totals"]["reject_reasons"])
    expected = Counter(reason for reason, _ in CASES.values() if reason)
    assert detection == training == expected
    for case, (reason, _) in CASES.items():
        if reason:
            fault_ledger.record(f"hostile image {str(_value(case))[:40]!r}: {reason}", survived=True)


def test_list_valued_image_is_a_record_reject_in_training(tmp_path, fault_ledger, caplog):
    from mgllava.train.data import load_conversations

    corpus = tmp_path / "corpus.json"
    write_corpus(corpus, [["img/a.png"], "img/a.png"])
    records, report = load_conversations(corpus)
    assert [r["id"] for r in records] == ["r1"] and report.rejected == {"malformed_image_field": 1}
    assert "record r0 rejected" in caplog.text
    fault_ledger.record("list-valued image field (training)", survived=True)


def test_a_link_out_of_the_root_in_an_image_folder_is_refused(world, fault_ledger):
    refs = {r.key: r.path for r in collect_inputs([world / "img"], image_root=world).images}
    assert refs["img/link.png"].startswith("refused:path_escapes_root:")
    assert refs["img/a.png"] == str(world / "img" / "a.png")
    fault_ledger.record("symbolic link out of the root in an image folder (detection)", survived=True)


@pytest.mark.slow
def test_allow_absolute_image_paths_accepts_them_in_detection_and_training(world, tmp_path):
    from detector.model import DetectorSettings
    from detector.pipeline import run_detection
    from mgllava.train.data import ConversationDataset, load_conversations

    absolute = str(world / "img" / "a.png")
    corpus = tmp_path / "corpus.json"
    write_corpus(corpus, [absolute, "img/link.png"])
    inputs = collect_inputs([corpus], image_root=world, allow_absolute=True)
    assert [(r.key, r.path) for r in inputs.images] == [(absolute, absolute), ("img/link.png", str(world / "img/link.png"))]
    settings = DetectorSettings(model="yolo11n.yaml", conf=0.99, imgsz=64, device="cpu", allow_absolute_image_paths=True)
    res = run_detection([corpus], tmp_path / "boxes", settings, image_root=world)  # the setting reaches the plan
    assert (res.manifest["totals"]["rows"], res.manifest["totals"]["rejects"]) == (2, 0)
    records, report = load_conversations(corpus, allow_absolute=True)
    assert report.kept == 2
    dataset = ConversationDataset(records, world, {}, processor=None, allow_absolute_image_paths=True)
    assert [dataset.load_image(k).size for k in dataset.keys] == [(40, 30), (8, 8)]


# --------------------------------------------------------------------------- the loader


def test_bomb_is_rejected_at_the_header_without_decoding(world):
    """The 12000 x 12000 PNG (140 KB) would decode to 432 MB of RGB; it is refused from its header."""
    path = world / "img" / "bomb.png"
    script = (  # VmHWM: this process's peak resident memory (ru_maxrss may hold the forking parent's)
        "import re, sys\n"
        "from detector.images import decode_image\n"
        "r = decode_image('bomb', sys.argv[1], 50_000_000)\n"
        "peak_kb = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "print(r.reason, r.detail, peak_kb // 1024, sep='|')\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True)
    reason, detail, peak_mb = out.stdout.strip().split("|")
    assert reason == "too_large" and "144000000 pixels > 50000000" in detail
    assert int(peak_mb) < 200, f"peak RSS {peak_mb} MB: the bomb was decoded"


def test_loader_reasons(world, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "dir.png").mkdir()
    assert decode_image("k", str(tmp_path / "empty.png"), 10**6).reason == "empty"
    assert decode_image("k", str(tmp_path / "dir.png"), 10**6).reason == "not_a_file"
    assert decode_image("k", str(tmp_path / "gone.png"), 10**6).reason == "missing"
    assert decode_image("k", str(world / "img" / "a.png"), 40 * 30 - 1).reason == "too_large"
    loaded = load_image("k", str(world / "img" / "cmyk.jpg"), 10**6)
    assert loaded.array.shape == (16, 24, 3) and len(loaded.sha256) == 64


def test_only_image_formats_are_opened(tmp_path):
    """An EPS file (Pillow would hand it to Ghostscript, which runs PostScript) is unreadable here."""
    (tmp_path / "a.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    rejected = decode_image("a.png", str(tmp_path / "a.png"), 10**6)
    assert rejected.reason == "unreadable" and "cannot identify" in rejected.detail


@pytest.mark.parametrize("name, reason", [("bomb.png", "too_large"), ("header_bomb.png", "too_large"),
                                          ("truncated.png", "truncated")])
def test_chat_refuses_a_hostile_image_with_one_clear_error(world, name, reason, fault_ledger):
    """``mgllava chat`` reads the user's image with the shared loader before any model is loaded."""
    from detector.errors import DetectorError
    from detector.model import DetectorSettings
    from mgllava.eval.chat import ChatSession

    with pytest.raises(DetectorError, match=f"cannot use image .*{name}: {reason}"):
        ChatSession("no-model-needed", world / "img" / name, DetectorSettings(model="yolo11n.yaml"))
    fault_ledger.record(f"chat image {name}: {reason}", survived=True)


def test_truncated_stays_truncated_when_pillow_is_told_to_pad(world, monkeypatch):
    """lmms-eval sets ImageFile.LOAD_TRUNCATED_IMAGES on import; the shared loader still rejects."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert decode_image("k", str(world / "img" / "truncated.png"), 10**6).reason == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the process-wide setting is left as it was
