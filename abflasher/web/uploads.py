"""An upload: the write end of a pipe whose read end went to the service's ``UpdateFromFd``.

Bytes go from the request body into the pipe as they arrive, and the body is read only as fast as the pipe drains
(``drain()``): when the card is slower than the network, aiohttp stops reading the socket and TCP slows the sender.
What is held in memory is a request chunk, the transport's write buffer (64 KiB) and the pipe (1 MiB); nothing is
written to any file.

The service's job starts with the first bytes, once they look like an image (the engine's own format detection) or a
signed bundle (a tar):
a file that is not an image at all is refused before the job exists, so the slots are not even marked. An upload
outlives its requests: a dropped connection leaves the pipe open and the job waiting (the service's
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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from dbus_next.signature import Variant

from abflasher import errors
from abflasher.image.formats import DETECT_BYTES, detect_format
from abflasher.trust.bundle import is_bundle
from abflasher.web.servicelink import JobResult, ServiceLink

log = logging.getLogger(__name__)

#: F_SETPIPE_SZ (Linux): a 1 MiB pipe lets the service read big chunks while the network fills it.
_F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
#: Upload progress events at most this often.
PROGRESS_EVENT_INTERVAL = 0.25
#: How long a write that found the pipe closed waits for the job's Completed signal, to report how it ended.
JOB_END_WAIT = 30.0
#: An upload that was created but got no byte (so has no job yet) is dropped after this long.
UNSTARTED_TIMEOUT = 120.0


class UploadError(Exception):
    """A refused upload request: ``status`` is the HTTP status the page answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(eq=False)
class Upload:
    id: str
    length: int | None
    sha256: str
    filename: str
    _start_job: Callable[[Upload], Awaitable[None]]
    _publish: Callable[[dict[str, Any]], None]
    #: The service's job, once the first bytes arrived ("" before).
    job: str = ""
    #: Bytes the pipe got (so the job got, or will read).
    offset: int = 0
    #: created | receiving | paused | received | ended
    state: str = "created"
    result: JobResult | None = None
    started: float = field(default_factory=time.time)
    writer: asyncio.StreamWriter | None = None
    _receiver: asyncio.Task[Any] | None = None
    _receiver_done: asyncio.Event = field(default_factory=asyncio.Event)
    _last_event: float = 0.0
    _ended_event: asyncio.Event = field(default_factory=asyncio.Event)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "job": self.job, "offset": self.offset, "length": self.length, "state": self.state,
            "filename": self.filename, "result": self.result.as_json() if self.result else None,
        }

    @property
    def ended(self) -> bool:
        return self.state == "ended"

    async def receive(self, chunks: AsyncIterator[bytes], *, limit: int | None) -> None:
        """Write ``chunks`` into the pipe from the current offset (starting the job with the first bytes). A second
        receiver stops the first one (a client that reconnects before the server noticed the old connection is
        gone). Raises UploadError when the bytes would pass ``limit`` (nothing past it is written), when they are
        not an image, or when the job ended; the service's errors when it refuses the job."""
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
            if self.writer is None:
                chunks = await self._start(chunks, limit)
            async for chunk in chunks:
                if limit is not None and self.offset + len(chunk) > limit:
                    raise UploadError(413, f"the upload is larger than {limit} bytes (the target slot's size)")
                self._write(chunk)
                await self._drain()
                self._progress_event()
        finally:
            if not self.ended and self.state == "receiving":
                self.state = "paused" if self.writer is not None else "created"
            self._receiver = None
            self._receiver_done.set()
            self._progress_event(force=True)

    async def _start(self, chunks: AsyncIterator[bytes], limit: int | None) -> AsyncIterator[bytes]:
        """Read the image's first bytes, check that they are an image, start the job and hand it those bytes.
        Returns the rest of ``chunks``."""
        head = b""
        async for chunk in chunks:
            head += chunk
            if limit is not None and len(head) > limit:
                raise UploadError(413, f"the upload is larger than {limit} bytes")
            if len(head) >= DETECT_BYTES:
                break
        try:
            if not is_bundle(head):  # a signed bundle (a tar): the service verifies it as it streams
                detect_format(head[:DETECT_BYTES])
        except errors.BadImage as exc:
            self.end(JobResult("", False, exc.dbus_name, f"{exc} ({self.filename or 'the upload'})"))
            raise UploadError(422, str(exc)) from None
        try:
            await self._start_job(self)
        except BaseException as exc:
            if isinstance(exc, errors.AbFlasherError):
                self.end(JobResult("", False, exc.dbus_name, str(exc)))
            else:
                self.end(JobResult("", False, "", "the upload stopped before its update job started"))
            raise
        self._write(head)
        await self._drain()
        return chunks

    def _write(self, chunk: bytes) -> None:
        assert self.writer is not None
        # write() and the offset move together (no await between): the offset is exactly what the pipe got, so a
        # resumed upload continues at the right byte.
        self.writer.write(chunk)
        self.offset += len(chunk)

    async def _drain(self) -> None:
        assert self.writer is not None
        try:
            await self.writer.drain()
        except (BrokenPipeError, ConnectionResetError):
            # The service closed its end: the job ended, and its Completed signal (about to arrive) says how.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended_event.wait(), JOB_END_WAIT)
            raise self.ended_error() from None

    async def finish(self) -> None:
        """All bytes are in: close the pipe, so the service sees the end of the image."""
        assert self.writer is not None
        self.state = "received"
        self.writer.close()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await self.writer.wait_closed()
        self._progress_event(force=True)

    async def wait_result(self) -> JobResult:
        """How the upload ended (its job's Completed signal, or why it never started one)."""
        await self._ended_event.wait()
        assert self.result is not None
        return self.result

    def end(self, result: JobResult) -> None:
        self.result = result
        self.state = "ended"
        self._ended_event.set()
        if self.writer is not None:
            self.writer.close()
        if self._receiver is not None and not self._receiver.done() and self._receiver is not asyncio.current_task():
            self._receiver.cancel()
        self._progress_event(force=True)

    def ended_error(self) -> UploadError:
        result = self.result
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

    def __init__(self, link: ServiceLink, *, unstarted_timeout: float = UNSTARTED_TIMEOUT) -> None:
        self._link = link
        self._unstarted_timeout = unstarted_timeout
        self.current: Upload | None = None
        self._tasks: set[asyncio.Future[Any]] = set()

    def get(self, upload_id: str) -> Upload | None:
        upload = self.current
        if upload is None or not secrets.compare_digest(upload.id, upload_id):
            return None
        return upload

    def busy_message(self) -> str | None:
        upload = self.current
        if upload is None or upload.ended:
            return None
        if upload.length:
            received = f"{upload.offset * 100 // upload.length}% received"
        else:
            received = f"{upload.offset} bytes received"
        job = f", update job {upload.job}" if upload.job else ""
        return (f"busy: an upload ({upload.filename or 'an image'}, {received}{job}) is in progress; wait for it "
                "to finish or cancel it")

    def create(self, *, length: int | None, sha256: str, filename: str) -> Upload:
        """A new upload (the page's one); its job starts when its first bytes arrive."""
        busy = self.busy_message()
        if busy is not None:
            raise UploadError(409, busy)
        upload = Upload(secrets.token_urlsafe(18), length, sha256, filename, self._start_job, self._link.publish)
        self.current = upload
        self._spawn(self._expire_unstarted(upload))
        log.info("upload %s created (%s bytes)", upload.id, length if length is not None else "?")
        return upload

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_job(self, upload: Upload) -> None:
        """UpdateFromFd on the read end of a new pipe; the upload keeps the write end."""
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_fd, _F_SETPIPE_SZ, PIPE_SIZE)
        options: dict[str, Variant] = {}
        if upload.length is not None:
            options["size"] = Variant("t", upload.length)
        if upload.sha256:
            options["sha256"] = Variant("s", upload.sha256)
        try:
            job = await self._link.update_from_fd(read_fd, options)
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        upload.writer = await _pipe_writer(write_fd)
        upload.job = job
        log.info("upload %s: update job %s", upload.id, job)
        self._spawn(self._follow(upload))

    async def _follow(self, upload: Upload) -> None:
        result = await self._link.wait_for_result(upload.job)
        log.info("upload %s: job %s ended: %s", upload.id, upload.job, result.message)
        upload.end(result)

    async def _expire_unstarted(self, upload: Upload) -> None:
        await asyncio.sleep(self._unstarted_timeout)
        if not upload.job and not upload.ended and upload.state != "receiving":
            log.info("upload %s: no bytes within %.0f s; dropped", upload.id, self._unstarted_timeout)
            upload.end(JobResult("", False, errors.Cancelled.dbus_error_name(),
                                 f"no bytes arrived within {self._unstarted_timeout:.0f} s; start the upload again"))

    async def cancel(self, upload: Upload) -> None:
        """Stop the job (Cancel, so it ends Cancelled whatever bytes it got), then the upload."""
        if upload.ended:
            return
        if not upload.job:
            upload.end(JobResult("", False, errors.Cancelled.dbus_error_name(), "the upload was cancelled"))
            return
        with contextlib.suppress(errors.InvalidArgument):  # it ended meanwhile
            await self._link.cancel(upload.job)
        upload.end(await self._link.wait_for_result(upload.job))


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
