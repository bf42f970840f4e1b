"""The synthetic "shapes world": a deterministic stand-in for MG-LLaVA's training and evaluation data.

``generate_world(out_dir, n_images, seed)`` renders images of coloured shapes and
small numbers and writes, next to them, YOLO labels for the offline detector,
LLaVA-format caption and instruction corpora, and benchmark sets in the schemas
of lmms-eval's POPE, MMBench, TextVQA and GQA tasks. See
:mod:`mgllava.shapes.world.generate` for the directory layout and
:mod:`mgllava.shapes.world.benchmarks` for wiring the sets into lmms-eval tasks.
"""

from mgllava.shapes.world.generate import (
    WorldSpec,
    generate_world,
    load_annotations,
    read_manifest,
    register_cli,
)
from mgllava.shapes.world.render import COLORS, SHAPES

__all__ = [
    "COLORS",
    "SHAPES",
    "WorldSpec",
    "generate_world",
    "load_annotations",
    "read_manifest",
    "register_cli",
]
