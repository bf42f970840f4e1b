"""The detection run: plan shards, detect shard by shard, write Parquet, reconcile.

Output directory layout (``out``)::

    manifest.json            inputs, detector identity, settings, shard list with checksums, totals, status
    plan.parquet             image_key, path, shard: the frozen assignment of images to shards
    boxes/part-00000.parquet one row per usable image (schema: detector/SCHEMA.md)
    rejects/part-00000.parquet one row per unusable image (key, reason, detail, ...)
    shards/part-00000.json   the finished shard's record: run fingerprint, sha256 of its two files
    .lock                    the run lock (who holds it)

Shard assignment is deterministic: the distinct image keys sorted, cut into
consecutive runs of ``shard_size``. Each shard writes its rejects file, then
its boxes file, then its record, each to a temporary name that is fsynced,
renamed atomically into place, and its folder fsynced; a shard is finished
when its record names this run's fingerprint and both files still hash to the
sha256 it records. A killed run restarted with the same inputs and detector
therefore redoes only unfinished (or corrupted: logged) shards, never leaves
partial files under a ``*.parquet`` name, and never duplicates a row. The run
fingerprint hashes the schema version, the image keys with their files (path,
size, mtime), the detector's name, weights hash and parameters, and the shard
size; a finished run with the same fingerprint whose files all verify is
skipped. An output directory holding a different run is refused unless
``overwrite=True``.

One run per output directory at a time: the process that drives a run holds
an exclusive ``flock`` on ``.lock`` (:func:`run_lock`) from planning to
finishing, and :func:`prepare_run` / :func:`finalize_run` (which rewrite the
directory and remove a killed run's temporary files) refuse to run without
it; a second run gets :class:`RunConflictError`. The shards of the run holding
the lock may run in parallel elsewhere (threads, Dask worker processes sharing
the file system): each writes only its own files.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime as dt
import fcntl
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from detector import schema
from detector.errors import BoxTableError, RunConflictError
from detector.images import LoadedImage, Rejected, load_image
from detector.inputs import Inputs, collect_inputs
from detector.model import DetectorSettings, get_detector, params_json
from detector.tables import MANIFEST_FILE, checksum_problem, sha256_file

log = logging.getLogger(__name__)

PLAN_FILE = "plan.parquet"
BOXES_DIR = "boxes"
REJECTS_DIR = "rejects"
SHARDS_DIR = "shards"
LOCK_FILE = ".lock"
TMP_MARK = ".tmp-"

Progress = Callable[[int, int], None]  # (images done, images total)


def shard_file(index: int) -> str:
    return f"part-{index:05d}.parquet"


def shard_record(index: int) -> str:
    return f"{SHARDS_DIR}/part-{index:05d}.json"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(t: dt.datetime) -> str:
    return t.isoformat(timespec="seconds")


# --------------------------------------------------------------------------- small file helpers


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary name, fsync it, rename it to ``path``, fsync the folder: after a crash
    ``path`` holds the old bytes or all of the new ones."""
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write_table(table: pa.Table, path: Path) -> None:
    """Write a Parquet file (zstd) with :func:`_atomic_write_bytes`."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    _atomic_write_bytes(path, sink.getvalue().to_pybytes())


def read_manifest(out: str | Path) -> dict | None:
    path = Path(out) / MANIFEST_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def write_manifest(out: Path, manifest: dict) -> None:
    _atomic_write_bytes(out / MANIFEST_FILE, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())


def _remove_stale_temps(out: Path) -> int:
    """Remove temporary files of killed runs (only under the run lock: no other run is writing)."""
    removed = 0
    for sub in (BOXES_DIR, REJECTS_DIR, SHARDS_DIR, "."):
        folder = out / sub
        if folder.is_dir():
            for p in folder.iterdir():
                if p.name.startswith(".") and TMP_MARK in p.name:
                    p.unlink(missing_ok=True)
                    removed += 1
    return removed


# --------------------------------------------------------------------------- the run lock


@contextlib.contextmanager
def run_lock(out: str | Path) -> Iterator[str]:
    """Hold the exclusive lock of the box-table directory ``out`` for one run; yield the run's id.

    An ``flock`` on ``out/.lock``, released when the block ends or the process dies (even by kill -9).
    A second run on the same directory, from any process or thread, gets :class:`RunConflictError`
    naming the holder. Needs a file system with working ``flock`` (local disks; NFS v4).
    """
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise RunConflictError(
                f"{out} is being written by another detection run (lock {path} held by {holder}); wait for it "
                "to finish, or give another output directory"
            ) from None
        run_id = uuid.uuid4().hex
        holder = json.dumps({"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(),
                             "since": _iso(_now())})
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        yield run_id
    finally:
        os.close(fd)


def _require_lock(out: Path, run_id: str) -> None:
    """Refuse to change ``out`` as a whole unless the run ``run_id`` holds its lock (in any process)."""
    path = out / LOCK_FILE
    try:
        holder = json.loads(path.read_text()).get("run_id")
    except (OSError, ValueError):
        holder = None
    held = False
    if holder == run_id:
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            held = True
        finally:
            os.close(fd)
    if not held:
        raise RunConflictError(f"{out}: run {run_id[:12]} does not hold the directory's lock {path} (see run_lock)")


# --------------------------------------------------------------------------- planning


def input_fingerprint(inputs: Inputs) -> str:
    h = hashlib.sha256()
    for ref in inputs.images:
        try:
            st = os.stat(ref.path)
            sig = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            sig = "-"
        h.update(f"{ref.key}\0{ref.path}\0{sig}\n".encode())
    return h.hexdigest()


def run_fingerprint(inputs_fp: str, identity: dict, shard_size: int) -> str:
    blob = json.dumps(
        {
            "schema_version": schema.SCHEMA_VERSION,
            "inputs": inputs_fp,
            "detector": identity["name"],
            "weights_sha256": identity["weights_sha256"],
            "params": identity["params"],
            "shard_size": shard_size,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class RunPlan:
    out: Path
    fingerprint: str
    n_images: int
    n_shards: int
    pending: list[int]
    complete: bool
    manifest: dict


def _write_shard_record(out: Path, index: int, fingerprint: str) -> None:
    """Record the finished shard: the run's fingerprint and the sha256 of its two files as written."""
    files = {f"{sub}/{shard_file(index)}": sha256_file(out / sub / shard_file(index)) for sub in (REJECTS_DIR, BOXES_DIR)}
    record = {"shard": index, "fingerprint": fingerprint, "sha256": files}
    _atomic_write_bytes(out / shard_record(index), (json.dumps(record, indent=1) + "\n").encode())



def write_shard(out: Path, index: int, fingerprint: str, rows: dict, rejects: dict) -> None:
    """Write shard ``index``'s rejects, then its boxes (column dicts in the schema's order), then its
    record: the record, written last, is what marks the shard finished."""
    rejects_table = pa.Table.from_pydict(rejects, schema=schema.rejects_schema(fingerprint, index))
    boxes_table = pa.Table.from_pydict(rows, schema=schema.boxes_schema(fingerprint, index))
    atomic_write_table(rejects_table, out / REJECTS_DIR / shard_file(index))
    atomic_write_table(boxes_table, out / BOXES_DIR / shard_file(index))
    _write_shard_record(out, index, fingerprint)


def _write_after(previous: cf.Future | None, out: Path, index: int, fingerprint: str, rows: dict,
                 rejects: dict) -> None:
    """:func:`write_shard`, once the write before it succeeded (its error is raised instead)."""
    if previous is not None:
        previous.result()
    write_shard(out, index, fingerprint, rows, rejects)


def shard_problem(out: Path, index: int, fingerprint: str) -> str | None:
    """Why shard ``index`` is not a finished shard of the run ``fingerprint`` (None when it is): no record,
    another run's record, or a file whose bytes no longer hash to the recorded sha256."""
    path = out / shard_record(index)
    if not path.is_file():
        return "not written"
    try:
        record = json.loads(path.read_text())
        if record["fingerprint"] != fingerprint:
            return "written by another run"
        files = record["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{path}: unreadable record ({exc})"
    for sub in (REJECTS_DIR, BOXES_DIR):
        name = f"{sub}/{shard_file(index)}"
        problem = checksum_problem(out / name, files.get(name))
        if problem:
            return problem
    return None


def shard_done(out: Path, index: int, fingerprint: str) -> bool:
    return shard_problem(out, index, fingerprint) is None


def prepare_run(
    sources: list[str | Path],
    out: str | Path,
    settings: DetectorSettings,
    image_root: str | Path | None = None,
    shard_size: int = 256,
    overwrite: bool = False,
    *,
    run_id: str,
) -> RunPlan:
    """Collect inputs, identify the detector, write plan + manifest (or find the run done).

    ``run_id``: from the :func:`run_lock` held on ``out`` (by this or another process)."""
    out = Path(out).expanduser().resolve()
    _require_lock(out, run_id)
    inputs = collect_inputs(sources, image_root=image_root, materialise_root=out / "images",
                            allow_absolute=settings.allow_absolute_image_paths)
    detector = get_detector(settings)
    identity = detector.identity()
    fingerprint = run_fingerprint(input_fingerprint(inputs), identity, shard_size)
    n_images = len(inputs.images)
    n_shards = math.ceil(n_images / shard_size)

    old = read_manifest(out)
    if old is not None and old.get("fingerprint") != fingerprint:
        if not overwrite:
            raise RunConflictError(
                f"{out} already holds a box table of another run (different inputs, detector, parameters or "
                f"shard size: fingerprint {str(old.get('fingerprint'))[:12]} vs {fingerprint[:12]}); "
                "give another output directory or overwrite it (--overwrite)"
            )
        log.warning("overwriting the box table of another run in %s", out)
        for sub in (BOXES_DIR, REJECTS_DIR, SHARDS_DIR):
            shutil.rmtree(out / sub, ignore_errors=True)
        (out / PLAN_FILE).unlink(missing_ok=True)
        (out / MANIFEST_FILE).unlink(missing_ok=True)
        old = None
    stale = _remove_stale_temps(out)
    if stale:
        log.info("removed %d temporary file(s) left by an interrupted run", stale)
    for sub in (BOXES_DIR, REJECTS_DIR, SHARDS_DIR):
        (out / sub).mkdir(exist_ok=True)
        for p in (out / sub).glob("part-*.*"):  # shards beyond this plan cannot belong to it
            try:
                index = int(p.stem.split("-")[1])
            except (IndexError, ValueError):
                continue
            if index >= n_shards:
                p.unlink()
    _fsync_dir(out)  # the shard folders' entries

    pending = []
    for i in range(n_shards):
        problem = shard_problem(out, i, fingerprint)
        if problem is None:
            continue
        if problem != "not written":
            log.warning("shard %d of %s is redone: %s", i, out, problem)
        pending.append(i)
    if old is not None and old.get("status") == "complete" and not pending:
        return RunPlan(out, fingerprint, n_images, n_shards, [], True, old)

    if old is None or not (out / PLAN_FILE).is_file():
        keys = [r.key for r in inputs.images]
        plan = pa.table(
            {
                "image_key": pa.array(keys, pa.string()),
                "path": pa.array([r.path for r in inputs.images], pa.string()),
                "shard": pa.array([i // shard_size for i in range(n_images)], pa.int32()),
            }
        )
        atomic_write_table(plan, out / PLAN_FILE)
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "fingerprint": fingerprint,
        "run_id": run_id,
        "status": "running",
        "created_at": (old or {}).get("created_at") or _iso(_now()),
        "finished_at": None,
        "inputs": {
            "sources": [s.to_json() for s in inputs.sources],
            "references": inputs.references,
            "distinct_images": n_images,
            "duplicates": inputs.duplicates,
            "key_conflicts": inputs.conflicts,
        },
        "detector": identity,
        "settings": settings.to_json(),
        "shard_size": shard_size,
        "n_shards": n_shards,
        "shards": [],
        "totals": None,
        "runs": (old or {}).get("runs", []),
    }
    write_manifest(out, manifest)
    return RunPlan(out, fingerprint, n_images, n_shards, pending, False, manifest)


# --------------------------------------------------------------------------- one shard


def settings_from_manifest(manifest: dict) -> DetectorSettings:
    values = dict(manifest["settings"])
    if values.get("classes") is not None:
        values["classes"] = tuple(values["classes"])
    return DetectorSettings(**values)


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def loader_threads_for(settings: DetectorSettings, device: str) -> int:
    """``settings.loader_threads``, or by default: 0 on a CPU device (the detector's thread decodes between
    forwards: on a small CPU a loader beside the forward stalls the forward's own threads, which use every
    core, by more than it hides), else one thread per spare core, up to 8 (a GPU forward outruns one
    decoding thread many times over)."""
    if settings.loader_threads is not None:
        return settings.loader_threads
    return 0 if device == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 1))


def _loaded_batches(items: list[tuple[str, str]], settings: DetectorSettings,
                    threads: int) -> Iterator[list[LoadedImage | Rejected]]:
    """The images of ``items`` in batches of ``settings.batch``, each image loaded (or rejected), in order:
    by this thread when needed (``threads`` 0), or by a pool of ``threads`` that loads up to two batches
    ahead of the one returned."""
    batches = _batches(items, settings.batch)
    if threads == 0:
        for batch in batches:
            yield [load_image(key, path, settings.max_image_pixels) for key, path in batch]
        return
    with cf.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="detect-load") as pool:
        ahead: deque[list[cf.Future]] = deque()

        def submit(batch: list[tuple[str, str]]) -> None:
            ahead.append([pool.submit(load_image, key, path, settings.max_image_pixels) for key, path in batch])

        for batch in itertools.islice(batches, 2):
            submit(batch)
        while ahead:
            futures = ahead.popleft()
            next_batch = next(batches, None)
            if next_batch is not None:
                submit(next_batch)
            yield [future.result() for future in futures]


@dataclass
class ShardResult:
    shard: int
    images: int
    rows: int
    rejects: int
    boxes: int
    computed: bool
    seconds: float = 0.0

    def to_json(self) -> dict:
        return self.__dict__.copy()


def _shard_counts(out: Path, index: int) -> tuple[int, int, int]:
    boxes = pq.read_table(out / BOXES_DIR / shard_file(index), columns=["boxes"])
    n_boxes = int(pc.sum(pc.list_value_length(boxes["boxes"])).as_py() or 0) if boxes.num_rows else 0
    n_rejects = pq.read_metadata(out / REJECTS_DIR / shard_file(index)).num_rows
    return boxes.num_rows, n_rejects, n_boxes


def run_shard(out: str | Path, index: int, progress: Callable[[int], None] | None = None,
              write: Callable[[Path, int, str, dict, dict], None] = write_shard) -> ShardResult:
    """Detect one shard of a prepared run (a no-op if it is already finished); ``write`` writes its files
    (:func:`write_shard`, or a function that queues that call on another thread)."""
    out = Path(out).expanduser().resolve()
    manifest = read_manifest(out)
    if manifest is None:
        raise FileNotFoundError(f"no {MANIFEST_FILE} in {out}: prepare the run first")
    fingerprint = manifest["fingerprint"]
    if shard_done(out, index, fingerprint):
        rows, rejects, boxes = _shard_counts(out, index)
        if progress:
            progress(rows + rejects)
        return ShardResult(index, rows + rejects, rows, rejects, boxes, computed=False)

    t0 = time.perf_counter()
    settings = settings_from_manifest(manifest)
    plan = pq.read_table(out / PLAN_FILE, filters=[("shard", "=", index)])
    items = list(zip(plan["image_key"].to_pylist(), plan["path"].to_pylist(), strict=True))
    detector = get_detector(settings)
    ident = detector.identity()
    if ident["weights_sha256"] != manifest["detector"]["weights_sha256"]:
        raise RunConflictError(
            f"shard {index}: the detector {settings.model} changed since the run was planned "
            "(weights hash differs); start the run again"
        )
    name, weights, params = ident["name"], ident["weights_sha256"], params_json(ident["params"])

    rows: dict[str, list] = {f.name: [] for f in schema.BOXES_FIELDS}
    rejects: dict[str, list] = {f.name: [] for f in schema.REJECTS_FIELDS}

    def add_reject(r: Rejected, when: dt.datetime) -> None:
        for col, val in (
            ("image_key", r.key), ("reason", r.reason), ("detail", r.detail[:2000]), ("path", r.path),
            ("detector", name), ("weights_sha256", weights), ("detected_at", when), ("shard", index),
        ):
            rejects[col].append(val)

    for loaded in _loaded_batches(items, settings, loader_threads_for(settings, detector.device)):
        good = [x for x in loaded if isinstance(x, LoadedImage)]
        when = _now()
        try:
            preds = detector.predict([x.array for x in good])
        except Exception as exc:  # isolate the image that breaks the batch
            log.warning("shard %d: batch failed (%s); retrying image by image", index, exc)
            preds = []
            for x in good:
                try:
                    preds.append(detector.predict([x.array])[0])
                except Exception as one_exc:
                    preds.append(one_exc)
        for x in loaded:
            if isinstance(x, Rejected):
                add_reject(x, when)
        for x, p in zip(good, preds, strict=True):
            if isinstance(p, Exception):
                add_reject(Rejected(x.key, x.path, "detector_error", f"{type(p).__name__}: {p}"), when)
                continue
            rows["image_key"].append(x.key)
            rows["width"].append(x.width)
            rows["height"].append(x.height)
            rows["sha256"].append(x.sha256)
            rows["boxes"].append(
                [{"x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3], "score": b[4], "label": b[5]} for b in p]
            )
            rows["detector"].append(name)
            rows["weights_sha256"].append(weights)
            rows["params"].append(params)
            rows["detected_at"].append(when)
            rows["shard"].append(index)
        if progress:
            progress(len(loaded))

    if (read_manifest(out) or {}).get("run_id") != manifest.get("run_id"):  # e.g. a task outliving its run
        raise RunConflictError(f"shard {index}: another run took over {out} while it ran; its result is dropped")
    write(out, index, fingerprint, rows, rejects)
    n_boxes = sum(len(b) for b in rows["boxes"])
    seconds = time.perf_counter() - t0
    log.info("shard %d: %d images, %d boxes, %d rejects, %.1f images/s", index, len(items), n_boxes,
             len(rejects["image_key"]), len(items) / max(seconds, 1e-9))
    return ShardResult(
        index, len(items), len(rows["image_key"]), len(rejects["image_key"]), n_boxes, computed=True, seconds=seconds
    )


# --------------------------------------------------------------------------- finishing


def finalize_run(out: str | Path, computed: list[int] | None = None, started_at: str | None = None, *,
                 run_id: str) -> dict:
    """Verify every shard against its record, reconcile the totals with the plan, and mark the manifest
    complete with each shard's file checksums (``run_id``: as for :func:`prepare_run`)."""
    out = Path(out).expanduser().resolve()
    _require_lock(out, run_id)
    manifest = read_manifest(out)
    fingerprint = manifest["fingerprint"]
    plan_counts = pq.read_table(out / PLAN_FILE, columns=["shard"]).group_by("shard").aggregate([("shard", "count")])
    expected = dict(zip(plan_counts["shard"].to_pylist(), plan_counts["shard_count"].to_pylist(), strict=True))
    shards, totals = [], {"images": 0, "rows": 0, "rejects": 0, "boxes": 0}
    reasons: dict[str, int] = {}
    for index in range(manifest["n_shards"]):
        problem = shard_problem(out, index, fingerprint)
        if problem:
            raise BoxTableError(
                f"shard {index} of {out} is not finished ({problem}); run the detection again to complete it"
            )
        sums = json.loads((out / shard_record(index)).read_text())["sha256"]
        rows, rejects, boxes = _shard_counts(out, index)
        if rows + rejects != expected.get(index, 0):
            raise RuntimeError(
                f"shard {index}: {rows} rows + {rejects} rejects != {expected.get(index, 0)} planned images"
            )
        for reason in pq.read_table(out / REJECTS_DIR / shard_file(index), columns=["reason"])["reason"].to_pylist():
            reasons[reason] = reasons.get(reason, 0) + 1
        shards.append(
            {
                "index": index,
                "boxes_file": f"{BOXES_DIR}/{shard_file(index)}",
                "boxes_sha256": sums[f"{BOXES_DIR}/{shard_file(index)}"],
                "rejects_file": f"{REJECTS_DIR}/{shard_file(index)}",
                "rejects_sha256": sums[f"{REJECTS_DIR}/{shard_file(index)}"],
                "images": rows + rejects,
                "rows": rows,
                "rejects": rejects,
                "boxes": boxes,
            }
        )
        totals["images"] += rows + rejects
        totals["rows"] += rows
        totals["rejects"] += rejects
        totals["boxes"] += boxes
    if totals["images"] != manifest["inputs"]["distinct_images"]:
        raise RuntimeError(
            f"totals do not reconcile: {totals['rows']} rows + {totals['rejects']} rejects != "
            f"{manifest['inputs']['distinct_images']} distinct input images"
        )
    totals["reject_reasons"] = dict(sorted(reasons.items()))
    totals["images_without_boxes"] = sum(
        int(pc.sum(pc.equal(pc.list_value_length(pq.read_table(out / s["boxes_file"], columns=["boxes"])["boxes"]), 0)).as_py() or 0)
        for s in shards
        if s["rows"]
    )
    now = _iso(_now())
    manifest.update(status="complete", finished_at=now, shards=shards, totals=totals)
    manifest.setdefault("runs", []).append(
        {"started_at": started_at or now, "finished_at": now, "computed_shards": sorted(computed or [])}
    )
    write_manifest(out, manifest)
    return manifest


@dataclass
class DetectResult:
    out: Path
    manifest: dict
    skipped: bool
    computed_shards: list[int] = field(default_factory=list)

    def summary(self) -> str:
        t = self.manifest["totals"]
        state = "already complete, skipped" if self.skipped else f"{len(self.computed_shards)} shard(s) computed"
        return (
            f"detect: {t['images']} images: {t['rows']} with box rows ({t['boxes']} boxes), "
            f"{t['rejects']} rejects; {state} -> {self.out}"
        )


def run_detection(
    sources: list[str | Path],
    out: str | Path,
    settings: DetectorSettings,
    image_root: str | Path | None = None,
    shard_size: int = 256,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> DetectResult:
    """Detect boxes on every distinct image of ``sources`` into the box table ``out`` (in-process), holding
    the directory's :func:`run_lock` throughout."""
    with run_lock(out) as run_id:
        return _run_locked(sources, out, settings, image_root, shard_size, overwrite, progress, run_id)


def _run_locked(sources, out, settings, image_root, shard_size, overwrite, progress, run_id) -> DetectResult:
    started = _iso(_now())
    plan = prepare_run(sources, out, settings, image_root=image_root, shard_size=shard_size, overwrite=overwrite,
                       run_id=run_id)
    if plan.complete:
        log.info("box table %s is already complete for these inputs and detector (run %s): skipped",
                 plan.out, plan.fingerprint[:12])
        if progress:
            progress(plan.n_images, plan.n_images)
        return DetectResult(plan.out, plan.manifest, skipped=True)
    done_images = plan.n_images - sum(
        min(plan.n_images, (i + 1) * shard_size) - i * shard_size for i in plan.pending
    )
    if plan.pending != list(range(plan.n_shards)):
        log.info("resuming run %s: %d of %d shards left", plan.fingerprint[:12], len(plan.pending), plan.n_shards)
    counter = [done_images]
    if progress:
        progress(counter[0], plan.n_images)

    def tick(n: int) -> None:
        counter[0] += n
        if progress:
            progress(counter[0], plan.n_images)

    # Each shard's Parquet files are written by one writer thread, in shard order, while the next shard
    # is detected; a failed write stops the writes after it and the run.
    with cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="detect-write") as writer:
        writes: list[cf.Future] = []

        def write_later(*args) -> None:
            writes.append(writer.submit(_write_after, writes[-1] if writes else None, *args))

        for index in plan.pending:
            if writes and writes[-1].done():
                writes[-1].result()  # raises a failed write's error
            run_shard(plan.out, index, progress=tick, write=write_later)  # logs its line
        if writes:
            writes[-1].result()
    manifest = finalize_run(plan.out, computed=plan.pending, started_at=started, run_id=run_id)
    return DetectResult(plan.out, manifest, skipped=False, computed_shards=list(plan.pending))
