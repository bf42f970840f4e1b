"""MG-LLaVA as an lmms-eval 0.7.3 model (``--model mgllava``), a "simple" ``lmms`` subclass.

``lmms-eval --model mgllava --model_args pretrained=EXPORT_DIR,boxes_dir=BOX_TABLE,...``;
model arguments (all strings on the command line):

===================  ==================================================================
``pretrained``       an export (``MGLLaVAForConditionalGeneration.export``; required)
``boxes_dir``        a Parquet box table (``mgllava detect``) to read boxes from
``detector``         Ultralytics weights or model YAML for images the table lacks; by
                     default the detector the export recorded (the one that made its
                     training boxes), ``none`` for no detector
``detector_conf``,   its score threshold, input size, NMS IoU (defaults as
``detector_imgsz``,  ``DetectorConfig``)
``detector_iou``
``detection_cache``  folder of the on-the-fly detector's cache (default ~/.cache/mgllava)
``allow_missing``    true: an image with neither a box row nor a detector gets no boxes
``batch_size``       questions per ``generate`` call (default 8)
``max_new_tokens``   cap on the task's own ``max_new_tokens`` (default 16: the stock tasks
                     ask for 128-4096, far more than their short answers need)
``feature_cache``    images whose frozen features are kept for later questions (default 256,
                     least recently used out; 0: none kept between batches)
``device``           auto (CUDA if available), cpu, cuda:0...
``attention``        the LLM's attention kernel: sdpa, eager, flash_attention_2 (default:
                     transformers' default for the exported LLM)
===================  ==================================================================

Only ``generate_until`` is implemented: every benchmark of SPEC section 7 is a
``generate_until`` task (``loglikelihood`` and multi-round generation raise
``NotImplementedError``). Requests are grouped by generation settings, ordered so that the
questions about one image come together (images with longer prompts first, and within an image
longer prompts first), and answered ``batch_size`` at a time by :func:`~mgllava.model.answer_questions`
(transformers' ``generate`` with its KV cache, greedy, left-padded; the chat template's stop words
end an answer, and the task's ``until`` strings cut it). A worker thread prepares the next batch
(images, their boxes from :class:`mgllava.eval.boxes.BoxSource`, the processor's pixel values and
boxes) while the current one generates. Each distinct image (its content hash and the processor's
boxes) goes through the frozen encoders (:meth:`~mgllava.model.MGLLaVAForConditionalGeneration.encode_frozen`)
once: its features are kept in a least-recently-used cache of ``feature_cache`` images for its
other questions. ``stats["generate_s"]`` counts the model's calls: the frozen encoders and ``generate``
(with the prompts' tokenizing and the answers' decoding). When the model cannot get boxes (an image
with no table row and no detector, or a recorded detector that fails its sha256 check), it raises
:class:`~mgllava.eval.boxes.BoxesUnavailable`: the ``lmms-eval`` command stops with that message
and exit status 1 instead of logging the error and exiting 0.

The torch model and its processor are loaded once per process and directory (:func:`load_model`) and shared
by every instance: evaluating several tasks at once costs one copy of the weights.

Importing this module applies :func:`filelock_compat` (needed with filelock >= 4).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import get_args

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from detector.errors import DetectorError
from mgllava.config import Attention
from mgllava.eval.boxes import BoxesUnavailable, BoxSource, ImageRef, recorded_detector
from mgllava.model import answer_questions
from mgllava.model.vision import FrozenImageFeatures
from mgllava.torch_threads import helpers_on_one_thread

log = logging.getLogger(__name__)

# doc columns that hold an image's key (the shapes world's sets put box-table keys there)
IMAGE_KEY_COLUMNS = ("image_source", "image_id", "imageId", "image_key")

ATTENTION_KERNELS = get_args(Attention)

_MODELS: dict[tuple[str, str, str | None], torch.nn.Module] = {}
_MODELS_LOCK = threading.Lock()


def filelock_compat() -> None:
    """Let ``lmms_eval.evaluator.simple_evaluate`` run with filelock >= 4.

    lmms-eval 0.7.3's ``_enable_reentrant_filelocks`` imports ``filelock._api``, which
    filelock 4 no longer has: every run fails with ``ModuleNotFoundError``. That patch guards
    multi-rank hub downloads sharing one cache; local ``load_from_disk`` data takes no file
    locks, so the patch is marked as already applied. With filelock < 4 nothing changes.
    lmms-eval resolves ``--model mgllava`` (importing this module) before that call, so the
    ``lmms-eval`` command is covered too.
    """
    import importlib.util

    from lmms_eval import evaluator

    if importlib.util.find_spec("filelock._api") is None:
        evaluator._enable_reentrant_filelocks._patched = True


filelock_compat()


def resolve_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def load_model(export_dir: str | Path, device: str | None = None, attention: str | None = None):
    """``(model, processor)`` of the export in ``export_dir``, the model on ``device`` with the LLM's
    ``attention`` kernel (None: transformers' default), loaded once per process and setting (a legacy
    export is converted while loading)."""
    from mgllava.model import MGLLaVAForConditionalGeneration, MGLLaVAProcessor

    if attention is not None and attention not in ATTENTION_KERNELS:
        raise ValueError(f"mgllava: attention={attention!r}: choose one of {', '.join(ATTENTION_KERNELS)}")
    key = (str(Path(export_dir).resolve()), resolve_device(device), attention)
    with _MODELS_LOCK:
        if key not in _MODELS:
            t0 = time.perf_counter()
            model = MGLLaVAForConditionalGeneration.from_pretrained(key[0]).to(key[1]).eval()
            if attention is not None:
                model.llm.set_attn_implementation(attention)
            _MODELS[key] = (model, MGLLaVAProcessor.from_pretrained(key[0]))
            log.info("loaded MG-LLaVA from %s on %s (LLM attention: %s) in %.1f s", key[0], key[1],
                     model.llm.config._attn_implementation, time.perf_counter() - t0)
        return _MODELS[key]



def _as_bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


def _detector_settings(detector, conf, imgsz, iou, device, export_dir):
    """``(DetectorSettings or None, weights sha256 to check or None)``: ``detector=`` weights, ``none``,
    a DetectorSettings from Python callers, or (None) the export's recorded detector."""
    device = "cpu" if device == "cpu" else "auto"
    if detector is None:
        try:
            return recorded_detector(export_dir, device) or (None, None)
        except DetectorError as exc:
            raise BoxesUnavailable(f"mgllava: {exc}") from exc
    if isinstance(detector, str):
        if detector.strip().lower() in ("", "none"):
            return None, None
        from detector.model import DetectorSettings

        return DetectorSettings(model=detector, conf=float(conf), imgsz=int(imgsz), iou=float(iou), device=device), None
    return detector, None


class MGLLaVALmms(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str,
        boxes_dir: str | None = None,
        detector=None,
        detector_conf: float = 0.25,
        detector_imgsz: int = 320,
        detector_iou: float = 0.7,
        detection_cache: str | None = None,
        allow_missing: bool | str = False,
        batch_size: int | str = 8,
        max_new_tokens: int | str = 16,
        feature_cache: int | str = 256,
        device: str | None = None,
        attention: str | None = None,
        **unused,
    ) -> None:
        super().__init__()
        unused = {k: v for k, v in unused.items() if k != "max_batch_size"}
        if unused:
            log.warning("mgllava: ignoring unknown model arguments %s", sorted(unused))
        self.device = resolve_device(device)
        self.pretrained = str(Path(pretrained).resolve())
        settings, weights_sha256 = _detector_settings(  # a refused recorded detector stops before the model loads
            detector, detector_conf, detector_imgsz, detector_iou, self.device, self.pretrained
        )
        self.model, self.processor = load_model(pretrained, self.device, attention or None)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.feature_cache_size = int(feature_cache)
        if self.feature_cache_size < 0:
            raise ValueError(f"mgllava: feature_cache={feature_cache}: must be >= 0 (0: no cache)")
        self.feature_cache: OrderedDict[tuple, FrozenImageFeatures] = OrderedDict()  # least recently used first
        self.box_source = BoxSource(
            boxes_dir, settings, detection_cache, allow_missing=_as_bool(allow_missing), weights_sha256=weights_sha256
        )
        self.stats = {"requests": 0, "batches": 0, "generate_s": 0.0, "prepare_s": 0.0,  # generate_s: the model's calls
                      "images_encoded": 0}
        self.boxes_used: dict[tuple[str, int], tuple[int, str]] = {}  # (task, doc_id) -> (n boxes, origin)
        self._arrow_views: dict[tuple[str, str], object] = {}

    # ------------------------------------------------------------------ images and boxes

    def _stored_row(self, task: str, split: str, doc_id: int):
        """The doc's row as stored (a one-row ``pyarrow.Table``: nothing decoded)."""
        dataset = self.task_dict[task][split]
        return self._arrow_views.setdefault((task, split), dataset.with_format("arrow"))[doc_id]

    def _raw_image_bytes(self, task: str, split: str, doc_id: int) -> bytes | None:
        """The stored bytes of the doc's ``image`` column (what the box table's sha256 hashes)."""
        import datasets

        if not isinstance(self.task_dict[task][split].features.get("image"), datasets.Image):
            return None
        cell = self._stored_row(task, split, doc_id).column("image")[0].as_py()
        return cell.get("bytes") if cell else None

    def _image_group(self, request: Instance) -> str:
        """What puts a request with the other questions about its image, without decoding the image:
        the doc's image-key columns, else its stored image bytes, else (one group per doc) its id."""
        _, _, _, doc_id, task, split = request.args
        row = self._stored_row(task, split, doc_id)
        keys = [row.column(c)[0].as_py() for c in IMAGE_KEY_COLUMNS if c in row.column_names]
        if any(key is not None for key in keys):
            return repr(keys)
        raw = self._raw_image_bytes(task, split, doc_id)
        return f"sha256:{hashlib.sha256(raw).hexdigest()}" if raw is not None else f"doc:{doc_id}"

    def _image_ref(self, request: Instance) -> ImageRef | None:
        _, _, doc_to_visual, doc_id, task, split = request.args
        doc = self.task_dict[task][split][doc_id]
        visuals = [v for v in (doc_to_visual(doc) or []) if v is not None]
        if not visuals:
            return None
        if len(visuals) > 1:
            log.warning("%s doc %s has %d images; MG-LLaVA reads the first", task, doc_id, len(visuals))
        raw = self._raw_image_bytes(task, split, doc_id) if len(visuals) == 1 else None
        keys = tuple(str(doc[c]) for c in IMAGE_KEY_COLUMNS if doc.get(c) is not None)
        return ImageRef(visuals[0].convert("RGB"), raw, keys)

    # ------------------------------------------------------------------ lmms-eval API

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            gen_kwargs = dict(request.args[1] or {})
            until = gen_kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            max_new = min(int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)), self.max_new_tokens)
            groups.setdefault((max_new, until), []).append(i)
        images = [self._image_group(r) for r in requests]
        longest: dict[str, int] = {}  # image -> its longest prompt
        for image, request in zip(images, requests):
            longest[image] = max(longest.get(image, 0), len(request.args[0]))
        chunks = []  # (max_new, until, request indices), batch_size at a time, each image's questions together
        for (max_new, until), indices in groups.items():
            indices.sort(key=lambda i: (-longest[images[i]], images[i], -len(requests[i].args[0])))
            chunks += [(max_new, until, indices[s:s + self.batch_size]) for s in range(0, len(indices), self.batch_size)]
        # one thread prepares the next chunk's inputs while this one generates (a failure there,
        # BoxesUnavailable included, comes back through .result()); its torch ops run on one thread,
        # or a second OpenMP team as wide as generate's contends with it for the cores
        with helpers_on_one_thread(), ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="mgllava-prepare", initializer=torch.set_num_threads,
                initargs=(1,)) as pool:
            prepared = [pool.submit(self._prepare, [requests[i] for i in chunks[0][2]])] if chunks else []
            for k, (max_new, until, chunk) in enumerate(chunks):
                inputs = prepared[k].result()
                if k + 1 < len(chunks):
                    prepared.append(pool.submit(self._prepare, [requests[i] for i in chunks[k + 1][2]]))
                prepared[k] = None  # the chunk's tensors go once answered
                for i, text in zip(chunk, self._generate(inputs, max_new), strict=True):
                    for stop in until:
                        text = text.split(stop, 1)[0] if stop else text
                    answers[i] = text.strip()
        return answers

    def _prepare(self, requests: list[Instance]) -> dict:
        """What a chunk of requests needs before the model: ``questions``; per request ``pixel_values``
        (3, H, H) and ``boxes`` (K, 4) as :meth:`MGLLaVAProcessor.process_image` makes them, and the
        feature cache's ``keys`` (the image's content hash and those boxes), all None without an image.
        Each image decoded once, the chunk's boxes looked up together."""
        t0 = time.perf_counter()
        refs = [self._image_ref(r) for r in requests]
        with_image = [i for i, ref in enumerate(refs) if ref is not None]
        try:
            found_boxes = self.box_source.boxes([refs[i] for i in with_image])
        except (LookupError, DetectorError) as exc:
            raise BoxesUnavailable(f"mgllava: no boxes for the images of {requests[0].args[4]}: {exc}") from exc
        prepared = {"questions": [r.args[0] for r in requests], "pixel_values": [None] * len(refs),
                    "boxes": [None] * len(refs), "keys": [None] * len(refs)}
        for i, (found, origin) in zip(with_image, found_boxes):
            _, _, _, doc_id, task, _ = requests[i].args
            self.boxes_used[(task, doc_id)] = (len(found), origin)
            pixel_values, mapped = self.processor.process_image(refs[i].image, found)
            prepared["pixel_values"][i], prepared["boxes"][i] = pixel_values, mapped
            prepared["keys"][i] = (refs[i].content_hash(), tuple(mapped.shape), mapped.numpy().tobytes())
        self.stats["prepare_s"] += time.perf_counter() - t0
        return prepared

    def _image_features(self, prepared: dict) -> list[FrozenImageFeatures | None]:
        """Each prepared image's frozen features (None without an image): from the cache, or encoded
        in one :meth:`encode_frozen` call over the chunk's distinct new images, then cached."""
        found = {}
        for key in prepared["keys"]:
            if key is not None and key in self.feature_cache:
                self.feature_cache.move_to_end(key)
                found[key] = self.feature_cache[key]
        new = {key: i for i, key in enumerate(prepared["keys"]) if key is not None and key not in found}
        if new:
            encoded = self.model.encode_frozen(torch.stack([prepared["pixel_values"][i] for i in new.values()]),
                                               [prepared["boxes"][i] for i in new.values()])
            found.update(zip(new, encoded.unbind()))
            self.stats["images_encoded"] += len(new)
            if self.feature_cache_size:
                self.feature_cache.update((key, found[key]) for key in new)
                while len(self.feature_cache) > self.feature_cache_size:
                    self.feature_cache.popitem(last=False)
        return [None if key is None else found[key] for key in prepared["keys"]]

    def _generate(self, prepared: dict, max_new_tokens: int) -> list[str]:
        """Answers to one prepared chunk: greedy :func:`~mgllava.model.answer_questions` on the images'
        frozen features (the chat template's stop words end an answer)."""
        t0 = time.perf_counter()
        features = self._image_features(prepared)
        answers = answer_questions(self.model, self.processor, features, [None] * len(features),
                                   prepared["questions"], max_new_tokens=max_new_tokens)
        self.stats["generate_s"] += time.perf_counter() - t0
        self.stats["requests"] += len(answers)
        self.stats["batches"] += 1
        return answers

    def clean(self) -> None:
        """What lmms-eval calls after a task: drop this instance's hold on the model, without the
        base class's ``gc.collect()`` (about 0.7 s of CPU per task here), which frees nothing: the
        weights stay loaded in :func:`load_model`'s cache for the next task."""
        self.model = None

    def loglikelihood(self, requests):
        raise NotImplementedError("mgllava: loglikelihood is not implemented (no target benchmark needs it)")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("mgllava: multi-round generation is not implemented")
