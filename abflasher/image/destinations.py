"""Where the pipeline's decoded bytes go, and what reads them back.

- `Destination`: what the write stage writes to. `TargetWriter` is an opened block device or file (a
  ``disk.blockdev.Target``: O_DIRECT where it can, the page cache for an odd tail); `FileObjectWriter` is any seekable
  file object (BytesIO in tests).
- `Verifier`: what may read the target back while the stream is still being written
  (``disk.blockdev.ReadbackVerifier``), told by the write stage how far the device holds the image.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import BinaryIO, Protocol

from abflasher import errors
from abflasher.disk.blockdev import Target, set_direct, zero_range


class Destination(Protocol):
    """Where decoded bytes go. A block device or file (TargetWriter) or any seekable file object."""

    capacity: int | None
    description: str
    cached_writes: bool
    """Whether something written since the last sync() may be only in the page cache. While False, all that was
    written is on the device and a read-back straight from the device sees it without a flush."""

    def write_at(self, offset: int, data: memoryview) -> None: ...

    def write_batch(self, offset: int, views: list[memoryview]) -> None:
        """Write whole buffers back to back starting at ``offset`` (one system call where possible)."""
        ...

    def zero(self, offset: int, length: int) -> bool:
        """Make the range read as zeros without writing them; False if this destination cannot."""
        ...

    def sync(self) -> None: ...


class Verifier(Protocol):
    """Reads back, while the stream is still being written, what has already been flushed to the device."""

    def first_block(self, data: memoryview) -> None:
        """The image's first block, which reaches the device last (see the module docstring); it is not changed
        until the stream has ended."""
        ...

    def durable(self, offset: int) -> None:
        """Everything after the first block up to ``offset`` is on the device: written directly (O_DIRECT, or zeroed
        by the device), or written through the page cache and flushed."""
        ...


class TargetWriter:
    def __init__(self, target: Target) -> None:
        self._target = target
        self.capacity = target.capacity
        self.description = target.path
        self._direct = target.direct
        self._block = max(512, target.logical_block_size)
        self.cached_writes = False

    def write_at(self, offset: int, data: memoryview) -> None:
        length = len(data)
        if self._direct and (length % self._block or offset % self._block):
            # O_DIRECT takes whole logical blocks only; the odd tail of an image goes through the page cache.
            set_direct(self._target.fd, False)
            self._direct = False
        elif not self._direct and self._target.direct and not (length % self._block or offset % self._block):
            set_direct(self._target.fd, True)
            self._direct = True
        if not self._direct:
            self.cached_writes = True
        done = 0
        try:
            while done < length:
                done += os.pwrite(self._target.fd, data[done:], offset + done)
        except OSError as exc:
            raise errors.DeviceError(
                f"write to {self._target.path} failed at byte {offset + done}: {exc.strerror}"
            ) from exc

    def write_batch(self, offset: int, views: list[memoryview]) -> None:
        if len(views) == 1:
            self.write_at(offset, views[0])
            return
        if not self._direct and self._target.direct:
            set_direct(self._target.fd, True)
            self._direct = True
        length = sum(len(view) for view in views)
        try:
            done = os.pwritev(self._target.fd, views, offset)
        except OSError as exc:
            raise errors.DeviceError(f"write to {self._target.path} failed at byte {offset}: {exc.strerror}") from exc
        if done < length:
            # A short vectored write: finish the rest piece by piece.
            position = offset
            for view in views:
                skip = min(len(view), max(0, done - (position - offset)))
                if skip < len(view):
                    self.write_at(position + skip, view[skip:])
                position += len(view)

    def zero(self, offset: int, length: int) -> bool:
        return zero_range(self._target, offset, length)

    def sync(self) -> None:
        try:
            os.fsync(self._target.fd)
        except OSError as exc:
            raise errors.DeviceError(f"flushing {self._target.path} failed: {exc.strerror}") from exc
        self.cached_writes = False


class FileObjectWriter:
    """Any seekable binary file object (BytesIO in tests)."""

    def __init__(self, fileobj: BinaryIO, capacity: int | None = None, description: str = "file object") -> None:
        self._file = fileobj
        self.capacity = capacity
        self.description = description
        self.cached_writes = True

    def write_at(self, offset: int, data: memoryview) -> None:
        self._file.seek(offset)
        self._file.write(data)

    def write_batch(self, offset: int, views: list[memoryview]) -> None:
        self._file.seek(offset)
        for view in views:
            self._file.write(view)

    def zero(self, offset: int, length: int) -> bool:
        return False

    def sync(self) -> None:
        self._file.flush()
        # BytesIO has fileno() but no descriptor behind it.
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            os.fsync(self._file.fileno())
