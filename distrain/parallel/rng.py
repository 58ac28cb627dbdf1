"""Who draws which random numbers in the training process, and from which seed.

A global batch on 256 GPUs must not share one MixUp lambda or one CutMix box, and a resumed run
must draw exactly what the uninterrupted one would. So every device-side draw of a micro-batch
comes from a seed derived from (run seed, rank, update, micro-batch, owner) and nothing else:

- ranks draw different numbers (the rank is in the seed);
- a rank's draws do not depend on how many other ranks there are (the world size is not);
- a resumed run re-derives the same seeds from the update it resumes at, so it needs no saved
  generator state for these draws;
- each owner (MixUp/CutMix, random erasing, stochastic layers) has its own stream, so switching
  one trick on does not change another's draws.

The per-sample draws of the data workers follow the same idea with (seed, epoch, rank, worker,
batch): see :mod:`distrain.data.stream`. Model initialisation is the one draw every rank makes
alike (from the run seed); DDP and DeepSpeed then broadcast rank 0's weights anyway.
"""

from __future__ import annotations

import enum

import numpy as np
import torch


class Owner(enum.IntEnum):
    """The consumers of per-micro-batch random streams (the values are part of every seed)."""

    MIX = 1
    ERASE = 2
    LAYERS = 3


def micro_batch_seed(seed: int, rank: int, update: int, micro: int, owner: Owner, phase: int = 0) -> int:
    """A 63-bit seed for ``owner``'s draws on ``rank`` in micro-batch ``micro`` of update ``update``.

    Args:
        seed: The run seed (``cfg.seed``).
        rank: This process's global rank.
        update: Optimizer updates done before this micro-batch (0-based), counted within the phase.
        micro: Index of the micro-batch within its update (0 .. accumulation - 1).
        owner: Who draws.
        phase: The phase's place in the run's chain: each phase counts its updates from 0, and must
            not repeat the first phase's draws. The first phase's seeds are those of a run without phases.
    """
    words = [seed & 0xFFFFFFFF, seed >> 32, rank, update & 0xFFFFFFFF, update >> 32, micro, int(owner)]
    if phase:
        words.append(phase)
    return int(np.random.SeedSequence(words).generate_state(2, np.uint64)[0] >> np.uint64(1))


def host_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` (host draws never wait for the device)."""
    return torch.Generator().manual_seed(seed)


def numpy_generator(seed: int) -> np.random.Generator:
    """A NumPy generator seeded with ``seed`` (for distributions torch cannot draw from a generator)."""
    return np.random.default_rng(seed)


def seed_layers(device: torch.device, seed: int) -> None:
    """Seed the generator that dropout and drop-path draw from on ``device``.

    Stochastic layers draw from the device's default generator (the CPU one on a CPU run), which
    has no per-call generator argument; seeding it before each micro-batch's forward makes their
    masks a function of that micro-batch's seed. On CUDA this only sets the Philox seed and offset
    on the host: no kernel, no synchronisation.
    """
    if device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()
                                      ].manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)
