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


def checked(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    return proc


def image_bytes(value: int, size: int = 16, fmt: str = "PNG") -> bytes:
    """A small RGB image whose pixels encode ``value`` (so tests can tell samples apart)."""
    img = Image.new("RGB", (size, size), (value % 256, (value // 256) % 256, 128))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def write_layout(out: Path, counts: list[int], num_classes: int = 4) -> Path:
    """A shard set with ``counts[i]`` samples in shard i; sample n has key ``s{n:05d}``, label n % classes."""
    import webdataset as wds

    from distrain.data.index import write_index

    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for i, c in enumerate(counts):
        with wds.TarWriter(str(out / f"shard-{i:02d}.tar")) as tw:
            for j in range(n, n + c):
                tw.write({"__key__": f"s{j:05d}", "png": image_bytes(j), "cls": str(j % num_classes).encode()})
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
