"""HttpSource, open_source and the local sources, against the fault-injecting test server."""

from __future__ import annotations

import gzip
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from abflasher import errors
from abflasher.image.http import HttpSource, HttpStatusError
from abflasher.image.sources import FdSource, FileSource, open_source
from tests.support.httpserver import FaultServer, make_self_signed_cert, serve_files

pytestmark = pytest.mark.timeout(30)

IMAGE = hashlib.sha256(b"seed").digest() * 9000 + os.urandom(12_345)  # ~300 KB, not a multiple of anything
IMAGE_SHA = hashlib.sha256(IMAGE).hexdigest()
ETAG = '"img-1"'
FAST: dict[str, Any] = {"connect_timeout": 2.0, "read_timeout": 1.0, "backoff": 0.01, "retries": 3}


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as running:
        yield running
        assert running.errors == []


@pytest.fixture
def session() -> Iterator[requests.Session]:
    # Proxy settings of the environment must not send test traffic anywhere but 127.0.0.1.
    with requests.Session() as plain:
        plain.trust_env = False
        yield plain


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_self_signed_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_server(certificate: tuple[Path, Path]) -> Iterator[FaultServer]:
    with FaultServer(tls=certificate) as running:
        yield running


def download(source: HttpSource | FdSource, chunk: int = 64 * 1024) -> bytes:
    parts = []
    try:
        while data := source.read(chunk):
            parts.append(data)
    finally:
        source.close()
    return b"".join(parts)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_http(server: FaultServer, path: str, session: requests.Session, **options: Any) -> HttpSource:
    return HttpSource(server.url(path), session=session, **{**FAST, **options})


# -- plain downloads ------------------------------------------------------------------------------------------------


def test_download_is_byte_identical_and_asks_for_raw_bytes(server: FaultServer, session: requests.Session) -> None:
    server.add("/img.gz", IMAGE, etag=ETAG)
    source = open_http(server, "/img.gz", session)
    assert source.size == len(IMAGE)
    assert source.description == server.url("/img.gz")
    assert sha(download(source)) == IMAGE_SHA
    (record,) = server.requests_for("/img.gz")
    assert record.range is None
    assert record.headers["Accept-Encoding"] == "identity"
    assert record.headers["Connection"] == "close"


@pytest.mark.parametrize("chunk", [1, 1000, 65536, 10 * 1024 * 1024])
def test_any_read_size_gives_the_same_bytes(server: FaultServer, session: requests.Session, chunk: int) -> None:
    server.add("/img", IMAGE[:70_001])
    assert download(open_http(server, "/img", session), chunk) == IMAGE[:70_001]


def test_reads_after_the_end_stay_empty(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", b"abc")
    source = open_http(server, "/img", session)
    assert source.read(10) == b"abc"
    assert source.read(10) == b""
    assert source.read(10) == b""
    assert source.read(0) == b""
    source.close()


def test_empty_body(server: FaultServer, session: requests.Session) -> None:
    server.add("/empty", b"")
    source = open_http(server, "/empty", session)
    assert source.size == 0
    assert download(source) == b""


def test_body_without_content_length_is_read_to_eof(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", IMAGE, no_length=True)
    source = open_http(server, "/img", session)
    assert source.size is None
    assert sha(download(source)) == IMAGE_SHA


def test_chunked_body(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", IMAGE, chunked=True)
    source = open_http(server, "/img", session)
    assert source.size is None
    assert sha(download(source)) == IMAGE_SHA


def test_content_encoding_is_never_decoded(server: FaultServer, session: requests.Session) -> None:
    compressed = gzip.compress(IMAGE)
    server.add("/img.gz", compressed, extra_headers={"Content-Encoding": "gzip"})
    assert download(open_http(server, "/img.gz", session)) == compressed


def test_default_session_is_created_and_closed(server: FaultServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    server.add("/img", IMAGE)
    source = HttpSource(server.url("/img"), **FAST)
    assert sha(download(source)) == IMAGE_SHA


def test_credentials_stay_out_of_description_and_errors(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", IMAGE)
    url = server.url("/img").replace("://", "://alice:s3cret@") + "?token=abc"
    source = HttpSource(url, session=session, **FAST)
    assert "s3cret" not in source.description
    assert "alice" not in source.description
    assert "token" not in source.description
    assert sha(download(source)) == IMAGE_SHA
    assert server.requests_for("/img")[0].headers["Authorization"].startswith("Basic ")
    with pytest.raises(errors.Network) as caught:
        HttpSource(url.replace("/img", "/missing"), session=session, **FAST)
    assert "s3cret" not in str(caught.value)


# -- URL checks -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.org/img.gz", "gopher://x/y", "FILE:///x"])
def test_other_schemes_are_refused(url: str) -> None:
    scheme = url.split("://", maxsplit=1)[0].lower()
    with pytest.raises(errors.InvalidArgument, match=rf"{scheme}://"):
        HttpSource(url)


@pytest.mark.parametrize("url", ["http://", "https:///path", "http://host:notaport/x", "example.org/img"])
def test_malformed_urls_are_refused(url: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        HttpSource(url)


def test_bad_options_are_refused() -> None:
    with pytest.raises(errors.InvalidArgument, match="timeouts"):
        HttpSource("http://127.0.0.1:1/x", read_timeout=0)
    with pytest.raises(errors.InvalidArgument, match="retries"):
        HttpSource("http://127.0.0.1:1/x", retries=-1)


# -- HTTP errors and retries ----------------------------------------------------------------------------------------


def test_404_is_not_found_and_not_retried(server: FaultServer, session: requests.Session) -> None:
    with pytest.raises(HttpStatusError, match=r"not found \(HTTP 404\)") as caught:
        open_http(server, "/nothing-here", session)
    assert isinstance(caught.value, errors.Network)
    assert caught.value.status == 404
    assert server.count("/nothing-here") == 1


@pytest.mark.parametrize("status", [401, 403, 410])
def test_other_client_errors_name_the_status(server: FaultServer, session: requests.Session, status: int) -> None:
    server.add("/img", IMAGE, status=status)
    with pytest.raises(errors.Network, match=rf"HTTP {status}"):
        open_http(server, "/img", session)
    assert server.count("/img") == 1


def test_server_errors_are_retried_then_succeed(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", IMAGE, fail_first=2, fail_status=500)
    source = open_http(server, "/img", session, retries=2)
    assert sha(download(source)) == IMAGE_SHA
    assert server.count("/img") == 3


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_give_up_after_the_budget(server: FaultServer, session: requests.Session, status: int) -> None:
    server.add("/img", IMAGE, status=status)
    with pytest.raises(errors.Network, match=rf"HTTP {status}.*gave up after 3 retries"):
        open_http(server, "/img", session, retries=3)
    assert server.count("/img") == 4


def test_retry_after_is_honoured_within_the_cap(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", IMAGE, fail_first=1, fail_status=503, retry_after="0.3")
    started = time.monotonic()
    source = open_http(server, "/img", session)
    assert time.monotonic() - started >= 0.3
    assert sha(download(source)) == IMAGE_SHA


def test_retry_after_is_capped(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", IMAGE, fail_first=1, fail_status=503, retry_after="3600")
    started = time.monotonic()
    source = open_http(server, "/img", session, max_backoff=0.2)
    assert time.monotonic() - started < 5
    assert sha(download(source)) == IMAGE_SHA


def test_no_retries_means_one_attempt(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", IMAGE, status=500)
    with pytest.raises(errors.Network, match="HTTP 500") as caught:
        open_http(server, "/img", session, retries=0)
    assert "gave up" not in str(caught.value)
    assert server.count("/img") == 1


def test_connection_refused_is_retried_then_fails(session: requests.Session) -> None:
    closed = FaultServer().start()
    url = closed.url("/img")
    closed.stop()
    with pytest.raises(errors.Network, match=r"connection to 127\.0\.0\.1:\d+ failed: .*refused.*gave up after 2"):
        HttpSource(url, session=session, **{**FAST, "retries": 2})


# -- resume -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["close", "reset"])
def test_dropped_connection_resumes_with_range(
    server: FaultServer, session: requests.Session, mode: str
) -> None:
    server.add("/img", IMAGE, etag=ETAG, drop_after=100_000, drop_requests=2, drop_mode=mode)
    assert sha(download(open_http(server, "/img", session), 8192)) == IMAGE_SHA
    records = server.requests_for("/img")
    assert len(records) == 3
    assert records[0].range is None
    offsets = [int(record.range.removeprefix("bytes=").removesuffix("-")) for record in records[1:] if record.range]
    assert len(offsets) == 2
    assert all(record.if_range == ETAG for record in records[1:])
    if mode == "close":
        # Each response drops after 100000 bytes of its own body, and everything before it was delivered.
        assert offsets == [100_000, 200_000]
    else:
        # A reset can swallow bytes the client had not read yet: the resume starts where delivery stopped.
        assert 0 < offsets[0] <= 100_000 < offsets[1] <= 200_000


@pytest.mark.parametrize("drop_after", [0, 1, 65_535, 65_536, len(IMAGE) - 1, len(IMAGE)])
def test_drops_at_awkward_offsets(server: FaultServer, session: requests.Session, drop_after: int) -> None:
    server.add("/img", IMAGE, etag=ETAG, drop_after=drop_after, drop_requests=1)
    assert sha(download(open_http(server, "/img", session), 4096)) == IMAGE_SHA


def test_reset_right_after_the_whole_body_is_not_an_error(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", IMAGE, etag=ETAG, drop_after=len(IMAGE), drop_mode="reset")
    assert sha(download(open_http(server, "/img", session))) == IMAGE_SHA


def test_restarted_body_shorter_than_what_was_delivered(server: FaultServer, session: requests.Session) -> None:
    # No length, no validators, no Range: the only sign of a replaced image is a new body that ends too early.
    server.add(
        "/img", IMAGE, chunked=True, ignore_range=True, drop_after=50_000, drop_requests=1,
        body_after_first=IMAGE[:1000],
    )
    with pytest.raises(errors.Network, match="ended after 1000 bytes, short of the 50000 bytes already received"):
        download(open_http(server, "/img", session, retries=2), 10_000)


def test_resume_falls_back_to_last_modified(server: FaultServer, session: requests.Session) -> None:
    stamp = "Tue, 01 Oct 2024 10:00:00 GMT"
    server.add("/img", IMAGE, last_modified=stamp, drop_after=50_000, drop_requests=1)
    assert sha(download(open_http(server, "/img", session))) == IMAGE_SHA
    resume = server.requests_for("/img")[1]
    assert (resume.range, resume.if_range) == ("bytes=50000-", stamp)


def test_weak_etag_is_not_used_for_if_range(server: FaultServer, session: requests.Session) -> None:
    stamp = "Tue, 01 Oct 2024 10:00:00 GMT"
    server.add("/img", IMAGE, etag='W/"weak"', last_modified=stamp, drop_after=50_000, drop_requests=1)
    assert sha(download(open_http(server, "/img", session))) == IMAGE_SHA
    assert server.requests_for("/img")[1].if_range == stamp


def test_resume_without_validators_still_uses_range(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", IMAGE, drop_after=50_000, drop_requests=1)
    assert sha(download(open_http(server, "/img", session))) == IMAGE_SHA
    resume = server.requests_for("/img")[1]
    assert (resume.range, resume.if_range) == ("bytes=50000-", None)


def test_resume_of_a_body_without_length(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", IMAGE, chunked=True, etag=ETAG, drop_after=70_000, drop_requests=1)
    assert sha(download(open_http(server, "/img", session))) == IMAGE_SHA
    assert server.requests_for("/img")[1].range is not None


def test_server_ignoring_range_restarts_cleanly(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", IMAGE, etag=ETAG, ignore_range=True, drop_after=123_457, drop_requests=2)
    # Small reads so the part already delivered is skipped across many reads of the new body.
    assert sha(download(open_http(server, "/img", session), 1000)) == IMAGE_SHA
    records = server.requests_for("/img")
    # The second answer (a 200 again) drops at the same place, before anything new was delivered.
    assert [record.range for record in records] == [None, "bytes=123457-", "bytes=123457-"]


def test_restart_detects_a_replaced_image(server: FaultServer, session: requests.Session) -> None:
    server.add(
        "/img", IMAGE, ignore_range=True, drop_after=50_000, drop_requests=1, body_after_first=IMAGE + b"new"
    )
    source = open_http(server, "/img", session)
    with pytest.raises(errors.Network, match="image changed on the server during download"):
        download(source)


def test_changed_etag_is_detected(server: FaultServer, session: requests.Session) -> None:
    # The server honours If-Range: the tag no longer matches, so it sends the whole (new) image with a new tag.
    server.add("/img", IMAGE, etag_changes=True, drop_after=50_000, drop_requests=1)
    with pytest.raises(errors.Network, match="image changed on the server during download"):
        download(open_http(server, "/img", session))
    assert server.requests_for("/img")[1].if_range == '"v1"'


def test_resume_rejected_as_unsatisfiable(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", IMAGE, drop_after=50_000, drop_requests=1, body_after_first=IMAGE[:10_000])
    with pytest.raises(errors.Network, match=r"HTTP 416.*changed on the server"):
        download(open_http(server, "/img", session))


def test_resume_at_the_wrong_offset_is_refused(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", IMAGE, etag=ETAG, drop_after=50_000, drop_requests=1, range_start_error=-10)
    with pytest.raises(errors.Network, match=r"resumed .* at byte 49990, not at byte 50000"):
        download(open_http(server, "/img", session))


def test_drops_that_never_stop_exhaust_the_budget(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", IMAGE, etag=ETAG, drop_after=10_000)
    with pytest.raises(errors.Network, match=r"ended after 40000 of \d+ bytes.*gave up after 3 retries"):
        download(open_http(server, "/img", session, retries=3))
    assert [record.range for record in server.requests_for("/img")] == [
        None, "bytes=10000-", "bytes=20000-", "bytes=30000-"
    ]


def test_failures_before_and_during_the_body_share_the_budget(
    server: FaultServer, session: requests.Session
) -> None:
    server.add("/img", IMAGE, fail_first=2, drop_after=10_000, drop_requests=4)
    with pytest.raises(errors.Network, match="gave up after 3 retries"):
        download(open_http(server, "/img", session, retries=3))
    assert server.count("/img") == 4


def test_cancel_during_backoff(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", IMAGE, drop_after=10_000)
    source = open_http(server, "/img", session, backoff=20.0, max_backoff=20.0)
    outcome: list[BaseException] = []

    def consume() -> None:
        try:
            while source.read(4096):
                pass
        except BaseException as exc:
            outcome.append(exc)

    reader = threading.Thread(target=consume)
    reader.start()
    deadline = time.monotonic() + 10
    while server.count("/img") < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    source.close()
    reader.join(10)
    assert not reader.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], errors.Cancelled)


# -- lying Content-Length -------------------------------------------------------------------------------------------


def test_body_shorter_than_content_length_leads_to_a_resume(server: FaultServer, session: requests.Session) -> None:
    # The first answer claims 1000 bytes more than it sends, then the connection ends: a drop, not the end.
    server.add("/img", IMAGE, etag=ETAG, length_delta=1000, length_delta_requests=1, no_length=False)
    source = open_http(server, "/img", session)
    assert source.size == len(IMAGE) + 1000
    with pytest.raises(errors.Network, match="changed on the server"):
        # The resume asks for bytes past the real end; the server says 416 with the real size.
        download(source)
    assert server.requests_for("/img")[1].range == f"bytes={len(IMAGE)}-"


def test_body_always_shorter_than_content_length(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", IMAGE, length_delta=1000, ignore_range=True)
    with pytest.raises(errors.Network, match=rf"ended after {len(IMAGE)} of {len(IMAGE) + 1000} bytes"):
        download(open_http(server, "/img", session, retries=2))
    assert server.count("/img") == 3


def test_body_longer_than_content_length_is_refused(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", IMAGE, length_delta=-1000)
    with pytest.raises(errors.Network, match=rf"more than its Content-Length \({len(IMAGE) - 1000} bytes\)"):
        download(open_http(server, "/img", session))
    assert server.count("/img") == 1


def test_body_longer_by_one_byte_is_refused(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", IMAGE, length_delta=-1)
    with pytest.raises(errors.Network, match="more than its Content-Length"):
        download(open_http(server, "/img", session), 1_000_000)


def test_body_with_undeclared_trailing_bytes_is_refused(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", IMAGE, trailing_bytes=b"junk")
    with pytest.raises(errors.Network, match="more than its Content-Length"):
        download(open_http(server, "/img", session))


def test_resumed_body_longer_than_its_range_is_refused(server: FaultServer, session: requests.Session) -> None:
    # The first answer is honest but drops; the 206 then runs 4 bytes past its own Content-Range.
    server.add("/img", IMAGE, etag=ETAG, drop_after=50_000, drop_requests=1, trailing_bytes=b"junk", trailing_from=2)
    with pytest.raises(errors.Network, match="more than its Content-Length"):
        download(open_http(server, "/img", session))
    assert server.requests_for("/img")[1].range == "bytes=50000-"


def test_resume_with_a_different_total_is_refused(server: FaultServer, session: requests.Session) -> None:
    # Same (stale) ETag, but the 206 reports a different total size: not the image we started.
    server.add("/img", IMAGE, etag=ETAG, drop_after=50_000, drop_requests=1, body_after_first=IMAGE + b"more")
    with pytest.raises(errors.Network, match="image changed on the server during download"):
        download(open_http(server, "/img", session))


def test_server_keeping_the_connection_open_after_the_body(
    server: FaultServer, session: requests.Session
) -> None:
    server.add("/img", IMAGE, linger_after_body=10.0)
    started = time.monotonic()
    assert sha(download(open_http(server, "/img", session, read_timeout=0.5))) == IMAGE_SHA
    assert time.monotonic() - started < 5
    assert server.count("/img") == 1


# -- timeouts -------------------------------------------------------------------------------------------------------


def test_stalled_body_times_out(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", IMAGE, stall_after=20_000)
    started = time.monotonic()
    with pytest.raises(errors.Network, match=r"timed out waiting for data.*gave up after 1 retries"):
        download(open_http(server, "/img", session, read_timeout=0.5, retries=1))
    assert time.monotonic() - started < 10


def test_stall_once_then_resume(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", IMAGE, etag=ETAG, stall_after=20_000, stall_requests=1)
    assert sha(download(open_http(server, "/img", session, read_timeout=0.5), 4096)) == IMAGE_SHA
    resume = server.requests_for("/img")[1]
    # What was delivered before the stall is kept; a read cut by the timeout is fetched again.
    assert resume.range is not None
    assert 0 < int(resume.range.removeprefix("bytes=").removesuffix("-")) <= 20_000
    assert resume.if_range == ETAG


def test_slow_but_steady_body_is_fine(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", IMAGE[:100_000], piece_delay=0.05)
    assert download(open_http(server, "/img", session, read_timeout=0.5)) == IMAGE[:100_000]
    assert server.count("/img") == 1


def test_stalled_headers_time_out(server: FaultServer, session: requests.Session) -> None:
    # Headers sent, then nothing: the first read times out, and so does every retry.
    server.add("/img", IMAGE, stall_after=0)
    with pytest.raises(errors.Network, match="timed out"):
        download(open_http(server, "/img", session, read_timeout=0.3, retries=1))


# -- redirects ------------------------------------------------------------------------------------------------------


def test_redirect_to_another_path_and_resume_there(server: FaultServer, session: requests.Session) -> None:
    server.add("/latest", b"", redirect_to="/v2/img")
    server.add("/v2/img", IMAGE, etag=ETAG, drop_after=60_000, drop_requests=1)
    source = open_http(server, "/latest", session)
    assert source.description == server.url("/latest")
    assert sha(download(source)) == IMAGE_SHA
    assert server.count("/latest") == 1
    assert [record.range for record in server.requests_for("/v2/img")] == [None, "bytes=60000-"]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_every_redirect_status_is_followed(server: FaultServer, session: requests.Session, status: int) -> None:
    server.add("/old", b"", redirect_to="/new", redirect_status=status)
    server.add("/new", IMAGE)
    assert sha(download(open_http(server, "/old", session))) == IMAGE_SHA


def test_redirect_loop_is_limited(server: FaultServer, session: requests.Session) -> None:
    server.add("/a", b"", redirect_to="/b")
    server.add("/b", b"", redirect_to="/a")
    with pytest.raises(errors.Network, match=r"too many redirects \(more than 4\)"):
        open_http(server, "/a", session, max_redirects=4)
    assert server.count("/a") + server.count("/b") == 5


def test_redirect_to_another_scheme_is_refused(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", b"", redirect_to="ftp://127.0.0.1/img")
    with pytest.raises(errors.Network, match=r"unsupported scheme ftp://"):
        open_http(server, "/img", session)


def test_redirect_without_location(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", b"", status=302)
    with pytest.raises(errors.Network, match="HTTP 302"):
        open_http(server, "/img", session)


# -- HTTPS ----------------------------------------------------------------------------------------------------------


def test_https_download(tls_server: FaultServer, certificate: tuple[Path, Path], session: requests.Session) -> None:
    session.verify = str(certificate[0])
    tls_server.add("/img", IMAGE, etag=ETAG, drop_after=100_000, drop_requests=1)
    source = HttpSource(tls_server.url("/img"), session=session, **FAST)
    assert source.description.startswith("https://")
    assert sha(download(source)) == IMAGE_SHA
    assert tls_server.requests_for("/img")[1].range == "bytes=100000-"


def test_https_to_http_redirect_is_refused(
    tls_server: FaultServer, server: FaultServer, certificate: tuple[Path, Path], session: requests.Session
) -> None:
    session.verify = str(certificate[0])
    server.add("/img", IMAGE)
    tls_server.add("/img", b"", redirect_to=server.url("/img"))
    with pytest.raises(errors.Network, match="refusing redirect from https to plain http"):
        HttpSource(tls_server.url("/img"), session=session, **FAST)
    assert server.count("/img") == 0


def test_http_to_https_redirect_is_followed(
    tls_server: FaultServer, server: FaultServer, certificate: tuple[Path, Path], session: requests.Session
) -> None:
    session.verify = str(certificate[0])
    tls_server.add("/img", IMAGE)
    server.add("/img", b"", redirect_to=tls_server.url("/img"))
    assert sha(download(open_http(server, "/img", session))) == IMAGE_SHA


def test_untrusted_certificate_fails_without_retries(tls_server: FaultServer, session: requests.Session) -> None:
    tls_server.add("/img", IMAGE)
    started = time.monotonic()
    with pytest.raises(errors.Network, match="certificate verification failed"):
        HttpSource(tls_server.url("/img"), session=session, **{**FAST, "backoff": 5.0})
    assert time.monotonic() - started < 5


# -- open_source and local sources ----------------------------------------------------------------------------------


def test_open_source_http(server: FaultServer, session: requests.Session) -> None:
    server.add("/img", IMAGE)
    source = open_source(server.url("/img"), session=session, retries=0)
    assert isinstance(source, HttpSource)
    assert sha(download(source)) == IMAGE_SHA


def test_open_source_file(tmp_path: Path) -> None:
    path = tmp_path / "image.img"
    path.write_bytes(IMAGE)
    source = open_source(str(path))
    assert isinstance(source, FileSource)
    assert source.size == len(IMAGE)
    assert sha(download(source)) == IMAGE_SHA


def test_open_source_stdin() -> None:
    read_end, write_end = os.pipe()
    saved_stdin = os.dup(0)
    try:
        os.dup2(read_end, 0)
        source = open_source("-")
    finally:
        os.dup2(saved_stdin, 0)
        os.close(saved_stdin)
        os.close(read_end)
    assert isinstance(source, FdSource)
    assert source.description == "standard input"
    assert source.size is None
    with os.fdopen(write_end, "wb") as writer:
        writer.write(b"from a pipe")
    assert download(source) == b"from a pipe"


@pytest.mark.parametrize("spec", ["file:///tmp/x.img", "ftp://host/x.img", "s3://bucket/x"])
def test_open_source_other_schemes(spec: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=spec.split("://", maxsplit=1)[0] + "://"):
        open_source(spec)


def test_open_source_missing_file_and_empty_spec(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidArgument, match="does not exist"):
        open_source(str(tmp_path / "missing.img"))
    with pytest.raises(errors.InvalidArgument, match="no image given"):
        open_source("")
    with pytest.raises(errors.InvalidArgument, match="directory"):
        open_source(str(tmp_path))


def test_serve_files_helper(session: requests.Session) -> None:
    with serve_files({"/a": b"first", "/b": IMAGE}) as running:
        assert download(HttpSource(running.url("/a"), session=session, **FAST)) == b"first"
        assert sha(download(HttpSource(running.url("/b"), session=session, **FAST))) == IMAGE_SHA
        assert [record.path for record in running.requests] == ["/a", "/b"]
