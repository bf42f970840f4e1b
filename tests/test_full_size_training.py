"""What full-size training needs (issue 17 item 6): gradient checkpointing, the finetune's
length-grouped sampler, a user DeepSpeed JSON, saving under ZeRO-3, valid benchmark lists."""

from __future__ import annotations

import pytest

from mgllava.cli import main
from mgllava.config import ConfigError, list_presets, load_config

FULL_SIZE = [name for name in list_presets() if name != "tiny"]


# --------------------------------------------------------------------------- benchmarks and config --check


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_passes_config_check(preset, tmp_path, capsys):
    from mgllava.eval.tasks import BENCHMARKS

    given = []
    if preset == "tiny":  # its model paths are built by `mgllava zoo`: stand-ins that exist
        given = [f"--set={field}={tmp_path}" for field in ("model.llm.path", "model.vision.clip_path",
                                                          "model.vision.convnext_path")]
    assert main(["config", "--preset", preset, "--check", *given]) == 0
    out, err = capsys.readouterr()
    assert set(load_config(preset=preset).eval.tasks) <= set(BENCHMARKS)
    if preset in FULL_SIZE:  # the paths the user must give are listed, not failed on
        assert "not set yet" in err and "model.llm.path" in err and "data.finetune_json" in err
    else:
        assert err == ""


def test_config_check_fails_on_a_given_model_path_that_does_not_exist(capsys):
    assert main(["config", "--preset", "vicuna-7b", "--check", "--set", "model.llm.path=/no/such/llm"]) == 2
    assert "model.llm.path': path does not exist: /no/such/llm" in capsys.readouterr().err


@pytest.mark.parametrize("field", ["eval.tasks=[pope,scienceqa]", "eval.data_dirs={scienceqa: /data/sqa}"])
def test_an_unknown_benchmark_fails_at_load_naming_it(field, capsys):
    with pytest.raises(ConfigError, match=r"unknown benchmark\(s\) 'scienceqa'; choose from: mmbench, .*scienceqa_img"):
        load_config(preset="yi-34b", overrides=[field])
    assert main(["config", "--preset", "tiny", "--set", field]) == 2
    assert "'scienceqa'" in capsys.readouterr().err


# --------------------------------------------------------------------------- gradient checkpointing


def test_gradient_checkpointing_is_on_in_the_full_size_presets_only():
    assert all(load_config(preset=name).train.gradient_checkpointing for name in FULL_SIZE)
    assert not load_config(preset="tiny").train.gradient_checkpointing  # tiny: memory is no constraint


@pytest.fixture(scope="module")
def tiny_batch(tiny_world, tiny_zoo):
    """A tiny MG-LLaVA (trainable weights moved off their zero init) and a batch: image with boxes, text only."""
    import json

    import torch
    from PIL import Image

    from mgllava.model import MGLLaVAForConditionalGeneration, MGLLaVAProcessor

    config = load_config(overrides=[f"model.llm.path={tiny_zoo}/llm", f"model.vision.clip_path={tiny_zoo}/clip",
                                    f"model.vision.convnext_path={tiny_zoo}/convnext"])
    torch.manual_seed(0)
    model = MGLLaVAForConditionalGeneration.from_config(config.model)
    processor = MGLLaVAProcessor.from_config(config.model)
    with torch.no_grad():
        for parameter in (*model.fusion.parameters(), *model.projector.parameters(), *model.box_projector.parameters()):
            parameter.add_(torch.randn_like(parameter) * 0.05)
    record = json.loads(json.dumps(json.loads((tiny_world / "pretrain.json").read_text())[0]))
    image = Image.open(tiny_world / "images" / record["image"]).convert("RGB")
    samples = [processor([("human", "<image>\nWhat is there?"), ("gpt", "Shapes on a plain background.")],
                         [image], [None]),
               processor([("human", "Hello there"), ("gpt", "Hi.")])]
    return config, model, processor.collate(samples)


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(stage, tiny_batch):
    """Pretrain backpropagates through the frozen LLM to the projectors; finetune trains it too."""
    import copy

    import torch

    _, base, batch = tiny_batch
    plain, checkpointed = copy.deepcopy(base), copy.deepcopy(base)
    checkpointed.enable_gradient_checkpointing()
    layer_calls = []
    checkpointed.llm.model.layers[0].mlp.register_forward_pre_hook(lambda *_: layer_calls.append(1))
    results = []
    for model in (plain, checkpointed):
        model.set_stage(stage)
        model.train()
        results.append(_loss_and_grads(model, batch))
    assert len(layer_calls) == 2  # the layer ran again in the backward pass: checkpointing was on
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss, atol=1e-6, rtol=0)
    assert grads.keys() == grads_ckpt.keys()
    assert any(name.startswith("llm.") for name in grads) == (stage == "finetune")
    assert grads["projector.0.weight"].abs().sum() > 0  # through the LLM to the projector
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-6, rtol=0, msg=name)


# --------------------------------------------------------------------------- a user DeepSpeed JSON

XTUNER_ZERO3 = {  # the shape of the reference's xtuner/configs/deepspeed/deepspeed_zero3.json
    "gradient_accumulation_steps": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_clipping": "auto",
    "zero_allow_untested_optimizer": True,
    "zero_optimization": {"stage": 3, "overlap_comm": True, "stage3_gather_16bit_weights_on_model_save": True},
    "fp16": {"enabled": "auto", "initial_scale_power": 16},
    "bf16": {"enabled": "auto"},
}


def _plan(stage):
    from mgllava.train.schedule import plan_steps

    return plan_steps(stage, 64, 2, "finetune")


def test_a_user_deepspeed_json_merges_over_the_generated_one(tmp_path, caplog):
    import json

    from mgllava.config import StageConfig
    from mgllava.train.schedule import deepspeed_config, load_user_deepspeed_config

    stage = StageConfig(global_batch=16, micro_batch=4, lr=1e-3, zero_stage=2, grad_clip=0.5)
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(XTUNER_ZERO3))
    generated = deepspeed_config(stage, _plan(stage), "bf16")
    merged = deepspeed_config(stage, _plan(stage), "bf16", load_user_deepspeed_config(path))
    assert merged["zero_optimization"] == XTUNER_ZERO3["zero_optimization"]  # the user's ZeRO section
    assert "replaces zero_optimization.stage=2 with 3" in caplog.text
    assert merged["fp16"] == {"enabled": False, "initial_scale_power": 16}  # "auto": the generated value kept
    assert merged["zero_allow_untested_optimizer"] is True
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "bf16", "scheduler"):
        assert merged[key] == generated[key], key
    assert (merged["train_batch_size"], merged["gradient_accumulation_steps"]) == (16, 2)


@pytest.mark.parametrize("content, named", [
    ({"train_batch_size": 64}, "'train_batch_size', which the pipeline controls through train.<stage>.global_batch"),
    ({"gradient_accumulation_steps": 1}, "'gradient_accumulation_steps'"),
    ({"bf16": {"enabled": True}}, "'bf16.enabled', which the pipeline controls through train.<stage>.precision"),
    ({"optimizer": {"type": "Adam"}}, "'optimizer'"),
    ([1, 2], "must hold a JSON object"),
    ("{not json", "is not valid JSON"),
])
def test_a_user_deepspeed_json_that_fights_the_pipeline_is_refused_naming_the_key(content, named, tmp_path,
                                                                                 fault_ledger):
    import json

    from mgllava.train.schedule import load_user_deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError, match="^train.deepspeed_config: ") as refused:
        load_user_deepspeed_config(path)
    assert str(path) in str(refused.value) and named in str(refused.value)
    fault_ledger.record("user DeepSpeed JSON: " + named.split(",")[0], survived=True)


def test_run_stage_trains_under_the_merged_deepspeed_config(tmp_path):
    """A real engine built from the merged config: the user's nested scheduler parameter takes effect,
    the generated ones beside it stay (the learning rate ends at cos_min_ratio x lr instead of 0)."""
    import torch
    from test_train import _Toy, _toy_collate, _ToyData

    from mgllava.config import StageConfig
    from mgllava.train.engine import run_stage

    stage = StageConfig(global_batch=4, micro_batch=2, lr=0.05, save_every=100)
    ends = []
    for name, user in (("plain", None), ("merged", {"scheduler": {"params": {"cos_min_ratio": 0.5}}})):
        torch.manual_seed(0)
        result = run_stage(_Toy(), _ToyData(), _toy_collate, stage, "pretrain", tmp_path / name, seed=0,
                           progress=False, deepspeed_overrides=user)
        assert result.steps == 6
        ends.append(result.metrics[-1].lr)
    assert ends[0] == pytest.approx(0.0, abs=1e-12) and ends[1] == pytest.approx(0.025)


def test_bf16_on_a_cpu_runs_the_fp32_model_under_autocast(tmp_path):
    """precision bf16 on a CPU: the engine's forward runs its matrix products in bf16 (DeepSpeed's
    torch_autocast) while the weights, and so the optimizer's updates, stay fp32; fp16 is refused."""
    import torch
    from test_train import _Toy, _toy_collate, _ToyData

    from mgllava.config import StageConfig
    from mgllava.train.engine import resolve_precision, run_stage
    from mgllava.train.schedule import deepspeed_config

    assert resolve_precision("bf16") == "autocast-bf16" and resolve_precision("auto") == "fp32"
    small = StageConfig(global_batch=4, micro_batch=2, lr=0.05)
    autocast = deepspeed_config(small, _plan(small), "autocast-bf16")["torch_autocast"]
    assert autocast == {"enabled": True, "dtype": "bfloat16"}
    assert "torch_autocast" not in deepspeed_config(small, _plan(small), "bf16")  # a GPU's bf16: DeepSpeed's own
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision("fp16")
    outputs, weights = {}, {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = _Toy()
        start = model.linear.weight.detach().clone()
        model.linear.register_forward_hook(lambda _m, _i, out, p=precision: outputs.update({p: out.dtype}))
        stage = StageConfig(global_batch=4, micro_batch=2, lr=0.05, save_every=100, precision=precision)
        result = run_stage(model, _ToyData(), _toy_collate, stage, "pretrain", tmp_path / precision, seed=0,
                           progress=False)
        assert result.steps == 6 and model.linear.weight.dtype == torch.float32
        weights[precision] = model.linear.weight.detach()
        assert not torch.equal(weights[precision], start)
    assert outputs == {"fp32": torch.float32, "bf16": torch.bfloat16}
    torch.testing.assert_close(weights["bf16"], weights["fp32"], atol=0.02, rtol=0)  # the same steps, rounded


# --------------------------------------------------------------------------- length-grouped finetune order


def _lengths(n_image: int, n_text: int, seed: int = 0) -> list[int]:
    import random

    rng = random.Random(seed)
    lengths = [rng.randint(1, 2000) for _ in range(n_image)] + [-rng.randint(1, 2000) for _ in range(n_text)]
    rng.shuffle(lengths)
    return lengths


def _global_order(lengths, stage, epochs=1, world_size=1, seed=0):
    """The samples of every global batch, in training order, put back together from the ranks' micro-batches."""
    from mgllava.train.schedule import micro_batch_order, plan_steps

    plan = plan_steps(stage, len(lengths), world_size, "finetune")
    per_rank = [micro_batch_order(len(lengths), plan, seed, rank, lengths) for rank in range(world_size)]
    order = []
    for step in range(plan.total_steps):
        batch = [0] * plan.global_batch
        for rank in range(world_size):  # rank r holds every world_size-th sample of the global batch
            micro_batches = per_rank[rank][step * plan.grad_accum : (step + 1) * plan.grad_accum]
            batch[rank::world_size] = [i for micro_batch in micro_batches for i in micro_batch]
        order.extend(batch)
    return plan, per_rank, order


def test_length_grouping_is_on_for_every_finetune_and_off_for_pretrain():
    for name in [*FULL_SIZE, "tiny"]:
        train = load_config(preset=name).train
        assert train.finetune.group_by_length and not train.pretrain.group_by_length, name


@pytest.mark.parametrize("world_size", [1, 2])
def test_length_grouped_order_is_deterministic_and_covers_each_epoch_once(world_size):
    from mgllava.config import StageConfig

    lengths = _lengths(300, 84)  # 384 samples, 2 epochs of 24 steps
    stage = StageConfig(global_batch=16, micro_batch=4, lr=1e-3, epochs=2)
    plan, per_rank, order = _global_order(lengths, stage, world_size=world_size)
    assert per_rank == _global_order(lengths, stage, world_size=world_size)[1]  # a pure function: resume lines up
    assert per_rank != _global_order(lengths, stage, world_size=world_size, seed=1)[1]
    assert len(order) == 2 * len(lengths)
    for epoch in (order[: len(lengths)], order[len(lengths) :]):
        assert sorted(epoch) == list(range(len(lengths)))  # every sample exactly once per epoch
    assert order[: len(lengths)] != order[len(lengths) :]  # each epoch its own order


def test_length_grouped_mega_batches_hold_similar_lengths_and_one_modality():
    from mgllava.config import StageConfig
    from mgllava.train.schedule import mega_batch_size

    lengths = _lengths(322, 62)  # 384 samples: mega-batches of 16 x 6 = 96 samples
    stage = StageConfig(global_batch=16, micro_batch=4, lr=1e-3)
    plan, per_rank, order = _global_order(lengths, stage, world_size=2)
    group = mega_batch_size(len(lengths), 16)
    assert group == 96
    full_groups = (322 // group) + (62 // group)  # 3 of images, none of text: then the partial ones
    for k in range(full_groups):
        mega = [abs(lengths[i]) for i in order[k * group : (k + 1) * group]]
        assert mega == sorted(mega, reverse=True)  # sorted longest first
    assert abs(lengths[order[0]]) == max(abs(lengths[i]) for i in order[: full_groups * group])
    spread = [max(abs(lengths[i]) for i in b) - min(abs(lengths[i]) for i in b) for r in per_rank for b in r]
    assert sum(spread) / len(spread) < 300  # lengths 1..2000: a shuffled micro-batch of 4 spreads ~1200
    mixed = [b for r in per_rank for b in r if len({lengths[i] > 0 for i in b}) > 1]
    boundary = order.index(next(i for i in order if lengths[i] < 0))  # where the text-only samples begin
    assert boundary == 322 and mixed  # the global batch of samples 320-335 holds both modalities...
    assert all(boundary // 16 == order.index(b[0]) // 16 for b in mixed)  # ...and it alone


def test_modalities_never_share_a_micro_batch_when_they_fill_whole_mega_batches():
    from mgllava.config import StageConfig

    lengths = _lengths(192, 64)  # 256 samples: mega-batches of 16 x 4 = 64
    stage = StageConfig(global_batch=16, micro_batch=4, lr=1e-3, epochs=3)
    _, per_rank, _ = _global_order(lengths, stage, world_size=2)
    assert all(len({lengths[i] > 0 for i in b}) == 1 for r in per_rank for b in r)


def test_a_length_grouped_stage_resumes_where_it_stopped(tmp_path):
    """Killed after step 3's checkpoint, the rerun trains steps 4-6 on the same micro-batches, same losses."""
    import torch
    from test_train import _Toy, _toy_collate, _ToyData

    from mgllava.config import StageConfig
    from mgllava.train.engine import run_stage

    stage = StageConfig(global_batch=4, micro_batch=2, lr=0.05, save_every=3)
    lengths = _lengths(16, 8)

    def run(directory, data, **kwargs):
        torch.manual_seed(0)
        return run_stage(_Toy(), data, _toy_collate, stage, "finetune", tmp_path / directory, seed=0,
                         progress=False, lengths=lengths, **kwargs)

    def stop_in_step_4(metrics):
        if metrics[-1].step == 4:
            raise KeyboardInterrupt

    whole_data = _ToyData()
    whole = run("whole", whole_data)
    with pytest.raises(KeyboardInterrupt):
        run("split", _ToyData(), on_metrics=stop_in_step_4)
    rest_data = _ToyData()
    rest = run("split", rest_data)
    assert rest.resumed_from == 3
    assert rest_data.seen == whole_data.seen[12:]  # the grouped order's remaining micro-batches
    assert [m.loss for m in rest.metrics] == pytest.approx([m.loss for m in whole.metrics[3:]], abs=1e-6)


# --------------------------------------------------------------------------- ZeRO-3: saving gathered weights


def test_zero3_leaves_rank_0_the_whole_trained_weights(tmp_path):
    """Under ZeRO-3 the module's parameters are empty slices; after the stage rank 0's model holds the
    gathered weights, equal to the same run under ZeRO-2, and they save and load back."""
    import torch
    from safetensors.torch import load_file, save_file
    from test_train import _Toy, _toy_collate, _ToyData

    from mgllava.config import StageConfig
    from mgllava.train.engine import run_stage

    weights, losses = {}, {}
    for zero_stage in (2, 3):
        torch.manual_seed(0)
        model = _Toy()
        stage = StageConfig(global_batch=4, micro_batch=2, lr=0.05, save_every=100, zero_stage=zero_stage)
        result = run_stage(model, _ToyData(), _toy_collate, stage, "pretrain", tmp_path / str(zero_stage), seed=0,
                           progress=False,  # partition even the toy's tiny tensors (ZeRO-3 keeps < 1e5 whole)
                           deepspeed_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / f"{zero_stage}.safetensors")
        weights[zero_stage] = load_file(tmp_path / f"{zero_stage}.safetensors")
        losses[zero_stage] = [m.loss for m in result.metrics]
    assert weights[3]["linear.weight"].shape == (1, 4)
    assert losses[3] == pytest.approx(losses[2], abs=1e-6)
    for name, tensor in weights[2].items():
        torch.testing.assert_close(weights[3][name], tensor, atol=1e-6, rtol=0, msg=name)
    reloaded = _Toy()
    reloaded.load_state_dict(weights[3])  # strict: every key, every shape


@pytest.mark.slow
def test_a_zero3_stage_saves_and_exports_whole_weights(tiny_config, tmp_path):
    """Both stages of the tiny model under ZeRO-3 (with gradient checkpointing and length grouping, as
    the yi-34b preset): trainable.safetensors holds whole tensors that load back, and the export's
    weights are the finetuned ones."""
    import json

    import torch
    from safetensors.torch import load_file

    from mgllava.model import MGLLaVAForConditionalGeneration
    from mgllava.train.job import train
    from mgllava.train.schedule import load_user_deepspeed_config

    config = tiny_config
    ds_json = tmp_path / "zero3.json"
    ds_json.write_text(json.dumps(XTUNER_ZERO3))
    config.train.deepspeed_config = str(ds_json)  # the reference's ZeRO-3 JSON brings stage 3
    assert load_user_deepspeed_config(ds_json)["zero_optimization"]["stage"] == 3
    config.train.gradient_checkpointing = True
    config.data.cache_image_features = False
    for name in ("pretrain", "finetune"):
        stage = getattr(config.train, name)
        stage.micro_batch, stage.global_batch, stage.max_steps, stage.group_by_length = 2, 4, 2, True
    summaries = {name: train(config, name, run_id="z3", progress=False) for name in ("pretrain", "finetune")}
    fresh = MGLLaVAForConditionalGeneration.from_config(config.model)
    shapes = {name: p.shape for name, p in fresh.named_parameters()}
    for name, summary in summaries.items():
        assert summary["steps"] == 2
        saved = load_file(summary["trainable_weights"])
        assert saved and all(tensor.shape == shapes[key] for key, tensor in saved.items()), name
        assert any(key.startswith("llm.") for key in saved) == (name == "finetune")
    fresh.load_trainable(summaries["finetune"]["trainable_weights"])  # loads back
    exported = MGLLaVAForConditionalGeneration.from_pretrained(summaries["finetune"]["export_dir"])
    finetuned = load_file(summaries["finetune"]["trainable_weights"])
    exported_weights = dict(exported.named_parameters())
    for key, tensor in finetuned.items():
        torch.testing.assert_close(exported_weights[key].detach(), tensor, atol=0, rtol=0, msg=key)
    pretrained = load_file(summaries["pretrain"]["trainable_weights"])
    assert any(not torch.equal(pretrained[k], finetuned[k]) for k in pretrained)  # finetune trained on from it


def test_the_user_deepspeed_json_is_part_of_the_stage_content_key(tmp_path):
    """Checkpoints made under one DeepSpeed JSON are not resumed under another (a resume would mix them)."""
    from mgllava.lineage import train_key, train_key_parts

    config = load_config()
    plain = train_key(config, "pretrain")
    ds_json = tmp_path / "ds.json"
    ds_json.write_text('{"zero_optimization": {"stage": 3}}')
    config.train.deepspeed_config = str(ds_json)
    first = train_key(config, "pretrain")
    ds_json.write_text('{"zero_optimization": {"stage": 1}}')
    assert len({plain, first, train_key(config, "pretrain")}) == 3
    assert "deepspeed config" in train_key_parts(config, "pretrain")
