"""Shared fixtures: real shard sets on disk and helpers that run the real `distrain` command."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))  # test helper modules (wandb_offline)

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env(tmp: Path) -> dict:
    """Environment of a test run: offline W&B under ``tmp``, 1 thread per rank, no user config."""
    env = dict(os.environ)
    env.update(
        WANDB_MODE="offline",
        WANDB_DIR=str(tmp),
        WANDB_SILENT="true",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.pop("WORLD_SIZE", None)
    return env


def distrain(args: list[str], cwd: Path, nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``distrain ARGS`` in ``cwd``; with ``nproc`` > 1 under torchrun (real gloo ranks)."""
    if nproc == 1:
        cmd = [PYTHON, "-m", "distrain", *args]
    else:
        cmd = [PYTHON, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
               f"--master_port={free_port()}", "-m", "distrain", *args]
    return subprocess.run(cmd, cwd=cwd, env=run_env(cwd), capture_output=True, text=True, timeout=timeout)


def torchrun_script(tmp: Path, name: str, source: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """Write ``source`` to ``tmp/name`` and run it on ``nproc`` real gloo ranks under torchrun, in
    ``tmp``; fails the test (with the output's tail) on a non-zero exit."""
    script = tmp / name
    script.write_text(source)
    proc = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
         f"--master_port={free_port()}", str(script)],
        cwd=tmp, env=run_env(tmp), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def spawn_ranks(args: list[str], cwd: Path, nproc: int = 2, env: dict | None = None) -> list[subprocess.Popen]:
    """Start ``nproc`` ranks of ``distrain ARGS`` without a launcher, so a test can signal or kill
    one rank and see what the others do on their own (as after a node failure)."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        rank_env = {**run_env(cwd), **(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank),
                    "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([PYTHON, "-m", "distrain", *args], cwd=cwd, env=rank_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def logged_steps(run_dir: Path) -> int:
    """The highest update logged in ``run_dir/metrics.jsonl`` so far (0 if none)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def checked(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    return proc


def image_bytes(value: int, size: int = 16, fmt: str = "PNG") -> bytes:
    """A small RGB image whose pixels encode ``value`` (so tests can tell samples apart)."""
    img = Image.new("RGB", (size, size), (value % 256, (value // 256) % 256, 128))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def write_layout(out: Path, counts: list[int], num_classes: int = 4, corrupt: frozenset[int] = frozenset()) -> Path:
    """A shard set with ``counts[i]`` samples in shard i; sample n has key ``s{n:05d}``, label n % classes.

    Samples whose number is in ``corrupt`` get bytes no decoder can read.
    """
    import webdataset as wds

    from distrain.data.index import write_index

    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for i, c in enumerate(counts):
        with wds.TarWriter(str(out / f"shard-{i:02d}.tar")) as tw:
            for j in range(n, n + c):
                data = b"\x89PNG garbage" if j in corrupt else image_bytes(j)
                tw.write({"__key__": f"s{j:05d}", "png": data, "cls": str(j % num_classes).encode()})
        n += c
    write_index(out, [(f"shard-{i:02d}.tar", c) for i, c in enumerate(counts)], [str(k) for k in range(num_classes)])
    return out


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """scikit-learn's digits as shards: ``<dir>/train`` (1,437) and ``<dir>/test`` (360)."""
    from distrain.data.writer import write_digits

    out = tmp_path_factory.mktemp("digits")
    write_digits(out, samples_per_shard=200, progress=False)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
