"""``mgllava convert``: reference MG-LLaVA checkpoints, built here at tiny size with exactly the reference's
key names (mg_llava/module/fuse_model.py, xtuner's ProjectorModel), in its layouts, into loadable exports;
hostile and broken checkpoints refused naming what is wrong."""

from __future__ import annotations

import io
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mgllava.cli import main
from mgllava.convert import ConvertError, convert
from mgllava.model import Boxes, MGLLaVAForConditionalGeneration, MGLLaVAProcessor, answer_questions

# reference name -> the attribute path of the same tensor in our model (the expectation, written out)
REFERENCE_TO_OURS = {
    "fuse_module.slow_conv.weight": "fusion.conv1x1_h.weight",
    "fuse_module.slow_conv.bias": "fusion.conv1x1_h.bias",
    "fuse_module.slow_proj.weight": "fusion.proj_h.weight",
    "fuse_module.slow_proj.bias": "fusion.proj_h.bias",
    "fuse_module.fast_conv.weight": "fusion.dwconv7x7.weight",
    "fuse_module.fast_conv.bias": "fusion.dwconv7x7.bias",
    "fuse_module.fast_proj.weight": "fusion.proj_l.weight",
    "fuse_module.fast_proj.bias": "fusion.proj_l.bias",
    "fuse_module.gate.0.weight": "fusion.gate.0.weight",
    "fuse_module.gate.0.bias": "fusion.gate.0.bias",
    "fuse_module.gate.2.weight": "fusion.gate.2.weight",
    "fuse_module.gate.2.bias": "fusion.gate.2.bias",
    "projector.model.0.weight": "projector.0.weight",
    "projector.model.0.bias": "projector.0.bias",
    "projector.model.2.weight": "projector.2.weight",
    "projector.model.2.bias": "projector.2.bias",
    "bbox_projector.model.0.weight": "box_projector.0.weight",
    "bbox_projector.model.0.bias": "box_projector.0.bias",
    "bbox_projector.model.2.weight": "box_projector.2.weight",
    "bbox_projector.model.2.bias": "box_projector.2.bias",
}


def _reference_shapes(d: int, c4: int, c_total: int, width: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the reference's DualPathFuseModule(low_res_dim=d, high_res_dim=c4) and its two
    ProjectorModels (depth 2) for an LLM of hidden size ``width``, as its constructors make them."""
    return {
        "fuse_module.slow_conv.weight": (c4, c4, 1, 1), "fuse_module.slow_conv.bias": (c4,),
        "fuse_module.slow_proj.weight": (d, c4, 1, 1), "fuse_module.slow_proj.bias": (d,),
        "fuse_module.fast_conv.weight": (d, 1, 7, 7), "fuse_module.fast_conv.bias": (d,),
        "fuse_module.fast_proj.weight": (d, d, 1, 1), "fuse_module.fast_proj.bias": (d,),
        "fuse_module.gate.0.weight": (d // 2, 2 * d), "fuse_module.gate.0.bias": (d // 2,),
        "fuse_module.gate.2.weight": (1, d // 2), "fuse_module.gate.2.bias": (1,),
        "projector.model.0.weight": (width, d), "projector.model.0.bias": (width,),
        "projector.model.2.weight": (width, width), "projector.model.2.bias": (width,),
        "bbox_projector.model.0.weight": (width, c_total), "bbox_projector.model.0.bias": (width,),
        "bbox_projector.model.2.weight": (width, width), "bbox_projector.model.2.bias": (width,),
    }


@pytest.fixture(scope="module")
def reference_state(tiny_zoo):
    """A reference state dict at the tiny zoo's sizes: random projector/fusion weights, the zoo's LLM
    weights moved off their values (so a converted model cannot pass by keeping the base LLM)."""
    base = MGLLaVAForConditionalGeneration.from_config(_model_config(tiny_zoo))
    d, channels = base.low_res_encoder.hidden_size, base.high_res_encoder.stage_channels
    width = base.llm.get_input_embeddings().embedding_dim
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=generator) * 0.05
             for name, shape in _reference_shapes(d, channels[-1], sum(channels), width).items()}
    for name, tensor in base.llm.state_dict().items():
        state[f"llm.{name}"] = tensor + torch.randn(tensor.shape, generator=generator) * 0.01
    return state


def _tensor(model: MGLLaVAForConditionalGeneration, dotted: str) -> torch.Tensor:
    return model.get_parameter(dotted).detach()


def _fake_history_buffer_module() -> types.ModuleType:
    """A stand-in for mmengine's HistoryBuffer, so a test can pickle what mmengine's message hub holds."""
    module = types.ModuleType("mmengine.logging.history_buffer")

    class HistoryBuffer:
        def __init__(self):
            self._log_history = np.array([0.5, 0.25])
            self._count_history = np.array([1, 1])
            self.max_length = np.int64(1000000)

    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = module.__name__, "HistoryBuffer"
    module.HistoryBuffer = HistoryBuffer
    return module


def _save_mmengine_style(state: dict, path) -> None:
    """``{'meta', 'state_dict', 'message_hub', 'param_schedulers'}`` as mmengine's runner saves it."""
    module = _fake_history_buffer_module()
    names = ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer")
    saved = {name: sys.modules.get(name) for name in names}
    sys.modules.update({name: types.ModuleType(name) for name in names[:2]})
    sys.modules[names[2]] = module
    try:
        torch.save({"meta": {"epoch": 0, "iter": 5, "seed": 7, "cfg": "model = dict(...)"},
                    "state_dict": state,
                    "message_hub": {"log_scalars": {"train/loss": module.HistoryBuffer()}, "runtime_info": {}},
                    "param_schedulers": [{"last_epoch": 5, "base_lrs": [2e-5]}]}, path)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def _write_layout(state: dict, layout: str, root) -> str:
    root.mkdir(parents=True, exist_ok=True)
    if layout == "pth":
        torch.save(state, root / "iter_5.pth")
        return str(root / "iter_5.pth")
    if layout == "safetensors":
        save_file(state, root / "model.safetensors")
        return str(root / "model.safetensors")
    if layout == "mmengine_pth":
        _save_mmengine_style(state, root / "iter_5.pth")
        return str(root / "iter_5.pth")
    tag = root / "global_step5"  # deepspeed: <dir>/latest names <dir>/<tag>/mp_rank_00_model_states.pt
    tag.mkdir()
    torch.save({"module": state, "buffer_names": [], "optimizer": None, "ds_version": "0.14.0",
                "param_shapes": [{k: v.shape for k, v in state.items()}], "global_steps": 5}, tag / "mp_rank_00_model_states.pt")
    (root / "latest").write_text("global_step5")
    return str(root)


def _convert_args(tiny_zoo, checkpoint, out) -> list[str]:
    return ["convert", "--checkpoint", str(checkpoint), "--llm", str(tiny_zoo / "llm"), "--clip",
            str(tiny_zoo / "clip"), "--convnext", str(tiny_zoo / "convnext"), "--out", str(out), "--preset", "tiny"]


@pytest.mark.parametrize("layout", ["pth", "mmengine_pth", "deepspeed_dir", "safetensors"])
def test_reference_checkpoint_converts_and_loads_with_its_weights(reference_state, tiny_zoo, tiny_world, tmp_path,
                                                                 layout, capsys):
    checkpoint = _write_layout(reference_state, layout, tmp_path / "ckpt")
    assert main(_convert_args(tiny_zoo, checkpoint, tmp_path / "export")) == 0
    assert "20 projector/fusion tensors" in capsys.readouterr().out

    model = MGLLaVAForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    processor = MGLLaVAProcessor.from_pretrained(tmp_path / "export")
    for theirs, ours in REFERENCE_TO_OURS.items():
        assert torch.equal(_tensor(model, ours), reference_state[theirs]), theirs
    llm_state = model.llm.state_dict()
    llm_keys = [k for k in reference_state if k.startswith("llm.")]
    assert llm_keys and all(torch.equal(llm_state[k[4:]], reference_state[k]) for k in llm_keys)

    if layout == "pth":  # the converted model runs: finite logits, and it generates
        image = Image.open(sorted((tiny_world / "images").rglob("*.png"))[0]).convert("RGB")
        boxes = Boxes(torch.tensor([[2.0, 2.0, 30.0, 30.0]]), ["square"], torch.tensor([0.9]))
        batch = processor.collate([processor([("human", "<image>\nWhat?"), ("gpt", "A.")], [image], [boxes])])
        assert torch.isfinite(model(**batch).logits).all()
        assert isinstance(answer_questions(model, processor, [image], [boxes], ["What?"], max_new_tokens=3)[0], str)
        # finetuning starts from the export's weights (load_trainable checks they hold the projectors)
        fresh = MGLLaVAForConditionalGeneration.from_config(_model_config(tiny_zoo))
        fresh.set_stage("finetune")
        fresh.load_trainable(tmp_path / "export" / "model.safetensors")
        assert torch.equal(_tensor(fresh, "fusion.proj_h.weight"), reference_state["fuse_module.slow_proj.weight"])


def _model_config(tiny_zoo):
    from mgllava.config import load_config

    config = load_config(preset="tiny").model
    config.llm.path = str(tiny_zoo / "llm")
    config.vision.clip_path, config.vision.convnext_path = str(tiny_zoo / "clip"), str(tiny_zoo / "convnext")
    return config


@pytest.mark.parametrize(
    "break_it, named",
    [
        (lambda s: s.update({"fuse_module.extra.weight": torch.zeros(2)}), "fuse_module.extra.weight"),
        (lambda s: s.pop("bbox_projector.model.2.bias"), "bbox_projector.model.2.bias"),
        (lambda s: s.pop("llm.model.norm.weight"), "llm.model.norm.weight"),
        (lambda s: s.update({"projector.model.0.weight": torch.zeros(3, 3)}), "projector.model.0.weight"),
    ],
    ids=["unexpected_key", "missing_projector_key", "missing_llm_key", "wrong_shape"],
)
def test_broken_checkpoint_fails_naming_the_key(reference_state, tiny_zoo, tmp_path, break_it, named, request,
                                                fault_ledger, capsys):
    state = dict(reference_state)
    break_it(state)
    torch.save({"state_dict": state}, tmp_path / "broken.pth")
    with pytest.raises(ConvertError, match=f"'{named}'"):
        convert(tmp_path / "broken.pth", tmp_path / "export", _model_config(tiny_zoo))
    assert not (tmp_path / "export").exists()
    if request.node.callspec.id == "wrong_shape":  # the CLI: one line naming the key, exit 2
        assert main(_convert_args(tiny_zoo, tmp_path / "broken.pth", tmp_path / "export")) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(errors) == 1 and named in errors[0] and "(3, 3)" in errors[0]
    fault_ledger.record(f"convert: {request.node.callspec.id}", survived=True)


class _RunsCode:
    """Unpickling this calls ``exec``: what a hostile checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.mark.parametrize("where", ["pth", "deepspeed_dir"])
def test_checkpoint_that_would_run_code_is_refused(reference_state, tiny_zoo, tmp_path, where, fault_ledger):
    marker = tmp_path / "marker"
    hostile = {"state_dict": {"projector.model.0.bias": torch.zeros(2)}, "meta": _RunsCode(marker)}
    if where == "pth":
        checkpoint = tmp_path / "hostile.pth"
        torch.save(hostile, checkpoint)
    else:
        checkpoint = tmp_path / "ds"
        (checkpoint / "tag").mkdir(parents=True)
        torch.save({"module": hostile["state_dict"], "client": hostile["meta"]},
                   checkpoint / "tag" / "mp_rank_00_model_states.pt")
        (checkpoint / "latest").write_text("tag")
    with pytest.raises(ConvertError, match="builtins.exec") as info:
        convert(checkpoint, tmp_path / "export", _model_config(tiny_zoo))
    assert "refused" in str(info.value)
    assert not marker.exists() and not (tmp_path / "export").exists()
    fault_ledger.record(f"convert: pickled code in a {where} checkpoint", survived=not marker.exists())


def test_legacy_pickle_that_would_run_code_is_refused(tiny_zoo, tmp_path, fault_ledger):
    """A non-zip (legacy) torch file: refused by the weights-only unpickler itself, naming the global."""
    marker = tmp_path / "marker"
    buffer = io.BytesIO()
    torch.save({"state_dict": {}, "meta": _RunsCode(marker)}, buffer, _use_new_zipfile_serialization=False)
    (tmp_path / "legacy.pth").write_bytes(buffer.getvalue())
    with pytest.raises(ConvertError, match="exec"):
        convert(tmp_path / "legacy.pth", tmp_path / "export", _model_config(tiny_zoo))
    assert not marker.exists()
    fault_ledger.record("convert: pickled code in a legacy-format checkpoint", survived=not marker.exists())


def test_deepspeed_latest_cannot_leave_the_directory(tiny_zoo, tmp_path, fault_ledger):
    (tmp_path / "ds").mkdir()
    (tmp_path / "elsewhere").mkdir()
    torch.save({"module": {}}, tmp_path / "elsewhere" / "mp_rank_00_model_states.pt")
    (tmp_path / "ds" / "latest").write_text("../elsewhere")
    with pytest.raises(ConvertError, match="not a tag folder"):
        convert(tmp_path / "ds", tmp_path / "export", _model_config(tiny_zoo))
    fault_ledger.record("convert: deepspeed 'latest' pointing outside its directory", survived=True)



def test_preset_that_does_not_fit_the_encoders_is_refused(reference_state, tiny_zoo, tmp_path, capsys):
    torch.save(reference_state, tmp_path / "iter_5.pth")
    args = _convert_args(tiny_zoo, tmp_path / "iter_5.pth", tmp_path / "export")
    assert main(args[:-1] + ["vicuna-7b"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "vision.low_res=336" in errors[0] and "image size 112" in errors[0]
    assert not (tmp_path / "export").exists()


def test_unreadable_files_are_one_error(tiny_zoo, tmp_path):
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 not really a zip")
    for name in ("cut.safetensors", "cut.pth"):
        with pytest.raises(ConvertError, match=name):
            convert(tmp_path / name, tmp_path / "export", _model_config(tiny_zoo))
