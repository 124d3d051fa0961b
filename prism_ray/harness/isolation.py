"""The one launcher for every execution of miner code (docs/architecture.md, "Trust boundaries").

bubblewrap with every namespace unshared, all capabilities dropped and a seccomp filter (seccomp.py) that refuses
the kernel's per-uid key store; the filesystem is a read-only whitelist (system dirs, the Python installation, the
bundle, the IPC socket dir) with data dirs, caches and home directories hidden; the only writable places are
size-capped tmpfs mounts (the run's artifacts dir and /tmp). rlimits bound address space, file size and CPU time;
the process count is bounded per run by a pids cgroup of its own (RunCgroup), or, where no cgroup is writable, by
RLIMIT_NPROC, which the kernel counts per uid across every run of the node (docs/operator.md). The parent enforces
the wall clock and kills the whole process group. As root the sandbox runs as an unprivileged uid.
"""

from __future__ import annotations

import functools
import glob
import itertools
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from prism_ray.errors import PrismError
from prism_ray.harness import seccomp

log = logging.getLogger(__name__)

SANDBOX_UID = 65534
LOG_FILE_BYTES = 1 << 20  # what a runner may write to its log on the host; the rest is dropped (the tail is kept)
_TAIL_CHUNKS = 64
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt")
# Text that no import needs, inside the bound dirs: a loop that got past the policy could pretrain on it (a red team
# read the Python docs of the install's pydoc_data, in the very domain of the embedded data).
_TEXT_DIRS = ("/usr/share/doc", "/usr/share/man", "/usr/share/info", "/usr/share/dict")


@dataclass(frozen=True)
class SandboxPolicy:
    mode: Literal["required", "auto", "off"] = "auto"
    readable: tuple[Path, ...] = ()
    hidden: tuple[Path, ...] = ()
    artifacts_dir: Path | None = None
    artifacts_quota_bytes: int = 256 << 20
    tmp_quota_bytes: int = 1 << 30
    address_space_bytes: int | None = None
    file_size_bytes: int = 1 << 30
    cpu_seconds: int | None = None
    max_processes: int = 512
    gpu: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def sandbox_available() -> bool:
    return bwrap_path() is not None


def _python_dirs() -> list[Path]:
    """The interpreter, its stdlib and site-packages, and the prism_ray package itself — not the script dir or cwd,
    and not the checkout an editable install points into (its .git and tests hold copies of the locked text)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, *sysconfig.get_paths().values()}
    paths.update(entry for entry in sys.path if "site-packages" in entry or "dist-packages" in entry)
    paths.add(str(Path(__file__).resolve().parents[1]))  # the package dir alone (editable installs)
    resolved = {Path(p).resolve() for p in paths if p and Path(p).exists()}
    return sorted(p for p in resolved if p != Path("/tmp"))


class _Mounts:
    """Builds bwrap mount arguments; bwrap makes missing parents 0700, so ancestors are made 0755 first
    (the sandbox runs as an unprivileged uid and must be able to walk to what it may read)."""

    def __init__(self) -> None:
        self.args: list[str] = []
        self.made: set[str] = {"/"}
        self.bound: list[str] = []

    def _parents(self, path: str) -> None:
        parts = Path(path).parts
        for depth in range(2, len(parts)):
            ancestor = str(Path(*parts[:depth]))
            if ancestor in self.made or any(ancestor.startswith(b + "/") or ancestor == b for b in self.bound):
                continue
            self.args += ["--perms", "0755", "--dir", ancestor]
            self.made.add(ancestor)

    def add(self, option: str, source: str, target: str) -> None:
        self._parents(target)
        self.args += [option, source, target]
        self.made.add(target)
        self.bound.append(target)

    def tmpfs(self, target: str, size: int | None = None, perms: str | None = None) -> None:
        self._parents(target)
        self.args += (["--perms", perms] if perms else []) + (["--size", str(size)] if size else []) + ["--tmpfs",
                                                                                                     target]
        self.made.add(target)


def _bind_once(mounts: _Mounts, path: Path) -> None:
    """Read-only bind `path` unless a dir already bound holds it."""
    if not any(str(path) == b or str(path).startswith(b + "/") for b in mounts.bound):
        mounts.add("--ro-bind", str(path), str(path))


def bwrap_args(policy: SandboxPolicy, as_root: bool, syscalls: int | None = None) -> list[str]:
    """`syscalls`: a descriptor holding the seccomp filter (seccomp.py), which bubblewrap reads."""
    # As root there is no user namespace (its uid map would hold only root); setpriv drops to SANDBOX_UID. It keeps
    # CAP_SETPCAP for setpriv to empty the bounding set: bubblewrap leaves the capabilities it does not know (a newer
    # kernel's) in it, and dropping those needs CAP_SETPCAP. setpriv then drops every capability, this one too.
    namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                  "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add",
                  "CAP_SETPCAP"] if as_root else \
        ["--unshare-all", "--cap-drop", "ALL"]
    mounts = _Mounts()
    for system_dir in _SYSTEM_DIRS:
        if os.path.islink(system_dir):
            mounts.args += ["--symlink", os.readlink(system_dir), system_dir]
        elif os.path.isdir(system_dir):
            mounts.add("--ro-bind", system_dir, system_dir)
    # An install under /tmp (a venv in a temp dir) is bound after the sandbox's own fresh /tmp, which would hide it.
    python_dirs = _python_dirs()
    in_tmp = [path for path in python_dirs if Path("/tmp") in path.parents]
    for path in [path for path in python_dirs if path not in in_tmp]:
        _bind_once(mounts, path)
    if policy.gpu:
        for device in sorted(glob.glob("/dev/nvidia*")):
            mounts.args += ["--dev-bind", device, device]
        mounts.add("--ro-bind", "/sys", "/sys")
    mounts.tmpfs("/tmp", size=policy.tmp_quota_bytes, perms="1777")
    for path in in_tmp:
        _bind_once(mounts, path)
    # Hide data, caches and secrets that sit inside a bound dir (e.g. the embedded data of an editable install).
    for path in (*policy.hidden, *_TEXT_DIRS, Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data"):
        resolved = Path(path).resolve()
        if not any(str(resolved).startswith(b + "/") for b in mounts.bound):
            continue  # outside every bound dir: not in the sandbox at all
        if resolved.is_dir():
            mounts.tmpfs(str(resolved), perms="0000")
        elif resolved.is_file():
            mounts.args += ["--ro-bind", "/dev/null", str(resolved)]
    for path in policy.readable:
        mounts.add("--ro-bind", str(path), str(path))
    chdir = ["--chdir", "/tmp"]
    if policy.artifacts_dir is not None:
        mounts.tmpfs(str(policy.artifacts_dir), size=policy.artifacts_quota_bytes, perms="0777")
        chdir = ["--chdir", str(policy.artifacts_dir)]
    seccomp_args = ["--seccomp", str(syscalls)] if syscalls is not None else []
    args = [bwrap_path() or "bwrap", *namespaces, "--die-with-parent", "--new-session", "--dev", "/dev",
            "--proc", "/proc", *mounts.args, *chdir, *seccomp_args, "--"]
    if as_root:
        args += ["setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups",
                 "--inh-caps=-all", "--bounding-set=-all", "--"]
    return args


CGROUP_NAME = "prism-ray"  # the cgroup under the launcher's own that holds one child cgroup per sandboxed process
_run_numbers = itertools.count()


@functools.cache
def _cgroup_home() -> Path | None:
    """Where per-run pids cgroups can be made: `prism-ray` under this process's own cgroup, in the cgroup v2
    hierarchy when it has the pids controller, else in the v1 pids hierarchy; None when neither is writable."""
    try:
        memberships = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
        mounts = [line.split(" - ") for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    except OSError:
        return None
    candidates = []
    for before, after in (mount for mount in mounts if len(mount) == 2):
        root, point = before.split()[3:5]
        kind, _, options = after.split()[:3]
        for _, controllers, path in memberships:
            v2 = kind == "cgroup2" and controllers == ""
            v1 = kind == "cgroup" and "pids" in controllers.split(",") and "pids" in options.split(",")
            if (v2 or v1) and (path == root or path.startswith(root.rstrip("/") + "/")):
                candidates.append((v2, Path(point) / path[len(root):].lstrip("/")))
    for v2, own in sorted(candidates, key=lambda candidate: not candidate[0]):  # v2 first
        try:
            home = own / CGROUP_NAME
            if v2:
                if "pids" not in (own / "cgroup.controllers").read_text().split():
                    continue
                if "pids" not in (own / "cgroup.subtree_control").read_text().split():
                    (own / "cgroup.subtree_control").write_text("+pids")
            home.mkdir(exist_ok=True)
            if v2:
                (home / "cgroup.subtree_control").write_text("+pids")
            return home
        except OSError:
            continue
    return None


class RunCgroup:
    """One sandboxed process's own pids cgroup: a fork bomb exhausts its own limit, not the node's per-uid one."""

    def __init__(self, path: Path, max_processes: int):
        self.path = path
        path.mkdir()
        (path / "pids.max").write_text(str(max_processes))
        self._procs = os.fsencode(path / "cgroup.procs")

    @classmethod
    def create(cls, max_processes: int) -> RunCgroup | None:
        home = _cgroup_home()
        if home is None:
            return None
        try:
            return cls(home / f"run-{os.getpid()}-{next(_run_numbers)}", max_processes)
        except OSError as error:
            log.warning("cannot make a pids cgroup under %s (%s)", home, error)
            return None

    def enter(self) -> None:
        """Move the calling process in; runs in the child between fork and exec, so it only makes syscalls."""
        fd = os.open(self._procs, os.O_WRONLY)
        try:
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)

    def release(self) -> None:
        """Kill whatever is left in it and remove it (the sandbox's pid namespace empties it shortly after)."""
        for _ in range(50):
            try:
                pids = [int(pid) for pid in (self.path / "cgroup.procs").read_text().split()]
            except OSError:
                return  # already gone
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                self.path.rmdir()
                return
            except OSError:
                threading.Event().wait(0.1)
        log.warning("the cgroup %s is still busy; left in place", self.path)


@functools.cache
def _warn_without_cgroup() -> None:
    log.warning("no writable pids cgroup (cgroup v2 with the pids controller, or v1 pids): sandboxed processes are "
                "bounded by RLIMIT_NPROC, which counts every run of uid %d on this node together", SANDBOX_UID)


@functools.cache
def _warn_without_seccomp() -> None:
    log.warning("no seccomp filter for this machine (%s): sandboxes can reach the kernel's per-uid key store, which "
                "runs on this node share (docs/operator.md)", os.uname().machine)



class _Log:
    """Copies a runner's output from a pipe into its log file, at most LOG_FILE_BYTES of it, and keeps the latest
    output in memory for crash reports: a miner's huge exception message cannot fill the host's disk."""

    def __init__(self, pipe, path: Path):
        self.pipe = pipe
        self.path = path
        self.tail: deque[bytes] = deque(maxlen=_TAIL_CHUNKS)
        self.written = 0
        self.dropped = 0
        self.thread = threading.Thread(target=self._copy, name="prism-runner-log", daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        with open(self.path, "ab") as out:
            while chunk := self.pipe.read1(1 << 16):
                self.tail.append(chunk[-4096:])
                room = LOG_FILE_BYTES - self.written
                if room > 0:
                    out.write(chunk[:room])
                    out.flush()
                    self.written += min(room, len(chunk))
                self.dropped += max(0, len(chunk) - max(room, 0))
            if self.dropped:
                out.write(f"\n[prism-ray: {self.dropped:,} more bytes of output were dropped]\n".encode())
        self.pipe.close()

    def text(self) -> str:
        self.thread.join(timeout=2.0)
        return b"".join(self.tail).decode(errors="replace")


class Sandboxed:
    """A launched process: poll it, wait for it, kill its whole process group."""

    def __init__(self, process: subprocess.Popen, log: _Log, sandboxed: bool, cgroup: RunCgroup | None = None):
        self.process = process
        self.log = log
        self.log_path = log.path
        self.sandboxed = sandboxed
        self.cgroup = cgroup

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        return self._ended(self.process.poll())

    def wait(self, timeout: float) -> int | None:
        try:
            return self._ended(self.process.wait(timeout=max(timeout, 0.0)))
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.wait(10.0)

    def _ended(self, code: int | None) -> int | None:
        if code is not None and self.cgroup is not None:
            cgroup, self.cgroup = self.cgroup, None
            cgroup.release()
        return code

    def log_tail(self, lines: int = 30) -> str:
        return redact("\n".join(self.log.text().splitlines()[-lines:]))


def redact(text: str) -> str:
    """Drop values of secret-looking environment variables from text shown to miners."""
    for key, value in os.environ.items():
        if value and len(value) >= 8 and any(word in key.upper() for word in ("KEY", "TOKEN", "SECRET", "PASS")):
            text = text.replace(value, "[redacted]")
    return text


def _set_limits(policy: SandboxPolicy, as_root: bool, cgroup: RunCgroup | None) -> None:
    if cgroup is not None:
        cgroup.enter()
    if policy.address_space_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (policy.address_space_bytes, policy.address_space_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (policy.file_size_bytes, policy.file_size_bytes))
    if policy.cpu_seconds:
        resource.setrlimit(resource.RLIMIT_CPU, (policy.cpu_seconds, policy.cpu_seconds))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if as_root and cgroup is None:  # counted against SANDBOX_UID once setpriv has dropped to it
        resource.setrlimit(resource.RLIMIT_NPROC, (policy.max_processes, policy.max_processes))


def launch(argv: list[str], env: dict[str, str], log_path: Path, cwd: Path, policy: SandboxPolicy) -> Sandboxed:
    use_bwrap = policy.mode != "off" and sandbox_available()
    if policy.mode == "required" and not use_bwrap:
        raise PrismError("sandbox:unavailable", "bubblewrap (bwrap) is not installed; the cluster refuses to run "
                         "miner code without the sandbox (apt-get install bubblewrap)")
    if policy.mode == "auto" and not use_bwrap:
        print("WARNING: bubblewrap is not installed — miner code runs WITHOUT the sandbox "
              "(apt-get install bubblewrap). Never do this with code you do not trust.", file=sys.stderr)
    as_root = use_bwrap and os.geteuid() == 0
    cgroup = RunCgroup.create(policy.max_processes) if use_bwrap else None
    syscalls = seccomp.program_fd() if use_bwrap else None
    if use_bwrap:
        argv = bwrap_args(policy, as_root, syscalls) + argv
        cwd = Path("/")
        if cgroup is None:
            _warn_without_cgroup()
        if syscalls is None:
            _warn_without_seccomp()
    try:
        process = subprocess.Popen(
            argv, env={**env, **policy.extra_env}, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
            pass_fds=() if syscalls is None else (syscalls,),
            preexec_fn=lambda: _set_limits(policy, as_root, cgroup),
        )
    except BaseException:
        if cgroup is not None:
            cgroup.release()
        raise
    finally:
        if syscalls is not None:
            os.close(syscalls)
    return Sandboxed(process, _Log(process.stdout, log_path), use_bwrap, cgroup)
