"""The end of a delta install: the whole slot read back and proved to be the image, and the chunks that were taken as
in place on the word of the target's old index checked on the way.

A chunk the target's old index has at the very offset the new image wants it is not read before the install (that
would be a second read of most of the slot): the read-back reads it anyway. While the read-back hashes the slot, a
second thread checks each such chunk against its id. When the slot's sha256 is the image's, nothing more is needed.
When it is not and some of those chunks were not what the old index said (the old slot was mounted and written since,
as a slot that ran a system is), the install writes them and reads the slot back once more; any other difference is
a failing medium and fails the install as before.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from abflasher import errors
from abflasher.delta.index import ChunkIndex
from abflasher.disk.blockdev import ReadbackVerifier
from abflasher.image.pipeline import Progress

ProgressCallback = Callable[[Progress], None]
#: Read-back pieces waiting for the check of trusted chunks, at most (each a copy of one read of the verify).
_PIECES_AHEAD = 4


class TrustedChunks:
    """Checks the chunks flagged in ``trusted`` (by chunk number) against their ids as the slot's bytes go by, in
    order, on a thread of its own; `finish` returns the numbers of those that were not their id."""

    def __init__(self, index: ChunkIndex, trusted: bytearray) -> None:
        self._index = index
        self._trusted = trusted
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="abflasher-delta-trusted")
        self._slots = threading.Semaphore(_PIECES_AHEAD)
        self._buffer = bytearray()
        self._buffer_start = 0
        self._number = 0
        self._error: BaseException | None = None
        self.bad: list[int] = []

    def observe(self, start: int, piece: memoryview) -> None:
        """Called with each piece of the slot as it is read, in order, from the start (``piece`` is copied)."""
        self._slots.acquire()
        self._pool.submit(self._check, start, bytes(piece))

    def _check(self, start: int, piece: bytes) -> None:
        if self._error is not None:
            self._slots.release()
            return
        try:
            index = self._index
            if start != self._buffer_start + len(self._buffer):
                self._buffer, self._buffer_start = bytearray(), start
            self._buffer += piece
            end = self._buffer_start + len(self._buffer)
            while self._number < len(index) and (chunk := index.chunk(self._number)).end <= end:
                number = self._number
                if self._trusted[number] and chunk.offset >= self._buffer_start:
                    with memoryview(self._buffer) as view, \
                            view[chunk.offset - self._buffer_start : chunk.end - self._buffer_start] as data:
                        if not index.holds(chunk, data):
                            self.bad.append(number)
                self._number += 1
            keep_from = index.start(self._number) if self._number < len(index) else end
            if keep_from > self._buffer_start:
                del self._buffer[: keep_from - self._buffer_start]
                self._buffer_start = keep_from
        except BaseException as exc:
            self._error = self._error or exc
        finally:
            self._slots.release()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def finish(self) -> list[int]:
        """The trusted chunks that were not their id, once every piece given was checked."""
        self.close()
        if self._error is not None:
            raise self._error
        return self.bad


def read_back(
    path: str,
    index: ChunkIndex,
    *,
    held: bytes,
    expected: str | None,
    trusted: bytearray | None,
    progress: ProgressCallback | None,
    cancel: threading.Event,
) -> tuple[str | None, list[int]]:
    """Read the whole target back (the held start from memory: it is not written yet) and prove it is the image:
    its sha256 equal to ``expected``, or, when the index itself is what was trusted, every chunk equal to its id.
    Returns (the image's sha256, []) when it is; (None, the trusted chunks that were not their id) when only such
    chunks differ. Raises ChecksumMismatch for any other difference."""
    size = index.size

    def report(done: int) -> None:
        if progress is not None:
            progress(Progress("verifying", done, size, size))

    check = TrustedChunks(index, trusted) if trusted is not None and any(trusted) else None
    try:
        if expected is None:
            actual, bad = _read_back_by_chunks(path, index, held, trusted, report)
        else:
            verifier = ReadbackVerifier(path, cancel=cancel, observe=check.observe if check is not None else None)
            try:
                if check is not None:
                    check.observe(0, memoryview(held))
                verifier.first_block(memoryview(held))
                actual = verifier.image_hash(size, report)
            finally:
                verifier.close()
            bad = check.finish() if check is not None and actual != expected else []
            if actual != expected and not bad:
                raise errors.ChecksumMismatch(
                    f"sha256 mismatch: expected {expected}, the chunks of the index make {actual}; the target was "
                    "left incomplete"
                )
    finally:
        if check is not None:
            check.close()
    return (None, bad) if bad else (actual, [])


def compare_start(path: str, held: bytes) -> None:
    """The device's first bytes, once written, must be ``held``."""
    with open(path, "rb", buffering=0) as device:
        os.posix_fadvise(device.fileno(), 0, len(held), os.POSIX_FADV_DONTNEED)
        if device.read(len(held)) != held:
            raise errors.ChecksumMismatch(
                f"read-back verification of {path} failed: its first {len(held)} bytes differ from what was written "
                "(failing medium?)"
            )


def _read_back_by_chunks(
    path: str, index: ChunkIndex, held: bytes, trusted: bytearray | None, report: Callable[[int], None]
) -> tuple[str, list[int]]:
    """The image's sha256 as the device holds it, every chunk checked against its id; a trusted chunk that is not
    is listed, any other one fails the install."""
    digest = hashlib.sha256(held)
    bad: list[int] = []
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        for number in range(len(index)):
            chunk = index.chunk(number)
            if chunk.end <= len(held):
                data = held[chunk.offset : chunk.end]
            else:
                start = max(chunk.offset, len(held))
                from_device = os.pread(fd, chunk.end - start, start)
                digest.update(from_device)
                data = held[chunk.offset : start] + from_device if chunk.offset < start else from_device
            if not index.holds(chunk, data):
                if trusted is not None and trusted[number]:
                    bad.append(number)
                else:
                    raise errors.ChecksumMismatch(
                        f"read-back verification of {path} failed at byte {chunk.offset}: the device does not hold "
                        f"chunk {chunk.hex} there (failing medium?)"
                    )
            report(chunk.end)
    finally:
        os.close(fd)
    return digest.hexdigest(), bad
