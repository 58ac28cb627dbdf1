"""Preemption signals and failed collectives, turned into decisions every rank takes together.

SLURM (and most schedulers) send SIGUSR1 or SIGTERM some time before they kill a job. A rank that
received one must not stop on its own: its peers would wait for it in the next all-reduce. So the
handler only records the signal, and :func:`agree` (one small all-reduce of host values every
``preemption.check_every`` updates) tells every rank at the same update that some rank wants to
stop. Bad-sample counts travel in the same collective, so the bad-data limit is also judged on
global numbers at the same update everywhere.
"""

from __future__ import annotations

import re
import signal
import subprocess
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from distrain.parallel.setup import host_group

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

# gloo raises a plain RuntimeError when a peer dies or hangs: "[<source>/gloo/transport/tcp/pair.cc:N]
# Connection closed by peer [addr]:port. ..." (peer killed, seen on the survivor's next collective),
# "[.../gloo/transport/tcp/unbound_buffer.cc:N] Timed out waiting 5000ms for recv operation to
# complete" (peer hung past the timeout), then "Application timeout caused pair closure" on the
# collectives after that one (all seen on torch 2.14, tests/test_peer_failure.py). The other
# transport messages are gloo's own for a lost or stalled connection. Assertion failures of the
# same transport files ("op.preamble.length <= op.nbytes": mismatched collectives) are bugs and
# do not match.
_GLOO_PEER_FAILURE = re.compile(
    r"\[[^\]\n]*gloo/transport/[^\]\n]*\] (Connection closed by peer|Read error|Read timeout|Write timeout|"
    r"Connect timeout|writev|Socket closed|Socket unexpectedly closed|Pair is not connected|Timed out waiting)"
    r"|Application timeout caused pair closure"
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
    """Sum each rank's stop flag and new bad-sample count over all ranks (one all-reduce).

    The all-reduce runs on the host over gloo (:func:`~distrain.parallel.setup.host_group`): on NCCL
    its result would cost a wait for the GPU, a second host synchronisation per update besides
    the non-finite check.
    """
    total = torch.tensor([float(stop), float(bad_samples)], dtype=torch.float64)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(total, group=host_group(accelerator))
    stop_ranks, bad = total.tolist()
    return Agreement(int(stop_ranks), int(bad))


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another rank died or hung.

    That is torch's distributed errors (``DistError``: ``DistBackendError`` from NCCL's watchdog or
    an aborted communicator, ``DistNetworkError`` and ``DistStoreError`` from the rendezvous
    store), and the RuntimeErrors gloo raises for a lost or timed-out peer connection. Another
    error that merely mentions a timeout or a socket is not one.
    """
    if isinstance(error, torch.distributed.DistError):
        return True
    return isinstance(error, RuntimeError) and _GLOO_PEER_FAILURE.search(str(error)) is not None


def requeue_slurm_job(job_id: str) -> str:
    """Ask SLURM to requeue this job (``scontrol requeue``); returns what scontrol said."""
    proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    return (proc.stdout + proc.stderr).strip() or f"scontrol requeue {job_id}: exit {proc.returncode}"
