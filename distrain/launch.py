"""``distrain launch``: one command from "this recipe, N processes per node, M nodes, this backend"
to the right ``accelerate launch`` call.

It validates the recipe first (a bad key fails here, before any process starts), prints the exact
command it runs, and then replaces itself with it. Ranks are always started through torchrun
(Accelerate's multi-GPU path), also on CPU machines and for DeepSpeed: distrain builds the
Accelerator itself, so the backend comes from the recipe (``distributed.backend``), which the
``--backend`` flag overrides. That sidesteps the CPU traps of Accelerate's launcher
(shared/NOTES-cpu-distributed.md): ``--cpu`` starts one process without MPI, and ranks launched
without a CPU process group never talk.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from distrain.errors import DistrainError


@dataclass(frozen=True)
class LaunchSpec:
    """Where the ranks of a run go.

    Attributes:
        nproc_per_node: Training processes per node (GPUs per node; CPU processes on a CPU node).
        nodes: Nodes taking part.
        node_rank: This node's index in ``[0, nodes)``.
        master_addr: Address of node 0 (multi-node only).
        master_port: TCP port on node 0 for the rendezvous.
    """

    nproc_per_node: int = 1
    nodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list such as ``gpu[03-05,07]`` (``scontrol show hostnames``)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise DistrainError(f"--master-addr: cannot expand SLURM_JOB_NODELIST={nodelist} with scontrol ({e})") from None
    return out.stdout.split()[0]


def resolve_spec(
    nproc_per_node: int | None, nodes: int | None, node_rank: int | None, master_addr: str | None,
    master_port: int | None, env: Mapping[str, str],
) -> LaunchSpec:
    """Fill what the flags leave out from SLURM's variables inside an allocation, else local defaults.

    Inside a SLURM job: nodes from ``SLURM_JOB_NUM_NODES``, this node's rank from ``SLURM_NODEID``,
    node 0's address from the first host of ``SLURM_JOB_NODELIST``, a port derived from the job id
    (two jobs sharing a node do not collide; a requeued job keeps its port), processes per node
    from ``SLURM_GPUS_ON_NODE``.

    Raises:
        DistrainError: the node rank is outside ``[0, nodes)``.
    """
    slurm = "SLURM_JOB_ID" in env
    if nodes is None:
        nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", 1))) if slurm else 1
    if node_rank is None:
        node_rank = int(env.get("SLURM_NODEID", 0)) if slurm else 0
    if master_addr is None:
        master_addr = first_host(env["SLURM_JOB_NODELIST"]) if slurm and nodes > 1 else "127.0.0.1"
    if master_port is None:
        master_port = 20000 + int(env["SLURM_JOB_ID"]) % 20000 if slurm else 29500
    if nproc_per_node is None:
        nproc_per_node = int(env.get("SLURM_GPUS_ON_NODE", 1)) if slurm else 1
    if not 0 <= node_rank < nodes:
        raise DistrainError(f"--node-rank: {node_rank} is not in [0, --nodes {nodes})")
    return LaunchSpec(nproc_per_node, nodes, node_rank, master_addr, master_port)


def launch_command(spec: LaunchSpec, recipe: str, overrides: list[str], python: str = sys.executable) -> list[str]:
    """The ``accelerate launch`` argv that starts ``distrain train RECIPE OVERRIDES`` on this node."""
    world = spec.nproc_per_node * spec.nodes
    cmd = [python, "-m", "accelerate.commands.launch"]
    if world > 1:
        cmd += ["--multi_gpu", "--rdzv_backend", "static", "--same_network"]
    cmd += [
        "--num_processes", str(world),
        "--num_machines", str(spec.nodes),
        "--machine_rank", str(spec.node_rank),
        "--main_process_ip", spec.master_addr,
        "--main_process_port", str(spec.master_port),
        # The recipe decides precision and compilation (train.precision, model.compile).
        "--mixed_precision", "no",
        "--dynamo_backend", "no",
    ]
    return [*cmd, "-m", "distrain", "train", recipe, *overrides]


def shown(cmd: list[str]) -> str:
    """The command as one shell line."""
    return " ".join(shlex.quote(c) for c in cmd)
