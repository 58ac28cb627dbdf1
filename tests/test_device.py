"""The device side of the data path: normalisation on the device and the prefetch of the next batch."""

from __future__ import annotations

import pytest
import torch
from conftest import checked, distrain
from safetensors.torch import load_file
from test_train import recipe

from distrain.data.device import ToDevice, prefetch_to_device

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def batches(n: int, size: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=g),
             "label": torch.arange(4) + 10 * i, "key": [f"b{i}s{j}" for j in range(4)], "bad": []} for i in range(n)]


def expected(batch: dict, device: torch.device) -> torch.Tensor:
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return ((batch["image"].float() / 255 - mean) / std).to(device)


@pytest.mark.parametrize("channels_last", [False, True])
def test_to_device_normalises_in_the_requested_layout(channels_last):
    batch = batches(1)[0]
    images, labels = ToDevice(MEAN, STD, torch.device("cpu"), channels_last)(batch)
    assert images.dtype == torch.float32 and torch.allclose(images, expected(batch, images.device), atol=1e-5)
    assert images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.equal(labels, batch["label"])


def pulled(source: list[dict], log: list[int]):
    for i, b in enumerate(source):
        log.append(i)
        yield b


def check_prefetch(device: torch.device, ahead: int) -> None:
    source, log = batches(5), []
    to_device = ToDevice(MEAN, STD, device, channels_last=False)
    seen = 0
    for i, (batch, images, labels) in enumerate(prefetch_to_device(pulled(source, log), to_device)):
        # In order, each batch with its own tensors, the loader read at most `ahead` batches ahead.
        assert batch is source[i] and len(log) <= i + 1 + ahead
        assert images.device.type == device.type
        assert torch.allclose(images, expected(batch, device), atol=1e-5)
        assert torch.equal(labels.cpu(), batch["label"])
        images.mul_(0)  # the consumer may write into its batch; the next one must not be affected
        seen += 1
    assert seen == len(source)


def test_prefetch_on_cpu_is_to_device_in_turn():
    check_prefetch(torch.device("cpu"), ahead=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the side-stream prefetch runs on CUDA only")
def test_prefetch_on_cuda_overlaps_one_batch():
    check_prefetch(torch.device("cuda"), ahead=1)


def test_prefetch_of_an_empty_loader():
    assert list(prefetch_to_device([], ToDevice(MEAN, STD, torch.device("cpu"), False))) == []


def test_a_channels_last_run_trains_and_exports(tmp_path, digits):
    # channels_last weights keep their strides in the export's copies; safetensors refused them.
    cfg = recipe(tmp_path, digits, data={"eval": ""}, model={"channels_last": True},
                 train={"max_updates": 2}, logging={"wandb": False})
    checked(distrain(["train", cfg], cwd=tmp_path))
    weights = load_file(tmp_path / "run" / "model.safetensors")
    assert weights["conv1.weight"].is_contiguous()
