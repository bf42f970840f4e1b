"""Scenes of the synthetic shapes world: sampling and drawing.

A scene is a plain light (optionally lightly noised) canvas of 192..384 px per
side, square about a third of the time, carrying 1-6 non-overlapping coloured
shapes of three size classes and, on request, a small rendered 2-4 digit number
that no shape overlaps.

Everything is a pure function of a :class:`random.Random`, so a scene is fully
determined by the seed it is sampled with; drawing uses Pillow only.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
"""Shape names in YOLO class-id order."""

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 195, 0),
    "purple": (140, 40, 170),
    "orange": (245, 120, 10),
}
COLORS: tuple[str, ...] = tuple(COLOR_RGB)
"""Colour names used for shapes."""

SIZE_RANGES: dict[str, tuple[int, int]] = {"small": (8, 14), "medium": (20, 34), "large": (42, 64)}
"""Side length (px) of a shape's bounding box for each size class, inclusive."""

SIDE_CHOICES: tuple[int, ...] = tuple(range(192, 385, 16))
"""Possible image widths and heights."""

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class ShapeObject:
    """One shape: its kind, colour, size class and pixel box ``(x1, y1, x2, y2)``, x2/y2 exclusive."""

    shape: str
    color: str
    size: str
    box: Box

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2

    def to_json(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size, "box": list(self.box)}


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw one image and to ask questions about it."""

    width: int
    height: int
    background: tuple[int, int, int]
    noise: int
    noise_seed: int
    objects: tuple[ShapeObject, ...]
    text: str | None
    text_box: Box | None
    text_size: int
    text_pos: tuple[int, int] | None


def _overlaps(a: Box, b: Box, gap: int = 3) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def sample_scene(rng: random.Random, with_text: bool) -> Scene:
    """Sample one scene: canvas size, background, 1-6 shapes and, if ``with_text`` (and it fits,
    which it practically always does), a small 2-4 digit number."""
    if rng.random() < 0.3:
        width = height = rng.choice(SIDE_CHOICES)
    else:
        width, height = rng.choice(SIDE_CHOICES), rng.choice(SIDE_CHOICES)
    background = tuple(rng.randint(228, 250) for _ in range(3))
    noise = rng.choice((0, 0, 0, 3, 6))
    noise_seed = rng.getrandbits(32)

    taken: list[Box] = []
    text = text_box = text_pos = None
    text_size = rng.randint(11, 16)
    if with_text:
        candidate = str(rng.randint(10, 9999))
        font = _font(text_size)
        left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox(
            (0, 0), candidate, font=font
        )
        tw, th = right - left, bottom - top
        for _ in range(50):
            x, y = rng.randint(4, width - tw - 4), rng.randint(4, height - th - 4)
            box = (x, y, x + tw, y + th)
            if not any(_overlaps(box, t) for t in taken):
                text, text_box, text_pos = candidate, box, (x - left, y - top)
                taken.append(box)
                break

    objects: list[ShapeObject] = []
    for _ in range(rng.randint(1, 6)):
        shape, color = rng.choice(SHAPES), rng.choice(COLORS)
        size = rng.choices(tuple(SIZE_RANGES), weights=(0.3, 0.4, 0.3))[0]
        side = rng.randint(*SIZE_RANGES[size])
        for _ in range(60):
            x, y = rng.randint(2, width - side - 2), rng.randint(2, height - side - 2)
            box = (x, y, x + side, y + side)
            if not any(_overlaps(box, t) for t in taken):
                objects.append(ShapeObject(shape, color, size, box))
                taken.append(box)
                break
    if not objects:  # practically unreachable: the first shape always fits next to a small number
        raise RuntimeError("could not place any shape")
    return Scene(
        width, height, background, noise, noise_seed, tuple(objects), text, text_box, text_size, text_pos
    )


def _star_points(box: Box) -> list[tuple[float, float]]:
    x1, y1, x2, y2 = box
    cx, r_out = (x1 + x2 - 1) / 2, (x2 - x1 - 1) / 2
    # the outer points span 2*r_out*cos(18deg) horizontally and r_out*(1+cos(36deg)) vertically:
    # scale and shift so that the star fills its box edge to edge
    sx = r_out / (r_out * math.cos(math.radians(18)))
    sy = (y2 - y1 - 1) / (r_out * (1 + math.cos(math.radians(36))))
    top = y1
    points = []
    for k in range(10):
        r = r_out if k % 2 == 0 else r_out * 0.45
        a = math.radians(-90 + 36 * k)
        points.append((cx + sx * r * math.cos(a), top + sy * (r * math.sin(a) + r_out)))
    return points


def draw_scene(scene: Scene) -> Image.Image:
    """Render a scene to an RGB image."""
    canvas = np.empty((scene.height, scene.width, 3), dtype=np.int16)
    canvas[:] = scene.background
    if scene.noise:
        gen = np.random.default_rng(scene.noise_seed)
        grain = gen.integers(
            -scene.noise, scene.noise + 1, size=(scene.height, scene.width, 1), dtype=np.int16
        )
        canvas += grain
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        fill = COLOR_RGB[obj.color]
        x1, y1, x2, y2 = obj.box
        inner = (x1, y1, x2 - 1, y2 - 1)
        if obj.shape == "circle":
            draw.ellipse(inner, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(inner, fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([((x1 + x2 - 1) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=fill)
        elif obj.shape == "star":
            draw.polygon(_star_points(obj.box), fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
    if scene.text is not None and scene.text_pos is not None:
        draw.text(scene.text_pos, scene.text, fill=(20, 20, 20), font=_font(scene.text_size))
    return image
