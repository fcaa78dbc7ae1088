"""The chunk store's own HTTP connection (delta/store_http.py), against real local servers: redirects, a keep-alive
connection the server dropped, proxies from the environment."""

from __future__ import annotations

import base64
import http.server
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from abflasher import errors
from abflasher.delta.store_http import MAX_REDIRECTS, StoreConnection


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:
        self.server.seen.append((self.path, dict(self.headers.items())))
        route = self.path.rsplit("/", 1)[-1]
        if route == "moved":
            self._answer(302, b"", {"Location": "/data"})
        elif route == "loop":
            self._answer(302, b"", {"Location": "loop"})
        elif route == "elsewhere":
            self._answer(302, b"", {"Location": "ftp://127.0.0.1/data"})
        else:
            self._answer(200, f"{self.server.name}:{self.path}".encode(), {})
        if self.server.drop_idle:
            # As a server whose keep-alive timeout passed: gone without having said so.
            self.close_connection = True

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, name: str, drop_idle: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.name = name
        self.drop_idle = drop_idle
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.connections = 0

    def get_request(self) -> tuple[socket.socket, object]:
        self.connections += 1
        return super().get_request()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextmanager
def serving(name: str, drop_idle: bool = False) -> Iterator[_Server]:
    server = _Server(name, drop_idle)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def get(conn: StoreConnection, url: str) -> bytes:
    resp = conn.get(url, {})
    return resp.read()


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "all_proxy",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def connection(**kwargs: object) -> StoreConnection:
    return StoreConnection(connect_timeout=5, read_timeout=5, **kwargs)  # type: ignore[arg-type]


def test_requests_share_one_connection_and_the_watcher_sees_its_socket() -> None:
    watched: list[socket.socket] = []
    with serving("store") as server:
        conn = connection(watch=watched.append)
        assert get(conn, f"{server.base}/a") == b"store:/a"
        assert get(conn, f"{server.base}/b") == b"store:/b"
        conn.close()
    assert server.connections == 1
    assert len(watched) == 1


def test_a_redirect_is_followed_on_the_same_connection() -> None:
    with serving("store") as server:
        conn = connection()
        assert get(conn, f"{server.base}/x/moved") == b"store:/data"
        assert conn.url == f"{server.base}/data"
        conn.close()
    assert [path for path, _ in server.seen] == ["/x/moved", "/data"]
    assert server.connections == 1


def test_a_redirect_loop_and_a_redirect_to_another_scheme_are_clear_errors() -> None:
    with serving("store") as server:
        conn = connection()
        with pytest.raises(errors.Network, match=f"more than {MAX_REDIRECTS} redirects"):
            conn.get(f"{server.base}/loop", {})
        with pytest.raises(errors.Network, match="not http"):
            conn.get(f"{server.base}/elsewhere", {})
        conn.close()
    assert sum(path == "/loop" for path, _ in server.seen) == MAX_REDIRECTS + 1


def test_a_keep_alive_connection_the_server_dropped_is_opened_again() -> None:
    with serving("store", drop_idle=True) as server:
        conn = connection()
        assert get(conn, f"{server.base}/a") == b"store:/a"
        assert get(conn, f"{server.base}/b") == b"store:/b"
        conn.close()
    assert server.connections == 2


def test_the_environment_s_proxy_is_used_with_its_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    with serving("proxy") as proxy:
        monkeypatch.setenv("http_proxy", f"http://fleet%40ops:s3cret@127.0.0.1:{proxy.server_address[1]}")
        conn = connection()
        assert get(conn, "http://updates.example.invalid/store/ab/abcd.cacnk") == \
            b"proxy:http://updates.example.invalid/store/ab/abcd.cacnk"
        conn.close()
    ((_, headers),) = proxy.seen
    assert headers["Host"] == "updates.example.invalid"
    assert headers["Proxy-Authorization"] == "Basic " + base64.b64encode(b"fleet@ops:s3cret").decode()


def test_no_proxy_sends_a_host_past_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    with serving("proxy") as proxy, serving("store") as server:
        monkeypatch.setenv("http_proxy", proxy.base)
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        conn = connection()
        assert get(conn, f"{server.base}/a") == b"store:/a"
        conn.close()
    assert proxy.seen == []
