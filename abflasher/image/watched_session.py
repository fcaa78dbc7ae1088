"""requests sessions whose new connections can be reached from another thread, so a cancel can cut a request off.

A request blocks inside requests until the server answers (connecting, then waiting for the status line), with no
handle on its socket. A session from :func:`watched_session` opens its connections through the classes below, which
hand each new socket to whatever :data:`NEW_SOCKET_WATCHER` holds in the thread making the request (HttpSource sets it
around each request), so HttpSource.abort() can shut that socket down too.
"""

from __future__ import annotations

import contextvars
import socket
from collections.abc import Callable
from typing import Any

import requests
import requests.adapters
import urllib3.connection
import urllib3.connectionpool

NEW_SOCKET_WATCHER: contextvars.ContextVar[Callable[[socket.socket], None] | None] = contextvars.ContextVar(
    "abflasher_new_socket_watcher", default=None
)


def _announce(sock: socket.socket) -> socket.socket:
    watcher = NEW_SOCKET_WATCHER.get()
    if watcher is not None:
        watcher(sock)
    return sock


# _new_conn is urllib3's (1.26 and 2.x) one place that makes a connection's socket; its type stubs omit it.
class _WatchedHTTPConnection(urllib3.connection.HTTPConnection):
    def _new_conn(self) -> socket.socket:
        return _announce(super()._new_conn())  # type: ignore[misc]


class _WatchedHTTPSConnection(urllib3.connection.HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        return _announce(super()._new_conn())  # type: ignore[misc]


class _WatchedHTTPConnectionPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSConnectionPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _WatchedAdapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.poolmanager.pool_classes_by_scheme = {
            "http": _WatchedHTTPConnectionPool,
            "https": _WatchedHTTPSConnectionPool,
        }


def watched_session() -> requests.Session:
    """A requests.Session whose connections are announced to NEW_SOCKET_WATCHER."""
    session = requests.Session()
    adapter = _WatchedAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
