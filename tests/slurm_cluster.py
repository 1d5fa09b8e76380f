"""A private one-node SLURM cluster for tests (Debian's ``slurm-wlm`` + ``munge``).

Everything lives in a temporary folder: a fresh munge key, a private ``munged`` on its own
socket, a generated ``slurm.conf`` on free TCP ports, ``slurmctld`` and ``slurmd`` run in the
foreground as children of the test process. Nothing global is written: the daemons get
``-f <conf>`` and every client call gets ``SLURM_CONF=<conf>`` through :meth:`SlurmCluster.env`
(``os.environ`` of the test process is left alone).

Use it from a test module::

    from .slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)

    def test_something(slurm_cluster, tmp_path):
        result = slurm_cluster.submit_array("scripts/slurm_generate.sbatch", array="0-2",
                                            args=["recipe.yaml"], cwd=tmp_path)
        assert result.ok, result.report()
        assert result.exit_codes == [0, 0, 0]

(or import it once in tests/conftest.py). Without pytest:
``with SlurmCluster.start() as cluster: ...``; ``python tests/slurm_cluster.py`` starts one,
prints ``sinfo`` and stops it.

If the binaries are missing or a daemon does not come up, the fixture calls ``pytest.skip``
with the precise reason (including the daemon's log tail). Set ``MDSD3_REQUIRE_SLURM=1`` to
turn that skip into a failure.

The cluster is started once per test process, however many modules import the fixture, and
stopped when the last user is torn down (or at interpreter exit as a safety net).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["ArrayResult", "SlurmCluster", "SlurmUnavailable", "slurm_cluster"]

_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
_CLIENTS = ("sbatch", "sinfo", "squeue", "scontrol", "scancel")
_DAEMONS = ("munged", "slurmctld", "slurmd")
START_TIMEOUT_S = 45.0


class SlurmUnavailable(RuntimeError):
    """The cluster cannot run here; the message says exactly why."""


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in _SBIN_DIRS:
        p = Path(d, name)
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no {path.name})"
    out = text.strip().splitlines()[-lines:]
    return "\n".join(out) if out else f"({path.name} is empty)"


def _mem_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                kb = int(line.split()[1])
                # slurmd drains a node whose configured memory exceeds what it measures;
                # leave a margin for rounding between /proc/meminfo and slurmd's sysconf.
                return max(1, int(kb / 1024 * 0.95))
    return 1024


def _die_with_parent() -> None:
    """In the daemon (before exec): get SIGTERM when the test process dies, so a killed
    pytest (CI timeout, kill -9) leaves no daemons behind. Best effort, Linux only."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ without any SLURM_* left over from an enclosing allocation."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    if extra:
        env.update(extra)
    return env


@dataclass
class ArrayResult:
    """Outcome of one array submission, in task-id order."""

    job_id: str
    task_ids: list[int]
    exit_codes: list[int]  # per task; 128+signal when killed by a signal, -1 if unknown
    states: list[str]  # COMPLETED, FAILED, TIMEOUT, CANCELLED, ...
    outputs: dict[int, str]  # task id -> content of its slurm output file
    sbatch_returncode: int  # of the submission itself
    sbatch_output: str
    output_files: dict[int, Path] = field(default_factory=dict)
    timed_out: bool = False  # cancelled after submit_array's timeout
    never_ran: str = ""  # array indices still pending when it ended (after a timeout)

    @property
    def ok(self) -> bool:
        return (
            bool(self.task_ids)
            and not self.timed_out
            and not self.never_ran
            and all(c == 0 for c in self.exit_codes)
            and all(s == "COMPLETED" for s in self.states)
        )

    @property
    def failures(self) -> dict[int, str]:
        """task id -> output file content, for every task that did not complete with 0."""
        return {
            t: self.outputs.get(t, "")
            for t, c, s in zip(self.task_ids, self.exit_codes, self.states)
            if c != 0 or s != "COMPLETED"
        }

    def report(self, max_chars: int = 4000) -> str:
        """A message for ``assert result.ok, result.report()``."""
        lines = [
            f"job {self.job_id or '(not submitted)'}: sbatch rc={self.sbatch_returncode}"
            + (" TIMED OUT (cancelled)" if self.timed_out else "")
            + (f", never ran: {self.never_ran}" if self.never_ran else ""),
            f"tasks {self.task_ids} exit codes {self.exit_codes} states {self.states}",
        ]
        if self.sbatch_returncode != 0 or not self.task_ids:
            lines.append(f"sbatch output:\n{self.sbatch_output.strip()}")
        for t, text in self.failures.items():
            text = text if len(text) <= max_chars else "...\n" + text[-max_chars:]
            lines.append(f"--- task {t} ({self.output_files.get(t, 'no output file')}) ---\n{text}")
        return "\n".join(lines)


class SlurmCluster:
    """A running one-node cluster. Build with :meth:`start`; stop with :meth:`stop`."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "etc" / "slurm.conf"
        self.logs = root / "log"
        self.job_logs = root / "jobs"
        self.munge_socket = root / "munge" / "munge.socket"
        self.nodename = socket.gethostname().split(".")[0]
        self.cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.mem_mb = _mem_mb()
        self.bins: dict[str, str] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.start_seconds: float | None = None
        self._stopped = False

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def start(cls, timeout: float = START_TIMEOUT_S) -> SlurmCluster:
        """Start munged, slurmctld, slurmd; return once the node is idle.

        Raises :class:`SlurmUnavailable` (after cleaning up) when anything is missing or fails.
        """
        missing = [b for b in _DAEMONS + _CLIENTS + ("slurmstepd",) if _which(b) is None]
        if missing:
            raise SlurmUnavailable(
                f"SLURM/munge binaries not found: {', '.join(missing)} "
                "(install with: apt-get install -y slurm-wlm munge)"
            )
        if os.geteuid() != 0:
            raise SlurmUnavailable(
                "the test SLURM cluster runs its daemons as root (SlurmUser=root); "
                f"this process runs as uid {os.geteuid()}"
            )
        root = Path(tempfile.mkdtemp(prefix="mdsd3-slurm-"))
        if len(str(root)) > 70:  # keep the munge socket path under the 108-byte limit
            shutil.rmtree(root, ignore_errors=True)
            root = Path(tempfile.mkdtemp(prefix="mdsd3-slurm-", dir="/tmp"))
        cluster = cls(root)
        t0 = time.monotonic()
        try:
            cluster.bins = {b: _which(b) for b in _DAEMONS + _CLIENTS + ("slurmstepd", "mungekey")}  # type: ignore[misc]
            cluster._prepare_dirs()
            cluster._start_munge()
            cluster._write_conf()
            cluster._start_daemon("slurmctld", [cluster.bins["slurmctld"], "-D", "-c", "-f", str(cluster.conf)])
            cluster._wait_ctld(t0 + timeout)
            cluster._start_daemon(
                "slurmd", [cluster.bins["slurmd"], "-D", "-f", str(cluster.conf), "-N", cluster.nodename]
            )
            cluster._wait_idle(t0 + timeout)
        except (subprocess.TimeoutExpired, OSError) as e:
            cluster.stop()
            raise SlurmUnavailable(f"cluster start failed: {e}") from e
        except BaseException:
            cluster.stop()
            raise
        cluster.start_seconds = time.monotonic() - t0
        return cluster

    def __enter__(self) -> SlurmCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Cancel jobs, stop the daemons, remove the temp folder. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                self._client(["scancel", "--full", "--user", str(os.geteuid())], timeout=10)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    q = self._client(["squeue", "-h", "-o", "%i"], timeout=10)
                    if q.returncode != 0 or not q.stdout.strip():
                        break
                    time.sleep(0.3)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        for p in self.procs.values():
            for stream in (p.stdout, p.stderr):
                if stream:
                    with contextlib.suppress(Exception):
                        stream.close()
        if os.environ.get("MDSD3_KEEP_SLURM_DIR"):
            print(f"[slurm_cluster] kept {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ setup steps
    def _prepare_dirs(self) -> None:
        # munged insists that every directory above its socket is world-executable
        # and that nothing above the key file is group/world-writable.
        os.chmod(self.root, 0o755)
        for d in ("etc", "log", "munge", "munge-key", "state", "spool", "run", "jobs"):
            (self.root / d).mkdir(mode=0o755, exist_ok=True)
        os.chmod(self.root / "munge-key", 0o700)
        os.chmod(self.root / "jobs", 0o1777)

    def _start_munge(self) -> None:
        key = self.root / "munge-key" / "munge.key"
        if self.bins.get("mungekey"):
            r = subprocess.run(
                [self.bins["mungekey"], "-c", "-b", "1024", "-k", str(key)], capture_output=True, text=True
            )
            if r.returncode != 0:
                raise SlurmUnavailable(f"mungekey failed (rc={r.returncode}): {r.stderr.strip()}")
        else:
            key.write_bytes(os.urandom(128))
        os.chmod(key, 0o600)
        self._start_daemon(
            "munged",
            [
                self.bins["munged"],
                "-F",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={self.root / 'run' / 'munged.pid'}",
                f"--seed-file={self.root / 'run' / 'munged.seed'}",
                f"--log-file={self.logs / 'munged.log'}",
            ],
        )
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            self._check_alive("munged")
            if time.monotonic() > deadline:
                raise SlurmUnavailable("munged did not create its socket in 10 s:\n" + self.log_tail("munged"))
            time.sleep(0.05)

    def _write_conf(self) -> None:
        r, host = self.root, self.nodename
        ctld_port, slurmd_port = _free_port(), _free_port()
        while slurmd_port == ctld_port:
            slurmd_port = _free_port()
        self.conf.write_text(f"""\
# Generated by tests/slurm_cluster.py for a throwaway one-node test cluster.
ClusterName=mdsd3test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "run" / "slurmctld.pid"}
SlurmdPidFile={r / "run" / "slurmd.pid"}
SlurmctldLogFile={self.logs / "slurmctld.log"}
SlurmdLogFile={self.logs / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
Waittime=0
SchedulerParameters=batch_sched_delay=0,sched_interval=1
NodeName={host} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={self.cpus} RealMemory={self.mem_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")

    def _start_daemon(self, name: str, argv: list[str]) -> None:
        out = open(self.logs / f"{name}.out", "wb")
        try:
            self.procs[name] = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=_clean_env({"SLURM_CONF": str(self.conf)}),
                preexec_fn=_die_with_parent,
            )
        except OSError as e:
            raise SlurmUnavailable(f"cannot exec {name} ({argv[0]}): {e}") from e
        finally:
            out.close()

    def _check_alive(self, name: str) -> None:
        p = self.procs.get(name)
        if p is not None and p.poll() is not None:
            raise SlurmUnavailable(f"{name} exited with code {p.returncode} during startup:\n{self.log_tail(name)}")

    def _wait_ctld(self, deadline: float) -> None:
        last = ""
        while True:
            self._check_alive("munged")
            self._check_alive("slurmctld")
            r = self._client(["scontrol", "ping"], timeout=10)
            last = (r.stdout + r.stderr).strip()
            if r.returncode == 0 and "UP" in r.stdout:
                return
            if time.monotonic() > deadline:
                raise SlurmUnavailable(
                    f"slurmctld did not answer `scontrol ping` ({last}):\n" + self.log_tail("slurmctld")
                )
            time.sleep(0.2)

    def _wait_idle(self, deadline: float) -> None:
        last, bad_since = "", None
        while True:
            for name in _DAEMONS:
                self._check_alive(name)
            r = self._client(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=10)
            last = (r.stdout + r.stderr).strip()
            states = dict(line.split(None, 1) for line in r.stdout.strip().splitlines() if " " in line)
            state = states.get(self.nodename, "")
            if r.returncode == 0 and state.rstrip("*~#$@^-") == "idle":
                return
            # "down*" is normal until slurmd registers; a node that stays down/drained/invalid
            # for 10 s after that will not recover by itself.
            bad = state.startswith(("drain", "down", "inval", "fail"))
            bad_since = (bad_since or time.monotonic()) if bad else None
            if bad_since is not None and time.monotonic() - bad_since > 10:
                reason = self._client(["scontrol", "show", "node", self.nodename], timeout=10).stdout
                raise SlurmUnavailable(
                    f"node {self.nodename} is {state}:\n{reason.strip()}\n" + self.log_tail("slurmd")
                )
            if time.monotonic() > deadline:
                raise SlurmUnavailable(
                    f"node {self.nodename} not idle in time (sinfo: {last!r}):\n"
                    + self.log_tail("slurmctld")
                    + "\n"
                    + self.log_tail("slurmd")
                )
            time.sleep(0.2)

    # ------------------------------------------------------------------ clients
    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for SLURM client commands (and the jobs they submit)."""
        env = _clean_env(extra)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def _client(self, argv: Sequence[str], timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        argv = [self.bins.get(argv[0]) or argv[0], *argv[1:]]
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=kw.pop("env", None) or self.env(),
            stdin=subprocess.DEVNULL,
            **kw,
        )

    def run(self, *argv: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """Run a SLURM client (``cluster.run("squeue")``) against this cluster."""
        r = self._client(list(argv), timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed (rc={r.returncode}):\n{r.stdout}{r.stderr}")
        return r

    def log_tail(self, name: str, lines: int = 25) -> str:
        # Daemons run with -D, which copies their log to stdout (.out), including messages
        # written before the log file (.log) is opened; fall back to .log otherwise.
        for suffix in (".out", ".log"):
            p = self.logs / f"{name}{suffix}"
            if p.exists() and p.stat().st_size:
                return f"[{p}]\n{_tail(p, lines)}"
        return f"(no log from {name})"

    def submit_array(
        self,
        script: str | os.PathLike,
        array: str = "0-2",
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        sbatch_args: Sequence[str] = (),
        timeout: float = 120,
        output_dir: str | os.PathLike | None = None,
    ) -> ArrayResult:
        """``sbatch --array=ARRAY [sbatch_args] SCRIPT [args]``; wait for every task; collect results.

        The job inherits the test process's environment (minus any SLURM_* variables) plus
        ``env``; it runs in ``cwd`` (default: the current directory). Each task's stdout+stderr
        goes to ``output_dir/<script stem>-<jobid>_<task>.out`` (default: the cluster's job-log
        folder) and is returned in ``ArrayResult.outputs``. Failing tasks do not raise: check
        ``result.ok`` / ``result.exit_codes`` and use ``result.report()`` as assertion message.
        After ``timeout`` seconds the job is cancelled and ``result.timed_out`` is set.
        (``sbatch --wait`` polls with growing sleeps, ~10 s per array here; polling
        ``scontrol`` every 0.25 s gets the same answer in ~1-3 s.)
        """
        if self._stopped:
            raise RuntimeError("cluster already stopped")
        script = Path(script)
        cwd = Path(cwd) if cwd is not None else Path.cwd()
        out_dir = Path(output_dir) if output_dir is not None else self.job_logs
        out_dir.mkdir(parents=True, exist_ok=True)
        pattern = out_dir / f"{script.stem}-%A_%a.out"
        argv = [
            self.bins["sbatch"],
            "--parsable",
            f"--array={array}",
            f"--chdir={cwd}",
            f"--output={pattern}",
            f"--error={pattern}",
            *sbatch_args,
            str(script),
            *map(str, args),
        ]
        deadline = time.monotonic() + timeout
        r = subprocess.run(
            argv, capture_output=True, text=True, timeout=60, cwd=cwd, env=self.env(env), stdin=subprocess.DEVNULL
        )
        sb_out = (r.stdout + r.stderr).strip()
        m = re.match(r"\s*(\d+)", r.stdout)
        job_id = m.group(1) if r.returncode == 0 and m else ""
        tasks: dict[int, tuple[int, str]] = {}
        pending = ""
        timed_out = False
        while job_id:
            tasks, pending, done = self._task_records(job_id)
            if done:
                break
            if time.monotonic() > deadline:
                timed_out = True
                self._client(["scancel", job_id], timeout=10)
                time.sleep(1)
                tasks, pending, _ = self._task_records(job_id)
                break
            time.sleep(0.25)
        task_ids = sorted(tasks)
        outputs, files = {}, {}
        for t in task_ids:
            f = out_dir / f"{script.stem}-{job_id}_{t}.out"
            files[t] = f
            outputs[t] = f.read_text(errors="replace") if f.exists() else f"(no output file {f})"
        return ArrayResult(
            job_id=job_id,
            task_ids=task_ids,
            exit_codes=[tasks[t][0] for t in task_ids],
            states=[tasks[t][1] for t in task_ids],
            outputs=outputs,
            sbatch_returncode=r.returncode,
            sbatch_output=sb_out,
            output_files=files,
            timed_out=timed_out,
            never_ran=pending,
        )

    _TERMINAL = {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
        "SPECIAL_EXIT",
        "REVOKED",
    }

    def _task_records(self, job_id: str) -> tuple[dict[int, tuple[int, str]], str, bool]:
        """From ``scontrol show job`` (records kept for MinJobAge): task id -> (exit code, state),
        the not-yet-split pending remainder (e.g. ``"3-7"``), and whether everything has ended."""
        r = self._client(["scontrol", "-o", "show", "job", job_id], timeout=30)
        if r.returncode != 0:
            return {}, "", False
        tasks: dict[int, tuple[int, str]] = {}
        pending, done = [], True
        for line in r.stdout.splitlines():
            get = lambda key, line=line: (re.search(rf"(?:^|\s){key}=(\S*)", line) or [None, ""])[1]  # noqa: E731
            task, state = get("ArrayTaskId"), get("JobState")
            if not task.isdigit():  # the array's remainder that has not started yet
                if task:
                    pending.append(task)
                done = done and state in self._TERMINAL
                continue
            code, _, sig = (get("ExitCode") or "-1:0").partition(":")
            try:
                ec = int(code)
                if ec == 0 and sig and int(sig):
                    ec = 128 + int(sig)
            except ValueError:
                ec = -1
            tasks[int(task)] = (ec, state or "UNKNOWN")
            done = done and state in self._TERMINAL
        return tasks, ",".join(pending), done and bool(r.stdout.strip())


# ---------------------------------------------------------------------- shared per process
_lock = threading.Lock()
_shared: SlurmCluster | None = None
_shared_error: str | None = None
_users = 0


def _acquire() -> SlurmCluster:
    global _shared, _shared_error, _users
    with _lock:
        if _shared_error is not None:
            raise SlurmUnavailable(_shared_error)
        if _shared is None:
            try:
                _shared = SlurmCluster.start()
            except SlurmUnavailable as e:
                _shared_error = str(e)
                raise
            atexit.register(_shared.stop)
        _users += 1
        return _shared


def _release() -> None:
    global _shared, _users
    with _lock:
        _users -= 1
        if _users <= 0 and _shared is not None:
            _shared.stop()
            _shared = None


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Session-wide one-node SLURM cluster; skips (with the reason) when it cannot start."""
    try:
        cluster = _acquire()
    except SlurmUnavailable as e:
        if os.environ.get("MDSD3_REQUIRE_SLURM", "") not in ("", "0"):
            pytest.fail(f"SLURM test cluster unavailable (MDSD3_REQUIRE_SLURM is set): {e}")
        pytest.skip(f"SLURM test cluster unavailable: {e}")
    try:
        yield cluster
    finally:
        _release()


if __name__ == "__main__":  # manual check: python tests/slurm_cluster.py
    with SlurmCluster.start() as c:
        print(f"cluster up in {c.start_seconds:.1f} s; SLURM_CONF={c.conf}")
        print(c.run("sinfo").stdout)
