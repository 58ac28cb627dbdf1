"""The sbatch templates on a real SLURM cluster (2 nodes, each in its own network namespace):
a 2-node job, preemption -> checkpoint -> requeue -> exact resume, and a node failure.

The cluster comes up once per module (tests/slurm/cluster.py; about 2 s) and is torn down by pid
even when a test fails. Needs root (CI has it); skips with the reason elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import PYTHON, REPO, checked, distrain, read_jsonl, run_env, wait_for
from test_train import recipe

sys.path.insert(0, str(Path(__file__).parent / "slurm"))
from cluster import ClusterUnavailable, SlurmCluster  # noqa: E402

from distrain.track.checkpoint import checkpoint_dirs  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.dist]

DISTRAIN = str(Path(PYTHON).parent / "distrain")
# CPU nodes: no GPUs to ask for, 2 cores each, one training process per node (world size 2).
CPU_JOB = ["--gpus-per-node=0", f"--cpus-per-task={os.cpu_count()}", "--time=10"]


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster needs root (network namespaces and daemons)")
    c = SlurmCluster()
    started = time.monotonic()
    try:
        c.up()
    except ClusterUnavailable as e:
        pytest.skip(f"no SLURM test cluster here: {e}")
    print(f"SLURM cluster up in {time.monotonic() - started:.1f}s")
    yield c
    c.down()
    shutil.rmtree(c.state, ignore_errors=True)


def _job_env(tmp: Path) -> dict:
    return {**run_env(tmp), "DISTRAIN": DISTRAIN, "NPROC_PER_NODE": "1"}


def _submit(cluster, tmp: Path, template: str, *args: str, nodes: int = 2) -> int:
    shutil.copytree(REPO / "slurm", tmp / "slurm", dirs_exist_ok=True)
    return cluster.sbatch(f"--nodes={nodes}", *CPU_JOB, f"--output={tmp}/slurm-%j.out", f"slurm/{template}", *args,
                          cwd=tmp, env=_job_env(tmp))


def _log(tmp: Path, job: int) -> str:
    path = tmp / f"slurm-{job}.out"
    return path.read_text() if path.exists() else ""


def test_two_node_job(cluster, tmp_path, digits):
    cfg = recipe(tmp_path, digits, train={"max_updates": 6}, distributed={"timeout_s": 60})
    started = time.monotonic()
    job = _submit(cluster, tmp_path, "train_multinode.sbatch", cfg)
    info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=240)
    print(f"2-node job: {time.monotonic() - started:.1f}s from sbatch to COMPLETED")
    log = _log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert info["NodeList"] == "n[1-2]"
    assert "node 0 of 2" in log and "node 1 of 2" in log and "--main_process_ip n1" in log
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["updates"] == 6
    assert summary["replica_fingerprints"][0] == summary["replica_fingerprints"][1]
    assert [e["step"] for e in read_jsonl(run / "metrics.jsonl") if "train/loss" in e] == list(range(1, 7))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["update-00000006"]
    single = json.loads(checked(distrain(["eval", str(run), "--json"], cwd=tmp_path)).stdout.strip().splitlines()[-1])
    assert single["eval/top1"] == summary["eval/top1"] and single["eval/samples"] == 360


def test_preempt_requeue_resume(cluster, tmp_path, digits):
    cfg = recipe(tmp_path, digits, train={"max_updates": 30, "log_every": 1}, distributed={"timeout_s": 60},
                 checkpoint={"every_epochs": 5})
    reference = tmp_path / "reference"
    checked(distrain(["train", cfg, f"run_dir={reference}"], cwd=tmp_path, nproc=2))
    expected = [(e["step"], e["train/loss"]) for e in read_jsonl(reference / "metrics.jsonl") if "train/loss" in e]

    job = _submit(cluster, tmp_path, "train_multinode.sbatch", cfg)
    run = tmp_path / "run"
    wait_for(lambda: (run / "metrics.jsonl").exists() and len(read_jsonl(run / "metrics.jsonl")) >= 8, timeout=180,
             what="8 logged updates")
    started = time.monotonic()
    cluster.client("scancel", "--signal=USR1", "--batch", str(job))
    info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)
    log = _log(tmp_path, job)
    print(f"preempt -> checkpoint -> requeue -> resume -> done: {time.monotonic() - started:.1f}s")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    assert "USR1 received" in log and "restart 1" in log and "resuming from" in log
    stopped = [line for line in log.splitlines() if "distrain: stopped:" in line]
    assert stopped and "continue with --resume auto" in stopped[0]
    losses = [(e["step"], e["train/loss"]) for e in read_jsonl(run / "metrics.jsonl") if "train/loss" in e]
    assert losses == expected  # the interrupted and requeued job trained exactly as the uninterrupted one
    assert (run / "wandb_run_id").exists() and len(list((run / "wandb").glob("offline-run-*"))) >= 1
    ids = {p.name.rsplit("-", 1)[-1] for p in (run / "wandb").glob("offline-run-*")}
    assert ids == {(run / "wandb_run_id").read_text().strip()}  # one W&B run across the requeue


def _training_pid(rank: int) -> int:
    """The pid of the training process of ``rank`` (any node: namespaces share the pid space)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"distrain" in cmd and b"train" in cmd and f"RANK={rank}".encode() in env and b"accelerate" not in b" ".join(cmd):
            return int(proc.name)
    raise LookupError(f"no training process of rank {rank}")


def test_node_failure_fails_fast_with_usable_checkpoint(cluster, tmp_path, digits):
    timeout_s = 20
    cfg = recipe(tmp_path, digits, schedule={"epochs": 20}, train={"log_every": 1},
                 distributed={"timeout_s": timeout_s}, checkpoint={"every_epochs": 1})
    job = _submit(cluster, tmp_path, "train_multinode.sbatch", cfg)
    run = tmp_path / "run"
    wait_for(lambda: checkpoint_dirs(run), timeout=240, what="a first complete checkpoint")
    os.kill(_training_pid(1), signal.SIGKILL)  # rank 1 is the node n2's process
    killed = time.monotonic()
    info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=timeout_s + 120)
    took = time.monotonic() - killed
    log = _log(tmp_path, job)
    print(f"node failure -> job {info['JobState']} in {took:.1f}s (process-group timeout {timeout_s}s)")
    assert info["JobState"] == "FAILED" and took < timeout_s + 90, log[-3000:]
    # Rank 0 reports the lost peer (exit 77) unless srun's --kill-on-bad-exit stops it first: a race
    # either way ends the job FAILED within seconds, which is what is asserted above.
    assert "lost contact with another rank" in log or "Exited with exit code" in log, log[-3000:]
    newest = checkpoint_dirs(run)[-1]  # complete ones only: a save cut short stays a .tmp
    out = checked(distrain(["eval", str(newest), "--json"], cwd=tmp_path))
    assert json.loads(out.stdout.strip().splitlines()[-1])["eval/samples"] == 360


def test_deepspeed_template_on_two_nodes(cluster, tmp_path, digits):
    cfg = recipe(tmp_path, digits, train={"max_updates": 4}, distributed={"timeout_s": 60})
    job = _submit(cluster, tmp_path, "train_deepspeed.sbatch", cfg)
    info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)
    log = _log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "distributed.backend=deepspeed distributed.zero_stage=2" in log  # the accelerate command it ran
    assert "DeepSpeed ZeRO-2" in log
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["updates"] == 4
    assert summary["replica_fingerprints"][0] == summary["replica_fingerprints"][1]
    assert (sorted((tmp_path / "run" / "checkpoints").iterdir())[-1] / "pytorch_model").is_dir()


def test_job_array_sweep(cluster, tmp_path, digits):
    cfg = recipe(tmp_path, digits, train={"max_updates": 3}, distributed={"timeout_s": 60})
    shutil.copytree(REPO / "slurm", tmp_path / "slurm", dirs_exist_ok=True)
    job = cluster.sbatch("--array=0-1", "--nodes=1", *CPU_JOB, f"--output={tmp_path}/slurm-%A_%a.out",
                         "slurm/sweep_array.sbatch", cfg, "optim.lr=0.05,0.2", "train.log_every=1",
                         cwd=tmp_path, env={**_job_env(tmp_path), "RUN_ROOT": str(tmp_path / "sweep")})
    for task in (0, 1):
        info = cluster.wait(f"{job}_{task}", {"COMPLETED", "FAILED", "CANCELLED"}, timeout=240)
        assert info["JobState"] == "COMPLETED", (tmp_path / f"slurm-{job}_{task}.out").read_text()[-3000:]
    for lr in ("0.05", "0.2"):
        run = tmp_path / "sweep" / f"optim.lr={lr}"
        assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == float(lr)
        assert json.loads((run / "summary.json").read_text())["updates"] == 3
