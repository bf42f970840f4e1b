"""The one configuration system: typed, validated at start-up.

A configuration is a preset (``mgllava/presets/<name>.yaml``) or a YAML file,
with ``--set dotted.key=value`` overrides from the command line on top. It is
validated by pydantic before any heavy work: an unknown preset, an unknown or
ill-typed field, or (through :meth:`Config.check_paths`) a missing local path
raises :class:`ConfigError` with one message that names it.

String fields may use two placeholders, filled in at load time:

- ``{home}``: ``$MGLLAVA_HOME`` (default ``~/.mgllava``), where the warehouse,
  the Prefect server state and the default work directories live;
- ``{work_dir}``: the configuration's own ``work_dir``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mgllava.eval.tasks import BENCHMARKS
from mgllava.templates import TEMPLATES

PRESETS_DIR = Path(__file__).parent / "presets"
REQUIRED = "???"  # a full-size preset's placeholder for a path the user must give


class ConfigError(ValueError):
    """A configuration problem, with a message that names the field or file."""


def mgllava_home() -> Path:
    return Path(os.environ.get("MGLLAVA_HOME", "~/.mgllava")).expanduser()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------- model


Attention = Literal["sdpa", "eager", "flash_attention_2"]
"""The LLM's attention kernel (transformers' ``attn_implementation``)."""


class LLMConfig(_Section):
    path: str = Field(description="Hugging Face model directory (config, weights, tokenizer)")
    template: str = Field(description="chat template: " + ", ".join(TEMPLATES))
    attention: Attention = Field(
        "sdpa",
        description="the LLM's attention kernel in training (transformers' attn_implementation): sdpa "
        "(PyTorch's fused kernels), eager (plain matrix products), flash_attention_2 (needs the flash-attn "
        "package); evaluation has its own, eval.attention",
    )

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        if value not in TEMPLATES:
            raise ValueError(f"unknown chat template {value!r}; choose one of: {', '.join(TEMPLATES)}")
        return value


class VisionConfig(_Section):
    clip_path: str = Field(description="Hugging Face CLIP directory (CLIPVisionModel + image processor)")
    convnext_path: str = Field(
        description="open_clip ConvNeXt checkpoint directory (open_clip_config.json + weights)"
    )
    high_res: int = Field(768, gt=0, description="side of the high-resolution input (ConvNeXt)")
    low_res: int = Field(336, gt=0, description="side of the low-resolution input (CLIP ViT)")
    select_layer: int = Field(-2, description="CLIP hidden-state layer used as image tokens (-2: penultimate)")

    @model_validator(mode="after")
    def _sizes(self) -> VisionConfig:
        if self.high_res % 32:
            raise ValueError(f"high_res={self.high_res} must be a multiple of 32 (the ConvNeXt stride)")
        if self.low_res > self.high_res:
            raise ValueError(f"low_res={self.low_res} must not exceed high_res={self.high_res}")
        return self


GRANULARITIES: tuple[str, ...] = ("low", "high", "objects")
"""The image granularities of MG-LLaVA (SPEC section 1): low-res CLIP tokens, high-res ConvNeXt features
fused into them by the Conv-Gate, object tokens pooled from the ConvNeXt maps by box."""

Granularity = Literal["low", "high", "objects"]


class ModelConfig(_Section):
    llm: LLMConfig
    vision: VisionConfig
    granularities: list[Granularity] = Field(
        default_factory=lambda: list(GRANULARITIES),
        description="the image granularities the model reads: [low] is LLaVA-1.5 (no fusion, no object "
        "tokens); [low, high] adds the Conv-Gate fusion; [low, objects] adds the object tokens; "
        "[low, high, objects] is MG-LLaVA (the paper's ablation variants; mgllava ablate)",
    )
    object_features: Literal["direct", "lean"] = Field(
        "direct",
        description="direct: RoIAlign on the 4 stage maps upsampled to the stage-1 grid and concatenated "
        "(as the paper); lean: RoIAlign each stage at its own resolution, then concatenate",
    )
    roi_output: int = Field(56, gt=0, description="RoIAlign output size (then mean-pooled)")
    nms_iou: float = Field(0.2, ge=0, le=1, description="class-aware NMS IoU threshold on input boxes")
    box_cap_threshold: int = Field(100, gt=0, description="above this many boxes, cap each category")
    boxes_per_category: int = Field(20, gt=0, description="boxes kept per category when capping")
    max_length: int = Field(
        2048, gt=0, description="LLM context: the text is cut to max_length - image tokens (the reference)"
    )
    object_tokens_in_max_length: bool = Field(
        False,
        description="true: the text is cut to max_length - image tokens - object tokens, so every sequence "
        "fits max_length; false (the reference): the object tokens come on top of max_length",
    )
    roi_aligned: bool = Field(
        False,
        description="RoIAlign's aligned flag: false (the reference) treats a box as at least one feature cell; "
        "true maps box edges to feature coordinates pixel-exactly",
    )

    @field_validator("granularities")
    @classmethod
    def _granularities(cls, value: list[str]) -> list[str]:
        if "low" not in value:
            raise ValueError(f"{value} lacks 'low': every variant reads the low-resolution CLIP tokens")
        if len(set(value)) != len(value):
            raise ValueError(f"{value} names a granularity twice")
        return [g for g in GRANULARITIES if g in value]  # one spelling per variant: canonical order


# --------------------------------------------------------------------------- data


class WorldConfig(_Section):
    """The generated shapes world (``mgllava world``)."""

    dir: str = Field("{work_dir}/world", description="where the world is generated")
    n_images: int = Field(400, gt=0)
    seed: int = 0
    conversations_per_image: int = Field(
        1, ge=1, description="instruction conversations about each train image, each with its own questions"
    )


class ZooConfig(_Section):
    """The tiny model kit built on the shapes world (``mgllava zoo``)."""

    tower_scenes: int = Field(
        1200, ge=0, description="rendered scenes the tiny vision towers are pretrained on (0: random towers)"
    )
    tower_epochs: int = Field(3, ge=0, description="epochs of that pretraining")
    llm_layers: int = Field(4, ge=1, description="decoder layers of the tiny LLM (128 wide)")
    llm_instruct_steps: int = Field(
        0, ge=0, description="steps of answer-only instruction tuning of the tiny LLM on the world's questions "
        "told in words, after its text pretraining (0: none)"
    )
    llm_option_share: float = Field(
        0.0, ge=0.0, le=1.0, description="share of the instruction-tuning rows that are four-option questions "
        "(MMBench's wording) about a training scene told in words"
    )
    llm_lookup_share: float = Field(
        0.0, ge=0.0, le=1.0, description="share of the instruction-tuning rows that are bare letter lookups "
        "(\"Which option is red?\" over four options, no scene): with them the tiny LLM learns to bind an "
        "answer to its letter"
    )
    llm_instruct_precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="the instruction tuning's matrix products: fp32, or bf16 under torch.autocast (the "
        "weights and AdamW's state stay fp32; attention then runs eager, as SDPA's CPU kernel is slower in bf16 for "
        "the LLM's 32-wide heads)"
    )

    @model_validator(mode="after")
    def _shares_fit(self) -> ZooConfig:
        if self.llm_option_share + self.llm_lookup_share > 1.0:
            raise ValueError(
                f"shapes.zoo.llm_option_share ({self.llm_option_share}) + shapes.zoo.llm_lookup_share "
                f"({self.llm_lookup_share}) exceed 1: they are shares of the same instruction-tuning rows"
            )
        return self


class ShapesConfig(_Section):
    """The embedded default's demo kit (:mod:`mgllava.shapes`): the synthetic world and the tiny models
    built on it. Only the tiny preset carries this section; full-size presets leave it out."""

    world: WorldConfig = Field(default_factory=WorldConfig)
    zoo: ZooConfig = Field(default_factory=ZooConfig)


class DataConfig(_Section):
    image_root: str = Field(REQUIRED, description="root that LLaVA 'image' keys are relative to")
    pretrain_json: str = Field(REQUIRED, description="LLaVA-Pretrain caption JSON")
    finetune_json: str = Field(REQUIRED, description="LLaVA-Instruct JSON")
    boxes_dir: str = Field("{work_dir}/boxes", description="Parquet box tables (detect stage output)")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    pad_to_multiple_of: int = Field(
        1, gt=0, description="round each training batch's length up to a multiple of this (fewer distinct shapes)"
    )
    allow_absolute_image_paths: bool = Field(
        False,
        description="accept absolute 'image' paths in corpora (off: every image must lie below image_root)",
    )
    cache_image_features: bool = Field(
        False,
        description="encode each image once with the frozen encoders before a training stage and keep the "
        "features in memory (faster steps; ~0.1 MB per image at tiny size, ~6 MB at full size)",
    )


# --------------------------------------------------------------------------- detector


class DetectorTrainConfig(_Section):
    base: str = Field("yolo11n.yaml", description="Ultralytics model YAML or weights to start from")
    data: str | None = Field(None, description="YOLO-format dataset YAML to train a detector on")
    epochs: int = Field(15, gt=0)
    imgsz: int = Field(320, gt=0)
    batch: int = Field(16, gt=0)
    min_map50: float = Field(0.6, ge=0, le=1, description="mAP50 the trained detector must reach")


class DetectorConfig(_Section):
    model: str = Field(
        "{work_dir}/detector/weights/best.pt",
        description="Ultralytics weights (.pt: YOLO, RT-DETR, YOLO-World, YOLOE) or model YAML",
    )
    classes: list[str] | None = Field(None, description="class-name prompts for open-vocabulary models")
    conf: float = Field(0.25, ge=0, le=1, description="score threshold")
    iou: float = Field(0.7, ge=0, le=1, description="the detector's own NMS IoU")
    imgsz: int = Field(320, gt=0)
    batch: int = Field(16, gt=0)
    device: str = Field("auto", description="auto, cpu, or a CUDA device such as 0")
    shard_size: int = Field(256, gt=0, description="images per Parquet shard")
    loader_threads: int | None = Field(
        None, ge=0, description="threads that read and decode images ahead of the detector; 0: the detector's "
        "thread decodes between forwards; default: 0 on a CPU device (a loader beside the forward slows it on few "
        "cores), else up to 8 (one per spare core)",
    )
    max_image_pixels: int = Field(
        50_000_000, gt=0, description="larger images are rejected, by detection, training, import and chat alike"
    )
    train: DetectorTrainConfig = Field(default_factory=DetectorTrainConfig)


# --------------------------------------------------------------------------- training


class StageConfig(_Section):
    global_batch: int = Field(gt=0, description="samples per optimizer step, over all ranks")
    micro_batch: int = Field(gt=0, description="samples per forward pass on one rank")
    lr: float = Field(gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    warmup_start_factor: float = Field(1e-5, gt=0, le=1, description="warm-up starts at lr x this")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs, fp32 on CPU; bf16 on a CPU: fp32 weights, bf16 matrix products "
        "(torch.autocast)"
    )
    save_every: int = Field(50, gt=0, description="checkpoint every N optimizer steps (and at the end)")
    log_every: int = Field(1, gt=0)
    group_by_length: bool = Field(
        False,
        description="order the data in mega-batches of similar length, image and text-only samples apart "
        "(LLaVA's group_by_modality_length; the reference does this in finetune)",
    )

    @model_validator(mode="after")
    def _batch_divides(self) -> StageConfig:
        if self.global_batch % self.micro_batch:
            raise ValueError(
                f"global_batch={self.global_batch} is not divisible by micro_batch={self.micro_batch}"
            )
        return self


class TrainConfig(_Section):
    pretrain: StageConfig
    finetune: StageConfig
    seed: int = 0
    output_dir: str = "{work_dir}/train"
    keep_checkpoints: int = Field(
        2, ge=1, description="DeepSpeed checkpoints kept per stage (older ones are deleted after each save)"
    )
    deepspeed_config: str | None = Field(
        None,
        description="a DeepSpeed JSON deep-merged over the generated config (e.g. ZeRO offload, bucket sizes); "
        "\"auto\" keeps the generated value; batch sizes, accumulation, optimizer and precision are "
        "refused (set them with train.<stage>.*)",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute the LLM's layer activations in the backward pass (both stages, as the reference): "
        "less memory, about a third more compute",
    )


# --------------------------------------------------------------------------- evaluation


class EvalConfig(_Section):
    tasks: list[str] = Field(default_factory=lambda: ["pope", "mmbench", "textvqa", "gqa"])
    batch_size: int = Field(8, gt=0)
    limit: int | None = Field(None, gt=0, description="evaluate at most this many samples per task")
    max_new_tokens: int = Field(16, gt=0)
    attention: Attention | None = Field(
        None, description="the LLM's attention kernel when evaluating (sdpa, eager, flash_attention_2); "
        "unset: transformers' default for the exported LLM"
    )
    data_dirs: dict[str, str] = Field(
        default_factory=dict, description="task -> local directory of real benchmark data"
    )
    judge_api_key_env: str = Field("OPENAI_API_KEY", description="env var holding the GPT judge's key")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: list[str]) -> list[str]:
        _check_benchmarks(value)
        return value

    @field_validator("data_dirs")
    @classmethod
    def _known_data_dirs(cls, value: dict[str, str]) -> dict[str, str]:
        _check_benchmarks(value)
        return value


def _check_benchmarks(names) -> None:
    """Fail naming every unknown benchmark name and listing the valid ones (``mgllava.eval.tasks.BENCHMARKS``)."""
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(map(repr, unknown))}; choose from: {', '.join(BENCHMARKS)}")


# --------------------------------------------------------------------------- root


class Config(_Section):
    preset: str = Field("custom", description="name of the preset this configuration came from")
    work_dir: str = Field("{home}/runs/{preset}", description="where this configuration's stages write")
    shapes: ShapesConfig | None = Field(None, description="the embedded default's demo kit; absent at full size")
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    train: TrainConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def check_paths(self, *fields: str) -> None:
        """Fail with one clear message if a local path named by a dotted field is missing.

        ``check_paths("model.llm.path", "model.vision.clip_path")``. A field still
        holding the ``???`` placeholder of a full-size preset is reported as unset.
        """
        for dotted in fields:
            value = self.get(dotted)
            if value is None or value == REQUIRED:
                raise ConfigError(
                    f"config field '{dotted}' is not set: give it with --set {dotted}=/local/path "
                    f"(preset '{self.preset}')"
                )
            if not Path(value).exists():
                raise ConfigError(f"config field '{dotted}': path does not exist: {value}")

    def check_run_inputs(self) -> None:
        """Before a whole run (``mgllava run``, ``mgllava ablate``) starts anything: the local inputs it
        reads must exist (:meth:`check_paths`): the model's checkpoints, the images and both stages'
        conversations, and the detector's weights (or, without them, ``detector.train.data`` to train
        one). With the demo kit (``shapes``) the run generates them itself, so nothing is checked."""
        if self.shapes is not None:
            return
        detector = ("detector.train.data" if self.detector.train.data and not Path(self.detector.model).exists()
                    else "detector.model")
        self.check_paths("model.llm.path", "model.vision.clip_path", "model.vision.convnext_path",
                         "data.image_root", "data.pretrain_json", "data.finetune_json", detector)

    def unset_fields(self) -> list[str]:
        """The dotted fields still holding a full-size preset's ``???`` placeholder."""

        def walk(node: Any, prefix: str) -> list[str]:
            if isinstance(node, dict):
                return [found for key, value in node.items() for found in walk(value, f"{prefix}{key}.")]
            return [prefix[:-1]] if node == REQUIRED else []

        return walk(self.model_dump(mode="json"), "")

    def get(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            if not hasattr(node, part):
                raise ConfigError(f"unknown config field '{dotted}'")
            node = getattr(node, part)
        return node

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"bad override {item!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"bad override {item!r}: {exc}") from None
    return key.strip(), value


def _fill_placeholders(node: Any, values: dict[str, str]) -> Any:
    if isinstance(node, str):
        for name, value in values.items():
            node = node.replace("{" + name + "}", value)
        return node
    if isinstance(node, dict):
        return {k: _fill_placeholders(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill_placeholders(v, values) for v in node]
    return node


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        got = f" (got {err['input']!r})" if err["type"] not in ("extra_forbidden", "missing") else ""
        lines.append(f"config field '{field}': {msg}{got}")
    return f"invalid configuration from {source}: " + "; ".join(lines)


def load_config(
    preset: str | None = None,
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Config:
    """Load a preset or a YAML file, apply ``dotted.key=value`` overrides, validate.

    With neither ``preset`` nor ``path`` the ``tiny`` preset (the embedded
    default) is used. Raises :class:`ConfigError` naming the problem.
    """
    if preset and path:
        raise ConfigError("give either a preset or a config file, not both")
    if path:
        tree, source = _read_yaml(Path(path)), str(path)
        tree.setdefault("preset", Path(path).stem)
    else:
        name = preset or "tiny"
        if name not in list_presets():
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(list_presets())}")
        tree, source = _read_yaml(PRESETS_DIR / f"{name}.yaml"), f"preset '{name}'"
        tree["preset"] = name
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(tree, key, value)
    try:
        # validate once to fill in defaults, then resolve placeholders everywhere and validate again
        tree = Config.model_validate(tree).model_dump(mode="json")
        work_dir = _fill_placeholders(tree["work_dir"], {"home": str(mgllava_home()), "preset": tree["preset"]})
        tree = _fill_placeholders(tree, {"home": str(mgllava_home()), "work_dir": work_dir})
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
