"""read → decompress → sha256 → write, overlapped in threads.

zlib/lzma/bz2 inflate, hashlib and os.pwrite all release the GIL, so one thread per stage keeps the source, the CPU
and the device busy at the same time. The stages upstream of the device (`ReadStage`, `DecodeStage`, `HashStage`),
the queues and the buffer pool that connect them are in `image/stages.py`; here is `WriteStage`, which holds the
decisions (zero runs, batching, the `SyncPolicy`, what the verifier may read), and `stream_image`, which runs them
all; where the bytes go, and what reads them back, is in `image/destinations.py`.

Safety properties, all tested:
- nothing is written before the image's format is recognised, so a file that is not an image leaves the target
  untouched;
- the first buffer of the image (the file system superblock or the partition table) is written last, after the
  whole stream decoded cleanly and matched the expected checksum; until then that region is zeroed, so a write that
  fails or is cancelled halfway leaves a target that no firmware or kernel mistakes for a valid file system;
- an image larger than the target fails before anything is written past the target's end.
"""

from __future__ import annotations

import mmap
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from abflasher import errors
from abflasher.image.destinations import Destination, Verifier
from abflasher.image.formats import (
    DETECT_BYTES,
    GzipMemberCheck,
    ImageFormat,
    detect_format,
    gzip_implementation,
    gzip_inflater_name,
)
from abflasher.image.sources import ImageSource
from abflasher.image.stages import (
    BUFFER_SIZE,
    END,
    POLL,
    ZEROS,
    DecodeStage,
    Filled,
    HashStage,
    Pipeline,
    Queues,
    ReadStage,
)

#: The default `SyncPolicy` (read when a stream starts): see its fields.
SYNC_INTERVAL = 64 << 20
DIRECT_SYNC_SECONDS = 5.0
#: Up to this many consecutive buffers go to the device in one pwritev.
WRITE_BATCH = 8
#: Seconds between progress reports while writing.
PROGRESS_INTERVAL = 0.05


@dataclass(frozen=True)
class Progress:
    """Where an install is. ``done``/``total`` are what a percentage is made of: source bytes while writing (the
    compressed size is what is known up front), bytes read back while verifying."""

    stage: str
    done: int
    total: int | None
    written: int
    #: Bytes received so far: the source's bytes as they came (a download or an upload), a delta update's chunks.
    downloaded: int = 0

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


def read_head(source: ImageSource) -> bytes:
    """The first DETECT_BYTES of the source (fewer only if the source is that short)."""
    head = b""
    while len(head) < DETECT_BYTES:
        chunk = source.read(DETECT_BYTES - len(head))
        if not chunk:
            break
        head += chunk
    return head


@dataclass(frozen=True)
class SyncPolicy:
    """When the write stage flushes, and so how far the overlapped read-back verify may trail the writes."""

    cached_bytes: int
    """Data written through the page cache is flushed every this many bytes, and only then offered to the verifier.
    A long run of zeros is applied in steps of this size too, so the verify goes on through it."""
    direct_seconds: float
    """Direct writes are on the device when they return: the verify follows them without any flush. Flushing the
    device's write cache stalls the writes behind it, so while writing directly it happens by time, this often:
    often enough to keep the final flush short, rarely enough not to slow the install."""

    @classmethod
    def default(cls) -> SyncPolicy:
        return cls(cached_bytes=SYNC_INTERVAL, direct_seconds=DIRECT_SYNC_SECONDS)


class WriteStage:
    """Decoded buffers, in image order → the destination.

    Its steps, per buffer: check the capacity; hold back the image's first buffer (its region is zeroed now, the
    buffer written by `write_first_block` once the stream proved good); extend the open *zero run* with a buffer of
    zeros, or apply the run and write the data, batched with whatever full data buffers are already decoded; flush as
    the `SyncPolicy` says; tell the verifier how far the device holds the image; report progress.
    """

    def __init__(
        self,
        pipe: Pipeline,
        queues: Queues,
        dest: Destination,
        *,
        sync: SyncPolicy,
        verifier: Verifier | None,
        reader: ReadStage,
        total: int | None,
        progress: ProgressCallback | None,
    ) -> None:
        self._pipe = pipe
        self._dest = dest
        self._in = queues.to_write
        self._free = queues.free
        self._sync = sync
        self._verifier = verifier
        self._reader = reader
        self._total = total
        self._progress = progress
        #: The image's size so far: what went to the destination, the held first buffer and an open zero run included.
        self.offset = 0
        #: Bytes the destination zeroed instead of writing them.
        self.zeroed = 0
        #: The image's first buffer and its length, written last (see the module docstring).
        self.first_block: tuple[mmap.mmap, int] | None = None
        #: Where the open run of zero buffers starts; -1 when none is open. A run is applied when data follows it.
        self._zero_run_start = -1
        #: An item taken from the queue while batching that did not belong in the batch: the next one to handle.
        self._pending: object = None
        #: Offset of the last flush of data written through the page cache.
        self._flushed = 0
        #: How far the verifier was told the device holds the image.
        self._durable = 0
        self._flushed_time = time.monotonic()
        self._reported_time = 0.0

    def run(self) -> None:
        while True:
            item = self._pending if self._pending is not None else self._pipe.get(self._in)
            self._pending = None
            if item is END:
                self._finish()
                return
            buf, n, all_zeros = cast(Filled, item)
            self._check_capacity(self.offset + n)
            if self.offset == 0:
                self._hold_first_block(buf, n)
            elif all_zeros:
                if self._zero_run_start < 0:
                    self._zero_run_start = self.offset
                self._free.put(buf)
            else:
                self._apply_zero_run(self.offset)
                n = self._write_batch(buf, n)
            self.offset += n
            now = time.monotonic()
            if self._dest.cached_writes:
                self._flush_cached()
            else:
                self._follow_direct(now)
            if self._progress is not None and now - self._reported_time >= PROGRESS_INTERVAL:
                self._reported_time = now
                self._progress(Progress("writing", self._reader.bytes, self._total, self.offset, self._reader.bytes))

    def write_first_block(self) -> None:
        """The held first buffer, once the whole stream decoded cleanly and matched its checksum; then a flush."""
        assert self.first_block is not None
        buf, n = self.first_block
        with memoryview(buf) as view:
            self._dest.write_at(0, view[:n])
        self._dest.sync()

    def _check_capacity(self, end: int) -> None:
        if self._dest.capacity is not None and end > self._dest.capacity:
            raise errors.TooLarge(
                f"the image is larger than {self._dest.description}: {end} bytes decoded so far, "
                f"the target holds {self._dest.capacity}"
            )

    def _hold_first_block(self, buf: mmap.mmap, n: int) -> None:
        """Invalidate whatever the target held before anything else is written; see the module docstring."""
        self.first_block = (buf, n)
        if self._verifier is not None:
            self._verifier.first_block(memoryview(buf)[:n])
        if not self._dest.zero(0, n):
            with memoryview(ZEROS) as zeros:
                self._dest.write_at(0, zeros[:n])

    def _apply_zero_run(self, end: int) -> None:
        """Make the open zero run, up to ``end``, read as zeros: zeroed by the destination, or written if it cannot."""
        start = self._zero_run_start
        if start < 0:
            return
        if self._dest.zero(start, end - start):
            self.zeroed += end - start
        else:
            with memoryview(ZEROS) as zeros:
                for pos in range(start, end, BUFFER_SIZE):
                    self._dest.write_at(pos, zeros[: min(BUFFER_SIZE, end - pos)])
        self._zero_run_start = -1

    def _write_batch(self, buf: mmap.mmap, n: int) -> int:
        """Write ``buf`` and whatever full data buffers are already decoded after it (fewer, larger writes); returns
        how many bytes went out."""
        batch = [(buf, n)]
        end = self.offset + n
        capacity = self._dest.capacity
        while n == BUFFER_SIZE and len(batch) < WRITE_BATCH:
            try:
                following = self._in.get_nowait()
            except queue.Empty:
                break
            if following is END:
                self._pending = following
                break
            next_buf, next_n, next_zeros = cast(Filled, following)
            if next_zeros or next_n != BUFFER_SIZE or (capacity is not None and end + next_n > capacity):
                self._pending = following
                break
            batch.append((next_buf, next_n))
            end += next_n
        views = [memoryview(b)[:size] for b, size in batch]
        try:
            self._dest.write_batch(self.offset, views)
        finally:
            for view in views:
                view.release()
        for b, _ in batch:
            self._free.put(b)
        return end - self.offset

    def _tell_verifier(self, offset: int) -> None:
        """What the verifier may read: everything after the first block up to ``offset`` is on the device."""
        if self._verifier is not None and offset > self._durable:
            self._verifier.durable(offset)
            self._durable = offset

    def _flush_cached(self) -> None:
        """Writes through the page cache reach the verifier only after a flush, every `SyncPolicy.cached_bytes`."""
        if self.offset - self._flushed >= self._sync.cached_bytes:
            self._apply_zero_run(self.offset)
            self._dest.sync()
            self._flushed = self.offset
            self._tell_verifier(self.offset)

    def _follow_direct(self, now: float) -> None:
        """Direct writes and zeroings are what a direct read finds once they returned: the verifier follows them at
        once, up to an open zero run, which is applied in steps so the verify goes on through a long one."""
        if now - self._flushed_time >= self._sync.direct_seconds:
            self._dest.sync()
            self._flushed_time = now
        if self._zero_run_start >= 0 and self.offset - self._zero_run_start >= self._sync.cached_bytes:
            self._apply_zero_run(self.offset)
        self._tell_verifier(self._zero_run_start if self._zero_run_start >= 0 else self.offset)

    def _finish(self) -> None:
        self._apply_zero_run(self.offset)
        if self._progress is not None:
            done = self._reader.bytes
            total = self._total if self._total is not None else done
            self._progress(Progress("writing", done, total, self.offset, done))
        if self._verifier is not None and self.offset > self._durable:
            if self._dest.cached_writes:
                self._dest.sync()
            self._tell_verifier(self.offset)


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
    if image_format is None:
        fmt = detect_format(head)
    elif not head:
        raise errors.BadImage("the image is empty")
    else:
        # A forced format is what the user says the bytes are: raw writes them as they are, and a compressed
        # format's decoder refuses what is not that format.
        fmt = image_format
    inflater: str | None = None
    # The gzip CRC-32 runs on the hashing thread, off the inflating one (see GzipMemberCheck); igzip checks its own.
    gzip_check: GzipMemberCheck | None = None
    if fmt is ImageFormat.GZIP:
        inflater = gzip_inflater_name(gzip_impl)
        if inflater != "igzip":
            inflater, implementation = gzip_implementation(inflater)
            gzip_check = GzipMemberCheck(implementation.crc32)

    pipe = Pipeline(cancel)
    pipe.check()
    queues = Queues.make()
    # Published checksums are often of the compressed file; hash it only when there is one to compare with.
    reader = ReadStage(pipe, queues, source, head, hashed=expected_sha256 is not None and fmt is not ImageFormat.RAW)
    # A pipe's size is what its sender declared: igzip's framing uses it only to tell truncation from damage.
    decoder = DecodeStage(
        pipe, queues, fmt, head, gzip_impl=inflater or gzip_impl, gzip_check=gzip_check,
        source_size=source.size if source.size is not None else source_size,
    )
    hasher = HashStage(pipe, queues, gzip_check)
    writer = WriteStage(
        pipe,
        queues,
        dest,
        sync=SyncPolicy.default(),
        verifier=verifier,
        reader=reader,
        total=source_size if source_size is not None else source.size,
        progress=progress,
    )
    threads = [
        pipe.run("read", reader.run),
        pipe.run("decode", decoder.run),
        pipe.run("hash", hasher.run),
        pipe.run("write", writer.run),
    ]
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=POLL)
                if pipe.cancel.is_set() and not pipe.failed.is_set():
                    pipe.fail(errors.Cancelled("the install was cancelled"))
    except BaseException as exc:  # KeyboardInterrupt in the caller's thread
        pipe.fail(exc)
        for thread in threads:
            thread.join()
        raise
    if pipe.error is not None:
        raise pipe.error

    image_size = writer.offset
    if image_size == 0:
        raise errors.BadImage("the image decodes to zero bytes")
    image_sha256 = hasher.hash.hexdigest()
    source_hash = reader.hash
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
    writer.write_first_block()
    return StreamResult(
        image_format=fmt,
        inflater=inflater,
        image_size=image_size,
        image_sha256=image_sha256,
        source_bytes=reader.bytes,
        source_sha256=source_sha256,
        zeroed_bytes=writer.zeroed,
        matched=matched,
    )
