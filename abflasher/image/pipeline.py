"""read → decompress → sha256 → write, overlapped in threads.

zlib/lzma/bz2 inflate, hashlib and os.pwrite all release the GIL, so one thread per stage keeps the source, the CPU
and the device busy at the same time. Buffers come from a fixed pool of page-aligned mmaps (O_DIRECT needs the
alignment, and the pool is what keeps memory flat whatever the image size).

Safety properties, all tested:
- nothing is written before the image's format is recognised, so a file that is not an image leaves the target
  untouched;
- the first buffer of the image (the file system superblock or the partition table) is written last, after the
  whole stream decoded cleanly and matched the expected checksum; until then that region is zeroed, so a write that
  fails or is cancelled halfway leaves a target that no firmware or kernel mistakes for a valid file system;
- an image larger than the target fails before anything is written past the target's end.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Protocol, cast

from abflasher import errors
from abflasher.disk.blockdev import Target, set_direct, zero_range
from abflasher.image.formats import (
    DETECT_BYTES,
    GzipMemberCheck,
    ImageFormat,
    detect_format,
    gzip_implementation,
    open_decoder,
)
from abflasher.image.sources import ImageSource

BUFFER_SIZE = 1 << 20
BUFFER_COUNT = 8
READ_CHUNK = 256 << 10
#: How often data written through the page cache is flushed, and so how far the overlapped read-back verify may trail
#: such writes. Direct writes are on the device when they return: the verify follows them without any flush.
SYNC_INTERVAL = 64 << 20
#: How often the device's write cache is flushed while writing directly (the final flush comes on top).
DIRECT_SYNC_SECONDS = 5.0
#: Up to this many consecutive buffers go to the device in one pwritev.
WRITE_BATCH = 8
_POLL = 0.1
_ZEROS = bytes(BUFFER_SIZE)


@dataclass(frozen=True)
class Progress:
    """Where an install is. ``done``/``total`` are what a percentage is made of: source bytes while writing (the
    compressed size is what is known up front), bytes read back while verifying."""

    stage: str
    done: int
    total: int | None
    written: int

    @property
    def percent(self) -> int | None:
        if not self.total:
            return None
        return min(100, self.done * 100 // self.total)


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class StreamResult:
    image_format: ImageFormat
    inflater: str | None
    image_size: int
    image_sha256: str
    source_bytes: int
    source_sha256: str | None
    """sha256 of the bytes as the source delivered them; only computed when there is a checksum to compare it
    with (a raw image's is its image_sha256)."""
    zeroed_bytes: int
    matched: str | None
    """Which hash the expected checksum matched: ``image`` (decompressed) or ``source`` (the compressed file)."""


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


class _Abort(Exception):
    """Raised inside a stage when another stage already failed."""


class _Pipeline:
    def __init__(self, cancel: threading.Event | None) -> None:
        self.cancel = cancel or threading.Event()
        self.failed = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc
        self.failed.set()

    def check(self) -> None:
        if self.failed.is_set():
            raise _Abort
        if self.cancel.is_set():
            raise errors.Cancelled("the install was cancelled")

    def put(self, q: queue.Queue[object], item: object) -> None:
        while True:
            self.check()
            try:
                q.put(item, timeout=_POLL)
                return
            except queue.Full:
                continue

    def get(self, q: queue.Queue[object]) -> object:
        while True:
            self.check()
            try:
                return q.get(timeout=_POLL)
            except queue.Empty:
                continue

    def run(self, name: str, func: Callable[[], None]) -> threading.Thread:
        def body() -> None:
            try:
                func()
            except _Abort:
                pass
            except BaseException as exc:
                self.fail(exc)

        thread = threading.Thread(target=body, name=f"abflasher-{name}", daemon=True)
        thread.start()
        return thread


def _is_zero(buf: mmap.mmap) -> bool:
    """Whether a full buffer holds only zeros. One byte per 4 KiB block is looked at first: data almost always
    shows there, so the full comparison (a 1 MiB copy) is only paid for buffers that are likely zero."""
    if buf[::4096].strip(b"\0") or buf[BUFFER_SIZE - 1]:
        return False
    return buf[:] == _ZEROS


_END = object()
#: A decoded buffer on its way to the device: the buffer, how much of it is filled, whether that is all zeros.
_Filled = tuple[mmap.mmap, int, bool]


def read_head(source: ImageSource) -> bytes:
    """The first DETECT_BYTES of the source (fewer only if the source is that short)."""
    head = b""
    while len(head) < DETECT_BYTES:
        chunk = source.read(DETECT_BYTES - len(head))
        if not chunk:
            break
        head += chunk
    return head


def stream_image(
    source: ImageSource,
    dest: Destination,
    *,
    expected_sha256: str | None = None,
    image_format: ImageFormat | None = None,
    gzip_impl: str = "auto",
    source_size: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    verifier: Verifier | None = None,
) -> StreamResult:
    """Decode ``source`` into ``dest`` and return what was written and its sha256.

    Raises BadImage (format, corrupt, truncated, trailing garbage), TooLarge, ChecksumMismatch (against
    ``expected_sha256``, which may be the sha256 of the decoded image or of the source file as published),
    Cancelled, DeviceError, Network; on any of them the first buffer of ``dest`` reads as zeros or was never written.
    """
    head = read_head(source)
    detected = detect_format(head)
    fmt = image_format or detected
    inflater: str | None = None
    # The gzip CRC-32 runs on the hashing thread, off the inflating one (see GzipMemberCheck).
    gzip_check: GzipMemberCheck | None = None
    if fmt is ImageFormat.GZIP:
        inflater, implementation = gzip_implementation(gzip_impl)
        gzip_check = GzipMemberCheck(implementation.crc32)
    total = source_size if source_size is not None else source.size

    pipe = _Pipeline(cancel)
    pipe.check()
    compressed: queue.Queue[object] = queue.Queue(maxsize=8)
    to_hash: queue.Queue[object] = queue.Queue(maxsize=BUFFER_COUNT)
    to_write: queue.Queue[object] = queue.Queue(maxsize=BUFFER_COUNT)
    free: queue.Queue[object] = queue.Queue()
    for _ in range(BUFFER_COUNT):
        free.put(mmap.mmap(-1, BUFFER_SIZE))

    # Published checksums are often of the compressed file; hash it only when there is one to compare with.
    source_hash = hashlib.sha256(head) if expected_sha256 is not None and fmt is not ImageFormat.RAW else None
    image_hash = hashlib.sha256()
    source_bytes = len(head)
    state = {"written": 0, "zeroed": 0, "image_size": 0}
    held: list[tuple[mmap.mmap, int]] = []

    def read_stage() -> None:
        nonlocal source_bytes
        while True:
            pipe.check()
            chunk = source.read(READ_CHUNK)
            if not chunk:
                pipe.put(compressed, _END)
                return
            if source_hash is not None:
                source_hash.update(chunk)
            source_bytes += len(chunk)
            pipe.put(compressed, chunk)

    def next_chunk() -> bytes:
        item = pipe.get(compressed)
        return b"" if item is _END else cast(bytes, item)

    def decode_stage() -> None:
        decoder = open_decoder(fmt, next_chunk, head, gzip_impl=gzip_impl, gzip_check=gzip_check)
        while True:
            buf = cast(mmap.mmap, pipe.get(free))
            filled = 0
            while filled < BUFFER_SIZE:
                data = decoder.read(BUFFER_SIZE - filled)
                if not data:
                    break
                buf[filled : filled + len(data)] = data
                filled += len(data)
            if filled:
                pipe.put(to_hash, (buf, filled, False))
            if filled < BUFFER_SIZE:
                pipe.put(to_hash, _END)
                return

    def hash_stage() -> None:
        while True:
            item = pipe.get(to_hash)
            if item is _END:
                if gzip_check is not None:
                    gzip_check.finish()
                pipe.put(to_write, _END)
                return
            buf, n, _ = cast(_Filled, item)
            with memoryview(buf) as view:
                image_hash.update(view[:n])
                if gzip_check is not None:
                    gzip_check.update(view[:n])
            # Runs of zeros (free space of a file system) are zeroed on the device instead of written.
            all_zeros = n == BUFFER_SIZE and _is_zero(buf)
            pipe.put(to_write, (buf, n, all_zeros))

    def write_stage() -> None:
        offset = 0
        zero_run_start = -1
        last_sync = 0
        last_durable = 0
        last_sync_time = time.monotonic()
        last_report = 0.0

        def flush_zeros(end: int) -> None:
            nonlocal zero_run_start
            if zero_run_start < 0:
                return
            length = end - zero_run_start
            if dest.zero(zero_run_start, length):
                state["zeroed"] += length
            else:
                pos = zero_run_start
                with memoryview(_ZEROS) as zeros:
                    while pos < end:
                        n = min(BUFFER_SIZE, end - pos)
                        dest.write_at(pos, zeros[:n])
                        pos += n
            zero_run_start = -1

        def check_capacity(end: int) -> None:
            if dest.capacity is not None and end > dest.capacity:
                raise errors.TooLarge(
                    f"the image is larger than {dest.description}: {end} bytes decoded so far, "
                    f"the target holds {dest.capacity}"
                )

        pending: object = None
        while True:
            item = pending if pending is not None else pipe.get(to_write)
            pending = None
            if item is _END:
                flush_zeros(offset)
                state["image_size"] = offset
                if progress is not None:
                    progress(Progress("writing", source_bytes, total if total is not None else source_bytes, offset))
                if verifier is not None and offset > last_durable:
                    if dest.cached_writes:
                        dest.sync()
                    verifier.durable(offset)
                return
            buf, n, all_zeros = cast(_Filled, item)
            check_capacity(offset + n)
            if offset == 0:
                # Invalidate whatever the target held before anything else is written; see the module docstring.
                held.append((buf, n))
                if verifier is not None:
                    verifier.first_block(memoryview(buf)[:n])
                if not dest.zero(0, n):
                    with memoryview(_ZEROS) as zeros:
                        dest.write_at(0, zeros[:n])
            elif all_zeros:
                if zero_run_start < 0:
                    zero_run_start = offset
                free.put(buf)
            else:
                flush_zeros(offset)
                batch = [(buf, n)]
                end = offset + n
                # Take whatever else is already decoded, so the device gets fewer, larger writes.
                while n == BUFFER_SIZE and len(batch) < WRITE_BATCH:
                    try:
                        following = to_write.get_nowait()
                    except queue.Empty:
                        break
                    if following is _END:
                        pending = following
                        break
                    next_buf, next_n, next_zeros = cast(_Filled, following)
                    too_far = dest.capacity is not None and end + next_n > dest.capacity
                    if next_zeros or next_n != BUFFER_SIZE or too_far:
                        pending = following
                        break
                    batch.append((next_buf, next_n))
                    end += next_n
                views = [memoryview(b)[:size] for b, size in batch]
                try:
                    dest.write_batch(offset, views)
                finally:
                    for view in views:
                        view.release()
                for b, _ in batch:
                    free.put(b)
                n = end - offset
            offset += n
            state["written"] = offset
            now = time.monotonic()
            if dest.cached_writes:
                if offset - last_sync >= SYNC_INTERVAL:
                    flush_zeros(offset)
                    dest.sync()
                    last_sync = last_durable = offset
                    if verifier is not None:
                        verifier.durable(offset)
            else:
                # Direct writes need no flush to be read back: what a direct write or a zeroing returned from is what a
                # direct read finds. Flushing the device's write cache stalls the writes behind it, so it happens by
                # time, not by size: often enough to keep the final flush short, rarely enough not to slow the install.
                if now - last_sync_time >= DIRECT_SYNC_SECONDS:
                    dest.sync()
                    last_sync_time = now
                # An open zero run is not applied yet; a long one (the free space at the end of a file system) is
                # applied in steps so the verify goes on.
                if zero_run_start >= 0 and offset - zero_run_start >= SYNC_INTERVAL:
                    flush_zeros(offset)
                applied = zero_run_start if zero_run_start >= 0 else offset
                if verifier is not None and applied > last_durable:
                    verifier.durable(applied)
                    last_durable = applied
            if progress is not None and now - last_report >= 0.05:
                last_report = now
                progress(Progress("writing", source_bytes, total, offset))

    threads = [
        pipe.run("read", read_stage),
        pipe.run("decode", decode_stage),
        pipe.run("hash", hash_stage),
        pipe.run("write", write_stage),
    ]
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=_POLL)
                if pipe.cancel.is_set() and not pipe.failed.is_set():
                    pipe.fail(errors.Cancelled("the install was cancelled"))
    except BaseException as exc:  # KeyboardInterrupt in the caller's thread
        pipe.fail(exc)
        for thread in threads:
            thread.join()
        raise
    if pipe.error is not None:
        raise pipe.error

    image_size = state["image_size"]
    if image_size == 0:
        raise errors.BadImage("the image decodes to zero bytes")
    image_sha256 = image_hash.hexdigest()
    source_sha256 = image_sha256 if fmt is ImageFormat.RAW else source_hash.hexdigest() if source_hash else None
    matched: str | None = None
    if expected_sha256 is not None:
        expected = expected_sha256.lower()
        if expected == image_sha256:
            matched = "image"
        elif expected == source_sha256:
            matched = "source"
        else:
            dest.sync()
            raise errors.ChecksumMismatch(
                f"sha256 mismatch: expected {expected}, the image is {image_sha256} "
                f"(its compressed file {source_sha256}); the target was left incomplete"
            )
    pipe.check()
    buf, n = held[0]
    with memoryview(buf) as view:
        dest.write_at(0, view[:n])
    dest.sync()
    return StreamResult(
        image_format=fmt,
        inflater=inflater,
        image_size=image_size,
        image_sha256=image_sha256,
        source_bytes=source_bytes,
        source_sha256=source_sha256,
        zeroed_bytes=state["zeroed"],
        matched=matched,
    )
