"""The shard stream: rank/worker splitting, equal batches, exactly-once eval, determinism, skipping."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import write_layout
from torch.utils.data import DataLoader

from distrain.data.shards import reads_for_range, resolve_shards, split_evenly
from distrain.data.stream import PAD_LABEL, Augment, EvalResize, ShardStream
from distrain.errors import DistrainError

AUG = Augment(size=8, scale=(0.5, 1.0), ratio=(0.75, 1.33), hflip=True)


def train_stream(shards, rank, world, batch, batches, seed=0):
    return ShardStream(shards, rank=rank, world_size=world, batch_size=batch, seed=seed, num_classes=4, augment=AUG,
                       batches_per_epoch=batches, shuffle_block=6)


def keys_of(stream, epoch=0, workers=2, skip=0):
    stream.set_position(epoch, skip)
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return [list(b["key"]) for b in loader]


@pytest.fixture(scope="module")
def even(tmp_path_factory):
    return resolve_shards(str(write_layout(tmp_path_factory.mktemp("even"), [8, 8, 8, 8])))


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    return resolve_shards(str(write_layout(tmp_path_factory.mktemp("uneven"), [8, 8, 8, 8, 5])))


def test_resolve_forms(tmp_path):
    d = write_layout(tmp_path / "set", [3, 4, 5])
    assert resolve_shards(str(d)).total == 12
    assert resolve_shards(str(d / "shard-{00..01}.tar")).total == 7
    assert resolve_shards(str(d / "shard-*.tar")).total == 12
    assert resolve_shards([str(d / "shard-00.tar"), str(d / "shard-02.tar")]).total == 8
    with pytest.raises(DistrainError, match="matches no files"):
        resolve_shards(str(d / "nope-*.tar"))
    with pytest.raises(DistrainError, match="does not exist"):
        resolve_shards(str(tmp_path / "missing"))
    (tmp_path / "loose").mkdir()
    with pytest.raises(DistrainError, match="no shard index"):
        resolve_shards(str(tmp_path / "loose"))


def test_range_and_split_helpers():
    assert [split_evenly(10, 3, i) for i in range(3)] == [(0, 4), (4, 7), (7, 10)]
    from distrain.data.index import Shard

    shards = [Shard("a", 5), Shard("b", 5), Shard("c", 5)]
    assert [(r.url, r.skip, r.take) for r in reads_for_range(shards, 3, 9)] == [("a", 3, 2), ("b", 0, 5), ("c", 0, 2)]
    # a range past the end wraps around to the first shard
    assert [(r.url, r.skip, r.take) for r in reads_for_range(shards, 12, 6)] == [("c", 2, 3), ("a", 0, 3)]
    assert [(r.url, r.skip, r.take) for r in reads_for_range(shards, 17, 4)] == [("a", 2, 3), ("b", 0, 1)]
    with pytest.raises(ValueError):
        reads_for_range(shards, 0, 16)


def test_even_layout_every_sample_once_over_2_ranks_x_2_workers(even):
    # 32 samples, 2 ranks x batch 4 -> 4 batches per rank; each rank read by 2 workers.
    seen = []
    for rank in range(2):
        batches = keys_of(train_stream(even, rank, 2, 4, 4))
        assert len(batches) == 4 and all(len(b) == 4 for b in batches)
        seen += [k for b in batches for k in b]
    assert sorted(seen) == [f"s{i:05d}" for i in range(32)]


def test_uneven_layout_equal_batches_per_rank(uneven):
    # 37 samples over 2 ranks x batch 4: 4 batches each (32 samples), never a short or missing batch.
    per_rank = [keys_of(train_stream(uneven, r, 2, 4, 4), workers=w) for r in range(2) for w in (0, 2, 3)]
    assert all(len(b) == 4 and all(len(x) == 4 for x in b) for b in per_rank)
    for r in range(2):
        keys = [k for b in per_rank[3 * r] for k in b]
        assert len(set(keys)) == 16
    both = {k for b in per_rank[0] + per_rank[3] for k in b}
    assert len(both) == 32  # ranks never share a sample


def test_order_is_deterministic_and_changes_with_epoch(uneven):
    a = keys_of(train_stream(uneven, 0, 2, 4, 4), epoch=0)
    assert keys_of(train_stream(uneven, 0, 2, 4, 4), epoch=0) == a
    assert keys_of(train_stream(uneven, 0, 2, 4, 4), epoch=1) != a
    assert keys_of(train_stream(uneven, 0, 2, 4, 4, seed=1), epoch=0) != a


def test_pixels_are_deterministic(even):
    def images(epoch):
        s = train_stream(even, 1, 2, 4, 4)
        s.set_position(epoch)
        return [b["image"] for b in DataLoader(s, batch_size=None, num_workers=2)]

    a, b = images(0), images(0)
    assert all((x == y).all() for x, y in zip(a, b))
    assert a[0].dtype.is_floating_point is False and a[0].shape == (4, 3, 8, 8)


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_skip_resumes_the_same_sequence(uneven, workers):
    full = keys_of(train_stream(uneven, 1, 2, 4, 4), epoch=3, workers=workers)
    for skip in range(1, 4):
        assert keys_of(train_stream(uneven, 1, 2, 4, 4), epoch=3, workers=workers, skip=skip) == full[skip:]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_counts_every_sample_exactly_once(uneven, world):
    seen, batch_counts = Counter(), set()
    for rank in range(world):
        s = ShardStream(uneven, rank=rank, world_size=world, batch_size=5, seed=0, num_classes=4,
                        eval_resize=EvalResize(16, 16))
        batches = list(DataLoader(s, batch_size=None, num_workers=2))
        batch_counts.add(len(batches))
        for b in batches:
            seen.update(k for k, label in zip(b["key"], b["label"].tolist()) if label != PAD_LABEL)
    assert len(batch_counts) == 1  # same number of forward passes on every rank
    assert sorted(seen) == [f"s{i:05d}" for i in range(37)] and set(seen.values()) == {1}


def test_stream_refuses_more_batches_than_samples(even):
    with pytest.raises(DistrainError, match="need more than"):
        train_stream(even, 0, 2, 4, 5)


@pytest.mark.parametrize("world", [1, 2])
def test_the_dropped_remainder_rotates_over_epochs(tmp_path, world):
    # One shard of 10 samples, 8 used per epoch (2 batches of 4 over all ranks): cut at offset 0
    # every epoch, samples 8 and 9 would never be seen.
    shards = resolve_shards(str(write_layout(tmp_path / "one", [10])))
    seen = set()
    for epoch in range(8):
        per_rank = [[k for b in keys_of(train_stream(shards, r, world, 4 // world, 2), epoch, 0) for k in b]
                    for r in range(world)]
        used = [k for keys in per_rank for k in keys]
        assert len(used) == len(set(used)) == 8  # each epoch: 8 distinct samples, none on two ranks
        seen.update(used)
    assert seen == {f"s{i:05d}" for i in range(10)}


def test_a_rotated_epoch_resumes_exactly(tmp_path):
    shards = resolve_shards(str(write_layout(tmp_path / "one", [10])))
    full = keys_of(train_stream(shards, 0, 1, 2, 4), epoch=5, workers=2)
    assert sorted(k for b in full for k in b) != [f"s{i:05d}" for i in range(8)]  # this epoch is rotated
    for skip in (1, 3):
        assert keys_of(train_stream(shards, 0, 1, 2, 4), epoch=5, workers=2, skip=skip) == full[skip:]
