"""Input images of a detection run, each with its *image key*.

The image key is the image's path relative to an image root, in POSIX form
(``train/000000.png``): the same string a LLaVA JSON ``image`` field holds, so
training and evaluation join box rows on it. Three kinds of source:

- **LLaVA JSON** (``*.json`` list, or ``*.jsonl``): keys are the entries'
  ``image`` fields (a string or a list of strings) normalised by
  :func:`detector.keys.normalize_key`, files are ``image_root / key``;
  ``image_root`` defaults to the JSON's directory. Entries without an image
  (no ``image`` field, or null) are counted as text-only and skipped. A value
  the normaliser refuses (absolute, leaving the root, not a string) or a file
  that leads out of the root through a symbolic link is kept as a reference
  that detection rejects with the refusal's reason (see :mod:`detector.keys`).
- **image folder**: every file with an image extension below it, recursively
  (zero-byte and corrupt ones too: they become rejects; a symbolic link out of
  the root too). Keys are relative to ``image_root`` when the folder lies
  inside it, else to the folder itself.
- **benchmark set**: a ``datasets`` ``save_to_disk`` directory (a Dataset or a
  DatasetDict) with an ``image`` column, or a directory of such task
  directories. Its images are *materialised* as files
  ``<root>/bench/<task>/<id>.png`` (``root``: ``image_root`` if given, else
  ``<out>/images``) and keyed ``bench/<task>/<id>.png``; ``<id>`` is the row's
  ``question_id``/``id``/``index``/``idx``/``sample_id`` (the first such column whose
  values are unique), else the row number; for a DatasetDict with several
  splits it is ``<split>/<id>``. The original image bytes are written as they
  are when they are PNG (so the ``sha256`` column equals the hash of the
  dataset's stored bytes), otherwise the decoded image is saved as PNG.

Keys are de-duplicated (the same image referenced by many conversations or
by several sources is detected once); for one key seen with different files,
the smallest path wins and a warning is logged.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from detector.keys import KeyRefused, normalize_key, refused_path, resolve_key

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
ID_COLUMNS = ("question_id", "id", "index", "idx", "sample_id")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True, order=True)
class ImageEntry:
    """An image a source references: its key, and its file (or, for a refused key, ``refused:<reason>:...``)."""

    key: str
    path: str


@dataclass
class SourceSummary:
    kind: str  # llava_json | folder | bench
    path: str
    image_root: str
    entries: int = 0  # JSON entries / dataset rows / files found
    references: int = 0  # image references (an entry may hold several images)
    text_only: int = 0  # JSON entries without an image
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "path": self.path,
            "image_root": self.image_root,
            "entries": self.entries,
            "references": self.references,
            "text_only": self.text_only,
            **self.extra,
        }


@dataclass
class Inputs:
    images: list[ImageEntry]  # sorted by key, distinct keys
    sources: list[SourceSummary]
    references: int  # image references over all sources (before de-duplication)
    conflicts: int  # keys seen with more than one distinct file

    @property
    def duplicates(self) -> int:
        return self.references - len(self.images)


def _is_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")
    )


def source_kind(path: Path) -> str:
    if path.is_file():
        if path.suffix.lower() in (".json", ".jsonl"):
            return "llava_json"
        raise ValueError(f"source {path}: a file source must be a LLaVA .json/.jsonl corpus")
    if path.is_dir():
        if _is_dataset_dir(path):
            return "bench"
        has_images = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir() if p.is_file())
        if not has_images and any(_is_dataset_dir(p) for p in path.iterdir()):
            return "bench_collection"
        return "folder"
    raise FileNotFoundError(f"source not found: {path}")


# --------------------------------------------------------------------------- LLaVA JSON


def read_llava(path: Path) -> list:
    text = path.read_text()
    if path.suffix.lower() == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"LLaVA JSON {path} must hold a list of entries, got {type(data).__name__}")
    return data


def image_ref(root: Path, value, allow_absolute: bool = False) -> ImageEntry:
    """The reference of one ``image`` value under ``root``; a refused one carries its reason
    in ``path`` (:func:`detector.keys.refused_path`) and becomes a reject when loaded."""
    key = normalize_key(value, allow_absolute)
    if isinstance(key, str):
        file = resolve_key(root, key, allow_absolute)
        if not isinstance(file, KeyRefused):
            return ImageEntry(key, str(file))
        key = file
    log.warning("image %r refused: %s", key.key, key.detail)
    return ImageEntry(key.key, refused_path(key))


def llava_refs(
    path: Path, image_root: Path | None, allow_absolute: bool = False
) -> tuple[list[ImageEntry], SourceSummary]:
    root = (image_root or path.parent).resolve()
    entries = read_llava(path)
    refs: list[ImageEntry] = []
    summary = SourceSummary("llava_json", str(path.resolve()), str(root), entries=len(entries))
    for entry in entries:
        image = entry.get("image") if isinstance(entry, dict) else None
        if image is None:
            summary.text_only += 1
            continue
        images = image if isinstance(image, list) and image else [image]
        refs.extend(image_ref(root, item, allow_absolute) for item in images)
    summary.references = len(refs)
    return refs, summary


# --------------------------------------------------------------------------- folders


def folder_refs(
    path: Path, image_root: Path | None, allow_absolute: bool = False
) -> tuple[list[ImageEntry], SourceSummary]:
    folder = path.resolve()
    root = folder
    if image_root is not None:
        candidate = image_root.resolve()
        if folder == candidate or candidate in folder.parents:
            root = candidate
    refs = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            refs.append(image_ref(root, (Path(dirpath) / name).relative_to(root).as_posix(), allow_absolute))
    summary = SourceSummary("folder", str(folder), str(root), entries=len(refs), references=len(refs))
    return refs, summary


# --------------------------------------------------------------------------- benchmark sets

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def bench_key(task: str, row_id: str) -> str:
    """The image key of a benchmark row: ``bench/<task>/<id>.png`` (``id`` sanitised)."""
    parts = [(_SAFE.sub("_", p) or "_") for p in str(row_id).split("/")]
    return "/".join(["bench", _SAFE.sub("_", task), *parts]) + ".png"


def _row_ids(dataset) -> list[str]:
    for column in ID_COLUMNS:
        if column in dataset.column_names:
            values = [str(v) for v in dataset[column]]
            if len(set(values)) == len(values):
                return values
    return [str(i) for i in range(len(dataset))]


def _png_bytes(value) -> bytes | None:
    """The PNG bytes to write for one ``image`` cell (stored form, ``decode=False``); other
    formats are decoded with :func:`detector.images.open_image` (image formats only)."""
    from detector.images import open_image

    if value is None:
        return None
    data, src = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (None, None)
    if data is None and src and os.path.isfile(src):
        data = Path(src).read_bytes()
    if data is None:
        return None
    if data.startswith(PNG_MAGIC):
        return data
    buf = io.BytesIO()
    with open_image(io.BytesIO(data)) as im:
        im.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.stat().st_size == len(data):
        if hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest():
            return  # keep the mtime: the run fingerprint stays the same
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def bench_refs(path: Path, root: Path, task: str | None = None) -> tuple[list[ImageEntry], SourceSummary]:
    """Materialise a ``save_to_disk`` benchmark set's images under ``root`` and key them."""
    import datasets

    task = task or path.resolve().name
    loaded = datasets.load_from_disk(str(path))
    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"": loaded}
    root = root.resolve()
    refs: list[ImageEntry] = []
    rows = unreadable = 0
    for split, ds in splits.items():
        if "image" not in ds.column_names:
            raise ValueError(f"benchmark set {path} (split {split or '-'}) has no 'image' column")
        ds = ds.cast_column("image", datasets.Image(decode=False))
        ids = _row_ids(ds)
        prefix = f"{split}/" if len(splits) > 1 else ""
        for row_id, value in zip(ids, ds["image"], strict=True):
            rows += 1
            key = bench_key(task, prefix + row_id)
            target = root / key
            try:
                data = _png_bytes(value)
            except Exception as exc:  # undecodable stored image: keep the key, it becomes a reject
                log.warning("benchmark %s row %s: cannot materialise image: %s", task, row_id, exc)
                data = None
            if data is None:
                unreadable += 1
                if target.exists():
                    target.unlink()
            else:
                _write_if_changed(target, data)
            refs.append(ImageEntry(key, str(target)))
    summary = SourceSummary(
        "bench", str(path.resolve()), str(root), entries=rows, references=len(refs),
        extra={"task": task, "splits": [s for s in splits if s], "not_materialised": unreadable},
    )
    return refs, summary


# --------------------------------------------------------------------------- all together


def collect_inputs(
    sources: list[str | Path],
    image_root: str | Path | None = None,
    materialise_root: str | Path | None = None,
    allow_absolute: bool = False,
) -> Inputs:
    """All distinct images of ``sources``, sorted by key (see the module docstring); ``allow_absolute``:
    accept absolute image paths (``data.allow_absolute_image_paths``)."""
    if not sources:
        raise ValueError("no input source given")
    root = Path(image_root) if image_root else None
    all_refs: list[ImageEntry] = []
    summaries: list[SourceSummary] = []
    for source in sources:
        path = Path(source).expanduser()
        kind = source_kind(path)
        if kind == "llava_json":
            refs, summary = llava_refs(path, root, allow_absolute)
        elif kind == "folder":
            refs, summary = folder_refs(path, root, allow_absolute)
        else:
            bench_root = root or (Path(materialise_root) if materialise_root else None)
            if bench_root is None:
                raise ValueError(f"benchmark source {path} needs an image root to materialise its images into")
            task_dirs = [path] if kind == "bench" else sorted(p for p in path.iterdir() if _is_dataset_dir(p))
            refs, summary = [], None
            for task_dir in task_dirs:
                task_refs, summary = bench_refs(task_dir, bench_root)
                refs.extend(task_refs)
                summaries.append(summary)
            all_refs.extend(refs)
            continue
        all_refs.extend(refs)
        summaries.append(summary)
    by_key: dict[str, str] = {}
    conflicts: set[str] = set()
    for ref in all_refs:
        seen = by_key.get(ref.key)
        if seen is None or ref.path < seen:
            if seen is not None and seen != ref.path:
                conflicts.add(ref.key)
            by_key[ref.key] = ref.path
        elif seen != ref.path:
            conflicts.add(ref.key)
    if conflicts:
        log.warning(
            "%d image keys refer to different files in different sources (e.g. %s); the smallest path is used",
            len(conflicts), sorted(conflicts)[0],
        )
    images = [ImageEntry(k, by_key[k]) for k in sorted(by_key)]
    return Inputs(images=images, sources=summaries, references=len(all_refs), conflicts=len(conflicts))


def default_sources(config) -> list[str]:
    """What ``detect`` covers when given no source: the configured corpora, plus the shapes
    world's benchmark images (keys ``bench/NNNNNN.png``) when they are under the image root."""
    sources = [config.data.pretrain_json, config.data.finetune_json]
    bench = Path(config.data.image_root) / "bench"
    if bench.is_dir():
        sources.append(str(bench))
    return sources
