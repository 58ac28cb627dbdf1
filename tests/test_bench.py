"""`distrain bench loader`: the generated photo set and the side-by-side measurement."""

from __future__ import annotations

import json

import pytest
from conftest import checked, distrain
from PIL import Image

from distrain.bench import is_shard_spec, make_photo_set, sample_shards


def test_photo_set_is_imagenet_like(tmp_path):
    out = make_photo_set(tmp_path / "photos", count=60, classes=6)
    files = sorted((out / "train").glob("*/*.jpg"))
    assert len(files) == 60 and len({f.parent.name for f in files}) == 6
    for f in files:
        with Image.open(f) as im:
            w, h = im.size
            assert im.format == "JPEG" and 300 <= min(w, h) <= 500
            assert 3 / 4 - 0.02 <= max(w, h) / min(w, h) <= 4 / 3 + 0.02
    assert make_photo_set(tmp_path / "photos", count=60, classes=6) == out  # reused, not rewritten


@pytest.mark.slow
def test_bench_loader_command(tmp_path):
    result_path = tmp_path / "bench.json"
    out = checked(distrain(["bench", "loader", "--images", "160", "--res", "64,96", "--batch", "16", "--workers", "1",
                            "--rounds", "1", "--batches", "4", "--json", str(result_path)], cwd=tmp_path))
    result = json.loads(result_path.read_text())
    assert set(result["images_per_s"]) == {"distrain", "torchvision", "decode"}
    for pipeline, by_res in result["images_per_s"].items():
        assert set(by_res) == {"64", "96"} and all(v > 0 for v in by_res.values()), pipeline
    for name in ("vs_torchvision", "vs_decode"):
        for res, ratio in result["ratios"][name].items():
            base = "torchvision" if name == "vs_torchvision" else "decode"
            assert ratio == pytest.approx(result["images_per_s"]["distrain"][res] / result["images_per_s"][base][res])
    assert "vs torchvision" in out.stdout
    shards, = (tmp_path / "runs" / "bench").glob("shards-*-160")

    # The user's own shards: a sample of them is what all three pipelines read.
    checked(distrain(["bench", "loader", "--data", str(shards / "train"), "--images", "96", "--res", "64",
                      "--batch", "16", "--workers", "1", "--rounds", "1", "--batches", "4", "--json",
                      str(result_path)], cwd=tmp_path))
    result = json.loads(result_path.read_text())
    assert result["images"] == 96 and "sample-96-" in result["data"]
    assert all(result["images_per_s"][p]["64"] > 0 for p in ("distrain", "torchvision", "decode"))
    for args, message in ((["--res", "x"], "--res: expected comma-separated integers"),
                          (["--data", "nowhere/train-*.tar"], "'nowhere/train-*.tar' matches no files")):
        bad = distrain(["bench", "loader", *args], cwd=tmp_path)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


@pytest.mark.slow
def test_bench_step_command(tmp_path):
    path = tmp_path / "step.json"
    out = checked(distrain(["bench", "step", "--model", "cifar_resnet20", "--res", "16", "--batch", "8",
                            "--updates", "2", "--teacher", "cifar_resnet32", "--json", str(path)], cwd=tmp_path))
    r = json.loads(path.read_text())
    s = r["seconds_per_update"]
    assert set(s) == {"plain", "distrain", "distrain_ema", "distrain_teacher"} and all(v > 0 for v in s.values())
    assert "+ teacher cifar_resnet32" in out.stdout
    assert r["overhead"]["distrain"] == pytest.approx(s["distrain"] / s["plain"] - 1)
    assert r["ema"]["vs_floor"] == pytest.approx(r["ema"]["update_s"] / r["ema"]["floor_s"])
    assert r["ema"]["amortized"]["every_32"] == pytest.approx(r["ema"]["amortized"]["every_1"] / 32)
    assert "vs plain" in out.stdout and "foreach copy" in out.stdout
    bad = distrain(["bench", "step", "--model", "resnet9000"], cwd=tmp_path)
    assert bad.returncode == 2 and "resnet9000" in bad.stderr


def test_shards_are_sampled_into_a_folder_tree(tmp_path):
    from conftest import image_bytes, write_layout

    shards = write_layout(tmp_path / "shards", [5, 5, 5], num_classes=3, corrupt=frozenset({3}))
    assert is_shard_spec(shards) and is_shard_spec(str(shards / "shard-*.tar")) and not is_shard_spec(tmp_path)
    out = sample_shards(str(shards), tmp_path / "sample", count=10)
    files = sorted((out / "train").glob("*/*"))
    assert len(files) == 10 and "s00003" not in " ".join(f.name for f in files)  # the corrupt one is passed over
    for f in files:
        n = int(f.stem.split("-s")[1])
        assert f.parent.name == str(n % 3) and f.suffix == ".png" and f.read_bytes() == image_bytes(n)
    assert sample_shards(str(shards / "shard-0[12].tar"), tmp_path / "sample2", count=100) and \
        len(list((tmp_path / "sample2" / "train").glob("*/*"))) == 10  # fewer samples than asked: all of them
