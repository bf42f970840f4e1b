"""An Ultralytics detector built from a local weights file or a model YAML, run in batches.

Supported: closed-set YOLO and RT-DETR (weights ``.pt`` or model YAML), and the
open-vocabulary YOLO-World and YOLOE with class-name prompts. Ultralytics
computes prompt embeddings with its own CLIP fork, which cannot be installed
here, so prompts need *precomputed* embeddings (``class_embeddings``):

- an ``.npz`` written by ``YOLOE.save_prompt_embeddings`` (names + embeddings,
  bound to the model architecture), for YOLOE;
- a ``.pt`` / ``.npy`` tensor of shape ``(n_classes, dim)`` or
  ``(1, n_classes, dim)`` in the order of ``classes``, for YOLOE and YOLO-World.

Without embeddings, prompts are tried through Ultralytics (works where its CLIP
is installed) and otherwise fail with :class:`DetectorError` saying what to do.
For closed-set models, ``classes`` restricts the output to those class names.

A model YAML builds random weights under a fixed seed (0), so every process
(local or a Dask worker) builds the same detector.

Weights files are third-party input: :func:`ultralytics_safe_load` makes
Ultralytics unpickle them with ``torch.load(weights_only=True)`` and its
allow-list of model classes (and build models without ``eval``), whatever the
environment says; a file that needs anything else is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from detector.errors import DetectorError

log = logging.getLogger(__name__)

YAML_SEED = 0


@dataclass(frozen=True)
class DetectorSettings:
    """What decides the boxes (``params``) plus how to run (batch, device)."""

    model: str
    classes: tuple[str, ...] | None = None
    class_embeddings: str | None = None
    conf: float = 0.25
    iou: float = 0.7
    imgsz: int = 320
    max_det: int = 300
    batch: int = 16
    device: str = "auto"
    max_image_pixels: int = 50_000_000
    allow_absolute_image_paths: bool = False  # data.allow_absolute_image_paths: which inputs, not which boxes
    loader_threads: int | None = None  # threads reading and decoding images ahead; None: loader_threads_for

    @classmethod
    def from_config(cls, det, **overrides) -> DetectorSettings:
        """From a ``DetectorConfig``; ``overrides`` with value None are ignored."""
        values = dict(
            model=det.model, classes=tuple(det.classes) if det.classes else None, conf=det.conf, iou=det.iou,
            imgsz=det.imgsz, batch=det.batch, device=det.device, max_image_pixels=det.max_image_pixels,
            loader_threads=det.loader_threads,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values.get("classes") is not None:
            values["classes"] = tuple(values["classes"])
        return cls(**values)

    def params(self) -> dict:
        """The parameters that decide the boxes (stored in every row as JSON)."""
        return {
            "conf": self.conf,
            "iou": self.iou,
            "imgsz": self.imgsz,
            "max_det": self.max_det,
            "classes": list(self.classes) if self.classes else None,
            "class_embeddings_sha256": file_sha256(self.class_embeddings) if self.class_embeddings else None,
            "max_image_pixels": self.max_image_pixels,
        }

    def to_json(self) -> dict:
        out = asdict(self)
        out["classes"] = list(self.classes) if self.classes else None
        return out


def params_json(params: dict) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


_HASH_CACHE: dict[tuple, str] = {}


def file_sha256(path: str | Path) -> str:
    path = Path(path)
    st = path.stat()
    cache_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if cache_key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _HASH_CACHE[cache_key] = h.hexdigest()
    return _HASH_CACHE[cache_key]


def state_dict_sha256(module) -> str:
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def torch_threads_kept():
    """Run Ultralytics inside: on a CPU it sets torch's thread count for the whole process to
    ``cpu_count - 1`` (1 on a 2-core machine); put back what the process had afterwards."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def ultralytics_device(device: str) -> str:
    """Ultralytics' device spelling for ``device``: ``auto`` (or empty) is GPU ``0`` when CUDA is available,
    else ``cpu``; anything else as given."""
    if device in ("auto", "", None):
        import torch

        return "0" if torch.cuda.is_available() else "cpu"
    return str(device)


def ultralytics_safe_load() -> None:
    """Force Ultralytics' safe loading in this process and the processes it starts.

    Ultralytics unpickles checkpoints with ``weights_only=False`` (any code may run) unless its
    ``ULTRALYTICS_SAFE_LOAD`` flag is on; the flag is read once, when ``ultralytics.utils`` is imported,
    into the ``SAFE_LOAD`` globals that ``ultralytics.nn.tasks.torch_safe_load`` and ``_SafeLoad`` consult.
    So this sets those globals (the package may already be imported) and the variable (for data-loader
    and other child processes). With the flag on, checkpoints load with ``weights_only=True`` plus an
    allow-list of Ultralytics/torch model classes, and model YAMLs are parsed without ``eval``.
    """
    os.environ["ULTRALYTICS_SAFE_LOAD"] = "1"
    import ultralytics.utils
    from ultralytics.nn import tasks

    safe_load = getattr(tasks, "_SafeLoad", None)
    if not hasattr(tasks, "SAFE_LOAD") or safe_load is None or not safe_load.SUPPORTED:
        raise DetectorError(
            "this Ultralytics/torch has no safe (weights_only) checkpoint loading; detector weights are "
            "not loaded without it (needs ultralytics>=8.4.190 and torch>=2.6)"
        )
    ultralytics.utils.SAFE_LOAD = True
    tasks.SAFE_LOAD = True


def load_weights(path: str | Path):
    """An Ultralytics model (``YOLO`` routes RT-DETR / YOLO-World / YOLOE checkpoints by their head) from a
    weights file, through safe loading only; a file that safe loading cannot read is refused."""
    from ultralytics import YOLO

    ultralytics_safe_load()
    try:
        return YOLO(str(path))
    except (TypeError, pickle.UnpicklingError, ModuleNotFoundError) as exc:
        raise DetectorError(
            f"refused to load detector weights {path}: safe loading (torch weights_only=True with Ultralytics' "
            f"allow-list of model classes) cannot read it, and a file that needs more could run code when "
            f"unpickled; use weights saved by Ultralytics ({type(exc).__name__}: {exc})"
        ) from exc


def _is_yaml(path: Path) -> bool:
    return path.suffix.lower() in (".yaml", ".yml")


def _build(path: Path):
    import torch
    from ultralytics import RTDETR, YOLO

    ultralytics_safe_load()
    if _is_yaml(path):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(YAML_SEED)
            if "rtdetr" in path.stem.lower():
                return RTDETR(str(path))
            return YOLO(str(path))
    return load_weights(path)


def _load_embeddings(file: str, classes: tuple[str, ...] | None):
    import torch

    path = Path(file)
    if not path.is_file():
        raise DetectorError(f"class embeddings file not found: {file}")
    if path.suffix.lower() == ".npy":
        emb = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
    elif path.suffix.lower() in (".pt", ".pth"):
        emb = torch.load(path, map_location="cpu", weights_only=True).float()
    else:
        raise DetectorError(f"class embeddings {file}: expected .npz (YOLOE), .npy or .pt")
    if emb.ndim == 2:
        emb = emb[None]
    if emb.ndim != 3 or emb.shape[0] != 1:
        raise DetectorError(f"class embeddings {file}: shape {tuple(emb.shape)}, expected (n_classes, dim)")
    if not classes or emb.shape[1] != len(classes):
        raise DetectorError(
            f"class embeddings {file} hold {emb.shape[1]} classes; give the same number of class names "
            f"(got {len(classes) if classes else 0})"
        )
    return emb


_NO_CLIP_HELP = (
    "computing text embeddings for class prompts needs Ultralytics' CLIP package "
    "(git+https://github.com/ultralytics/CLIP.git), which cannot be installed here. Give precomputed "
    "embeddings instead: --class-embeddings FILE (an .npz from YOLOE.save_prompt_embeddings, or a .pt/.npy "
    "tensor of shape (n_classes, dim) in the order of the class names)"
)


def check_model(model: str) -> Path:
    """``model`` as a path, if it is a local file or an Ultralytics model YAML by its bare name (random
    weights); else :class:`DetectorError` (nothing is downloaded). Cheap: nothing is loaded."""
    path = Path(model).expanduser()
    if not path.exists() and not (_is_yaml(path) and path.name == str(path)):
        raise DetectorError(
            f"detector model not found: {model} (weights cannot be downloaded here: give a "
            "local .pt file, or an Ultralytics model YAML such as yolo11n.yaml for random weights)"
        )
    return path


class Detector:
    """A loaded detector; :meth:`predict` takes a batch of BGR arrays, returns boxes per image."""

    def __init__(self, settings: DetectorSettings):
        from ultralytics.nn.tasks import WorldModel, YOLOEModel

        self.settings = settings
        path = check_model(settings.model)
        try:
            self.model = _build(path)
        except DetectorError:
            raise
        except Exception as exc:
            raise DetectorError(f"cannot build a detector from {settings.model}: {type(exc).__name__}: {exc}") from exc
        inner = self.model.model
        if getattr(self.model, "task", "detect") not in ("detect", "segment"):
            raise DetectorError(f"{settings.model} is a '{self.model.task}' model, not a detector")
        self.arch = type(self.model).__name__  # YOLO, RTDETR, YOLOWorld, YOLOE
        self.open_vocab = isinstance(inner, (WorldModel, YOLOEModel))
        self.weights_sha256 = (
            file_sha256(path) if path.is_file() and not _is_yaml(path) else state_dict_sha256(inner)
        )
        self.name = f"{self.arch}:{path.stem}"
        self._class_filter: list[int] | None = None
        self._setup_classes()
        self.names = self._names()
        self.device = ultralytics_device(settings.device)
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- classes

    def _names(self) -> dict[int, str]:
        names = self.model.names
        return dict(names) if isinstance(names, dict) else dict(enumerate(names))

    def _setup_classes(self) -> None:
        import torch

        s = self.settings
        if s.class_embeddings and not self.open_vocab:
            raise DetectorError(f"class embeddings given, but {self.arch} ({s.model}) is not open-vocabulary")
        if not s.classes and not s.class_embeddings:
            return
        if not self.open_vocab:
            names = self._names()
            by_name = {v: k for k, v in names.items()}
            unknown = [c for c in s.classes if c not in by_name]
            if unknown:
                raise DetectorError(
                    f"{self.arch} {s.model} is closed-set and has no class(es) {unknown}; its classes: "
                    f"{sorted(names.values())}"
                )
            self._class_filter = sorted(by_name[c] for c in s.classes)
            return
        try:
            if s.class_embeddings and s.class_embeddings.lower().endswith(".npz"):
                if self.arch != "YOLOE":
                    raise DetectorError("an .npz of prompt embeddings is for YOLOE; for YOLO-World give .pt/.npy")
                self.model.load_prompt_embeddings(s.class_embeddings)
                if s.classes and list(s.classes) != list(self._names().values()):
                    raise DetectorError(
                        f"class names {list(s.classes)} differ from those in {s.class_embeddings}: "
                        f"{list(self._names().values())}"
                    )
            elif s.class_embeddings:
                emb = _load_embeddings(s.class_embeddings, s.classes)
                if self.arch == "YOLOE":
                    self.model.set_classes(list(s.classes), emb)
                else:  # YOLO-World: what WorldModel.set_classes stores, minus the CLIP call
                    head = self.model.model.model[-1]
                    self.model.model.txt_feats = emb.to(next(self.model.model.parameters()).dtype)
                    head.nc = len(s.classes)
                    self.model.model.names = list(s.classes)
                    self.model.predictor = None
            else:
                self.model.set_classes(list(s.classes))
        except (ModuleNotFoundError, ImportError) as exc:
            raise DetectorError(f"{self.arch} with class prompts {list(s.classes)}: {_NO_CLIP_HELP} ({exc})") from exc
        except (AssertionError, ValueError, RuntimeError, torch.serialization.pickle.UnpicklingError) as exc:
            if isinstance(exc, DetectorError):
                raise
            raise DetectorError(f"cannot set class prompts on {s.model}: {type(exc).__name__}: {exc}") from exc

    # ----------------------------------------------------------------- inference

    def identity(self) -> dict:
        return {
            "name": self.name,
            "arch": self.arch,
            "model": str(self.settings.model),
            "weights_sha256": self.weights_sha256,
            "open_vocabulary": self.open_vocab,
            "names": self.names,
            "params": self.settings.params(),
        }

    def predict(self, images: list[np.ndarray]) -> list[list[tuple[float, float, float, float, float, str]]]:
        """Boxes ``(x1, y1, x2, y2, score, label)`` in original pixels for each BGR image."""
        if not images:
            return []
        s = self.settings
        with self._lock, torch_threads_kept():  # an Ultralytics predictor is not thread-safe
            results = self.model.predict(
                images, imgsz=s.imgsz, conf=s.conf, iou=s.iou, max_det=s.max_det, device=self.device,
                classes=self._class_filter, batch=len(images), verbose=False, save=False,
                retina_masks=False,
            )
        out = []
        for res in results:
            boxes = res.boxes
            if boxes is None or len(boxes) == 0:
                out.append([])
                continue
            xyxy = boxes.xyxy.float().cpu().numpy()
            conf = boxes.conf.float().cpu().numpy()
            cls = boxes.cls.cpu().numpy().astype(int)
            names = res.names
            out.append(
                [
                    (float(b[0]), float(b[1]), float(b[2]), float(b[3]), float(c), str(names[int(k)]))
                    for b, c, k in zip(xyxy, conf, cls, strict=True)
                ]
            )
        return out


_CACHE: dict[DetectorSettings, Detector] = {}
_CACHE_LOCK = threading.Lock()


def get_detector(settings: DetectorSettings) -> Detector:
    """One :class:`Detector` per settings per process (Dask workers reuse theirs across shards)."""
    with _CACHE_LOCK:
        det = _CACHE.get(settings)
        if det is None:
            det = Detector(settings)
            _CACHE.clear()  # keep one model in memory
            _CACHE[settings] = det
        return det


__all__ = ["Detector", "DetectorSettings", "get_detector", "load_weights", "params_json", "file_sha256", "ultralytics_safe_load"]
