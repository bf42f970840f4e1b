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
``device``           auto (CUDA if available), cpu, cuda:0...
===================  ==================================================================

Only ``generate_until`` is implemented: every benchmark of SPEC section 7 is a
``generate_until`` task (``loglikelihood`` and multi-round generation raise
``NotImplementedError``). Requests are grouped by generation settings, sorted by prompt
length, and answered ``batch_size`` at a time as :func:`~mgllava.model.answer_questions` answers
(transformers' ``generate`` with its KV cache, greedy, left-padded; the chat template's stop words
end an answer, and the task's ``until`` strings cut it). A worker thread prepares the next batch
(images, their boxes from :class:`mgllava.eval.boxes.BoxSource`, the processor's inputs) while the
current one generates; ``stats["generate_s"]`` counts the model's ``generate`` calls alone. When the model cannot get boxes (an image
with no table row and no detector, or a recorded detector that fails its sha256 check), it raises
:class:`~mgllava.eval.boxes.BoxesUnavailable`: the ``lmms-eval`` command stops with that message
and exit status 1 instead of logging the error and exiting 0.

The torch model and its processor are loaded once per process and directory (:func:`load_model`) and shared
by every instance: evaluating several tasks at once costs one copy of the weights.

Importing this module applies :func:`filelock_compat` (needed with filelock >= 4).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from detector.errors import DetectorError
from mgllava.eval.boxes import BoxesUnavailable, BoxSource, ImageRef, recorded_detector

log = logging.getLogger(__name__)

# doc columns that hold an image's key (the shapes world's sets put box-table keys there)
IMAGE_KEY_COLUMNS = ("image_source", "image_id", "imageId", "image_key")

_MODELS: dict[tuple[str, str], torch.nn.Module] = {}
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


def load_model(export_dir: str | Path, device: str | None = None):
    """``(model, processor)`` of the export in ``export_dir``, the model on ``device``, loaded once per
    process (a legacy export is converted while loading)."""
    from mgllava.model import MGLLaVAForConditionalGeneration, MGLLaVAProcessor

    key = (str(Path(export_dir).resolve()), resolve_device(device))
    with _MODELS_LOCK:
        if key not in _MODELS:
            t0 = time.perf_counter()
            model = MGLLaVAForConditionalGeneration.from_pretrained(key[0]).to(key[1]).eval()
            _MODELS[key] = (model, MGLLaVAProcessor.from_pretrained(key[0]))
            log.info("loaded MG-LLaVA from %s on %s in %.1f s", key[0], key[1], time.perf_counter() - t0)
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
        device: str | None = None,
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
        self.model, self.processor = load_model(pretrained, self.device)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.box_source = BoxSource(
            boxes_dir, settings, detection_cache, allow_missing=_as_bool(allow_missing), weights_sha256=weights_sha256
        )
        self.stats = {"requests": 0, "batches": 0, "generate_s": 0.0, "prepare_s": 0.0}  # generate_s: the model's generate calls
        self.boxes_used: dict[tuple[str, int], tuple[int, str]] = {}  # (task, doc_id) -> (n boxes, origin)
        self._arrow_views: dict[tuple[str, str], object] = {}

    # ------------------------------------------------------------------ images and boxes

    def _raw_image_bytes(self, task: str, split: str, doc_id: int) -> bytes | None:
        """The stored bytes of the doc's ``image`` column (what the box table's sha256 hashes)."""
        import datasets

        dataset = self.task_dict[task][split]
        if not isinstance(dataset.features.get("image"), datasets.Image):
            return None
        view = self._arrow_views.setdefault((task, split), dataset.with_format("arrow"))
        cell = view[doc_id].column("image")[0].as_py()
        return cell.get("bytes") if cell else None

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
        chunks = []  # (max_new, until, request indices), batch_size at a time, longest prompts first
        for (max_new, until), indices in groups.items():
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            chunks += [(max_new, until, indices[s:s + self.batch_size]) for s in range(0, len(indices), self.batch_size)]
        # one thread prepares the next chunk's inputs while this one generates (a failure there,
        # BoxesUnavailable included, comes back through .result()); its torch ops run on one thread,
        # or a second OpenMP team as wide as generate's contends with it for the cores
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mgllava-prepare",
                                initializer=torch.set_num_threads, initargs=(1,)) as pool:
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
        """The ``generate`` inputs of a chunk of requests (:meth:`MGLLaVAProcessor.chat_inputs`): each
        image decoded once, the chunk's boxes looked up together."""
        t0 = time.perf_counter()
        refs = [self._image_ref(r) for r in requests]
        with_image = [i for i, ref in enumerate(refs) if ref is not None]
        boxes = [None] * len(refs)
        try:
            found_boxes = self.box_source.boxes([refs[i] for i in with_image])
        except (LookupError, DetectorError) as exc:
            raise BoxesUnavailable(f"mgllava: no boxes for the images of {requests[0].args[4]}: {exc}") from exc
        for i, (found, origin) in zip(with_image, found_boxes):
            boxes[i] = found
            _, _, _, doc_id, task, _ = requests[i].args
            self.boxes_used[(task, doc_id)] = (len(found), origin)
        inputs = self.processor.chat_inputs([ref.image if ref else None for ref in refs], boxes,
                                            [r.args[0] for r in requests])
        self.stats["prepare_s"] += time.perf_counter() - t0
        return inputs

    def _generate(self, inputs: dict, max_new_tokens: int) -> list[str]:
        """Answers to one prepared chunk: greedy ``generate`` (the chat template's stop words end an answer)
        as :func:`~mgllava.model.answer_questions` runs it, on inputs prepared ahead."""
        inputs = {key: value.to(self.model.device) if isinstance(value, torch.Tensor) else value
                  for key, value in inputs.items()}
        t0 = time.perf_counter()
        generated = self.model.generate(**inputs, do_sample=False, **self.processor.generate_kwargs(),
                                        max_new_tokens=max_new_tokens)  # (B, T + new)
        self.stats["generate_s"] += time.perf_counter() - t0
        self.stats["requests"] += len(generated)
        self.stats["batches"] += 1
        return self.processor.decode_answers(generated[:, inputs["input_ids"].shape[1]:])

    def clean(self) -> None:
        """What lmms-eval calls after a task: drop this instance's hold on the model, without the
        base class's ``gc.collect()`` (about 0.7 s of CPU per task here), which frees nothing: the
        weights stay loaded in :func:`load_model`'s cache for the next task."""
        self.model = None

    def loglikelihood(self, requests):
        raise NotImplementedError("mgllava: loglikelihood is not implemented (no target benchmark needs it)")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("mgllava: multi-round generation is not implemented")
