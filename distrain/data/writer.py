"""Writing shard sets: webdataset tars plus ``index.json`` (see :mod:`distrain.data.index`).

Sources are scikit-learn's bundled digits (a real data set that needs no download), a
class-per-folder image tree, or existing tars that only lack an index.

Sample keys must never contain a dot: webdataset splits a member name into key and extension at
the *first* dot of its base name, so ``a.b.png`` would be read as key ``a`` with field ``b.png``.
Members of one sample must also be adjacent in the tar, because readers group consecutive members
by key; :class:`webdataset.TarWriter` writes a sample's members together.

A partially labeled training set (``write_folder``'s ``labeled_per_class`` or ``labeled_fraction``)
writes its unlabeled samples without ``.cls``. Their true label goes to ``<key>.withheld.cls``
instead, only so that the accuracy of pseudo-labels can be measured: training must never read it
as a label (the stream takes ``cls`` alone as the label, and webdataset names this field
``withheld.cls``).
"""

from __future__ import annotations

import io
import math
import os
import random
import re
import sys
import tarfile
from collections import Counter
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext

from distrain.data.decode import IMAGE_EXTS
from distrain.data.index import INDEX_NAME, read_index, write_index
from distrain.errors import DistrainError

_FOLDER_SUFFIXES = {"." + ext for ext in IMAGE_EXTS}
# Files are stored under the format PIL finds in their bytes, not their name: a PNG saved as
# ``x.jpg`` (ImageNet has some) would otherwise reach a JPEG-only decoder. MPO is how PIL reports
# multi-picture JPEGs from cameras.
_PIL_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
_SPLITS = ("train", "val", "test")
_UNSAFE_KEY_CHARS = re.compile(r"[^\w-]")
_TMP_SUFFIX = ".tmp"
# A fixed member mtime makes the same samples give byte-identical tars.
_MTIME = 0


def write_shard_set(
    samples: Iterable[tuple[str, bytes, str, int]],
    out_dir: str | Path,
    *,
    classes: list[str],
    prefix: str,
    samples_per_shard: int,
    overwrite: bool = False,
    progress: bool = True,
    total: int | None = None,
    withheld: AbstractSet[str] = frozenset(),
) -> Path:
    """Write samples as webdataset tars ``<prefix>-000000.tar``, ... plus their index.

    Each sample becomes the members ``<key>.<ext>`` (the image bytes exactly as given) and
    ``<key>.cls`` (the label in ASCII decimal). The index records each shard's samples per label.
    Each tar is written under a temporary name and renamed once complete, and the index is written
    last, so an interrupted run never leaves a shard set that looks complete.

    A sample whose key is in ``withheld`` is unlabeled: it gets ``<key>.withheld.cls`` instead of
    ``<key>.cls``, the label kept only to measure pseudo-label accuracy, never to train on. The
    index then records the labeled keys and counts only labeled samples per label (see
    :mod:`distrain.data.index`).

    Args:
        samples: ``(key, image_bytes, ext, label)`` tuples in the order to store them. Keys must
            be unique and contain no ``.`` or ``/``; ``ext`` is ``"jpg"`` or ``"png"``; ``label``
            indexes ``classes``.
        out_dir: The shard-set directory; created if missing.
        classes: Class names; the label of ``classes[i]`` is ``i``.
        prefix: File name prefix of the tars.
        samples_per_shard: Samples per tar (the last one may hold fewer).
        overwrite: Replace the tars and index already in ``out_dir`` instead of refusing.
        progress: Show a progress bar on stderr.
        total: The number of samples, for the progress bar only.
        withheld: Keys of the samples to write unlabeled.

    Returns:
        ``out_dir``.

    Raises:
        DistrainError: ``out_dir`` is not an empty directory (and ``overwrite`` is off),
            ``samples_per_shard`` is below 1, or there are no samples.
        ValueError: A malformed sample (bad key, duplicate key, extension or label), or a
            ``withheld`` key that no sample has.
    """
    out_dir = Path(out_dir)
    if samples_per_shard < 1:
        raise DistrainError(f"samples per shard must be at least 1, got {samples_per_shard}")
    _prepare_out_dir(out_dir, overwrite)

    shards: list[tuple[str, int]] = []
    class_counts: list[list[int]] = []
    labeled_keys: list[list[str]] = []
    seen: set[str] = set()
    writer: _ShardFile | None = None
    bar = _bar(total=total, desc=f"writing {prefix}", progress=progress)
    try:
        for key, data, ext, label in samples:
            _check_sample(key, ext, label, len(classes), seen)
            if writer is None:
                writer = _ShardFile(out_dir / f"{prefix}-{len(shards):06d}.tar")
                class_counts.append([0] * len(classes))
                labeled_keys.append([])
            cls = str(label).encode("ascii")
            if key in withheld:
                writer.write({"__key__": key, ext: data, "withheld.cls": cls})
            else:
                writer.write({"__key__": key, ext: data, "cls": cls})
                class_counts[-1][label] += 1
                labeled_keys[-1].append(key)
            bar.update()
            if writer.count == samples_per_shard:
                shards.append(writer.finish())
                writer = None
        if writer is not None:
            shards.append(writer.finish())
            writer = None
    finally:
        bar.close()
        if writer is not None:
            writer.abandon()
    if not shards:
        raise DistrainError(f"{out_dir}: no samples to write")
    unknown = set(withheld) - seen
    if unknown:
        raise ValueError(f"withheld key {min(unknown)!r} is no sample's key")
    write_index(out_dir, shards, classes, class_counts, labeled_keys)
    return out_dir


class _ShardFile:
    """One tar being written under a temporary name."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(path.name + _TMP_SUFFIX)
        self.file = open(self.tmp, "wb")
        # PAX because USTAR, TarWriter's documented default, caps member names at 100 bytes, which
        # keys built from long file names exceed. webdataset 1.0.2 drops the argument and gets
        # tarfile's default, PAX, anyway; naming it keeps PAX should webdataset start honouring it.
        self.tar = wds.TarWriter(self.file, encoder=False, mtime=_MTIME, format="PAX_FORMAT")
        self.count = 0

    def write(self, sample: dict) -> None:
        self.tar.write(sample)
        self.count += 1

    def finish(self) -> tuple[str, int]:
        """Close the tar and give it its final name; returns (name, sample count)."""
        self.tar.close()
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path.name, self.count

    def abandon(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _check_sample(key: str, ext: str, label: int, num_classes: int, seen: set[str]) -> None:
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
    if key in seen:
        raise ValueError(f"duplicate sample key {key!r}")
    seen.add(key)
    if ext not in IMAGE_EXTS:
        raise ValueError(f"sample {key!r}: image extension must be in {IMAGE_EXTS}, got {ext!r}")
    if not 0 <= label < num_classes:
        raise ValueError(f"sample {key!r}: label {label} outside 0..{num_classes - 1}")


def _refuse_non_empty(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DistrainError(f"{out}: output path exists and is not a directory")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise DistrainError(f"{out}: output directory is not empty (choose another, or overwrite)")


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    _refuse_non_empty(out_dir, overwrite)
    if out_dir.is_dir():
        # Only what a shard set consists of is removed, so a mistyped path cannot wipe other data;
        # stale tars must go or they would mix into globs over the directory.
        for pattern in ("*.tar", "*.tar" + _TMP_SUFFIX, INDEX_NAME):
            for path in out_dir.glob(pattern):
                path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def write_digits(
    out: str | Path,
    *,
    samples_per_shard: int = 256,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    labeled_per_class: int | None = None,
) -> dict[str, Path]:
    """Write scikit-learn's digits (1797 real 8x8 scans of handwritten digits) as shard sets.

    Each image is scaled from 0..16 to 0..255, upscaled to 32x32 (bilinear), converted to RGB
    and stored as PNG, so the pixels are exactly reproducible. The stratified 80/20 train/test
    split is fixed (``random_state=0``) so that every ``seed`` evaluates on the same test set.

    Args:
        out: Directory that receives ``train/`` (1437 samples) and ``test/`` (360 samples).
        samples_per_shard: Samples per tar.
        seed: Shuffles the training order before sharding.
        overwrite: Replace existing shard sets in ``out``.
        progress: Show progress bars on stderr.
        labeled_per_class: Make ``train`` partially labeled, as :func:`write_folder` does (the
            choice drawn by ``seed``), the labeled samples also in ``out/labeled``. None: all labeled.

    Returns:
        ``{"train": out/train, "test": out/test}``, plus ``"labeled"`` when partially labeled.

    Raises:
        DistrainError: ``out`` is not empty and ``overwrite`` is off, or a bad ``labeled_per_class``.
    """
    # Imported here: scikit-learn is slow to import and only this converter needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    out = Path(out)
    _refuse_non_empty(out, overwrite)
    digits = load_digits()
    indices = list(range(len(digits.target)))
    train, test = train_test_split(indices, test_size=0.2, random_state=0, stratify=digits.target)
    train = sorted(train)
    random.Random(seed).shuffle(train)
    classes = [str(d) for d in range(10)]

    def key(i: int) -> str:
        return f"digits-{i:06d}"

    def samples(order: list[int]):
        for i in order:
            gray = Image.fromarray((digits.images[i] * (255 / 16)).round().astype("uint8"))
            buf = io.BytesIO()
            gray.resize((32, 32), Image.Resampling.BILINEAR).convert("RGB").save(buf, format="PNG")
            yield key(i), buf.getvalue(), "png", int(digits.target[i])

    sets = [("train", train, frozenset()), ("test", sorted(test), frozenset())]
    if _labeled_flag(labeled_per_class, None):
        items = [(key(i), Path(key(i)), "png", int(digits.target[i])) for i in train]
        labeled = _labeled_keys(items, classes, labeled_per_class, None, seed)
        sets = [("train", train, {key(i) for i in train} - labeled), sets[1],
                ("labeled", [i for i in train if key(i) in labeled], frozenset())]
    return {
        split: write_shard_set(
            samples(order),
            out / split,
            classes=classes,
            prefix=split,
            samples_per_shard=samples_per_shard,
            overwrite=overwrite,
            progress=progress,
            total=len(order),
            withheld=withheld,
        )
        for split, order, withheld in sets
    }


def write_folder(
    src: str | Path,
    out: str | Path,
    *,
    samples_per_shard: int = 1000,
    shuffle_seed: int | None = 0,
    overwrite: bool = False,
    progress: bool = True,
    classes: list[str] | None = None,
    train_per_class: int = 0,
    imbalance_ratio: float = 1.0,
    imbalance_seed: int = 0,
    labeled_per_class: int | None = None,
    labeled_fraction: float | None = None,
    labeled_seed: int = 0,
) -> dict[str, Path]:
    """Write a class-per-folder image tree as shard sets.

    ``src`` is either split folders holding class folders (``src/train/cat/x.jpg``; any of
    ``train``, ``val``, ``test``, each becoming ``out/<split>``; other folders are ignored) or
    class folders directly (``src/cat/x.jpg``, becoming ``out/train``). The classes are the
    sorted class-folder names of the first split (``train`` if present); the other splits may
    lack some of them but must not add any. Images are the ``.jpg``, ``.jpeg``, ``.png`` and ``.webp`` files
    (any case) directly in a class folder; other files and names starting with ``.`` are skipped.
    Every image is checked with PIL before anything is written, and is stored byte for byte under
    the extension of the format PIL detects. Keys are ``<split>-<class>-<file stem>`` with every
    character other than letters, digits, ``_`` and ``-`` replaced by ``_`` (dots would break
    webdataset's key grouping), made unique with a ``_<n>`` suffix where needed.

    Args:
        src: The image tree.
        out: Directory that receives one shard set per split.
        samples_per_shard: Samples per tar.
        shuffle_seed: Seed of the sample order within each split; ``None`` keeps the sorted
            (class, file name) order, which puts each class in its own run of shards.
        overwrite: Replace existing shard sets in ``out``.
        progress: Show progress bars on stderr.
        classes: Write only these class folders (in every split); labels follow their sorted
            order. None: all of them. Transfer experiments use disjoint class sets.
        train_per_class: Keep this many images of each class in the ``train`` split (a random
            choice by ``shuffle_seed``, or the first in sorted order): few-label fine-tuning. 0 keeps all.
        imbalance_ratio: Make the ``train`` split long-tailed, after ``train_per_class``: class
            ``i`` (label order) keeps ``long_tail_counts(n_max, len(classes), imbalance_ratio)[i]``
            images, ``n_max`` being the largest class's count, or all it has if fewer. Other splits
            stay balanced. 1 keeps all.
        imbalance_seed: Which images a class keeps under ``imbalance_ratio``: the first ones of a
            permutation of its sorted files drawn for (seed, label), whatever the shuffle. One
            permutation serves every ratio, so a larger ratio keeps a subset of a smaller one's.
        labeled_per_class: Make the ``train`` split partially labeled, after the selections
            above, for semi-supervised training: this many images of each class keep their
            label, the others are written without ``.cls`` and with their label withheld as
            ``.withheld.cls`` (for measuring pseudo-label accuracy only; never a training label).
            The labeled images are also written, as a fully labeled set, to ``out/labeled``.
            None: all are labeled.
        labeled_fraction: Like ``labeled_per_class``, with ``round(labeled_fraction * n)`` labeled
            images (at least 1; Python's ``round``, so ties go to the even count) for a class of
            ``n``; in (0, 1].
        labeled_seed: Which images of a class keep their label: the first ones of a permutation
            of its sorted files drawn for (seed, label), whatever the shuffle, so that fewer labels
            keep a subset of more labels'.

    Returns:
        The shard-set directory of each split written, plus ``"labeled"`` for a partially labeled
        ``train`` split.

    Raises:
        DistrainError: ``src`` is missing or has no class folders, a class folder has no images,
            a split has a class folder the first split lacks, an image is unreadable or neither
            JPEG, PNG nor WebP, ``out`` is not empty and ``overwrite`` is off,
            ``imbalance_ratio`` is below 1, leaves a class no training image or has no ``train``
            split to apply to, or ``labeled_per_class`` and ``labeled_fraction`` are both given,
            out of range, exceed a class's training images or have no ``train`` split.
    """
    if not 1 <= imbalance_ratio < math.inf:
        raise DistrainError(f"--imbalance-ratio: must be a number >= 1, got {imbalance_ratio:g}")
    partial = _labeled_flag(labeled_per_class, labeled_fraction)
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DistrainError(f"{src}: no such directory")
    _refuse_non_empty(out, overwrite)
    splits = {name: src / name for name in _SPLITS if _class_dirs(src / name)} or {"train": src}
    if imbalance_ratio != 1 and "train" not in splits:
        raise DistrainError(f"--imbalance-ratio: {src} has no train split to make long-tailed")
    if partial and "train" not in splits:
        raise DistrainError(f"{partial}: {src} has no train split to label partially")
    first = next(iter(splits))
    found = [d.name for d in _class_dirs(splits[first])]
    if not found:
        raise DistrainError(
            f"{src}: no class folders (expected <class>/<image> or <split>/<class>/<image>)"
        )
    missing = sorted(set(classes or []) - set(found))
    if missing:
        raise DistrainError(f"--classes: {', '.join(missing)} not among the class folders of {splits[first]}")
    skipped = set(found) - set(classes) if classes else set()
    classes = [c for c in found if c not in skipped]

    # Every split is scanned and checked before any is written, so a bad file costs no output.
    listed = {split: _scan_split(split, root, classes, progress, skipped) for split, root in splits.items()}
    result = {}
    for split, items in listed.items():
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(items)
        if split == "train" and train_per_class:
            items = _first_per_class(items, train_per_class)
        if split == "train" and imbalance_ratio != 1:
            items = _long_tailed(items, classes, imbalance_ratio, imbalance_seed)
        sets = [(split, items, frozenset())]
        if split == "train" and partial:
            labeled = _labeled_keys(items, classes, labeled_per_class, labeled_fraction, labeled_seed)
            # The labeled images also on their own, so that a supervised phase can train on them alone.
            sets = [(split, items, {item[0] for item in items} - labeled),
                    ("labeled", [item for item in items if item[0] in labeled], frozenset())]
        for name, chosen, withheld in sets:
            result[name] = write_shard_set(
                ((key, path.read_bytes(), ext, label) for key, path, ext, label in chosen),
                out / name,
                classes=classes,
                prefix=name,
                samples_per_shard=samples_per_shard,
                overwrite=overwrite,
                progress=progress,
                total=len(chosen),
                withheld=withheld,
            )
    return result


def _labeled_flag(per_class: int | None, fraction: float | None) -> str | None:
    """The partial-labeling flag in use (for error messages), after checking the values; None for
    a fully labeled set."""
    if per_class is not None and fraction is not None:
        raise DistrainError("--labeled-per-class, --labeled-fraction: give one of them, not both")
    if per_class is not None:
        if per_class < 1:
            raise DistrainError(f"--labeled-per-class: must be at least 1, got {per_class}")
        return "--labeled-per-class"
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise DistrainError(f"--labeled-fraction: must be in (0, 1], got {fraction:g}")
        return "--labeled-fraction"
    return None


def _labeled_keys(
    items: list[tuple[str, Path, str, int]], classes: list[str], per_class: int | None,
    fraction: float | None, seed: int,
) -> set[str]:
    """The keys of the items that keep their label: ``per_class`` of each label, or
    ``round(fraction * n)`` (at least 1) of a label's ``n``."""
    by_label: dict[int, list[tuple[Path, str]]] = {}
    for key, path, _, label in items:
        by_label.setdefault(label, []).append((path, key))
    kept: set[str] = set()
    for label, files in sorted(by_label.items()):
        n = per_class if per_class is not None else max(1, round(fraction * len(files)))
        if n > len(files):
            raise DistrainError(
                f"--labeled-per-class: {n} exceeds the {len(files)} training images of class {classes[label]}"
            )
        # As _long_tailed: a permutation of the sorted files rather than their first ones, drawn per
        # (seed, label) so that it ignores the shuffle and a smaller count keeps a subset.
        files.sort()
        random.Random(f"labeled {seed} {label}").shuffle(files)
        kept.update(key for _, key in files[:n])
    return kept


def _class_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _first_per_class(items: list[tuple[str, Path, str, int]], n: int) -> list[tuple[str, Path, str, int]]:
    """The first ``n`` items of each label, in the items' order."""
    seen: dict[int, int] = {}
    kept = []
    for item in items:
        seen[item[3]] = seen.get(item[3], 0) + 1
        if seen[item[3]] <= n:
            kept.append(item)
    return kept


def long_tail_counts(n_max: int, num_classes: int, ratio: float) -> list[int]:
    """Samples per class of an exponentially long-tailed set (Cao et al. 2019; Cui et al. 2019).

    Class ``i`` keeps ``floor(n_max * ratio ** (-i / (num_classes - 1)))``: ``n_max`` for the first
    class down to ``n_max / ratio`` for the last. Computed as CIFAR-10-LT's reference code does
    (``n_max * (1 / ratio) ** (i / (C - 1))``), so that the sizes match the published splits
    exactly: 5000, 2997, ..., 83, 50 for ratio 100.
    """
    if num_classes == 1:
        return [n_max]
    return [int(n_max * (1 / ratio) ** (i / (num_classes - 1))) for i in range(num_classes)]


def _long_tailed(
    items: list[tuple[str, Path, str, int]], classes: list[str], ratio: float, seed: int
) -> list[tuple[str, Path, str, int]]:
    """The items that :func:`long_tail_counts` keeps of each label, in the items' order."""
    by_label: dict[int, list[Path]] = {}
    for _, path, _, label in items:
        by_label.setdefault(label, []).append(path)
    n_max = max(len(paths) for paths in by_label.values())
    kept: set[Path] = set()
    for label, n in enumerate(long_tail_counts(n_max, len(classes), ratio)):
        if n == 0:
            raise DistrainError(
                f"--imbalance-ratio: {ratio:g} leaves class {classes[label]} no training image "
                f"(the largest class has {n_max})"
            )
        # Not the first n files: names often follow capture time or source, so a prefix would be a
        # biased sample. A string seed gives each (seed, label) its own stream, stable across runs.
        paths = sorted(by_label.get(label, []))
        random.Random(f"long-tail {seed} {label}").shuffle(paths)
        kept.update(paths[:n])
    return [item for item in items if item[1] in kept]


def _scan_split(
    split: str, root: Path, classes: list[str], progress: bool, skipped: set[str] = frozenset()
) -> list[tuple[str, Path, str, int]]:
    """List and check one split's images as (key, path, ext, label), in sorted order, leaving out
    the ``skipped`` class folders."""
    files: list[tuple[Path, int]] = []
    for class_dir in _class_dirs(root):
        if class_dir.name in skipped:
            continue
        if class_dir.name not in classes:
            raise DistrainError(f"{class_dir}: class folder not among the first split's classes")
        images = sorted(
            p
            for p in class_dir.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in _FOLDER_SUFFIXES
        )
        if not images:
            raise DistrainError(f"{class_dir}: class folder has no .jpg/.jpeg/.png/.webp images")
        label = classes.index(class_dir.name)
        files.extend((path, label) for path in images)

    # Keys are assigned in sorted order, before any shuffle, so they do not depend on the seed.
    items = []
    used: set[str] = set()
    for path, label in _bar(files, desc=f"checking {split}", progress=progress):
        base = _UNSAFE_KEY_CHARS.sub("_", f"{split}-{classes[label]}-{path.stem}")
        key, n = base, 1
        while key in used:
            n += 1
            key = f"{base}_{n}"
        used.add(key)
        items.append((key, path, _image_ext(path), label))
    return items


def _image_ext(path: Path) -> str:
    """The shard extension for an image file, after checking that PIL can read it."""
    try:
        with Image.open(path) as im:
            fmt = im.format
            im.verify()
    except Exception as e:  # PIL raises many types for corrupt files; all mean the same here.
        raise DistrainError(f"{path}: unreadable image ({_one_line(e)})") from None
    if fmt not in _PIL_FORMAT_EXT:
        raise DistrainError(f"{path}: {fmt} image, only JPEG, PNG and WebP are supported")
    return _PIL_FORMAT_EXT[fmt]


def _bar(
    iterable: Iterable | None = None, *, total: int | None = None, desc: str, progress: bool
) -> tqdm:
    return tqdm(iterable, total=total, desc=desc, unit="img", file=sys.stderr, disable=not progress)


def _one_line(e: Exception) -> str:
    lines = str(e).splitlines()
    return lines[0] if lines else type(e).__name__


def index_shards(directory: str | Path, *, classes: list[str] | None = None) -> Path:
    """Write ``index.json`` for a directory of existing webdataset tars.

    Counts the samples of each ``*.tar`` (in sorted name order) as the distinct keys that have an
    image or a ``.cls`` member, splitting member names into key and extension the way webdataset
    does; the labeled ones are those with ``.cls``, and the samples of each label are counted among
    them. Tars with unlabeled samples (no ``.cls``; a ``.withheld.cls`` is not a label) get a
    partially labeled set's index, the same as :func:`write_shard_set` writes for them.

    Args:
        directory: Directory holding the tars.
        classes: Class names; defaults to those of the index already in ``directory`` (re-indexing
            adds class counts to an older index without losing its names), else ``"0"``, ``"1"``,
            ... up to the largest label found.

    Returns:
        The path of the index.

    Raises:
        DistrainError: No tars in ``directory``, an unreadable tar or ``.cls`` member (or a negative
            label), or a label outside ``classes``.
    """
    directory = Path(directory)
    tars = sorted(directory.glob("*.tar")) if directory.is_dir() else []
    if not tars:
        raise DistrainError(f"{directory}: no .tar shards to index")
    shards = []
    labels: list[Counter] = []
    labeled_keys: list[list[str]] = []
    max_label = -1
    for path in tars:
        samples: set[str] = set()
        keys: dict[str, int] = {}
        try:
            with tarfile.open(path, "r|*") as tar:
                for member in tar:
                    key, ext = base_plus_ext(member.name)
                    if not member.isreg() or key is None:
                        continue
                    ext = ext.lower()
                    # A .cls without an image still counts: the stream reads it, as a bad sample.
                    if ext in IMAGE_EXTS:
                        samples.add(key)
                    if ext != "cls":
                        continue
                    samples.add(key)
                    label = int(tar.extractfile(member).read().decode("ascii").strip())
                    if label < 0:
                        raise ValueError(f"{member.name}: negative label {label}")
                    keys[key] = label
                    max_label = max(max_label, label)
        except (tarfile.TarError, OSError, ValueError) as e:
            raise DistrainError(f"{path}: unreadable shard ({_one_line(e)})") from None
        shards.append((path.name, len(samples)))
        labels.append(Counter(keys.values()))
        labeled_keys.append(list(keys))
    given = classes is not None
    if classes is None:
        classes = _indexed_classes(directory) or [str(i) for i in range(max_label + 1)]
    if max_label >= len(classes):
        raise DistrainError(
            f"{directory}: label {max_label} found but only {len(classes)} classes given" if given else
            f"{directory}: label {max_label} found but {INDEX_NAME} names only {len(classes)} classes "
            "(delete it to index with numbered classes)"
        )
    counts = [[c[i] for i in range(len(classes))] for c in labels]
    return write_index(directory, shards, classes, counts, labeled_keys)


def _indexed_classes(directory: Path) -> list[str] | None:
    """The class names of the index already in ``directory``; None without a readable one."""
    try:
        return list(read_index(directory).get("classes", ())) or None
    except DistrainError:
        return None
