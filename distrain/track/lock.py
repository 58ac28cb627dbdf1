"""One live run per run directory: rank 0 holds ``RUN_DIR/.lock`` while the run lives.

Two runs writing checkpoints and metrics into one run dir corrupt each other silently (the same
recipe started twice; a resume started while an orphaned first run still trains). The lock is a
small JSON file naming its holder: host, pid, the pid's start time, SLURM job id and restart
count, and when it started. It appears atomically with its whole content (a hard link of a
finished temporary file; ``O_EXCL`` on filesystems without hard links). A start that finds a lock
decides whether its holder still lives:

- same host: the holder lives while its pid exists, is not a zombie, and started when the lock
  says (a reused pid is another process). The SLURM job id does not matter here: an orphan of a
  requeued job that still runs is exactly what the lock must refuse.
- another host, where pids cannot be checked: a lock of this start's own SLURM job id is stale
  (SLURM keeps the job id across a requeue and ends the previous incarnation first); otherwise
  the holder lives while its heartbeat is fresh: a daemon thread touches the lock every
  ``HEARTBEAT_S`` (30 s), and a lock untouched for ``STALE_AFTER_S`` (300 s: ten missed beats,
  room for a stalled filesystem) is stale. Ages are measured against the mtime of a file written
  just now next to the lock, so on a shared filesystem both times come from the same clock.

A stale lock is taken over; a live one refuses the start with a one-line :class:`DistrainError`
naming the holder. The lock is deleted when the run ends, on every exit path (``kill -9``
aside, which the rules above take over).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from distrain.errors import DistrainError

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of ``pid`` from /proc, or None if it has no entry."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name in parentheses may hold spaces
    return fields[0], int(fields[19])


def _identity() -> dict:
    stat = _proc_stat(os.getpid())
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": stat[1] if stat else None,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _alive(pid: int, pid_start: int | None) -> bool:
    """Whether ``pid`` on this host is a live process that started at ``pid_start`` (when known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    if not Path("/proc/self/stat").exists():
        return True  # no /proc on this system: existence is all there is to know
    stat = _proc_stat(pid)
    if stat is None or stat[0] in "ZX":  # gone meanwhile, or a zombie whose parent has not reaped it
        return False
    return pid_start is None or stat[1] == pid_start


def _describe(holder: dict) -> str:
    job = holder.get("slurm_job_id")
    return (f"host {holder.get('host')}, pid {holder.get('pid')}" + (f", SLURM job {job}" if job else "")
            + f", started {holder.get('started')}")


class RunLock:
    """``RUN_DIR/.lock``: held by one process (rank 0 of a run) from :meth:`acquire` to :meth:`release`.

    Args:
        run_dir: The run directory (created if missing).
        heartbeat_s: Seconds between touches of the lock by its holder.
        stale_after_s: Age of the last touch after which another host's lock counts as stale.
    """

    def __init__(self, run_dir: str | Path, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.path = Path(run_dir) / LOCK_NAME
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self._mine: bytes | None = None  # the lock's content while this object holds it
        self._owner_pid = 0
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock, or take over a stale one.

        Raises:
            DistrainError: a live process holds it (the message names it).
            OSError: the run dir cannot hold the lock file.
        """
        me = json.dumps(_identity()).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{LOCK_NAME}.{socket.gethostname()}.{os.getpid()}.tmp")
        tmp.write_bytes(me)
        try:
            for _ in range(5):  # each round either takes it, refuses, or removes a stale lock
                if self._link(tmp, me):
                    self._hold(me)
                    return
                try:
                    seen, mtime = self.path.read_bytes(), self.path.stat().st_mtime
                except FileNotFoundError:
                    continue  # released meanwhile
                live = self._live_holder(seen, tmp.stat().st_mtime - mtime)
                if live:
                    raise DistrainError(
                        f"run dir {self.path.parent} is in use by a live run ({live}); stop that run or choose "
                        f"another run_dir (its lock {self.path} is taken over once that process is gone)"
                    )
                self._remove_stale(seen)
            raise DistrainError(f"run dir {self.path.parent}: other processes keep taking its lock {self.path}")
        finally:
            tmp.unlink(missing_ok=True)

    def acquire_for_run(self, accelerator: Accelerator) -> None:
        """Rank 0 takes the lock; every rank learns the outcome (one broadcast) and raises the same error.

        Raises:
            DistrainError: on every rank, when rank 0 could not take the lock.
        """
        refusal = None
        if accelerator.is_main_process:
            try:
                self.acquire()
            except DistrainError as error:
                refusal = str(error)
            except OSError as error:
                refusal = f"run dir {self.path.parent}: cannot write its lock {self.path}: {error.strerror}"
            except Exception as error:  # noqa: BLE001 (the other ranks wait in the broadcast below: tell them)
                refusal = f"run dir {self.path.parent}: cannot take its lock {self.path}: {error!r}"
        if accelerator.num_processes > 1:
            refusal = broadcast_object_list([refusal])[0]
        if refusal:
            raise DistrainError(refusal)

    def release(self) -> None:
        """Delete the lock if this process holds it (a no-op otherwise, so it may be called on any path)."""
        if self._mine is None or os.getpid() != self._owner_pid:  # a forked child inherits the object, not the lock
            return
        self._stop.set()
        self._beat.join()
        atexit.unregister(self.release)
        with contextlib.suppress(OSError):
            if self.path.read_bytes() == self._mine:
                self.path.unlink()
        self._mine = None

    def _link(self, tmp: Path, me: bytes) -> bool:
        """Make the lock appear with its whole content; False if one exists."""
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: create-exclusive, then write
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(me)
            return True

    def _live_holder(self, seen: bytes, age: float) -> str:
        """The description of the lock's holder if it is alive, else ""."""
        try:
            holder = json.loads(seen)
            host, pid = holder["host"], int(holder["pid"])
        except (ValueError, KeyError, TypeError):
            # Being written (O_EXCL path) or damaged: only its age can tell.
            return "" if age > self.stale_after_s else f"unreadable lock, written {age:.0f}s ago"
        if host == socket.gethostname():
            if pid == os.getpid() or not _alive(pid, holder.get("pid_start")):
                return ""  # this very process (an earlier run in it), or a dead or different process
            return _describe(holder)
        job = os.environ.get("SLURM_JOB_ID")
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if job and holder.get("slurm_job_id") == job and int(holder.get("slurm_restart_count") or 0) < restarts:
            return ""  # this job's previous incarnation (requeue), which SLURM ended before starting this one
        if age > self.stale_after_s:
            return ""
        return f"{_describe(holder)}; last heartbeat {max(age, 0):.0f}s ago, stale after {self.stale_after_s:.0f}s"

    def _remove_stale(self, seen: bytes) -> None:
        """Remove the stale lock whose content is ``seen``, never a lock another starter has just taken."""
        grave = self.path.with_name(f"{LOCK_NAME}.{socket.gethostname()}.{os.getpid()}.stale")
        try:
            os.rename(self.path, grave)  # atomic: of racing starters, one moves the stale lock
        except FileNotFoundError:
            return
        if grave.read_bytes() != seen:  # moved a fresh lock that replaced the stale one: put it back
            with contextlib.suppress(OSError):
                os.link(grave, self.path)
        grave.unlink()

    def _hold(self, me: bytes) -> None:
        self._mine, self._owner_pid = me, os.getpid()
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="run-dir-lock", daemon=True)
        self._beat.start()
        atexit.register(self.release)  # exits that bypass the caller's handlers (KeyboardInterrupt, sys.exit)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                ours = self.path.read_bytes() == self._mine
                if ours:
                    os.utime(self.path)
            except FileNotFoundError:
                continue  # a starter may hold it aside for a moment while it checks it (_remove_stale)
            except OSError:
                continue  # a transient filesystem error: beat again later
            if not ours:
                print(f"distrain: WARNING: another process removed or took this run's lock {self.path}; "
                      "a second run may be writing to the same run dir", file=sys.stderr, flush=True)
                return
