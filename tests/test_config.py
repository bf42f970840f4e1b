"""The configuration system: presets load, bad input fails at start-up with a message that names it."""

from __future__ import annotations

import pytest

from mgllava.cli import main
from mgllava.config import ConfigError, list_presets, load_config
from mgllava.templates import TEMPLATES

FULL_SIZE = ["vicuna-7b", "vicuna-13b", "phi3-mini", "llama3-8b", "yi-34b"]


def test_every_preset_loads_and_validates():
    assert set(list_presets()) == {"tiny", *FULL_SIZE}
    for name in list_presets():
        config = load_config(preset=name)
        assert config.preset == name
        assert config.model.llm.template in TEMPLATES


def test_default_is_the_tiny_preset_under_mgllava_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MGLLAVA_HOME", str(tmp_path))
    config = load_config()
    assert config.preset == "tiny"
    assert config.work_dir == f"{tmp_path}/runs/tiny"
    assert config.model.llm.path == f"{tmp_path}/runs/tiny/zoo/llm"
    assert config.data.image_root == f"{tmp_path}/runs/tiny/world/images"


def test_full_size_presets_use_the_paper_numbers():
    config = load_config(preset="vicuna-7b")
    assert (config.model.vision.high_res, config.model.vision.low_res) == (768, 336)
    assert config.model.roi_output == 56 and config.model.nms_iou == 0.2
    assert config.train.pretrain.global_batch == 256 and config.train.pretrain.lr == 1e-3
    assert config.train.finetune.global_batch == 128 and config.train.finetune.lr == 2e-5
    assert load_config(preset="yi-34b").train.finetune.zero_stage == 3
    templates = {name: load_config(preset=name).model.llm.template for name in FULL_SIZE}
    assert templates == {
        "vicuna-7b": "vicuna",
        "vicuna-13b": "vicuna",
        "phi3-mini": "phi3_chat",
        "llama3-8b": "llama3_chat",
        "yi-34b": "qwen_chat",
    }


def test_overrides_are_typed_and_nested():
    config = load_config(overrides=["train.pretrain.lr=2e-4", "eval.tasks=[pope]", "model.roi_output=7"])
    assert config.train.pretrain.lr == pytest.approx(2e-4)
    assert config.eval.tasks == ["pope"]
    assert config.model.roi_output == 7


def test_yaml_file_round_trip(tmp_path):
    path = load_config(overrides=["shapes.world.seed=3"]).save(tmp_path / "mine.yaml")
    config = load_config(path=path)
    assert config.shapes.world.seed == 3 and config.preset == "tiny"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"preset": "vicuna-70b"}, "unknown preset 'vicuna-70b'"),
        ({"overrides": ["train.pretrain.lr=fast"]}, "'train.pretrain.lr'"),
        ({"overrides": ["model.colour=red"]}, "'model.colour': unknown field"),
        ({"overrides": ["model.llm.template=alpaca"]}, "unknown chat template 'alpaca'"),
        ({"overrides": ["model.vision.high_res=700"]}, "multiple of 32"),
        ({"overrides": ["train.finetune.global_batch=10"]}, "not divisible by micro_batch=8"),
        ({"overrides": ["novalue"]}, "expected dotted.key=value"),
        ({"overrides": ["shapes.zoo.llm_option_share=0.7", "shapes.zoo.llm_lookup_share=0.4"]}, "exceed 1"),
        ({"path": "/nonexistent/config.yaml"}, "config file not found: /nonexistent/config.yaml"),
    ],
)
def test_bad_configuration_names_the_problem(kwargs, expected):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(**kwargs)
    assert expected in str(info.value)


def test_missing_and_unset_paths_are_named():
    with pytest.raises(ConfigError, match="'model.llm.path' is not set"):
        load_config(preset="vicuna-7b").check_paths("model.llm.path")
    config = load_config(preset="vicuna-7b", overrides=["model.llm.path=/models/nowhere"])
    with pytest.raises(ConfigError, match="'model.llm.path': path does not exist: /models/nowhere"):
        config.check_paths("model.llm.path")


def test_cli_reports_config_errors_in_one_line(capsys):
    assert main(["config", "--preset", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown preset 'nope'" in err


def test_cli_prints_resolved_config(capsys):
    assert main(["config", "--set", "shapes.world.n_images=12"]) == 0
    assert "n_images: 12" in capsys.readouterr().out
