"""The large-batch techniques together inside `distrain train` on 2 gloo ranks with accumulation 2."""

from __future__ import annotations

import json

import pytest
from conftest import checked, distrain, read_jsonl
from safetensors.torch import load_file
from test_train import recipe

pytestmark = [pytest.mark.dist, pytest.mark.slow]

TECHNIQUES = {
    "model": {"name": "cifar_resnet20", "zero_init_residual": True, "ghost_batch_size": 4},
    "batch": {"per_device": 16, "global_batch": 64},  # 2 ranks x 16 x 2 accumulation
    "data": {"policy": "trivialaugment", "random_erasing": 0.25, "repeats": 2, "workers": 2, "train_crop": 16},
    "mix": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5},
    "ema": {"decay": 0.99, "every": 2, "export": True},
    "train": {"label_smoothing": 0.1, "log_every": 5, "max_updates": 25, "clip_grad_norm": 5.0},
    "schedule": {"epochs": 2, "warmup_updates": 4, "decay": "poly", "power": 2.0},
    "progressive": {"start_size": 12, "start_epoch": 0, "end_epoch": 1, "step": 4},  # 12 px, then 16
    "fixres": {"epochs": 1, "lr": 0.01},
    "distributed": {"timeout_s": 120},
}


@pytest.mark.parametrize("optimizer", ["lars", "lamb"])
def test_all_techniques_on_two_ranks(tmp_path, digits, optimizer):
    optim = {"name": optimizer, "lr": 0.5 if optimizer == "lars" else 0.004, "base_batch": 64}
    cfg = recipe(tmp_path, digits, optim=optim, **TECHNIQUES)
    proc = checked(distrain(["train", cfg], cwd=tmp_path, nproc=2))
    assert "2 process(es) x 16 x 2 accumulation = global batch 64" in proc.stderr
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["updates"] == 25
    a, b = summary["replica_fingerprints"]  # parameters and EMA weights, per rank
    assert a == b
    assert {"eval/top1", "eval/ema_top1", "eval/ema_top5", "eval/ema_loss"} <= summary.keys()
    train = [e for e in read_jsonl(run / "metrics.jsonl") if "train/loss" in e]
    assert all(e["train/loss"] == e["train/loss"] for e in train)  # finite
    assert [e["train/resolution"] for e in train] == [12] * 4 + [16]  # epoch 1 starts at update 23
    exported = load_file(run / "model.safetensors")
    ema = load_file(sorted((run / "checkpoints").iterdir())[-1] / "ema.safetensors")
    assert exported.keys() == ema.keys() and all((exported[k] == ema[k].float()).all() for k in ema
                                                  if ema[k].is_floating_point())
    # The FixRes phase ran on both ranks from the EMA export and kept the replicas identical.
    fixres = json.loads((run / "fixres" / "summary.json").read_text())
    assert fixres["phase"] == "fixres" and fixres["updates"] == 22 and fixres["eval/samples"] == 360
    a, b = fixres["replica_fingerprints"]
    assert a == b
