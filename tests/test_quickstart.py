"""The README's main job: the quickstart recipe reaches >= 97% top-1 on the held-out digits."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import REPO, checked, distrain

pytestmark = pytest.mark.slow


def test_quickstart_reaches_97_percent(tmp_path):
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    # As a user runs it: shards are written on first use (data.prepare: digits).
    proc = checked(distrain(["train", "configs/quickstart.yaml"], cwd=tmp_path))
    assert (tmp_path / "data" / "digits" / "train" / "index.json").is_file()
    summary = json.loads((tmp_path / "runs" / "quickstart" / "summary.json").read_text())
    assert summary["eval/samples"] == 360 and summary["epoch"] == 15
    assert summary["eval/top1"] >= 97.0, proc.stdout[-2000:]
    assert proc.stdout.strip().splitlines()[-1].endswith("run dir runs/quickstart")
