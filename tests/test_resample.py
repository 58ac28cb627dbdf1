"""Class-aware resampling of streamed epochs: factors, exact class totals, equal batches on 2 and 3
ranks x 2 workers, exact resume, different augmentations of repeated samples."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from distrain.data.index import write_index
from distrain.data.resample import Resampling, class_factors, class_totals, epoch_samples
from distrain.data.shards import resolve_shards
from distrain.data.stream import Augment, ShardStream
from distrain.errors import DistrainError

AUG = Augment(size=8, scale=(0.3, 1.0), ratio=(0.75, 1.33), hflip=True)
# Uneven shards, and a long tail: class 0 has 40 samples, class 3 has 4.
LABELS = [0] * 40 + [1] * 20 + [2] * 10 + [3] * 4


def _textured(seed: int) -> bytes:
    """A 16 px image of noise, so that two crops of it differ."""
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def write_labelled(out, labels: list[int], sizes: list[int], num_classes: int = 4, counts: bool = True):
    """Shards of ``sizes`` samples holding ``labels`` in a shuffled order; keys s00000, s00001, ..."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(0).permutation(len(labels))
    entries, per_shard, n = [], [], 0
    for i, size in enumerate(sizes):
        name = f"shard-{i:02d}.tar"
        with wds.TarWriter(str(out / name)) as tw:
            for j in order[n:n + size]:
                tw.write({"__key__": f"s{j:05d}", "png": _textured(int(j)), "cls": str(labels[j]).encode()})
        per_shard.append(np.bincount([labels[j] for j in order[n:n + size]], minlength=num_classes).tolist())
        entries.append((name, size))
        n += size
    write_index(out, entries, [str(c) for c in range(num_classes)], per_shard if counts else None)
    return out


@pytest.fixture(scope="module")
def longtail(tmp_path_factory):
    return resolve_shards(str(write_labelled(tmp_path_factory.mktemp("lt"), LABELS, [30, 17, 20, 7])))


def stream(shards, kind, rank=0, world=1, batch=1, batches=None, seed=0, threshold=0.5):
    rs = Resampling.by_class(shards, kind, threshold, seed)
    return ShardStream(shards, rank=rank, world_size=world, batch_size=batch, seed=seed, num_classes=4, augment=AUG,
                       batches_per_epoch=batches or rs.total // (world * batch), shuffle_block=8, resampling=rs)


def batches_of(s, epoch=0, workers=2, skip=0):
    s.set_position(epoch, skip)
    return list(DataLoader(s, batch_size=None, num_workers=workers))


def test_factors_match_their_definitions():
    counts = np.array([40, 20, 10, 4])
    np.testing.assert_allclose(class_factors(counts, "class_balanced") * counts, [18.5] * 4)
    sq = np.sqrt(counts)
    np.testing.assert_allclose(class_factors(counts, "sqrt") * counts, 74 * sq / sq.sum())
    np.testing.assert_allclose(class_factors(counts, "repeat_factor", 0.5),
                               np.maximum(1, np.sqrt(0.5 / (counts / 74))))
    assert class_totals(counts, class_factors(counts, "class_balanced")).tolist() == [18, 18, 18, 18]  # rint(18.5)
    # an absent class gets nothing and does not count among the classes to balance
    np.testing.assert_allclose(class_factors(np.array([30, 0, 10]), "class_balanced"), [20 / 30, 0, 2])


@pytest.mark.parametrize("kind", ["class_balanced", "sqrt", "repeat_factor"])
def test_one_epoch_holds_each_class_exactly_its_total(longtail, kind):
    rs = Resampling.by_class(longtail, kind, 0.5, seed=0)
    assert rs.total == epoch_samples(longtail, kind, 0.5) == sum(s.samples for s in rs.epoch_shards(3).shards)
    for epoch in (0, 1):
        # batch 1 on 1 rank: the epoch is every expanded position once
        keys = [k for b in batches_of(stream(longtail, kind), epoch) for k in b["key"]]
        labels = {f"s{j:05d}": y for j, y in enumerate(LABELS)}
        per_class = Counter(labels[k] for k in keys)
        assert [per_class[c] for c in range(4)] == rs.totals.tolist()
        # each sample gets the floor or the ceiling of its class's factor, never more
        per_key = Counter(keys)
        for k in labels:
            f = rs.factors[labels[k]]
            assert np.floor(f) <= per_key[k] <= np.ceil(f)
    first = Counter(k for b in batches_of(stream(longtail, kind), 0) for k in b["key"])
    second = Counter(k for b in batches_of(stream(longtail, kind), 1) for k in b["key"])
    if rs.extra.any():
        assert first != second  # which samples get the extra copy changes with the epoch


@pytest.mark.parametrize("world", [2, 3])
def test_equal_batches_on_every_rank_and_worker_layout(longtail, world):
    rs = Resampling.by_class(longtail, "class_balanced", 0.5, seed=1)
    batches = rs.total // (world * 4)
    seen = Counter()
    for rank in range(world):
        for workers in (0, 2):
            out = batches_of(stream(longtail, "class_balanced", rank, world, 4, batches, seed=1), 0, workers)
            assert len(out) == batches and all(len(b["key"]) == 4 for b in out)
            assert not any(b["bad"] for b in out)
            if workers == 2:
                seen.update(k for b in out for k in b["key"])
    # together the ranks read a part of the expansion: no sample more often than its ceiling
    labels = {f"s{j:05d}": y for j, y in enumerate(LABELS)}
    assert all(n <= np.ceil(rs.factors[labels[k]]) for k, n in seen.items())
    assert sum(seen.values()) == world * batches * 4


def test_resume_mid_epoch_is_exact(longtail):
    s = stream(longtail, "repeat_factor", rank=1, world=2, batch=4)
    full = batches_of(s, epoch=2)
    resumed = batches_of(s, epoch=2, skip=3)
    assert [b["key"] for b in resumed] == [b["key"] for b in full[3:]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, full[3:]))


def test_copies_of_a_sample_are_augmented_differently(longtail):
    out = batches_of(stream(longtail, "class_balanced"), 0, workers=0)
    images: dict[str, list[torch.Tensor]] = {}
    for b in out:
        images.setdefault(b["key"][0], []).append(b["image"][0])
    repeated = {k: v for k, v in images.items() if len(v) > 1}
    assert repeated
    for copies in repeated.values():
        assert all(not torch.equal(copies[0], c) for c in copies[1:])


def test_an_index_without_class_counts_is_refused(tmp_path):
    shards = resolve_shards(str(write_labelled(tmp_path / "old", LABELS, [74], counts=False)))
    with pytest.raises(DistrainError, match=r"data.resample: .*shard-00.tar: its index.json has no class counts"):
        Resampling.by_class(shards, "class_balanced", 0.001, 0)


def test_plan_sizes_the_resampled_epoch(tmp_path):
    from conftest import checked, distrain

    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"data: {{train: {tmp_path / 'lt'}, resample: class_balanced, train_samples: 5}}\n"
                   "batch: {per_device: 4}\n")
    write_labelled(tmp_path / "lt", LABELS, [30, 17, 20, 7])
    out = checked(distrain(["plan", str(cfg)], cwd=tmp_path)).stdout
    assert "72 per epoch after data.resample: class_balanced" in out  # 4 classes x rint(18.5)
    assert "updates per epoch" in out and " 18\n" in out  # 72 // 4
