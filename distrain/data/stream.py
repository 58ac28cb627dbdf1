"""The sample stream each rank trains or evaluates on: an IterableDataset of uint8 batches.

The pipeline, run inside each DataLoader worker::

    shard order for (seed, epoch)            -> every rank computes the same list
    cut into rank range, then worker range   -> contiguous samples; equal batches per rank
    tar members grouped by key               -> (key, encoded image, label); skipped samples
                                                are read past, never decoded
    block shuffle (training)                 -> deterministic permutation per block
    decode + crop + flip                     -> uint8 CHW tensors at the target resolution
    stack into a batch                       -> {"image": uint8 (B,3,H,W), "label": int64 (B,),
                                                 "key": [str]}

Workers are dealt batches round-robin by the DataLoader, so worker ``w`` produces the rank's
batches ``w, w + n, w + 2n, ...``; it reads a contiguous range of samples for them. The order is
a function of (seed, epoch, rank, workers) only, and a stream restarted at batch ``k`` yields
exactly the batches ``k, k + 1, ...`` of the uninterrupted one without decoding the skipped ones. Eval ranges
are padded to the same number of batches on every rank with label ``-1`` samples (zeros, never
decoded) that metrics ignore, so every test sample is counted exactly once and every rank runs
the same number of forward passes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator

from distrain.data.decode import eval_sample, train_sample
from distrain.data.index import ShardSet
from distrain.data.shards import Read, reads_for_range, shard_order, split_evenly
from distrain.errors import DistrainError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PAD_LABEL = -1


@dataclass(frozen=True)
class Augment:
    """Per-sample training augmentation settings."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: bool


@dataclass(frozen=True)
class EvalResize:
    """Eval preprocessing: shorter side to ``resize``, centre crop ``crop``."""

    resize: int
    crop: int


def read_samples(reads: list[Read]) -> Iterator[tuple[str, bytes, int]]:
    """(key, encoded image, label) for each sample the reads cover, in order.

    Raises:
        DistrainError: a shard holds fewer samples than its index says, or a sample lacks an
            image or a label (naming the shard and key).
    """
    for r in reads:
        stream = gopen(r.url)
        try:
            files = ({**f, "__url__": r.url} for f in tar_file_iterator(stream))
            n = 0
            for sample in islice(group_by_keys(files), r.skip, r.skip + r.take):
                ext = next((e for e in IMAGE_EXTS if e in sample), None)
                if ext is None or "cls" not in sample:
                    raise DistrainError(f"{r.url}: sample {sample['__key__']!r} has no image or no .cls label")
                yield sample["__key__"], sample[ext], int(sample["cls"])
                n += 1
        finally:
            stream.close()
        if n < r.take:
            raise DistrainError(f"{r.url}: holds fewer samples than its index says ({r.skip + n} < {r.skip + r.take})")


def block_shuffle(items: Iterator, block: int, seed_words: list[int], start: int = 0) -> Iterator:
    """Permute ``items`` within consecutive blocks of ``block``, dropping the first ``start`` outputs.

    Block ``k``'s permutation depends only on ``seed_words`` and ``k``, so a resumed stream skips
    whole blocks unread and re-permutes only the block it restarts in.
    """
    k, drop = divmod(start, block)
    it = islice(items, k * block, None)
    while True:
        chunk = list(islice(it, block))
        if not chunk:
            return
        perm = np.random.default_rng([*seed_words, k]).permutation(len(chunk))
        for i in perm[drop:]:
            yield chunk[i]
        k, drop = k + 1, 0


def _batch_seed(*words: int) -> int:
    return int(np.random.SeedSequence(list(words)).generate_state(1)[0])


class ShardStream(IterableDataset):
    """One rank's view of a shard set for one epoch at a time.

    Args:
        shards: The shard set.
        rank: This process's rank.
        world_size: Number of ranks.
        batch_size: Samples per batch (per device).
        seed: Run seed (shard order, block shuffle and augmentation derive from it).
        augment: Training augmentation; ``None`` makes this an eval stream (fixed order, padded).
        eval_resize: Eval preprocessing (required when ``augment`` is None).
        batches_per_epoch: Training only: batches each rank yields per epoch (from the plan).
        shuffle_block: Training only: samples permuted together inside a worker's stream.
    """

    def __init__(
        self,
        shards: ShardSet,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int,
        augment: Augment | None = None,
        eval_resize: EvalResize | None = None,
        batches_per_epoch: int = 0,
        shuffle_block: int = 1024,
    ):
        super().__init__()
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.batch_size, self.seed = batch_size, seed
        self.augment, self.eval_resize, self.shuffle_block = augment, eval_resize, shuffle_block
        if augment is None:
            per_rank = math.ceil(shards.total / world_size)
            self.batches_per_epoch = math.ceil(per_rank / batch_size)
        else:
            if batches_per_epoch * batch_size * world_size > shards.total:
                raise DistrainError(
                    f"{batches_per_epoch} batches of {batch_size} on {world_size} ranks need more than the "
                    f"{shards.total} samples in the shards"
                )
            self.batches_per_epoch = batches_per_epoch
        self.epoch = 0
        self.skip_batches = 0

    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        """Make the next iteration yield epoch ``epoch`` from its batch ``skip_batches`` on."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def __len__(self) -> int:
        return self.batches_per_epoch - self.skip_batches

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        loader_id, workers = (info.id, info.num_workers) if info else (0, 1)
        # Rank batch i belongs to logical worker i % n. The DataLoader asks its worker 0 first, so
        # after skipping k batches its worker 0 must play logical worker k % n, and so on.
        worker = (loader_id + self.skip_batches) % workers
        b0, b1 = split_evenly(self.batches_per_epoch, workers, worker)
        done = max(0, math.ceil((self.skip_batches - worker) / workers))
        if self.augment is None:
            yield from self._eval_batches(b0, b1, done)
        else:
            yield from self._train_batches(b0, b1, done, worker)

    def _train_batches(self, b0: int, b1: int, done: int, worker: int) -> Iterator[dict]:
        order = shard_order(self.shards, self.seed, self.epoch, shuffle=True)
        start = (self.rank * self.batches_per_epoch + b0) * self.batch_size
        count = (b1 - b0) * self.batch_size
        samples = read_samples(reads_for_range(order, start, count))
        samples = block_shuffle(samples, self.shuffle_block, [self.seed, self.epoch, start], done * self.batch_size)
        a = self.augment
        for j in range(done, b1 - b0):
            chunk = list(islice(samples, self.batch_size))
            rng = random.Random(_batch_seed(self.seed, self.epoch, self.rank, worker, j))
            images = [train_sample(data, a.size, a.scale, a.ratio, a.hflip, rng) for _, data, _ in chunk]
            yield _collate(chunk, images)

    def _eval_batches(self, b0: int, b1: int, done: int) -> Iterator[dict]:
        r0, r1 = split_evenly(self.shards.total, self.world_size, self.rank)
        real = r1 - r0
        lo, hi = min((b0 + done) * self.batch_size, real), min(b1 * self.batch_size, real)
        samples = read_samples(reads_for_range(list(self.shards.shards), r0 + lo, hi - lo))
        e, bs = self.eval_resize, self.batch_size
        for _ in range(b0 + done, b1):
            chunk = list(islice(samples, bs))
            images = [eval_sample(data, e.resize, e.crop) for _, data, _ in chunk]
            pad = bs - len(chunk)
            if pad:
                images += [torch.zeros(3, e.crop, e.crop, dtype=torch.uint8)] * pad
                chunk += [("", b"", PAD_LABEL)] * pad
            yield _collate(chunk, images)


def _collate(chunk: list[tuple[str, bytes, int]], images: list[torch.Tensor]) -> dict:
    return {
        "image": torch.stack(images),
        "label": torch.tensor([label for _, _, label in chunk], dtype=torch.int64),
        "key": [key for key, _, _ in chunk],
    }


def make_loader(stream: ShardStream, workers: int, prefetch: int, pin_memory: bool) -> DataLoader:
    """A DataLoader over already-batched stream output (batching happens in the workers)."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=prefetch if workers else None,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
