"""Resume continues exactly or refuses: every setting that decides the next samples, their
augmentation, the loss or the LR must match the checkpoint's (deny by default)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import checked, distrain, write_layout
from test_train import recipe

from distrain.config import Config, apply_overrides, from_dict, to_dict
from distrain.data.shards import resolve_shards
from distrain.data.stream import Augment, ShardStream, make_loader
from distrain.plan import make_plan
from distrain.track.checkpoint import RESUME_FREE, TrainerState, checkpoint_dirs, resume_differences

BASE = {"model": {"name": "cifar_resnet20"}, "data": {"workers": 1, "train_crop": 16, "shuffle_block": 256},
        "batch": {"per_device": 16, "accumulation": 2}, "schedule": {"epochs": 4}}


def differences(overrides: list[str], batch_in_epoch: int = 8, epoch: int = 1, saved_config: dict | None = None):
    """resume_differences of a checkpoint of BASE (as stored: through JSON) against BASE + overrides."""
    old, new = from_dict(BASE), from_dict(apply_overrides(BASE, overrides))
    saved = TrainerState(epoch=epoch, batch_in_epoch=batch_in_epoch, config=saved_config or to_dict(old),
                         plan=make_plan(old, 1, 1000).as_dict())
    saved = TrainerState(**json.loads(json.dumps(dataclasses.asdict(saved))))
    return resume_differences(saved, to_dict(new), make_plan(new, 1, 1000).as_dict())


def test_the_same_settings_resume():
    assert differences([]) == []


@pytest.mark.parametrize("override, expected", [
    # Which samples come next.
    ("seed=1", "seed: 0 -> 1"),
    ("data.shuffle_block=512", "data.shuffle_block: 256 -> 512"),
    ("data.repeats=2", "data.repeats: 1 -> 2"),
    ("data.train=/elsewhere/shards", "data.train: '' -> '/elsewhere/shards'"),
    # Their augmentation.
    ("data.scale=[0.5,1.0]", "data.scale: [0.08, 1.0] -> [0.5, 1.0]"),
    ("data.hflip=false", "data.hflip: True -> False"),
    ("data.policy=trivialaugment", "data.policy: 'none' -> 'trivialaugment'"),
    ("data.random_erasing=0.25", "data.random_erasing: 0.0 -> 0.25"),
    ("mix.mixup_alpha=0.2", "mix.mixup_alpha: 0.0 -> 0.2"),
    ("mix.switch_prob=0.3", "mix.switch_prob: 0.5 -> 0.3"),
    ("progressive.start_size=8", "progressive.start_size: 0 -> 8"),
    # The loss.
    ("train.label_smoothing=0.1", "train.label_smoothing: 0.0 -> 0.1"),
    ("model.norm=group", "model.norm: 'batch' -> 'group'"),
    ("model.drop_path_rate=0.1", "model.drop_path_rate: 0.0 -> 0.1"),
    # The LR and the updates.
    ("schedule.decay=multistep", "schedule.decay: 'cosine' -> 'multistep'"),
    ("schedule.milestones=[1,2,3]", "schedule.milestones: [30, 60, 80] -> [1.0, 2.0, 3.0]"),
    ("schedule.gamma=0.5", "schedule.gamma: 0.1 -> 0.5"),
    ("schedule.final_lr_factor=0.01", "schedule.final_lr_factor: 0.0 -> 0.01"),
    ("optim.weight_decay=0.0005", "optim.weight_decay: 0.0001 -> 0.0005"),
    ("ema.decay=0.99", "ema.decay: 0.0 -> 0.99"),
])
def test_a_setting_that_changes_the_continuation_is_refused(override, expected):
    assert expected in differences([override])


def test_all_differences_are_listed():
    diffs = differences(["data.shuffle_block=512", "schedule.gamma=0.5", "optim.momentum=0.8", "batch.per_device=8"])
    assert diffs[:3] == ["data.shuffle_block: 256 -> 512", "optim.momentum: 0.9 -> 0.8", "schedule.gamma: 0.1 -> 0.5"]
    assert "plan per_device: 16 -> 8" in diffs[3:]


def test_the_worker_count_may_change_only_at_an_epoch_boundary():
    # Mid-epoch, 2 workers would read other parts of the epoch than 1 did (see the stream test below).
    (diff,) = differences(["data.workers=2"], batch_in_epoch=8)
    assert diff.startswith("data.workers: 1 -> 2 (mid-epoch, at micro-batch 8 of epoch 1")
    assert differences(["data.workers=2"], batch_in_epoch=0) == []
    assert differences(["data.workers=2"], batch_in_epoch=62) == []  # stopped after the epoch's last batch
    assert differences(["data.workers=0"], batch_in_epoch=8) == []  # 0 and 1 are both one stream


@pytest.mark.parametrize("override", [
    "name=other", "run_dir=/somewhere/else", "train.max_updates=5", "train.log_every=1", "train.nonfinite=stop",
    "train.max_consecutive_skips=3", "data.prefetch=8", "data.eval=/evalset", "data.eval_crop=8",
    "data.bad_samples=fail", "data.max_bad_fraction=0.5", "eval.every_epochs=3", "checkpoint.keep_last=5",
    "logging.wandb=false", "preemption.check_every=10", "ema.export=true", "distributed.timeout_s=60",
    "model.channels_last=true", "fixres.epochs=2",
])
def test_a_setting_that_leaves_the_continuation_alone_may_change(override):
    assert differences([override]) == []


def test_keys_are_compared_by_default_old_checkpoints_read_as_defaults():
    old = to_dict(from_dict(BASE))
    del old["mix"]  # a checkpoint written before the mix section existed: it ran without mixing
    assert differences([], saved_config=old) == []
    assert differences(["mix.mixup_alpha=0.2"], saved_config=old) == ["mix.mixup_alpha: 0.0 -> 0.2"]
    # A key that no free pattern names (here one the schema does not know yet) is compared.
    future = {**old, "data": {**old["data"], "new_augmentation": 1}}
    assert differences([], saved_config=future) == ["data.new_augmentation: 1 -> None"]


def test_every_free_key_names_a_config_key_or_section():
    schema = to_dict(Config())
    for pattern in RESUME_FREE:
        node = schema
        for part in pattern.removesuffix(".*").split("."):
            assert part in node, pattern
            node = node[part]
        assert isinstance(node, dict) == pattern.endswith(".*"), pattern


def _epoch_keys(shards, workers: int, start: int) -> list[str]:
    """The keys of epoch 1 from micro-batch ``start`` on, read with ``workers`` DataLoader workers."""
    stream = ShardStream(shards, rank=0, world_size=1, batch_size=4, seed=0, num_classes=4,
                         augment=Augment(8, (0.5, 1.0), (1.0, 1.0), False), batches_per_epoch=12, shuffle_block=8)
    stream.set_position(1, start)
    return [key for batch in make_loader(stream, workers, 2, pin_memory=False) for key in batch["key"]]


def test_why_workers_may_change_at_an_epoch_boundary_only(tmp_path):
    """An epoch read with 2 workers holds each sample of it once, as with 1 worker (in another
    order); switching from 1 to 2 workers mid-epoch repeats some samples and skips others."""
    shards = resolve_shards(str(write_layout(tmp_path / "set", [24, 24])))
    one = _epoch_keys(shards, 1, 0)
    assert len(one) == 48 and sorted(_epoch_keys(shards, 2, 0)) == sorted(one)
    assert _epoch_keys(shards, 0, 5) == one[20:]  # 0 workers read as 1 does, mid-epoch too
    switched = one[:20] + _epoch_keys(shards, 2, 5)
    assert len(switched) == 48 and len(set(switched)) < 48


def test_resuming_mid_epoch_with_more_workers_is_refused_in_one_line(tmp_path, digits):
    cfg = recipe(tmp_path, digits, data={"eval": ""})
    checked(distrain(["train", cfg, "train.max_updates=4"], cwd=tmp_path))
    (checkpoint,) = checkpoint_dirs(tmp_path / "run")
    proc = distrain(["train", cfg, "data.workers=2", "--resume", "auto"], cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith(f"distrain: error: --resume {checkpoint}: settings differ"), lines[-1]
    assert "data.workers: 1 -> 2 (mid-epoch, at micro-batch 8 of epoch 0" in lines[-1]
    assert "--allow-config-change" in lines[-1]
    assert checkpoint_dirs(tmp_path / "run") == [checkpoint]  # nothing written


def test_precision_is_compared_as_resolved_not_as_auto():
    """`auto` is bf16 on an A100 and fp16 on a V100: the run stores what it resolved to, and a
    resume on another GPU generation is refused rather than silently switching precision."""
    from distrain.track.checkpoint import TrainerState, resume_differences

    config = to_dict(Config())
    saved = TrainerState(config={**config, "train": {**config["train"], "precision": "bf16"}})
    now = {**config, "train": {**config["train"], "precision": "fp16"}}
    assert resume_differences(saved, now, {}) == ["train.precision: 'bf16' -> 'fp16'"]
    old_style = TrainerState(config={**config, "train": {**config["train"], "precision": "auto"}})
    assert resume_differences(old_style, now, {}) == []  # written before precision was stored resolved
