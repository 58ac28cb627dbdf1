"""Inference-resize tuning: split, pick on half A, report on half B; `distrain eval --resize-sweep`."""

from __future__ import annotations

import json

import pytest
from conftest import checked, distrain
from test_train import recipe

from distrain.tricks.resize_sweep import default_resizes, half_of, pick_resize


def test_halves_are_stable_and_balanced():
    keys = [f"sample-{i:05d}" for i in range(4000)]
    halves = [half_of(k) for k in keys]
    assert halves == [half_of(k) for k in keys]  # a function of the key alone
    assert 1900 < sum(halves) < 2100


def test_pick_on_a_report_on_b():
    keys = [f"k{i}" for i in range(200)]
    a = [k for k in keys if half_of(k) == 0]
    b = [k for k in keys if half_of(k) == 1]
    # 240 wins on half A; 256 would win on half B, but B must not influence the pick.
    hits = {
        224: {**{k: i % 2 == 0 for i, k in enumerate(a)}, **{k: False for k in b}},
        240: {**{k: True for k in a}, **{k: i % 4 == 0 for i, k in enumerate(b)}},
        256: {**{k: i % 3 == 0 for i, k in enumerate(a)}, **{k: True for k in b}},
    }
    result = pick_resize(hits)
    assert result.picked == 240
    assert result.top1_a[240] == 100.0 and result.top1_b[256] == 100.0
    assert result.top1_b[240] == pytest.approx(100 * len(b[::4]) / len(b))
    assert result.samples == (len(a), len(b))


def test_ties_pick_the_smaller_resize():
    hits = {r: {f"k{i}": True for i in range(10)} for r in (256, 232, 240)}
    assert pick_resize(hits).picked == 232


def test_one_sided_set_is_refused():
    keys = [k for k in (f"k{i}" for i in range(50)) if half_of(k) == 0]
    with pytest.raises(ValueError, match="too small"):
        pick_resize({224: {k: True for k in keys}})


def test_default_candidates():
    assert default_resizes(224, 256) == [224, 233, 242, 255, 256, 269, 287]
    assert default_resizes(32, 32) == [32, 33, 35, 36, 38, 41]


@pytest.mark.slow
def test_eval_resize_sweep_command(tmp_path, digits):
    cfg = recipe(tmp_path, digits, schedule={"epochs": 1}, data={"eval_resize": 16})
    checked(distrain(["train", cfg], cwd=tmp_path))
    resizes = [16, 18, 20]
    out = checked(distrain(["eval", "run", "--resizes", ",".join(map(str, resizes)), "--json"], cwd=tmp_path))
    sweep = json.loads(out.stdout.strip().splitlines()[-1])["sweep"]
    n_a, n_b = sweep["samples"]
    assert n_a + n_b == 360
    for r in resizes:
        # Both halves together give the plain eval of the whole set at that resize.
        full = json.loads(checked(distrain(["eval", "run", f"data.eval_resize={r}", "--json"], cwd=tmp_path)).stdout)
        both = (sweep["top1_a"][str(r)] * n_a + sweep["top1_b"][str(r)] * n_b) / 360
        assert both == pytest.approx(full["eval/top1"], abs=1e-6)
    best_a = max(resizes, key=lambda r: (sweep["top1_a"][str(r)], -r))
    assert sweep["picked"] == best_a
    two = checked(distrain(["eval", "run", "--resizes", "16,18,20", "--json"], cwd=tmp_path, nproc=2))
    assert json.loads(two.stdout.strip().splitlines()[-1])["sweep"] == sweep  # the same on 2 ranks
    text = checked(distrain(["eval", "run", "--resize-sweep"], cwd=tmp_path)).stdout
    assert "picked eval resize" in text and "on half B" in text and "<- picked" in text
    bad = distrain(["eval", "run", "--resizes", "8,16"], cwd=tmp_path)
    assert bad.returncode == 2 and "smaller than data.eval_crop 16" in bad.stderr
