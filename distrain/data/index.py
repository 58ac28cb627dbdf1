"""The shard-set index: per-shard sample counts and class names, so epochs are sized without
scanning tars.

A shard set is a directory holding ``<prefix>-NNNNNN.tar`` files and ``index.json``::

    {"format": "distrain-shards/1",
     "classes": ["cat", "dog"],
     "total": 1000,
     "class_counts": [600, 400],
     "shards": [{"name": "train-000000.tar", "samples": 512, "class_counts": [300, 212]}, ...]}

Each sample in a tar is ``<key>.<image ext>`` plus ``<key>.cls`` (the class index as ASCII).
``class_counts`` (samples per label, per shard and in all) is optional: older indexes lack it, and
only class-aware features (``data.resample``, class-weighted losses, the plan's imbalance ratio)
need it; ``distrain data index DIR`` adds it to existing tars.
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
    """One tar file, how many samples it holds and, when indexed, how many of each label."""

    url: str
    samples: int
    class_counts: tuple[int, ...] = ()


@dataclass(frozen=True)
class ShardSet:
    """The shards a stream reads, in a fixed (sorted) order, and the class names."""

    shards: tuple[Shard, ...]
    classes: tuple[str, ...]

    @property
    def total(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def class_counts(self) -> tuple[int, ...]:
        """Samples per label over all shards; empty when any shard's index lacks them."""
        if not self.shards or any(not s.class_counts for s in self.shards):
            return ()
        return tuple(int(n) for n in sum(np.asarray(s.class_counts, dtype=np.int64) for s in self.shards))


def write_index(
    directory: str | Path, shards: list[tuple[str, int]], classes: list[str],
    class_counts: list[list[int]] | None = None,
) -> Path:
    """Write ``index.json`` for a shard set atomically.

    Args:
        directory: The shard-set directory.
        shards: (file name relative to ``directory``, sample count) per shard.
        classes: Class names; the label of class ``classes[i]`` is ``i``.
        class_counts: Per shard, the number of samples of each label (``len(classes)`` entries).

    Returns:
        The path of the index.
    """
    directory = Path(directory)
    doc = {
        "format": FORMAT,
        "classes": list(classes),
        "total": sum(n for _, n in shards),
        "shards": [{"name": name, "samples": n} for name, n in shards],
    }
    if class_counts is not None:
        if len(class_counts) != len(shards) or any(sum(c) != n for c, (_, n) in zip(class_counts, shards)):
            raise ValueError("class_counts must give each shard's label counts, summing to its samples")
        for entry, counts in zip(doc["shards"], class_counts):
            entry["class_counts"] = [int(c) for c in counts]
        doc["class_counts"] = [int(c) for c in np.sum(np.asarray(class_counts, dtype=np.int64).reshape(
            len(shards), -1), axis=0)]
    tmp = directory / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, directory / INDEX_NAME)
    return directory / INDEX_NAME


def read_index(directory: str | Path) -> dict:
    """Read and check a shard-set index.

    Raises:
        DistrainError: missing or malformed index, naming the file.
    """
    path = Path(directory) / INDEX_NAME
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise DistrainError(
            f"{path}: no shard index (write shards with `distrain data`, or index existing ones with "
            f"`distrain data index {directory}`)"
        ) from None
    except (OSError, json.JSONDecodeError) as e:
        raise DistrainError(f"{path}: unreadable shard index ({e})") from None
    if doc.get("format") != FORMAT or not isinstance(doc.get("shards"), list):
        raise DistrainError(f"{path}: not a {FORMAT} index")
    return doc
