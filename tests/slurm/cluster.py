"""A real SLURM cluster on this machine for the tests: munged, slurmctld and 2 slurmd, each node
in its own network namespace with its own address and hostname, torn down by pid.

Layout (shared/NOTES-slurm.md has the measured facts behind each choice)::

    root namespace        munged (its socket is a file, so every namespace reaches it);
                          a guard route makes 10.200.0.0/24 unreachable from here
    dslurm-ctl  10.200.0.1/24 on a bridge   slurmctld, hostname "ctl"; client commands run here
    dslurm-n1   10.200.0.11 (veth to the bridge)   slurmd -N n1, hostname n1
    dslurm-n2   10.200.0.12                        slurmd -N n2, hostname n2

Each daemon runs in a mount + UTS namespace of its own (``unshare``) with private /etc/hosts and
/etc/resolv.conf bind-mounted, so name lookups (torch c10d does reverse lookups of its peers)
never leave the machine. Run as a script for manual use::

    python tests/slurm/cluster.py up      # prints the state dir; `... down STATE_DIR` stops it
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
NODES = {"n1": "10.200.0.11", "n2": "10.200.0.12"}
CTL_NS, CTL_ADDR, SUBNET = "dslurm-ctl", "10.200.0.1", "10.200.0.0/24"
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")


class ClusterUnavailable(RuntimeError):
    """This machine cannot host the cluster (not root, no namespaces, no packages)."""


def _run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


def ensure_packages() -> None:
    """Install the Debian packages if a daemon is missing (root only)."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ClusterUnavailable("SLURM is not installed and apt-get as root is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run("apt-get", "update", "-qq", env=env, timeout=300)
    _run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES, env=env, timeout=600)


def _slurm_conf(state: Path) -> str:
    nodes = "\n".join(
        f"NodeName={n} NodeHostname={n} NodeAddr={a} CPUs={os.cpu_count()} RealMemory=2000 State=UNKNOWN"
        for n, a in NODES.items()
    )
    return f"""\
ClusterName=distrain-test
SlurmctldHost=ctl({CTL_ADDR})
AuthType=auth/munge
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/spool-%n
SlurmctldPidFile={state}/ctld.pid
SlurmdPidFile={state}/slurmd-%n.pid
SlurmctldLogFile={state}/ctld.log
SlurmdLogFile={state}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
ReturnToService=2
SchedulerParameters=sched_interval=2,bf_interval=2
KillWait=5
MinJobAge=300
{nodes}
PartitionName=main Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """Bring-up, client commands and teardown of the test cluster.

    Args:
        state: Directory for configs, spool, logs and the job's shared files (default: a new temp dir).
    """

    def __init__(self, state: Path | None = None):
        self.state = Path(state or tempfile.mkdtemp(prefix="distrain-slurm-"))
        self.conf = self.state / "slurm.conf"
        self.pids: dict[str, int] = {}
        self.env_extra = {"SLURM_CONF": str(self.conf)}
        self.env = {**os.environ, **self.env_extra}

    # --- bring-up --------------------------------------------------------------------------------

    def up(self, timeout: float = 60.0) -> SlurmCluster:
        """Start everything and wait until both nodes are idle.

        Raises:
            ClusterUnavailable: not root, or network namespaces cannot be made here.
        """
        if os.geteuid() != 0:
            raise ClusterUnavailable("needs root (network namespaces, daemons)")
        ensure_packages()
        try:
            self._network()
        except subprocess.CalledProcessError as e:
            self.down()
            raise ClusterUnavailable(f"cannot create network namespaces: {e.stderr.strip()[:200]}") from None
        (self.state / "ctld").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(_slurm_conf(self.state))
        (self.state / "hosts").write_text(
            "127.0.0.1 localhost\n" + f"{CTL_ADDR} ctl\n" + "".join(f"{a} {n}\n" for n, a in NODES.items())
        )
        (self.state / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        self._munge()
        self._daemon("slurmctld", CTL_NS, "ctl", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for name in NODES:
            self._daemon(f"slurmd-{name}", f"dslurm-{name}", name, ["slurmd", "-D", "-N", name, "-f", str(self.conf)])
        (self.state / "pids.json").write_text(json.dumps(self.pids))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.client("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            if len(states) == len(NODES) and all(s == "idle" for s in states.values()):
                return self
            time.sleep(0.2)
        logs = (self.state / "ctld.log").read_text()[-1500:] if (self.state / "ctld.log").exists() else ""
        self.down()
        raise RuntimeError(f"SLURM nodes not idle after {timeout}s: {states}\n{logs}")

    def _network(self) -> None:
        _run("ip", "netns", "add", CTL_NS)
        ns = ("ip", "netns", "exec", CTL_NS)
        _run(*ns, "ip", "link", "set", "lo", "up")
        _run(*ns, "ip", "link", "add", "br0", "type", "bridge")
        _run(*ns, "ip", "addr", "add", f"{CTL_ADDR}/24", "dev", "br0")
        _run(*ns, "ip", "link", "set", "br0", "up")
        for name, addr in NODES.items():
            node_ns = f"dslurm-{name}"
            _run("ip", "netns", "add", node_ns)
            _run("ip", "-n", node_ns, "link", "set", "lo", "up")
            _run("ip", "-n", node_ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"v{name}", "netns", CTL_NS)
            _run("ip", "-n", node_ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _run("ip", "-n", node_ns, "link", "set", "eth0", "up")
            _run(*ns, "ip", "link", "set", f"v{name}", "master", "br0")
            _run(*ns, "ip", "link", "set", f"v{name}", "up")
        # Nothing addressed to the cluster's subnet may leave through the root namespace's uplink.
        _run("ip", "route", "add", "unreachable", SUBNET, check=False)

    def _munge(self) -> None:
        alive = MUNGE_SOCKET.exists() and _run("munge", "-n", check=False).returncode == 0
        if alive:
            return
        for d in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
            Path(d).mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            _run("mungekey", "--create", check=False)
            shutil.chown("/etc/munge/munge.key", "munge", "munge")
        proc = subprocess.Popen(["setpriv", "--reuid=munge", "--regid=munge", "--init-groups", "munged", "-F"],
                                stdout=subprocess.DEVNULL, stderr=open(self.state / "munged.log", "w"))
        self.pids["munged"] = proc.pid
        for _ in range(100):
            if _run("munge", "-n", check=False).returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError("munged did not come up")

    def _daemon(self, key: str, netns: str, hostname: str, cmd: list[str]) -> None:
        script = (f"mount --bind {self.state}/hosts /etc/hosts && mount --bind {self.state}/resolv.conf "
                  f"/etc/resolv.conf && hostname {hostname} && exec {' '.join(cmd)}")
        proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{netns}", "unshare", "--mount", "--uts", "sh", "-c", script],
            stdout=subprocess.DEVNULL, stderr=open(self.state / f"{key}.stderr", "w"), env=self.env,
        )
        self.pids[key] = proc.pid  # nsenter and unshare exec (no fork), so this is the daemon's pid

    # --- client side ------------------------------------------------------------------------------

    def client(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a SLURM client command (sbatch, squeue, scontrol, ...) in the controller's namespace."""
        return subprocess.run(["ip", "netns", "exec", CTL_NS, *cmd], check=check, capture_output=True, text=True,
                              env=self.env, timeout=timeout)

    def sbatch(self, *args: str, cwd: Path, env: dict | None = None) -> int:
        """Submit a batch job (it inherits ``env``, plus SLURM_CONF); returns its id."""
        out = subprocess.run(["ip", "netns", "exec", CTL_NS, "sbatch", "--parsable", *args], cwd=cwd, check=True,
                             capture_output=True, text=True, env={**(env or os.environ), **self.env_extra}, timeout=60)
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, NodeList, ...); an array task
        is ``"<job>_<task>"``."""
        out = self.client("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait(self, job_id: int | str, states: set[str], timeout: float) -> dict[str, str]:
        """Poll the job until its state is one of ``states`` (sbatch --wait polls too slowly)."""
        deadline = time.monotonic() + timeout
        info = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout}s: {info.get('JobState')}")

    # --- teardown ---------------------------------------------------------------------------------

    def down(self) -> None:
        """Cancel jobs, stop the daemons by pid, delete the namespaces and the guard route."""
        if "slurmctld" in self.pids:
            self.client("scancel", "--full", "-u", "root", check=False, timeout=20)
        for key in sorted(self.pids, key=lambda k: k == "munged"):  # munged last
            _stop(self.pids[key])
        for ns in [f"dslurm-{n}" for n in NODES] + [CTL_NS]:
            _run("ip", "netns", "del", ns, check=False)
        _run("ip", "route", "del", "unreachable", SUBNET, check=False)
        self.pids = {}


def _alive(pid: int) -> bool:
    """Running and not a zombie (a stopped daemon may linger as one)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop(pid: int, grace: float = 5.0) -> None:
    if not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


if __name__ == "__main__":
    if sys.argv[1:2] == ["up"]:
        cluster = SlurmCluster().up()
        print(cluster.state)
    elif sys.argv[1:2] == ["down"] and len(sys.argv) == 3:
        cluster = SlurmCluster(Path(sys.argv[2]))
        cluster.pids = json.loads((cluster.state / "pids.json").read_text())
        cluster.down()
    else:
        sys.exit("usage: cluster.py up | down STATE_DIR")
