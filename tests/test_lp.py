"""Label propagation's pieces: the kNN graph, the normalised affinity, the diffusion against its closed
form, pseudo-labels and weights, the config's refusals, and the stream serving pseudo-labels by key."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import image_bytes
from torch.utils.data import DataLoader

from distrain.config import from_dict
from distrain.data.index import ShardSet, write_index
from distrain.data.resample import Resampling, epoch_samples
from distrain.data.shards import resolve_shards
from distrain.data.stream import PAD_LABEL, UNLABELED, Augment, EvalResize, KeyedTargets, ShardStream
from distrain.errors import DistrainError
from distrain.tricks.lp import diffuse, knn_rows, normalized_affinity, propagate, pseudo_labels


def _unit(n, d, seed=0):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_knn_rows_equal_a_brute_force_search_and_split_by_rows():
    f = _unit(50, 8)
    sims, idx = knn_rows(f, 5, block=7)
    full = f @ f.T
    full.fill_diagonal_(-math.inf)
    expected = full.topk(5, dim=1)
    torch.testing.assert_close(sims, expected.values)
    assert torch.equal(idx, expected.indices)
    assert not (idx == torch.arange(50)[:, None]).any()  # never its own neighbour
    # what N ranks do: each its own rows, concatenated
    parts = [knn_rows(f, 5, lo, hi, block=4) for lo, hi in ((0, 17), (17, 34), (34, 50))]
    assert torch.equal(torch.cat([p[1] for p in parts]), idx)


def test_normalized_affinity_by_hand():
    # 3 samples, 1 neighbour each: 0 -> 1 (0.5), 1 -> 0 (0.5), 2 -> 1 (-0.2: no affinity)
    s = normalized_affinity(np.array([[0.5], [0.5], [-0.2]]), np.array([[1], [0], [1]]), power=3).toarray()
    w = np.zeros((3, 3))
    w[0, 1] = w[1, 0] = 2 * 0.5**3  # W + W^T
    degree = w.sum(1)
    degree[degree == 0] = 1
    d = np.diag(1 / np.sqrt(degree))
    np.testing.assert_allclose(s, d @ w @ d)
    np.testing.assert_allclose(s, s.T)
    assert s[2].sum() == 0  # isolated: a zero row, not a division by zero


def test_diffusion_equals_the_closed_form():
    rng = np.random.default_rng(0)
    n, k, alpha = 30, 4, 0.9
    f = _unit(n, 6)
    sims, idx = knn_rows(f, k)
    s = normalized_affinity(sims.numpy(), idx.numpy())
    labels = np.full(n, UNLABELED)
    labeled = rng.choice(n, 6, replace=False)
    labels[labeled] = [0, 0, 1, 1, 2, 2]
    z = diffuse(s, labels, range(3), alpha, iters=500)
    y = np.zeros((n, 3))
    for c in range(3):
        y[labels == c, c] = 1 / (labels == c).sum()
    closed = np.linalg.solve(np.eye(n) - alpha * s.toarray(), y)
    np.testing.assert_allclose(z, closed, atol=1e-6)
    # a subset of classes (a rank's share) gives those columns
    np.testing.assert_allclose(diffuse(s, labels, [2, 0], alpha, iters=500), closed[:, [2, 0]], atol=1e-6)


def test_pseudo_labels_keep_known_labels_and_weigh_by_certainty():
    z = np.array([[0.9, 0.1], [0.5, 0.5], [0.0, 0.0], [0.2, 0.8], [0.0, 0.3]])
    labels = np.array([1, UNLABELED, UNLABELED, UNLABELED, 0])
    out = pseudo_labels(z, labels)
    assert out.labels.tolist() == [1, 0, 0, 1, 0]  # rows 0 and 4: their own labels, not the argmax
    assert out.weights[0] == out.weights[4] == 1.0
    h = lambda p: -sum(x * math.log(x) for x in p if x > 0)  # noqa: E731
    raw = np.array([1 - h(p) / math.log(2) for p in ([0.9, 0.1], [0.5, 0.5], [0.5, 0.5], [0.2, 0.8], [0, 1])])
    np.testing.assert_allclose(out.weights[1:4], (raw / raw.max())[1:4], rtol=1e-6)
    assert out.weights[1] == out.weights[2] == 0  # a tie and a sample with no score carry no weight
    np.testing.assert_allclose(out.class_weights, [(5 / 2) / 3, (5 / 2) / 2])


def test_two_clusters_are_labelled_from_one_label_each():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4)[:2] * 4
    x = torch.cat([centres[c] + 0.3 * torch.randn(40, 4, generator=g) for c in (0, 1)])
    labels = np.full(80, UNLABELED)
    labels[0], labels[40] = 0, 1
    out = propagate(torch.nn.functional.normalize(x, dim=1), labels, 2, k=10)
    assert out.labels.tolist() == [0] * 40 + [1] * 40
    assert out.weights.min() > 0.5


@pytest.mark.parametrize("settings, key", [
    ({"mix": {"mixup_alpha": 0.2}}, "mix.mixup_alpha"),
    ({"ssl": {"method": "simclr"}}, "ssl.method"),
    ({"distill": {"teacher": "x"}}, "distill.teacher"),
    ({"loss": {"class_weights": "inverse"}}, "loss.class_weights"),
    ({"lp": {"alpha": 1.0}}, "lp.alpha"),
    ({"lp": {"k": 0}}, "lp.k"),
    ({"lp": {"labeled_share": 1.0}}, "lp.labeled_share"),
])
def test_what_label_propagation_cannot_do_is_refused_by_key(settings, key):
    doc = {**settings, "lp": {"enabled": True, **settings.get("lp", {})}}
    with pytest.raises(DistrainError, match=key.replace(".", r"\.")):
        from_dict(doc)


def _partial(out, n=24, labeled=range(0, 24, 3), shards=3, counts=False):
    """``n`` samples over ``shards`` tars; sample j has key s<j>, label j % 4 where labeled, else
    none (its label kept as .withheld.cls); ``counts`` writes the index's labeled class counts and keys."""
    out.mkdir()
    per = n // shards
    for i in range(shards):
        with wds.TarWriter(str(out / f"shard-{i}.tar")) as tw:
            for j in range(i * per, (i + 1) * per):
                label = str(j % 4).encode()
                sample = {"__key__": f"s{j:03d}", "png": image_bytes(j)}
                sample["cls" if j in labeled else "withheld.cls"] = label
                tw.write(sample)
    mine = [[j for j in range(i * per, (i + 1) * per) if j in labeled] for i in range(shards)]
    write_index(out, [(f"shard-{i}.tar", per) for i in range(shards)], list("abcd"),
                [np.bincount([j % 4 for j in js], minlength=4).tolist() for js in mine] if counts else None,
                [[f"s{j:03d}" for j in js] for js in mine] if counts else None)
    return resolve_shards(str(out))


def _train(shards: ShardSet, rank, world, batch, resampling=None):
    total = resampling.total if resampling else shards.total
    return ShardStream(shards, rank=rank, world_size=world, batch_size=batch, seed=3, num_classes=4,
                       augment=Augment(8, (0.5, 1.0), (0.75, 1.33), True), shuffle_block=16,
                       batches_per_epoch=total // (world * batch), require_labels=False, resampling=resampling)


@pytest.mark.parametrize("world, batch, workers", [(1, 8, 0), (2, 4, 2), (3, 2, 3)])
def test_the_stream_serves_pseudo_labels_by_key_whatever_the_layout(tmp_path, world, batch, workers):
    shards = _partial(tmp_path / "s")
    keys = [f"s{j:03d}" for j in range(24)]
    table = KeyedTargets(keys, np.array([(j * 7) % 4 for j in range(24)]), np.arange(24) / 100)
    seen = {}
    for rank in range(world):
        stream = _train(shards, rank, world, batch)
        stream.set_targets(table)
        for b in DataLoader(stream, batch_size=None, num_workers=workers):
            for key, label, weight in zip(b["key"], b["label"].tolist(), b["weight"].tolist()):
                seen[key] = (label, weight)
    assert len(seen) == 24
    for j, key in enumerate(keys):
        if j % 3 == 0:  # labeled: its own label, weight 1
            assert seen[key] == (j % 4, 1.0)
        else:
            assert seen[key][0] == (j * 7) % 4 and seen[key][1] == pytest.approx(j / 100)


def test_an_unknown_key_and_padding_weigh_nothing(tmp_path):
    table = KeyedTargets(["a"], np.array([1]), np.array([0.5]))
    assert table.lookup("u", "x", PAD_LABEL) == (PAD_LABEL, 0.0)
    assert table.lookup("u", "x", 2) == (2, 1.0)
    assert table.lookup("u", "a", UNLABELED) == (1, 0.5)
    # unreadable at the propagation (bad data there), readable now: in the batch, but not trained on
    assert table.lookup("u", "x", UNLABELED) == (0, 0.0)


def test_the_feature_stream_keeps_unlabeled_samples_and_their_withheld_labels(tmp_path):
    shards = _partial(tmp_path / "s")
    got = {}
    for rank in range(2):
        stream = ShardStream(shards, rank=rank, world_size=2, batch_size=5, seed=0, num_classes=4,
                             eval_resize=EvalResize(8, 8), require_labels=False)
        for b in DataLoader(stream, batch_size=None, num_workers=2):
            for key, label, withheld in zip(b["key"], b["label"].tolist(), b["withheld"].tolist()):
                got.setdefault(key, []).append((label, withheld))
    pads = got.pop("")
    assert all(p == (PAD_LABEL, PAD_LABEL) for p in pads) and len(pads) == 2 * 15 - 24
    assert sorted(got) == [f"s{j:03d}" for j in range(24)]
    for j in range(24):
        assert got[f"s{j:03d}"] == [(j % 4, PAD_LABEL) if j % 3 == 0 else (UNLABELED, j % 4)]


# 48 samples over 3 shards of 16, 8 labeled (2 per class, in every shard): 40 unlabeled.
SHARE_LABELED = (0, 1, 2, 3, 25, 26, 27, 44)


@pytest.mark.parametrize("share, factor, total", [(0.5, 5.0, 80), (0.4, 40 * 0.4 / (0.6 * 8), 68)])
def test_a_labeled_share_oversamples_the_labeled_samples_and_reads_the_others_once(tmp_path, share, factor, total):
    shards = _partial(tmp_path / "s", n=48, labeled=SHARE_LABELED, counts=True)
    rs = Resampling.labeled_share(shards, share, seed=3)
    # each class's 2 labeled samples get round(2 x factor) copies; the 40 unlabeled one each
    assert rs.total == total == 40 + 4 * round(2 * factor) == epoch_samples(shards, "none", 0.001, share)
    keys = [f"s{j:03d}" for j in range(48)]
    table = KeyedTargets(keys, np.zeros(48, dtype=np.int64), np.full(48, 0.5))
    for epoch in (0, 1):
        stream = _train(shards, 0, 1, 1, rs)  # batch 1 on 1 rank: every expanded position once
        stream.set_targets(table)
        stream.set_position(epoch)
        seen = Counter()
        for b in DataLoader(stream, batch_size=None, num_workers=2):
            assert not b["bad"]
            key = b["key"][0]
            seen[key] += 1
            j = int(key[1:])
            # a labeled sample keeps its label at weight 1, an unlabeled one takes the table's
            assert (b["label"].item(), b["weight"].item()) == ((j % 4, 1.0) if j in SHARE_LABELED else (0, 0.5))
        assert sum(seen.values()) == total
        assert all(seen[k] == 1 for j, k in enumerate(keys) if j not in SHARE_LABELED)
        assert all(math.floor(factor) <= seen[keys[j]] <= math.ceil(factor) for j in SHARE_LABELED)
        assert sum(seen[keys[j]] for j in SHARE_LABELED) / total == pytest.approx(share, abs=0.03)


@pytest.mark.parametrize("world, batch, workers", [(2, 4, 2), (3, 2, 3)])
def test_a_labeled_share_keeps_equal_batches_and_resumes_exactly(tmp_path, world, batch, workers):
    shards = _partial(tmp_path / "s", n=48, labeled=SHARE_LABELED, counts=True)
    rs = Resampling.labeled_share(shards, 0.4, seed=3)
    table = KeyedTargets([f"s{j:03d}" for j in range(48)], np.ones(48, dtype=np.int64), np.ones(48))
    per_rank = rs.total // (world * batch)
    for rank in range(world):
        stream = _train(shards, rank, world, batch, rs)
        stream.set_targets(table)
        stream.set_position(1)
        full = list(DataLoader(stream, batch_size=None, num_workers=workers))
        assert len(full) == per_rank and all(len(b["key"]) == batch and not b["bad"] for b in full)
        stream.set_position(1, 2)
        resumed = list(DataLoader(stream, batch_size=None, num_workers=workers))
        assert [b["key"] for b in resumed] == [b["key"] for b in full[2:]]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, full[2:]))


def test_a_labeled_share_needs_unlabeled_samples_and_class_counts(tmp_path):
    full = _partial(tmp_path / "full", n=12, labeled=range(12), counts=True)
    with pytest.raises(DistrainError, match=r"lp.labeled_share: .*12 labeled and 0 unlabeled"):
        Resampling.labeled_share(full, 0.5, seed=0)
    bare = _partial(tmp_path / "bare", n=12, labeled=range(0, 12, 2))
    with pytest.raises(DistrainError, match=r"lp.labeled_share: .*no class counts"):
        Resampling.labeled_share(bare, 0.5, seed=0)


def test_the_plan_sizes_the_epoch_a_labeled_share_expands(tmp_path):
    from conftest import checked, distrain

    _partial(tmp_path / "s", n=48, labeled=SHARE_LABELED, counts=True)
    cfg = tmp_path / "lp.yaml"
    cfg.write_text(f"data: {{train: {tmp_path / 's'}, train_samples: 48}}\nbatch: {{per_device: 4}}\n"
                   "lp: {enabled: true, labeled_share: 0.5}\n")
    out = checked(distrain(["plan", str(cfg)], cwd=tmp_path)).stdout
    assert "80 per epoch after lp.labeled_share: 0.5" in out
    assert [line.split()[-1] for line in out.splitlines() if line.startswith("updates per epoch")] == ["20"]
    assert "warning" not in out  # 5 copies x batch 4 fit the default block of 1024 many times over
    # The copies of a labeled sample are adjacent before the block shuffle: in a block of 16, a
    # batch of 4 holds 5 x 4 / 16 = 1.25 copies of each labeled sample it holds. The plan says so.
    out = checked(distrain(["plan", str(cfg), "data.shuffle_block=16"], cwd=tmp_path)).stdout
    assert ("data.shuffle_block 16: a sample oversampled 5x per epoch appears about 1.2 times in each batch of 4"
            in out and "a block of 20 or more" in out)
    doc = json.loads(checked(distrain(["plan", str(cfg), "data.shuffle_block=16", "--json"], cwd=tmp_path)).stdout)
    assert len(doc["warnings"]) == 1 and "a block of 20 or more" in doc["warnings"][0]
