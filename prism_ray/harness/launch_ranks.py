"""`python -m prism_ray.harness.launch_ranks SOCKET N`: inside the trainer's sandbox, start N trainer ranks as
torchrun's agent would, so that they share the sandbox's own loopback for their process group.

No torch and no miner code here: each rank is a `prism_ray.harness.runner` that connects to the parent on its own
and learns its rank from it. The first rank that fails ends the others, and this process exits with that rank's
code, so the parent can tell the memory killer from a crash (docs/architecture.md, "Several ranks").
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> int:
    socket_path, count = sys.argv[1], int(sys.argv[2])
    argv = [sys.executable, "-m", "prism_ray.harness.runner", socket_path, "trainer"]
    alive = {os.posix_spawn(sys.executable, argv, os.environ) for _ in range(count)}
    code = 0
    while alive:
        pid, status = os.wait()
        if pid not in alive:
            continue
        alive.discard(pid)
        ended = os.waitstatus_to_exitcode(status)
        if ended != 0 and code == 0:
            code = ended if ended > 0 else 128 - ended  # killed by signal s: 128 + s, as a shell reports it
            for other in alive:
                os.kill(other, signal.SIGKILL)
    return code


if __name__ == "__main__":
    sys.exit(main())
