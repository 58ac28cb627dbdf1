"""A lost peer is told apart from any other error: only real collective failures mean exit 77."""

from __future__ import annotations

import base64
import pickle
import subprocess

import pytest
import torch.distributed as dist
from conftest import PYTHON, free_port, run_env

from distrain.parallel.signals import is_peer_failure

# What the surviving gloo rank got (type RuntimeError, exactly these texts) on torch 2.14.1 when its
# peer was killed with SIGKILL (every collective after the kill: all_reduce, broadcast, barrier,
# DDP's backward, whichever rank died; "Read error" when the kill lands during a collective), and
# when its peer hung past a 5 s timeout (the first collective, then the ones after it). The live
# test below checks that they still are.
GLOO_PEER_KILLED = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
    "[127.0.0.1]:4276. This is typically caused by a remote worker crashing. Check the logs of the remote worker "
    "before reporting an error. GLHF! \U0001f3d6\ufe0f"
)
GLOO_PEER_KILLED_DURING = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:10148: "
    "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the application. "
    "Check the logs of the remote worker before reporting an error. GLHF! \U0001f3d6\ufe0f"
)
GLOO_PEER_HUNG = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms "
    "for recv operation to complete"
)
GLOO_AFTER_TIMEOUT = "Application timeout caused pair closure"


@pytest.mark.parametrize("error", [
    RuntimeError(GLOO_PEER_KILLED),
    RuntimeError(GLOO_PEER_KILLED_DURING),
    RuntimeError(GLOO_PEER_HUNG),
    RuntimeError(GLOO_AFTER_TIMEOUT),
    # NCCL: the watchdog's timeout, and the next collective on communicators it aborted
    dist.DistBackendError("[PG ID 0 PG GUID 0(default_pg) Rank 1] Watchdog caught collective operation timeout: "
                          "WorkNCCL(SeqNum=6463, OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=600000) ran "
                          "for 600017 milliseconds before timing out."),
    dist.DistBackendError("NCCL communicator was aborted on rank 1. Original reason for failure was: ..."),
    dist.DistNetworkError("failed to recv, got 0 bytes"),
    dist.DistStoreError("Timed out after 901 seconds waiting for clients. 1/2 clients joined."),
])
def test_collective_failures_are_peer_failures(error):
    assert is_peer_failure(error)


@pytest.mark.parametrize("error", [
    RuntimeError("DataLoader worker (pid 123) exited unexpectedly: timeout after 30 s"),
    RuntimeError("my augmentation hit a socket timeout in the nccl-free path"),
    RuntimeError("Connection closed by peer while downloading the weights"),
    TimeoutError("timed out"),
    ConnectionResetError(104, "Connection reset by peer"),
    # gloo's assertion on mismatched collectives (a bug of the program) names the same source files
    RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:446] "
                 "op.preamble.length <= op.nbytes. 8 vs 4"),
    ValueError(GLOO_PEER_KILLED),
])
def test_other_errors_are_not(error):
    assert not is_peer_failure(error)


SURVIVOR = """
import base64, os, pickle, signal, sys, time
from datetime import timedelta
import torch, torch.distributed as dist

mode, rank, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=timedelta(seconds=2))
t = torch.ones(4)
dist.all_reduce(t)
if rank == 1:
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(30)  # hung
for _ in range(2):  # the first failed collective, and the next one
    try:
        while True:
            dist.all_reduce(t)
    except Exception as e:
        print(base64.b64encode(pickle.dumps(e)).decode(), flush=True)
os._exit(0)
"""


@pytest.mark.dist
@pytest.mark.parametrize("mode", ["kill", "hang"])
def test_gloo_errors_of_a_lost_peer_are_peer_failures(tmp_path, mode):
    port = str(free_port())
    procs = [subprocess.Popen([PYTHON, "-c", SURVIVOR, mode, str(r), port], env=run_env(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        out, err = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    errors = [pickle.loads(base64.b64decode(line)) for line in out.split()]
    assert len(errors) == 2, err[-2000:]
    assert [type(e) for e in errors] == [RuntimeError] * 2 and all(is_peer_failure(e) for e in errors), errors
    first = str(errors[0])
    if mode == "kill":  # depending on whether the kill lands between collectives or during one
        assert "] Connection closed by peer [" in first or "] Read error [" in first, first
    else:
        assert "] Timed out waiting 2000ms for recv operation to complete" in first, first
