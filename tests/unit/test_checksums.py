"""Checksum text, checksum files and fetching them over HTTP(S)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from abflasher import errors
from abflasher.image.checksums import (
    MAX_CHECKSUM_FILE_BYTES,
    fetch_checksum,
    normalize_sha256,
    parse_checksum_file,
)
from tests.support.httpserver import FaultServer, make_self_signed_cert

pytestmark = pytest.mark.timeout(30)

A = hashlib.sha256(b"a").hexdigest()
B = hashlib.sha256(b"b").hexdigest()
C = hashlib.sha256(b"c").hexdigest()
FAST: dict[str, Any] = {"connect_timeout": 2.0, "read_timeout": 1.0, "backoff": 0.01, "retries": 2}


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as running:
        yield running
        assert running.errors == []


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as plain:
        plain.trust_env = False
        yield plain


# -- normalize_sha256 -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [A, A.upper(), f"  {A}\n", f"\t{A[:10].upper()}{A[10:]} "])
def test_normalize_accepts_any_case_and_whitespace(text: str) -> None:
    assert normalize_sha256(text) == A


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        (A[:63], "63 hex digits"),
        (A + "0", "65 hex digits"),
        (hashlib.md5(b"x").hexdigest(), "MD5"),
        (hashlib.sha1(b"x").hexdigest(), "SHA-1"),
        (hashlib.sha512(b"x").hexdigest(), "SHA-512"),
        (A[:63] + "g", "'g', which is not a hex digit"),
        (f"sha256:{A}", "'s', which is not a hex digit"),
        (f"{A[:32]} {A[32:]}", "' ', which is not a hex digit"),
    ],
)
def test_normalize_rejects_with_a_specific_message(text: str, message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=message):
        normalize_sha256(text)


# -- parse_checksum_file: formats -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        f"{A}  image.img.gz\n",
        f"{A} *image.img.gz\n",
        f"{A.upper()}  image.img.gz",
        f"{A} image.img.gz\r\n",
        f"{A}\timage.img.gz\n",
        f"SHA256 (image.img.gz) = {A}\n",
        f"SHA256(image.img.gz)= {A}\n",
        f"SHA2-256(image.img.gz)= {A.upper()}\n",
        f"{A}\n",
        f"# made by hand\n\n   \n{A}  ./out/image.img.gz\n# end\n",
    ],
)
def test_formats_of_a_single_entry(text: str) -> None:
    assert parse_checksum_file(text, "image.img.gz") == A


def test_single_entry_is_used_whatever_its_name() -> None:
    assert parse_checksum_file(f"{A}  renamed-on-the-mirror.img.gz\n", "image.img.gz") == A
    assert parse_checksum_file(f"{A}  image.img.gz\n", None) == A


def test_several_entries_pick_the_image_by_base_name() -> None:
    text = f"{A}  first.img.gz\n{B} *dir/image.img.gz\nSHA256 (third.img.gz) = {C}\n"
    assert parse_checksum_file(text, "image.img.gz") == B
    assert parse_checksum_file(text, "https://host/path/image.img.gz") == B
    assert parse_checksum_file(text, "/srv/images/third.img.gz") == C


def test_name_match_is_exact() -> None:
    text = f"{A}  image.img\n{B}  image.img.gz\n"
    assert parse_checksum_file(text, "image.img") == A
    assert parse_checksum_file(text, "image.img.gz") == B
    with pytest.raises(errors.InvalidArgument, match=r"no entry for IMAGE\.IMG"):
        parse_checksum_file(text, "IMAGE.IMG")


def test_repeated_entries_with_the_same_hash_are_fine() -> None:
    assert parse_checksum_file(f"{A}  x.img\n{A}  x.img\n", None) == A
    assert parse_checksum_file(f"{A}  x.img\n{A} *y/x.img\n{B}  z.img\n", "x.img") == A


def test_conflicting_entries_for_the_image_are_refused() -> None:
    with pytest.raises(errors.InvalidArgument, match=r"x\.img with different checksums \(lines 1, 3\)"):
        parse_checksum_file(f"{A}  x.img\n{C}  y.img\n{B}  ./x.img\n", "x.img")


def test_no_matching_entry_among_several() -> None:
    with pytest.raises(errors.InvalidArgument, match=r"no entry for image\.img \(it lists a\.img, b\.img\)"):
        parse_checksum_file(f"{A}  a.img\n{B}  b.img\n", "image.img")


def test_several_entries_and_no_name() -> None:
    with pytest.raises(errors.InvalidArgument, match="lists 2 files .*name the image"):
        parse_checksum_file(f"{A}  a.img\n{B}  b.img\n", None)


def test_escaped_names_as_sha256sum_writes_them() -> None:
    text = f"\\{A}  dir\\\\odd\\nname.img\n{B}  plain.img\n"
    assert parse_checksum_file(text, "odd\nname.img") == A


def test_pgp_clear_signed_file() -> None:
    text = (
        "-----BEGIN PGP SIGNED MESSAGE-----\n"
        "Hash: SHA256\n"
        "\n"
        f"{A}  a.img\n"
        f"{B}  image.img\n"
        "-----BEGIN PGP SIGNATURE-----\n"
        "\n"
        "iQEzBAEBCAAdFiEE0000000000000000000000000000000000000000000000==\n"
        "=abcd\n"
        "-----END PGP SIGNATURE-----\n"
    )
    assert parse_checksum_file(text, "image.img") == B


# -- parse_checksum_file: malformed files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "lists no SHA-256 checksums"),
        ("# only a comment\n\n", "lists no SHA-256 checksums"),
        (f"{A}  a.img\nthis is not a checksum\n", r"line 2 is not a checksum line: 'this is not a checksum'"),
        (f"{A[:40]}  a.img\n", "line 1: the 40-digit hash looks like a SHA-1 checksum"),
        (f"{hashlib.sha512(b'x').hexdigest()}  a.img\n", "line 1: the 128-digit hash looks like a SHA-512"),
        (f"{A[:50]}  a.img\n", "line 1: the 50-digit hash is not a SHA-256 checksum"),
        (f"\n\nSHA512 (a.img) = {hashlib.sha512(b'x').hexdigest()}\n", "line 3 holds an SHA512 checksum"),
        (f"MD5 (a.img) = {hashlib.md5(b'x').hexdigest()}\n", "line 1 holds an MD5 checksum"),
        ("<html><body>Not Found</body></html>\n", "line 1 is not a checksum line"),
        (f"{A}g  a.img\n", "line 1 is not a checksum line"),
    ],
)
def test_malformed_files_name_the_line(text: str, message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=message):
        parse_checksum_file(text, "a.img")


def test_long_bad_lines_are_shortened() -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        parse_checksum_file("x" * 5000, None)
    assert len(str(caught.value)) < 200


def test_origin_appears_in_messages() -> None:
    with pytest.raises(errors.InvalidArgument, match="^SUMS line 1 "):
        parse_checksum_file("garbage", None, origin="SUMS")


# -- fetch_checksum -------------------------------------------------------------------------------------------------


def test_fetch(server: FaultServer, session: requests.Session) -> None:
    server.add("/SHA256SUMS", f"{A}  other.img\n{B}  image.img.gz\n".encode())
    assert fetch_checksum(server.url("/SHA256SUMS"), "image.img.gz", session=session, **FAST) == B


def test_fetch_with_byte_order_mark_and_retries(server: FaultServer, session: requests.Session) -> None:
    server.add("/img.sha256", f"\ufeff{A.upper()}  image.img.gz\r\n".encode(), fail_first=2, fail_status=503)
    assert fetch_checksum(server.url("/img.sha256"), "image.img.gz", session=session, **FAST) == A
    assert server.count("/img.sha256") == 3


def test_fetch_resumes_a_dropped_checksum_file(server: FaultServer, session: requests.Session) -> None:
    lines = "".join(f"{hashlib.sha256(str(i).encode()).hexdigest()}  file{i}.img\n" for i in range(2000))
    server.add("/SUMS", lines.encode(), etag='"s"', drop_after=50_000, drop_requests=1)
    expected = hashlib.sha256(b"1234").hexdigest()
    assert fetch_checksum(server.url("/SUMS"), "file1234.img", session=session, **FAST) == expected
    assert server.requests_for("/SUMS")[1].range == "bytes=50000-"


def test_fetch_404_refuses_to_go_on(server: FaultServer, session: requests.Session) -> None:
    with pytest.raises(errors.Network) as caught:
        fetch_checksum(server.url("/missing.sha256"), "image.img", session=session, **FAST)
    message = str(caught.value)
    assert f"checksum file {server.url('/missing.sha256')} not found (HTTP 404)" in message
    assert "refusing to install without verification" in message
    assert server.count("/missing.sha256") == 1


def test_fetch_server_error_is_network(server: FaultServer, session: requests.Session) -> None:
    server.add("/SUMS", b"", status=500)
    with pytest.raises(errors.Network, match=r"checksum file .* HTTP 500"):
        fetch_checksum(server.url("/SUMS"), "image.img", session=session, **FAST)


def test_fetch_refuses_a_declared_huge_file(server: FaultServer, session: requests.Session) -> None:
    server.add("/SUMS", b"0" * (MAX_CHECKSUM_FILE_BYTES + 1))
    with pytest.raises(errors.InvalidArgument, match=f"larger than {MAX_CHECKSUM_FILE_BYTES} bytes"):
        fetch_checksum(server.url("/SUMS"), "image.img", session=session, **FAST)


def test_fetch_refuses_an_undeclared_huge_file(server: FaultServer, session: requests.Session) -> None:
    server.add("/SUMS", b"0" * 5000, chunked=True)
    with pytest.raises(errors.InvalidArgument, match="larger than 4096 bytes"):
        fetch_checksum(server.url("/SUMS"), "image.img", session=session, max_bytes=4096, **FAST)


def test_fetch_refuses_binary_data(server: FaultServer, session: requests.Session) -> None:
    server.add("/SUMS", b"\x1f\x8b\x08\x00\xff\xfe")
    with pytest.raises(errors.InvalidArgument, match="not UTF-8 text"):
        fetch_checksum(server.url("/SUMS"), "image.img", session=session, **FAST)


def test_fetch_reports_malformed_lines_with_the_url(server: FaultServer, session: requests.Session) -> None:
    server.add("/SUMS", b"<html>oops</html>\n")
    with pytest.raises(errors.InvalidArgument, match=r"checksum file http://127\.0\.0\.1:\d+/SUMS line 1"):
        fetch_checksum(server.url("/SUMS"), "image.img", session=session, **FAST)


@pytest.mark.parametrize("url", ["file:///etc/SHA256SUMS", "ftp://host/SHA256SUMS", "SHA256SUMS"])
def test_fetch_refuses_other_schemes(url: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="checksum file URL"):
        fetch_checksum(url, "image.img")


def test_fetch_refuses_https_to_http_redirect(
    server: FaultServer, session: requests.Session, tmp_path: Path
) -> None:
    cert, key = make_self_signed_cert(tmp_path)
    session.verify = str(cert)
    server.add("/SUMS", f"{A}  image.img\n".encode())
    with FaultServer(tls=(cert, key)) as tls_server:
        tls_server.add("/SUMS", b"", redirect_to=server.url("/SUMS"))
        with pytest.raises(errors.Network, match="refusing redirect from https to plain http"):
            fetch_checksum(tls_server.url("/SUMS"), "image.img", session=session, **FAST)
    assert server.count("/SUMS") == 0
