"""Generate the synthetic shapes world: images, detector labels, LLaVA corpora and benchmark sets.

Layout of a world directory ``OUT`` (a contract other modules rely on)::

    OUT/
      world.json          manifest: version, seed, n_images, classes (YOLO class-id order), colors,
                          splits {train, val, bench: count}, corpora and benchmarks sizes, complete
      images/{train,val,bench}/000000.png
                          the image root; an image's key is its path relative to OUT/images
      labels/{train,val,bench}/000000.txt
                          YOLO labels "cls cx cy w h", normalised to 0..1
      data.yaml           Ultralytics dataset file (path, train, val, names)
      annotations.jsonl   one record per image: image, width, height, objects [{shape, color, size,
                          box [x1, y1, x2, y2] in pixels, x2/y2 exclusive}], text, text_box
      pretrain.json       LLaVA-Pretrain captions of the train images
      instruct.json       LLaVA-Instruct multi-turn questions about the train images
      bench/{pope,mmbench,textvqa,gqa,gqa_images}/
                          lmms-eval datasets from the bench images (see mgllava.shapes.world.benchmarks)

The val images are for the detector's mAP and appear in no corpus; the bench
images appear only in the benchmark sets. Everything is a function of
``(n_images, seed)``: the same pair gives byte-identical images, labels and
JSON files, and ``world.json`` (written last) marks a directory as complete,
so generating again into it is skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml
from tqdm import tqdm

from mgllava.shapes.world.corpora import build_instruct, build_pretrain
from mgllava.shapes.world.render import COLORS, SHAPES, Scene, draw_scene, sample_scene

log = logging.getLogger(__name__)

VERSION = 3
"""Bumped whenever the generated content changes, so that old worlds get regenerated."""

SPLITS: tuple[str, ...] = ("train", "val", "bench")

_OWNED = (
    "world.json",
    "images",
    "labels",
    "data.yaml",
    "annotations.jsonl",
    "pretrain.json",
    "instruct.json",
    "bench",
)
"""Everything generate_world writes under OUT (and removes before regenerating)."""


@dataclass(frozen=True)
class WorldSpec:
    """What a world is a function of; the split sizes are 70 / 10 / 20 % (at least 2 each)."""

    n_images: int = 400
    seed: int = 0
    conversations_per_image: int = 1

    def __post_init__(self) -> None:
        if self.n_images < 6:
            raise ValueError(f"a world needs at least 6 images (2 per split), got {self.n_images}")
        if self.conversations_per_image < 1:
            raise ValueError(f"conversations_per_image must be at least 1, got {self.conversations_per_image}")

    @property
    def splits(self) -> dict[str, int]:
        """Number of images of each split, in :data:`SPLITS` order."""
        n_val = max(2, round(0.1 * self.n_images))
        n_bench = max(2, round(0.2 * self.n_images))
        return {"train": self.n_images - n_val - n_bench, "val": n_val, "bench": n_bench}

    def matches(self, manifest: dict) -> bool:
        """Whether a ``world.json`` describes a complete world of this spec."""
        return (
            manifest.get("complete") is True
            and manifest.get("version") == VERSION
            and manifest.get("seed") == self.seed
            and manifest.get("n_images") == self.n_images
            and manifest.get("conversations_per_image", 1) == self.conversations_per_image
        )


def read_manifest(out_dir: str | Path) -> dict | None:
    """The ``world.json`` of a world directory, or None if there is none."""
    path = Path(out_dir) / "world.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_annotations(out_dir: str | Path, split: str | None = None) -> list[dict]:
    """The records of ``annotations.jsonl`` (all splits, or the one whose keys start with ``split/``)."""
    with open(Path(out_dir) / "annotations.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if split is None:
        return records
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return [r for r in records if r["image"].startswith(split + "/")]


def _annotation(key: str, scene: Scene) -> dict:
    return {
        "image": key,
        "width": scene.width,
        "height": scene.height,
        "objects": [obj.to_json() for obj in scene.objects],
        "text": scene.text,
        "text_box": list(scene.text_box) if scene.text_box is not None else None,
    }


def _yolo_labels(scene: Scene) -> str:
    lines = []
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        cx, cy = (x1 + x2) / 2 / scene.width, (y1 + y2) / 2 / scene.height
        w, h = (x2 - x1) / scene.width, (y2 - y1) / scene.height
        lines.append(f"{SHAPES.index(obj.shape)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
    return "".join(lines)


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def _render_split(out: Path, spec: WorldSpec, split: str, bar: tqdm) -> list[dict]:
    (out / "images" / split).mkdir(parents=True)
    (out / "labels" / split).mkdir(parents=True)
    records = []
    for i in range(spec.splits[split]):
        scene = sample_scene(random.Random(f"{spec.seed}/scene/{split}/{i}"), with_text=i % 2 == 0)
        key = f"{split}/{i:06d}.png"
        draw_scene(scene).save(out / "images" / key, format="PNG")
        (out / "labels" / split / f"{i:06d}.txt").write_text(_yolo_labels(scene))
        records.append(_annotation(key, scene))
        bar.update()
    return records


def generate_world(
    out_dir: str | Path, n_images: int = 400, seed: int = 0, progress: bool = True, conversations_per_image: int = 1
) -> Path:
    """Generate a world of ``n_images`` images from ``seed`` into ``out_dir`` and return its path;
    the instruction corpus holds ``conversations_per_image`` conversations about each train image.

    If ``out_dir`` already holds a complete world of the same spec nothing is done;
    otherwise whatever an earlier run left there (the paths of the layout only) is replaced.
    """
    # imported here: datasets is slow to import and only this step needs it
    from mgllava.shapes.world.benchmarks import build_benchmarks

    spec = WorldSpec(n_images, seed, conversations_per_image)
    out = Path(out_dir).resolve()
    manifest = read_manifest(out)
    if manifest is not None and spec.matches(manifest):
        log.info("world %s (n_images=%d, seed=%d) is already complete; skipping", out, n_images, seed)
        return out
    for name in _OWNED:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)

    with tqdm(total=n_images, desc="rendering shapes world", unit="img", disable=not progress) as bar:
        records = {split: _render_split(out, spec, split, bar) for split in SPLITS}
    with open(out / "annotations.jsonl", "w") as f:
        for split in SPLITS:
            f.writelines(json.dumps(r) + "\n" for r in records[split])
    data_yaml = {
        "path": str(out),
        "train": "images/train",
        "val": "images/val",
        "names": dict(enumerate(SHAPES)),
    }
    (out / "data.yaml").write_text(yaml.safe_dump(data_yaml, sort_keys=False))

    pretrain = build_pretrain(records["train"], seed)
    instruct = build_instruct(records["train"], seed, conversations_per_image)
    _write_json(out / "pretrain.json", pretrain)
    _write_json(out / "instruct.json", instruct)
    bench_sizes = build_benchmarks(
        records["bench"], seed, lambda key: (out / "images" / key).read_bytes(), out / "bench"
    )

    manifest = {
        "version": VERSION,
        "seed": seed,
        "n_images": n_images,
        "conversations_per_image": conversations_per_image,
        "classes": list(SHAPES),
        "colors": list(COLORS),
        "splits": spec.splits,
        "corpora": {"pretrain": len(pretrain), "instruct": len(instruct)},
        "benchmarks": bench_sizes,
        "complete": True,
    }
    tmp = out / "world.json.tmp"
    _write_json(tmp, manifest)
    tmp.replace(out / "world.json")
    log.info("generated world %s: %s", out, summary(manifest))
    return out


def summary(manifest: dict) -> str:
    """One line describing a world from its manifest."""
    splits = "/".join(str(manifest["splits"][s]) for s in SPLITS)
    corpora = ", ".join(f"{k} {v}" for k, v in manifest["corpora"].items())
    bench = ", ".join(f"{k} {v}" for k, v in manifest["benchmarks"].items())
    return (
        f"{manifest['n_images']} images (train/val/bench {splits}), seed {manifest['seed']}, "
        f"{len(manifest['classes'])} classes; conversations: {corpora}; benchmark questions: {bench}"
    )


def _run_cli(args: argparse.Namespace) -> None:
    from mgllava.cli import UsageError, config_from_args

    config = config_from_args(args)
    if config.shapes is None:
        raise UsageError("--preset", f"configuration '{config.preset}' has no shapes section (the demo kit's settings)")
    spec = config.shapes.world
    out = generate_world(
        args.out or spec.dir,
        n_images=args.images or spec.n_images,
        seed=spec.seed if args.seed is None else args.seed,
        progress=not args.quiet,
        conversations_per_image=args.conversations_per_image or spec.conversations_per_image,
    )
    print(f"shapes world at {out}: {summary(read_manifest(out) or {})}")


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``world`` subcommand: ``mgllava world [--preset P] [--out DIR] [--images N] [--seed S]``."""
    from mgllava.cli import add_config_args, positive_int

    parser = subparsers.add_parser(
        "world",
        help="generate the synthetic shapes world (images, YOLO labels, LLaVA corpora, benchmark sets)",
        description=(
            "Render a deterministic synthetic world of coloured shapes and small numbers, with YOLO "
            "labels and an Ultralytics data.yaml for the detector, LLaVA-Pretrain/-Instruct JSON for "
            "training, and POPE/MMBench/TextVQA/GQA sets in the schemas of the stock lmms-eval tasks. "
            "Images are split 70/10/20 % into train, val (detector mAP only) and bench. Defaults come "
            "from the configuration (shapes.world.*). Running again with the same images, seed and "
            "conversations per image into a complete world does nothing."
        ),
    )
    add_config_args(parser)
    parser.add_argument("--out", type=Path, help="output directory, created if missing (default: shapes.world.dir)")
    parser.add_argument("--images", type=positive_int, help="total number of images, at least 6 "
                        "(default: shapes.world.n_images)")
    parser.add_argument("--seed", type=int, help="random seed; same seed, same bytes (default: shapes.world.seed)")
    parser.add_argument(
        "--conversations-per-image",
        type=positive_int,
        help="instruction conversations about each train image, each with its own questions "
        "(default: shapes.world.conversations_per_image)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run_cli)
