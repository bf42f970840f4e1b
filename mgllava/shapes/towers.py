"""Pretraining of the tiny zoo's vision towers: the stand-in for CLIP's own pretraining.

The real recipe starts from CLIP encoders that already tell colours and shapes apart;
random-weight tiny towers do not (docs/findings.md). So ``mgllava zoo`` first trains the
two towers on shapes scenes rendered here,
from a seed namespace of their own (``zoo/<i>``), never the world's images or benchmarks:

- ConvNeXt (the high-res tower): each object is cut out in a ``crop x crop`` window at
  the high-res scale (its centre jittered), its box pooled with the model's own RoIAlign
  pooling (:func:`mgllava.model.pool_object_features`), and a linear head names its
  (colour, shape), one of 24 classes: cross-entropy. This is the path object tokens take.
- CLIP ViT (the low-res tower), afterwards: distilled from that ConvNeXt. At ``low_res``,
  every patch token of the layer the model reads (``select_layer``), through a linear head,
  regresses the ConvNeXt's standardised last-stage features at its place on the grid (mean
  squared error), so that its tokens tell the objects apart.

The heads are dropped afterwards. :func:`pretrain_towers` returns held-out accuracies
(measured on other rendered scenes), which the zoo writes to ``zoo.json``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mgllava.model.boxes import square_padding
from mgllava.model.object_features import pool_object_features
from mgllava.model.vision import downsample, image_to_pixel_values
from mgllava.shapes.world.render import COLORS, SHAPES, draw_scene, sample_scene

log = logging.getLogger(__name__)

CLASSES: list[tuple[str, str]] = [(color, shape) for color in COLORS for shape in SHAPES]
"""The 24 (colour, shape) classes the towers learn to name."""


@dataclass
class RenderedScenes:
    """Scenes at the high-res scale: images, and per object its box (high-res pixels) and class."""

    pixel_values: torch.Tensor  # (N, 3, high_res, high_res), CLIP-normalised
    boxes: list[torch.Tensor]  # N tensors (K_i, 4): x1, y1, x2, y2 in the high-res frame
    classes: list[torch.Tensor]  # N tensors (K_i,): index into CLASSES


def render_scenes(n: int, namespace: str, high_res: int, mean, std) -> RenderedScenes:
    """``n`` scenes ``{namespace}/{i}``, padded to a square and resized as the model's processor does."""
    images, boxes, classes = [], [], []
    for i in range(n):
        scene = sample_scene(random.Random(f"{namespace}/{i}"), with_text=i % 2 == 0)
        side, left, top = square_padding(scene.width, scene.height)
        scale = high_res / side
        images.append(image_to_pixel_values(draw_scene(scene), high_res, mean, std))
        boxes.append(torch.tensor(
            [[(x1 + left) * scale, (y1 + top) * scale, (x2 + left) * scale, (y2 + top) * scale]
             for x1, y1, x2, y2 in (o.box for o in scene.objects)], dtype=torch.float32).view(-1, 4))
        classes.append(torch.tensor([CLASSES.index((o.color, o.shape)) for o in scene.objects], dtype=torch.long))
    return RenderedScenes(torch.stack(images), boxes, classes)


def object_crops(scenes: RenderedScenes, crop: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ``crop x crop`` window per object, centred on it with a jitter of up to crop / 8 px.

    Returns the crops (M, 3, crop, crop), each object's box in its crop's frame (M, 4) and
    its class (M,). Outside the image the window reads zeros (the normalised mean colour).
    """
    padded = F.pad(scenes.pixel_values, (crop, crop, crop, crop))  # room for windows at the borders
    crops, boxes = [], []
    for image, image_boxes in zip(padded, scenes.boxes):
        for x1, y1, x2, y2 in image_boxes.tolist():
            cx = (x1 + x2) / 2 + crop + rng.uniform(-crop / 8, crop / 8)
            cy = (y1 + y2) / 2 + crop + rng.uniform(-crop / 8, crop / 8)
            left, top = int(cx - crop / 2), int(cy - crop / 2)
            crops.append(image[:, top : top + crop, left : left + crop])
            boxes.append([x1 + crop - left, y1 + crop - top, x2 + crop - left, y2 + crop - top])
    return torch.stack(crops), torch.tensor(boxes), torch.cat(scenes.classes)


def fit(parameters, steps: int, lr: float, loss_of_step, weight_decay: float = 0.05, name: str | None = None) -> list[float]:
    """``steps`` AdamW steps with a one-cycle schedule and clipping at 1.0; ``loss_of_step(step)``
    returns the step's loss. Returns each step's loss. (Also the tiny LLM's text pretraining.)
    With a ``name``, the mean loss is logged every tenth of the way."""
    parameters = list(parameters)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    # OneCycleLR needs two steps or more; one more than taken keeps a single step valid
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps + 1, pct_start=0.1)
    losses, log_every = [], max(1, steps // 10)
    for step in range(steps):
        loss = loss_of_step(step)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if name and (step + 1) % log_every == 0:
            recent = losses[-log_every:]
            log.info("%s: step %d/%d, loss %.3f", name, step + 1, steps, sum(recent) / len(recent))
    return losses


def pretrain_convnext(trunk, scenes: RenderedScenes, held_out: RenderedScenes, epochs: int,
                      crop: int = 96, batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> dict[str, float]:
    """Train the timm ConvNeXt ``trunk`` to name each object from its RoI-pooled box features."""
    rng = random.Random(seed)
    crops, boxes, classes = object_crops(scenes, crop, rng)
    channels = sum(info["num_chs"] for info in trunk.feature_info[-4:])
    head = nn.Linear(channels, len(CLASSES))

    def logits(images: torch.Tensor, image_boxes: torch.Tensor) -> torch.Tensor:
        maps = trunk.forward_intermediates(images, intermediates_only=True)
        features = pool_object_features(maps, list(image_boxes[:, None]), crop, output_size=4, method="lean")
        return head(torch.cat(features))  # (M, 24)

    per_epoch = max(1, len(crops) // batch_size)
    order = torch.cat([torch.randperm(len(crops), generator=torch.Generator().manual_seed(seed + e))
                       for e in range(epochs)])

    def loss_of_step(step: int) -> torch.Tensor:
        batch = order[step * batch_size : (step + 1) * batch_size]
        return F.cross_entropy(logits(crops[batch], boxes[batch]), classes[batch])

    trunk.train()
    losses = fit([*trunk.parameters(), *head.parameters()], epochs * per_epoch, lr, loss_of_step)
    trunk.eval()
    test_crops, test_boxes, test_classes = object_crops(held_out, crop, rng)
    with torch.no_grad():
        predicted = logits(test_crops, test_boxes).argmax(dim=1)
    n_shapes = len(SHAPES)
    return {
        "convnext_loss": losses[-1],
        "convnext_class_acc": (predicted == test_classes).float().mean().item(),
        "convnext_color_acc": (predicted // n_shapes == test_classes // n_shapes).float().mean().item(),
        "convnext_shape_acc": (predicted % n_shapes == test_classes % n_shapes).float().mean().item(),
    }


def pretrain_clip(clip, teacher_trunk, scenes: RenderedScenes, held_out: RenderedScenes, low_res: int,
                  select_layer: int, epochs: int, batch_size: int = 32, lr: float = 2e-3,
                  seed: int = 0) -> dict[str, float]:
    """Distil the (pretrained) ConvNeXt into the transformers ``CLIPVisionModel``: through a linear
    head, each patch token of layer ``select_layer`` regresses the teacher's standardised last-stage
    features at its place on the grid (the stage map average-pooled to the CLIP grid)."""
    grid = clip.config.image_size // clip.config.patch_size

    @torch.no_grad()
    def teacher(pixel_values: torch.Tensor) -> torch.Tensor:  # (N, grid * grid, C_4)
        last = [teacher_trunk.forward_intermediates(chunk, intermediates_only=True)[-1] for chunk in pixel_values.split(64)]
        return F.adaptive_avg_pool2d(torch.cat(last), grid).flatten(2).transpose(1, 2)

    targets, test_targets = teacher(scenes.pixel_values), teacher(held_out.pixel_values)
    mean, std = targets.mean(dim=(0, 1)), targets.std(dim=(0, 1)) + 1e-6
    targets, test_targets = (targets - mean) / std, (test_targets - mean) / std
    head = nn.Linear(clip.config.hidden_size, targets.shape[-1])

    def predict(pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = clip(downsample(pixel_values, low_res), output_hidden_states=True).hidden_states[select_layer]
        return head(hidden[:, 1:])  # (B, grid * grid, C_4)

    per_epoch = max(1, len(targets) // batch_size)
    order = torch.cat([torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed + e))
                       for e in range(epochs)])

    def loss_of_step(step: int) -> torch.Tensor:
        batch = order[step * batch_size : (step + 1) * batch_size]
        return F.mse_loss(predict(scenes.pixel_values[batch]), targets[batch])

    clip.train()
    losses = fit([*clip.parameters(), *head.parameters()], epochs * per_epoch, lr, loss_of_step)
    clip.eval()
    with torch.no_grad():
        residual = F.mse_loss(predict(held_out.pixel_values), test_targets).item()
    return {"clip_loss": losses[-1], "clip_distill_r2": 1.0 - residual}  # targets have unit variance


def pretrain_towers(clip, convnext_trunk, high_res: int, low_res: int, *, mean, std, select_layer: int = -2,
                    n_scenes: int = 1200, epochs: int = 3) -> dict[str, float]:
    """Pretrain both towers in place on ``n_scenes`` rendered scenes, normalised with the towers'
    ``mean``/``std``; returns held-out accuracies."""
    if n_scenes <= 0 or epochs <= 0:
        return {}
    scenes = render_scenes(n_scenes, "zoo/train", high_res, mean, std)
    held_out = render_scenes(max(20, n_scenes // 10), "zoo/held-out", high_res, mean, std)
    metrics = pretrain_convnext(convnext_trunk, scenes, held_out, epochs)
    log.info("ConvNeXt pretraining: held-out colour %.2f, shape %.2f, class %.2f",
             metrics["convnext_color_acc"], metrics["convnext_shape_acc"], metrics["convnext_class_acc"])
    metrics |= pretrain_clip(clip, convnext_trunk, scenes, held_out, low_res, select_layer, epochs)
    log.info("CLIP pretraining (distilled from the ConvNeXt): held-out R^2 %.2f", metrics["clip_distill_r2"])
    return metrics
