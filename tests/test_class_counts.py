"""Class counts in the shard index, long-tailed training splits, and the plan's class imbalance row."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from distrain.cli import main
from distrain.data.index import INDEX_NAME
from distrain.data.shards import resolve_shards
from distrain.data.writer import long_tail_counts

TRAIN_PER_CLASS = 20
CLASSES = ["a", "b", "c", "d", "e"]


def tar_counts(directory: Path) -> list[list[int]]:
    """Per shard of the index, the samples of each label, read from the tars' ``.cls`` members."""
    doc = json.loads((directory / INDEX_NAME).read_text())
    counts = []
    for shard in doc["shards"]:
        with tarfile.open(directory / shard["name"]) as tar:
            labels = Counter(int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls"))
        counts.append([labels[i] for i in range(len(doc["classes"]))])
    return counts


def index_counts(directory: Path) -> tuple[list[list[int]], list[int]]:
    doc = json.loads((directory / INDEX_NAME).read_text())
    return [s["class_counts"] for s in doc["shards"]], doc["class_counts"]


def kept_keys(directory: Path) -> dict[int, set[str]]:
    """The keys of each label in a shard set."""
    by_label: dict[int, set[str]] = {}
    for tar_path in sorted(directory.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.name.endswith(".cls"):
                    by_label.setdefault(int(tar.extractfile(m).read()), set()).add(m.name[: -len(".cls")])
    return by_label


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """train/ with 20 JPEGs in each of 5 classes, test/ with 3."""
    root = tmp_path_factory.mktemp("tree")
    n = 0
    for split, count in (("train", TRAIN_PER_CLASS), ("test", 3)):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                n += 1
                buf = io.BytesIO()
                Image.new("RGB", (8, 8), (n % 256, n // 256, 9)).save(buf, format="JPEG")
                (root / split / cls / f"img{i:02d}.jpg").write_bytes(buf.getvalue())
    return root


def write(tree: Path, out: Path, *flags: str) -> Path:
    assert main(["data", "folder", str(tree), "--out", str(out), "--samples-per-shard", "7", *flags]) == 0
    return out


def test_digits_and_folder_index_counts_match_tars(digits, tree, tmp_path):
    out = write(tree, tmp_path / "out")
    for directory in (digits / "train", digits / "test", out / "train", out / "test"):
        per_shard, total = index_counts(directory)
        assert per_shard == tar_counts(directory)
        assert total == [sum(c) for c in zip(*per_shard)]
        assert resolve_shards(str(directory)).class_counts == tuple(total)
    assert index_counts(out / "train")[1] == [TRAIN_PER_CLASS] * 5
    assert sum(index_counts(digits / "train")[1]) == 1437


def test_data_index_counts_the_tars(digits, tree, tmp_path):
    out = write(tree, tmp_path / "out", "--imbalance-ratio", "4")
    for directory in (out / "train", digits / "test"):
        copy = shutil.copytree(directory, tmp_path / "copy" / directory.parent.name / directory.name)
        written = json.loads((copy / INDEX_NAME).read_text())
        # Re-indexing over an index (as for one written before class counts) keeps its class names.
        assert main(["data", "index", str(copy)]) == 0
        assert json.loads((copy / INDEX_NAME).read_text()) == written
        (copy / INDEX_NAME).unlink()
        assert main(["data", "index", str(copy)]) == 0
        rebuilt = json.loads((copy / INDEX_NAME).read_text())
        assert rebuilt["classes"] == [str(i) for i in range(len(written["classes"]))]
        assert rebuilt["shards"] == written["shards"] and rebuilt["class_counts"] == written["class_counts"]


def test_cifar10_lt_numbers():
    counts = long_tail_counts(5000, 10, 100)
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(counts) == 12406
    assert long_tail_counts(5000, 10, 1) == [5000] * 10
    assert long_tail_counts(500, 100, 100)[-1] == 5 and long_tail_counts(7, 1, 50) == [7]


def test_folder_long_tail_split(tree, tmp_path):
    out = write(tree, tmp_path / "lt", "--imbalance-ratio", "10")
    expected = long_tail_counts(TRAIN_PER_CLASS, 5, 10)
    assert expected == [20, 11, 6, 3, 2]
    assert index_counts(out / "train")[1] == [sum(c) for c in zip(*tar_counts(out / "train"))] == expected
    assert index_counts(out / "test")[1] == [3] * 5  # only training is long-tailed
    few = write(tree, tmp_path / "few", "--imbalance-ratio", "10", "--train-per-class", "10")
    assert index_counts(few / "train")[1] == long_tail_counts(10, 5, 10) == [10, 5, 3, 1, 1]


def test_long_tail_choice_follows_the_seed(tree, tmp_path):
    base = kept_keys(write(tree, tmp_path / "s0", "--imbalance-ratio", "10") / "train")
    assert kept_keys(write(tree, tmp_path / "again", "--imbalance-ratio", "10") / "train") == base
    # The choice does not depend on the shuffle, only on --seed.
    assert kept_keys(write(tree, tmp_path / "sorted", "--imbalance-ratio", "10", "--no-shuffle") / "train") == base
    other = kept_keys(write(tree, tmp_path / "s1", "--imbalance-ratio", "10", "--seed", "1") / "train")
    assert {label: len(k) for label, k in other.items()} == {label: len(k) for label, k in base.items()}
    assert other != base
    first = {f"train-b-img{i:02d}" for i in range(11)}
    assert base[1] != first and base[1] != {f"train-b-img{i:02d}" for i in range(9, 20)}  # a random subset
    # One permutation per class serves every ratio: a stronger tail keeps a subset.
    milder = kept_keys(write(tree, tmp_path / "r2", "--imbalance-ratio", "2") / "train")
    assert all(base[label] <= milder[label] for label in base)


@pytest.mark.parametrize("flags, needle", [
    (["--imbalance-ratio", "0.5"], "--imbalance-ratio: must be a number >= 1, got 0.5"),
    (["--imbalance-ratio", "nan"], "--imbalance-ratio: must be a number >= 1"),
    (["--imbalance-ratio", "100"], "--imbalance-ratio: 100 leaves class d no training image"),
])
def test_bad_imbalance_ratio_is_one_line(tree, tmp_path, capsys, flags, needle):
    rc = main(["data", "folder", str(tree), "--out", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "distrain:" in line]  # past the progress bars
    assert rc == 2 and len(errors) == 1 and needle in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_imbalance_needs_a_train_split(tree, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(tree / "test", src / "test")
    assert main(["data", "folder", str(src), "--out", str(tmp_path / "out"), "--imbalance-ratio", "2"]) == 2
    assert "no train split" in capsys.readouterr().err


def plan(tmp_path: Path, capsys, train: str, *extra: str) -> tuple[dict[str, str], dict]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data:\n  train: {train}\nbatch:\n  per_device: 8\n")
    capsys.readouterr()  # what earlier commands printed
    assert main(["plan", str(recipe), *extra]) == 0
    rows = dict(line.split("  ", 1) for line in capsys.readouterr().out.splitlines())
    assert main(["plan", str(recipe), *extra, "--json"]) == 0
    return {k.strip(): v.strip() for k, v in rows.items()}, json.loads(capsys.readouterr().out)


def test_plan_shows_class_imbalance(tree, tmp_path, capsys):
    from conftest import write_layout

    out = write(tree, tmp_path / "lt", "--imbalance-ratio", "10")
    rows, doc = plan(tmp_path, capsys, str(out / "train"))
    assert rows["class imbalance"] == "10.0 (20 / 2 samples per class)"
    assert doc["class_imbalance"] == {"ratio": 10.0, "largest": 20, "smallest": 2}
    # Absent data: the plan still works from data.train_samples, without the row.
    rows, doc = plan(tmp_path, capsys, str(tmp_path / "missing"), "data.train_samples=1000")
    assert "class imbalance" not in rows and doc["class_imbalance"] is None
    # An index written without class counts says how to add them.
    old = write_layout(tmp_path / "old", [30, 20])
    rows, doc = plan(tmp_path, capsys, str(old))
    assert rows["class imbalance"] == f"unknown: run `distrain data index {old}` to count classes"
    assert doc["class_imbalance"] is None
