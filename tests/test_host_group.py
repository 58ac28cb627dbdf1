"""The stop/bad-data agreement runs on the host, over its own gloo group when the default group is not
gloo (NCCL on GPUs), so reading its result never waits for the GPU.

No NCCL here: the default group is torch's "fake" backend (its collectives do nothing), under
which only a real, separate gloo group can produce the sums.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import torchrun_script

from distrain.parallel.signals import Agreement, agree

SCRIPT = """
import datetime
from types import SimpleNamespace

import torch.distributed as dist
import torch.testing._internal.distributed.fake_pg  # registers the "fake" backend

from accelerate.utils import InitProcessGroupKwargs
from distrain.parallel.setup import drop_host_group, host_group
from distrain.parallel.signals import Agreement, agree

store, rank, world = next(dist.rendezvous("env://"))
dist.init_process_group("fake", store=store, rank=rank, world_size=world)
accelerator = SimpleNamespace(num_processes=world,
                              init_handler=InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=60)))
first = agree(accelerator, stop=rank == 0, bad_samples=rank + 1)
second = agree(accelerator, stop=False, bad_samples=5)
group = host_group(accelerator)
# A file per rank: two ranks printing to one pipe may interleave their lines.
with open(f"agreed-{rank}.txt", "w") as out:
    print(rank, first.stop_ranks, first.bad_samples, second.stop_ranks, second.bad_samples,
          group is host_group(accelerator), dist.get_backend(group), file=out)
del group
dist.destroy_process_group()
drop_host_group()
"""


@pytest.mark.dist
def test_agreement_sums_over_a_gloo_group_of_its_own(tmp_path: Path):
    torchrun_script(tmp_path, "agree.py", SCRIPT)
    lines = [(tmp_path / f"agreed-{rank}.txt").read_text().split() for rank in (0, 1)]
    # Both ranks see rank 0's stop and 1 + 2 bad samples, then 5 + 5: sums, not the fake group's
    # no-op; one group made once, a gloo one.
    assert lines == [["0", "1", "3", "0", "10", "True", "gloo"], ["1", "1", "3", "0", "10", "True", "gloo"]]


def test_the_agreement_never_touches_the_device():
    # A CUDA device, which this machine lacks: anything put on it would fail here.
    accelerator = SimpleNamespace(num_processes=1, device=torch.device("cuda"))
    assert agree(accelerator, True, 4) == Agreement(1, 4)
