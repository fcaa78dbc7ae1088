"""The page's uploads without a service: back-pressure from the pipe to the request body, the offset a resumed
upload continues from, the limit, and the format check before the job starts."""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from abflasher import errors
from abflasher.web.servicelink import JobResult
from abflasher.web.uploads import _F_SETPIPE_SZ, PIPE_SIZE, Upload, UploadError, _pipe_writer
from tests.support.signing import tar_members

CHUNK = 256 * 1024
#: What may be taken from the body while nobody reads the pipe: the pipe, the transport's buffer and one chunk on
#: each side of it.
IN_FLIGHT_LIMIT = PIPE_SIZE + 64 * 1024 + 2 * CHUNK
RAW_HEAD = b"\0" * 1080 + b"\x53\xef" + b"\0" * (CHUNK - 1082)  # an ext4 superblock's magic: a raw image


class Body:
    """A request body of ``total`` bytes that counts what was taken from it."""

    def __init__(self, total: int, first: bytes = RAW_HEAD) -> None:
        self.total = total
        self.taken = 0
        self.first = first

    async def chunks(self) -> AsyncIterator[bytes]:
        while self.taken < self.total:
            chunk = self.first if self.taken == 0 else b"\1" * min(CHUNK, self.total - self.taken)
            self.taken += len(chunk)
            yield chunk


async def settle(loop_iterations: int = 200) -> None:
    """Let the loop run until every task that can make progress has (no wall clock involved)."""
    for _ in range(loop_iterations):
        await asyncio.sleep(0)


class PipeJob:
    """Stands in for the service: a job is a pipe whose read end the test drains (or not)."""

    def __init__(self) -> None:
        self.read_fd = -1
        self.started = 0

    async def start(self, upload: Upload) -> None:
        self.read_fd, write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        fcntl.fcntl(write_fd, _F_SETPIPE_SZ, PIPE_SIZE)
        upload.writer = await _pipe_writer(write_fd)
        upload.job = str(self.started + 1)
        self.started += 1

    def drain(self) -> int:
        if self.read_fd < 0:
            return 0  # no job yet
        drained = 0
        while True:
            try:
                data = os.read(self.read_fd, 1 << 20)
            except BlockingIOError:
                return drained
            if not data:
                return drained
            drained += len(data)


async def pump(job: PipeJob, task: asyncio.Future[Any]) -> Any:
    """Read the pipe (the service's part) until ``task`` is done; its result."""
    while not task.done():
        job.drain()
        await settle(5)
    return task.result()


def new_upload(job: PipeJob, length: int | None) -> Upload:
    events: list[dict[str, Any]] = []
    return Upload("id", length, "", "image.img", job.start, events.append)


def test_the_body_is_read_only_as_fast_as_the_pipe_drains() -> None:
    async def scenario() -> None:
        job = PipeJob()
        upload = new_upload(job, None)
        body = Body(64 << 20)
        receiving = asyncio.ensure_future(upload.receive(body.chunks(), limit=None))
        await settle()
        assert not receiving.done()
        stalled_at = body.taken
        assert stalled_at <= IN_FLIGHT_LIMIT, f"{stalled_at} bytes taken while nobody read the pipe"
        await settle()
        assert body.taken == stalled_at, "still reading while the pipe is full"
        # The reader catches up: the body moves on by no more than what was read, and stalls again.
        drained = 0
        while body.taken == stalled_at:
            drained += job.drain()
            await settle()
        await settle()
        assert body.taken - stalled_at <= drained + IN_FLIGHT_LIMIT
        await pump(job, receiving)
        assert upload.offset == body.total
        await upload.finish()
        job.drain()
        assert os.read(job.read_fd, 1) == b"", "the pipe is closed at the end"
        os.close(job.read_fd)

    asyncio.run(scenario())


def test_a_dropped_request_leaves_the_upload_paused_at_the_bytes_the_pipe_got() -> None:
    async def scenario() -> None:
        job = PipeJob()
        upload = new_upload(job, 8 * CHUNK)
        first = Body(3 * CHUNK)
        await pump(job, asyncio.ensure_future(upload.receive(first.chunks(), limit=upload.length)))
        assert (upload.state, upload.offset, job.started) == ("paused", 3 * CHUNK, 1)

        async def rest() -> AsyncIterator[bytes]:
            for _ in range(5):
                yield b"\2" * CHUNK

        await pump(job, asyncio.ensure_future(upload.receive(rest(), limit=upload.length)))
        assert upload.offset == 8 * CHUNK
        assert job.started == 1, "a resumed upload goes on with the same job"
        os.close(job.read_fd)

    asyncio.run(scenario())


def test_a_new_request_takes_over_from_one_still_streaming() -> None:
    async def scenario() -> None:
        job = PipeJob()
        upload = new_upload(job, None)
        stuck = asyncio.ensure_future(upload.receive(Body(64 << 20).chunks(), limit=None))
        await settle()
        offset = upload.offset
        assert not stuck.done()

        async def nothing() -> AsyncIterator[bytes]:
            return
            yield b""

        await upload.receive(nothing(), limit=None)
        assert stuck.cancelled()
        assert upload.offset == offset
        os.close(job.read_fd)

    asyncio.run(scenario())


def test_bytes_past_the_limit_are_refused_and_not_written() -> None:
    async def scenario() -> None:
        job = PipeJob()
        upload = new_upload(job, None)
        body = Body(4 * CHUNK)
        receiving = asyncio.ensure_future(upload.receive(body.chunks(), limit=3 * CHUNK + 1))
        with pytest.raises(UploadError, match="larger than 786433 bytes") as refused:
            await pump(job, receiving)
        assert refused.value.status == 413
        assert upload.offset == 3 * CHUNK
        os.close(job.read_fd)

    asyncio.run(scenario())


def test_a_file_that_is_not_an_image_is_refused_before_the_job_starts() -> None:
    async def scenario() -> None:
        job = PipeJob()
        upload = new_upload(job, None)
        with pytest.raises(UploadError, match="unknown image format") as refused:
            await upload.receive(Body(CHUNK, first=b"shopping list\n" * 1000).chunks(), limit=None)
        assert refused.value.status == 422
        assert job.started == 0
        assert upload.ended
        assert upload.result == JobResult("", False, errors.BadImage.dbus_error_name(), upload.result.message)
        assert upload.result.error_name == "BadImage"
        assert "unknown image format" in upload.result.message

    asyncio.run(scenario())


def test_a_signed_bundle_starts_the_job() -> None:
    """A bundle (a tar: its manifest first, so no image format at its start) goes to the service, which verifies
    it as it streams; before, the page refused it as an unknown image format."""
    bundle = tar_members([("manifest.json", b"{}" * 100), ("manifest.json.sig", b"sig")])
    head = bundle + b"\0" * (CHUNK - len(bundle))

    async def scenario() -> None:
        job = PipeJob()
        upload = new_upload(job, CHUNK)
        receiving = asyncio.ensure_future(upload.receive(Body(CHUNK, first=head).chunks(), limit=CHUNK))
        await pump(job, receiving)
        assert job.started == 1
        assert not upload.ended
        assert upload.offset == CHUNK

    asyncio.run(scenario())
