"""Self-supervised views: view-major batches of V crops + colour augmentations per sample, drawn from
the batch's generator alone (determinism, exact resume), bad positions holding V views, unlabeled shards."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from distrain.data.decode import eval_sample, train_sample
from distrain.data.index import write_index
from distrain.data.shards import resolve_shards
from distrain.data.stream import PAD_LABEL, UNLABELED, Augment, ShardStream, _batch_seed
from distrain.data.views import ViewAugment, ssl_view
from distrain.errors import DistrainError

CLASSES = 4
SIZE = 8
BATCH = 4
AUG = Augment(size=SIZE, scale=(0.3, 1.0), ratio=(0.75, 1.33), hflip=True)
VIEWS = ViewAugment(strength=0.5, blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2))
# No colour change, and crops of the whole image: every view is the image resized, as eval decodes it.
PLAIN_AUG = Augment(size=SIZE, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False)
PLAIN_VIEWS = ViewAugment(jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0,), solarize_p=(0.0,))


def textured(seed: int, side: int = 16) -> bytes:
    """A PNG of noise, so that two crops of it differ."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def write_shards(out, sizes: list[int], files=None) -> tuple[object, dict[str, bytes]]:
    """Shards of ``sizes`` samples keyed s00000, s00001, ...; sample ``j`` holds ``files(j)`` (default:
    a textured PNG and label ``j % CLASSES``). Returns the shard set and each key's image bytes."""
    out.mkdir(parents=True, exist_ok=True)
    images, n = {}, 0
    for i, size in enumerate(sizes):
        with wds.TarWriter(str(out / f"shard-{i:02d}.tar")) as tw:
            for j in range(n, n + size):
                sample = files(j) if files else {"png": textured(j), "cls": str(j % CLASSES).encode()}
                tw.write({"__key__": f"s{j:05d}", **sample})
                images[f"s{j:05d}"] = sample.get("png", b"")
        n += size
    write_index(out, [(f"shard-{i:02d}.tar", s) for i, s in enumerate(sizes)], [str(c) for c in range(CLASSES)])
    return resolve_shards(str(out)), images


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("views"), [13, 11])


def make(shards, augment=AUG, views=VIEWS, n_views=2, batches=5, seed=0, **kwargs):
    return ShardStream(shards, rank=0, world_size=1, batch_size=BATCH, seed=seed, num_classes=CLASSES,
                       augment=augment, batches_per_epoch=batches, shuffle_block=8, views=views, n_views=n_views,
                       **kwargs)


def batches_of(stream, epoch=0, skip=0, workers=0) -> list[dict]:
    stream.set_position(epoch, skip)
    return list(DataLoader(stream, batch_size=None, num_workers=workers))


@pytest.mark.parametrize("n_views", [2, 3])
def test_batches_are_view_major_with_every_view_of_its_own_sample(shards, n_views):
    shard_set, images = shards
    for b in batches_of(make(shard_set, PLAIN_AUG, PLAIN_VIEWS, n_views)):
        assert b["image"].shape == (n_views * BATCH, 3, SIZE, SIZE) and b["image"].dtype == torch.uint8
        assert len(b["label"]) == len(b["key"]) == BATCH and not b["bad"]
        for i, key in enumerate(b["key"]):
            expected = eval_sample(images[key], SIZE, SIZE)
            for v in range(n_views):
                assert torch.equal(b["image"][v * BATCH + i], expected), (key, v)


def test_each_view_is_its_own_crop_and_colour_drawn_in_turn_from_the_batch_generator(shards):
    shard_set, images = shards
    for j, b in enumerate(batches_of(make(shard_set))):
        rng = random.Random(_batch_seed(0, 0, 0, 0, j))
        for i, key in enumerate(b["key"]):
            for v in range(2):
                crop = train_sample(images[key], SIZE, AUG.scale, AUG.ratio, AUG.hflip, rng)
                assert torch.equal(b["image"][v * BATCH + i], ssl_view(crop, rng, VIEWS, v)), (j, key, v)


def test_the_views_of_a_sample_differ(shards):
    for b in batches_of(make(shards[0])):
        for i in range(BATCH):
            assert not torch.equal(b["image"][i], b["image"][BATCH + i])


def test_views_are_deterministic_and_change_with_the_epoch(shards):
    first, again = batches_of(make(shards[0])), batches_of(make(shards[0]))
    assert all(torch.equal(a["image"], b["image"]) and a["key"] == b["key"] for a, b in zip(first, again))
    next_epoch = batches_of(make(shards[0]), epoch=1)
    assert not any(torch.equal(a["image"], b["image"]) for a, b in zip(first, next_epoch))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_yields_the_same_views(shards, workers):
    full = batches_of(make(shards[0]), epoch=1, workers=workers)
    resumed = batches_of(make(shards[0]), epoch=1, skip=3, workers=workers)
    assert len(resumed) == len(full) - 3
    for a, b in zip(full[3:], resumed):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_a_bad_position_holds_all_views_of_its_stand_in(tmp_path):
    def files(j):
        return {"png": b"\x89PNG garbage" if j in (1, 9) else textured(j), "cls": str(j % CLASSES).encode()}

    shard_set, _ = write_shards(tmp_path / "bad", [12], files)
    batches = batches_of(make(shard_set, batches=3))
    assert sorted(r.key for b in batches for r in b["bad"]) == ["s00001", "s00009"]
    for b in batches:
        assert b["image"].shape == (2 * BATCH, 3, SIZE, SIZE) and len(b["key"]) == BATCH
        assert not {r.key for r in b["bad"]} & set(b["key"])  # stand-ins are good samples of the batch
        for i, key in enumerate(b["key"]):
            twin = b["key"].index(key)  # the position a stand-in copies, or the sample itself
            assert torch.equal(b["image"][i], b["image"][twin]) and torch.equal(b["image"][BATCH + i],
                                                                                  b["image"][BATCH + twin])


def test_an_all_bad_first_batch_is_zeros_in_every_view(tmp_path):
    shard_set, _ = write_shards(tmp_path / "bad", [8], lambda j: {"png": textured(j), "cls": b"9"})
    for b in batches_of(make(shard_set, batches=2)):
        assert b["image"].shape == (2 * BATCH, 3, SIZE, SIZE) and not b["image"].any()
        assert (b["label"] == PAD_LABEL).all() and len(b["bad"]) == BATCH


def unlabeled_files(j: int) -> dict[str, bytes]:
    """Samples without .cls, but for s00005 (label 1), s00006 (out of range) and s00007 (unparsable)."""
    return {"png": textured(j), **{5: {"cls": b"1"}, 6: {"cls": b"7"}, 7: {"cls": b"x"}}.get(j, {})}


def test_unlabeled_samples_are_good_without_required_labels(tmp_path):
    shard_set, _ = write_shards(tmp_path / "unlabeled", [10, 10], unlabeled_files)
    batches = batches_of(make(shard_set, require_labels=False))
    labels = {key: int(label) for b in batches for key, label in zip(b["key"], b["label"])}
    bad = {r.key: r.reason for b in batches for r in b["bad"]}
    assert bad == {"s00006": "label 7 out of range [0, 4)", "s00007": "unparsable .cls label b'x'"}
    assert labels["s00005"] == 1
    assert {v for k, v in labels.items() if k != "s00005"} == {UNLABELED}
    assert len(labels) == 18  # every good sample, once (5 batches of 4, 2 stand-ins)


def test_unlabeled_samples_are_bad_by_default(tmp_path):
    shard_set, _ = write_shards(tmp_path / "unlabeled", [10, 10], unlabeled_files)
    for views in (None, VIEWS):
        batches = batches_of(make(shard_set, views=views))
        reasons = [r.reason for b in batches for r in b["bad"]]
        assert reasons.count("no .cls label") == 17 and len(reasons) == 19
        assert {int(x) for b in batches for x in b["label"]} <= {1, PAD_LABEL}


def test_views_need_a_training_stream(shards):
    with pytest.raises(DistrainError, match="training stream"):
        ShardStream(shards[0], rank=0, world_size=1, batch_size=BATCH, seed=0, num_classes=CLASSES, views=VIEWS)
    with pytest.raises(DistrainError, match="n_views"):
        make(shards[0], n_views=0)


def test_view_settings_are_checked():
    with pytest.raises(DistrainError, match="blur_p"):
        ViewAugment(blur_p=())
    with pytest.raises(DistrainError, match="solarize_p"):
        ViewAugment(solarize_p=(0.0, 1.5))
    with pytest.raises(DistrainError, match="strength"):
        ViewAugment(strength=3.0)


IMG = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 32, 32), dtype=np.uint8))
EVERYTHING = ViewAugment(jitter_p=1.0, grayscale_p=0.5, blur_p=(1.0,), solarize_p=(0.5,))


def test_colour_ops_draw_from_the_given_generator_alone():
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    outs = [ssl_view(IMG, random.Random(seed), EVERYTHING, 0) for seed in (0, 0, 1)]
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state()[1:3], np_state[1:3]))
    assert random.getstate() == py_state
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert outs[0].dtype == torch.uint8 and outs[0].shape == IMG.shape


def test_grayscale_makes_equal_channels():
    for seed in range(5):
        out = ssl_view(IMG, random.Random(seed), ViewAugment(grayscale_p=1.0, blur_p=(1.0,), solarize_p=(1.0,)), 0)
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_solarize_inverts_pixels_from_128():
    out = ssl_view(IMG, random.Random(0), ViewAugment(jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0,),
                                                      solarize_p=(0.0, 1.0)), 1)
    assert torch.equal(out, TF.solarize(IMG, 128))
    assert torch.equal(out, torch.where(IMG >= 128, 255 - IMG, IMG))
    assert torch.equal(ssl_view(IMG, random.Random(0), PLAIN_VIEWS, 0), IMG)


def test_blur_smooths_and_jitter_changes_colours():
    rng = random.Random(0)
    blurred = ssl_view(IMG, rng, ViewAugment(jitter_p=0.0, grayscale_p=0.0, blur_p=(1.0,)), 0)
    assert blurred.float().std() < IMG.float().std() * 0.9
    jittered = ssl_view(IMG, rng, ViewAugment(jitter_p=1.0, grayscale_p=0.0, blur_p=(0.0,)), 0)
    assert not torch.equal(jittered, IMG)
