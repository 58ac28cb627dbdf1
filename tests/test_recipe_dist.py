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
    "batch": {"per_device": 16, "accumulation": 2},
    "data": {"policy": "trivialaugment", "random_erasing": 0.25, "repeats": 2, "workers": 2},
    "mix": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5},
    "ema": {"decay": 0.99, "every": 2, "export": True},
    "train": {"label_smoothing": 0.1, "log_every": 5, "max_updates": 12, "clip_grad_norm": 5.0},
    "schedule": {"epochs": 2, "warmup_updates": 4, "decay": "poly", "power": 2.0},
    "distributed": {"timeout_s": 120},
}


@pytest.mark.parametrize("optimizer", ["lars", "lamb"])
def test_all_techniques_on_two_ranks(tmp_path, digits, optimizer):
    optim = {"name": optimizer, "lr": 0.5 if optimizer == "lars" else 0.004, "base_batch": 64}
    cfg = recipe(tmp_path, digits, optim=optim, **TECHNIQUES)
    checked(distrain(["train", cfg], cwd=tmp_path, nproc=2))
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["updates"] == 12
    a, b = summary["replica_fingerprints"]  # parameters and EMA weights, per rank
    assert a == b
    assert {"eval/top1", "eval/ema_top1", "eval/ema_top5", "eval/ema_loss"} <= summary.keys()
    train = [e for e in read_jsonl(run / "metrics.jsonl") if "train/loss" in e]
    assert all(e["train/loss"] == e["train/loss"] for e in train)  # finite
    exported = load_file(run / "model.safetensors")
    ema = load_file(sorted((run / "checkpoints").iterdir())[-1] / "ema.safetensors")
    assert exported.keys() == ema.keys() and all((exported[k] == ema[k].float()).all() for k in ema
                                                  if ema[k].is_floating_point())
