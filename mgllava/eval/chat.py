"""``mgllava chat``: detect objects in one image, show the boxes, answer questions about it.

The detector (the configuration's, or given weights / a model YAML) runs once on the
image; its boxes, in original-image pixels, are printed and passed with every question to
:func:`mgllava.model.answer_questions` (the processor applies its own NMS and per-category
cap, as in training; transformers' ``generate`` decodes). With ``stream``, ``A: `` and the answer are
printed to stdout token by token as it is generated (a ``TextStreamer``). A session is one conversation: each question is asked after the
earlier questions and answers (the chat template's multi-turn format, the image in the
first turn), so ``--interactive`` is a multi-turn chat about the image, with the model and
boxes loaded once. The image is read with detection's loader (:func:`detector.images.decode_image`,
limit ``detector.max_image_pixels``): a missing, corrupt or oversized file is one clear error.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from detector.errors import DetectorError
from detector.images import Rejected, decode_image
from detector.tables import Detection
from mgllava.model.boxes import Boxes

EXIT_WORDS = ("exit", "quit")


def answer_streamer(tokenizer):
    """A ``TextStreamer`` that prints the answer as it is generated, without the space the tokenizer's
    first word piece carries ("A: the", not "A:  the")."""
    from transformers import TextStreamer

    class AnswerStreamer(TextStreamer):
        started = False

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if not self.started:
                text = text.lstrip()
                self.started = bool(text)
            super().on_finalized_text(text, stream_end)

    return AnswerStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def format_boxes(detections: list[Detection], detector_name: str = "") -> str:
    head = f"{len(detections)} box{'es' if len(detections) != 1 else ''}" + (
        f" from {detector_name}" if detector_name else "")
    lines = [head + (":" if detections else "")]
    lines += [f"  {label:<12} {score:.2f}  [{x1:.0f}, {y1:.0f}, {x2:.0f}, {y2:.0f}]"
              for x1, y1, x2, y2, score, label in detections]
    return "\n".join(lines)


class ChatSession:
    """One image, its detections and the model, ready to answer questions."""

    def __init__(self, model_dir: str | Path, image_path: str | Path, detector_settings,
                 max_new_tokens: int = 64, device: str | None = None, stream: bool = False):
        from detector.model import get_detector
        from mgllava.eval.lmms_model import load_model

        decoded = decode_image(str(image_path), str(image_path), detector_settings.max_image_pixels)
        if isinstance(decoded, Rejected):
            raise DetectorError(f"cannot use image {image_path}: {decoded.reason}: {decoded.detail}")
        self.image = decoded.image
        detector = get_detector(detector_settings)
        self.detector_name = detector.name
        self.detections = detector.predict([np.asarray(self.image)[:, :, ::-1].copy()])[0]
        self.model, self.processor = load_model(model_dir, device)
        self.max_new_tokens = max_new_tokens
        self.stream = stream
        self.history: list[tuple[str, str]] = []  # earlier (question, answer) turns

    def describe_boxes(self) -> str:
        return format_boxes(self.detections, self.detector_name)

    def ask(self, question: str) -> str:
        """The answer to ``question`` as the next turn of the conversation (which it joins)."""
        from mgllava.model import answer_questions

        tokenizer = self.processor.tokenizer
        streamer = None
        if self.stream:  # "A: " then the answer's text as it is generated, then a newline
            print("A: ", end="", flush=True)
            streamer = answer_streamer(tokenizer)
        answer = answer_questions(
            self.model, self.processor, [self.image], [Boxes.from_detections(self.detections)], [question],
            [self.history], max_new_tokens=self.max_new_tokens, streamer=streamer,
        )[0]
        self.history.append((question, answer))
        return answer

    def interact(self, lines: Iterable[str]) -> Iterator[tuple[str, str]]:
        """``(question, answer)`` for each non-empty line until EOF or ``exit``/``quit``."""
        for line in lines:
            question = line.strip()
            if question.lower() in EXIT_WORDS:
                return
            if question:
                yield question, self.ask(question)
