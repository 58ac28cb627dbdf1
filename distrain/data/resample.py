"""Class-aware resampling of a streamed training epoch that keeps equal batches on every rank.

``WeightedRandomSampler`` needs a map-style dataset and has no distributed form; on streamed shards
the usual advice is to split shards by class and mix streams by hand. Here each epoch is a fixed
expansion of the shard set: every sample is read once and yielded as ``k >= 0`` adjacent copies,
where ``k`` is the floor or the ceiling of its class's factor ``r_c``:

- class ``c`` gets exactly ``T_c = round(n_c x r_c)`` copies per epoch: each of its ``n_c`` samples
  ``floor(r_c)``, plus one more for ``T_c - n_c x floor(r_c)`` of them chosen by a permutation of
  the class drawn from (seed, epoch, class), so which samples get the extra copy (or, for a factor
  below 1, which samples are kept at all) changes every epoch;
- the epoch's length, the sum of the ``T_c``, is the same every epoch and known from the index's
  class counts alone, so the plan sizes epochs and schedules before anything is read;
- a shard's expanded size is known for each epoch, so the stream cuts the expanded sequence into
  equal rank and worker ranges exactly as it cuts the plain one (:mod:`distrain.data.shards`), and
  a stream resumed mid-epoch re-derives the same expansion;
- which of its class's samples a sample is, is its position among the samples of that label in its
  shard (the index's per-shard class counts give each shard's offset in the class): no per-sample
  list is stored, and every rank reading any part of a shard derives the same positions from its
  content.

The same expansion serves label propagation's labeled share (``lp.labeled_share``): every labeled
sample gets one factor and every unlabeled one a single copy.

The copies of a sample sit next to each other before the stream's block shuffle, so they spread over
the ``data.shuffle_block`` samples around them rather than over the whole epoch: the usual
streaming trade-off, which also keeps every sample read once per epoch whatever its factor.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from distrain.data.index import Shard, ShardSet
from distrain.errors import DistrainError

KINDS = ("none", "class_balanced", "sqrt", "repeat_factor")
# A seed word of its own ("resample" in ASCII), so these draws are none of the stream's others.
_RESAMPLE_WORD = 0x726573616D706C65


def class_factors(counts: np.ndarray, kind: str, threshold: float = 0.001) -> np.ndarray:
    """Copies per epoch of each sample of each class, on average (the factor ``r_c``).

    Args:
        counts: Samples per class in the training set.
        kind: ``class_balanced`` (every class ``N / C`` samples per epoch, ``C`` counting the
            classes present), ``sqrt`` (class ``c`` gets ``N sqrt(n_c) / sum sqrt(n)``),
            ``repeat_factor`` (``max(1, sqrt(t / f_c))``, ``f_c = n_c / N``) or ``none`` (1).
        threshold: ``t`` of ``repeat_factor``.

    Returns:
        float64 factors, 0 for classes without samples.
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    n = np.where(present, counts, 1.0)
    total = counts.sum()
    if kind == "none":
        factors = np.ones_like(n)
    elif kind == "class_balanced":
        factors = total / present.sum() / n
    elif kind == "sqrt":
        factors = total * np.sqrt(n) / np.sqrt(counts).sum() / n
    elif kind == "repeat_factor":
        factors = np.maximum(1.0, np.sqrt(threshold / (n / total)))
    else:
        raise ValueError(f"unknown resampling {kind!r}; expected one of {KINDS}")
    return np.where(present, factors, 0.0)


def class_totals(counts: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Copies of each class per epoch: ``round(n_c x r_c)`` (int64)."""
    return np.rint(np.asarray(counts, dtype=np.float64) * factors).astype(np.int64)


class Resampling:
    """The per-epoch expansion of a shard set: each shard's expanded size and each sample's copies.

    Build it with :meth:`by_class` (``data.resample``) or :meth:`labeled_share`
    (``lp.labeled_share``). Samples the index's class counts do not cover (the unlabeled samples of
    a partially labeled set) get one copy each.

    Args:
        shards: The training shard set, with class counts in its index.
        factors: Copies per epoch of each sample of each label, on average (``r_c``).
        seed: The run's seed.
    """

    def __init__(self, shards: ShardSet, factors: np.ndarray, seed: int):
        self.shards, self.seed = shards, seed
        self.counts = np.asarray(shards.class_counts, dtype=np.int64)
        self.factors = np.asarray(factors, dtype=np.float64)
        self.totals = class_totals(self.counts, self.factors)
        self.base = np.floor_divide(self.totals, np.maximum(self.counts, 1))
        self.extra = self.totals - self.base * self.counts
        per_shard = np.asarray([s.class_counts for s in shards.shards], dtype=np.int64)
        # Where each shard's samples of each class start among that class's samples.
        self.offsets = np.cumsum(per_shard, axis=0) - per_shard
        self.per_shard = per_shard
        self.uncounted = np.asarray([s.samples for s in shards.shards], dtype=np.int64) - per_shard.sum(axis=1)
        self._epoch: int | None = None
        self._extra_mask: list[np.ndarray] = []

    @classmethod
    def by_class(cls, shards: ShardSet, kind: str, threshold: float, seed: int) -> Resampling:
        """``data.resample``: the factors of :func:`class_factors`.

        Raises:
            DistrainError: the shard index holds no class counts.
        """
        return cls(shards, class_factors(_counts(shards, "data.resample"), kind, threshold), seed)

    @classmethod
    def labeled_share(cls, shards: ShardSet, share: float, seed: int) -> Resampling:
        """``lp.labeled_share``: every labeled sample gets the same factor, which makes ``share`` of
        each epoch labeled samples; every unlabeled sample is read once.

        The reference code of label propagation fills half of each batch with labeled samples
        (a second sampler over them); on streamed shards the labeled ones are oversampled instead,
        so the share holds per epoch and, within ``data.shuffle_block``, in each batch on average.

        Raises:
            DistrainError: no class counts in the index, or no unlabeled (or labeled) sample.
        """
        counts = _counts(shards, "lp.labeled_share")
        labeled = int(counts.sum())
        unlabeled = shards.total - labeled
        if unlabeled <= 0 or labeled <= 0:
            raise DistrainError(f"lp.labeled_share: {shards.shards[0].url}: its shard set has {labeled} labeled and "
                                f"{unlabeled} unlabeled samples; the share needs both")
        factor = share * unlabeled / ((1 - share) * labeled)
        return cls(shards, np.where(counts > 0, factor, 0.0), seed)

    @property
    def max_copies(self) -> int:
        """The most copies any sample gets in an epoch."""
        return int(max((b + (e > 0) for b, e in zip(self.base, self.extra)), default=1))

    def crowding(self, shuffle_block: int, batch: int) -> str:
        """A warning when a batch would hold several copies of one oversampled sample, else "".

        The copies of a sample are adjacent before the block shuffle (module docstring), so a batch
        drawn from a block holds about ``copies x batch / shuffle_block`` of each sample in it: from
        1 on, the labeled half of a label-propagation batch (or a rare class's share) is made of
        fewer distinct images than it has places.
        """
        copies = self.max_copies
        if copies * batch <= shuffle_block:
            return ""
        return (f"data.shuffle_block {shuffle_block}: a sample oversampled {copies}x per epoch appears about "
                f"{copies * batch / shuffle_block:.1f} times in each batch of {batch} that holds it; a block of "
                f"{copies * batch} or more spreads its copies over distinct batches (it holds that many encoded "
                "samples in each worker's memory)")

    @property
    def total(self) -> int:
        """Samples in every expanded epoch."""
        return int(self.totals.sum() + self.uncounted.sum())

    def class_frequencies(self) -> np.ndarray:
        """Samples of each class per expanded epoch (what the model sees: the prior it learns)."""
        return self.totals.copy()

    def _masks(self, epoch: int) -> list[np.ndarray]:
        """Per class, which of its samples get the extra copy this epoch."""
        if self._epoch != epoch:
            masks = []
            for c, (n, extra) in enumerate(zip(self.counts, self.extra)):
                mask = np.zeros(n, dtype=bool)
                if extra:
                    mask[np.random.default_rng([self.seed, epoch, c, _RESAMPLE_WORD]).permutation(n)[:extra]] = True
                masks.append(mask)
            self._epoch, self._extra_mask = epoch, masks
        return self._extra_mask

    def epoch_shards(self, epoch: int) -> ShardSet:
        """The shard set with each shard's expanded size for ``epoch`` (same shards, same order)."""
        masks = self._masks(epoch)
        expanded = []
        for i, shard in enumerate(self.shards.shards):
            size = int((self.per_shard[i] * self.base).sum() + self.uncounted[i])
            for c in np.flatnonzero(self.per_shard[i]):
                lo = self.offsets[i, c]
                size += int(masks[c][lo:lo + self.per_shard[i, c]].sum())
            expanded.append(Shard(shard.url, size, shard.class_counts))
        return ShardSet(tuple(expanded), self.shards.classes)

    def copies(self, epoch: int) -> Callable[[str, int, int], int]:
        """``copies(url, label, j)``: copies this epoch of the ``j``-th sample labelled ``label`` in shard ``url``.

        A sample the index does not account for (unlabeled, a label outside the counts, or more
        samples of a label than the index says) gets one copy; the stream's per-shard sizes still hold, since
        reads stop at the expanded size the index gives.
        """
        masks = self._masks(epoch)
        row = {s.url: i for i, s in enumerate(self.shards.shards)}

        def copies(url: str, label: int, j: int) -> int:
            i = row.get(url)
            if i is None or not 0 <= label < len(self.counts) or j >= self.per_shard[i, label]:
                return 1
            return int(self.base[label] + masks[label][self.offsets[i, label] + j])

        return copies


def _counts(shards: ShardSet, key: str) -> np.ndarray:
    counts = np.asarray(shards.class_counts, dtype=np.int64)
    if counts.size == 0:
        first = shards.shards[0].url if shards.shards else "the training shards"
        raise DistrainError(f"{key}: {first}: its index.json has no class counts; add them with `distrain data index DIR`")
    return counts


def training_resampling(shards: ShardSet, resample: str, threshold: float, labeled_share: float,
                        seed: int) -> Resampling | None:
    """The expansion a training epoch reads, or None to read the shards as they are.

    Args:
        shards: The training shard set.
        resample: ``data.resample``.
        threshold: ``data.repeat_threshold``.
        labeled_share: ``lp.labeled_share`` of a label-propagation phase (0: off). The two are
            never both on (label propagation refuses ``data.resample``).
        seed: The run's seed.
    """
    if labeled_share:
        return Resampling.labeled_share(shards, labeled_share, seed)
    if resample != "none":
        return Resampling.by_class(shards, resample, threshold, seed)
    return None


def epoch_samples(shards: ShardSet, resample: str, threshold: float, labeled_share: float = 0.0) -> int:
    """Samples per training epoch: the shard set's, or its expansion's (see :func:`training_resampling`)."""
    rs = training_resampling(shards, resample, threshold, labeled_share, seed=0)
    return rs.total if rs else shards.total
