"""Repeated augmentation on shard streams: copies of a sample in the same step, on distinct ranks."""

from __future__ import annotations

from collections import Counter

import pytest
from torch.utils.data import DataLoader

from distrain.data.shards import repeat_layout, resolve_shards
from distrain.data.stream import Augment, ShardStream
from distrain.errors import DistrainError

AUG = Augment(size=8, scale=(0.3, 1.0), ratio=(0.75, 1.33), hflip=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """61 samples of random texture (a solid colour would look the same under any crop)."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    from distrain.data.index import write_index

    out = tmp_path_factory.mktemp("ra")
    rng = np.random.default_rng(0)
    n, counts = 0, [16, 16, 16, 13]
    for i, c in enumerate(counts):
        with wds.TarWriter(str(out / f"shard-{i}.tar")) as tw:
            for _ in range(c):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
                tw.write({"__key__": f"s{n:05d}", "png": buf.getvalue(), "cls": str(n % 4).encode()})
                n += 1
    write_index(out, [(f"shard-{i}.tar", c) for i, c in enumerate(counts)], ["0", "1", "2", "3"])
    return resolve_shards(str(out))


def epoch(shards, world, repeats, batch, batches, workers=2):
    """Every rank's batches for epoch 0: {rank: [batch dict, ...]}."""
    out = {}
    for rank in range(world):
        s = ShardStream(shards, rank=rank, world_size=world, batch_size=batch, seed=3, num_classes=4, augment=AUG,
                        batches_per_epoch=batches, shuffle_block=8, repeats=repeats)
        out[rank] = list(DataLoader(s, batch_size=None, num_workers=workers))
    return out


@pytest.mark.parametrize("world,repeats", [(2, 2), (4, 2), (4, 4)])
def test_copies_land_on_distinct_ranks_in_the_same_step(shards, world, repeats):
    batches = 3
    ranks = epoch(shards, world, repeats, batch=4, batches=batches)
    keys = Counter()
    for step in range(batches):
        for group in range(world // repeats):
            members = [ranks[r][step] for r in range(group * repeats, (group + 1) * repeats)]
            assert all(m["key"] == members[0]["key"] for m in members)  # same samples, same step
            for i in range(len(members)):
                for j in range(i + 1, len(members)):
                    assert not (members[i]["image"] == members[j]["image"]).all()  # augmented differently
            keys.update(members[0]["key"] * repeats)
    # world/repeats groups x 3 batches x 4 distinct samples, each exactly `repeats` times.
    assert len(keys) == world // repeats * batches * 4 and set(keys.values()) == {repeats}


@pytest.mark.parametrize("world,repeats", [(1, 2), (2, 4)])
def test_with_fewer_ranks_than_copies_the_batch_holds_them(shards, world, repeats):
    ranks = epoch(shards, world, repeats, batch=4, batches=4)
    per_batch = repeats // world
    total = Counter()
    for rank, batches in ranks.items():
        for b in batches:
            counts = Counter(b["key"])
            assert set(counts.values()) == {per_batch}
            first = b["key"].index(b["key"][0], 1)  # the second copy of the first key
            assert not (b["image"][0] == b["image"][first]).all()
            total.update(b["key"])
    assert set(total.values()) == {repeats}
    assert all(r["key"] == ranks[0][i]["key"] for r_batches in ranks.values() for i, r in enumerate(r_batches))


def test_layout_rules():
    assert repeat_layout(1, 8, 32) == (1, 1)
    assert repeat_layout(4, 8, 32) == (4, 1)
    assert repeat_layout(4, 2, 32) == (2, 2)
    with pytest.raises(DistrainError, match="data.repeats"):
        repeat_layout(2, 3, 32)
    with pytest.raises(DistrainError, match="multiple of the 3 copies"):
        repeat_layout(3, 1, 32)
