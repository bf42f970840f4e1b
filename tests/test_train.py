"""Training: label masking, the DeepSpeed stage loop, resume, bad input, and the flow's failure path."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch

from mgllava.config import ConfigError, StageConfig, load_config
from mgllava.model import IGNORE_INDEX
from mgllava.templates import TEMPLATES
from mgllava.train.data import Collate, ConversationDataset, Skipped, cache_image_features, load_conversations
from mgllava.train.engine import run_stage
from mgllava.train.schedule import StepPlan, micro_batch_order, plan_steps

CONVERSATION = [
    ("human", "<image>\nIs there a red circle in the image?"),
    ("gpt", "yes"),
    ("human", "How many shapes are there?"),
    ("gpt", "3"),
]


@pytest.fixture(scope="module")
def tokenizer(tiny_zoo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_zoo / "llm")


@pytest.mark.parametrize("template_name", sorted(TEMPLATES))
def test_loss_is_only_on_assistant_replies_for_every_template(template_name, tokenizer):
    from mgllava.model import MGLLaVAProcessor

    template = TEMPLATES[template_name]
    processor = MGLLaVAProcessor(tokenizer, template, 256, (0.5,) * 3, (0.5,) * 3, max_text_length=512)
    input_ids, labels = processor.tokenize_conversation(CONVERSATION)
    assert input_ids[0].item() == tokenizer.bos_token_id
    assert (input_ids == -200).sum() == 1 and labels[input_ids == -200].item() == IGNORE_INDEX
    trained = labels[labels != IGNORE_INDEX]
    eos = [] if template.suffix_as_eos else [tokenizer.eos_token_id]
    expected = tokenizer("yes" + template.suffix, add_special_tokens=False)["input_ids"] + eos
    expected += tokenizer("3" + template.suffix, add_special_tokens=False)["input_ids"] + eos
    assert trained.tolist() == expected
    # the trained tokens are exactly where the replies stand in the input
    assert torch.equal(input_ids[labels != IGNORE_INDEX], trained)


def test_truncation_keeps_the_budget(tokenizer):
    from mgllava.model import MGLLaVAProcessor

    processor = MGLLaVAProcessor(tokenizer, "vicuna_v1", 256, (0.5,) * 3, (0.5,) * 3, max_text_length=20)
    input_ids, labels = processor.tokenize_conversation(CONVERSATION)
    assert len(input_ids) == len(labels) == 20


def test_global_batch_must_divide():
    stage = StageConfig(global_batch=16, micro_batch=8, lr=1e-3)
    with pytest.raises(ConfigError, match=r"global_batch=16 is not divisible by micro_batch x world_size = 8 x 3"):
        plan_steps(stage, 100, world_size=3, stage_name="pretrain")
    with pytest.raises(ConfigError, match="not divisible by micro_batch=6"):
        load_config(overrides=["train.pretrain.micro_batch=6"])
    plan = plan_steps(stage, 100, world_size=1, stage_name="pretrain")
    assert (plan.grad_accum, plan.total_steps, plan.warmup_steps) == (2, 6, 1)


def test_data_order_is_seeded_and_split_across_ranks():
    plan = StepPlan(world_size=2, micro_batch=2, grad_accum=1, global_batch=4, total_steps=5, warmup_steps=1)
    rank0 = micro_batch_order(7, plan, seed=3, rank=0)
    rank1 = micro_batch_order(7, plan, seed=3, rank=1)
    assert rank0 == micro_batch_order(7, plan, seed=3, rank=0)
    assert len(rank0) == len(rank1) == 5
    seen = sorted(i for batch in rank0 + rank1 for i in batch)
    assert len(seen) == 20 and set(seen) == set(range(7))  # ~3 epochs of 7 samples


def test_bad_conversations_are_rejected_with_counts(tmp_path):
    records = [
        {"id": "ok", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "yes"}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"id": "no-answer", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nhi"}]},
        {"id": "empty", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": " "}]},
        {"id": "bad-role", "conversations": [{"from": "system", "value": "x"}, {"from": "gpt", "value": "y"}]},
        {"id": "no-placeholder", "image": "a.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "y"}]},
        "not a record",
    ]
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps(records))
    kept, report = load_conversations(path)
    assert [r["id"] for r in kept] == ["ok", "text-only"]
    assert report.rejected == {
        "no_assistant_turn": 1,
        "empty_text": 1,
        "unknown_role": 1,
        "image_placeholder_mismatch": 1,
        "malformed_record": 1,
    }
    assert report.kept + sum(report.rejected.values()) == report.records == len(records)
    path.write_text("[{broken")
    with pytest.raises(ValueError, match="corpus.json is not valid JSON"):
        load_conversations(path)


@pytest.mark.parametrize("cached", [False, True], ids=["images", "cached-features"])
def test_missing_and_corrupt_images_are_skipped_and_counted(tiny_config, tmp_path, cached):
    from mgllava.model import MGLLaVAForConditionalGeneration, MGLLaVAProcessor

    records, _ = load_conversations(tiny_config.data.finetune_json)
    records = records[:4]
    records[1] = {**records[1], "image": "train/does-not-exist.png"}
    corrupt = tmp_path / "images" / "corrupt.png"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    records[2] = {**records[2], "image": str(corrupt)}  # an absolute key: allowed below
    processor = MGLLaVAProcessor.from_config(tiny_config.model)
    dataset = ConversationDataset(records, tiny_config.data.image_root, {}, processor,
                                  allow_absolute_image_paths=True)
    assert len(dataset.keys_without_boxes) == 4
    if cached:
        cache_image_features(dataset, MGLLaVAForConditionalGeneration.from_config(tiny_config.model).encode_frozen,
                             progress=False)
        assert sum(isinstance(f, Skipped) for f in dataset.image_features.values()) == 2
    items = [dataset[i] for i in range(len(dataset))]
    assert [type(i).__name__ for i in items] == ["dict", "Skipped", "Skipped", "dict"]
    assert {i.reason for i in items if isinstance(i, Skipped)} == {"missing", "unreadable"}  # detection's reasons
    batch = Collate(processor)(items)
    assert len(batch["input_ids"]) + len(batch["skipped"]) == len(records)
    if cached:
        assert batch["pixel_values"] is None and len(batch["image_features"]) == 2
    else:
        assert batch["pixel_values"].shape[0] == 2 and batch["image_features"] is None


def _first_finetune_items(tiny_config, n: int = 4) -> tuple:
    """The processor and the first ``n`` loaded samples of the tiny world's finetune corpus."""
    from mgllava.model import MGLLaVAProcessor

    records, _ = load_conversations(tiny_config.data.finetune_json)
    processor = MGLLaVAProcessor.from_config(tiny_config.model)
    dataset = ConversationDataset(records[:n], tiny_config.data.image_root, {}, processor)
    return processor, [dataset[i] for i in range(len(dataset))]


def test_training_batches_are_right_padded_without_a_mask_and_lose_nothing_by_it(tiny_config):
    """Collate drops the attention mask (so SDPA runs its causal kernel): the loss and its gradients
    equal those of the same rows with the padding masked, and the token count is the mask's."""
    processor, items = _first_finetune_items(tiny_config)
    batch = Collate(processor)(items)
    masked = processor.collate(items)
    assert "attention_mask" not in batch and masked["attention_mask"].min() == 0  # the rows differ in length
    assert batch["n_tokens"] == int(masked["attention_mask"].sum())

    _assert_same_loss_and_gradients(tiny_config, batch, masked)


def _assert_same_loss_and_gradients(tiny_config, *batches: dict) -> None:
    """A fresh finetune-stage model gives every batch the same loss and projector gradient."""
    from mgllava.model import MGLLaVAForConditionalGeneration

    model = MGLLaVAForConditionalGeneration.from_config(tiny_config.model)
    model.set_stage("finetune")
    losses, grads = [], []
    for batch in batches:
        model.zero_grad()
        loss = model(**{k: v for k, v in batch.items() if k not in ("skipped", "n_tokens")}).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.projector[0].weight.grad.clone())
    for loss, grad in zip(losses[1:], grads[1:]):
        torch.testing.assert_close(loss, losses[0])
        torch.testing.assert_close(grad, grads[0])


def test_batches_rounded_up_to_a_multiple_train_as_the_unrounded_ones(tiny_config):
    """``data.pad_to_multiple_of`` lengthens a batch to the next multiple with padding that carries no
    labels: the same token count, loss and gradients as the batch padded to its longest row."""
    processor, items = _first_finetune_items(tiny_config)
    tight, rounded = Collate(processor)(items), Collate(processor, pad_to_multiple_of=32)(items)
    longest = max(len(item["input_ids"]) for item in items)
    assert tight["input_ids"].shape[1] == longest and longest % 32  # the rounding has something to do
    assert rounded["input_ids"].shape[1] == -(-longest // 32) * 32
    assert rounded["n_tokens"] == tight["n_tokens"]
    _assert_same_loss_and_gradients(tiny_config, tight, rounded)


class _Toy(torch.nn.Module):
    """A model small enough to watch the engine's bookkeeping: y = w.x."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, input_ids, target, **_):
        return SimpleNamespace(loss=((self.linear(input_ids) - target) ** 2).mean())


class _ToyData(torch.utils.data.Dataset):
    def __init__(self):
        self.seen: list[int] = []

    def __len__(self):
        return 24

    def __getitem__(self, index):
        self.seen.append(index)
        x = torch.randn(4, generator=torch.Generator().manual_seed(index))
        return x, x.sum(0, keepdim=True)


def _toy_collate(items):
    return {
        "input_ids": torch.stack([x for x, _ in items]),
        "target": torch.stack([y for _, y in items]),
        "skipped": [],
        "n_tokens": len(items),
    }


class _Killed(Exception):
    pass


def test_boxes_dir_pointing_at_the_parquet_parts_fails_with_the_right_directory(tmp_path):
    from mgllava.train.job import load_boxes

    parts = tmp_path / "detect" / "boxes"
    parts.mkdir(parents=True)
    (parts / "part-00000.parquet").write_bytes(b"")
    with pytest.raises(ConfigError, match=f"above them: {tmp_path / 'detect'}$"):
        load_boxes(parts)
    assert load_boxes(tmp_path / "nothing-here") == {}  # no tables at all: one zero box per image, with a warning


def test_kill_and_resume_continues_the_same_run(tmp_path):
    stage = StageConfig(global_batch=4, micro_batch=2, lr=0.05, epochs=2, save_every=3, log_every=1)
    torch.manual_seed(0)
    full_data = _ToyData()
    full = run_stage(_Toy(), full_data, _toy_collate, stage, "pretrain", tmp_path / "a", seed=0, progress=False)
    assert full.steps == 12 and full.resumed_from == 0

    def kill_during_step_7(metrics):  # after step 6 was checkpointed
        if metrics[-1].step == 7:
            raise _Killed

    torch.manual_seed(0)
    first_data = _ToyData()
    with pytest.raises(_Killed):
        run_stage(_Toy(), first_data, _toy_collate, stage, "pretrain", tmp_path / "b", seed=0,
                  progress=False, on_metrics=kill_during_step_7)
    torch.manual_seed(123)  # a different init: the checkpoint must overwrite it
    second_data = _ToyData()
    resumed = run_stage(_Toy(), second_data, _toy_collate, stage, "pretrain", tmp_path / "b", seed=0,
                        progress=False)
    assert resumed.resumed_from == 6 and resumed.steps == full.steps
    assert first_data.seen[: 6 * 4] + second_data.seen == full_data.seen  # same data order
    assert [m.step for m in resumed.metrics] == list(range(7, 13))
    for a, b in zip(resumed.metrics, full.metrics[6:]):
        assert a.loss == pytest.approx(b.loss, rel=1e-5)  # the loss continues where it stopped
        assert a.lr == pytest.approx(b.lr)


def test_jobs_get_the_users_omp_threads_not_ultralytics(tmp_path, monkeypatch):
    import ultralytics  # noqa: F401  (sets OMP_NUM_THREADS=1 in this process when it was unset)

    import mgllava
    from mgllava.train.launch import run_job

    script = tmp_path / "threads.py"
    script.write_text("import os\nprint(os.environ.get('OMP_NUM_THREADS', 'unset'))\n")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for users, expected in ((None, "unset"), ("3", "3")):
        monkeypatch.setattr(mgllava, "USER_OMP_NUM_THREADS", users)
        lines = []
        run_job([sys.executable, str(script)], lines.append)
        assert lines == [expected]


@pytest.mark.slow
@pytest.mark.parametrize("stage_name", ["pretrain", "finetune"])
def test_stage_trains_under_zero2_and_loss_falls(stage_name, tiny_config, monkeypatch):
    from mgllava.train.job import train
    from warehouse import db

    config = tiny_config
    # 8 samples seen 6 times: a loss that does not fall is a bug, not noise
    for name in ("pretrain", "finetune"):
        stage = getattr(config.train, name)
        stage.global_batch, stage.micro_batch, stage.epochs, stage.save_every = 8, 4, 6, 100
        stage.lr = 3e-3
    records, _ = load_conversations(config.data.finetune_json)
    subset = config.data.finetune_json.replace("instruct.json", "instruct8.json")
    with open(subset, "w") as f:
        json.dump(records[:8], f)
    config.data.finetune_json = config.data.pretrain_json = subset
    config.data.cache_image_features = stage_name == "finetune"  # both ways of feeding images train
    if stage_name == "finetune":
        train(config, "pretrain", run_id="r1", progress=False)
    summary = train(config, stage_name, run_id="r1", progress=False)
    assert summary["steps"] == 6 and summary["skipped_samples"] == {}
    with db.connect(read_only=True) as con:
        losses = [row[0] for row in con.execute(
            "SELECT loss FROM train_steps WHERE run_id = ? AND stage = ? ORDER BY step", ["r1", stage_name]
        ).fetchall()]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    if stage_name == "finetune":
        from mgllava.model import MGLLaVAForConditionalGeneration, MGLLaVAProcessor, answer_questions

        model = MGLLaVAForConditionalGeneration.from_pretrained(summary["export_dir"])
        processor = MGLLaVAProcessor.from_pretrained(summary["export_dir"])
        assert answer_questions(model, processor, [None], [None], ["Is there a red circle?"], max_new_tokens=2)


def test_launcher_job_failure_raises_with_the_last_lines(tmp_path):
    from mgllava.train.launch import JobFailed, run_job

    script = tmp_path / "fail.py"
    script.write_text("import sys\nfor i in range(100): print('line', i)\nsys.exit('boom: bad weights')\n")
    lines = []
    with pytest.raises(JobFailed) as info:
        run_job([sys.executable, str(script)], lines.append, tail_lines=5)
    assert info.value.returncode == 1 and len(lines) == 101
    assert info.value.tail[-1] == "boom: bad weights" and len(info.value.tail) == 5
    assert "boom: bad weights" in str(info.value)


@pytest.mark.slow
def test_finetune_flow_fails_cleanly_when_the_job_fails(tiny_config, tmp_path):
    """The real flow, the real ``deepspeed`` launcher: a job that dies fails the flow with its error."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.train import finetune
    from mgllava.train.job import stage_dir
    from mgllava.train.launch import JobFailed

    weights = stage_dir(tiny_config, "pretrain") / "trainable.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"not a safetensors file")  # passes the start-up checks, fails inside the job
    config_file = tiny_config.save(tmp_path / "config.yaml")
    with prefect_test_harness(server_startup_timeout=180):
        with pytest.raises(JobFailed) as info:
            finetune(config_file=str(config_file), run_id="broken")
    assert info.value.returncode != 0
    assert any("trainable.safetensors" in line or "SafetensorError" in line for line in info.value.tail)


def test_reset_stage_takes_the_stage_lock(tmp_path):
    from mgllava.train.job import StageBusy, reset_stage, stage_dir, stage_lock

    config = load_config(overrides=[f"work_dir={tmp_path}"])
    out = stage_dir(config, "pretrain").resolve()
    (out / "checkpoints").mkdir(parents=True)
    with stage_lock(out):  # a run of the stage holds it: its checkpoints are not pulled from under it
        with pytest.raises(StageBusy, match=f"{out} is in use by another run"):
            reset_stage(config, "pretrain")
    assert (out / "checkpoints").is_dir()
    reset_stage(config, "pretrain")
    assert not out.exists()
