"""A local HTTP/1.1 server for tests that serves in-memory bytes and misbehaves on request.

Each path is a :class:`Resource` whose fields switch faults on: error statuses (always, or for the first N
requests), connections dropped after N body bytes, Range ignored, a Content-Length that lies, redirects, an ETag
that changes on every request, stalled or slow bodies. Range and If-Range are honoured correctly unless a fault says
otherwise. Every request is recorded (method, path, Range, If-Range, headers) so tests can check what a client sent.

Usage::

    with FaultServer() as server:
        server.add("/img.gz", data, drop_after=1000, drop_requests=1)
        source = HttpSource(server.url("/img.gz"))

Binds only 127.0.0.1 on an ephemeral port. ``stop()`` ends stalls at once, closes open connections and joins
every thread it started.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import http.server
import io
import socket
import socketserver
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["FaultServer", "RequestRecord", "Resource", "make_self_signed_cert", "serve_files"]

SEND_PIECE = 16 * 1024


@dataclass
class Resource:
    """What one path serves, and how it misbehaves. Request numbers count from 1 per path."""

    body: bytes
    content_type: str = "application/octet-stream"
    # Answer with this status and a short text body on every request.
    status: int | None = None
    # Answer ``fail_status`` to the first ``fail_first`` requests, then serve normally.
    fail_first: int = 0
    fail_status: int = 500
    retry_after: str | None = None
    # Close the connection after this many body bytes, on the first ``drop_requests`` requests (None: on all).
    drop_after: int | None = None
    drop_requests: int | None = None
    drop_mode: Literal["close", "reset"] = "close"
    # Answer every request with the full body and 200, as servers without Range support do.
    ignore_range: bool = False
    # Declare a Content-Length this much off the real body (+: body ends early, -: body runs past it),
    # on the first ``length_delta_requests`` requests (None: on all).
    length_delta: int = 0
    length_delta_requests: int | None = None
    # Redirect to this path (on this server) or absolute URL.
    redirect_to: str | None = None
    redirect_status: int = 302
    # Validators. ``etag_changes``: a new ETag on every request (as if the file were replaced each time).
    etag: str | None = None
    etag_changes: bool = False
    last_modified: str | None = None
    # From the second request on, serve this body instead (the image was replaced on the server).
    body_after_first: bytes | None = None
    # Stop sending for ``stall_seconds`` after ``stall_after`` body bytes, on the first ``stall_requests`` requests.
    stall_after: int | None = None
    stall_seconds: float = 30.0
    stall_requests: int | None = None
    # Pause this long between pieces of the body, pieces of ``piece_size`` bytes (a crawling server: 4096 and 1.0).
    piece_delay: float = 0.0
    piece_size: int = SEND_PIECE
    # Answer with this reason phrase instead of the standard one.
    reason: str | None = None
    # Send the body with Transfer-Encoding: chunked, or without any length, ended by closing the connection.
    chunked: bool = False
    no_length: bool = False
    # Keep the connection open this long after the body even when the client asked for Connection: close.
    linger_after_body: float = 0.0
    # From request number ``trailing_from`` on, send these bytes after the declared body (undeclared extra bytes).
    trailing_bytes: bytes = b""
    trailing_from: int = 1
    # Answer a Range request with a Content-Range starting this many bytes off the asked offset.
    range_start_error: int = 0
    extra_headers: dict[str, str] = field(default_factory=dict)
    requests: int = 0

    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    range: str | None
    if_range: str | None
    headers: Mapping[str, str]
    number: int  # this request's number for its path, from 1


def _applies(limit: int | None, number: int) -> bool:
    return limit is None or number <= limit


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    # An idle keep-alive connection ends after this, so no handler thread waits forever.
    timeout = 5.0

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def _serve(self, *, send_body: bool) -> None:
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        with owner.lock:
            resource = owner.resources.get(path)
            number = 0
            if resource is not None:
                resource.requests += 1
                number = resource.requests
            owner.requests.append(
                RequestRecord(
                    method=self.command,
                    path=path,
                    range=self.headers.get("Range"),
                    if_range=self.headers.get("If-Range"),
                    headers={k: v for k, v in self.headers.items()},
                    number=number,
                )
            )
        if resource is None:
            self._send_text(404, "no such file")
            return
        if resource.status is not None:
            self._send_text(resource.status, f"status {resource.status}", reason=resource.reason)
            return
        if number <= resource.fail_first:
            headers = {"Retry-After": resource.retry_after} if resource.retry_after else {}
            self._send_text(resource.fail_status, f"failure {number}", headers)
            return
        if resource.redirect_to is not None:
            target = resource.redirect_to
            if target.startswith("/"):
                target = owner.url(target)
            self._send_text(resource.redirect_status, "moved", {"Location": target})
            return
        body = resource.body if number == 1 or resource.body_after_first is None else resource.body_after_first
        etag = f'"v{number}"' if resource.etag_changes else resource.etag
        validators = {}
        if etag is not None:
            validators["ETag"] = etag
        if resource.last_modified is not None:
            validators["Last-Modified"] = resource.last_modified

        status, start, end = 200, 0, len(body)
        range_header = self.headers.get("Range")
        if range_header is not None and not resource.ignore_range and self._if_range_holds(etag, resource):
            parsed = _parse_range(range_header, len(body))
            if parsed == "unsatisfiable":
                self._send_text(416, "range not satisfiable", {"Content-Range": f"bytes */{len(body)}"})
                return
            if parsed is not None:
                status, (start, end) = 206, parsed
        payload = body[start:end]

        self.send_response(status)
        self.send_header("Content-Type", resource.content_type)
        self.send_header("Accept-Ranges", "none" if resource.ignore_range else "bytes")
        for name, value in {**validators, **resource.extra_headers}.items():
            self.send_header(name, value)
        if status == 206:
            shown_start = start + resource.range_start_error
            self.send_header("Content-Range", f"bytes {shown_start}-{end - 1}/{len(body)}")
        if resource.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif resource.no_length:
            self.close_connection = True
        else:
            declared = len(payload)
            if _applies(resource.length_delta_requests, number):
                declared += resource.length_delta
            self.send_header("Content-Length", str(max(declared, 0)))
        if resource.no_length or self.headers.get("Connection", "").lower() == "close":
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if not send_body:
            return
        if number >= resource.trailing_from:
            payload += resource.trailing_bytes
        if not self._send_body(resource, number, payload):
            return
        if resource.linger_after_body > 0:
            owner.stopping.wait(resource.linger_after_body)

    def _if_range_holds(self, etag: str | None, resource: Resource) -> bool:
        if_range = self.headers.get("If-Range")
        if if_range is None:
            return True
        if if_range.startswith('"') or if_range.startswith("W/"):
            # Strong comparison only (RFC 9110 §13.1.5): a weak tag never matches.
            return etag is not None and not etag.startswith("W/") and if_range == etag
        return resource.last_modified is not None and if_range == resource.last_modified

    def _send_body(self, resource: Resource, number: int, payload: bytes) -> bool:
        """Write the body applying the faults; False when the connection was dropped on purpose."""
        owner = self.server.owner
        drop_at = resource.drop_after if _applies(resource.drop_requests, number) else None
        stall_at = resource.stall_after if _applies(resource.stall_requests, number) else None
        sent = 0
        stalled = False
        while sent < len(payload) or (drop_at is not None and sent == drop_at):
            if drop_at is not None and sent >= drop_at:
                self._drop(resource.drop_mode)
                return False
            if stall_at is not None and not stalled and sent >= stall_at:
                stalled = True
                if owner.stopping.wait(resource.stall_seconds):
                    self.close_connection = True
                    return False
            limit = len(payload)
            for mark in (drop_at, stall_at if not stalled else None):
                if mark is not None and sent < mark:
                    limit = min(limit, mark)
            piece = payload[sent : min(limit, sent + resource.piece_size)]
            if resource.piece_delay and sent and owner.stopping.wait(resource.piece_delay):
                self.close_connection = True
                return False
            try:
                self._write_piece(piece, resource.chunked)
            except OSError:
                self.close_connection = True
                return False
            sent += len(piece)
        try:
            if resource.chunked:
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True
            return False
        return True

    def _write_piece(self, piece: bytes, chunked: bool) -> None:
        if not piece:
            return
        if chunked:
            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        else:
            self.wfile.write(piece)

    def _drop(self, mode: str) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
        sock = self.connection
        with contextlib.suppress(OSError):
            if mode == "reset":
                # Linger 0: the last close sends RST instead of FIN, as a crashed or cut connection does. The
                # socket closes for real only once its file objects are closed too.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.rfile.close()
                self.wfile.close()
                sock.close()
                # BaseHTTPRequestHandler flushes wfile after every request.
                self.wfile = io.BytesIO()
            else:
                sock.shutdown(socket.SHUT_RDWR)

    def _send_text(
        self, status: int, text: str, headers: Mapping[str, str] | None = None, reason: str | None = None
    ) -> None:
        data = text.encode() + b"\n"
        self.send_response(status, reason)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            with contextlib.suppress(OSError):
                self.wfile.write(data)


def _parse_range(header: str, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """(start, end) of a single byte range, end exclusive; None for what a server may ignore (e.g. multiple)."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, sep, last = spec.strip().partition("-")
    if not sep:
        return None
    try:
        if first == "":
            suffix = int(last)
            if suffix <= 0:
                return "unsatisfiable"
            return max(size - suffix, 0), size
        start = int(first)
        end = size if last == "" else min(int(last) + 1, size)
    except ValueError:
        return None
    if start >= size or end <= start:
        return "unsatisfiable"
    return start, end


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: FaultServer

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), daemon=True
        )
        with self.owner.lock:
            self.owner.threads.append(thread)
            self.owner.connections.add(request)
        thread.start()

    def finish_request(self, request: Any, client_address: Any) -> None:
        context = self.owner.tls_context
        if context is None:
            super().finish_request(request, client_address)
            return
        try:
            request.settimeout(_Handler.timeout)
            wrapped = context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return  # a client that refused our certificate: nothing to serve
        with self.owner.lock:
            self.owner.connections.add(wrapped)
        try:
            super().finish_request(wrapped, client_address)
        finally:
            with contextlib.suppress(OSError):
                wrapped.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            return  # the client went away: expected whenever a test makes it give up
        with self.owner.lock:
            self.owner.errors.append(repr(error))

    def shutdown_request(self, request: Any) -> None:
        with self.owner.lock:
            self.owner.connections.discard(request)
        super().shutdown_request(request)


class FaultServer:
    """A threaded HTTP/1.1 (or HTTPS, given a certificate) server on 127.0.0.1 with per-path faults."""

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        self.resources: dict[str, Resource] = {}
        self.requests: list[RequestRecord] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.connections: set[Any] = set()
        # Unexpected exceptions in request handlers (bugs of this server); tests may assert it stays empty.
        self.errors: list[str] = []
        self.tls_context: ssl.SSLContext | None = None
        if tls is not None:
            self.tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls_context.load_cert_chain(str(tls[0]), str(tls[1]))
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls_context is not None else "http"

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the server is not running")
        return int(self._server.server_address[1])

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def add(self, path: str, body: bytes, **faults: Any) -> Resource:
        resource = Resource(body=body, **faults)
        with self.lock:
            self.resources[path] = resource
        return resource

    def requests_for(self, path: str) -> list[RequestRecord]:
        with self.lock:
            return [record for record in self.requests if record.path == path]

    def count(self, path: str) -> int:
        return len(self.requests_for(path))

    def start(self) -> FaultServer:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.owner = self
        self._server = server
        self._serve_thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fault-server", daemon=True
        )
        self._serve_thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self.stopping.set()
        server.shutdown()
        server.server_close()
        with self.lock:
            connections = list(self.connections)
            threads = list(self.threads)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread in [*threads, self._serve_thread]:
            if thread is not None:
                thread.join(max(deadline - time.monotonic(), 0.0))
        alive = [thread for thread in threads if thread.is_alive()]
        if alive:
            raise RuntimeError(f"{len(alive)} request threads of the test server did not stop")

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def serve_files(files: Mapping[str, bytes], tls: tuple[Path, Path] | None = None) -> Iterator[FaultServer]:
    """A running FaultServer serving ``files`` (path -> bytes) without faults; more can be added to it."""
    with FaultServer(tls=tls) as server:
        for path, body in files.items():
            server.add(path, body)
        yield server


def make_self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost and its key, made with openssl in ``directory``."""
    cert = directory / "cert.pem"
    key = directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def http_date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)
