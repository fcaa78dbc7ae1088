"""Real unprivileged users for service tests, and running commands as them against a private bus.

:class:`TestUsers` makes one user in the ``abflasher`` group and one not, and removes them (and whatever still runs
as them) afterwards; :func:`run_as` and :func:`popen_as` run a command as one of them with a clean environment.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import secrets
import signal
import subprocess
from collections.abc import Sequence
from typing import Any

from abflasher.service.contract import GROUP
from tests.support.bus import DBusDaemon, wait_until


class TestUsers:
    """Two real unprivileged users: ``member`` (in the abflasher group) and ``outsider`` (not)."""

    __test__ = False

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.member = f"abft-m-{tag}"
        self.outsider = f"abft-o-{tag}"
        self._created_users: list[str] = []
        self._created_group = False
        try:
            try:
                grp.getgrnam(GROUP)
            except KeyError:
                subprocess.run(["groupadd", "--system", GROUP], check=True, capture_output=True, timeout=30)
                self._created_group = True
            for name, groups in ((self.member, [GROUP]), (self.outsider, [])):
                cmd = ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                       "--shell", "/usr/sbin/nologin"]
                if groups:
                    cmd += ["--groups", ",".join(groups)]
                subprocess.run([*cmd, name], check=True, capture_output=True, timeout=30)
                self._created_users.append(name)
        except BaseException:
            self.close()
            raise

    def uid(self, name: str) -> int:
        return pwd.getpwnam(name).pw_uid

    def close(self) -> None:
        uids = set()
        for name in self._created_users:
            with contextlib.suppress(KeyError):
                uids.add(pwd.getpwnam(name).pw_uid)
        _kill_processes_of(uids)
        for name in self._created_users:
            subprocess.run(["userdel", name], capture_output=True, timeout=30, check=False)
        self._created_users.clear()
        if self._created_group:
            subprocess.run(["groupdel", GROUP], capture_output=True, timeout=30, check=False)
            self._created_group = False


def _pids_of(uids: set[int]) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid in uids:
                    pids.append(int(entry))
    return pids


def _kill_processes_of(uids: set[int]) -> None:
    """Whatever still runs as the test users (a process left behind by a failed test; runuser forks, so a test
    stopping runuser with SIGKILL would leave its child): killed by PID, so the users can be deleted."""
    if not uids:
        return
    for pid in _pids_of(uids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not _pids_of(uids), timeout=10, what="the test users' processes to exit")


def _as_user(
    user: str, argv: Sequence[str | os.PathLike[str]], bus: DBusDaemon, extra_env: dict[str, str] | None
) -> list[str]:
    """``argv`` as ``user`` (runuser) with a clean environment pointing at the private system bus."""
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/tmp",
        "LANG": "C.UTF-8",
        "DBUS_SYSTEM_BUS_ADDRESS": bus.address,
        **(extra_env or {}),
    }
    return ["runuser", "-u", user, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()), *map(str, argv)]


def run_as(
    user: str, argv: Sequence[str | os.PathLike[str]], *, bus: DBusDaemon, timeout: float = 60.0,
    input_bytes: bytes | None = None, extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        _as_user(user, argv, bus, extra_env), input=input_bytes, capture_output=True, timeout=timeout, check=False
    )


def popen_as(
    user: str, argv: Sequence[str | os.PathLike[str]], *, bus: DBusDaemon, extra_env: dict[str, str] | None = None,
    **kwargs: Any,
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(_as_user(user, argv, bus, extra_env), **kwargs)
