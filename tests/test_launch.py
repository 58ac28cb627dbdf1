"""Launch paths: the README's `accelerate launch` commands really start one 2-rank gloo group."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, checked, free_port, run_env
from test_train import recipe

from distrain.errors import DistrainError
from distrain.parallel.setup import check_world_size


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


def test_launch_command_single_and_multi_node():
    from distrain.launch import LaunchSpec, launch_command

    one = launch_command(LaunchSpec(), "r.yaml", ["a.b=1"], python="py")
    assert one[:3] == ["py", "-m", "accelerate.commands.launch"] and "--multi_gpu" not in one
    assert one[-5:] == ["-m", "distrain", "train", "r.yaml", "a.b=1"]
    multi = launch_command(LaunchSpec(8, 4, 2, "10.0.0.1", 29123), "r.yaml", [], python="py")
    flags = dict(zip(multi[3::1], multi[4::1]))
    assert "--multi_gpu" in multi
    assert (flags["--num_processes"], flags["--num_machines"], flags["--machine_rank"]) == ("32", "4", "2")
    assert (flags["--main_process_ip"], flags["--main_process_port"]) == ("10.0.0.1", "29123")


def test_launch_checks_the_recipe_before_starting(tmp_path, digits):
    from conftest import distrain

    cfg = recipe(tmp_path, digits)
    bad = distrain(["launch", cfg, "--nproc-per-node", "2", "optim.lrr=1"], cwd=tmp_path)
    assert bad.returncode == 2 and "unknown config key optim.lrr (did you mean optim.lr?)" in bad.stderr
    assert "launch:" not in bad.stderr
    dry = checked(distrain(["launch", cfg, "--nproc-per-node", "2", "--backend", "deepspeed", "--zero-stage", "3",
                            "--dry-run"], cwd=tmp_path))
    assert "accelerate.commands.launch --multi_gpu" in dry.stderr
    assert dry.stderr.rstrip().endswith("distributed.backend=deepspeed distributed.zero_stage=3")
    lars = distrain(["launch", cfg, "--backend", "deepspeed", "optim.name=lars", "--dry-run"], cwd=tmp_path)
    assert lars.returncode == 2 and "optim.name: lars computes a trust ratio per layer" in lars.stderr


@pytest.mark.parametrize("path", sorted((REPO / "launch" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_launch_configs_load_in_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.mixed_precision == "no"  # the recipe decides precision
    if "deepspeed" in path.name:
        stage = int(path.name.split("zero")[1][0])
        assert config.deepspeed_config["zero_stage"] == stage
        assert (config.deepspeed_config["offload_optimizer_device"] == "cpu") == ("offload" in path.name)


@pytest.mark.parametrize("path", sorted((REPO / "launch" / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_templates_merge_with_a_recipe(path):
    from test_plan_schedule import cfg_with

    from distrain.parallel.deepspeed import deepspeed_config

    stage = 3 if "zero3" in path.name else 2
    offload = "offload" in path.name
    cfg = cfg_with(distributed={"backend": "deepspeed", "zero_stage": stage, "deepspeed_config": str(path),
                                "offload_optimizer": offload, "offload_params": offload})
    ds = deepspeed_config(cfg, "bf16", per_device=32, accumulation=2, global_batch=512)
    assert ds["zero_optimization"]["stage"] == stage and ds["bf16"]["enabled"] is True
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (32, 2, 512)
    assert "auto" not in json.dumps({k: v for k, v in ds.items() if k != "_comment"})
    if offload:  # the same JSON without the recipe's offload leaves the devices undecided
        bare = cfg_with(distributed={"backend": "deepspeed", "zero_stage": stage, "deepspeed_config": str(path)})
        with pytest.raises(DistrainError, match=r"offload_optimizer\.device \(set by distributed\.offload_optimizer\)"):
            deepspeed_config(bare, "bf16", per_device=32, accumulation=2, global_batch=512)


def test_spec_from_slurm_variables():
    """The node list's first host comes from the real scontrol: test_slurm.py checks it on a cluster."""
    from distrain.launch import resolve_spec

    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_GPUS_ON_NODE": "8"}
    spec = resolve_spec(None, None, None, "gpu07", None, env)
    assert (spec.nproc_per_node, spec.nodes, spec.node_rank, spec.master_addr, spec.master_port) == (
        8, 2, 1, "gpu07", 24242)
    flags = resolve_spec(2, 4, 0, "10.0.0.5", 1234, env)  # flags win over SLURM's variables
    assert (flags.nproc_per_node, flags.nodes, flags.node_rank, flags.master_port) == (2, 4, 0, 1234)
    one = resolve_spec(None, None, None, None, None, {**env, "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0"})
    assert (one.nodes, one.master_addr) == (1, "127.0.0.1")  # a single node needs no address lookup
    local = resolve_spec(None, None, None, None, None, {})
    assert (local.nproc_per_node, local.nodes, local.node_rank, local.master_addr, local.master_port) == (
        1, 1, 0, "127.0.0.1", 29500)
    with pytest.raises(DistrainError, match="--node-rank: 3 is not in"):
        resolve_spec(1, 2, 3, "a", 1, {})
