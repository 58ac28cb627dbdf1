"""FixRes: what the fine-tuning phase trains and freezes, and the phase inside `distrain train`."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import tarfile

import pytest
import torch
from conftest import checked, distrain, read_jsonl
from safetensors.torch import load_file
from test_plan_schedule import cfg_with
from test_train import recipe
from torch import nn
from wandb_offline import read_offline_runs

from distrain.config import ModelConfig
from distrain.data.decode import eval_sample, train_sample
from distrain.errors import DistrainError
from distrain.models import create_model
from distrain.tricks.fixres import fixres_config, freeze_for_fixres
from distrain.tricks.transfer import train_only


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_last_norm_and_classifier_of_a_resnet():
    model = create_model(ModelConfig(name="resnet18", norm="batch"), 10)
    adapted = freeze_for_fixres(model, "last")
    assert trainable(model) == {"fc.weight", "fc.bias", "layer4.1.bn2.weight", "layer4.1.bn2.bias"}
    assert adapted == [model.layer4[1].bn2]


def test_stats_only_and_all():
    model = create_model(ModelConfig(name="cifar_resnet20", norm="batch"), 10)
    adapted = freeze_for_fixres(model, "stats")
    assert trainable(model) == {"fc.weight", "fc.bias"} and len(adapted) == 1
    model = create_model(ModelConfig(name="cifar_resnet20", norm="batch"), 10)
    adapted = freeze_for_fixres(model, "all")
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(adapted) == len(norms) > 1
    assert trainable(model) == {"fc.weight", "fc.bias"} | {f"{n}.{p}" for n in norms for p in ("weight", "bias")}


def test_train_mode_keeps_only_adapted_layers_training():
    model = create_model(ModelConfig(name="cifar_resnet20", norm="batch"), 10)
    adapted = freeze_for_fixres(model, "last")
    wrapper = nn.Sequential(model)  # stands in for the DDP wrapper
    model.eval()
    train_only(wrapper, model, adapted)
    assert wrapper.training
    assert [n for n, m in model.named_modules() if m.training] == ["layers.8.bn2"]
    # A training-mode forward moves the adapted BN's statistics only.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(4, 3, 16, 16))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"layers.8.bn2.running_mean", "layers.8.bn2.running_var", "layers.8.bn2.num_batches_tracked"}


def test_phase_config():
    base = cfg_with(data={"train_crop": 176, "eval_resize": 232, "eval_crop": 224, "policy": "trivialaugment",
                          "random_erasing": 0.1, "repeats": 4},
                    mix={"mixup_alpha": 0.2}, ema={"decay": 0.9999, "export": True},
                    fixres={"epochs": 3, "lr": 0.002}, progressive={"start_size": 128, "end_epoch": 50})
    f = fixres_config(base)
    assert f.out_dir == base.out_dir / "fixres"
    assert (f.data.train_crop, f.data.train_resize, f.data.eval_resize, f.data.eval_crop) == (224, 232, 232, 224)
    assert (f.data.policy, f.data.random_erasing, f.data.repeats) == ("none", 0.0, 1)
    assert f.mix.mixup_alpha == 0 and f.ema.decay == 0 and f.progressive.start_size == 0
    assert (f.optim.lr, f.schedule.epochs, f.schedule.warmup_epochs, f.schedule.decay) == (0.002, 3, 0.0, "cosine")
    assert f.batch == base.batch and f.optim.name == base.optim.name
    # It starts from the main run's export; the model is otherwise the main run's.
    assert f.model.pretrained == str(base.out_dir) and dataclasses.replace(f.model, pretrained="") == base.model


def test_phase_in_distrain_train_and_resume(tmp_path, digits):
    cfg = recipe(tmp_path, digits, fixres={"epochs": 2, "lr": 0.05}, data={"train_crop": 12},
                 ema={"decay": 0.9, "export": True}, train={"log_every": 5})
    proc = checked(distrain(["train", cfg], cwd=tmp_path))
    run, phase = tmp_path / "run", tmp_path / "run" / "fixres"
    assert "done fixres phase" in proc.stdout
    main, fixed = load_file(run / "model.safetensors"), load_file(phase / "model.safetensors")
    changed = {k for k in main if not torch.equal(main[k], fixed[k])}
    assert changed == {"fc.weight", "fc.bias", "layers.8.bn2.weight", "layers.8.bn2.bias",
                       "layers.8.bn2.running_mean", "layers.8.bn2.running_var", "layers.8.bn2.num_batches_tracked"}
    summary = json.loads((phase / "summary.json").read_text())
    main_summary = json.loads((run / "summary.json").read_text())
    assert summary["phase"] == "fixres" and summary["epoch"] == 2 and summary["eval/samples"] == 360
    events = read_jsonl(phase / "metrics.jsonl")
    assert {e["train/resolution"] for e in events if "train/resolution" in e} == {16}  # eval_crop, not 12
    # One W&B run: the phase logs under fixres/ at steps after the main phase's.
    (wandb_run,) = read_offline_runs(run)
    steps = [r["_step"] for r in wandb_run["history"] if "fixres/train/loss" in r]
    assert steps and min(steps) > main_summary["updates"]
    assert wandb_run["summary"]["fixres/eval/top1"] == pytest.approx(summary["eval/top1"])

    # Resume inside the phase: drop its last checkpoint; the main phase is not run again. Then drop
    # all of the phase's checkpoints: the phase starts over, still without rerunning the main one.
    main_events = len(read_jsonl(run / "metrics.jsonl"))
    for drop in ("last", "all"):
        ckpts = sorted((phase / "checkpoints").iterdir())
        for ckpt in ckpts[-1:] if drop == "last" else ckpts:
            shutil.rmtree(ckpt)
        proc = checked(distrain(["train", cfg, "--resume", "auto"], cwd=tmp_path))
        left = ckpts[:-1] if drop == "last" else []
        assert ("resuming from" in proc.stderr and "fixres" in proc.stderr) == bool(left), drop
        assert len(read_jsonl(run / "metrics.jsonl")) == main_events, drop
        again = load_file(phase / "model.safetensors")
        assert all(torch.equal(again[k], fixed[k]) for k in fixed), drop  # an exact continuation


def test_test_time_training_crop_equals_the_eval_crop(digits):
    with tarfile.open(next((digits / "train").glob("*.tar"))) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith(".png"))
        image = tf.extractfile(member).read()
    crop = train_sample(image, 16, (0.08, 1.0), (0.75, 1.33), False, random.Random(0), None, resize=20)
    assert torch.equal(crop, eval_sample(image, 20, 16))


def test_train_crop_larger_than_train_resize_is_refused():
    with pytest.raises(DistrainError, match="data.train_crop: 224 is larger than data.train_resize 200"):
        cfg_with(data={"train_crop": 224, "train_resize": 200})
