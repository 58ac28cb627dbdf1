"""Preemption signals and failed collectives, turned into decisions every rank takes together.

SLURM (and most schedulers) send SIGUSR1 or SIGTERM some time before they kill a job. A rank that
received one must not stop on its own: its peers would wait for it in the next all-reduce. So the
handler only records the signal, and :func:`agree` (one small all-reduce per update) tells every
rank at the same update that some rank wants to stop. Bad-sample counts travel in the same
collective, so the bad-data limit is also judged on global numbers at the same update everywhere.
"""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass

import torch
from accelerate import Accelerator

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

# Messages of the errors torch raises from a collective whose peer died or hung (gloo, NCCL, c10d).
_PEER_FAILURE_MARKERS = (
    "connection reset", "connection closed", "connection refused", "broken pipe", "timed out", "timeout",
    "gloo", "nccl", "socket", "processgroup", "process group", "watchdog",
)


class StopSignals:
    """Records SIGUSR1/SIGTERM instead of dying; a second signal during a save changes nothing."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def ignore_further(self) -> None:
        """Ignore stop signals from now on (the run has stopped and saved; SIGKILL still works).

        SIG_IGN rather than the recording handler: Python resets its own handlers to the default
        during interpreter shutdown, where a late SIGTERM would otherwise kill the process and
        replace its exit code.
        """
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


@dataclass(frozen=True)
class Agreement:
    """What all ranks learned at one update: stop requested, and bad samples since the last check."""

    stop_ranks: int
    bad_samples: int


def agree(accelerator: Accelerator, stop: bool, bad_samples: int) -> Agreement:
    """Sum each rank's stop flag and new bad-sample count over all ranks (one all-reduce)."""
    local = torch.tensor([float(stop), float(bad_samples)], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 else local
    stop_ranks, bad = total.tolist()
    return Agreement(int(stop_ranks), int(bad))


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another rank died or hung."""
    if isinstance(error, torch.distributed.DistError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _PEER_FAILURE_MARKERS)


def requeue_slurm_job(job_id: str) -> str:
    """Ask SLURM to requeue this job (``scontrol requeue``); returns what scontrol said."""
    proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    return (proc.stdout + proc.stderr).strip() or f"scontrol requeue {job_id}: exit {proc.returncode}"
