"""Running one health check so that it can never outlive its timeout.

``subprocess.run(..., capture_output=True, timeout=...)`` is not enough for an administrator's script: it reads the
pipes to their end, and a grandchild that inherited stdout (``some-daemon &``, a ``sleep`` in a pipeline) keeps
them open, so a check that exited at once is reported only when the timeout expires, as timed out; and on a
timeout it kills only the check itself, so whatever the check started lives on. Here each check runs in its own
session (so its own process group), writes its output to unnamed temporary files instead of pipes (nothing to wait
for but the check itself), and when it exits or times out the whole group gets SIGKILL, so nothing the check
started outlives it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from typing import IO

#: How much of a check's stdout and stderr is kept (the tail): enough for its last message, bounded for a chatty one.
OUTPUT_LIMIT = 64 * 1024
#: After SIGKILL, how long to wait for the check to be reaped. Only a process stuck in the kernel (uninterruptible
#: I/O) survives SIGKILL that long; the boot-check then reports a timeout instead of hanging with it.
REAP_TIMEOUT = 10.0


def _tail(handle: IO[bytes]) -> str:
    size = handle.seek(0, os.SEEK_END)
    handle.seek(max(0, size - OUTPUT_LIMIT))
    return handle.read().decode("utf-8", "replace")


def _kill_group(pgid: int) -> None:
    # Gone already (PermissionError: some kernels give it for a group of zombies only).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def run_check(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a new process group with ``timeout`` seconds; its output is captured as text.

    Whatever happens, nothing of the group is left running when this returns: the group is killed when the check
    exits (leftover background processes) and when it times out. Raises `subprocess.TimeoutExpired` on a timeout
    (with the output so far) and `OSError` when the check cannot be started.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=REAP_TIMEOUT)
            raise subprocess.TimeoutExpired(list(argv), timeout, output=_tail(out), stderr=_tail(err)) from None
        finally:
            # The leader has exited (or was killed): its session leader pid is the group id, and the group may
            # still hold its background processes.
            _kill_group(proc.pid)
        return subprocess.CompletedProcess(list(argv), returncode, _tail(out), _tail(err))
