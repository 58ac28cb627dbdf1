"""Progressive resizing: the resolution schedule, its config checks and the stream's output size."""

from __future__ import annotations

import pytest
from test_plan_schedule import cfg_with

from distrain.data.shards import resolve_shards
from distrain.data.stream import Augment, ShardStream
from distrain.errors import DistrainError
from distrain.tricks.progressive import size_at, train_size


def test_ramp_holds_before_and_after():
    # FFCV's ResNet-50 shape: 160 px to epoch 10, ramp to 192 at epoch 85, then hold.
    sizes = [size_at(e, 160, 192, 10, 85, 32) for e in range(90)]
    assert sizes[:11] == [160] * 11
    assert sizes[85:] == [192] * 5
    assert all(s % 32 == 0 for s in sizes)
    assert sizes == sorted(sizes)  # never shrinks
    assert (sizes[47], sizes[48]) == (160, 192)  # 175.8 rounds down, 176.2 up


def test_ramp_rounds_to_step():
    assert [size_at(e, 16, 32, 0, 4, 4) for e in range(6)] == [16, 20, 24, 28, 32, 32]
    assert [size_at(e, 16, 32, 0, 3, 8) for e in range(4)] == [16, 24, 24, 32]  # 21.3 -> 24, 26.7 -> 24


def test_step_change_when_start_equals_end():
    assert [size_at(e, 128, 224, 5, 5, 32) for e in range(8)] == [128] * 6 + [224] * 2


def test_off_means_train_crop():
    cfg = cfg_with(data={"train_crop": 176})
    assert {train_size(cfg, e) for e in range(10)} == {176}
    on = cfg_with(data={"train_crop": 176}, schedule={"epochs": 10},
                  progressive={"start_size": 128, "start_epoch": 2, "end_epoch": 6, "step": 16})
    assert [train_size(on, e) for e in range(10)] == [128, 128, 128, 144, 160, 160, 176, 176, 176, 176]


@pytest.mark.parametrize("section, message", [
    ({"start_size": 64, "end_epoch": 99}, "progressive.end_epoch"),
    ({"start_size": 64, "start_epoch": 5, "end_epoch": 3}, "progressive.end_epoch"),
    ({"start_size": 64, "end_epoch": 3, "step": 0}, "progressive.step"),
    ({"start_size": -1}, "progressive.start_size"),
])
def test_bad_schedule_names_the_key(section, message):
    with pytest.raises(DistrainError, match=message):
        cfg_with(schedule={"epochs": 10}, progressive=section)


def test_stream_changes_resolution_between_epochs(digits):
    shards = resolve_shards(str(digits / "train"))
    stream = ShardStream(shards, rank=0, world_size=1, batch_size=8, seed=0, num_classes=10,
                         augment=Augment(32, (0.6, 1.0), (0.8, 1.25), False), batches_per_epoch=3)
    stream.set_size(16)
    assert {tuple(b["image"].shape) for b in stream} == {(8, 3, 16, 16)}
    stream.set_position(1)
    stream.set_size(24)
    batches = list(stream)
    assert len(batches) == 3 and {tuple(b["image"].shape) for b in batches} == {(8, 3, 24, 24)}
