"""An upload: the write end of a pipe whose read end went to the service's ``UpdateFromFd``.

Bytes go from the request body into the pipe as they arrive, and the body is read only as fast as the pipe drains
(``drain()``): when the card is slower than the network, aiohttp stops reading the socket and TCP slows the sender.
What is held in memory is a request chunk, the transport's write buffer (64 KiB) and the pipe (1 MiB); nothing is
written to any file.

An upload outlives its requests: a dropped connection leaves the pipe open and the service's job waiting (its
``upload_idle_timeout``) for the client to come back and continue from :attr:`Upload.offset` (tus, docs/web-api.md).
When the job ends, for whatever reason, the upload ends with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from dbus_next.signature import Variant

from abflasher import errors
from abflasher.web.servicelink import JobResult, ServiceLink

log = logging.getLogger(__name__)

#: F_SETPIPE_SZ (Linux): a 1 MiB pipe lets the service read big chunks while the network fills it.
_F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
#: Upload progress events at most this often.
PROGRESS_EVENT_INTERVAL = 0.25


class UploadError(Exception):
    """A refused upload request: ``status`` is the HTTP status the page answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(eq=False)
class Upload:
    id: str
    length: int | None
    job: str
    filename: str
    _writer: asyncio.StreamWriter
    _link: ServiceLink
    _publish: Callable[[dict[str, Any]], None]
    offset: int = 0
    #: receiving | paused | received | ended
    state: str = "receiving"
    result: JobResult | None = None
    started: float = field(default_factory=time.time)
    _receiver: asyncio.Task[Any] | None = None
    _receiver_done: asyncio.Event = field(default_factory=asyncio.Event)
    _last_event: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "job": self.job, "offset": self.offset, "length": self.length, "state": self.state,
            "filename": self.filename, "result": self.result.as_json() if self.result else None,
        }

    @property
    def ended(self) -> bool:
        return self.state == "ended"

    async def receive(self, chunks: AsyncIterator[bytes], *, limit: int | None, limit_status: int = 413) -> None:
        """Write ``chunks`` into the pipe from the current offset. A second receiver stops the first one (a client
        that reconnects before the server noticed the old connection is gone). Raises UploadError when the bytes
        would pass ``limit`` (nothing past it is written) or when the service stopped reading."""
        previous = self._receiver
        if previous is not None and not previous.done():
            previous.cancel()
            await self._receiver_done.wait()
        if self.ended:
            raise self.ended_error()
        self._receiver = asyncio.current_task()
        self._receiver_done = asyncio.Event()
        self.state = "receiving"
        try:
            async for chunk in chunks:
                if limit is not None and self.offset + len(chunk) > limit:
                    raise UploadError(limit_status, f"the upload is larger than {limit} bytes")
                # write() and the offset move together (no await between): the offset is exactly what the pipe
                # got, so a resumed upload continues at the right byte.
                self._writer.write(chunk)
                self.offset += len(chunk)
                await self._writer.drain()
                self._progress_event()
        except (BrokenPipeError, ConnectionResetError):
            # The service closed its end: the job ended (its Completed signal says how).
            raise self.ended_error() from None
        finally:
            if not self.ended and self.state == "receiving":
                self.state = "paused"
            self._receiver = None
            self._receiver_done.set()
            self._progress_event(force=True)

    async def finish(self) -> None:
        """All bytes are in: close the pipe, so the service sees the end of the image."""
        self.state = "received"
        self._writer.close()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await self._writer.wait_closed()
        self._progress_event(force=True)

    async def wait_result(self) -> JobResult:
        return await self._link.wait_for_result(self.job)

    def end(self, result: JobResult) -> None:
        self.result = result
        self.state = "ended"
        self._writer.close()
        if self._receiver is not None and not self._receiver.done():
            self._receiver.cancel()
        self._progress_event(force=True)

    def ended_error(self) -> UploadError:
        result = self.result or self._link.result_of(self.job)
        if result is None:
            return UploadError(409, "the update job stopped reading the upload")
        return UploadError(410 if result.error_name == "Cancelled" else 422, result.message)

    def _progress_event(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_event < PROGRESS_EVENT_INTERVAL:
            return
        self._last_event = now
        self._publish({"event": "upload", **self.as_json()})


class Uploads:
    """The one upload the page runs at a time."""

    def __init__(self, link: ServiceLink) -> None:
        self._link = link
        self.current: Upload | None = None
        self._starting = False
        self._follower: asyncio.Future[None] | None = None

    def get(self, upload_id: str) -> Upload | None:
        upload = self.current
        if upload is None or not secrets.compare_digest(upload.id, upload_id):
            return None
        return upload

    def busy_message(self) -> str | None:
        upload = self.current
        if self._starting:
            return "busy: another upload is starting; wait for it to finish or cancel it"
        if upload is None or upload.ended:
            return None
        if upload.length:
            received = f"{upload.offset * 100 // upload.length}% received"
        else:
            received = f"{upload.offset} bytes received"
        return (f"busy: an upload ({upload.filename or 'an image'}, {received}, update job {upload.job}) is in "
                "progress; wait for it to finish or cancel it")

    async def start(self, *, length: int | None, sha256: str, filename: str) -> Upload:
        """A new upload: the service's job started on the read end of a new pipe. Raises UploadError (busy) or
        the service's error (not authorized, busy, invalid argument)."""
        busy = self.busy_message()
        if busy is not None:
            raise UploadError(409, busy)
        self._starting = True
        try:
            read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
            with contextlib.suppress(OSError):
                fcntl.fcntl(write_fd, _F_SETPIPE_SZ, PIPE_SIZE)
            options: dict[str, Variant] = {}
            if length is not None:
                options["size"] = Variant("t", length)
            if sha256:
                options["sha256"] = Variant("s", sha256)
            try:
                job = await self._link.update_from_fd(read_fd, options)
            except BaseException:
                os.close(write_fd)
                raise
            finally:
                os.close(read_fd)
            writer = await _pipe_writer(write_fd)
            upload = Upload(secrets.token_urlsafe(18), length, job, filename, writer, self._link,
                            self._link.publish)
            self.current = upload
            log.info("upload %s: update job %s (%s bytes)", upload.id, job, length if length is not None else "?")
            self._follower = asyncio.ensure_future(self._follow(upload))
            return upload
        finally:
            self._starting = False

    async def _follow(self, upload: Upload) -> None:
        result = await upload.wait_result()
        log.info("upload %s: job %s ended: %s", upload.id, upload.job, result.message)
        upload.end(result)

    async def cancel(self, upload: Upload) -> None:
        """Stop the job (Cancel, so it ends Cancelled whatever bytes it got), then the upload."""
        if upload.ended:
            return
        with contextlib.suppress(errors.InvalidArgument):  # it ended meanwhile
            await self._link.cancel(upload.job)
        upload.end(await upload.wait_result())


class _PipeProtocol(asyncio.streams.FlowControlMixin):
    """drain() for a pipe (FlowControlMixin), and the close waiter StreamWriter.wait_closed() asks for."""

    def __init__(self) -> None:
        super().__init__()
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self._closed.done():
            self._closed.set_result(None)

    def _get_close_waiter(self, stream: asyncio.StreamWriter) -> asyncio.Future[None]:
        return self._closed


async def _pipe_writer(fd: int) -> asyncio.StreamWriter:
    loop = asyncio.get_running_loop()
    pipe = os.fdopen(fd, "wb", buffering=0)
    try:
        transport, protocol = await loop.connect_write_pipe(_PipeProtocol, pipe)
    except BaseException:
        pipe.close()
        raise
    return asyncio.StreamWriter(transport, protocol, None, loop)
