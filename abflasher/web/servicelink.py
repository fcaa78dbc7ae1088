"""The page's side of the bus: calls to the service (through :class:`abflasher.ctl_client.ServiceClient`, the
client abflasherctl uses) and its signals fanned out to every open event stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dbus_next.signature import Variant

from abflasher.ctl_client import Event, ServiceClient, unwrap

log = logging.getLogger(__name__)

#: Events one slow event-stream reader may fall behind by before the oldest are dropped (it re-reads the status).
SUBSCRIBER_QUEUE = 256
#: Completed results kept for jobs nobody waited for yet (a job can end before its upload registers).
KEPT_RESULTS = 16


@dataclass(frozen=True)
class JobResult:
    job: str
    success: bool
    error: str
    message: str

    @property
    def error_name(self) -> str:
        return self.error.rsplit(".", 1)[-1] if self.error else ""

    def as_json(self) -> dict[str, Any]:
        return {"job": self.job, "success": self.success, "error": self.error_name, "message": self.message}


@dataclass
class ServiceLink:
    client: ServiceClient
    _subscribers: set[asyncio.Queue[dict[str, Any]]] = field(default_factory=set)
    _results: dict[str, JobResult] = field(default_factory=dict)
    _waiters: dict[str, list[asyncio.Future[JobResult]]] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls) -> ServiceLink:
        client = await ServiceClient.connect()
        link = cls(client)
        events = await client.subscribe()
        link._task = asyncio.ensure_future(link._dispatch(events))
        return link

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.client.close()

    # --- calls ----------------------------------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """The service's properties and slots, as plain values."""
        properties = await self.client.properties()
        (slots,) = await self.client.call("GetSlots")
        return {"properties": properties, "slots": unwrap(slots)}

    async def update_from_fd(self, fd: int, options: Mapping[str, Variant]) -> str:
        (job,) = await self.client.call("UpdateFromFd", "ha{sv}", [0, dict(options)], fds=[fd], mutating=True)
        return str(job)

    async def cancel(self, job: str) -> None:
        await self.client.call("Cancel", "s", [job], mutating=True)

    async def reboot(self, mode: str) -> None:
        await self.client.call("Reboot", "s", [mode], mutating=True)

    # --- signals --------------------------------------------------------------------------------------------------

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._subscribers.discard(queue)

    def publish(self, event: dict[str, Any]) -> None:
        for queue in self._subscribers:
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)

    async def wait_for_result(self, job: str) -> JobResult:
        """The Completed signal of ``job`` (already received, or the next one)."""
        if job in self._results:
            return self._results[job]
        future: asyncio.Future[JobResult] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job, []).append(future)
        return await future

    def result_of(self, job: str) -> JobResult | None:
        return self._results.get(job)

    async def _dispatch(self, events: asyncio.Queue[Event]) -> None:
        while True:
            event = await events.get()
            if event.kind == "progress":
                job, stage, percent, done, total = event.args
                self.publish({"event": "progress", "job": str(job), "stage": str(stage), "percent": int(percent),
                              "done": int(done), "total": int(total), "time": time.time()})
            elif event.kind == "completed":
                job, success, error, message = event.args
                result = JobResult(str(job), bool(success), str(error), str(message))
                self._results[result.job] = result
                while len(self._results) > KEPT_RESULTS:
                    del self._results[next(iter(self._results))]
                for future in self._waiters.pop(result.job, []):
                    if not future.done():
                        future.set_result(result)
                self.publish({"event": "completed", **result.as_json()})
            elif event.kind == "vanished":
                # The service exited (idle, or a crash): a job it was running is gone with it.
                for job, futures in list(self._waiters.items()):
                    for future in futures:
                        if not future.done():
                            future.set_result(JobResult(job, False, "Unavailable",
                                                        "the ab-flasher service stopped during the update"))
                    del self._waiters[job]
                self.publish({"event": "service-stopped"})
