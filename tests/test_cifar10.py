"""Real CIFAR-10 (../shared/data/cifar10-jpeg.tar.gz): folder -> shards conversion and a short run."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import REPO, checked, distrain

from distrain.data.index import read_index

ARCHIVE = Path(os.environ.get("DISTRAIN_CIFAR10", REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.cifar10,
    pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"CIFAR-10 archive not found at {ARCHIVE} (set DISTRAIN_CIFAR10)"),
]


def test_cifar10_convert_and_train(tmp_path):
    with tarfile.open(ARCHIVE) as tf:
        tf.extractall(tmp_path, filter="data")
    checked(distrain(["data", "folder", str(tmp_path / "cifar10-jpeg"), "--out", "shards",
                      "--samples-per-shard", "5000"], cwd=tmp_path))
    train, test = read_index(tmp_path / "shards" / "train"), read_index(tmp_path / "shards" / "test")
    assert train["total"] == 50000 and test["total"] == 10000 and len(train["shards"]) == 10
    assert train["classes"] == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    proc = checked(distrain(["train", "configs/cifar10/resnet20.yaml", "data.train=shards/train",
                             "data.eval=shards/test", "train.max_updates=60", "train.log_every=20"], cwd=tmp_path))
    summary = json.loads((tmp_path / "runs" / "cifar10-resnet20" / "summary.json").read_text())
    assert summary["updates"] == 60 and summary["eval/samples"] == 10000
    assert summary["eval/top1"] > 15.0, proc.stdout[-2000:]  # chance is 10%; ~22% after 60 updates
