"""The large-batch techniques together inside `distrain train` on 2 gloo ranks with accumulation 2."""

from __future__ import annotations

import json
import math

import pytest
from conftest import checked, distrain, read_jsonl
from safetensors.torch import load_file
from test_train import recipe

pytestmark = [pytest.mark.dist, pytest.mark.slow]

TECHNIQUES = {
    "model": {"name": "cifar_resnet20", "zero_init_residual": True, "norm": "ghost", "ghost_batch_size": 4,
              "init": "he", "drop_path_rate": 0.2, "dropout": 0.1},
    "batch": {"per_device": 16, "global_batch": 64},  # 2 ranks x 16 x 2 accumulation
    "data": {"policy": "trivialaugment", "random_erasing": 0.25, "repeats": 2, "workers": 2, "train_crop": 16},
    "mix": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5},
    "ema": {"decay": 0.99, "every": 2, "export": True},
    "train": {"label_smoothing": 0.1, "log_every": 5, "max_updates": 25, "clip_grad_norm": 5.0},
    "schedule": {"epochs": 2, "warmup_updates": 4, "decay": "poly", "power": 2.0},
    "progressive": {"start_size": 12, "start_epoch": 0, "end_epoch": 1, "step": 4},  # 12 px, then 16
    "fixres": {"epochs": 1, "lr": 0.01},
    "distributed": {"timeout_s": 120},
    "logging": {"draws": True},
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
    assert train and all(math.isfinite(e["train/loss"]) for e in train)
    # Each device-side technique acted, on both ranks (the draws log of logging.draws).
    draws = [{(r["update"], r["micro"]): r for r in read_jsonl(run / "draws" / f"rank{k}.jsonl")} for k in (0, 1)]
    assert draws[0].keys() == draws[1].keys() and len(draws[0]) == 25 * 2
    for rank in draws:
        mixes = [r["mix"] for r in rank.values()]
        assert all(m is not None and 0 < m["lam"] <= 1 for m in mixes)  # prob 1: every batch is mixed
        # ... and its targets are soft, but where a CutMix box at 12-16 px rounds to nothing (lam 1)
        assert sum(m["lam"] < 1 for m in mixes) >= 0.85 * len(mixes)
        assert {m["kind"] for m in mixes} == {"mixup", "cutmix"}
        erased = sum(len(r["erased"]) for r in rank.values())
        assert 0.15 < erased / (len(rank) * 16) < 0.35  # random_erasing 0.25 of the images
    # Ghost BN: the run's model (built from its saved config, with its exported weights) normalises
    # a micro-batch of 16 over ghost batches of 4, whose statistics differ from the whole batch's.
    import torch
    import yaml

    from distrain.config import from_dict
    from distrain.engine.build import build_model
    from distrain.models.ghost_bn import GhostBatchNorm2d

    run_cfg = from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    ghost, plain = build_model(run_cfg, 10), build_model(from_dict({**yaml.safe_load(
        (run / "config.yaml").read_text()), "model": {**run_cfg.model.__dict__, "norm": "batch", "ghost_batch_size": 0}}), 10)
    assert any(isinstance(m, GhostBatchNorm2d) for m in ghost.modules())
    weights = load_file(run / "model.safetensors")
    ghost.load_state_dict(weights)
    plain.load_state_dict(weights)
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ghost.eval()(x), plain.eval()(x), atol=1e-5)  # same running statistics at eval
    assert not torch.allclose(ghost.train()(x), plain.train()(x), atol=1e-4)
    # Repeated augmentation: repeats 2 on 2 ranks puts a sample's two copies on the two ranks,
    # differently augmented (different pixels).
    for at in draws[0]:
        assert draws[0][at]["keys"] == draws[1][at]["keys"]
        assert draws[0][at]["images_sum"] != draws[1][at]["images_sum"]
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
