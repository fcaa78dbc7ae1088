"""Sources that stall or crawl: a cancel ends any read within moments, an idle upload gives up on its own, and what a
server sends never reaches an error message."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from abflasher import errors
from abflasher.image.checksums import fetch_checksum
from abflasher.image.destinations import FileObjectWriter
from abflasher.image.http import HttpSource
from abflasher.image.locations import redact_text, redact_url
from abflasher.image.pipeline import stream_image
from abflasher.image.sources import FdSource
from tests.support.httpserver import FaultServer

pytestmark = pytest.mark.timeout(60)

#: How long a test waits for a cancelled read to end: far more than it takes, far less than the stall.
ENDS_WITHIN = 20.0
FAST: dict[str, Any] = {"connect_timeout": 2.0, "read_timeout": 30.0, "backoff": 0.01, "retries": 3}
BODY = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as running:
        yield running


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as plain:
        plain.trust_env = False
        yield plain


@pytest.fixture
def silent_pipe() -> Iterator[tuple[int, int]]:
    """A pipe whose writer stays open and sends nothing, as an uploader that stalled."""
    read_end, write_end = os.pipe()
    yield read_end, write_end
    for fd in (read_end, write_end):
        with contextlib.suppress(OSError):
            os.close(fd)


class Outcome:
    """What a call made in a thread of its own raised or returned."""

    def __init__(self, call: Callable[[], object]) -> None:
        self.error: BaseException | None = None
        self.value: object = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], object]) -> None:
        try:
            self.value = call()
        except BaseException as exc:
            self.error = exc

    def wait(self) -> Outcome:
        self._thread.join(ENDS_WITHIN)
        assert not self._thread.is_alive(), "the read is still blocked"
        return self


def read_all(source: HttpSource | FdSource, chunk: int = 256 << 10) -> bytes:
    parts = []
    while data := source.read(chunk):
        parts.append(data)
    return b"".join(parts)


# -- uploads: pipes --------------------------------------------------------------------------------------------------


def test_cancel_ends_a_read_of_a_silent_pipe(silent_pipe: tuple[int, int]) -> None:
    cancel = threading.Event()
    source = FdSource(silent_pipe[0], "uploaded image", close_fd=False, cancel=cancel)
    reading = Outcome(lambda: source.read(4096))
    cancel.set()
    assert isinstance(reading.wait().error, errors.Cancelled)


def test_abort_ends_a_read_of_a_silent_pipe_from_another_thread(silent_pipe: tuple[int, int]) -> None:
    source = FdSource(silent_pipe[0], "uploaded image", close_fd=False)
    reading = Outcome(lambda: source.read(4096))
    source.abort()
    assert isinstance(reading.wait().error, errors.Cancelled)
    with pytest.raises(errors.Cancelled):
        source.read(1)


def test_an_upload_silent_for_its_idle_timeout_is_given_up(silent_pipe: tuple[int, int]) -> None:
    source = FdSource(silent_pipe[0], "uploaded image", close_fd=False, idle_timeout=0.3)
    os.write(silent_pipe[1], b"some bytes")
    assert source.read(100) == b"some bytes"
    outcome = Outcome(lambda: source.read(100)).wait()
    assert isinstance(outcome.error, errors.Cancelled)
    assert "no data from uploaded image for 0.3 s" in str(outcome.error)


def test_a_pipe_that_sends_and_closes_reads_to_the_end(silent_pipe: tuple[int, int]) -> None:
    source = FdSource(silent_pipe[0], "uploaded image", close_fd=False, cancel=threading.Event(), idle_timeout=5)
    os.write(silent_pipe[1], b"all of it")
    os.close(silent_pipe[1])
    assert read_all(source) == b"all of it"


def test_cancel_ends_the_first_read_of_an_install_from_a_silent_pipe(silent_pipe: tuple[int, int]) -> None:
    """The pipeline's first read (the format detection) waits on the source in the caller's thread."""
    cancel = threading.Event()
    source = FdSource(silent_pipe[0], "uploaded image", close_fd=False, cancel=cancel)
    target = io.BytesIO()
    installing = Outcome(lambda: stream_image(source, FileObjectWriter(target), cancel=cancel))
    cancel.set()
    assert isinstance(installing.wait().error, errors.Cancelled)
    assert target.getvalue() == b""


# -- downloads -------------------------------------------------------------------------------------------------------


def test_cancel_ends_a_download_from_a_crawling_server(server: FaultServer, session: requests.Session) -> None:
    """About 4 KiB/s: each 256 KiB read would take a minute, and no read timeout ever fires."""
    server.add("/crawl.img", BODY, piece_size=4096, piece_delay=1.0)
    cancel = threading.Event()
    source = HttpSource(server.url("/crawl.img"), session=session, cancel=cancel, **FAST)
    try:
        reading = Outcome(lambda: read_all(source))
        cancel.set()
        assert isinstance(reading.wait().error, errors.Cancelled)
    finally:
        source.close()


def test_cancel_ends_a_download_stalled_mid_body(server: FaultServer, session: requests.Session) -> None:
    server.add("/stall.img", BODY, stall_after=100_000, stall_seconds=120)
    cancel = threading.Event()
    source = HttpSource(server.url("/stall.img"), session=session, cancel=cancel, **FAST)
    try:
        assert len(source.read(50_000)) == 50_000
        reading = Outcome(lambda: read_all(source))
        cancel.set()
        assert isinstance(reading.wait().error, errors.Cancelled)
    finally:
        source.close()


def test_cancel_ends_a_request_whose_answer_never_comes() -> None:
    """A server that takes the connection and never answers: the request waits inside requests, where only the
    socket the source's own session opened can be reached."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/img"
        cancel = threading.Event()
        opening = Outcome(lambda: HttpSource(url, cancel=cancel, **FAST))
        silent.settimeout(ENDS_WITHIN)
        connection, _ = silent.accept()
        with connection:
            assert connection.recv(4096).startswith(b"GET /img ")  # the request is out; its answer never comes
            cancel.set()
            assert isinstance(opening.wait().error, errors.Cancelled)


def test_abort_ends_a_download_without_length_instead_of_ending_it_cleanly(
    server: FaultServer, session: requests.Session
) -> None:
    """A body without Content-Length ends when the connection does: an abort must not look like that end."""
    server.add("/nolength.img", BODY, no_length=True, stall_after=100_000, stall_seconds=120)
    source = HttpSource(server.url("/nolength.img"), session=session, **FAST)
    try:
        source.read(10)
        reading = Outcome(lambda: read_all(source))
        source.abort()
        assert isinstance(reading.wait().error, errors.Cancelled)
    finally:
        source.close()


def test_an_install_from_a_crawling_server_is_cancelled(server: FaultServer, session: requests.Session) -> None:
    server.add("/crawl.img.gz", gzip.compress(os.urandom(1 << 20)), piece_size=4096, piece_delay=1.0)
    cancel = threading.Event()
    source = HttpSource(server.url("/crawl.img.gz"), session=session, cancel=cancel, **FAST)
    try:
        installing = Outcome(lambda: stream_image(source, FileObjectWriter(io.BytesIO()), cancel=cancel))
        cancel.set()
        assert isinstance(installing.wait().error, errors.Cancelled)
    finally:
        source.close()


# -- what reaches error messages -------------------------------------------------------------------------------------


def test_a_servers_reason_phrase_is_not_repeated(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", b"", status=403, reason="Forbidden SECRET-FROM-SERVER")
    with pytest.raises(errors.Network) as caught:
        HttpSource(server.url("/img"), session=session, **FAST)
    assert "HTTP 403 Forbidden" in str(caught.value)
    assert "SECRET" not in str(caught.value)


def test_a_checksum_files_content_is_not_repeated(server: FaultServer, session: requests.Session) -> None:
    server.add("/bad.sha256", b"<html>SECRET-PAGE root:x:0:0</html>\n")
    server.add("/other.sha256", b"%s  SECRET-NAME.img\n%s  other.img\n" % (b"a" * 64, b"b" * 64))
    for path in ("/bad.sha256", "/other.sha256"):
        with pytest.raises(errors.InvalidArgument) as caught:
            fetch_checksum(server.url(path), "image.img", session=session, **FAST)
        assert "SECRET" not in str(caught.value)
        assert "checksum file" in str(caught.value)


def test_a_malformed_url_is_refused_without_quoting_it() -> None:
    for url in ("http://user:PASS/x.img", "http://user:PASS@host:PASS2/x.img", "http://[::1/PASS"):
        with pytest.raises(errors.InvalidArgument, match="malformed") as caught:
            HttpSource(url)
        assert "PASS" not in str(caught.value)


def test_urls_lose_credentials_and_query_wherever_they_are_shown() -> None:
    url = "http://user:PASS@host:8080/x.img.gz?token=TOK#frag"
    assert redact_url(url) == "http://host:8080/x.img.gz"
    text = f"HTTPConnectionPool(host='host', port=8080): Max retries exceeded with url: {url} (Caused by X)"
    assert "PASS" not in redact_text(text)
    assert "TOK" not in redact_text(text)
    assert "/x.img.gz" in redact_text(text)
