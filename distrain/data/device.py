"""Device side of the data path: uint8 batches become normalised float tensors on the device, prefetched."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


class ToDevice:
    """Move a uint8 batch to the device, then convert and normalise there (4x less copying).

    Args:
        mean: Per-channel mean in [0, 1] units.
        std: Per-channel std in [0, 1] units.
        device: Target device.
        channels_last: Return NHWC-strided tensors (faster convolutions on tensor-core GPUs).
        dtype: Dtype of the returned images: float32, except for a model whose weights are 16-bit
            (DeepSpeed bf16/fp16 trains the module itself in that dtype, without autocast).
    """

    def __init__(self, mean: list[float], std: list[float], device: torch.device, channels_last: bool,
                 dtype: torch.dtype = torch.float32):
        self.device, self.dtype = device, dtype
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normalised images of ``dtype``, int64 labels) on the device."""
        images = batch["image"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        # Change the layout on the uint8 (4x fewer bytes than after); the float ops below keep it.
        images = images.contiguous(memory_format=self.memory_format)
        normalised = (images.float() - self.mean) * self.inv_std
        return (normalised if self.dtype == torch.float32 else normalised.to(self.dtype)), labels


def prefetch_to_device(batches: Iterable[dict], to_device: ToDevice) -> Iterator[tuple[dict, torch.Tensor, torch.Tensor]]:
    """Yield ``(batch, images, labels)`` for each batch, the next one's copy already in flight on CUDA.

    On CUDA the copy and normalisation of batch ``k + 1`` are queued on a side stream as soon as
    batch ``k`` is handed out, so they overlap the compute on batch ``k`` (the loader pins its
    batches, so the copies are truly asynchronous). The compute stream waits for the side stream
    before it touches a batch, and ``record_stream`` keeps the allocator from reusing a batch's
    memory while that stream may still read it. Elsewhere this is ``to_device`` applied in turn.
    """
    if to_device.device.type != "cuda":
        for batch in batches:
            yield batch, *to_device(batch)
        return
    side = torch.cuda.Stream(to_device.device)
    # The side stream reads ``to_device.mean`` and ``inv_std``, computed by kernels queued on the
    # compute stream (maybe still running), and two streams are unordered unless told otherwise:
    # wait once for all the compute stream has queued so far. Per batch only the opposite wait is
    # needed (below), so the copies still overlap the compute.
    side.wait_stream(torch.cuda.current_stream(to_device.device))

    def start(batch: dict) -> tuple[dict, torch.Tensor, torch.Tensor]:
        with torch.cuda.stream(side):
            return batch, *to_device(batch)  # the host batch stays referenced until its copy is used

    it = iter(batches)
    ahead = next((start(b) for b in it), None)
    while ahead is not None:
        current = torch.cuda.current_stream(to_device.device)
        current.wait_stream(side)
        batch, images, labels = ahead
        images.record_stream(current)
        labels.record_stream(current)
        ahead = next((start(b) for b in it), None)
        yield batch, images, labels
