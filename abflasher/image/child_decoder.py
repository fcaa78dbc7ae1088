"""Decoding in a child process: Debian's fast decoder programs feed the pipeline.

`igzip` (Debian package isal) inflates gzip 4-6 times faster than stdlib zlib, and Debian has it as a program, not as
the Python module. A `ChildDecoder` runs such a program with a pipe on each side: a feeder thread writes the compressed
bytes into its stdin, the decode stage reads the image from its stdout straight into the pipeline's buffers. Memory
stays bounded by the two pipes (1 MiB each) and the program's own buffers, whatever the image size.

The program's exit status alone does not say everything the in-process decoders say, so this module adds the rest:

- **Trailing garbage.** igzip stops at the first byte after a member that is not the gzip magic and exits 0,
  ignoring the rest. After the image the feeder sends a *sentinel*: one more gzip member, whose payload is 16 random
  bytes. The image ends cleanly exactly when the output ends with that payload (which is then dropped); anything
  appended to the image stops igzip before the sentinel, or makes it fail.
- **Truncated or corrupt.** A truncated image makes igzip read the sentinel as deflate data and fail, as corrupt
  data does. What tells them apart is whether igzip read any of the sentinel before it failed: it only reads on
  after decoding all of the image without an error. For that the image must end where one of igzip's reads ends
  (it reads its input IGZIP_READ_SIZE bytes at a time): when the image's size is known, empty gzip members padded to
  the right length go in front of it (they decode to nothing). The sentinel is written only once igzip has taken all
  of the image out of the pipe, and the parent keeps the pipe's read end open, so what igzip left unread in it
  after exiting (FIONREAD) says whether it got to the sentinel. When the size is not known (a pipe), a failure after
  the sentinel was read is reported as "truncated or damaged in its last MiB".
- **Latency.** igzip decodes its input a read (1 MiB of compressed bytes) at a time, so the first bytes of the image
  come out once 1 MiB of input arrived (or the input ended), and the rest in steps of 1 MiB of input: nothing for
  throughput, but a source that sends less than that and then waits gets nothing written until it goes on.
- **The first member's header** is checked here (reserved flags, header CRC), as the in-process decoder does.
- **Cancellation and failures.** The program runs in its own session (a Ctrl-C at the terminal is the pipeline's to
  handle, not the program's); `close` kills it (SIGKILL), reaps it and closes every descriptor; a program that
  dies or is killed, or cannot be started, is one clear error line, never its stderr.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import select
import shutil
import signal
import subprocess
import termios
import threading
import time
import zlib
from collections.abc import Callable
from typing import NoReturn

from abflasher import errors

#: igzip's input buffer (BLOCK_SIZE in its igzip_cli.c): it reads its input this many bytes at a time.
IGZIP_READ_SIZE = 1 << 20
#: Pipes to and from the program: fewer, larger reads and writes.
PIPE_SIZE = 1 << 20
SENTINEL_PAYLOAD_BYTES = 16
#: How long a poll waits before looking at the cancel check again.
_POLL_SECONDS = 0.1
#: How often the feeder looks whether the program has taken all of the image out of the pipe.
_DRAIN_POLL_SECONDS = 0.002
#: After its stdout ended, how long the program may take to exit before it is killed.
_EXIT_GRACE_SECONDS = 10.0
_STDERR_LIMIT = 4096

_GZIP_MEMBER_OVERHEAD = 22  # header with an empty extra field (12) + an empty final deflate block (2) + trailer (8)
_EMPTY_DEFLATE = b"\x03\x00"


def igzip_path() -> str | None:
    """Where the igzip program is, when Debian's isal package is installed."""
    return shutil.which("igzip")


def _padding_members(length: int) -> bytes:
    """Empty gzip members, ``length`` bytes in all (at least _GZIP_MEMBER_OVERHEAD): an extra field pads each out."""
    members: list[bytes] = []
    while length:
        size = min(length, _GZIP_MEMBER_OVERHEAD + 0xFFFF)
        if 0 < length - size < _GZIP_MEMBER_OVERHEAD:
            size = length - _GZIP_MEMBER_OVERHEAD
        extra = size - _GZIP_MEMBER_OVERHEAD
        header = b"\x1f\x8b\x08\x04" + bytes(4) + b"\x00\xff" + extra.to_bytes(2, "little") + bytes(extra)
        members.append(header + _EMPTY_DEFLATE + bytes(8))  # CRC-32 and length of nothing: zero
        length -= size
    return b"".join(members)


def _gzip_member(payload: bytes) -> bytes:
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = deflate.compress(payload) + deflate.flush()
    trailer = zlib.crc32(payload).to_bytes(4, "little") + len(payload).to_bytes(4, "little")
    return b"\x1f\x8b\x08\x00" + bytes(4) + b"\x00\xff" + body + trailer


class GzipFraming:
    """What goes around the image for igzip: alignment padding in front (when the size is known), the sentinel after."""

    def __init__(self, source_size: int | None) -> None:
        self.payload = os.urandom(SENTINEL_PAYLOAD_BYTES)
        self.suffix = _gzip_member(self.payload)
        self.aligned = source_size is not None and source_size > 0
        self.prefix = b""
        if source_size:
            length = -source_size % IGZIP_READ_SIZE
            if length < _GZIP_MEMBER_OVERHEAD:
                length += IGZIP_READ_SIZE
            self.prefix = _padding_members(length)


def _fionread(fd: int) -> int:
    count = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, count)
    return count[0]


def _grow_pipe(fd: int) -> None:
    # An unprivileged process over its pipe-size budget keeps the default: slower, not wrong.
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def _no_check() -> None:
    pass


class ChildDecoder:
    """A decoder program as a `Decoder`: compressed bytes into its stdin, the image out of its stdout.

    ``check`` is called while waiting for the program (it raises to abandon the decode: a cancel); ``framing`` is
    given for igzip. Call `close` when done, whatever happened.
    """

    def __init__(
        self,
        argv: list[str],
        format_name: str,
        next_chunk: Callable[[], bytes],
        head: bytes,
        *,
        framing: GzipFraming | None = None,
        check: Callable[[], None] = _no_check,
    ) -> None:
        self.name = os.path.basename(argv[0])
        self._format = format_name
        self._framing = framing
        self._check = check
        self._next = next_chunk
        self._lock = threading.Lock()
        self._fed = 0
        self._output = 0
        self._tail = b""
        self._pending = b""
        self._suffix_written = False
        self._feed_error: BaseException | None = None
        self._exited = threading.Event()
        self._closed = False
        stdin_read, self._stdin = os.pipe2(os.O_CLOEXEC)
        self._stdout, stdout_write = os.pipe2(os.O_CLOEXEC)
        _grow_pipe(self._stdin)
        _grow_pipe(self._stdout)
        self._poller = select.poll()
        self._poller.register(self._stdout, select.POLLIN)
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=stdin_read,
                stdout=stdout_write,
                stderr=subprocess.PIPE,
                env={**os.environ, "LC_ALL": "C"},
                start_new_session=True,
            )
        except OSError as exc:
            for fd in (stdin_read, self._stdin, self._stdout, stdout_write):
                os.close(fd)
            raise errors.Internal(f"cannot start the {format_name} decoder {argv[0]}: {exc.strerror}") from exc
        os.close(stdout_write)
        #: Kept open: after the program exits, what it left unread in its stdin says where it stopped.
        self._stdin_read: int = stdin_read
        self._feeder = threading.Thread(
            target=self._feed, args=(head,), name=f"abflasher-feed-{self.name}", daemon=True
        )
        self._feeder.start()

    # ------------------------------------------------------------------------------------------------ the feeder

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._stdin, view)
            view = view[written:]

    def _feed(self, head: bytes) -> None:
        try:
            if self._framing is not None:
                self._write(self._framing.prefix)
            chunk = head
            while chunk:
                self._write(chunk)
                self._fed += len(chunk)
                chunk = self._next()
            if self._framing is not None:
                self._write_suffix(self._framing.suffix)
        except BrokenPipeError:
            pass  # the program stopped reading: its exit status and output say why
        except BaseException as exc:
            self._feed_error = exc
            self._kill()
        finally:
            with self._lock:
                os.close(self._stdin)
                self._stdin = -1

    def _write_suffix(self, suffix: bytes) -> None:
        """The sentinel, once the program has taken all of the image out of the pipe (see the module docstring)."""
        while _fionread(self._stdin) > 0:
            if self._exited.is_set():
                return
            self._check()
            time.sleep(_DRAIN_POLL_SECONDS)
        with self._lock:
            self._write(suffix)
            self._suffix_written = True

    # ------------------------------------------------------------------------------------------------ the output

    def read(self, max_length: int) -> bytes:
        buf = bytearray(max_length)
        n = self.readinto(memoryview(buf))
        return bytes(buf[:n])

    def readinto(self, view: memoryview) -> int:
        """Up to ``len(view)`` decoded bytes into ``view``; 0 only at the verified end of the image."""
        if self._framing is None:
            n = self._read_some(view)
            self._output += n
            if not n:
                self._finish()
            return n
        if self._pending:
            n = min(len(view), len(self._pending))
            view[:n] = self._pending[:n]
            self._pending = self._pending[n:]
            return n
        keep = len(self._framing.payload)
        if len(view) <= keep:
            # Too small to read into while holding the payload back: through a larger buffer.
            scratch = bytearray(4 * keep)
            n = self._readinto_framed(memoryview(scratch), keep)
            self._pending = bytes(scratch[:n])
            return self.readinto(view) if n else 0
        return self._readinto_framed(view, keep)

    def _readinto_framed(self, view: memoryview, keep: int) -> int:
        """The sentinel's payload ends the output: the last ``keep`` bytes read are held back until the end shows
        whether they are the payload."""
        while True:
            held = len(self._tail)
            view[:held] = self._tail
            n = self._read_some(view[held:])
            if not n:
                self._finish()
                return 0
            total = held + n
            if total <= keep:
                self._tail = bytes(view[:total])
                continue
            self._tail = bytes(view[total - keep : total])
            self._output += total - keep
            return total - keep

    def _read_some(self, view: memoryview) -> int:
        while not self._poller.poll(_POLL_SECONDS * 1000):
            self._check()
        try:
            return os.readv(self._stdout, [view])
        except OSError as exc:
            raise errors.Internal(
                f"reading from the {self._format} decoder {self.name} failed: {exc.strerror}"
            ) from exc

    # ------------------------------------------------------------------------------------------------ the end

    def _finish(self) -> None:
        """The program closed its stdout: reap it and decide whether the image ended cleanly."""
        try:
            returncode = self._proc.wait(timeout=_EXIT_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            self._kill()
            returncode = self._proc.wait()
        self._exited.set()
        with self._lock:
            unread = _fionread(self._stdin_read)
            suffix_read = self._suffix_written and unread == 0
        os.close(self._stdin_read)  # a feeder still writing gets EPIPE now
        self._stdin_read = -1
        # Not waited for here: after an early stop it may be waiting for input; close() lets it go.
        if self._feed_error is not None:
            raise self._feed_error
        stderr = self._stderr_line()
        if returncode < 0:
            raise errors.Internal(
                f"the {self._format} decoder {self.name} was killed by {signal.Signals(-returncode).name} "
                f"after {self._output} bytes of the image"
            )
        if self._framing is None:
            if returncode:
                self._failed(returncode, stderr)
            return
        if returncode == 0:
            if self._tail != self._framing.payload:
                raise errors.BadImage(
                    f"trailing garbage after the last gzip member (after {self._output + len(self._tail)} bytes "
                    "of the image): the image file is damaged or has data appended"
                )
            return
        if suffix_read and self._framing.aligned:
            self._truncated()
        if suffix_read:
            raise errors.BadImage(
                f"the gzip image is truncated or damaged in its last MiB: {self.name} could not finish it after "
                f"{self._fed} compressed bytes ({self._output} bytes of the image decoded)"
            )
        if "invalid gzip header" in stderr:
            raise errors.BadImage("corrupt gzip header (the image file is damaged)")
        raise errors.BadImage(
            f"corrupt gzip data: {self.name} failed after {self._output} bytes of the image (the image file is damaged)"
        )

    def _truncated(self) -> NoReturn:
        raise errors.BadImage(
            f"the {self._format} image is truncated: it ended after {self._fed} compressed bytes, before its "
            "end-of-stream marker (incomplete download or copy?)"
        )

    def _failed(self, returncode: int, stderr: str) -> NoReturn:
        """A program without framing failed: its message (in the C locale) says how."""
        if "Unexpected end of input" in stderr:
            self._truncated()
        if "corrupt" in stderr or "File format not recognized" in stderr:
            raise errors.BadImage(
                f"corrupt {self._format} data, or trailing garbage after the end of the {self._format} stream: "
                f"{self.name} failed after {self._output} bytes of the image (the image file is damaged)"
            )
        raise errors.BadImage(
            f"the {self._format} decoder {self.name} failed (exit status {returncode}) after {self._output} bytes "
            f"of the image: {stderr or 'no message'}"
        )

    def _stderr_line(self) -> str:
        """The program's first line of complaint, trimmed, for telling failures apart (never shown whole)."""
        assert self._proc.stderr is not None
        os.set_blocking(self._proc.stderr.fileno(), False)
        try:
            text = self._proc.stderr.read(_STDERR_LIMIT) or b""
        except BlockingIOError:
            text = b""
        lines = text.decode(errors="replace").strip().splitlines()
        return lines[0][:200] if lines else ""

    def _kill(self) -> None:
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    def close(self) -> None:
        """Kill the program if it still runs, reap it, close every descriptor, let the feeder go. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._kill()
        self._proc.wait()
        self._exited.set()
        if self._stdin_read >= 0:
            os.close(self._stdin_read)
            self._stdin_read = -1
        os.close(self._stdout)
        self._feeder.join(timeout=_EXIT_GRACE_SECONDS)
        if self._proc.stderr is not None:
            self._proc.stderr.close()
