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
import sys
from dataclasses import dataclass


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
