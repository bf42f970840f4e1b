"""``mgllava convert``: a published MG-LLaVA checkpoint (the reference's XTuner/mmengine format) into an
export directory (``save_pretrained``) that ``MGLLaVAForConditionalGeneration.from_pretrained``, the
transformers Auto classes, ``mgllava evaluate --model`` and ``mgllava chat`` load.

The reference saves ``model.state_dict()`` of its ``MultiFuseObjectLLaVAModel`` (frozen encoders left
out) in one of two layouts:

- one file (``iter_N.pth``): the state dict, or a dict holding it under ``state_dict`` (mmengine);
- a DeepSpeed checkpoint directory: ``DIR/mp_rank_00_model_states.pt`` (the directory is the tag), or
  ``DIR/latest`` naming the tag folder ``DIR/<tag>/``; the state dict is under ``module``.

A ``.safetensors`` file of the same state dict is read too. Its names map onto ours:

============================================  =======================================
reference                                     mgllava
============================================  =======================================
``llm.*``                                     ``llm.*`` (the whole LLM)
``projector.model.{0,2}.*``                   ``projector.{0,2}.*``
``bbox_projector.model.{0,2}.*``              ``box_projector.{0,2}.*``
``fuse_module.slow_conv.*``                   ``fusion.conv1x1_h.*`` (high-res 1x1 conv)
``fuse_module.slow_proj.*``                   ``fusion.proj_h.*`` (1x1 to the CLIP width)
``fuse_module.fast_conv.*``                   ``fusion.dwconv7x7.*`` (low-res depthwise 7x7)
``fuse_module.fast_proj.*``                   ``fusion.proj_l.*``
``fuse_module.gate.{0,2}.*``                  ``fusion.gate.{0,2}.*``
============================================  =======================================

Every key is mapped or refused: a key outside the table, a weight of the model that the checkpoint
lacks (a tied alias such as ``lm_head.weight`` excepted), or a tensor whose shape differs from the
model built from ``--llm/--clip/--convnext`` and the chosen preset raises :class:`ConvertError` naming
the key. Rotary ``inv_freq`` buffers that older transformers saved are recomputed, so they are skipped
(and counted).

To finetune from the export, keep ``model.llm.path``, ``model.vision.clip_path`` and
``model.vision.convnext_path`` at the checkpoints given to ``convert`` and copy the export's
``model.safetensors`` (all weights; an export under 5 GB is one shard) to
``<train.output_dir>/pretrain/trainable.safetensors`` (the weights the finetune stage starts from).

Files are unpickled with ``torch.load(weights_only=True)``: tensors and plain containers only.
mmengine also pickles training metadata beside the weights (``message_hub``'s ``HistoryBuffer``
objects and the numpy arrays in them); those globals, and only those (:data:`METADATA_GLOBALS`),
are replaced by an inert placeholder that runs no code and is dropped. Any other global refuses the
file, naming it, before anything is unpickled.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

LLM_PREFIX = "llm."
MODULE_MAP = {
    "projector.model.0.": "projector.0.",
    "projector.model.2.": "projector.2.",
    "bbox_projector.model.0.": "box_projector.0.",
    "bbox_projector.model.2.": "box_projector.2.",
    "fuse_module.slow_conv.": "fusion.conv1x1_h.",
    "fuse_module.slow_proj.": "fusion.proj_h.",
    "fuse_module.fast_conv.": "fusion.dwconv7x7.",
    "fuse_module.fast_proj.": "fusion.proj_l.",
    "fuse_module.gate.0.": "fusion.gate.0.",
    "fuse_module.gate.2.": "fusion.gate.2.",
}
RECOMPUTED_BUFFER = re.compile(r"^llm\..*rotary_emb\.inv_freq$")
DEEPSPEED_MODEL_STATES = "mp_rank_00_model_states.pt"

METADATA_GLOBALS = (
    "mmengine.logging.history_buffer.HistoryBuffer",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.ndarray",
    "numpy.dtype",
)
"""Globals of the training metadata an mmengine checkpoint carries beside its weights; unpickled as
:class:`_Inert` placeholders (the named code never runs)."""


class ConvertError(ValueError):
    """The checkpoint cannot be converted; the message names the file and the key."""


class _Inert:
    """Stands in for a metadata object while unpickling: takes any arguments and state, does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state) -> None:
        pass


# ----------------------------------------------------------------------------- reading


def _torch_load(path: Path):
    """``torch.load(path, weights_only=True)`` with :data:`METADATA_GLOBALS` as placeholders; any other
    global refuses the file with its name (nothing is unpickled then)."""
    import pickle

    import torch

    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, ValueError, OSError, pickle.UnpicklingError):
        unsafe = []  # not a zip checkpoint: the weights_only unpickler below refuses what it must
    foreign = sorted(set(unsafe) - set(METADATA_GLOBALS))
    if foreign:
        raise ConvertError(
            f"{path}: refused: it holds pickled objects beyond tensors and plain containers "
            f"({', '.join(foreign)}); unpickling them could run code, so nothing was loaded"
        )
    placeholders = [(_Inert, name) for name in METADATA_GLOBALS]
    try:
        with torch.serialization.safe_globals(placeholders):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"it holds the pickled global {found.group(1)}" if found else str(exc).strip().splitlines()[-1]
        raise ConvertError(f"{path}: refused by the weights-only unpickler: {what}; nothing was run") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ConvertError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None


def _is_zip(path: Path) -> bool:
    import zipfile

    return zipfile.is_zipfile(path)


def _deepspeed_states(directory: Path) -> Path:
    """The model-states file of a DeepSpeed checkpoint directory (the tag folder itself, or one whose
    ``latest`` names it)."""
    if (directory / DEEPSPEED_MODEL_STATES).is_file():
        return directory / DEEPSPEED_MODEL_STATES
    latest = directory / "latest"
    if not latest.is_file():
        raise ConvertError(
            f"{directory}: not a DeepSpeed checkpoint directory (no {DEEPSPEED_MODEL_STATES}, no 'latest')"
        )
    tag = latest.read_text().strip()
    if not tag or "/" in tag or "\\" in tag or tag in (".", ".."):
        raise ConvertError(f"{latest}: names {tag!r}, not a tag folder of {directory}")
    states = directory / tag / DEEPSPEED_MODEL_STATES
    if not states.is_file():
        raise ConvertError(f"{directory}: 'latest' names the tag {tag!r}, but {states} does not exist")
    return states


def load_reference_state_dict(path: str | Path) -> dict:
    """The reference model's state dict (name -> tensor) from a ``.pth`` file, a ``.safetensors`` file
    or a DeepSpeed checkpoint directory."""
    import torch

    path = Path(path)
    if path.is_dir():
        source = _deepspeed_states(path)
        loaded = _torch_load(source)
        if not isinstance(loaded, dict) or not isinstance(loaded.get("module"), dict):
            raise ConvertError(f"{source}: a DeepSpeed model-states file holds the weights under 'module'; "
                               "this one does not")
        state = loaded["module"]
    elif path.is_file() and path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            source, state = path, load_file(path)
        except SafetensorError as exc:
            raise ConvertError(f"{path}: not a readable safetensors file ({exc})") from None
    elif path.is_file():
        source, loaded = path, _torch_load(path)
        state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    else:
        raise ConvertError(f"{path}: no such checkpoint file or directory")
    if not isinstance(state, dict):
        raise ConvertError(f"{source}: holds a {type(state).__name__}, not a state dict")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            kind = "numpy or mmengine object" if isinstance(value, _Inert) else type(value).__name__
            raise ConvertError(f"{source}: key {key!r} holds a {kind}, not a tensor")
        if value.numel() == 0 and value.dim() <= 1:  # a ZeRO-3 placeholder: the weights are partitioned
            raise ConvertError(
                f"{source}: key {key!r} is an empty placeholder (a ZeRO-3 checkpoint keeps its weights in the "
                "optimizer partitions); gather it into one file first (DeepSpeed's zero_to_fp32)"
            )
    return state


# ----------------------------------------------------------------------------- mapping


def reference_to_mgllava(key: str) -> str | None:
    """Our name for a reference key, or None when it has none."""
    if key.startswith(LLM_PREFIX):
        return key
    for theirs, ours in MODULE_MAP.items():
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return None


def map_state_dict(state: dict, model, source: str) -> tuple[dict, list[str]]:
    """``(our name -> tensor, skipped keys)``: every reference key mapped onto a weight of ``model`` with
    the same shape, every weight of ``model`` but the frozen encoders covered (tied aliases excepted)."""
    ours = {**{f"{LLM_PREFIX}{k}": v for k, v in model.llm.state_dict().items()}, **model.projector_state_dict()}
    mapped, skipped, unexpected = {}, [], []
    for key, tensor in state.items():
        name = reference_to_mgllava(key)
        if name in ours:
            mapped[name] = tensor
        elif RECOMPUTED_BUFFER.match(key):
            skipped.append(key)
        else:
            unexpected.append(key)
    if unexpected:
        raise ConvertError(_naming(f"{source}: unexpected key", unexpected, "(not a weight of MG-LLaVA's LLM, "
                                   "projector, box projector or fusion module)"))
    present_storage = {ours[name].untyped_storage().data_ptr() for name in mapped}
    missing = [n for n in ours if n not in mapped and ours[n].untyped_storage().data_ptr() not in present_storage]
    if missing:
        theirs = {v: k for k, v in MODULE_MAP.items()}
        named = [next((t + n[len(o):] for o, t in theirs.items() if n.startswith(o)), n) for n in missing]
        raise ConvertError(_naming(f"{source}: missing key", named, "(the model needs it)"))
    for name, tensor in mapped.items():
        if tuple(tensor.shape) != tuple(ours[name].shape):
            raise ConvertError(
                f"{source}: key {_reference_name(name, state)!r} has shape {tuple(tensor.shape)}, but the model "
                f"built from --llm/--clip/--convnext and the preset needs {tuple(ours[name].shape)} for {name!r}"
            )
    return mapped, skipped


def _reference_name(ours: str, state: dict) -> str:
    return next(k for k in state if reference_to_mgllava(k) == ours)


def _naming(what: str, keys: list[str], why: str) -> str:
    shown = ", ".join(repr(k) for k in keys[:5])
    more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
    return f"{what}{'s' if len(keys) > 1 else ''} {shown}{more} {why}"


# ----------------------------------------------------------------------------- converting


def convert(checkpoint: str | Path, out: str | Path, model_config) -> dict:
    """Convert ``checkpoint`` for the model ``model_config`` describes (its LLM, CLIP and ConvNeXt
    directories give the frozen parts and the shapes) and export it to ``out``; returns a summary."""
    import torch

    from mgllava.model import MGLLaVAForConditionalGeneration, MGLLaVAProcessor

    state = load_reference_state_dict(checkpoint)
    floating = [t.dtype for t in state.values() if t.is_floating_point()]
    dtype = floating[0] if floating and all(d == floating[0] for d in floating) else torch.float32
    model = MGLLaVAForConditionalGeneration.from_config(model_config, dtype=dtype)
    clip_size = model.low_res_encoder.clip.config.image_size
    if clip_size != model_config.vision.low_res:
        raise ConvertError(
            f"the configuration's vision.low_res={model_config.vision.low_res} does not fit the CLIP at "
            f"{model_config.vision.clip_path} (image size {clip_size}): give the preset of the checkpoint's model"
        )
    mapped, skipped = map_state_dict(state, model, str(checkpoint))
    llm_part = {k[len(LLM_PREFIX):]: v for k, v in mapped.items() if k.startswith(LLM_PREFIX)}
    model.llm.load_state_dict(llm_part, strict=False)
    model.load_state_dict({k: v for k, v in mapped.items() if not k.startswith(LLM_PREFIX)}, strict=False)
    model.export(out, MGLLaVAProcessor.from_config(model_config))
    return {
        "checkpoint": str(checkpoint),
        "out": str(out),
        "dtype": str(dtype).removeprefix("torch."),
        "llm_tensors": len(llm_part),
        "projector_tensors": len(mapped) - len(llm_part),
        "skipped_buffers": len(skipped),
    }


def register_cli(subparsers) -> None:
    from mgllava.cli import add_config_args, existing_path

    p = subparsers.add_parser(
        "convert",
        help="convert a published MG-LLaVA checkpoint (reference .pth or DeepSpeed directory) into an export",
        description="Read a reference MG-LLaVA checkpoint (mmengine .pth, optionally under 'state_dict'; a "
        "DeepSpeed checkpoint directory; or .safetensors) with the weights-only unpickler, map its keys "
        "(llm.*, projector.model.*, bbox_projector.model.*, fuse_module.*) onto MG-LLaVA, and write an "
        "export directory (save_pretrained) that evaluate/chat load and finetuning can start from. A key "
        "that maps nowhere, a missing weight or a wrong shape fails naming the key (exit 2).",
    )
    p.add_argument("--checkpoint", required=True, type=existing_path, metavar="PATH",
                   help="the reference .pth file or directory")
    p.add_argument("--llm", required=True, type=existing_path, metavar="DIR",
                   help="the base LLM (HF directory with its tokenizer)")
    p.add_argument("--clip", required=True, type=existing_path, metavar="DIR", help="the CLIP ViT directory")
    p.add_argument("--convnext", required=True, type=existing_path, metavar="DIR",
                   help="the open_clip ConvNeXt directory")
    p.add_argument("--out", required=True, metavar="DIR", help="export directory to write")
    add_config_args(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from mgllava.cli import config_from_args

    model_config = config_from_args(args).model.model_copy(deep=True)
    model_config.llm.path, model_config.vision.clip_path, model_config.vision.convnext_path = (
        args.llm, args.clip, args.convnext,
    )
    try:
        summary = convert(args.checkpoint, args.out, model_config)
    except ConvertError as exc:
        print(f"mgllava convert: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"convert: {summary['llm_tensors']} LLM and {summary['projector_tensors']} projector/fusion tensors "
        f"({summary['dtype']}; {summary['skipped_buffers']} recomputed buffers skipped) -> {summary['out']}"
    )
    return 0
