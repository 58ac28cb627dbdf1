"""The shard-set index: per-shard sample counts and class names, so epochs are sized without
scanning tars.

A shard set is a directory holding ``<prefix>-NNNNNN.tar`` files and ``index.json``::

    {"format": "distrain-shards/1",
     "classes": ["cat", "dog"],
     "total": 1000,
     "shards": [{"name": "train-000000.tar", "samples": 512, "class_counts": [300, 212]}, ...],
     "class_counts": [600, 400]}

Each sample in a tar is ``<key>.<image ext>`` plus ``<key>.cls`` (the class index as ASCII).
``class_counts`` (samples per label, per shard and in all) is optional: older indexes lack it, and
only class-aware features (``data.resample``, class-weighted losses, the plan's imbalance ratio)
need it; ``distrain data index DIR`` adds it to existing tars.

A partially labeled shard set (semi-supervised training) also holds samples without ``.cls``. Its
index says which samples are labeled, per shard and in all, and its ``class_counts`` count the
labeled samples only, while ``total`` and ``samples`` still count every sample::

    {"format": "distrain-shards/1",
     "classes": ["cat", "dog"],
     "total": 1000,
     "labeled": 100,
     "shards": [{"name": "train-000000.tar", "samples": 512, "labeled": 49,
                 "labeled_keys": ["train-cat-img0007", ...], "class_counts": [30, 19]}, ...],
     "class_counts": [60, 40]}

An unlabeled sample may carry its true label as ``<key>.withheld.cls`` (webdataset field
``withheld.cls``, encoded like ``.cls``), kept only to measure the accuracy of pseudo-labels: it is
not a label, and no reader may train on it. A fully labeled set has no ``labeled`` fields, so its
index reads the same as before they existed; a missing ``labeled`` means every sample is labeled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distrain.errors import DistrainError

INDEX_NAME = "index.json"
FORMAT = "distrain-shards/1"


@dataclass(frozen=True)
class Shard:
    """One tar file, how many samples it holds and, when indexed, how many of each label.

    Attributes:
        url: The tar's path.
        samples: All its samples, labeled or not.
        class_counts: Its labeled samples of each label; empty when its index lacks them.
        labeled: Its samples with a ``.cls`` label; None (the default) means all ``samples``.
    """

    url: str
    samples: int
    class_counts: tuple[int, ...] = ()
    labeled: int | None = None

    def __post_init__(self):
        # Frozen, so the default is filled in through object.__setattr__; readers then always see an int.
        if self.labeled is None:
            object.__setattr__(self, "labeled", self.samples)

    @classmethod
    def from_entry(cls, url: str, entry: dict) -> Shard:
        """The shard that one ``shards`` entry of an index describes, its tar being at ``url``."""
        return cls(
            url,
            int(entry["samples"]),
            tuple(int(c) for c in entry.get("class_counts", ())),
            int(entry.get("labeled", entry["samples"])),
        )


@dataclass(frozen=True)
class ShardSet:
    """The shards a stream reads, in a fixed (sorted) order, and the class names."""

    shards: tuple[Shard, ...]
    classes: tuple[str, ...]

    @property
    def total(self) -> int:
        """All samples, labeled or not."""
        return sum(s.samples for s in self.shards)

    @property
    def labeled(self) -> int:
        """The samples with a ``.cls`` label (:attr:`total` for a fully labeled set)."""
        return sum(s.labeled for s in self.shards)

    @property
    def class_counts(self) -> tuple[int, ...]:
        """Labeled samples per label over all shards; empty when any shard's index lacks them."""
        if not self.shards or any(not s.class_counts for s in self.shards):
            return ()
        return tuple(int(n) for n in sum(np.asarray(s.class_counts, dtype=np.int64) for s in self.shards))


def write_index(
    directory: str | Path, shards: list[tuple[str, int]], classes: list[str],
    class_counts: list[list[int]] | None = None, labeled_keys: list[list[str]] | None = None,
) -> Path:
    """Write ``index.json`` for a shard set atomically.

    Args:
        directory: The shard-set directory.
        shards: (file name relative to ``directory``, sample count) per shard, counting every sample.
        classes: Class names; the label of class ``classes[i]`` is ``i``.
        class_counts: Per shard, the number of labeled samples of each label (``len(classes)``
            entries).
        labeled_keys: Per shard, the keys of its samples that have a ``.cls`` label. When some
            sample has none, the index records the labeled keys and counts (see the module
            docstring); None, or every sample labeled, writes a fully labeled set's index.

    Returns:
        The path of the index.

    Raises:
        ValueError: ``class_counts`` or ``labeled_keys`` do not give one entry per shard, a
            shard's class counts do not sum to its labeled samples, or a shard lists more
            labeled keys than it has samples, or a key twice.
    """
    directory = Path(directory)
    if labeled_keys is not None and (
        len(labeled_keys) != len(shards)
        or any(len(set(keys)) != len(keys) or len(keys) > n for keys, (_, n) in zip(labeled_keys, shards))
    ):
        raise ValueError("labeled_keys must give each shard's distinct labeled keys, at most its samples")
    partial = labeled_keys is not None and any(len(keys) < n for keys, (_, n) in zip(labeled_keys, shards))
    labeled = [len(keys) for keys in labeled_keys] if labeled_keys is not None else [n for _, n in shards]
    doc = {"format": FORMAT, "classes": list(classes), "total": sum(n for _, n in shards)}
    entries = [{"name": name, "samples": n} for name, n in shards]
    if partial:
        doc["labeled"] = sum(labeled)
        for entry, keys in zip(entries, labeled_keys):
            entry["labeled"] = len(keys)
            entry["labeled_keys"] = sorted(keys)
    doc["shards"] = entries
    if class_counts is not None:
        if len(class_counts) != len(shards) or any(sum(c) != n for c, n in zip(class_counts, labeled)):
            raise ValueError("class_counts must give each shard's label counts, summing to its labeled samples")
        for entry, counts in zip(doc["shards"], class_counts):
            entry["class_counts"] = [int(c) for c in counts]
        doc["class_counts"] = [int(c) for c in np.sum(np.asarray(class_counts, dtype=np.int64).reshape(
            len(shards), -1), axis=0)]
    tmp = directory / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, directory / INDEX_NAME)
    return directory / INDEX_NAME


def read_index(directory: str | Path) -> dict:
    """Read and check the index of a local shard set (remote ones: :mod:`distrain.data.shards`).

    Raises:
        DistrainError: missing or malformed index, naming the file.
    """
    path = Path(directory) / INDEX_NAME
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise DistrainError(
            f"{path}: no shard index (write shards with `distrain data`, or index existing ones with "
            f"`distrain data index {directory}`)"
        ) from None
    except OSError as e:
        raise DistrainError(f"{path}: unreadable shard index ({e})") from None
    return parse_index(text, str(path))


def parse_index(text: bytes, where: str) -> dict:
    """Check and decode the bytes of a shard-set index read from ``where``.

    Raises:
        DistrainError: not JSON, or not a shard-set index, naming ``where``.
    """
    try:
        doc = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DistrainError(f"{where}: unreadable shard index ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("shards"), list):
        raise DistrainError(f"{where}: not a {FORMAT} index")
    return doc
