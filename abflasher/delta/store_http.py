"""One keep-alive HTTP/1.1 connection to a chunk store, on the standard library's ``http.client``.

A delta update fetches thousands of small files. requests spends about 1 ms of CPU on each (its hooks, cookie jar,
environment lookups and adapter layers), http.client about a third of that (docs/delta-updates.md, "Speed"); on a
Pi's cores, and next to the installer hashing every chunk it reuses, that difference is most of the update's CPU.
So the chunk fetcher talks http.client and does itself the part of what requests did that a chunk store needs:
keep-alive with a transparent reconnect when the server closed an idle connection, https with the system's
certificates, proxies from the environment (``http_proxy``, ``https_proxy``, ``no_proxy``), and redirects (at most
`MAX_REDIRECTS`, never from https to plain http).
"""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import urllib.parse
import urllib.request
from collections.abc import Callable

from abflasher import errors

MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

SocketWatcher = Callable[[socket.socket], None]


class StoreConnection:
    """GETs on one connection at a time (reopened when a request goes to another server), each answered with the
    ``http.client.HTTPResponse`` whose body the caller reads to the end (or calls `reset`)."""

    def __init__(self, *, connect_timeout: float, read_timeout: float, watch: SocketWatcher | None = None) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._watch = watch
        self._conn: http.client.HTTPConnection | None = None
        self._key: tuple[str, str, int, str | None] | None = None
        self._context: ssl.SSLContext | None = None
        #: The URL the last response came from, after redirects.
        self.url = ""

    def get(self, url: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        """The response to GET ``url`` after redirects. Raises OSError or http.client.HTTPException for transport
        failures (the connection is reset; retrying is the caller's choice) and Network for a refused redirect."""
        for _ in range(MAX_REDIRECTS + 1):
            resp = self._request(url, headers)
            location = resp.getheader("Location")
            if resp.status not in _REDIRECTS or not location:
                self.url = url
                return resp
            resp.read()  # the body of a redirect, so the connection can carry the next request
            target = urllib.parse.urljoin(url, location)
            if url.startswith("https://") and not target.startswith("https://"):
                raise errors.Network(f"refusing a redirect from https to {urllib.parse.urlsplit(target).scheme or 'a'} "
                                     "URL")
            if not target.startswith(("http://", "https://")):
                raise errors.Network("refusing a redirect to a URL that is not http(s)")
            url = target
        raise errors.Network(f"more than {MAX_REDIRECTS} redirects")

    def _request(self, url: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        proxy = _proxy_for(parts.scheme, host)
        key = (parts.scheme, host, port, proxy)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        headers = {**headers, "Host": parts.netloc.rpartition("@")[2]}
        if proxy is not None and parts.scheme == "http":
            path = url  # a plain-http proxy takes the whole URL
            headers.update(_proxy_authorization(proxy))
        reused = self._conn is not None and self._key == key
        while True:
            if self._conn is None or self._key != key:
                self.reset()
                self._conn = self._open(parts.scheme, host, port, proxy)
                self._key = key
            try:
                self._conn.request("GET", path, headers=headers)
                return self._conn.getresponse()
            except BaseException as exc:
                self.reset()
                stale = isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError))
                if not (reused and stale):
                    raise
            # The server had closed the idle connection: once more on a new one, as a browser does.
            reused = False

    def _open(self, scheme: str, host: str, port: int, proxy: str | None) -> http.client.HTTPConnection:
        connect_host, connect_port = host, port
        if proxy is not None:
            proxy_parts = urllib.parse.urlsplit(proxy)
            connect_host = proxy_parts.hostname or ""
            connect_port = proxy_parts.port or (443 if proxy_parts.scheme == "https" else 80)
        conn: http.client.HTTPConnection
        if scheme == "https":
            if self._context is None:
                self._context = ssl.create_default_context()
            conn = http.client.HTTPSConnection(connect_host, connect_port, timeout=self._connect_timeout,
                                               context=self._context)
            if proxy is not None:
                conn.set_tunnel(host, port, headers=_proxy_authorization(proxy))
        else:
            conn = http.client.HTTPConnection(connect_host, connect_port, timeout=self._connect_timeout)
        try:
            conn.connect()
        except BaseException:
            conn.close()
            raise
        assert conn.sock is not None
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sock.settimeout(self._read_timeout)
        if self._watch is not None:
            self._watch(conn.sock)
        return conn

    def reset(self) -> None:
        """Drop the connection (after a failure, or a body not read to its end)."""
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._key = None

    close = reset


def _proxy_for(scheme: str, host: str) -> str | None:
    """The proxy the environment names for ``scheme``, unless ``no_proxy`` exempts ``host``."""
    proxy = urllib.request.getproxies().get(scheme)
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def _proxy_authorization(proxy: str) -> dict[str, str]:
    parts = urllib.parse.urlsplit(proxy)
    if parts.username is None:
        return {}
    credentials = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
    return {"Proxy-Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}


def describe_failure(exc: BaseException) -> str:
    """A short human reason for a transport failure."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed ({exc.verify_message})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return "cannot resolve the server's name"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, http.client.IncompleteRead):
        return "the connection closed in the middle of the body"
    if isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
        return "the server closed the connection"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__
