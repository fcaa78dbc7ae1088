"""The health checks of a trial boot (``run_health_checks``), each run so that it can never outlive its timeout.

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
import logging
import os
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from abflasher.commands import Runner
from abflasher.config import Config

log = logging.getLogger(__name__)

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



def run_health_checks(config: Config, *, check_runner: Runner = run_check, runner: Runner) -> tuple[bool, str]:
    """Every executable in health.d must exit 0 in time (each run by ``check_runner``); then systemd (asked through
    ``runner``) must say the system is running. Returns (healthy, what failed or how many passed)."""
    failures: list[str] = []
    health_dir = Path(config.health_dir)
    checks = sorted(p for p in health_dir.iterdir() if p.is_file()) if health_dir.is_dir() else []
    for check in checks:
        if not os.access(check, os.X_OK):
            log.info("health check %s is not executable; skipped", check)
            continue
        try:
            done = check_runner([str(check)], config.health_timeout)
        except subprocess.TimeoutExpired:
            failures.append(f"{check.name} timed out after {config.health_timeout:g} s")
            continue
        except OSError as exc:
            failures.append(f"{check.name} could not run: {exc.strerror}")
            continue
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()
            failures.append(f"{check.name} exited {done.returncode}" + (f": {detail[-1]}" if detail else ""))
    if config.health_systemd != "off" and Path("/run/systemd/system").is_dir():
        try:
            done = runner(["systemctl", "is-system-running", "--wait"], config.health_timeout)
            status = done.stdout.strip()
        except (subprocess.TimeoutExpired, OSError) as exc:
            status = f"unknown ({exc})"
        allowed = {"running"} | ({"degraded"} if config.health_systemd == "degraded-ok" else set())
        if status not in allowed:
            failures.append(f"systemd reports the system {status}")
    if failures:
        return False, "; ".join(failures)
    return True, f"{len(checks)} health checks passed"
