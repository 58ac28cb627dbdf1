"""Nothing lost, nothing hangs: real signals, kills, corrupt files and injected NaNs against `distrain train`."""

from __future__ import annotations

import json
import os
import pickle
import signal
import time
from pathlib import Path

import pytest
from conftest import checked, distrain, logged_steps, read_jsonl, spawn_ranks, wait_for, write_layout
from safetensors.torch import load_file
from test_train import recipe
from wandb_offline import read_offline_runs

from distrain.errors import EXIT_BAD_DATA, EXIT_NONFINITE, EXIT_PEER_LOST, EXIT_PREEMPTED
from distrain.track.checkpoint import checkpoint_dirs

pytestmark = pytest.mark.slow


def losses(run: Path) -> dict[int, float]:
    """Per-update training loss; after a resume the later line for a step wins."""
    return {e["step"]: e["train/loss"] for e in read_jsonl(run / "metrics.jsonl") if "train/loss" in e}


def same_params(a: Path, b: Path, name: str = "model.safetensors") -> bool:
    x, y = load_file(a / name), load_file(b / name)
    return x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)


def finish(procs, timeout=120) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except Exception:
            p.kill()
            raise
        out.append((p.returncode, err))
    return out


# 2 ranks x 2 DataLoader workers each, so resume restores every worker's stream position; EMA on,
# so its weights must survive the resume too.
TWO_RANK = {"batch": {"per_device": 8, "accumulation": 2}, "schedule": {"epochs": 1},
            "data": {"workers": 2}, "ema": {"decay": 0.9, "every": 2}, "distributed": {"timeout_s": 60}}


@pytest.fixture(scope="module")
def reference_two_rank(tmp_path_factory, digits):
    """An uninterrupted 2-rank run: 2 x 8 x 2 = 32 per update, 44 updates."""
    tmp = tmp_path_factory.mktemp("reference")
    checked(distrain(["train", recipe(tmp, digits, **TWO_RANK)], cwd=tmp, nproc=2))
    return tmp / "run"


@pytest.mark.dist
def test_sigusr1_on_one_rank_stops_both_at_the_same_update_and_resume_is_exact(tmp_path, digits, reference_two_rank):
    cfg = recipe(tmp_path, digits, **TWO_RANK)
    run = tmp_path / "run"
    procs = spawn_ranks(["train", cfg], cwd=tmp_path)
    wait_for(lambda: logged_steps(run) >= 6, timeout=120, what="update 6")
    procs[1].send_signal(signal.SIGUSR1)
    # More signals while the ranks agree, save and exit (SLURM may signal again): nothing may break.
    for _ in range(6):
        time.sleep(0.1)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
    results = finish(procs)
    assert [code for code, _ in results] == [EXIT_PREEMPTED, EXIT_PREEMPTED], results
    stops = [int(err.split("stopped at update ")[1].split()[0]) for _, err in results]
    assert stops[0] == stops[1] and 6 <= stops[0] < 44
    assert "SIGUSR1 received" in results[1][1]
    assert [p.name for p in checkpoint_dirs(run)] == [f"update-{stops[0]:08d}"]

    checked(distrain(["train", cfg, "--resume", "auto"], cwd=tmp_path, nproc=2))
    ref, resumed = losses(reference_two_rank), losses(run)
    assert sorted(resumed) == list(range(1, 45))
    assert [f"{resumed[s]:.6f}" for s in range(stops[0] + 1, 45)] == [f"{ref[s]:.6f}" for s in range(stops[0] + 1, 45)]
    assert same_params(checkpoint_dirs(run)[-1], checkpoint_dirs(reference_two_rank)[-1])
    assert same_params(checkpoint_dirs(run)[-1], checkpoint_dirs(reference_two_rank)[-1], "ema.safetensors")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval/ema_top1"] == json.loads((reference_two_rank / "summary.json").read_text())["eval/ema_top1"]
    runs = read_offline_runs(run)
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"]  # one W&B run, continued


@pytest.mark.dist
def test_a_killed_rank_makes_the_other_exit_with_a_clear_error(tmp_path, digits):
    cfg = recipe(tmp_path, digits, batch={"per_device": 8, "accumulation": 1}, schedule={"epochs": 6},
                 distributed={"timeout_s": 30})
    run = tmp_path / "run"
    procs = spawn_ranks(["train", cfg], cwd=tmp_path)
    wait_for(lambda: checkpoint_dirs(run) and logged_steps(run) > 95, timeout=180, what="a checkpoint")
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    code, err = finish(procs[:1], timeout=90)[0]
    took = time.monotonic() - killed
    print(f"surviving rank exited {took:.1f}s after the kill")
    assert code == EXIT_PEER_LOST, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("distrain: stopped: rank 0: lost contact with another rank") and "--resume auto" in last
    assert took < 30
    procs[1].wait()
    out = checked(distrain(["eval", str(run), "--json"], cwd=tmp_path)).stdout
    assert json.loads(out.strip().splitlines()[-1])["eval/samples"] == 360  # the checkpoint on disk is usable


def test_kill_9_during_a_save_leaves_the_previous_checkpoint(tmp_path, digits):
    # ResNet-18 makes a checkpoint big enough (~90 MB with momentum) to be caught mid-save.
    cfg = recipe(tmp_path, digits, model={"name": "resnet18"}, batch={"per_device": 64, "accumulation": 1},
                 schedule={"epochs": 4}, eval={"every_epochs": 10}, logging={"wandb": False})
    run = tmp_path / "run"
    root = run / "checkpoints"
    proc = spawn_ranks(["train", cfg], cwd=tmp_path, nproc=1)[0]
    wait_for(lambda: checkpoint_dirs(run), timeout=180, what="a first checkpoint")
    first = checkpoint_dirs(run)[-1]
    wait_for(lambda: any(p.suffix == ".tmp" for p in root.iterdir()), timeout=180, interval=0.002, what="a save")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(p.suffix == ".tmp" for p in root.iterdir()), "the kill should land during the save"
    assert checkpoint_dirs(run)[-1] == first
    proc = checked(distrain(["train", cfg, "--resume", "auto"], cwd=tmp_path))
    assert f"resuming from {first}" in proc.stderr
    assert not any(p.suffix == ".tmp" for p in root.iterdir())
    assert json.loads((run / "summary.json").read_text())["updates"] == 4 * (1437 // 64)


def test_resume_refuses_other_batch_maths_unless_allowed(tmp_path, digits):
    cfg = recipe(tmp_path, digits, logging={"wandb": False})
    checked(distrain(["train", cfg, "train.max_updates=3"], cwd=tmp_path))
    proc = distrain(["train", cfg, "--resume", "auto", "batch.per_device=8", "train.max_updates=6"], cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("distrain: error: --resume")
    assert "plan per_device: 16 -> 8" in lines[-1] and "--allow-config-change" in lines[-1]
    checked(distrain(["train", cfg, "--resume", "auto", "batch.per_device=8", "train.max_updates=6",
                      "--allow-config-change"], cwd=tmp_path))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_cannot_run_code(tmp_path, digits):
    cfg = recipe(tmp_path, digits, logging={"wandb": False})
    checked(distrain(["train", cfg, "train.max_updates=2"], cwd=tmp_path))
    ckpt = checkpoint_dirs(tmp_path / "run")[-1]
    (ckpt / "optimizer.bin").write_bytes(pickle.dumps({"state": _Exploit()}))
    proc = distrain(["train", cfg, "--resume", "auto", "train.max_updates=4"], cwd=tmp_path)
    assert proc.returncode == 2 and "cannot load" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "pwned").exists()


@pytest.mark.dist
def test_nan_on_one_rank_skips_the_update_on_both(tmp_path, digits):
    cfg = recipe(tmp_path, digits, **TWO_RANK)
    env = {"DISTRAIN_INJECT_NAN": "5@1"}
    procs = spawn_ranks(["train", cfg, "train.max_updates=10"], cwd=tmp_path, env=env)
    assert [code for code, _ in finish(procs)] == [0, 0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train/skipped_updates"] == 1 and summary["updates"] == 10
    assert summary["replica_fingerprints"][0] == summary["replica_fingerprints"][1]
    events = [e for e in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/loss" in e]
    assert [e["train/skipped_updates"] for e in events][3:6] == [0, 1, 1]
    assert all(e["train/loss"] == e["train/loss"] for e in events if e["step"] != 5)  # finite apart from 5


def test_nan_under_stop_policy_checkpoints_the_last_good_state(tmp_path, digits):
    cfg = recipe(tmp_path, digits, logging={"wandb": False})
    proc = spawn_ranks(["train", cfg, "train.nonfinite=stop"], cwd=tmp_path, nproc=1,
                       env={"DISTRAIN_INJECT_NAN": "7"})[0]
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_NONFINITE, err[-2000:]
    assert "non-finite gradient norm at update 7" in err.strip().splitlines()[-1]
    ckpt = checkpoint_dirs(tmp_path / "run")[-1]
    assert ckpt.name == "update-00000006"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["update"] == 6 and state["batch_in_epoch"] == 12
    assert all(t.isfinite().all() for t in load_file(ckpt / "model.safetensors").values())
    checked(distrain(["train", cfg, "--resume", "auto", "train.max_updates=10"], cwd=tmp_path))


def test_bad_samples_are_skipped_counted_and_limited(tmp_path):
    # 64 training samples (2 unreadable) and 20 eval samples (1 unreadable).
    train = write_layout(tmp_path / "train", [16, 16, 16, 16], corrupt=frozenset({5, 40}))
    evalset = write_layout(tmp_path / "eval", [10, 10], corrupt=frozenset({3}))
    doc = {"run_dir": str(tmp_path / "run"),
           "data": {"train": str(train), "eval": str(evalset), "train_crop": 16, "eval_resize": 16, "eval_crop": 16,
                    "workers": 2, "max_bad_fraction": 0.05},
           "model": {"name": "cifar_resnet20"}, "batch": {"per_device": 16}, "schedule": {"epochs": 2},
           "train": {"log_every": 1}, "logging": {"wandb": False}}
    cfg = tmp_path / "r.yaml"
    cfg.write_text(json.dumps(doc))
    proc = checked(distrain(["train", str(cfg)], cwd=tmp_path))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data/skipped"] == 4 and summary["eval/skipped"] == 1 and summary["eval/samples"] == 19
    assert "4 bad samples skipped" in proc.stdout.strip().splitlines()[-1]
    logged = [e["data/skipped"] for e in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "data/skipped" in e]
    assert logged[-1] == 4 and logged[0] <= 2

    for override, needle in (("data.bad_samples=fail", "data.bad_samples is fail"),
                             ("data.max_bad_fraction=0.01", "exceeds data.max_bad_fraction=0.01")):
        proc = distrain(["train", str(cfg), override, "run_dir=" + str(tmp_path / override)], cwd=tmp_path)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == EXIT_BAD_DATA, proc.stderr[-2000:]
        assert last.startswith("distrain: error: bad sample 's000") and "shard-0" in last and needle in last


def test_deterministic_runs_repeat_exactly(tmp_path, digits):
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        cfg = recipe(tmp_path / name, digits, deterministic=True, logging={"wandb": False},
                     train={"max_updates": 8, "log_every": 1})
        checked(distrain(["train", cfg], cwd=tmp_path / name))
        runs.append(losses(tmp_path / name / "run"))
        summary = json.loads((tmp_path / name / "run" / "summary.json").read_text())
        assert summary["deterministic_algorithms"] is True  # what `deterministic: true` switches on
    assert runs[0] == runs[1]
