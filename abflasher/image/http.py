"""Images over HTTP(S) through requests: streaming, retries with backoff, Range resume.

Kept apart from sources.py so that reading a local file or a pipe does not import requests (which costs ~17 MB of
memory and 70 ms of start-up).
"""

from __future__ import annotations

import contextlib
import http
import http.client
import logging
import re
import socket
import ssl
import threading
import urllib.parse
from typing import TYPE_CHECKING, TypedDict

import requests
import urllib3

from abflasher import errors
from abflasher.image.locations import check_http_url, redact_text, redact_url
from abflasher.image.watched_session import NEW_SOCKET_WATCHER, watched_session

if TYPE_CHECKING:
    from abflasher.config import Config

__all__ = ["HttpOptions", "HttpSource", "HttpStatusError", "http_options", "open_http", "redact_url"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# HTTP(S)

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Answers that say "try again later" rather than "this will never work".
_RETRYABLE_STATUSES = frozenset({408, 429})
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.ASCII)
_OBJECT_REPR_RE = re.compile(r"<[^<>]*object at 0x[0-9a-f]+>:?\s*")
#: How often an HttpSource given a cancel event looks at it.
_CANCEL_POLL_SECONDS = 0.2


class HttpStatusError(errors.Network):
    """The server answered with an HTTP status that means the download cannot go on."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class HttpOptions(TypedDict, total=False):
    """Keyword options of :class:`HttpSource`, accepted by :func:`open_source` too."""

    session: requests.Session | None
    connect_timeout: float
    read_timeout: float
    retries: int
    backoff: float
    max_backoff: float
    max_redirects: int
    label: str
    cancel: threading.Event | None


def http_options(config: Config, cancel: threading.Event | None = None) -> HttpOptions:
    """The HTTP options the configuration sets (timeouts, retries), for every download of the engine."""
    return HttpOptions(
        connect_timeout=config.http_connect_timeout,
        read_timeout=config.http_read_timeout,
        retries=config.http_retries,
        cancel=cancel,
    )


def open_http(config: Config, url: str, *, label: str = "image", cancel: threading.Event | None = None) -> HttpSource:
    """An HttpSource for ``url`` with the configuration's timeouts and retries."""
    options = http_options(config, cancel)
    options["label"] = label
    return HttpSource(url, **options)


class _TransientError(Exception):
    """A failure worth another attempt (connection refused or reset, timeout); internal to HttpSource."""


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and everything it wraps, outermost first (requests and urllib3 nest their causes several ways)."""
    chain: list[BaseException] = []
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop(0)
        if any(current is seen for seen in chain):
            continue
        chain.append(current)
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            pending.append(reason)
        pending.extend(arg for arg in current.args if isinstance(arg, BaseException))
        if current.__cause__ is not None:
            pending.append(current.__cause__)
        if current.__context__ is not None and not current.__suppress_context__:
            pending.append(current.__context__)
    return chain


def _describe_failure(exc: BaseException) -> str:
    """A short human reason for a transport failure, without object reprs or URLs."""
    chain = _exception_chain(exc)
    if any(
        isinstance(e, requests.exceptions.ConnectTimeout)
        # urllib3 makes every failed connect a ConnectTimeoutError, a refused one included.
        or (
            isinstance(e, urllib3.exceptions.ConnectTimeoutError)
            and not isinstance(e, urllib3.exceptions.NewConnectionError)
        )
        for e in chain
    ):
        return "timed out connecting"
    if any(isinstance(e, (socket.timeout, urllib3.exceptions.ReadTimeoutError, requests.ReadTimeout)) for e in chain):
        return "timed out waiting for data"
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS certificate verification failed: {e.verify_message or e.reason}"
    for e in chain:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
    for e in chain:
        if isinstance(e, http.client.IncompleteRead):
            return "connection closed in the middle of the body"
    for e in chain:
        if isinstance(e, http.client.HTTPException):
            # Its text quotes what the server sent (a bad status line, a header): not something to show.
            return "the server's answer is not valid HTTP"
    text = _OBJECT_REPR_RE.sub("", redact_text(str(chain[-1]))).strip() or type(chain[-1]).__name__
    return text


def _status_text(status: int) -> str:
    """``HTTP 503 Service Unavailable``: the standard reason phrase, never the one the server sent."""
    try:
        return f"HTTP {status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def _is_certificate_failure(exc: BaseException) -> bool:
    return any(isinstance(e, ssl.SSLCertVerificationError) for e in _exception_chain(exc)) or (
        "CERTIFICATE_VERIFY_FAILED" in str(exc)
    )


def _parse_retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None  # the HTTP-date form is rare on download servers; our own backoff is good enough then
    return seconds if seconds >= 0 else None


class HttpSource:
    """An image streamed over HTTP(S) that survives dropped connections.

    The first request is made by the constructor, so a wrong URL fails at once and ``size`` (the Content-Length)
    is known before the first read. A body cut short is resumed with a Range request guarded by If-Range, so bytes
    of two different versions of the image are never stitched together; a server that ignores Range is read again
    from the start with the already delivered part discarded. The consumer always sees one continuous stream.

    ``retries`` is the budget of extra attempts for the whole download: every failed connection, server error,
    timeout or resume spends one. Between attempts we wait ``backoff`` seconds, doubling each time, up to
    ``max_backoff``.
    """

    def __init__(
        self,
        url: str,
        *,
        session: requests.Session | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_redirects: int = 10,
        label: str = "image",
        cancel: threading.Event | None = None,
    ) -> None:
        check_http_url(url, label)
        if connect_timeout <= 0 or read_timeout <= 0:
            raise errors.InvalidArgument("HTTP timeouts must be positive numbers of seconds")
        if retries < 0:
            raise errors.InvalidArgument(f"retries must be 0 or more, not {retries}")
        self.description = redact_url(url)
        self.size: int | None = None
        self._label = label
        self._url = url  # where the body comes from: updated by redirects so that resumes skip them
        self._own_session = session is None
        self._session = session if session is not None else watched_session()
        self._timeout = (connect_timeout, read_timeout)
        self._retries = retries
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._max_redirects = max_redirects
        self._failures = 0
        #: Set by close() and abort(): every wait and read ends with Cancelled.
        self._closed = threading.Event()
        self._cancel = cancel
        self._resp_lock = threading.Lock()
        self._request_socket: socket.socket | None = None

        # What the first response said, to recognise the same image on later requests.
        self._seen_first_body = False
        self._etag: str | None = None
        self._last_modified: str | None = None

        self._resp: requests.Response | None = None
        self._resp_pos = 0  # stream offset of the next byte the current response will give
        self._resp_end: int | None = None  # stream offset where the current response's body must end
        self._total: int | None = None  # length of the whole image, once a response has said it
        self._offset = 0  # bytes handed to the consumer so far
        self._eof = False
        if cancel is not None:
            threading.Thread(target=self._abort_on_cancel, name="http-cancel", daemon=True).start()
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    # -- the consumer's side ------------------------------------------------------------------------------------

    def read(self, n: int) -> bytes:
        if n <= 0:
            return b""
        while True:
            if self._eof:
                return b""
            self._check_not_closed()
            if self._resp is None:
                self._connect()
            resp = self._resp
            assert resp is not None
            if self._resp_end is not None and self._resp_pos < self._resp_end:
                # Never ask past the declared end: a server that keeps the connection open after the body would
                # otherwise hold the read until the timeout, and the bytes already received would be lost with it.
                want = min(n, self._resp_end - self._resp_pos)
            elif self._resp_end is not None:
                want = 1  # only probing for bytes past the declared end
            else:
                want = n
            try:
                data = resp.raw.read(want, decode_content=False) or b""
            except (urllib3.exceptions.HTTPError, requests.RequestException, OSError, http.client.HTTPException) as exc:
                if self._closed.is_set():
                    raise errors.Cancelled(f"download of {self.description} was cancelled") from exc
                if self._resp_end is None or self._resp_pos != self._resp_end:
                    self._lost_connection(
                        f"connection to {self._host()} lost after {self._offset} bytes of {self._label} "
                        f"{self.description}: {_describe_failure(exc)}",
                        exc,
                    )
                    continue
                # The declared body is complete and only the look for more failed (a server that keeps the
                # connection open, or resets it instead of closing): no extra bytes came, which is what counts.
                data = b""
            if data:
                chunk_start = self._resp_pos
                self._resp_pos += len(data)
                if self._resp_end is not None and self._resp_pos > self._resp_end:
                    raise errors.Network(
                        f"server sent more than its Content-Length ({self._resp_end} bytes) for {self._label} "
                        f"{self.description}; refusing a body of unknown length"
                    )
                if self._resp_pos <= self._offset:
                    continue  # re-reading from the start after a restart: this part was delivered already
                if chunk_start < self._offset:
                    data = data[self._offset - chunk_start :]
                self._offset += len(data)
                return data
            # The end of this response's body: the end of the image only if nothing is missing.
            if self._total is not None and self._resp_pos < self._total:
                self._lost_connection(
                    f"body of {self._label} {self.description} ended after {self._resp_pos} of {self._total} bytes",
                    None,
                )
                continue
            if self._resp_pos < self._offset:
                self._lost_connection(
                    f"body of {self._label} {self.description} ended after {self._resp_pos} bytes, "
                    f"short of the {self._offset} bytes already received",
                    None,
                )
                continue
            # A body without a length ends when the connection does, as it does when abort() shuts it down.
            self._check_not_closed()
            self._finish()
            return b""

    def close(self) -> None:
        self._closed.set()
        self._drop_response()
        if self._own_session:
            self._session.close()

    def abort(self) -> None:
        """Make a read that is blocked now, or any later one, raise Cancelled; safe from any thread. The body's
        connection is shut down, which wakes a read waiting on it at once."""
        self._closed.set()
        with self._resp_lock:
            resp = self._resp
            # A request still waiting for its answer (a connection made by a session of our own, see below).
            sockets = [self._request_socket]
        if resp is not None:
            sockets.append(getattr(getattr(resp.raw, "_connection", None), "sock", None))
            fp = getattr(getattr(resp.raw, "_fp", None), "fp", None)
            sockets.append(getattr(getattr(fp, "raw", None), "_sock", None))
        for sock in sockets:
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _watch_socket(self, sock: socket.socket) -> None:
        """Called with each connection this source's requests open, before anything is sent on it."""
        with self._resp_lock:
            self._request_socket = sock
        if self._closed.is_set():
            self.abort()

    def _abort_on_cancel(self) -> None:
        assert self._cancel is not None
        while not self._closed.is_set():
            if self._cancel.wait(_CANCEL_POLL_SECONDS):
                self.abort()
                return

    def __enter__(self) -> HttpSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- requests -------------------------------------------------------------------------------------------------

    def _connect(self) -> None:
        """Open the body at ``self._offset``, spending the retry budget on transient failures."""
        while True:
            self._check_not_closed()
            headers = {
                # The raw bytes are the image; a transparent decompression would hand the pipeline something else.
                "Accept-Encoding": "identity",
                # The connection ends with the body, so bytes beyond Content-Length can be seen (see read()).
                "Connection": "close",
            }
            if self._offset > 0:
                headers["Range"] = f"bytes={self._offset}-"
                validator = self._if_range_validator()
                if validator is not None:
                    headers["If-Range"] = validator
            try:
                resp = self._get_following_redirects(headers)
            except _TransientError as exc:
                self._spend_retry(str(exc), exc.__cause__)
                continue
            status = resp.status_code
            if status >= 500 or status in _RETRYABLE_STATUSES:
                retry_after = _parse_retry_after(resp.headers.get("Retry-After"))
                resp.close()
                self._spend_retry(
                    f"server error for {self._label} {self.description}: {_status_text(status)}",
                    None,
                    retry_after,
                )
                continue
            try:
                self._accept_response(resp)
            except BaseException:
                resp.close()
                raise
            return

    def _get_following_redirects(self, headers: dict[str, str]) -> requests.Response:
        url = self._url
        for _hop in range(self._max_redirects + 1):
            watching = NEW_SOCKET_WATCHER.set(self._watch_socket)
            try:
                resp = self._session.get(
                    url,
                    headers=headers,
                    stream=True,
                    allow_redirects=False,
                    timeout=self._timeout,
                    hooks={"response": _close_redirect_response},
                )
            except requests.exceptions.SSLError as exc:
                if _is_certificate_failure(exc):
                    raise errors.Network(
                        f"cannot download {self._label} {redact_url(url)}: {_describe_failure(exc)}"
                    ) from exc
                raise _TransientError(f"TLS connection to {self._host(url)} failed: {_describe_failure(exc)}") from exc
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise _TransientError(f"connection to {self._host(url)} failed: {_describe_failure(exc)}") from exc
            except requests.RequestException as exc:
                raise errors.Network(
                    f"cannot download {self._label} {redact_url(url)}: {_describe_failure(exc)}"
                ) from exc
            finally:
                NEW_SOCKET_WATCHER.reset(watching)
            if resp.status_code not in _REDIRECT_STATUSES:
                self._url = url
                return resp
            location = resp.headers.get("Location")
            resp.close()
            if not location:
                raise errors.Network(
                    f"server redirected {self._label} {redact_url(url)} (HTTP {resp.status_code}) without a Location"
                )
            target = urllib.parse.urljoin(url, location.strip())
            target_scheme = urllib.parse.urlsplit(target).scheme.lower()
            if target_scheme not in ("http", "https"):
                raise errors.Network(
                    f"refusing redirect of {self._label} {redact_url(url)} to unsupported scheme {target_scheme}://"
                )
            if urllib.parse.urlsplit(url).scheme.lower() == "https" and target_scheme == "http":
                raise errors.Network(
                    f"refusing redirect from https to plain http for {self._label} {redact_url(url)} "
                    f"(to {redact_url(target)}): it would drop the encryption"
                )
            url = target
        raise errors.Network(
            f"too many redirects (more than {self._max_redirects}) for {self._label} {self.description}"
        )

    def _accept_response(self, resp: requests.Response) -> None:
        """Check a non-retryable answer and make it the current body, or raise."""
        status = resp.status_code
        where = f"{self._label} {redact_url(self._url)}"
        if status == 404:
            raise HttpStatusError(f"{where} not found (HTTP 404)", 404)
        if status == 416 and self._offset > 0:
            raise errors.Network(
                f"server refused to resume {where} at byte {self._offset} (HTTP 416): "
                "image changed on the server during download"
            )
        if status not in (200, 206) or (status == 206 and self._offset == 0):
            raise HttpStatusError(f"server answered {_status_text(status)} for {where}", status)
        length = _content_length(resp)
        etag = resp.headers.get("ETag")
        last_modified = resp.headers.get("Last-Modified")
        changed = f"{self._label} changed on the server during download of {where}; try again"
        if status == 200:
            if not self._seen_first_body:
                self._seen_first_body = True
                self.size = self._total = length
                self._etag = etag
                self._last_modified = last_modified
            elif self._changed(length, etag, last_modified):
                raise errors.Network(changed)
            self._set_body(resp, start=0, end=length if length is not None else self._total)
            return
        # 206: the server says which part it sends; it must be exactly the rest of the same image.
        content_range = resp.headers.get("Content-Range", "")
        match = _CONTENT_RANGE_RE.fullmatch(content_range.strip())
        if match is None:
            raise errors.Network(f"server answered a resume of {where} with an unusable Content-Range")
        start, last, total_text = int(match.group(1)), int(match.group(2)), match.group(3)
        total = None if total_text == "*" else int(total_text)
        if start != self._offset:
            raise errors.Network(
                f"server resumed {where} at byte {start}, not at byte {self._offset} as asked"
            )
        if last < start or (total is not None and last >= total):
            raise errors.Network(f"server answered a resume of {where} with an invalid Content-Range")
        if (total is not None and self._total is not None and total != self._total) or self._changed(
            None, etag, last_modified
        ):
            raise errors.Network(changed)
        if length is not None and length != last - start + 1:
            raise errors.Network(
                f"server answered a resume of {where} with Content-Length {length} "
                f"for a range of {last - start + 1} bytes"
            )
        if self._total is None:
            self._total = total
        self._set_body(resp, start=start, end=last + 1)

    def _set_body(self, resp: requests.Response, *, start: int, end: int | None) -> None:
        raw_fp = getattr(resp.raw, "_fp", None)
        if isinstance(raw_fp, http.client.HTTPResponse) and not raw_fp.chunked:
            # http.client stops reading silently at Content-Length, which hides a longer body. Counting the bytes
            # ourselves and letting it read on to the end of the connection makes the extra bytes visible.
            raw_fp.length = None
        with self._resp_lock:
            self._resp = resp
        self._resp_pos = start
        self._resp_end = end
        if self._closed.is_set():
            self.abort()  # an abort() that came while this response was being opened

    def _changed(self, length: int | None, etag: str | None, last_modified: str | None) -> bool:
        if length is not None and self._total is not None and length != self._total:
            return True
        if etag is not None and self._etag is not None and etag != self._etag:
            return True
        return last_modified is not None and self._last_modified is not None and last_modified != self._last_modified

    def _if_range_validator(self) -> str | None:
        # RFC 9110 §13.1.5: only a strong ETag may be used in If-Range.
        if self._etag is not None and not self._etag.startswith("W/"):
            return self._etag
        return self._last_modified

    # -- failures -------------------------------------------------------------------------------------------------

    def _lost_connection(self, message: str, cause: BaseException | None) -> None:
        self._drop_response()
        self._spend_retry(message, cause)

    def _spend_retry(self, message: str, cause: BaseException | None, delay: float | None = None) -> None:
        """Wait before the next attempt, or raise Network with ``message`` when the budget is spent."""
        self._failures += 1
        if self._failures > self._retries:
            suffix = f" (gave up after {self._retries} retries)" if self._retries else ""
            raise errors.Network(message + suffix) from cause
        wait = min(self._backoff * 2 ** (self._failures - 1), self._max_backoff)
        if delay is not None:
            wait = min(max(wait, delay), self._max_backoff)
        log.info("%s; retrying in %.1f s (%d of %d)", message, wait, self._failures, self._retries)
        if self._closed.wait(wait):
            raise errors.Cancelled(f"download of {self.description} was cancelled")

    def _finish(self) -> None:
        self._eof = True
        self._drop_response()

    def _drop_response(self) -> None:
        with self._resp_lock:
            resp, self._resp = self._resp, None
        if resp is not None:
            resp.close()

    def _check_not_closed(self) -> None:
        if self._closed.is_set():
            raise errors.Cancelled(f"download of {self.description} was cancelled")

    def _host(self, url: str | None = None) -> str:
        parts = urllib.parse.urlsplit(url or self._url)
        return parts.netloc.rpartition("@")[2]


def _close_redirect_response(resp: requests.Response, *args: object, **kwargs: object) -> requests.Response:
    """Close a redirect's connection before requests reads its body and puts the connection back in the pool.

    Even with allow_redirects=False, requests consumes a redirect's body and pools its connection. A server that
    closes after answering our ``Connection: close`` without saying so would leave a dead connection there, and the
    next request could be sent on it and fail.
    """
    if resp.is_redirect:
        resp.close()
    return resp


def _content_length(resp: requests.Response) -> int | None:
    value = resp.headers.get("Content-Length")
    if value is None or "chunked" in resp.headers.get("Transfer-Encoding", "").lower():
        return None
    try:
        length = int(value.strip())
    except ValueError as exc:
        raise errors.Network("server sent a malformed Content-Length") from exc
    if length < 0:
        raise errors.Network("server sent a negative Content-Length")
    return length


