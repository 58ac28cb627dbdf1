"""Launch paths: the README's `accelerate launch` commands really start one 2-rank gloo group."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, checked, free_port, run_env
from test_train import recipe

from distrain.dist.setup import check_world_size
from distrain.errors import DistrainError


def test_world_size_guard():
    check_world_size(2, 2)
    with pytest.raises(DistrainError, match="WORLD_SIZE=2 but the process group has 1"):
        check_world_size(2, 1)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize(
    "launch",
    [
        ["--config_file", str(REPO / "launch" / "accelerate" / "cpu_2proc.yaml")],
        # The trap of shared/NOTES-cpu-distributed.md: --multi_gpu without GPUs and without
        # ACCELERATE_USE_CPU gives ranks that never talk, unless distrain forces the CPU group.
        ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no"],
    ],
    ids=["yaml", "multi_gpu_flag"],
)
def test_accelerate_launch_two_cpu_ranks(tmp_path, digits, launch):
    cfg_path = recipe(tmp_path, digits, train={"max_updates": 4}, eval={"batch_size": 120},
                      logging={"wandb": False}, distributed={"timeout_s": 120})
    env = run_env(tmp_path)
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--main_process_port", str(free_port()),
           "-m", "distrain", "train", cfg_path]
    checked(subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["updates"] == 4
    assert summary["replica_fingerprints"][0] == summary["replica_fingerprints"][1]
