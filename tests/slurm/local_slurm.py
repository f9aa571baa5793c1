"""A throw-away single-node SLURM cluster (munged + slurmctld + slurmd) in a temp dir.

Used by the session fixture in ``conftest.py`` and by ``benchmarks/slurm_scale.py``.
It installs nothing: it needs the Debian ``slurm-wlm`` and ``munge`` binaries on PATH
(``.ci/run`` installs them) and root (SlurmUser/SlurmdUser are root, as in a sandbox).

Every daemon runs in the foreground as a child process, so it is stopped by its own PID;
ports are picked free so two clusters (a test session and a benchmark) never collide.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")


class LocalSlurmError(RuntimeError):
    """The local cluster could not be started."""


def missing_binaries() -> list[str]:
    """Names of the binaries a local cluster needs that are not on PATH."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


def _which(name: str) -> str:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    found = shutil.which(name, path=path)
    if found is None:
        raise LocalSlurmError(f"{name} not found on PATH (apt-get install slurm-wlm munge)")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """\
# single-node SLURM for tests/benchmarks (written by tests/slurm/local_slurm.py)
ClusterName=itermaskqc
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/slurmd-%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=2000
MailProg=/bin/true
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
MinJobAge=600
NodeName=localhost CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName={partition} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """Start/stop a one-node SLURM cluster under ``root`` (a fresh temp dir by default).

    After :meth:`start`, ``self.conf`` is the ``slurm.conf`` path; set ``SLURM_CONF`` to it
    (``self.env()`` returns such an environment) for sbatch/squeue/scontrol to reach it.
    """

    def __init__(self, root: str | os.PathLike | None = None, *, cpus: int = 2,
                 mem_mb: int = 20000, partition: str = "debug"):
        # short path: the munge socket path must fit in sockaddr_un (108 bytes)
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="slurm-"))
        self.cpus, self.mem_mb, self.partition = cpus, mem_mb, partition
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge-run" / "munge.socket"

    # -- lifecycle ---------------------------------------------------------------------
    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env.setdefault("LOGNAME", env.get("USER", "root"))  # Nipype's SLURM plugin needs it
        return env

    def start(self, timeout: float = 30.0) -> "LocalSlurm":
        if os.geteuid() != 0:
            raise LocalSlurmError("the local SLURM recipe runs its daemons as root")
        for sub in ("state", "spool", "run", "log", "munge-key", "munge-run", "munge-lib"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munged()
        self.conf.write_text(SLURM_CONF.format(
            root=self.root, munge_socket=self.munge_socket, cpus=self.cpus,
            mem_mb=self.mem_mb, partition=self.partition,
            ctld_port=_free_port(), d_port=_free_port()))
        env = self.env()
        try:
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)],
                        env)
            self._wait_for(lambda: self._run(["scontrol", "ping"]).returncode == 0,
                           timeout, "slurmctld did not answer scontrol ping")
            self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf),
                                   "-N", "localhost"], env)
            self._wait_for(self._node_idle, timeout, "node localhost did not become idle")
        except Exception:
            self.stop()
            raise
        return self

    def _start_munged(self) -> None:
        # munged insists on a key readable only by its owner in a non-writable folder
        key_dir = self.root / "munge-key"
        os.chmod(key_dir, 0o700)
        key = key_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        os.chmod(self.munge_socket.parent, 0o755)
        os.chmod(self.root / "munge-lib", 0o700)
        cmd = [_which("munged"), "-F", "--force",
               f"--socket={self.munge_socket}", f"--key-file={key}",
               f"--pid-file={self.root / 'munge-run' / 'munged.pid'}",
               f"--log-file={self.root / 'log' / 'munged.log'}",
               f"--seed-file={self.root / 'munge-lib' / 'munged.seed'}"]
        self._spawn("munged", cmd, dict(os.environ))
        self._wait_for(self.munge_socket.exists, 15, "munged did not create its socket")

    def _spawn(self, name: str, cmd: list[str], env: dict) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env,
                                            start_new_session=True)
        log.close()

    def _run(self, cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([_which(cmd[0]), *cmd[1:]], env=self.env(),
                              capture_output=True, text=True, timeout=30)

    def _node_idle(self) -> bool:
        out = self._run(["sinfo", "-h", "-N", "-o", "%T"]).stdout.split()
        return bool(out) and all(s.rstrip("*") == "idle" for s in out)

    def _wait_for(self, cond, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise LocalSlurmError(f"{name} exited with {p.returncode}; "
                                          f"see {self.root / 'log'}:\n{self.logs()}")
            if cond():
                return
            time.sleep(0.2)
        raise LocalSlurmError(f"{what} within {timeout:.0f} s; logs:\n{self.logs()}")

    def logs(self, tail: int = 20) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"== {f.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the daemons by PID (slurmd, slurmctld, munged), SIGKILL if they linger."""
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()
