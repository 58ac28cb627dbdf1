"""Policy augmentation in the stream's workers and random erasing on the device."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import image_bytes, write_layout
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from distrain.data.decode import make_policy, train_sample
from distrain.data.shards import resolve_shards
from distrain.data.stream import Augment, ShardStream, _batch_seed
from distrain.errors import DistrainError
from distrain.tricks.erasing import SCALE, random_erasing

POLICIES = ["trivialaugment", "randaugment", "autoaugment"]


def aug(policy: str = "none") -> Augment:
    return Augment(size=8, scale=(0.5, 1.0), ratio=(0.75, 1.33), hflip=True, policy=policy)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return resolve_shards(str(write_layout(tmp_path_factory.mktemp("aug"), [8, 8, 8, 8])))


def stream(shards, augment: Augment, seed: int = 0) -> ShardStream:
    return ShardStream(shards, rank=0, world_size=1, batch_size=4, seed=seed, num_classes=4, augment=augment,
                       batches_per_epoch=8, shuffle_block=6)


def batches(shards, augment: Augment, workers: int = 0, seed: int = 0) -> list[dict]:
    return list(DataLoader(stream(shards, augment, seed), batch_size=None, num_workers=workers))


def same(a: list[dict], b: list[dict]) -> bool:
    return all(x["key"] == y["key"] and torch.equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))


def test_make_policy():
    assert make_policy("none", 2, 9) is None
    assert isinstance(make_policy("trivialaugment", 2, 9), v2.TrivialAugmentWide)
    rand = make_policy("randaugment", 3, 5)
    assert isinstance(rand, v2.RandAugment) and (rand.num_ops, rand.magnitude) == (3, 5)
    auto = make_policy("autoaugment", 2, 9)
    assert isinstance(auto, v2.AutoAugment) and auto.policy == v2.AutoAugmentPolicy.IMAGENET
    assert all(make_policy(p, 2, 9).interpolation == v2.InterpolationMode.BILINEAR for p in POLICIES)
    with pytest.raises(DistrainError, match="unknown augmentation policy"):
        make_policy("mixup", 2, 9)


def test_no_policy_keeps_the_crop_and_flip_output(shards):
    # What the stream produced before policies existed: crop + flip from the batch's random.Random.
    a = aug()
    for j, b in enumerate(batches(shards, a)):
        rng = random.Random(_batch_seed(0, 0, 0, 0, j))
        expected = [train_sample(image_bytes(int(k[1:])), a.size, a.scale, a.ratio, a.hflip, rng) for k in b["key"]]
        assert torch.equal(b["image"], torch.stack(expected))


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_changes_pixels_deterministically(shards, policy):
    plain = batches(shards, aug())
    out = batches(shards, aug(policy))
    assert [b["key"] for b in out] == [b["key"] for b in plain]  # same samples and order, other pixels
    assert any(not torch.equal(x["image"], y["image"]) for x, y in zip(out, plain))
    # As under workers=0, the stream runs in this process: it must leave the generator where it was
    # (iterated directly: a DataLoader draws its workers' base seed from that generator itself).
    # The batches depend on their seeds only, not on the generator's state.
    torch.manual_seed(123)
    state = torch.get_rng_state()
    assert same(list(stream(shards, aug(policy))), out)
    assert torch.equal(torch.get_rng_state(), state)
    assert not same(batches(shards, aug(policy), seed=1), out)


@pytest.mark.parametrize("policy", ["trivialaugment", "none"])
def test_policy_is_deterministic_across_worker_processes(shards, policy):
    assert same(batches(shards, aug(policy), workers=2), batches(shards, aug(policy), workers=2))


def test_policy_resumes_the_same_pixels(shards):
    s = stream(shards, aug("randaugment"))
    full = list(DataLoader(s, batch_size=None, num_workers=2))
    s.set_position(0, 3)
    assert same(list(DataLoader(s, batch_size=None, num_workers=2)), full[3:])


def normalised_batch(b: int = 8, side: int = 32) -> torch.Tensor:
    return torch.rand(b, 3, side, side) + 1  # never 0, so erased pixels are exactly the zeros


def test_erasing_p0_is_identity():
    x = normalised_batch()
    assert torch.equal(random_erasing(x, 0.0), x)


def test_erasing_p1_erases_a_different_box_in_every_image():
    x = normalised_batch()
    before = x.clone()
    out = random_erasing(x, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(x, before)  # the input is not modified
    boxes = []
    for img in out:
        zero = img == 0
        assert (zero == zero[0]).all()  # the same box in every channel
        rows, cols = zero[0].any(1).nonzero().flatten(), zero[0].any(0).nonzero().flatten()
        top, left, h, w = rows[0], cols[0], len(rows), len(cols)
        assert zero[0, top:top + h, left:left + w].all() and zero[0].sum() == h * w  # one full rectangle
        assert h < 32 and w < 32 and h * w <= SCALE[1] * 32 * 32 * 1.2
        boxes.append((int(top), int(left), h, w))
    assert len(set(boxes)) == len(boxes)


def test_erasing_is_deterministic_with_a_seeded_generator():
    x = normalised_batch(16).contiguous(memory_format=torch.channels_last)
    a = random_erasing(x, 0.5, torch.Generator().manual_seed(7))
    b = random_erasing(x, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.is_contiguous(memory_format=torch.channels_last)
    erased = (a == 0).flatten(1).any(1)
    assert 0 < erased.sum() < 16  # per-image decisions
    assert not torch.equal(random_erasing(x, 0.5, torch.Generator().manual_seed(8)), a)
