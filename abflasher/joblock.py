"""One change of the device at a time, across threads and processes (ab-flasherd and the boot check may run at the
same moment at boot): a thread lock plus an flock on state_dir/lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from abflasher import errors


class JobLock:
    def __init__(self, state_dir: str) -> None:
        self._path = Path(state_dir, "lock")
        self._thread_lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, *, wait: float = 0.0) -> Iterator[None]:
        """Hold the lock for one operation; without ``wait``, a holder means Busy at once."""
        acquired = self._thread_lock.acquire(timeout=wait) if wait > 0 else self._thread_lock.acquire(blocking=False)
        if not acquired:
            raise errors.Busy("another update or boot operation is running")
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                deadline = time.monotonic() + wait
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise errors.Busy(
                                "another ab-flasher process (the service or the boot check) is changing the device"
                            ) from None
                        time.sleep(0.2)
                yield
            finally:
                os.close(fd)
        finally:
            self._thread_lock.release()
