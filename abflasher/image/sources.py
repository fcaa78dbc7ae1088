"""Where image bytes come from: a local file, an already-open fd (a pipe too), or HTTP(S)."""

from __future__ import annotations

import os
import select
import stat
import threading
import time
from typing import TYPE_CHECKING, Protocol, Unpack

from abflasher import errors
from abflasher.image.locations import SCHEME_RE

if TYPE_CHECKING:
    from abflasher.image.http import HttpOptions

#: How often a read waiting for a pipe or socket looks at the cancel event.
CANCEL_POLL_SECONDS = 0.2


class ImageSource(Protocol):
    """A stream of (usually compressed) image bytes.

    ``size`` is the number of bytes the source will deliver when that is known up front (a regular file, an HTTP
    body with Content-Length), for progress only: nothing trusts it for correctness.
    """

    description: str
    size: int | None

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; ``b""`` only at the end of the stream. Raises an AbFlasherError on failure."""
        ...

    def close(self) -> None: ...


class FdSource:
    """Reads an fd it was given: a pipe, a socket or a regular file opened by someone else.

    A pipe or socket is only read once poll() says it has data, so a writer that stays silent cannot hold a read
    forever: ``cancel`` (or :meth:`abort`, from any thread) ends the wait within CANCEL_POLL_SECONDS, and
    ``idle_timeout`` seconds without a byte end it too. Both raise Cancelled.
    """

    def __init__(
        self,
        fd: int,
        description: str = "",
        *,
        close_fd: bool = True,
        cancel: threading.Event | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        self._fd = fd
        self._close_fd = close_fd
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise errors.InvalidArgument(f"{description or 'the image'} is a directory, not an image file")
        self.size: int | None = st.st_size if stat.S_ISREG(st.st_mode) else None
        self.description = description or f"fd {fd}"
        self._cancel = cancel
        self._aborted = threading.Event()
        self._idle_timeout = idle_timeout if idle_timeout and idle_timeout > 0 else None
        # Regular files (and block devices) are always readable: poll() would say so at once.
        self._poller: select.poll | None = None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            self._poller = select.poll()
            self._poller.register(fd, select.POLLIN)

    def read(self, n: int) -> bytes:
        self._wait_readable()
        try:
            return os.read(self._fd, n)
        except OSError as exc:
            raise errors.BadImage(f"reading {self.description} failed: {exc.strerror}") from exc

    def abort(self) -> None:
        """Make a read that waits now, or any later one, raise Cancelled. Safe from any thread."""
        self._aborted.set()

    def _stopped(self) -> bool:
        return self._aborted.is_set() or (self._cancel is not None and self._cancel.is_set())

    def _wait_readable(self) -> None:
        if self._stopped():
            raise errors.Cancelled(f"reading {self.description} was cancelled")
        if self._poller is None:
            return
        deadline = time.monotonic() + self._idle_timeout if self._idle_timeout is not None else None
        while True:
            wait = CANCEL_POLL_SECONDS
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            # POLLHUP and POLLERR count as readable too: the read then sees the end or the error.
            if self._poller.poll(wait * 1000):
                return
            if self._stopped():
                raise errors.Cancelled(f"reading {self.description} was cancelled")
            if deadline is not None and time.monotonic() >= deadline:
                raise errors.Cancelled(
                    f"no data from {self.description} for {self._idle_timeout:g} s; gave up waiting for it"
                )

    def close(self) -> None:
        if self._close_fd and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1


class PrefixedSource:
    """``source`` with the bytes already read from it (to detect what it is) put back in front."""

    def __init__(self, source: ImageSource, head: bytes) -> None:
        self._source = source
        self._head = head
        self.size = source.size
        self.description = source.description

    def read(self, n: int) -> bytes:
        if self._head:
            data, self._head = self._head[:n], self._head[n:]
            return data
        return self._source.read(n)

    def close(self) -> None:
        self._source.close()


def open_image_file(path: str | os.PathLike[str]) -> int:
    """A read-only fd on image file ``path`` (with the caller's own permissions); InvalidArgument saying why not."""
    where = os.fspath(path)
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise errors.InvalidArgument(f"image file {where} does not exist") from exc
    except PermissionError as exc:
        raise errors.InvalidArgument(f"image file {where}: permission denied (you must be able to read it)") from exc
    except OSError as exc:
        raise errors.InvalidArgument(f"cannot open image {where}: {exc.strerror}") from exc


class FileSource(FdSource):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        fd = open_image_file(path)
        try:
            super().__init__(fd, os.fspath(path))
        except BaseException:
            os.close(fd)
            raise
        # The kernel reads ahead harder when told the access is sequential.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)


def open_source(spec: str, **http_options: Unpack[HttpOptions]) -> ImageSource:
    """The source named by ``spec``: ``-`` (standard input), an http(s) URL, or a local file path."""
    if spec == "-":
        try:
            fd = os.dup(0)
        except OSError as exc:
            raise errors.InvalidArgument(f"cannot read the image from standard input: {exc.strerror}") from exc
        try:
            return FdSource(fd, "standard input")
        except BaseException:
            os.close(fd)
            raise
    match = SCHEME_RE.match(spec)
    if match is not None:
        scheme = match.group(1).lower()
        if scheme in ("http", "https"):
            from abflasher.image.http import HttpSource

            return HttpSource(spec, **http_options)
        raise errors.InvalidArgument(
            f"image location scheme {scheme}:// is not supported: give an http:// or https:// URL, a local path, or -"
        )
    if not spec:
        raise errors.InvalidArgument("no image given: name a file, an http(s) URL, or - for standard input")
    return FileSource(spec)
