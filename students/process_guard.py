"""`python -m distill.students.process_guard PARENT_PID -- COMMAND...`: run COMMAND so that it,
and every process it starts, ends when process PARENT_PID does.

A vLLM server started for a run must not outlive the run, even one killed with SIGKILL; a
parent-death signal on the server alone is not enough, since the server starts engine processes
of its own that would live on. The guard runs the command in a session (and process group) of
its own, outside the guard's: the server's helpers may signal their own group without reaching
the guard. When the guard's parent is gone (it polls every second: a Linux parent-death signal
would fire when the parent's starting *thread* ends, not the process) or the guard is sent
SIGTERM/SIGINT, it sends the command's whole group SIGTERM, waits a little for a clean exit, then
SIGKILL. When the command exits by itself the guard exits with its status. Standard library
only: it starts in milliseconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

GRACE_SECONDS = 10.0


def main(argv: list[str]) -> int:
    parent, command = int(argv[0]), argv[argv.index("--") + 1:]
    child = subprocess.Popen(command, start_new_session=True)

    def end_group(*_ignored) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _signal_group(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(child.pid, signal.SIGKILL)   # whatever of the group is left
        os._exit(1)

    signal.signal(signal.SIGTERM, end_group)
    signal.signal(signal.SIGINT, end_group)
    while True:
        try:
            return child.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            if os.getppid() != parent:
                end_group()


def _signal_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
