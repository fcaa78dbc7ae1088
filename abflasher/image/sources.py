"""Where image bytes come from: a local file, an already-open fd (a pipe too), or HTTP(S)."""

from __future__ import annotations

import os
import re
import stat
from typing import TYPE_CHECKING, Any, Protocol, Unpack

from abflasher import errors

if TYPE_CHECKING:
    from abflasher.image.http import HttpOptions

SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

#: Names that moved to abflasher.image.http; imported on first use so local sources never load requests.
_HTTP_NAMES = frozenset({"HttpSource", "HttpStatusError", "HttpOptions", "check_http_url", "redact_url"})


def __getattr__(name: str) -> Any:
    if name in _HTTP_NAMES:
        from abflasher.image import http

        return getattr(http, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    """Reads an fd it was given: a pipe, a socket or a regular file opened by someone else."""

    def __init__(self, fd: int, description: str = "", *, close_fd: bool = True) -> None:
        self._fd = fd
        self._close_fd = close_fd
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise errors.InvalidArgument(f"{description or 'the image'} is a directory, not an image file")
        self.size: int | None = st.st_size if stat.S_ISREG(st.st_mode) else None
        self.description = description or f"fd {fd}"

    def read(self, n: int) -> bytes:
        try:
            return os.read(self._fd, n)
        except OSError as exc:
            raise errors.BadImage(f"reading {self.description} failed: {exc.strerror}") from exc

    def close(self) -> None:
        if self._close_fd and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1


class FileSource(FdSource):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise errors.InvalidArgument(f"image file {os.fspath(path)} does not exist") from exc
        except OSError as exc:
            raise errors.InvalidArgument(f"cannot open image {os.fspath(path)}: {exc.strerror}") from exc
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
