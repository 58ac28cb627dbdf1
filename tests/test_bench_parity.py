"""`distrain bench parity`: the same recipe through `distrain train` and a plain PyTorch loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from distrain.cli import main


@pytest.fixture(scope="module")
def digit_tree(tmp_path_factory):
    """scikit-learn's digits as a class-per-folder tree of 32 x 32 RGB PNGs: 400 train/, 100 test/."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = tmp_path_factory.mktemp("tree")
    for i, (image, label) in enumerate(zip(digits.images[:500], digits.target[:500])):
        folder = out / ("train" if i < 400 else "test") / f"d{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels).resize((32, 32), Image.NEAREST).convert("RGB").save(folder / f"{i:04d}.png")
    return out


@pytest.mark.slow
def test_bench_parity_reports_both_sides(digit_tree, tmp_path, capsys):
    out = tmp_path / "parity.json"
    rc = main(["bench", "parity", "--data", str(digit_tree), "--train-samples", "128", "--test-samples", "100",
               "--epochs", "1", "--seeds", "0", "--batch", "32", "--workers", "0", "--work-dir", str(tmp_path / "w"),
               "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["complete"] and r["train_samples"] == 128 and r["test_samples"] == 100 and r["crop"] == "pad"
    for side in ("distrain", "plain"):
        (run,) = r["runs"][side]
        assert run["seed"] == 0 and run["eval_samples"] == 100
        assert 0.0 <= run["top1"] <= 100.0 and run["seconds"] > 0, r
        s = r["summary"][side]
        assert s["n"] == 1 and s["mean"] == s["min"] == s["max"] == run["top1"] and s["std"] == 0.0
    assert r["difference"] == pytest.approx(r["summary"]["distrain"]["mean"] - r["summary"]["plain"]["mean"])
    assert r["verdict"].startswith("one seed")
    table = capsys.readouterr().out
    assert "distrain" in table and "plain" in table and "distrain - plain" in table and f"json: {out}" in table


def test_bench_parity_refuses_missing_data(tmp_path, capsys):
    rc = main(["bench", "parity", "--data", str(tmp_path / "nope.tar.gz"), "--work-dir", str(tmp_path)])
    assert rc != 0 and "--data" in capsys.readouterr().err
