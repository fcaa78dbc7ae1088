"""A casync chunk store (``.castr``) served by any static web server, S3 or a CDN, or a local directory.

A chunk with id ``ID`` (hex) is the file ``STORE/ID[:4]/ID.cacnk``: the chunk's bytes compressed with zstd (casync's
default; xz and gzip chunks, which ``casync make --compression=`` can make, are read too). Every chunk is fetched
with one plain GET (never a multi-range request, which S3 does not answer) over keep-alive connections
(delta/store_http.py); a body cut short is resumed with ``Range`` guarded by ``If-Range``; failures
are retried with backoff; and nothing is handed on before it decompressed to exactly the chunk's size and its digest
equals the chunk's id.

`ChunkFetcher` runs a few connections in parallel ahead of the installer, in the order the installer needs the
chunks, within a fixed budget of bytes, so memory stays flat whatever the image size.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import lzma
import os
import socket
import threading
import urllib.parse
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message

from abflasher import errors
from abflasher.delta.index import CHUNK_SUFFIX, Chunk
from abflasher.delta.store_http import StoreConnection, describe_failure
from abflasher.image.http import _status_text
from abflasher.image.locations import check_http_url, redact_url

log = logging.getLogger(__name__)

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_GZIP_MAGIC = b"\x1f\x8b"
_RETRYABLE_STATUSES = frozenset({408, 429})
_READ_PIECE = 64 << 10
#: Uncompressed bytes the fetcher may hold ahead of the installer.
FETCH_BUDGET = 8 << 20


def default_store_url(index_url: str) -> str:
    """The store casync uses for an index when none is named: ``default.castr`` next to the index."""
    parts = urllib.parse.urlsplit(index_url)
    if parts.scheme:
        path = parts.path.rsplit("/", 1)[0] + "/default.castr"
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
    return os.path.join(os.path.dirname(index_url), "default.castr")


@dataclass(frozen=True)
class StoreOptions:
    """How chunks are downloaded: the configuration's HTTP timeouts and retries, and how many connections."""

    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    #: Extra attempts per chunk: a failed connection, a server error, a body cut short or a corrupt chunk.
    retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0
    connections: int = 4


def decompress_chunk(data: bytes, size: int) -> bytes:
    """A chunk file's bytes, decompressed; ValueError unless they are one whole stream of exactly ``size`` bytes."""
    if data.startswith(_ZSTD_MAGIC):
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=False)
        out = bytearray()
        try:
            while len(out) <= size:
                piece = reader.read(size + 1 - len(out))
                if not piece:
                    break
                out += piece
        except zstandard.ZstdError as exc:
            raise ValueError(f"corrupt zstd data ({exc})") from exc
    elif data.startswith(_XZ_MAGIC):
        decompressor = lzma.LZMADecompressor()
        try:
            out = bytearray(decompressor.decompress(data, max_length=size + 1))
        except lzma.LZMAError as exc:
            raise ValueError(f"corrupt xz data ({exc})") from exc
    elif data.startswith(_GZIP_MAGIC):
        inflater = zlib.decompressobj(wbits=31)
        try:
            out = bytearray(inflater.decompress(data, size + 1))
        except zlib.error as exc:
            raise ValueError(f"corrupt gzip data ({exc})") from exc
    else:
        raise ValueError("not zstd, xz or gzip data")
    if len(out) != size:
        raise ValueError(f"it decompresses to {'more than ' if len(out) > size else ''}{min(len(out), size)} bytes, "
                         f"the index says {size}")
    return bytes(out)


class ChunkStore:
    """Where chunks come from: an http(s) URL or a local directory, and how each is checked."""

    def __init__(self, location: str, digest_name: str, options: StoreOptions | None = None,
                 cancel: threading.Event | None = None) -> None:
        self.location = location.rstrip("/")
        self.remote = location.startswith(("http://", "https://"))
        if self.remote:
            check_http_url(location, "chunk store")
        elif not os.path.isdir(location):
            raise errors.InvalidArgument(f"chunk store {location} is not a directory nor an http(s) URL")
        self.description = redact_url(self.location) if self.remote else self.location
        self.digest_name = digest_name
        self.options = options or StoreOptions()
        self.cancel = cancel or threading.Event()
        self._lock = threading.Lock()
        #: Bytes received from the store (compressed, as they crossed the network), retries included.
        self.downloaded = 0
        self.fetched_chunks = 0
        self._sockets: set[socket.socket] = set()

    def chunk_location(self, chunk_id: bytes) -> str:
        name = chunk_id.hex()
        return f"{self.location}/{name[:4]}/{name}{CHUNK_SUFFIX}"

    def connection(self) -> StoreConnection:
        """A keep-alive connection for `fetch`, whose sockets `abort` can cut."""
        return StoreConnection(connect_timeout=self.options.connect_timeout, read_timeout=self.options.read_timeout,
                               watch=self._watch)

    def fetch(self, chunk: Chunk, session: StoreConnection | None) -> bytes:
        """The chunk's bytes, decompressed and checked against its id; retried up to ``options.retries`` times."""
        import hashlib

        failures = 0
        where = f"chunk {chunk.hex} of store {self.description}"
        while True:
            self._check_cancel()
            try:
                raw = self._download(chunk, session) if session is not None else self._read_local(chunk)
                data = decompress_chunk(raw, chunk.size)
                if hashlib.new(self.digest_name, data).digest() != chunk.id:
                    raise ValueError("its content does not match its id")
            except ValueError as exc:
                failures += 1
                if failures > self.options.retries:
                    raise errors.ChecksumMismatch(
                        f"{where} is corrupt: {exc} (refused {failures} times); the store does not hold this image's "
                        "chunks intact"
                    ) from None
                log.warning("%s refused: %s; fetching it again", where, exc)
                self._wait(failures)
                continue
            with self._lock:
                self.fetched_chunks += 1
            return data

    def _read_local(self, chunk: Chunk) -> bytes:
        path = self.chunk_location(chunk.id)
        try:
            with open(path, "rb") as handle:
                data = handle.read(chunk.size * 2 + 4096)
        except FileNotFoundError:
            raise errors.Network(f"chunk {chunk.hex} is missing from store {self.description}") from None
        except OSError as exc:
            raise errors.Network(f"cannot read chunk {path}: {exc.strerror}") from exc
        self._count(len(data))
        return data

    def _count(self, n: int) -> None:
        with self._lock:
            self.downloaded += n

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise errors.Cancelled("the update was cancelled")

    def _wait(self, failures: int) -> None:
        wait = min(self.options.backoff * 2 ** (failures - 1), self.options.max_backoff)
        if self.cancel.wait(wait):
            raise errors.Cancelled("the update was cancelled")

    def _download(self, chunk: Chunk, session: StoreConnection) -> bytes:
        """The chunk file's bytes as the server holds them, resumed when a body is cut short."""
        url = self.chunk_location(chunk.id)
        shown = f"chunk {chunk.hex} from {self.description}"
        body = bytearray()
        validator: str | None = None
        failures = 0
        limit = chunk.size * 2 + 4096  # more than any compressor makes of the chunk: a server sending more lies

        def retry(message: str) -> None:
            nonlocal failures
            failures += 1
            if failures > self.options.retries:
                raise errors.Network(f"{message} (gave up after {self.options.retries} retries)")
            log.info("%s; retrying (%d of %d)", message, failures, self.options.retries)
            self._wait(failures)

        while True:
            self._check_cancel()
            headers = {"Accept-Encoding": "identity"}
            if body:
                headers["Range"] = f"bytes={len(body)}-"
                if validator is not None:
                    headers["If-Range"] = validator
            try:
                resp = session.get(url, headers)
            except (OSError, http.client.HTTPException) as exc:
                session.reset()
                self._check_cancel()
                retry(f"fetching {shown} failed: {describe_failure(exc)}")
                continue
            status = resp.status
            if status == 404 or status >= 500 or status in _RETRYABLE_STATUSES or status not in (200, 206) or (
                status == 206 and not (body and _range_start(resp.headers) == len(body))
            ):
                session.reset()  # the body is not wanted: a fresh connection is cheaper than reading it
                if status == 404:
                    raise errors.Network(f"{shown} is missing (HTTP 404): the store does not hold this image")
                if status >= 500 or status in _RETRYABLE_STATUSES:
                    retry(f"server error for {shown}: {_status_text(status)}")
                    continue
                raise errors.Network(f"server answered {_status_text(status)} for {shown}")
            if status == 200:
                body.clear()  # the whole file again (a server that ignores Range, or a changed file)
            validator = _strong_etag(resp.headers) or resp.headers.get("Last-Modified") or validator
            expected_end = _expected_end(resp.headers, len(body))
            try:
                while piece := resp.read(_READ_PIECE):
                    body += piece
                    self._count(len(piece))
                    if len(body) > limit:
                        session.reset()
                        raise errors.Network(f"server sent more than {limit} bytes for {shown}; refusing it")
            except (OSError, http.client.HTTPException) as exc:
                session.reset()
                self._check_cancel()
                retry(f"connection lost after {len(body)} bytes of {shown}: {describe_failure(exc)}")
                continue
            if resp.will_close:
                session.reset()
            if expected_end is not None and len(body) < expected_end:
                retry(f"body of {shown} ended after {len(body)} of {expected_end} bytes")
                continue
            if expected_end is not None and len(body) > expected_end:
                raise errors.Network(f"server sent more than its Content-Length for {shown}")
            return bytes(body)

    def _watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)
        if self.cancel.is_set():
            self.abort()

    def abort(self) -> None:
        """Cut every connection: a request waiting for an answer ends at once (safe from any thread)."""
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _strong_etag(headers: Message) -> str | None:
    etag = headers.get("ETag")
    return etag if etag is not None and not etag.startswith("W/") else None


def _range_start(headers: Message) -> int | None:
    value = headers.get("Content-Range", "")
    unit, _, spec = value.partition(" ")
    start, _, _ = spec.partition("-")
    return int(start) if unit.strip() == "bytes" and start.isdigit() else None


def _expected_end(headers: Message, have: int) -> int | None:
    value = headers.get("Content-Length")
    if value is None or not value.strip().isdigit():
        return None
    return have + int(value.strip())


class ChunkFetcher:
    """Fetches ``chunks`` (in the order the installer needs them) on a few parallel connections, ahead of the
    installer within `FETCH_BUDGET` bytes; ``take`` hands each one over once."""

    def __init__(self, store: ChunkStore, chunks: Sequence[Chunk]) -> None:
        self._store = store
        self._chunks = chunks  # a plan's compact view: no list of every chunk
        self._next = 0
        self._ready: dict[bytes, bytes] = {}
        self._budget = FETCH_BUDGET
        self._held = 0
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._stopped = False
        count = max(1, min(store.options.connections, len(self._chunks))) if self._chunks else 0
        # One session per connection, and one for the installer's own late fetches (`fetch_now`).
        self._sessions = [store.connection() if store.remote else None for _ in range(count + 1)]
        self._threads = [
            threading.Thread(target=self._work, args=(self._sessions[n],), name=f"abflasher-fetch-{n}", daemon=True)
            for n in range(count)
        ]
        self._threads.append(threading.Thread(target=self._abort_on_cancel, name="abflasher-fetch-cancel", daemon=True))
        for thread in self._threads:
            thread.start()

    def _abort_on_cancel(self) -> None:
        while not self._stopped:
            if self._store.cancel.wait(0.2):
                self._store.abort()
                return

    def _work(self, session: StoreConnection | None) -> None:
        try:
            while True:
                with self._cond:
                    # Only the next chunk in order may take budget, so a late chunk can never starve an early one.
                    while not self._stopped and self._next < len(self._chunks) and (
                        self._held and self._held + self._chunks[self._next].size > self._budget
                    ):
                        self._cond.wait(0.5)
                    if self._stopped or self._next >= len(self._chunks):
                        return
                    chunk = self._chunks[self._next]
                    self._next += 1
                    self._held += chunk.size
                data = self._store.fetch(chunk, session)
                with self._cond:
                    self._ready[chunk.id] = data
                    self._cond.notify_all()
        except BaseException as exc:
            with self._cond:
                if self._error is None:
                    self._error = exc
                self._cond.notify_all()

    def take(self, chunk: Chunk) -> bytes:
        """The chunk's checked bytes, waiting for the fetch that has it."""
        with self._cond:
            while chunk.id not in self._ready:
                if self._error is not None:
                    raise self._error
                if self._store.cancel.is_set():
                    raise errors.Cancelled("the update was cancelled")
                self._cond.wait(0.2)
            data = self._ready.pop(chunk.id)
            self._held -= len(data)
            self._cond.notify_all()
            return data

    def fetch_now(self, chunk: Chunk) -> bytes:
        """A chunk nobody planned to fetch (a local copy failed its check), on the installer's own connection."""
        return self._store.fetch(chunk, self._sessions[-1])

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._store.abort()
        for thread in self._threads:
            thread.join()
        for session in self._sessions:
            if session is not None:
                session.close()
