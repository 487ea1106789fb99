"""A throw-away Slurm cluster on this machine, for tests/test_slurm.py.

Debian's `slurmctld slurmd slurm-client munge` (installed by `make slurm-deps`), run as
root from one temporary directory: a private
munged (never the system one, which another cluster on the machine may share), no cgroups
(proctrack/linuxproc, task/none), emulated nodes n1..nN as one slurmd each on this host, free
ports, and `cred_expire=10` so a requeued job may start again after seconds instead of two
minutes. The daemons run in the foreground as our children; every process of the cluster
(daemons, slurmstepd, jobs) carries MARKER=<root> in its environment, so `down()` finds and
ends by PID whatever is left, whatever happened.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
COMMANDS = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo",
            "munged", "mungekey")
MARKER = "TRICOLOR_SLURM_CLUSTER"
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed here (the tests skip, saying why)."""


def _which(name: str) -> str | None:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:{SBIN_PATH}")


def ensure_installed() -> None:
    """SlurmUnavailable naming what is missing; `make slurm-deps` installs it (the tests never
    install packages themselves)."""
    missing = [c for c in COMMANDS if _which(c) is None]
    if missing:
        raise SlurmUnavailable(f"Slurm commands missing ({', '.join(missing)}); install them "
                               f"with `make slurm-deps` (apt-get, as root: {' '.join(PACKAGES)})")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def fields(line: str) -> dict[str, str]:
    """`scontrol show -o` output: Key=Value pairs (values without spaces are enough here)."""
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))


class SlurmCluster:
    def __init__(self, root: Path, nnodes: int = 2, cpus: int = 2):
        self.root = Path(root)
        self.nnodes = nnodes
        self.cpus = cpus
        self.conf = self.root / "etc" / "slurm.conf"
        self.nodes = [f"n{i}" for i in range(1, nnodes + 1)]
        # munged wants o+x on every directory above its socket: pytest's tmp dirs are 0700
        self.munge = Path(tempfile.mkdtemp(prefix="tricolor-munge-"))
        self.daemons: dict[str, subprocess.Popen] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env.update(SLURM_CONF=str(self.conf), PATH=f"{self.env.get('PATH', '')}:{SBIN_PATH}")
        self.env[MARKER] = str(self.root)

    # -- start and stop --------------------------------------------------------------------

    def write_config(self) -> None:
        for d in ("etc", "state", "run", "log", *(f"spool/{n}" for n in self.nodes)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.munge.chmod(0o755)
        host = socket.gethostname().split(".")[0]
        ctl_port, *node_ports = free_ports(1 + self.nnodes)
        mem = max(500, int(_mem_total_mb() * 0.8 / self.nnodes))
        r = self.root
        node_lines = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus} "
            f"RealMemory={mem} State=UNKNOWN" for n, p in zip(self.nodes, node_ports))
        self.conf.write_text(f"""\
ClusterName=tricolor-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctl_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge}/munge.socket,cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={r}/log/jobcomp.txt
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SwitchType=switch/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=10
Waittime=0
{node_lines}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")

    def _daemon(self, name: str, *argv: str) -> None:
        out = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 (closed in down)
        self.daemons[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, env=self.env,
                                              start_new_session=True, preexec_fn=_die_with_parent)
        out.close()

    def up(self, timeout: float = 60) -> None:
        self.write_config()
        m = self.munge
        key = m / "munge.key"
        subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True,
                       capture_output=True, env=self.env)
        key.chmod(0o600)
        self._daemon("munged", _which("munged"), "--foreground", f"--socket={m}/munge.socket",
                     f"--key-file={key}", f"--pid-file={m}/munged.pid",
                     f"--log-file={self.root}/log/munged.log", f"--seed-file={m}/munged.seed")
        self._wait(lambda: (m / "munge.socket").exists(), 10, "munged did not create its socket")
        self._daemon("slurmctld", _which("slurmctld"), "-D", "-f", str(self.conf))
        for n in self.nodes:
            self._daemon(f"slurmd-{n}", _which("slurmd"), "-D", "-f", str(self.conf), "-N", n)

        def all_idle() -> bool:
            r = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
            return all(states.get(n) == "idle" for n in self.nodes)

        self._wait(all_idle, timeout, "the nodes did not become idle")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, p in self.daemons.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}\n{self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} within {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.2)

    def down(self) -> list[str]:
        """Cancel the jobs, stop the daemons, end every process of this cluster by PID.
        Returns what had to be ended after the daemons stopped (empty when all went well)."""
        ctl = self.daemons.get("slurmctld")
        if ctl is not None and ctl.poll() is None:
            if self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
                self.run("scancel", "--user", "root", check=False)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and self.run(
                        "squeue", "-h", "-o", "%i", check=False).stdout.strip():
                    time.sleep(0.5)
        order = [n for n in self.daemons if n.startswith("slurmd-")] + ["slurmctld", "munged"]
        for name in order:
            p = self.daemons.get(name)
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        leftovers = []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.processes()
            if not pids:
                break
            for pid, cmd in pids.items():
                leftovers.append(f"{pid} {cmd}")
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.processes():
                time.sleep(0.2)
        shutil.rmtree(self.munge, ignore_errors=True)
        still = self.processes()
        if still:
            raise RuntimeError(f"processes of the test cluster survived SIGKILL: {still}")
        return sorted(set(leftovers))

    def processes(self) -> dict[int, str]:
        """Live processes started by this cluster: MARKER=<root> in their environment."""
        needle = f"{MARKER}={self.root}\0".encode()
        found = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                if needle in (d / "environ").read_bytes() + b"\0":
                    stat = (d / "stat").read_text()
                    if stat[stat.rindex(")") + 2] == "Z":
                        continue  # a zombie: already dead, waiting for its parent
                    cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    found[int(d.name)] = cmd.strip()[:200]
            except (OSError, ValueError):
                continue
        return found

    # -- using it --------------------------------------------------------------------------

    def run(self, *argv: str, check: bool = True, timeout: float = 60, **kw):
        result = subprocess.run(argv, capture_output=True, text=True, env=kw.pop("env", self.env),
                                timeout=timeout, **kw)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: "
                               f"{result.stdout}{result.stderr}")
        return result

    def sbatch(self, *argv: str, env: dict[str, str | None] | None = None, cwd=None) -> str:
        """Submit; `env` adds to the cluster's environment (a None value removes the name)."""
        merged = {**self.env, **(env or {})}
        merged = {k: v for k, v in merged.items() if v is not None}
        out = self.run("sbatch", "--parsable", *argv, env=merged, cwd=cwd).stdout
        return out.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """One dict per job (one per task of an array job) from `scontrol show job -o`."""
        r = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        return [fields(line) for line in r.stdout.splitlines() if "JobId=" in line]

    def job(self, job_id: str) -> dict[str, str]:
        jobs = self.jobs(job_id)
        return jobs[0] if jobs else {}

    def wait_until(self, job_id: str, ready, timeout: float, what: str = "") -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs(job_id)
            if jobs and ready(jobs):
                return jobs
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id}: not {what or 'ready'} within {timeout:.0f} s: "
                                   f"{[(j.get('JobId'), j.get('JobState')) for j in jobs]}\n"
                                   f"{self.logs()}")
            time.sleep(0.5)

    def wait_finished(self, job_id: str, timeout: float) -> list[dict[str, str]]:
        return self.wait_until(job_id, lambda js: all(j.get("JobState") in TERMINAL for j in js),
                               timeout, "finished")

    def logs(self, lines: int = 25) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*.*")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(parts)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies (even by SIGKILL)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _mem_total_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096
