"""Class-imbalance handling inside `distrain train` on 2 real gloo ranks: resampled epochs sized by
the plan, every loss term on at once (class weights deferred, focal, logit adjustment, MixUp)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import checked, distrain, read_jsonl
from test_train import recipe

from distrain.data.resample import Resampling
from distrain.data.shards import resolve_shards

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def test_two_ranks_train_on_a_resampled_epoch_with_every_loss_term(tmp_path, digits):
    cfg = recipe(tmp_path, digits, schedule={"epochs": 1},
                 data={"resample": "repeat_factor", "repeat_threshold": 0.2},
                 loss={"class_weights": "effective_number", "beta": 0.99, "reweight_epoch": 0.5, "focal_gamma": 1.0,
                       "logit_adjust_tau": 1.0},
                 mix={"mixup_alpha": 0.2}, train={"log_every": 5}, distributed={"timeout_s": 120})
    checked(distrain(["train", cfg], cwd=tmp_path, nproc=2))
    expanded = Resampling.by_class(resolve_shards(str(digits / "train")), "repeat_factor", 0.2, 0).total
    assert expanded > 1437  # repeat factors at t = 0.2 with 10 classes of ~10%: every class repeated
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # 2 ranks x 16 x accumulation 2 = 64 per update, over the resampled epoch
    assert summary["updates"] == expanded // 64
    a, b = summary["replica_fingerprints"]
    assert a == b
    losses = [r["train/loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    assert summary["eval/top1"] > 30  # it learns despite every term at once
