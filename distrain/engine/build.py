"""Factories that turn a validated config into the run's parts (data, model, optimizer)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from distrain.config import Config
from distrain.data import remote
from distrain.data.index import ShardSet
from distrain.data.remote import ShardCache
from distrain.data.resample import Resampling, training_resampling
from distrain.data.shards import resolve_shards
from distrain.data.stream import Augment, EvalResize, ShardStream, make_loader
from distrain.errors import DistrainError
from distrain.models import create_model
from distrain.models.init import init_weights
from distrain.plan import BatchPlan


@dataclass
class DataSets:
    """The resolved shard sets of a run, its number of classes and its resampling (by class, or to a
    labeled share)."""

    train: ShardSet
    eval: ShardSet | None
    num_classes: int
    resampling: Resampling | None = None

    @property
    def epoch_samples(self) -> int:
        """Training samples per epoch: the shards', or their resampled expansion's."""
        return self.resampling.total if self.resampling else self.train.total

    def class_frequencies(self) -> np.ndarray | None:
        """Samples of each class per epoch as trained (after resampling); None when the index lacks counts."""
        counts = self.resampling.class_frequencies() if self.resampling else np.asarray(self.train.class_counts)
        if counts.size == 0:
            return None
        return np.pad(counts.astype(np.int64), (0, max(0, self.num_classes - counts.size)))[: self.num_classes]


def prepare_builtin(cfg: Config, accelerator: Accelerator) -> None:
    """Write the built-in dataset named by ``data.prepare`` if its training shards are missing.

    Rank 0 writes; the others wait for it.
    """
    if cfg.data.prepare is None or not isinstance(cfg.data.train, str) or Path(cfg.data.train).exists():
        return
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            from distrain.data.writer import write_digits

            write_digits(Path(cfg.data.train).parent, progress=cfg.logging.progress)


def resolve_data(cfg: Config) -> DataSets:
    """Resolve the shard specs and the number of classes.

    Raises:
        DistrainError: missing shards, or ``data.num_classes`` smaller than the index's classes.
    """
    train = resolve_shards(cfg.data.train)
    evalset = resolve_shards(cfg.data.eval) if cfg.data.eval else None
    num_classes = cfg.data.num_classes or len(train.classes)
    if num_classes == 0:
        raise DistrainError("data.num_classes: 0 and the shard index lists no classes; set it")
    if cfg.data.num_classes and train.classes and cfg.data.num_classes < len(train.classes):
        raise DistrainError(
            f"data.num_classes: {cfg.data.num_classes} is less than the {len(train.classes)} classes in the index"
        )
    if train.labeled < train.total and cfg.ssl.method == "none" and not cfg.lp.enabled:
        raise DistrainError(
            f"data.train: {train.total - train.labeled} of the {train.total} samples in {cfg.data.train} are "
            "unlabeled; train on the labeled ones alone (the writer's labeled/ split), or set lp.enabled or "
            "ssl.method to use them"
        )
    resampling = training_resampling(train, cfg.data.resample, cfg.data.repeat_threshold, cfg.lp.epoch_share, cfg.seed)
    return DataSets(train, evalset, num_classes, resampling)


def train_stream(cfg: Config, data: DataSets, plan: BatchPlan, accelerator: Accelerator) -> ShardStream:
    """This rank's training stream, sized by the plan."""
    from distrain.engine.selfsup import ssl_views

    d = cfg.data
    return ShardStream(
        data.train,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        batch_size=plan.per_device,
        seed=cfg.seed,
        num_classes=data.num_classes,
        augment=Augment(d.train_crop, tuple(d.scale), tuple(d.ratio), d.hflip, d.policy, d.randaugment_ops,
                        d.randaugment_magnitude, d.train_resize, d.crop, d.pad, d.pad_fill),
        batches_per_epoch=plan.micro_batches_per_epoch,
        shuffle_block=d.shuffle_block,
        repeats=d.repeats,
        resampling=data.resampling,
        cache=shard_cache(cfg),
        # A self-supervised phase trains on two views of each sample, labeled or not; label
        # propagation gives the unlabeled ones pseudo-labels.
        views=ssl_views(cfg),
        require_labels=cfg.ssl.method == "none" and not cfg.lp.enabled,
    )


def eval_stream(cfg: Config, shards: ShardSet, rank: int, world_size: int, num_classes: int,
                require_labels: bool = True) -> ShardStream:
    """An eval stream over ``shards`` for ``rank`` of ``world_size`` (``require_labels=False``: the
    training shards' features, unlabeled samples included)."""
    return ShardStream(
        shards,
        rank=rank,
        world_size=world_size,
        batch_size=cfg.eval.batch_size or cfg.batch.per_device,
        seed=cfg.seed,
        num_classes=num_classes,
        eval_resize=EvalResize(cfg.data.eval_resize, cfg.data.eval_crop),
        require_labels=require_labels,
        cache=shard_cache(cfg),
    )


def check_remote_shards(data: DataSets, accelerator: Accelerator) -> None:
    """Stop before training, on every rank alike, if the store lacks a tar its set's index lists.

    One HEAD per remote shard, split over the ranks (1,024 shards on 256 ranks: 4 requests each),
    then agreed by all-reduces, so every rank raises the same error instead of one rank failing alone and
    the others waiting for it in a collective.

    Raises:
        DistrainError: naming the first missing shard's URL and how many more there are.
    """
    sets = [data.train] + ([data.eval] if data.eval is not None else [])
    urls = sorted({s.url for shards in sets for s in shards.shards if remote.is_remote(s.url)})
    if not urls:
        return
    mine = range(accelerator.process_index, len(urls), accelerator.num_processes)
    with ThreadPoolExecutor(max_workers=16) as pool:
        missing = [i for i, gone in zip(mine, pool.map(remote.is_missing, [urls[i] for i in mine])) if gone]
    # Every rank holds the same sorted list, so a count and the first index say it all: two
    # all-reduces of one number, no objects pickled between ranks. On the accelerator's device:
    # NCCL reduces no CPU tensor.
    count = torch.tensor([len(missing)], device=accelerator.device)
    first = torch.tensor([min(missing, default=len(urls))], device=accelerator.device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(count)
        torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
    if count.item():
        more = f" (and {count.item() - 1} more)" if count.item() > 1 else ""
        raise DistrainError(f"{urls[first.item()]}: listed in its shard set's index, but the store has no such "
                            f"object{more}")


def shard_cache(cfg: Config) -> ShardCache | None:
    """The node-local copy of remote shards that ``data.cache_dir`` asks for, or None."""
    if not cfg.data.cache_dir:
        return None
    return ShardCache(cfg.data.cache_dir, int(cfg.data.cache_max_gb * 2**30))


def loader(cfg: Config, stream: ShardStream) -> DataLoader:
    """A DataLoader over a stream with the configured workers; pinned memory on CUDA."""
    return make_loader(stream, cfg.data.workers, cfg.data.prefetch, pin_memory=torch.cuda.is_available())


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    """The model for ``cfg`` (norm layers, stochastic depth, dropout, init, memory format) before
    Accelerate wraps (and compiles) it; pretrained weights are the objective's to load."""
    model = create_model(cfg.model, num_classes)
    init_weights(model, cfg.model.init, cfg.model.init_gain)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
