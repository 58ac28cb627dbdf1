"""No checkpoint file can run code: every load path of distrain refuses a pickle that would.

Each real-run test replaces one file of a real checkpoint with a pickle whose ``__reduce__`` would
create a marker file, then asserts a one-line refusal naming that file, no traceback, and no marker.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import checked, distrain, spawn_ranks
from test_train import recipe

from distrain.errors import DistrainError
from distrain.track.checkpoint import checkpoint_dirs
from distrain.track.safeload import check_file, refusing_pickled_code


class _Exploit:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _poison(path: Path, marker: Path, zip_format: bool = False) -> None:
    """Replace ``path`` by a pickle that would create ``marker``: raw (as in the report) or torch.save's zip."""
    if zip_format:
        torch.save({"state": _Exploit(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"state": _Exploit(marker)}))


def _assert_refused(code: int, stderr: str, name: str, marker: Path) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2, stderr[-3000:]
    assert lines[-1].startswith("distrain: error: ") and name in lines[-1], lines[-1]
    assert "contains pickled code (posix.system)" in lines[-1], lines[-1]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert not marker.exists()


def _finish(procs, timeout: float = 180) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except Exception:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, err))
    return out


# --- the loader itself ---------------------------------------------------------------------------


@pytest.mark.parametrize("zip_format", [False, True])
def test_code_in_a_pickle_is_refused_and_never_runs(tmp_path, zip_format):
    marker, path = tmp_path / "pwned", tmp_path / "optim_states.pt"
    _poison(path, marker, zip_format)
    message = f"export: cannot load {path}: it contains pickled code (posix.system); nothing from it was run"
    assert check_file(path, "export") == message
    with pytest.raises(DistrainError) as refused, refusing_pickled_code("export"):
        torch.load(path, weights_only=False)  # as DeepSpeed and zero_to_fp32 call it
    assert str(refused.value) == message
    assert not marker.exists()
    assert torch.load is torch.serialization.load  # restored after the block


def test_a_swallowed_refusal_still_ends_the_load(tmp_path):
    # Accelerate ignores RNG states it cannot read; the refusal must not vanish with them.
    path = tmp_path / "random_states_0.pkl"
    _poison(path, tmp_path / "pwned")
    with (pytest.raises(DistrainError, match="random_states_0.pkl: it contains pickled code"),
          refusing_pickled_code("--resume"),
          contextlib.suppress(Exception)):  # as Accelerate's load_accelerator_state does
        torch.load(path)
    assert not (tmp_path / "pwned").exists()


def test_what_checkpoints_legitimately_hold_still_loads(tmp_path):
    # Accelerate's RNG states: Python, NumPy (a uint32 array) and torch generators.
    state = {"random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
             "torch_manual_seed": torch.get_rng_state(), "step": 3}
    torch.save(state, tmp_path / "random_states_0.pkl")
    assert check_file(tmp_path / "random_states_0.pkl", "--resume") is None
    with refusing_pickled_code("--resume"):
        loaded = torch.load(tmp_path / "random_states_0.pkl", weights_only=False)
    assert loaded["random_state"] == state["random_state"]
    assert (loaded["numpy_random_seed"][1] == state["numpy_random_seed"][1]).all()


# --- every load path of a real run ---------------------------------------------------------------


def _copy_run(run_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of ``run_dir`` (to poison) and its newest checkpoint."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy, checkpoint_dirs(copy)[-1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, digits):
    """A 2-update single-process (non-DeepSpeed) run with its checkpoint."""
    tmp = tmp_path_factory.mktemp("ddp")
    cfg = recipe(tmp, digits, train={"max_updates": 2}, logging={"wandb": False})
    checked(distrain(["train", cfg], cwd=tmp))
    return cfg, tmp / "run"


@pytest.mark.slow
def test_ddp_resume_refuses_code_in_the_rng_states(tmp_path, ddp_run):
    # Accelerate reads this file weights_only but silently skips it when it is refused.
    cfg, run_dir = ddp_run
    copy, ckpt = _copy_run(run_dir, tmp_path)
    marker = tmp_path / "pwned"
    _poison(ckpt / "random_states_0.pkl", marker)
    proc = distrain(["train", cfg, f"run_dir={copy}", "--resume", "auto", "train.max_updates=3"], cwd=tmp_path)
    _assert_refused(proc.returncode, proc.stderr, str(ckpt / "random_states_0.pkl"), marker)


ZERO3_JSON = ('{"zero_optimization": {"stage": "auto", "stage3_param_persistence_threshold": 0, '
              '"stage3_model_persistence_threshold": 0}, "train_batch_size": "auto"}')


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, digits):
    """2-update runs on 2 gloo ranks under ZeRO-2 and ZeRO-3, each with its checkpoint."""
    out = {}
    for stage in (2, 3):
        tmp = tmp_path_factory.mktemp(f"zero{stage}")
        distributed = {"backend": "deepspeed", "zero_stage": stage, "timeout_s": 60}
        if stage == 3:
            (tmp / "zero3.json").write_text(ZERO3_JSON)
            distributed["deepspeed_config"] = str(tmp / "zero3.json")
        cfg = recipe(tmp, digits, batch={"per_device": 32, "accumulation": 1}, train={"max_updates": 2},
                     logging={"wandb": False}, distributed=distributed)
        checked(distrain(["train", cfg], cwd=tmp, nproc=2))
        out[stage] = cfg, tmp / "run"
    return out


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.deepspeed
@pytest.mark.parametrize("stage, name", [
    (2, "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt"),  # the file of the report
    (3, "pytorch_model/zero_pp_rank_1_mp_rank_00_model_states.pt"),
])
def test_zero_resume_refuses_code_on_every_rank(tmp_path, zero_runs, stage, name):
    cfg, run_dir = zero_runs[stage]
    copy, ckpt = _copy_run(run_dir, tmp_path)
    marker = tmp_path / "pwned"
    _poison(ckpt / name, marker)
    procs = spawn_ranks(["train", cfg, f"run_dir={copy}", "--resume", "auto", "train.max_updates=3"], cwd=tmp_path)
    for code, err in _finish(procs):  # both ranks: one line, same refusal, neither left waiting
        _assert_refused(code, err, str(ckpt / name), marker)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.deepspeed
def test_zero_resume_with_the_allowlist_still_works(tmp_path, zero_runs):
    cfg, run_dir = zero_runs[2]
    copy, _ = _copy_run(run_dir, tmp_path)
    checked(distrain(["train", cfg, f"run_dir={copy}", "--resume", "auto", "train.max_updates=3"], cwd=tmp_path,
                     nproc=2))
    assert checkpoint_dirs(copy)[-1].name == "update-00000003"


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.deepspeed
@pytest.mark.parametrize("command", ["export", "eval"])
def test_export_and_eval_refuse_code_in_zero_partitions(tmp_path, zero_runs, command):
    _, run_dir = zero_runs[2]
    copy, ckpt = _copy_run(run_dir, tmp_path)
    marker = tmp_path / "pwned"
    name = "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    _poison(ckpt / name, marker, zip_format=True)
    args = [command, str(copy), *(["--out", str(tmp_path / "w.pt")] if command == "export" else [])]
    proc = distrain(args, cwd=tmp_path)
    _assert_refused(proc.returncode, proc.stderr, str(ckpt / name), marker)
    assert not (tmp_path / "w.pt").exists()
