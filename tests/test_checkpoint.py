"""Checkpoint retention (last K plus the best) and resume-compatibility checks, in one process."""

from __future__ import annotations

import json

import torch
from accelerate import Accelerator

from distrain.track.checkpoint import (
    TrainerState,
    best_checkpoint,
    checkpoint_dirs,
    rescale_position,
    resume_differences,
    save_checkpoint,
)


def test_keeps_the_last_k_and_the_best(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    for update, top1 in zip((10, 20, 30, 40, 50), (50.0, 90.0, 70.0, None, 60.0)):
        state = TrainerState(update=update, eval={} if top1 is None else {"eval/top1": top1})
        save_checkpoint(accelerator, tmp_path, state, keep_last=2, keep_best=True)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["update-00000020", "update-00000040", "update-00000050"]
    assert best_checkpoint(tmp_path).name == "update-00000020"
    assert json.loads((tmp_path / "checkpoints" / "update-00000020" / "trainer_state.json").read_text())["update"] == 20
    save_checkpoint(accelerator, tmp_path, TrainerState(update=60), keep_last=2, keep_best=False)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["update-00000050", "update-00000060"]


def test_resume_differences_name_what_changed():
    plan = {"world_size": 2, "per_device": 32, "accumulation": 1, "global_batch": 64, "train_samples": 1000,
            "updates_per_epoch": 15, "total_updates": 150, "warmup_updates": 15, "peak_lr": 0.2,
            "warmup_start_lr": 0.1, "milestone_updates": [50, 100]}
    config = {"model": {"name": "resnet18", "norm": "batch"}, "seed": 0}
    saved = TrainerState(batch_in_epoch=8, config=config, plan=plan)
    assert resume_differences(saved, config, dict(plan, milestone_updates=(50, 100))) == []
    other = dict(plan, world_size=4, global_batch=128, updates_per_epoch=7)
    diffs = resume_differences(saved, {**config, "model": {"name": "resnet50", "norm": "batch"}}, other)
    assert diffs == ["model.name: 'resnet18' -> 'resnet50'", "plan world_size: 2 -> 4", "plan global_batch: 64 -> 128",
                     "plan updates_per_epoch: 15 -> 7"]
    # 8 micro-batches x 32 x 2 ranks = 512 samples done = 4 whole updates of 128.
    assert rescale_position(saved, other) == 4
