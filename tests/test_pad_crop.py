"""The standard CIFAR crop (He et al. 2016): pad, then a random crop of the training size."""

from __future__ import annotations

import io
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from distrain.config import from_dict
from distrain.data.decode import pad_crop, pad_crop_offsets, train_sample
from distrain.data.index import write_index
from distrain.data.shards import resolve_shards
from distrain.data.stream import Augment, ShardStream, _batch_seed
from distrain.engine.build import DataSets, train_stream
from distrain.errors import DistrainError
from distrain.plan import make_plan

TV_MODE = {"zero": "constant", "reflect": "reflect"}


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("fill", ["zero", "reflect"])
@pytest.mark.parametrize("shape", [(32, 32), (30, 36)])
def test_pad_crop_equals_torchvision_random_crop(fill, shape):
    pixels = noise(*shape)
    image = torch.from_numpy(pixels).permute(2, 0, 1)
    tv = v2.RandomCrop(28, padding=4, padding_mode=TV_MODE[fill])
    offsets = set()
    for s in range(40):
        torch.manual_seed(s)
        params = tv.make_params([image])
        offsets.add((params["left"], params["top"]))
        assert torch.equal(pad_crop(pixels, params["left"], params["top"], 28, 4, fill), tv.transform(image, params))
    assert len(offsets) > 20  # many different windows, padding on every side among them


def test_offsets_cover_every_window_and_no_more():
    rng = random.Random(0)
    lefts, tops = zip(*(pad_crop_offsets(32, 30, 32, 4, rng) for _ in range(3000)))
    assert set(lefts) == set(range(9))  # 32 + 2*4 - 32
    assert set(tops) == set(range(7))  # 30 + 2*4 - 32


def test_zero_fill_is_black_and_reflect_mirrors():
    pixels = noise(32, 32)
    zero = pad_crop(pixels, 0, 0, 32, 4, "zero")  # the top-left window: 4 rows and columns of padding
    assert zero[:, :4].eq(0).all() and zero[:, :, :4].eq(0).all()
    assert torch.equal(zero[:, 4:, 4:], torch.from_numpy(pixels[:28, :28]).permute(2, 0, 1))
    reflect = pad_crop(pixels, 0, 0, 32, 4, "reflect")
    # Row -k mirrors row k (the edge row is not repeated), as np.pad(mode="reflect").
    expected = np.pad(pixels, ((4, 4), (4, 4), (0, 0)), mode="reflect")[:32, :32]
    assert torch.equal(reflect, torch.from_numpy(expected).permute(2, 0, 1))
    centre = pad_crop(pixels, 4, 4, 32, 4, "zero")
    assert torch.equal(centre, torch.from_numpy(pixels).permute(2, 0, 1))


@pytest.mark.parametrize("fill", ["zero", "reflect"])
def test_train_sample_pad_crop_draws_from_the_batch_rng(fill):
    pixels = noise(32, 32, seed=1)
    data = png(pixels)
    out = train_sample(data, 32, (0.08, 1.0), (0.75, 1.33), True, random.Random(7), crop="pad", pad=4, pad_fill=fill)
    rng = random.Random(7)
    left, top = pad_crop_offsets(32, 32, 32, 4, rng)
    expected = pad_crop(pixels, left, top, 32, 4, fill)
    assert torch.equal(out, expected.flip(-1) if rng.random() < 0.5 else expected)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    # A function of the rng's seed alone; another seed moves the window.
    assert all(torch.equal(out, train_sample(data, 32, (0.08, 1.0), (0.75, 1.33), True, random.Random(7),
                                             crop="pad", pad=4, pad_fill=fill)) for _ in range(3))
    others = [train_sample(data, 32, (0.08, 1.0), (0.75, 1.33), False, random.Random(s), crop="pad", pad_fill=fill)
              for s in range(8)]
    assert len({o.numpy().tobytes() for o in others}) > 4


def test_train_sample_pad_crop_resizes_the_shorter_side_first():
    # A 48 x 64 image at size 32 is first 32 x 43 (as eval's shorter-side resize), then padded and cropped.
    out = train_sample(png(noise(48, 64)), 32, (0.08, 1.0), (0.75, 1.33), False, random.Random(0), crop="pad")
    assert out.shape == (3, 32, 32)
    flat = np.full((48, 64, 3), 77, np.uint8)
    out = train_sample(png(flat), 32, (0.08, 1.0), (0.75, 1.33), False, random.Random(0), crop="pad", pad=0)
    assert out.eq(77).all()  # no padding: every pixel is the image's


def test_config_keys_and_validation():
    data = from_dict({}).data
    assert (data.crop, data.pad, data.pad_fill) == ("rrc", 4, "zero")  # RandomResizedCrop stays the default
    cfg = from_dict({"data": {"crop": "pad", "pad": 4, "pad_fill": "reflect", "train_crop": 32}}).data
    assert (cfg.crop, cfg.pad, cfg.pad_fill) == ("pad", 4, "reflect")
    from_dict({"data": {"crop": "pad", "pad": 40, "pad_fill": "zero", "train_crop": 32}})  # zero fill: any pad
    for data, key in [({"crop": "center"}, "data.crop"), ({"pad_fill": "mirror"}, "data.pad_fill"),
                      ({"pad": -1}, "data.pad"), ({"pad": "four"}, "data.pad"),
                      ({"crop": "pad", "pad_fill": "reflect", "pad": 32, "train_crop": 32}, "data.pad")]:
        with pytest.raises(DistrainError, match=key.replace(".", r"\.")):
            from_dict({"data": data})
    # Progressive resizing starts smaller than train_crop: a reflection must fit that size too.
    with pytest.raises(DistrainError, match=r"data\.pad"):
        from_dict({"data": {"crop": "pad", "pad_fill": "reflect", "pad": 20, "train_crop": 32},
                   "progressive": {"start_size": 16, "end_epoch": 1}, "schedule": {"epochs": 2}})


@pytest.fixture(scope="module")
def noise_shards(tmp_path_factory):
    """24 random-noise 32 x 32 PNGs (key n, label n % 4) in 3 shards: the crop's position shows in the pixels."""
    import webdataset as wds

    out = tmp_path_factory.mktemp("pad")
    for i in range(3):
        with wds.TarWriter(str(out / f"shard-{i}.tar")) as tw:
            for n in range(8 * i, 8 * i + 8):
                tw.write({"__key__": f"s{n:05d}", "png": png(noise(32, 32, n)), "cls": str(n % 4).encode()})
    write_index(out, [(f"shard-{i}.tar", 8) for i in range(3)], ["0", "1", "2", "3"])
    return out


@pytest.mark.parametrize("fill", ["zero", "reflect"])
def test_stream_batches_are_pad_crops_of_the_training_size(noise_shards, fill):
    cfg = from_dict({"data": {"train": str(noise_shards), "crop": "pad", "pad": 4, "pad_fill": fill,
                              "train_crop": 32, "workers": 0, "shuffle_block": 8}, "batch": {"per_device": 6}})
    shards = resolve_shards(cfg.data.train)
    plan = make_plan(cfg, 1, shards.total)
    stream = train_stream(cfg, DataSets(shards, None, 4), plan, SimpleNamespace(process_index=0, num_processes=1))
    assert (stream.augment.crop, stream.augment.pad, stream.augment.pad_fill) == ("pad", 4, fill)
    batches = list(DataLoader(stream, batch_size=None, num_workers=0))
    assert len(batches) == 4
    a = stream.augment
    for j, b in enumerate(batches):
        assert b["image"].shape == (6, 3, 32, 32) and b["image"].dtype == torch.uint8
        rng = random.Random(_batch_seed(0, 0, 0, 0, j))  # the batch's generator: (seed, epoch, rank, worker, j)
        expected = [train_sample(png(noise(32, 32, int(k[1:]))), 32, a.scale, a.ratio, True, rng, None, 0, "pad", 4,
                                 fill) for k in b["key"]]
        assert torch.equal(b["image"], torch.stack(expected))
    # Progressive resizing sets another size: the windows follow it.
    stream.set_size(24)
    assert next(iter(stream))["image"].shape == (6, 3, 24, 24)


def test_augment_defaults_keep_random_resized_crop(noise_shards):
    a = Augment(size=16, scale=(0.5, 1.0), ratio=(0.75, 1.33), hflip=False)
    assert a.crop == "rrc"
    s = ShardStream(resolve_shards(str(noise_shards)), rank=0, world_size=1, batch_size=4, seed=0, num_classes=4,
                    augment=a, batches_per_epoch=2)
    b = next(iter(s))
    rng = random.Random(_batch_seed(0, 0, 0, 0, 0))
    expected = [train_sample(png(noise(32, 32, int(k[1:]))), 16, a.scale, a.ratio, False, rng) for k in b["key"]]
    assert torch.equal(b["image"], torch.stack(expected))
