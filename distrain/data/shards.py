"""Shard lists and who reads what.

A shard spec (a shard-set directory, a tar path, a glob, a brace pattern, a URL or ``pipe:``
command (:mod:`distrain.data.remote`), or a list of these) resolves to a :class:`ShardSet` whose
counts come from each set's ``index.json``. Each epoch the shards are put in a deterministic order for (seed, epoch), and the concatenated sample
sequence, read from an offset per (seed, epoch) and wrapping around at its end, is cut into
contiguous ranges: one per rank, then one per DataLoader worker inside it.
Cutting samples rather than dealing whole shards is what gives every rank exactly the same number
of batches whatever the shard sizes, and lets any number of ranks x workers read any number of
shards.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import numpy as np

from distrain.data import remote
from distrain.data.index import INDEX_NAME, Shard, ShardSet, parse_index, read_index
from distrain.errors import DistrainError


def _expand(spec: str | list[str]) -> list[str]:
    specs = [spec] if isinstance(spec, str) else list(spec)
    paths: list[str] = []
    for s in specs:
        for pattern in braceexpand.braceexpand(s):
            if remote.is_remote(pattern):
                remote.check_spec(pattern)
                paths.append(pattern)
            elif os.path.isdir(pattern):
                paths.append(pattern)
            elif glob.has_magic(pattern):
                found = sorted(glob.glob(pattern))
                if not found:
                    raise DistrainError(f"shard pattern {pattern!r} matches no files")
                paths.extend(found)
            elif os.path.exists(pattern):
                paths.append(pattern)
            else:
                raise DistrainError(f"shard path {pattern!r} does not exist")
    return paths


def _locate(path: str) -> tuple[str, list[str] | None, Callable[[str], str]]:
    """Where the index of ``path``'s set is, the one tar name ``path`` names (None: the whole set),
    and the location of each tar the index lists."""
    if remote.is_remote(path):
        if remote.is_directory(path):
            return remote.index_location(path), None, lambda name: remote.shard_location(path, name)
        return remote.index_location(path), [remote.tar_name(path)], lambda name: path
    directory = Path(path) if os.path.isdir(path) else Path(path).parent
    names = None if os.path.isdir(path) else [os.path.basename(path)]
    return str(directory / INDEX_NAME), names, lambda name: str(directory / name)


def _read_index(location: str) -> dict:
    if remote.is_remote(location):
        return parse_index(remote.read_index_bytes(location), location)
    return read_index(Path(location).parent)


def resolve_shards(spec: str | list[str]) -> ShardSet:
    """Resolve a shard spec to its shards and sample counts, using the shard-set indexes.

    Local paths, URLs and ``pipe:`` commands may be mixed (:mod:`distrain.data.remote`); a remote
    set's index is read with one request and its tars are not touched.

    Raises:
        DistrainError: a missing path or index, an empty glob, a tar absent from its set's index,
            or shard sets with different class lists.
    """
    if not spec:
        raise DistrainError("no shards given")
    shards: list[Shard] = []
    classes: tuple[str, ...] | None = None
    indexes: dict[str, dict] = {}
    for path in _expand(spec):
        where, names, location = _locate(path)
        if where not in indexes:
            indexes[where] = _read_index(where)
        doc = indexes[where]
        entries = {s["name"]: s for s in doc["shards"]}
        if names is None:
            names = [s["name"] for s in doc["shards"]]
        elif names[0] not in entries:
            raise DistrainError(f"{path}: not listed in {where}")
        shards.extend(Shard.from_entry(location(n), entries[n]) for n in names)
        these = tuple(doc.get("classes", ()))
        if classes is not None and these != classes:
            raise DistrainError(f"{where}: class list differs from the other shard sets")
        classes = these
    unique = {s.url: s for s in shards}
    return ShardSet(tuple(sorted(unique.values(), key=lambda s: s.url)), classes or ())


def shard_order(shardset: ShardSet, seed: int, epoch: int, shuffle: bool) -> list[Shard]:
    """The shards in the order all ranks read them this epoch (a permutation for (seed, epoch))."""
    shards = list(shardset.shards)
    if shuffle:
        perm = np.random.default_rng([seed, epoch]).permutation(len(shards))
        shards = [shards[i] for i in perm]
    return shards


@dataclass(frozen=True)
class Read:
    """Read ``take`` samples of shard ``url`` after skipping its first ``skip``."""

    url: str
    skip: int
    take: int


def reads_for_range(shards: list[Shard], start: int, count: int) -> list[Read]:
    """The shard reads covering samples [start, start + count) of the shards' concatenation, cyclically.

    Positions from the total number of samples on wrap around to the first shard, so that a range
    may start anywhere (see :func:`epoch_offset`); ``count`` may not exceed that total.

    Raises:
        ValueError: ``count`` exceeds the samples of ``shards``.
    """
    total = sum(s.samples for s in shards)
    if count > total:
        raise ValueError(f"{count} samples asked of shards holding {total}")
    start = start % total if total else 0
    head = min(count, total - start)
    return _reads_within(shards, start, head) + _reads_within(shards, 0, count - head)


# A seed word of its own ("rotation" in ASCII), so that the offset's draw is not the shard order's,
# nor a block shuffle's ([seed, epoch, start, block]: numpy's seed sequences ignore trailing zeros).
_ROTATION_WORD = 0x726F746174696F6E


def epoch_offset(seed: int, epoch: int, total: int, used: int) -> int:
    """Where epoch ``epoch`` starts reading its ``used`` of the ``total`` samples of the shard order.

    When an epoch uses fewer samples than there are, the remainder it drops must be different
    samples each epoch, even with a single shard whose order never changes: the cut starts at a
    uniform offset drawn for (seed, epoch), the same on every rank and worker, and reads wrap
    around (:func:`reads_for_range`). Each sample is then dropped with the same probability.
    An epoch that uses every sample starts at 0.
    """
    if used >= total:
        return 0
    return int(np.random.default_rng([seed, epoch, _ROTATION_WORD]).integers(total))


def _reads_within(shards: list[Shard], start: int, count: int) -> list[Read]:
    """The shard reads covering samples [start, start + count) of the shards' concatenation."""
    if count <= 0:
        return []
    reads, offset = [], 0
    end = start + count
    for shard in shards:
        lo, hi = max(start, offset), min(end, offset + shard.samples)
        if lo < hi:
            reads.append(Read(shard.url, lo - offset, hi - lo))
        offset += shard.samples
        if offset >= end:
            break
    return reads


def split_evenly(n: int, parts: int, i: int) -> tuple[int, int]:
    """[start, stop) of part ``i`` when ``n`` items are cut into ``parts`` contiguous parts whose
    sizes differ by at most one (earlier parts larger)."""
    q, r = divmod(n, parts)
    start = i * q + min(i, r)
    return start, start + q + (1 if i < r else 0)


def repeat_layout(repeats: int, world_size: int, batch_size: int) -> tuple[int, int]:
    """Where the ``repeats`` augmented copies of a sample go: (ranks per copy group, copies per batch).

    Repeated augmentation (Hoffer et al. 2020; DeiT's RASampler) puts the copies of a sample in
    the same step. With ``repeats`` dividing the world size, groups of ``repeats`` ranks read the
    same samples (each rank augments its copy with its own seed); with fewer ranks, every rank
    reads the same samples and each batch holds ``repeats / world_size`` copies of each.

    Raises:
        DistrainError: neither divides the other, or the batch does not hold whole sets of copies.
    """
    if repeats == 1 or world_size % repeats == 0:
        return repeats, 1
    if repeats % world_size:
        raise DistrainError(
            f"data.repeats: {repeats} copies cannot be spread over {world_size} ranks; use a divisor or a multiple "
            "of the number of processes"
        )
    copies = repeats // world_size
    if batch_size % copies:
        raise DistrainError(
            f"data.repeats: batch.per_device {batch_size} must be a multiple of the {copies} copies per batch "
            f"({repeats} repeats on {world_size} ranks)"
        )
    return world_size, copies
