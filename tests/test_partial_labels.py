"""Partially labeled shard sets (semi-supervised training): `distrain data folder --labeled-per-class`
and `--labeled-fraction`, their index, and `distrain data index` over them."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from distrain.cli import main
from distrain.data.index import INDEX_NAME, Shard, ShardSet, read_index, write_index
from distrain.data.shards import Read
from distrain.data.stream import UNLABELED, read_samples
from distrain.data.writer import index_shards, write_folder, write_shard_set
from distrain.errors import DistrainError

CLASSES = ["a", "b", "c"]
TRAIN = {"a": 10, "b": 8, "c": 6}
FULL_INDEX_KEYS = {"format", "classes", "total", "shards", "class_counts"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """train/ with TRAIN's JPEGs per class, test/ with 2 per class, every file's bytes distinct."""
    root = tmp_path_factory.mktemp("tree")
    n = 0
    for split, counts in (("train", TRAIN), ("test", dict.fromkeys(CLASSES, 2))):
        for cls, count in counts.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                n += 1
                buf = io.BytesIO()
                Image.new("RGB", (8, 8), (n, 255 - n, 9)).save(buf, format="JPEG")
                (root / split / cls / f"img{i:02d}.jpg").write_bytes(buf.getvalue())
    return root


def write(tree: Path, out: Path, *flags: str) -> Path:
    assert main(["data", "folder", str(tree), "--out", str(out), "--samples-per-shard", "5", *flags]) == 0
    return out


def members(directory: Path) -> dict[str, dict[str, bytes]]:
    """Per key, its members (extension -> bytes), over the tars in name order, read with tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(directory.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def labeled_by_class(directory: Path) -> dict[str, set[str]]:
    """The keys with a .cls member, per class name."""
    by_class: dict[str, set[str]] = {}
    for key, files in members(directory).items():
        if "cls" in files:
            by_class.setdefault(CLASSES[int(files["cls"])], set()).add(key)
    return by_class


def true_class(key: str) -> int:
    """A key is train-<class>-<stem>."""
    return CLASSES.index(key.split("-")[1])


@pytest.mark.parametrize("flags, expected", [
    (["--labeled-per-class", "3"], [3, 3, 3]),
    (["--labeled-fraction", "0.3"], [3, 2, 2]),  # round(3.0), round(2.4), round(1.8)
    (["--labeled-fraction", "0.05"], [1, 1, 1]),  # at least one per class
])
def test_labeled_counts_per_class_and_index(tree, tmp_path, flags, expected):
    out = write(tree, tmp_path / "out", *flags)
    train = out / "train"
    by_class = labeled_by_class(train)
    assert [len(by_class[c]) for c in CLASSES] == expected
    doc = read_index(train)
    assert doc["total"] == sum(TRAIN.values()) and doc["labeled"] == sum(expected)
    assert doc["class_counts"] == expected
    for entry in doc["shards"]:
        with tarfile.open(train / entry["name"]) as tar:
            names = tar.getnames()
        keys = {n.split(".", 1)[0] for n in names}
        labeled = sorted(n[: -len(".cls")] for n in names if n.endswith(".cls") and not n.endswith(".withheld.cls"))
        assert entry["samples"] == len(keys) and entry["labeled"] == len(labeled) == sum(entry["class_counts"])
        assert entry["labeled_keys"] == labeled
    shard_set = ShardSet(tuple(Shard.from_entry(str(train / e["name"]), e) for e in doc["shards"]), tuple(CLASSES))
    assert (shard_set.total, shard_set.labeled, shard_set.class_counts) == (doc["total"], doc["labeled"],
                                                                          tuple(expected))
    # Only the training split is partially labeled.
    assert set(read_index(out / "test")) == FULL_INDEX_KEYS
    assert sorted(p.name for p in out.iterdir()) == ["labeled", "test", "train"]


def test_unlabeled_samples_withhold_their_label(tree, tmp_path):
    train = write(tree, tmp_path / "out", "--labeled-per-class", "2") / "train"
    samples = members(train)
    assert len(samples) == sum(TRAIN.values())
    unlabeled = {key for key, files in samples.items() if "cls" not in files}
    assert len(unlabeled) == sum(TRAIN.values()) - 2 * len(CLASSES)
    for key, files in samples.items():
        # The withheld label is encoded as .cls is, and holds the sample's true class.
        assert set(files) == ({"jpg", "withheld.cls"} if key in unlabeled else {"jpg", "cls"})
        assert int(files.get("cls", files.get("withheld.cls"))) == true_class(key)
    # The stream takes no label from .withheld.cls: the sample reads as unlabeled.
    doc = read_index(train)
    reads = [Read(str(train / e["name"]), 0, e["samples"]) for e in doc["shards"]]
    read = list(read_samples(reads, len(CLASSES), require_labels=False))
    assert not any(s.bad for s in read)
    assert {s.key: s.label for s in read} == {k: UNLABELED if k in unlabeled else true_class(k) for k in samples}


def test_labeled_split_holds_the_labeled_samples(tree, tmp_path):
    out = write(tree, tmp_path / "out", "--labeled-per-class", "4")
    train, labeled = members(out / "train"), members(out / "labeled")
    assert labeled == {key: files for key, files in train.items() if "cls" in files}
    assert list(labeled) == [key for key, files in train.items() if "cls" in files]  # the training order
    doc = read_index(out / "labeled")
    assert set(doc) == FULL_INDEX_KEYS and all("labeled" not in s for s in doc["shards"])
    assert doc["total"] == 12 and doc["class_counts"] == [4, 4, 4]
    assert [s["name"] for s in doc["shards"]] == ["labeled-000000.tar", "labeled-000001.tar", "labeled-000002.tar"]


def test_choice_follows_the_seed_and_fewer_labels_keep_a_subset(tree, tmp_path):
    base = write(tree, tmp_path / "s0", "--labeled-per-class", "3")
    again = write(tree, tmp_path / "again", "--labeled-per-class", "3")
    for split in ("train", "labeled"):
        assert all((base / split / p.name).read_bytes() == p.read_bytes() for p in (again / split).iterdir())
    chosen = labeled_by_class(base / "train")
    # Not the shuffle's doing: the sorted order labels the same images.
    assert labeled_by_class(write(tree, tmp_path / "sorted", "--labeled-per-class", "3", "--no-shuffle") / "train") \
        == chosen
    other = labeled_by_class(write(tree, tmp_path / "s1", "--labeled-per-class", "3", "--seed", "1") / "train")
    assert other != chosen and {c: len(k) for c, k in other.items()} == {c: len(k) for c, k in chosen.items()}
    assert chosen["a"] != {f"train-a-img{i:02d}" for i in range(3)}  # a random choice, not the first files
    fewer = labeled_by_class(write(tree, tmp_path / "n1", "--labeled-per-class", "1") / "train")
    more = labeled_by_class(write(tree, tmp_path / "f", "--labeled-fraction", "0.7") / "train")
    assert all(fewer[c] <= chosen[c] <= more[c] for c in CLASSES)


def test_selections_apply_before_labeling(tree, tmp_path):
    out = write(tree, tmp_path / "out", "--train-per-class", "5", "--imbalance-ratio", "2", "--labeled-per-class", "2")
    doc = read_index(out / "train")
    assert doc["total"] == 5 + 3 + 2 and doc["labeled"] == 6 and doc["class_counts"] == [2, 2, 2]


def test_data_index_reproduces_the_writer(tree, tmp_path):
    train = write(tree, tmp_path / "out", "--labeled-fraction", "0.5") / "train"
    copy = shutil.copytree(train, tmp_path / "copy" / "train")
    written = json.loads((copy / INDEX_NAME).read_text())
    assert main(["data", "index", str(copy)]) == 0
    assert json.loads((copy / INDEX_NAME).read_text()) == written
    (copy / INDEX_NAME).unlink()
    index_shards(copy)
    rebuilt = json.loads((copy / INDEX_NAME).read_text())
    assert rebuilt == {**written, "classes": ["0", "1", "2"]}


def test_a_fully_labeled_set_keeps_its_index_format(tree, tmp_path):
    plain = write(tree, tmp_path / "plain")
    doc = read_index(plain / "train")
    assert set(doc) == FULL_INDEX_KEYS and all(set(s) == {"name", "samples", "class_counts"} for s in doc["shards"])
    shard = Shard.from_entry("x.tar", doc["shards"][0])
    assert shard.labeled == shard.samples and Shard("y.tar", 7).labeled == 7
    # Labeling every image is no partial labeling: the same tars and index as without the flag.
    everything = write(tree, tmp_path / "all", "--labeled-fraction", "1")
    assert all((plain / "train" / p.name).read_bytes() == p.read_bytes() for p in (everything / "train").iterdir())
    index_shards(plain / "train")
    assert read_index(plain / "train") == doc


@pytest.mark.parametrize("flags, needle", [
    (["--labeled-per-class", "0"], "--labeled-per-class: must be at least 1, got 0"),
    (["--labeled-per-class", "7"], "--labeled-per-class: 7 exceeds the 6 training images of class c"),
    (["--labeled-fraction", "0"], "--labeled-fraction: must be in (0, 1], got 0"),
    (["--labeled-fraction", "1.5"], "--labeled-fraction: must be in (0, 1], got 1.5"),
    (["--labeled-fraction", "nan"], "--labeled-fraction: must be in (0, 1], got nan"),
    (["--labeled-per-class", "2", "--labeled-fraction", "0.5"], "--labeled-per-class, --labeled-fraction: give one"),
])
def test_bad_labeling_is_one_line_naming_the_flag(tree, tmp_path, capsys, flags, needle):
    rc = main(["data", "folder", str(tree), "--out", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "distrain:" in line]  # past the progress bars
    assert rc == 2 and len(errors) == 1 and needle in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_labeling_needs_a_train_split(tree, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(tree / "test", src / "test")
    assert main(["data", "folder", str(src), "--out", str(tmp_path / "out"), "--labeled-fraction", "0.5"]) == 2
    assert f"--labeled-fraction: {src} has no train split" in capsys.readouterr().err
    with pytest.raises(DistrainError, match="--labeled-per-class: .* has no train split"):
        write_folder(src, tmp_path / "out", labeled_per_class=1, progress=False)


def test_write_shard_set_withheld_keys_and_index_checks(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (2, 2)).save(png, format="PNG")
    samples = [(f"k{i}", png.getvalue(), "png", i % 2) for i in range(4)]
    out = write_shard_set(samples, tmp_path / "s", classes=["x", "y"], prefix="p", samples_per_shard=3,
                          progress=False, withheld={"k1", "k2"})
    doc = read_index(out)
    assert doc["labeled"] == 2 and [s["labeled_keys"] for s in doc["shards"]] == [["k0"], ["k3"]]
    assert [s["class_counts"] for s in doc["shards"]] == [[1, 0], [0, 1]]
    with pytest.raises(ValueError, match="withheld key 'k9'"):
        write_shard_set(samples, tmp_path / "t", classes=["x", "y"], prefix="p", samples_per_shard=3,
                        progress=False, withheld={"k9"})
    assert not (tmp_path / "t" / INDEX_NAME).exists()
    with pytest.raises(ValueError, match="summing to its labeled samples"):
        write_index(tmp_path, [("a.tar", 3)], ["x", "y"], [[2, 1]], [["k0", "k1"]])
    with pytest.raises(ValueError, match="labeled_keys"):
        write_index(tmp_path, [("a.tar", 1)], ["x"], None, [["k0", "k1"]])
