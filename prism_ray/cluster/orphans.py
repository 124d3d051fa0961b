"""Ray's agents left behind by a local cluster whose owner died hard (`kill -9` of `prism-ray serve`): the raylet
goes, its `ray::DashboardAgent` and `ray::RuntimeEnvAgent` are re-parented to init and hold their ports for a long
while. Each start of a local cluster records its Ray session dir in the state dir; the next start reaps the agents
of that session that have no parent left (docs/operator.md, "Stopping and restarting"). Nothing of another session,
nor anything still parented, is touched."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

SESSION_FILE = "ray-session"  # in the state dir: the Ray session dir of the last local cluster started there
_EXIT_WAIT_SECONDS = 5.0
log = logging.getLogger(__name__)


def remember_session(state_dir: Path, session_dir: str) -> None:
    (state_dir / SESSION_FILE).write_text(session_dir + "\n")


def reap(state_dir: Path) -> list[int]:
    """SIGKILL the orphaned Ray processes of the session recorded in `state_dir`; their pids (they have exited
    when this returns, or a warning says which have not)."""
    recorded = state_dir / SESSION_FILE
    if not recorded.is_file():
        return []
    session = recorded.read_text().strip()
    orphans = [pid for pid in _ray_orphans() if _uses(pid, session)]
    for pid in orphans:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + _EXIT_WAIT_SECONDS
    while (left := [pid for pid in orphans if Path(f"/proc/{pid}").exists() and not _zombie(pid)]) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        log.warning("orphaned Ray processes %s of %s did not exit", left, session)
    if orphans:
        log.warning("reaped %d orphaned Ray process(es) of the previous cluster (%s)", len(orphans), session)
    return orphans


def _ray_orphans() -> list[int]:
    """This user's `ray::*` processes whose parent is gone (re-parented to init)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            title = (stat.parent / "cmdline").read_bytes().split(b"\0", 1)[0]
            owner = stat.parent.stat().st_uid
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        if ppid == 1 and title.startswith(b"ray::") and owner == os.getuid():
            found.append(int(stat.parent.name))
    return found


def _uses(pid: int, session: str) -> bool:
    """Whether the process has a file of `session` open (every Ray process keeps its session's logs open)."""
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd).startswith(session + "/"):
                return True
        except OSError:
            continue  # closed meanwhile
    return False


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True
