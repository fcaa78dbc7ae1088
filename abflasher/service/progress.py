"""Progress, from the engine's worker thread to the event loop: throttled, and in the form the D-Bus API carries."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from abflasher.image.pipeline import Progress

#: At most one Progress signal per this many seconds (plus the last of each stage).
PROGRESS_INTERVAL = 0.1



class ProgressThrottle:
    """Hands progress reports from a worker thread to the event loop, at most one per ``interval`` seconds.

    The engine may report thousands of times a second. The loop gets the newest report when the interval has passed,
    always the last report of each stage (so every stage ends at its final count), and within a stage ``done`` never
    goes down. :meth:`flush` delivers what is left when the job ends.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, emit: Callable[[Progress], None], interval: float = PROGRESS_INTERVAL
    ) -> None:
        self._loop = loop
        self._emit = emit
        self._interval = interval
        self._lock = threading.Lock()
        self._stage_ends: list[Progress] = []
        self._latest: Progress | None = None
        self._wakeup_pending = False
        self._closed = False
        self._last_emit_time = float("-inf")
        self._last_emitted: Progress | None = None

    def report(self, progress: Progress) -> None:
        """Called from any thread."""
        with self._lock:
            if self._closed:
                return
            if self._latest is not None and self._latest.stage != progress.stage:
                self._stage_ends.append(self._latest)
            self._latest = progress
            if self._wakeup_pending:
                return
            self._wakeup_pending = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: the service is exiting
            self._loop.call_soon_threadsafe(self._deliver)

    def flush(self) -> None:
        """Called on the loop: deliver everything still pending and take no more reports."""
        with self._lock:
            self._closed = True
            due = [*self._stage_ends, *([self._latest] if self._latest is not None else [])]
            self._stage_ends.clear()
            self._latest = None
        for progress in due:
            self._send(progress)

    def _deliver(self) -> None:
        with self._lock:
            self._wakeup_pending = False
            due = list(self._stage_ends)
            self._stage_ends.clear()
            wait = self._last_emit_time + self._interval - time.monotonic()
            if self._latest is not None and (wait <= 0 or due):
                due.append(self._latest)
                self._latest = None
            elif self._latest is not None:
                self._wakeup_pending = True
                self._loop.call_later(wait, self._deliver)
        for progress in due:
            self._send(progress)

    def _send(self, progress: Progress) -> None:
        last = self._last_emitted
        if last is not None and last.stage == progress.stage and (progress.done < last.done or progress == last):
            return
        self._last_emitted = progress
        self._last_emit_time = time.monotonic()
        self._emit(progress)


def progress_tuple(progress: Progress) -> list[Any]:
    """(stage, percent, done, total) as the Progress property and signal carry it.

    ``done``/``total`` count the bytes of the current stage. A stage without a count of its own (preparing,
    configuring) reports the bytes written so far as both, so the last report of a job is the image size.
    """
    if progress.total is None:
        written = max(0, progress.written)
        return [progress.stage, 100 if written else 0, written, written]
    return [progress.stage, progress.percent or 0, max(0, progress.done), max(0, progress.total)]
