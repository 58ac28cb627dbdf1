"""`train.precision: auto`: bf16 only on GPUs with native bf16, fp16 on older ones, fp32 on CPU,
asked of each rank's own GPU.

There is no GPU here: the CUDA queries are replaced by a fake node of 8 GPUs of one compute
capability, which records the device each query names.
"""

from __future__ import annotations

import pytest
import torch

from distrain.parallel.setup import rank_gpu, resolve_precision


@pytest.fixture
def node(monkeypatch):
    """A fake node of 8 CUDA GPUs; set ``node["capability"]``, read ``node["probed"]``."""
    state = {"capability": (8, 0), "probed": []}

    def capability(device=None):
        state["probed"].append(device)
        return state["capability"]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.version, "hip", None)
    return state


@pytest.mark.parametrize("capability, expected", [
    ((7, 0), "fp16"),  # V100: bf16 only emulated; fp16 has tensor cores (and a GradScaler)
    ((7, 5), "fp16"),  # T4
    ((8, 0), "bf16"),  # A100
    ((9, 0), "bf16"),  # H100
])
def test_auto_is_bf16_only_with_native_bf16(node, monkeypatch, capability, expected):
    monkeypatch.setenv("LOCAL_RANK", "0")
    node["capability"] = capability
    assert resolve_precision("auto", rank_gpu()) == expected


@pytest.mark.parametrize("local_rank, index", [("3", 3), ("11", 3)])
def test_auto_asks_the_ranks_own_gpu(node, monkeypatch, local_rank, index):
    # Accelerate gives rank LOCAL_RANK the GPU LOCAL_RANK modulo the visible ones; the probe must
    # name that one, not the current device (cuda:0 on every rank before Accelerate sets it).
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    resolve_precision("auto", rank_gpu())
    assert [torch.device(d).index for d in node["probed"]] == [index]


def test_auto_on_rocm_is_bf16(node, monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2")
    node["capability"] = (9, 0)
    assert resolve_precision("auto", rank_gpu()) == "bf16"


def test_cpu_is_fp32_and_explicit_choices_stay(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_gpu() is None
    assert resolve_precision("auto", None) == "no"
    assert [resolve_precision(p, None) for p in ("fp32", "bf16", "fp16")] == ["no", "bf16", "fp16"]
