"""The sample stream each rank trains or evaluates on: an IterableDataset of uint8 batches.

The pipeline, run inside each DataLoader worker::

    shard order for (seed, epoch)            -> every rank computes the same list
    cut into rank range, then worker range   -> contiguous samples; equal batches per rank
    tar members grouped by key               -> one record per sample position: (key, encoded
                                                image, label), or why the position is bad;
                                                skipped samples are read past, never decoded
    block shuffle (training)                 -> deterministic permutation per block
    decode + crop + flip (+ policy)          -> uint8 CHW tensors at the target resolution
    (+ views: colour augmentation)           -> V such tensors per sample, each its own crop
    stack into a batch                       -> {"image": uint8 (B,3,H,W), "label": int64 (B,),
                                                 "key": [str], "bad": [BadSample]}; a bad
                                                position holds a stand-in sample

Workers are dealt batches round-robin by the DataLoader, so worker ``w`` produces the rank's
batches ``w, w + n, w + 2n, ...``; it reads a contiguous range of samples for them. The order is
a function of (seed, epoch, rank, workers) only, a training batch's augmentation a function of
(seed, epoch, rank, worker, batch) only, and a stream restarted at batch ``k`` yields exactly the
batches ``k, k + 1, ...`` of the uninterrupted one without decoding the skipped ones. Eval ranges
are padded to the same number of batches on every rank with label ``-1`` samples (zeros, never
decoded) that metrics ignore, so every test sample is counted exactly once and every rank runs
the same number of forward passes.

Self-supervised pretraining (``views``): each training sample becomes ``V = n_views`` views, each
cropped and flipped on its own and colour-augmented (:func:`distrain.data.views.ssl_view`), all
drawn in sequence from the batch's generator. The batch's ``"image"`` is then view-major,
uint8 ``(V * B, 3, H, W)``: rows ``v * B + i`` are view ``v`` of sample ``i``, so ``image[v * B:
(v + 1) * B]`` is view ``v`` of the whole batch; ``"label"`` and ``"key"`` keep length ``B``. A bad
position's stand-in is chosen per sample before the layout, so it holds all V views of one sample.
With ``require_labels=False`` a sample without a ``.cls`` member is a good one labelled
:data:`UNLABELED`; an unparsable or out-of-range ``.cls`` is still bad. Such an eval stream's
batches also hold ``"withheld"``: the label a partially labeled shard set kept aside for
measurement (its ``.withheld.cls``; see :mod:`distrain.data.writer`), else -1.

Label propagation (:meth:`ShardStream.set_targets`): the workers give each unlabeled training
sample the pseudo-label that a :class:`KeyedTargets` table holds for its *key* (never its position,
so the rank and worker layout does not matter), and the batch gains ``"weight"``: float32 ``(B,)``,
the pseudo-label's certainty, 1 for a labeled sample and 0 for a padding one.

Bad data never raises and never changes the number or shape of batches, since a rank that
yields one batch fewer hangs the others in their next collective. A missing, truncated or
malformed tar, a shard with fewer samples than its index says, a sample without image or ``.cls``
label, a label outside ``[0, num_classes)`` and an image that does not decode each make their
sample positions bad ones, listed in the batch's ``"bad"`` as (shard url, sample key or "",
reason) so that the training loop applies its policy (skip and count, or fail) on all ranks
alike. Only data errors do: any other error (a bug in a crop or augmentation, a permission
error, a full disk) raises :class:`StreamError`, naming the shard and sample, at once; a transient
read error of a network filesystem or a remote shard (a dropped connection, an HTTP 5xx, a failed
``pipe:`` command) is retried a few times before the rest of its shard is bad.
A bad eval position becomes a label ``-1`` padding sample, so metrics exclude it. A bad training
position holds a copy of a good sample of its batch (cycling through them), or of the worker's
last good sample when the whole batch is bad, or zeros with label ``-1`` when the worker has
produced no good sample yet: a training batch with label ``-1`` is entirely bad. Such all-bad
batches are the one place where a resumed stream can differ from the uninterrupted one, which
had an earlier good sample to copy.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import math
import os
import random
import signal
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import cycle, islice
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from distrain.data.decode import IMAGE_EXTS, DecodeError, eval_sample, make_policy, train_sample
from distrain.data.index import ShardSet
from distrain.data.remote import ShardCache, is_remote, open_shard
from distrain.data.resample import Resampling
from distrain.data.shards import Read, epoch_offset, reads_for_range, repeat_layout, shard_order, split_evenly
from distrain.data.views import ViewAugment, ssl_view
from distrain.errors import DistrainError

PAD_LABEL = -1
"""Label of a padding or all-bad position: losses and metrics ignore it."""
UNLABELED = -2
"""Label of a sample without ``.cls`` in a stream with ``require_labels=False``: a good sample."""


@dataclass(frozen=True)
class Augment:
    """Per-sample training augmentation settings.

    Attributes:
        size: Output side in pixels (RandomResizedCrop target).
        scale: RandomResizedCrop area fraction range.
        ratio: RandomResizedCrop aspect ratio range.
        hflip: Flip horizontally with probability 0.5.
        policy: Policy augmentation after crop + flip: one of ``decode.POLICIES``.
        randaugment_ops: RandAugment's number of ops per image.
        randaugment_magnitude: RandAugment's magnitude.
        resize: > 0 crops as at test time instead (shorter side to ``resize``, centre crop ``size``).
        crop: ``rrc`` (RandomResizedCrop) or ``pad`` (pad-and-crop, the CIFAR crop of He et al. 2016).
        pad: Pixels added on every side before a ``pad`` crop.
        pad_fill: ``zero`` or ``reflect``: what the padding of a ``pad`` crop holds.
    """

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: bool
    policy: str = "none"
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    resize: int = 0
    crop: str = "rrc"
    pad: int = 4
    pad_fill: str = "zero"


@dataclass(frozen=True)
class EvalResize:
    """Eval preprocessing: shorter side to ``resize``, centre crop ``crop``."""

    resize: int
    crop: int


class BadSample(NamedTuple):
    """A sample position of a batch that holds no usable sample.

    A named tuple rather than a plain one because the DataLoader's conversion turns plain tuples
    into lists and keeps named tuples.
    """

    url: str
    key: str
    reason: str


class Sample(NamedTuple):
    """One sample position read from a shard; ``bad`` says why it is unusable, "" when it is not;
    ``withheld`` is an unlabeled sample's label kept aside for measurement, else -1."""

    url: str
    key: str
    data: bytes
    label: int
    bad: str = ""
    withheld: int = PAD_LABEL


class KeyedTargets:
    """Training targets looked up by sample key: a propagation's pseudo-labels and their weights.

    Args:
        keys: Sample keys; ``labels[i]`` and ``weights[i]`` belong to ``keys[i]``.
        labels: (N,) int labels in ``[0, num_classes)``.
        weights: (N,) float weights.
    """

    def __init__(self, keys: list[str], labels: np.ndarray, weights: np.ndarray):
        if not len(keys) == len(labels) == len(weights):
            raise ValueError(f"{len(keys)} keys, {len(labels)} labels and {len(weights)} weights")
        self.row = {k: i for i, k in enumerate(keys)}
        self.labels, self.weights = np.asarray(labels, dtype=np.int64), np.asarray(weights, dtype=np.float32)

    def lookup(self, url: str, key: str, label: int) -> tuple[int, float]:
        """(label, weight) of a training position: an unlabeled sample's from the table, a labeled
        one's own label with weight 1, a padding position's with weight 0.

        An unlabeled sample the table does not know gets weight 0 until the next propagation: it was
        unreadable during the feature pass (a remote read that failed past its retries is bad data
        there), so it has no pseudo-label. Stopping would stop every resume at the same sample.
        """
        if label == PAD_LABEL:
            return label, 0.0
        if label != UNLABELED:
            return label, 1.0
        i = self.row.get(key)
        if i is None:
            return 0, 0.0
        return int(self.labels[i]), float(self.weights[i])


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _checked(url: str, sample: dict, num_classes: int, require_labels: bool = True) -> Sample:
    """The sample a tar's grouped files make, marked bad if they lack an image or a usable label.

    Without ``require_labels`` a sample with no ``.cls`` at all is good, labelled :data:`UNLABELED`.
    """
    key = sample["__key__"]
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        return Sample(url, key, b"", PAD_LABEL, "no image")
    if "cls" not in sample:
        if not require_labels:
            return Sample(url, key, sample[ext], UNLABELED, withheld=_withheld(sample, num_classes))
        return Sample(url, key, b"", PAD_LABEL, "no .cls label")
    try:
        label = int(sample["cls"])
    except ValueError:
        return Sample(url, key, b"", PAD_LABEL, f"unparsable .cls label {sample['cls'][:20]!r}")
    if not 0 <= label < num_classes:
        return Sample(url, key, b"", PAD_LABEL, f"label {label} out of range [0, {num_classes})")
    return Sample(url, key, sample[ext], label)


def _withheld(sample: dict, num_classes: int) -> int:
    """The ``.withheld.cls`` label of an unlabeled sample, or -1 when absent or unusable."""
    try:
        label = int(sample.get("withheld.cls", b"-1"))
    except ValueError:
        return PAD_LABEL
    return label if 0 <= label < num_classes else PAD_LABEL


class StreamError(Exception):
    """An error reading or preparing a sample that is not bad data: a bug, a permission or disk
    problem. It stops the rank with a line naming the shard and sample, the original error chained."""


# Errors of reading a tar that mean its content is missing, truncated or malformed: bad data.
# webdataset raises ValueError for a sample holding two files of the same name.
_TAR_DATA_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, FileNotFoundError, ValueError)
# Read errors that a remote or network filesystem may raise once and not again.
_TRANSIENT_ERRNOS = frozenset(getattr(errno, name) for name in (
    "EIO", "EAGAIN", "ETIMEDOUT", "ECONNRESET", "ECONNABORTED", "ECONNREFUSED", "ENETDOWN", "ENETUNREACH",
    "ENETRESET", "EHOSTDOWN", "EHOSTUNREACH", "ESTALE", "EREMOTEIO", "ENOLINK") if hasattr(errno, name))
READ_TRIES = 4
"""Opens of a shard, the first included, before a transient read error makes its rest bad."""
RETRY_DELAY_S = 0.25
"""Wait before the first reopen of a local shard; it doubles at each further one."""
REMOTE_RETRY_DELAY_S = 1.0
"""The same for a remote shard: an object store that sheds load (S3's 503 SlowDown) needs seconds,
not a fraction of one, and thousands of workers must not all come back at the same instant, so
every wait is also jittered by +-50% (1, 2, 4 s on average: about 7 s before the rest is bad)."""
_jitter = random.Random()  # not the seeded streams' generators: a wait must not change what is drawn


def _transient(exc: Exception) -> bool:
    return isinstance(exc, TimeoutError) or (isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS)


def read_samples(
    reads: list[Read],
    num_classes: int,
    copies: Callable[[str, int, int], int] | None = None,
    require_labels: bool = True,
    cache: ShardCache | None = None,
) -> Iterator[Sample]:
    """One :class:`Sample` for each sample position the reads cover, in order, bad ones included.

    Exactly ``take`` records come out of each read whatever the shard holds, so that the batches
    built from them keep their number and size. Samples lacking an image or a label, or with a
    label outside ``[0, num_classes)``, are marked bad; so is every position past the point where
    a shard stops: a missing, truncated or malformed tar, or one that ends early. A transient read
    error (EIO, a timeout, a reset connection, a stale NFS handle) reopens the shard after a short
    wait, skipping what was already yielded, up to :data:`READ_TRIES` opens in all.

    Args:
        copies: Class-aware resampling (:class:`distrain.data.resample.Resampling`):
            ``copies(url, label, j)`` is how many adjacent positions the ``j``-th sample labelled
            ``label`` in the shard fills (0 drops it); a bad sample fills one. The reads' ``skip``
            and ``take`` then count these positions.
        require_labels: False makes a sample without ``.cls`` a good one labelled :data:`UNLABELED`.
        cache: Where remote shards are kept after their first read (``data.cache_dir``).

    Raises:
        StreamError: any other error, e.g. a permission error: it is not bad data, and is not
            retried.
    """
    for r in reads:
        yield from _read_one(r, num_classes, copies, require_labels, cache)


def _read_one(
    r: Read, num_classes: int, copies: Callable[[str, int, int], int] | None, require_labels: bool,
    cache: ShardCache | None,
) -> Iterator[Sample]:
    n, key = 0, ""  # positions of the read yielded so far, and the last sample's key
    for attempt in range(READ_TRIES):
        seen = 0  # positions of the shard walked in this attempt
        by_label: dict[int, int] = {}  # samples of each label met so far in the shard
        try:
            stream = open_shard(r.url, cache)
            try:
                files = ({**f, "__url__": r.url} for f in tar_file_iterator(stream))
                for sample in group_by_keys(files):
                    k = 1
                    if copies is not None:
                        checked = _checked(r.url, sample, num_classes, require_labels)
                        if not checked.bad:
                            j = by_label.get(checked.label, 0)
                            by_label[checked.label] = j + 1
                            k = copies(r.url, checked.label, j)
                    first, seen = seen, seen + k
                    if seen <= r.skip + n:
                        continue
                    key = sample["__key__"]
                    record = checked if copies is not None else _checked(r.url, sample, num_classes, require_labels)
                    for _ in range(seen - max(first, r.skip + n)):
                        yield record
                        n += 1
                        if n == r.take:
                            break
                    if n == r.take:
                        break
            finally:
                stream.close()
        except Exception as exc:
            if _transient(exc) and attempt + 1 < READ_TRIES:
                if is_remote(r.url):
                    time.sleep(REMOTE_RETRY_DELAY_S * 2**attempt * _jitter.uniform(0.5, 1.5))
                else:
                    time.sleep(RETRY_DELAY_S * 2**attempt)
                continue
            if not (_transient(exc) or isinstance(exc, _TAR_DATA_ERRORS)):
                after = f" after sample {key!r}" if key else ""
                raise StreamError(f"{r.url}: reading the shard failed{after} ({type(exc).__name__}: "
                                  f"{_first_line(exc)}); not bad data, so the rank stops") from exc
            tries = f" ({READ_TRIES} tries)" if _transient(exc) else ""
            why = f"unreadable tar after {seen} samples{tries}: {_first_line(exc)}"
        else:
            why = f"shard ends after {seen} samples, fewer than its index says"
        yield from [Sample(r.url, "", b"", PAD_LABEL, why)] * (r.take - n)
        return


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


def _decode(
    chunk: list[Sample], decode: Callable[[bytes], torch.Tensor | list[torch.Tensor]]
) -> tuple[list[torch.Tensor | list[torch.Tensor] | None], list[BadSample]]:
    """The decoded image of each position (None where bad) and the bad positions' reports."""
    images, bad = [], []
    for s in chunk:
        why = s.bad
        if not why:
            try:
                images.append(decode(s.data))
                continue
            except DecodeError as exc:
                why = f"undecodable image: {exc}"
            except Exception as exc:  # a bug of the crop or augmentation, not of the data
                raise StreamError(f"{s.url}: sample {s.key!r} decoded but its crop or augmentation failed "
                                  f"({type(exc).__name__}: {_first_line(exc)}); not bad data, so the rank stops"
                                  ) from exc
        images.append(None)
        bad.append(BadSample(s.url, s.key, why))
    return images, bad


class ShardStream(IterableDataset):
    """One rank's view of a shard set for one epoch at a time.

    Args:
        shards: The shard set.
        rank: This process's rank.
        world_size: Number of ranks.
        batch_size: Samples per batch (per device).
        seed: Run seed (shard order, block shuffle and augmentation derive from it).
        num_classes: Labels outside ``[0, num_classes)`` make their sample bad.
        augment: Training augmentation; ``None`` makes this an eval stream (fixed order, padded).
        eval_resize: Eval preprocessing (required when ``augment`` is None).
        batches_per_epoch: Training only: batches each rank yields per epoch (from the plan).
        shuffle_block: Training only: samples permuted together inside a worker's stream.
        repeats: Training only: augmented copies of each sample per step (repeated augmentation,
            see :func:`distrain.data.shards.repeat_layout`); an epoch then holds
            ``1 / repeats`` as many distinct samples.
        resampling: Training only: class-aware resampling; each epoch reads its expansion of the
            shards (:class:`distrain.data.resample.Resampling`) instead of the shards themselves.
        views: Training only: self-supervised views' colour augmentation; each sample then yields
            ``n_views`` views and the batch's image is view-major (see the module docstring).
        n_views: Views per sample when ``views`` is set.
        require_labels: False makes a sample without ``.cls`` a good one labelled :data:`UNLABELED`
            (which eval metrics do not ignore: meant for training streams and feature extraction).
    """

    def __init__(
        self,
        shards: ShardSet,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int,
        num_classes: int,
        augment: Augment | None = None,
        eval_resize: EvalResize | None = None,
        batches_per_epoch: int = 0,
        shuffle_block: int = 1024,
        repeats: int = 1,
        resampling: Resampling | None = None,
        views: ViewAugment | None = None,
        n_views: int = 2,
        require_labels: bool = True,
        cache: ShardCache | None = None,
    ):
        super().__init__()
        self.cache = cache
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.batch_size, self.seed, self.num_classes = batch_size, seed, num_classes
        self.augment, self.eval_resize, self.shuffle_block = augment, eval_resize, shuffle_block
        self.resampling, self.views, self.n_views, self.require_labels = resampling, views, n_views, require_labels
        if views is not None and augment is None:
            raise DistrainError("views need a training stream: pass augment too")
        if views is not None and n_views < 1:
            raise DistrainError(f"n_views is {n_views}; it must be at least 1")
        if augment is None:
            per_rank = math.ceil(shards.total / world_size)
            self.batches_per_epoch = math.ceil(per_rank / batch_size)
        else:
            self.rank_copies, self.batch_copies = repeat_layout(repeats, world_size, batch_size)
            unique = batches_per_epoch * batch_size * world_size // repeats
            total = resampling.total if resampling else shards.total
            if unique > total:
                raise DistrainError(
                    f"{batches_per_epoch} batches of {batch_size} on {world_size} ranks need more than the "
                    f"{total} samples in the {'resampled epoch' if resampling else 'shards'}"
                )
            self.batches_per_epoch = batches_per_epoch
        self.epoch = 0
        self.skip_batches = 0
        self.targets: KeyedTargets | None = None

    def set_targets(self, targets: KeyedTargets | None) -> None:
        """Make the next iteration label unlabeled training samples from ``targets``, by key."""
        self.targets = targets

    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        """Make the next iteration yield epoch ``epoch`` from its batch ``skip_batches`` on."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def set_size(self, size: int) -> None:
        """Make the next iteration's training batches ``size`` pixels square (progressive resizing)."""
        self.augment = dataclasses.replace(self.augment, size=size)

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
        shards, copies = self.shards, None
        if self.resampling is not None:
            shards, copies = self.resampling.epoch_shards(self.epoch), self.resampling.copies(self.epoch)
        order = shard_order(shards, self.seed, self.epoch, shuffle=True)
        # Ranks of one repeat group read the same range in the same order; each batch holds
        # `unique` samples, each `batch_copies` times.
        group, unique = self.rank // self.rank_copies, self.batch_size // self.batch_copies
        start = (group * self.batches_per_epoch + b0) * unique
        count = (b1 - b0) * unique
        used = self.world_size // self.rank_copies * self.batches_per_epoch * unique
        offset = epoch_offset(self.seed, self.epoch, shards.total, used)
        samples = read_samples(reads_for_range(order, offset + start, count), self.num_classes, copies,
                               self.require_labels, self.cache)
        samples = block_shuffle(samples, self.shuffle_block, [self.seed, self.epoch, start], done * unique)
        a, views, n_views = self.augment, self.views, self.n_views
        policy = make_policy(a.policy, a.randaugment_ops, a.randaugment_magnitude)
        zeros = torch.zeros(3, a.size, a.size, dtype=torch.uint8)
        last_good = (zeros if views is None else [zeros] * n_views, PAD_LABEL, "")

        def crop(data: bytes, rng: random.Random) -> torch.Tensor:
            return train_sample(data, a.size, a.scale, a.ratio, a.hflip, rng, policy, a.resize, a.crop, a.pad,
                                a.pad_fill)

        for j in range(done, b1 - b0):
            chunk = [s for s in islice(samples, unique) for _ in range(self.batch_copies)]
            words = (self.seed, self.epoch, self.rank, worker, j)
            rng = random.Random(_batch_seed(*words))
            # The policy draws from torch's global CPU generator: seed it per batch (from a seed of
            # its own, not rng's) and restore it afterwards, so that with workers=0 the training
            # process's stream of draws (MixUp, dropout, ...) does not depend on the data. Only the
            # CPU generator is seeded: torch.manual_seed would also reseed the CUDA generators.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(_batch_seed(*words, 1))
                if views is None:
                    images, bad = _decode(chunk, lambda data: crop(data, rng))
                else:
                    images, bad = _decode(
                        chunk, lambda data: [ssl_view(crop(data, rng), rng, views, v) for v in range(n_views)])
            labels, keys = [s.label for s in chunk], [s.key for s in chunk]
            good = [(im, labels[i], keys[i]) for i, im in enumerate(images) if im is not None]
            if good:
                last_good = good[-1]
            fill = cycle(good or [last_good])
            for i, im in enumerate(images):
                if im is None:
                    images[i], labels[i], keys[i] = next(fill)
            weights = None
            if self.targets is not None:
                urls = [s.url for s in chunk]
                labels, weights = map(list, zip(*(self.targets.lookup(u, k, y) for u, k, y in zip(urls, keys, labels))))
            if views is not None:
                images = [views_of[v] for v in range(n_views) for views_of in images]
            yield _collate(images, labels, keys, bad, weights=weights)

    def _eval_batches(self, b0: int, b1: int, done: int) -> Iterator[dict]:
        r0, r1 = split_evenly(self.shards.total, self.world_size, self.rank)
        real = r1 - r0
        lo, hi = min((b0 + done) * self.batch_size, real), min(b1 * self.batch_size, real)
        samples = read_samples(reads_for_range(list(self.shards.shards), r0 + lo, hi - lo), self.num_classes,
                               require_labels=self.require_labels, cache=self.cache)
        e, bs = self.eval_resize, self.batch_size
        pad = (torch.zeros(3, e.crop, e.crop, dtype=torch.uint8), PAD_LABEL, "", PAD_LABEL)
        for _ in range(b0 + done, b1):
            chunk = list(islice(samples, bs))
            images, bad = _decode(chunk, lambda data: eval_sample(data, e.resize, e.crop))
            rows = [pad if im is None else (im, s.label, s.key, s.withheld) for im, s in zip(images, chunk)]
            rows += [pad] * (bs - len(chunk))
            images, labels, keys, withheld = zip(*rows)
            yield _collate(images, labels, keys, bad, withheld=None if self.require_labels else withheld)


def _collate(images: list[torch.Tensor], labels: list[int], keys: list[str], bad: list[BadSample],
             weights: list[float] | None = None, withheld: list[int] | None = None) -> dict:
    # Inside a worker default_collate stacks straight into shared memory, saving the copy that
    # sending the batch to the training process would otherwise make.
    batch = {
        "image": default_collate(images),
        "label": torch.tensor(labels, dtype=torch.int64),
        "key": list(keys),
        "bad": bad,
    }
    if weights is not None:
        batch["weight"] = torch.tensor(weights, dtype=torch.float32)
    if withheld is not None:
        batch["withheld"] = torch.tensor(withheld, dtype=torch.int64)
    return batch


def _ignore_job_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the worker ignores SIGUSR1, and SIGTERM unless its parent sends it.

    SLURM sends these signals to every process of the job step; the training process handles
    them (preemption), whereas a worker they kill would crash its rank. A SIGTERM from the parent
    is the loader's or multiprocessing's shutdown (an exiting process terminates its daemonic
    workers, then joins them), so it still ends the worker, as torch's own worker handler does:
    ignoring it would hang the parent at exit. SIGTERM stays blocked and a thread takes it with
    ``sigwaitinfo`` (Linux), which names the sender.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_parent_sigterm, name="sigterm", daemon=True).start()


def _exit_on_parent_sigterm() -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == os.getppid():
            os._exit(0)  # status 0, as torch's handler: the parent reports a nonzero exit as a crash


def make_loader(stream: ShardStream, workers: int, prefetch: int, pin_memory: bool) -> DataLoader:
    """A DataLoader over already-batched stream output (batching happens in the workers).

    Its workers ignore the job signals that SLURM sends to every process (see ``_ignore_job_signals``).
    """
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=prefetch if workers else None,
        pin_memory=pin_memory,
        persistent_workers=False,
        worker_init_fn=_ignore_job_signals,
    )
