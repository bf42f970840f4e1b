"""The embedded default's demo kit: a synthetic world and the tiny models built on it.

Everything here exists only so that the whole pipeline runs, and learns, on a CPU in minutes:

- :mod:`mgllava.shapes.world`: the shapes world, images of coloured shapes and small numbers with
  YOLO labels, LLaVA-format corpora and benchmark sets in the public formats (``mgllava world``);
- :mod:`mgllava.shapes.zoo`: tiny checkpoints in the full-size public layouts (a Hugging Face LLM and
  tokenizer, a CLIP ViT, an open_clip ConvNeXt) trained on that world (``mgllava zoo``);
- :mod:`mgllava.shapes.towers`: the pretraining of the tiny vision towers, and its small ``fit`` loop.

The product (``mgllava.model``, ``mgllava.train``, ``mgllava.eval``, ``detector``, ``warehouse``)
never imports this package; the flows and the CLI do. Its settings are the config's ``shapes``
section, which only the tiny preset carries.
"""

from __future__ import annotations

from pathlib import Path


def prepare(config) -> dict:
    """Generate the shapes world and build the tiny zoo where the config asks for them (idempotent: each
    is rebuilt only if missing, incomplete or made with other settings). Without a ``shapes`` section or
    nothing is made. An LLM path that exists but is no zoo of ours (no ``zoo.json``
    beside it) is left alone."""
    from mgllava.shapes.world import generate_world
    from mgllava.shapes.zoo import build_zoo

    if config.shapes is None:
        return {"world": None, "zoo": None}
    recipe = config.shapes
    world = generate_world(recipe.world.dir, n_images=recipe.world.n_images, seed=recipe.world.seed,
                           progress=False, conversations_per_image=recipe.world.conversations_per_image)
    zoo = Path(config.model.llm.path).parent
    if not Path(config.model.llm.path).exists() or (zoo / "zoo.json").exists():  # absent, or ours: (re)build
        vision = config.model.vision
        build_zoo(zoo, world, vision.high_res, vision.low_res, config.model.max_length, recipe=recipe.zoo)
    return {"world": str(world), "zoo": str(zoo)}
