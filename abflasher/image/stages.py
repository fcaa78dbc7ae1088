"""The pipeline's machinery and the stages that turn a source into hashed image buffers: read, decode, hash.

Each stage runs in a thread of its own (zlib/lzma/bz2 inflate and hashlib release the GIL, so the source and the CPU
are busy at the same time) and hands its output on through bounded queues. `Pipeline` is what they share: the cancel
event and the first failure, which every queue operation checks so that one failing stage stops them all. Decoded
buffers come from a fixed pool of page-aligned mmaps (`Queues`): O_DIRECT needs the alignment, and the pool is what
keeps memory flat whatever the image size. The write stage, and `stream_image` that runs them all, are in
:mod:`abflasher.image.pipeline`.
"""

from __future__ import annotations

import hashlib
import mmap
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from abflasher import errors
from abflasher.image.child_decoder import ChildDecoder
from abflasher.image.formats import Decoder, GzipMemberCheck, ImageFormat, open_decoder
from abflasher.image.sources import ImageSource

BUFFER_SIZE = 1 << 20
BUFFER_COUNT = 8
READ_CHUNK = 256 << 10
#: How often a thread waiting on a queue looks at the cancel event and the other stages' failure (seconds).
POLL = 0.1
ZEROS = bytes(BUFFER_SIZE)
#: What a stage puts on its queue after its last item.
END = object()
#: A decoded buffer on its way to the device: the buffer, how much of it is filled, whether that is all zeros.
Filled = tuple[mmap.mmap, int, bool]


class _Abort(Exception):
    """Raised inside a stage when another stage already failed."""


class Pipeline:
    """What the stages share: the cancel event, the first failure, and queue operations that give up on either."""

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
                q.put(item, timeout=POLL)
                return
            except queue.Full:
                continue

    def get(self, q: queue.Queue[object]) -> object:
        while True:
            self.check()
            try:
                return q.get(timeout=POLL)
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
    return buf[:] == ZEROS


@dataclass(frozen=True)
class Queues:
    """What connects the stages: compressed chunks, decoded buffers to hash, hashed buffers to write, and the pool of
    free buffers, a fixed number of page-aligned mmaps (O_DIRECT needs the alignment; the fixed pool keeps memory
    flat)."""

    compressed: queue.Queue[object]
    to_hash: queue.Queue[object]
    to_write: queue.Queue[object]
    free: queue.Queue[object]

    @classmethod
    def make(cls) -> Queues:
        free: queue.Queue[object] = queue.Queue()
        for _ in range(BUFFER_COUNT):
            free.put(mmap.mmap(-1, BUFFER_SIZE))
        return cls(queue.Queue(maxsize=8), queue.Queue(maxsize=BUFFER_COUNT), queue.Queue(maxsize=BUFFER_COUNT), free)


class ReadStage:
    """Source → chunks of compressed bytes, counted, and hashed when a checksum may be of the compressed file."""

    def __init__(self, pipe: Pipeline, queues: Queues, source: ImageSource, head: bytes, *, hashed: bool) -> None:
        self._pipe = pipe
        self._source = source
        self._out = queues.compressed
        self.hash = hashlib.sha256(head) if hashed else None
        #: Bytes read from the source so far (the head included): what the writing progress counts.
        self.bytes = len(head)

    def run(self) -> None:
        while True:
            self._pipe.check()
            chunk = self._source.read(READ_CHUNK)
            if not chunk:
                self._pipe.put(self._out, END)
                return
            if self.hash is not None:
                self.hash.update(chunk)
            self.bytes += len(chunk)
            self._pipe.put(self._out, chunk)


class DecodeStage:
    """Compressed chunks → full buffers of the decoded image, from the pool; the last one may be partly filled."""

    def __init__(
        self, pipe: Pipeline, queues: Queues, fmt: ImageFormat, head: bytes, *, gzip_impl: str,
        gzip_check: GzipMemberCheck | None, source_size: int | None,
    ) -> None:
        self._pipe = pipe
        self._queues = queues
        self._format = fmt
        self._head = head
        self._gzip_impl = gzip_impl
        self._gzip_check = gzip_check
        self._source_size = source_size

    def _next_chunk(self) -> bytes:
        item = self._pipe.get(self._queues.compressed)
        return b"" if item is END else cast(bytes, item)

    def run(self) -> None:
        decoder = open_decoder(
            self._format, self._next_chunk, self._head, gzip_impl=self._gzip_impl, gzip_check=self._gzip_check,
            source_size=self._source_size, check=self._pipe.check,
        )
        try:
            self._decode(decoder)
        except BaseException as exc:
            # First, so that a decoder program's feeder thread waiting for input gives up before close() waits for it.
            self._pipe.fail(exc)
            raise
        finally:
            if isinstance(decoder, ChildDecoder):
                decoder.close()

    def _fill(self, decoder: Decoder, buf: mmap.mmap) -> int:
        """Decode into ``buf`` until it is full or the image ended; returns how many bytes it holds."""
        filled = 0
        if isinstance(decoder, ChildDecoder):
            # Straight from the program's stdout into the buffer: no copy in Python.
            with memoryview(buf) as view:
                while filled < BUFFER_SIZE and (n := decoder.readinto(view[filled:])):
                    filled += n
            return filled
        while filled < BUFFER_SIZE:
            data = decoder.read(BUFFER_SIZE - filled)
            if not data:
                break
            buf[filled : filled + len(data)] = data
            filled += len(data)
        return filled

    def _decode(self, decoder: Decoder) -> None:
        while True:
            buf = cast(mmap.mmap, self._pipe.get(self._queues.free))
            filled = self._fill(decoder, buf)
            if filled:
                self._pipe.put(self._queues.to_hash, (buf, filled, False))
            if filled < BUFFER_SIZE:
                self._pipe.put(self._queues.to_hash, END)
                return


class HashStage:
    """Decoded buffers → the image's sha256 (and each gzip member's CRC-32, off the inflating thread); marks the
    buffers that hold only zeros (free space of a file system), which the write stage zeroes instead of writing."""

    def __init__(self, pipe: Pipeline, queues: Queues, gzip_check: GzipMemberCheck | None) -> None:
        self._pipe = pipe
        self._gzip_check = gzip_check
        self._in = queues.to_hash
        self._out = queues.to_write
        self.hash = hashlib.sha256()

    def run(self) -> None:
        while True:
            item = self._pipe.get(self._in)
            if item is END:
                if self._gzip_check is not None:
                    self._gzip_check.finish()
                self._pipe.put(self._out, END)
                return
            buf, n, _ = cast(Filled, item)
            with memoryview(buf) as view:
                self.hash.update(view[:n])
                if self._gzip_check is not None:
                    self._gzip_check.update(view[:n])
            self._pipe.put(self._out, (buf, n, n == BUFFER_SIZE and _is_zero(buf)))

