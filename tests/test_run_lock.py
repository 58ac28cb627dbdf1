"""One live run per run dir: RUN_DIR/.lock refuses a second live run and is taken over from a dead one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PYTHON, checked, distrain, logged_steps, run_env, spawn_ranks, wait_for
from test_train import recipe

from distrain.errors import DistrainError
from distrain.track import lock as lock_module
from distrain.track.lock import RunLock

HOST = socket.gethostname()


def proc_start(pid: int) -> int:
    """The start time of ``pid`` (clock ticks since boot), as /proc/PID/stat gives it."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rindex(")") + 2:].split()[19])


def write_holder(run_dir: Path, age_s: float = 0.0, **holder) -> Path:
    """A lock as another process would have left it, last touched ``age_s`` seconds ago."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    path.write_text(json.dumps({"host": HOST, "pid_start": None, "slurm_job_id": None, "slurm_restart_count": None,
                                "started": "2030-01-01T00:00:00+0000", **holder}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def holder_of(run_dir: Path) -> dict:
    return json.loads((run_dir / ".lock").read_text())


def taken(run_dir: Path) -> dict:
    """Take the lock of ``run_dir`` (it must be free or stale); returns what it held, then releases it."""
    lock = RunLock(run_dir)
    lock.acquire()
    holder = holder_of(run_dir)
    lock.release()
    assert holder["host"] == HOST and holder["pid"] == os.getpid()
    return holder


@pytest.fixture
def sleeper():
    """A live process on this host, not this one."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


def test_take_hold_and_release(tmp_path):
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    assert holder_of(tmp_path / "run") | {"started": None} == {
        "host": HOST, "pid": os.getpid(), "pid_start": proc_start(os.getpid()), "slurm_job_id": None,
        "slurm_restart_count": None, "started": None}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # no temporary file left
    lock.release()
    assert not (tmp_path / "run" / ".lock").exists()
    lock.release()  # any exit path may call it again


def test_a_live_holder_on_this_host_is_refused_by_name(tmp_path, sleeper, monkeypatch):
    # The same SLURM job id does not help a holder on this host that still runs (an orphan of a requeued job).
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    path = write_holder(tmp_path, pid=sleeper.pid, pid_start=proc_start(sleeper.pid), slurm_job_id="4242")
    before = path.read_bytes()
    with pytest.raises(DistrainError) as refused:
        RunLock(tmp_path).acquire()
    message = str(refused.value)
    assert "\n" not in message and f"run dir {tmp_path} is in use by a live run" in message
    assert f"host {HOST}, pid {sleeper.pid}, SLURM job 4242, started 2030-01-01" in message
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_a_dead_holder_is_taken_over(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_holder(tmp_path, pid=dead.pid, pid_start=None)
    taken(tmp_path)


def test_a_killed_but_unreaped_holder_is_taken_over(tmp_path):
    zombie = subprocess.Popen(["true"])  # exits at once; not waited for, so it stays a zombie
    wait_for(lambda: Path(f"/proc/{zombie.pid}/stat").read_text().split(") ")[1][0] == "Z", 10, what="zombie")
    write_holder(tmp_path, pid=zombie.pid, pid_start=proc_start(zombie.pid))
    taken(tmp_path)
    zombie.wait()


def test_a_reused_pid_is_another_process(tmp_path, sleeper):
    write_holder(tmp_path, pid=sleeper.pid, pid_start=proc_start(sleeper.pid) - 1)
    taken(tmp_path)


def test_another_hosts_lock_is_live_while_its_heartbeat_is_fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "999")
    write_holder(tmp_path, age_s=100, host="node-b", pid=1234, slurm_job_id="4242")
    with pytest.raises(DistrainError, match=r"host node-b, pid 1234, SLURM job 4242, .*; last heartbeat 10\ds ago, "
                                            r"stale after 300s"):
        RunLock(tmp_path).acquire()
    write_holder(tmp_path, age_s=400, host="node-b", pid=1234, slurm_job_id="4242")
    taken(tmp_path)


def test_the_same_slurm_job_on_another_host_is_its_previous_incarnation(tmp_path, monkeypatch):
    # A requeued job keeps SLURM_JOB_ID (SLURM_RESTART_COUNT grows) and may land on other nodes.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write_holder(tmp_path, host="node-b", pid=1234, slurm_job_id="4242", slurm_restart_count="0")
    assert taken(tmp_path)["slurm_restart_count"] == "1"


def test_a_live_step_of_the_same_slurm_job_on_another_host_is_not_taken_over(tmp_path, monkeypatch):
    # Same job id and restart count: another live step of this allocation, not an earlier incarnation.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write_holder(tmp_path, host="node-b", pid=1234, slurm_job_id="4242", slurm_restart_count="1")
    with pytest.raises(DistrainError, match="in use by a live run"):
        RunLock(tmp_path).acquire()


def test_the_heartbeat_keeps_the_lock_fresh_and_release_leaves_a_lock_that_is_not_ours(tmp_path, capfd):
    lock = RunLock(tmp_path, heartbeat_s=0.05)
    lock.acquire()
    path = tmp_path / ".lock"
    os.utime(path, (0, 0))
    wait_for(lambda: path.stat().st_mtime > time.time() - 60, 10, what="a heartbeat")
    write_holder(tmp_path, host="node-b", pid=1234)  # taken over meanwhile (wrongly judged stale)
    wait_for(lambda: "another process removed or took this run's lock" in capfd.readouterr().err, 10,
             what="the heartbeat's warning")
    lock.release()
    assert holder_of(tmp_path)["host"] == "node-b"


def test_a_filesystem_without_hard_links_gets_an_exclusive_create(tmp_path, monkeypatch, sleeper):
    def no_link(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(lock_module.os, "link", no_link)
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    assert holder_of(tmp_path / "run")["pid"] == os.getpid()
    lock.release()
    write_holder(tmp_path / "run", pid=sleeper.pid, pid_start=proc_start(sleeper.pid))
    with pytest.raises(DistrainError, match=f"pid {sleeper.pid}"):
        RunLock(tmp_path / "run").acquire()


@pytest.mark.slow
def test_a_second_run_on_a_live_run_dir_is_refused_and_a_killed_ones_lock_is_taken_over(tmp_path, digits):
    cfg = recipe(tmp_path, digits, data={"eval": "", "workers": 0}, schedule={"epochs": 30},
                 logging={"wandb": False, "progress": False})
    run = tmp_path / "run"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([PYTHON, "-m", "distrain", "train", cfg], cwd=tmp_path, env=run_env(tmp_path),
                                 stdout=log, stderr=log)
    try:
        wait_for(lambda: logged_steps(run) >= 1, timeout=300, interval=0.5, what="the first run's update 1")
        second = distrain(["train", cfg, "--resume", "auto"], cwd=tmp_path)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert lines[-1].startswith(f"distrain: error: run dir {run} is in use by a live run (host {HOST}, "
                                    f"pid {first.pid}, started "), lines[-1]
    finally:
        first.kill()
        first.wait()
    assert holder_of(run)["pid"] == first.pid  # kill -9 left its lock behind
    checked(distrain(["train", cfg, "--resume", "auto", "train.max_updates=2"], cwd=tmp_path))
    assert not (run / ".lock").exists()


@pytest.mark.dist
def test_every_rank_of_a_refused_run_stops_with_the_same_line(tmp_path, digits):
    # Only rank 0 looks at the lock; rank 1 must learn the refusal rather than wait in a collective.
    cfg = recipe(tmp_path, digits, data={"eval": ""}, logging={"wandb": False}, distributed={"timeout_s": 60})
    write_holder(tmp_path / "run", pid=os.getpid(), pid_start=proc_start(os.getpid()))  # this test: alive
    procs = spawn_ranks(["train", cfg], cwd=tmp_path)
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
        assert err.strip().splitlines()[-1].startswith(f"distrain: error: run dir {tmp_path / 'run'} is in use by "
                                                       f"a live run (host {HOST}, pid {os.getpid()}, ")
    assert not (tmp_path / "run" / "config.yaml").exists()
