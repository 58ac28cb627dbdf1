"""Tests for distrain.data.writer: real shard sets in tmp_path, read back as webdataset reads."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_iterator

from distrain.data.index import INDEX_NAME, read_index
from distrain.data.writer import index_shards, write_digits, write_folder, write_shard_set
from distrain.errors import DistrainError


def read_tar(path: Path) -> list[dict]:
    """The samples of one tar, grouped by key exactly as webdataset's readers group them."""
    with open(path, "rb") as f:
        files = [dict(f, __url__=str(path)) for f in tar_file_iterator(f)]
    return list(group_by_keys(iter(files)))


def read_set(directory: Path) -> tuple[dict, list[list[dict]]]:
    """The index and the samples of each listed shard."""
    doc = read_index(directory)
    return doc, [read_tar(directory / s["name"]) for s in doc["shards"]]


def fields(sample: dict) -> set[str]:
    return {k for k in sample if not k.startswith("__")}


def tar_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.tar"))}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    return write_digits(tmp_path_factory.mktemp("digits"), progress=False)


def test_digits_splits_and_index_match_tars(digits):
    keys = {}
    for split, expected_total in (("train", 1437), ("test", 360)):
        doc, shards = read_set(digits[split])
        assert doc["classes"] == [str(d) for d in range(10)]
        assert doc["total"] == expected_total
        names = [s["name"] for s in doc["shards"]]
        assert names == [f"{split}-{i:06d}.tar" for i in range(len(shards))]
        assert sorted(p.name for p in digits[split].iterdir()) == sorted([INDEX_NAME, *names])
        assert [s["samples"] for s in doc["shards"]] == [len(samples) for samples in shards]
        assert all(s["samples"] == 256 for s in doc["shards"][:-1])
        samples = [s for shard in shards for s in shard]
        assert all(fields(s) == {"png", "cls"} for s in samples)
        labels = Counter(int(s["cls"]) for s in samples)
        assert set(labels) == set(range(10))
        keys[split] = [s["__key__"] for s in samples]
        assert len(set(keys[split])) == expected_total
    assert not set(keys["train"]) & set(keys["test"])
    assert set(keys["train"]) | set(keys["test"]) == {f"digits-{i:06d}" for i in range(1797)}


def test_digits_png_is_32x32_rgb(digits):
    sample = read_tar(digits["test"] / "test-000000.tar")[0]
    image = Image.open(io.BytesIO(sample["png"]))
    assert image.format == "PNG"
    assert image.size == (32, 32)
    assert image.mode == "RGB"
    assert image.getextrema() != ((0, 0),) * 3


def test_digits_deterministic_per_seed(digits, tmp_path):
    again = write_digits(tmp_path / "again", progress=False)
    other = write_digits(tmp_path / "other", seed=1, progress=False)
    for split in ("train", "test"):
        assert tar_bytes(again[split]) == tar_bytes(digits[split])
        assert (again[split] / INDEX_NAME).read_text() == (digits[split] / INDEX_NAME).read_text()
    # The split is fixed; only the training order follows the seed.
    assert tar_bytes(other["test"]) == tar_bytes(digits["test"])
    order = [s["__key__"] for shard in read_set(digits["train"])[1] for s in shard]
    other_order = [s["__key__"] for shard in read_set(other["train"])[1] for s in shard]
    assert other_order != order
    assert sorted(other_order) == sorted(order)


def save_image(path: Path, color: int, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    # Distinct colour and size per file make every file's bytes unique.
    Image.new("RGB", (8 + color % 5, 8), (color, 255 - color, 7)).save(buf, format=fmt)
    path.write_bytes(buf.getvalue())


def make_tree(root: Path, layout: dict[str, int]) -> dict[Path, str]:
    """Create ``count`` JPEGs in each ``root/<rel dir>``; returns path -> class folder name."""
    made = {}
    color = 0
    for rel, count in layout.items():
        for i in range(count):
            color += 1
            path = root / rel / f"img{i:02d}.jpg"
            save_image(path, color)
            made[path] = path.parent.name
    return made


def check_against_files(directory: Path, files: dict[Path, str]) -> None:
    """Every file appears once, byte for byte, with its class; nothing else is there."""
    doc, shards = read_set(directory)
    by_bytes = {path.read_bytes(): cls for path, cls in files.items()}
    samples = [s for shard in shards for s in shard]
    assert len(samples) == len(files) == doc["total"]
    seen = []
    for s in samples:
        assert "." not in s["__key__"]
        (ext,) = fields(s) - {"cls"}
        assert ext in ("jpg", "png")
        assert doc["classes"][int(s["cls"])] == by_bytes[s[ext]]
        seen.append(s[ext])
    assert sorted(seen) == sorted(by_bytes)
    assert len({s["__key__"] for s in samples}) == len(samples)


def test_folder_with_splits_shards_and_keys(tmp_path):
    src = tmp_path / "src"
    files = make_tree(src, {"train/cat": 10, "train/dog": 6, "test/cat": 3, "test/dog": 2})
    # Names that would break webdataset's key grouping or collide once made safe.
    long_name = "x" * 150 + ".jpg"  # over USTAR's 100-byte member-name limit
    odd = (("a.b.jpg", "JPEG"), ("a_b.JPEG", "JPEG"), ("disguised.jpg", "PNG"), (long_name, "JPEG"))
    for name, fmt in odd:
        save_image(src / "train/dog" / name, 200 + len(files), fmt)
        files[src / "train/dog" / name] = "dog"
    (src / "train/dog/notes.txt").write_text("not an image")
    (src / "train/.cache").mkdir()

    out = write_folder(src, tmp_path / "out", samples_per_shard=7, progress=False)

    assert out == {"train": tmp_path / "out/train", "test": tmp_path / "out/test"}
    train = read_index(out["train"])
    assert train["classes"] == ["cat", "dog"]
    assert [s["samples"] for s in train["shards"]] == [7, 7, 6]
    assert [s["samples"] for s in read_index(out["test"])["shards"]] == [5]
    check_against_files(out["train"], {p: c for p, c in files.items() if "train" in p.parts})
    check_against_files(out["test"], {p: c for p, c in files.items() if "test" in p.parts})
    samples = {s["__key__"]: s for shard in read_set(out["train"])[1] for s in shard}
    assert {"train-dog-a_b", "train-dog-a_b_2"} <= set(samples)
    # Stored under the format found in the bytes, not the file name.
    assert fields(samples["train-dog-disguised"]) == {"png", "cls"}
    assert fields(samples["train-dog-" + "x" * 150]) == {"jpg", "cls"}


def test_folder_flat_tree_shuffle_and_sorted_order(tmp_path):
    src = tmp_path / "src"
    files = make_tree(src, {"b": 5, "a": 4, "c": 3})
    shuffled = write_folder(src, tmp_path / "shuffled", progress=False)
    ordered = write_folder(src, tmp_path / "ordered", shuffle_seed=None, progress=False)

    assert set(shuffled) == set(ordered) == {"train"}
    assert read_index(ordered["train"])["classes"] == ["a", "b", "c"]
    check_against_files(ordered["train"], files)
    check_against_files(shuffled["train"], files)
    sorted_keys = [s["__key__"] for s in read_tar(ordered["train"] / "train-000000.tar")]
    shuffled_keys = [s["__key__"] for s in read_tar(shuffled["train"] / "train-000000.tar")]
    assert sorted_keys == sorted(sorted_keys)
    assert shuffled_keys != sorted_keys and sorted(shuffled_keys) == sorted_keys


def test_folder_class_subset_and_few_labels_per_class(tmp_path):
    # Transfer experiments: disjoint class sets, and few labels per class in train (all of test).
    src = tmp_path / "src"
    files = make_tree(src, {"train/a": 6, "train/b": 5, "train/c": 4, "test/a": 2, "test/b": 2, "test/c": 2})
    out = write_folder(src, tmp_path / "out", classes=["c", "b"], train_per_class=3, progress=False)
    train, test = read_index(out["train"]), read_index(out["test"])
    assert train["classes"] == test["classes"] == ["b", "c"]  # labels follow the sorted subset
    check_against_files(out["test"], {p: c for p, c in files.items() if "test" in p.parts and c != "a"})
    doc, shards = read_set(out["train"])
    labels = [int(s["cls"]) for shard in shards for s in shard]
    assert doc["total"] == 6 and sorted(labels) == [0, 0, 0, 1, 1, 1]
    other = write_folder(src, tmp_path / "other", classes=["b", "c"], train_per_class=3, shuffle_seed=1, progress=False)
    keys = [{s["__key__"] for shard in read_set(d)[1] for s in shard} for d in (out["train"], other["train"])]
    assert keys[0] != keys[1]  # the seed chooses which images are kept
    with pytest.raises(DistrainError, match="--classes: zebra not among"):
        write_folder(src, tmp_path / "bad", classes=["a", "zebra"], progress=False)


def test_folder_unreadable_image_names_file(tmp_path):
    src = tmp_path / "src"
    make_tree(src, {"cat": 2, "dog": 2})
    bad = src / "dog" / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(DistrainError, match="unreadable image") as e:
        write_folder(src, tmp_path / "out", progress=False)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "layout, culprit, message",
    [
        ({}, "src", "no class folders"),
        ({"cat": 2, "dog": 0}, "src/dog", "no .jpg/.jpeg/.png/.webp images"),
        ({"train/cat": 2, "test/cat": 1, "test/bird": 1}, "src/test/bird", "not among the first"),
    ],
)
def test_folder_tree_errors(tmp_path, layout, culprit, message):
    src = tmp_path / "src"
    src.mkdir()
    (src / "readme.txt").write_text("files but no class folders")
    make_tree(src, {rel: n for rel, n in layout.items() if n})
    for rel in layout:
        (src / rel).mkdir(parents=True, exist_ok=True)
    with pytest.raises(DistrainError, match=message) as e:
        write_folder(src, tmp_path / "out", progress=False)
    assert str(e.value).startswith(str(tmp_path / culprit) + ":")


def test_folder_missing_src(tmp_path):
    with pytest.raises(DistrainError, match=f"{tmp_path / 'nope'}: no such directory"):
        write_folder(tmp_path / "nope", tmp_path / "out", progress=False)


def test_out_not_empty_and_overwrite(tmp_path):
    src = tmp_path / "src"
    files = make_tree(src, {"cat": 4, "dog": 4})
    out = tmp_path / "out"
    write_folder(src, out, samples_per_shard=2, progress=False)
    assert len(list((out / "train").glob("*.tar"))) == 4

    with pytest.raises(DistrainError, match="not empty") as e:
        write_folder(src, out, progress=False)
    assert str(e.value).startswith(f"{out}:")
    with pytest.raises(DistrainError, match="not empty"):
        write_digits(out, progress=False)

    (out / "train" / "keep.txt").write_text("not part of the shard set")
    write_folder(src, out, samples_per_shard=3, overwrite=True, progress=False)
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        INDEX_NAME, "keep.txt", "train-000000.tar", "train-000001.tar", "train-000002.tar"
    ]
    check_against_files(out / "train", files)


def test_write_shard_set_rejects_bad_samples(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (2, 2)).save(png, format="PNG")
    for bad in (
        [("a.b", png.getvalue(), "png", 0)],
        [("a", png.getvalue(), "png", 0), ("a", png.getvalue(), "png", 0)],
        [("a", png.getvalue(), "gif", 0)],
        [("a", png.getvalue(), "png", 2)],
    ):
        with pytest.raises(ValueError):
            write_shard_set(
                bad, tmp_path / "s", classes=["x", "y"], prefix="p", samples_per_shard=1,
                overwrite=True, progress=False,
            )
        # A failed write leaves no half-written tar and no index, so it cannot pass as complete.
        assert not list((tmp_path / "s").glob("*.tmp"))
        assert not (tmp_path / "s" / INDEX_NAME).exists()
    with pytest.raises(DistrainError, match="no samples"):
        write_shard_set(
            [], tmp_path / "empty", classes=["x"], prefix="p", samples_per_shard=1, progress=False
        )


def test_index_shards_reproduces_writer_counts(tmp_path, digits):
    src = tmp_path / "src"
    make_tree(src, {"train/cat": 5, "train/dog": 4, "val/cat": 2, "val/dog": 1})
    out = write_folder(src, tmp_path / "out", samples_per_shard=4, progress=False)
    for directory in (*out.values(), digits["test"]):
        written = json.loads((directory / INDEX_NAME).read_text())
        (directory / INDEX_NAME).unlink()
        try:
            index_shards(directory, classes=written["classes"])
            assert json.loads((directory / INDEX_NAME).read_text()) == written
            (directory / INDEX_NAME).unlink()
            index_shards(directory)
            rebuilt = json.loads((directory / INDEX_NAME).read_text())
            assert rebuilt["shards"] == written["shards"]
            assert rebuilt["classes"] == [str(i) for i in range(len(written["classes"]))]
        finally:
            (directory / INDEX_NAME).write_text(json.dumps(written, indent=1) + "\n")
    with pytest.raises(DistrainError, match="only 1 classes"):
        index_shards(out["train"], classes=["cat"])
    with pytest.raises(DistrainError, match="no .tar shards"):
        index_shards(src)
