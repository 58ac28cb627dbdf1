"""The device side of the data path on a real GPU: the prefetch overlaps the next batch's copy with
the compute, and its side stream is ordered after the compute stream's earlier work."""

from __future__ import annotations

import statistics

import torch
from gpu_helpers import NEEDS_GPU, gpu_ms, sleep_cycles

from distrain.data.device import ToDevice, prefetch_to_device

pytestmark = NEEDS_GPU

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def pinned_batches(n: int, size: int = 224, batch: int = 128) -> list[dict]:
    """uint8 batches in pinned memory, as the loader hands them out on CUDA."""
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g).pin_memory(),
             "label": torch.arange(batch).pin_memory(), "bad": []} for _ in range(n)]


def test_prefetch_overlaps_the_next_copy_with_the_compute():
    batches = pinned_batches(16)
    to_device = ToDevice(MEAN, STD, torch.device("cuda"), channels_last=True)
    copy_ms = statistics.median(gpu_ms(lambda b=b: to_device(b)) for b in batches)
    cycles = sleep_cycles(copy_ms)  # "compute" as long as one batch's copy and normalisation

    def serial():  # the copy of each batch on the compute stream, then its compute
        for b in batches:
            to_device(b)
            torch.cuda._sleep(cycles)

    def prefetched():
        for _ in prefetch_to_device(batches, to_device):
            torch.cuda._sleep(cycles)

    serial_ms, prefetched_ms = gpu_ms(serial), gpu_ms(prefetched)
    print(f"\n{len(batches)} batches of 19 MB: copy {copy_ms:.2f} ms each; serial {serial_ms:.1f} ms, "
          f"prefetched {prefetched_ms:.1f} ms ({prefetched_ms / serial_ms:.2f}x; full overlap would be "
          f"{(len(batches) + 1) / (2 * len(batches)):.2f}x)")
    # Copies hidden behind compute of equal length take the time towards one half.
    assert prefetched_ms < 0.75 * serial_ms


def test_side_stream_waits_for_what_the_compute_stream_queued_before():
    # ToDevice makes mean and inv_std with kernels on the compute stream. Queued there now: a 200 ms
    # kernel, then a change of both constants that makes the normalisation the identity. A side
    # stream that did not wait for the compute stream would normalise with the old constants.
    batch = pinned_batches(1, size=8, batch=4)[0]
    to_device = ToDevice(MEAN, STD, torch.device("cuda"), channels_last=False)
    torch.cuda.synchronize()
    torch.cuda._sleep(sleep_cycles(200))
    to_device.mean.zero_()
    to_device.inv_std.fill_(1.0)
    [(_, images, _)] = list(prefetch_to_device([batch], to_device))
    assert torch.equal(images.cpu(), batch["image"].float())
