"""Who may use the page: the Host and Origin checks every request passes (DNS rebinding, cross-site requests), the
login (a session cookie, or the password with each request for scripts), and the CSRF token every state-changing
request from a browser session carries (docs/web-api.md, "Security")."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from abflasher.web.settings import WebConfig, verify_password

SESSION_COOKIE = "abflasher_session"
CSRF_HEADER = "X-CSRF-Token"
#: Methods that change nothing; every other one needs the CSRF token (or explicit credentials).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: A wrong password costs this long, one guess at a time.
FAILED_LOGIN_DELAY = 1.0
MAX_SESSIONS = 64

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(status: int, message: str, **extra: object) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


@dataclass
class Session:
    csrf_token: str
    expires: float


class Guard:
    """Sessions (in memory: a restart logs everyone out) and the checks."""

    def __init__(self, config: WebConfig) -> None:
        self.config = config
        self._sessions: dict[str, Session] = {}
        self._login_lock = asyncio.Lock()
        hostname = socket.gethostname().lower()
        self._hosts = {"localhost", hostname, f"{hostname}.local", *config.allowed_hosts}

    # --- hosts and origins ----------------------------------------------------------------------------------------

    def host_allowed(self, host: str) -> bool:
        name = host.lower()
        if name.startswith("["):
            name = name[1:].split("]", 1)[0]
        elif name.count(":") == 1:
            name = name.split(":", 1)[0]
        if not name:
            return False
        try:
            ipaddress.ip_address(name)
            return True  # an address cannot be rebound to another site
        except ValueError:
            return name.rstrip(".") in self._hosts

    def origin_problem(self, request: web.Request) -> str | None:
        """Why a request must be refused as cross-site (None: it is not)."""
        origin = request.headers.get("Origin")
        if origin is not None:
            expected = f"{request.scheme}://{request.host}".lower()
            if origin.lower() != expected:
                return f"requests from another site ({origin}) are refused"
        if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            return "requests from another site are refused"
        return None

    # --- sessions -------------------------------------------------------------------------------------------------

    def session_of(self, request: web.Request) -> Session | None:
        token = request.cookies.get(SESSION_COOKIE, "")
        session = self._sessions.get(token) if token else None
        if session is None:
            return None
        if session.expires < time.monotonic():
            del self._sessions[token]
            return None
        return session

    def new_session(self) -> tuple[str, Session]:
        """A new session: (its cookie's value, the session)."""
        now = time.monotonic()
        for token in [t for t, s in self._sessions.items() if s.expires < now]:
            del self._sessions[token]
        while len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]
        token = secrets.token_urlsafe(32)
        session = Session(secrets.token_urlsafe(32), now + self.config.session_lifetime)
        self._sessions[token] = session
        return token, session

    def set_cookie(self, response: web.StreamResponse, token: str) -> None:
        response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="Strict", secure=self.config.tls,
                            path="/", max_age=int(self.config.session_lifetime))

    def end_session(self, request: web.Request, response: web.StreamResponse) -> None:
        self._sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)
        response.del_cookie(SESSION_COOKIE, path="/")

    async def check_password(self, password: str) -> bool:
        """One guess at a time, and a wrong one takes FAILED_LOGIN_DELAY."""
        async with self._login_lock:
            ok = bool(self.config.password_hash) and await asyncio.get_running_loop().run_in_executor(
                None, verify_password, password, self.config.password_hash
            )
            if not ok:
                await asyncio.sleep(FAILED_LOGIN_DELAY)
            return ok

    # --- the middleware -------------------------------------------------------------------------------------------

    async def check(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self.host_allowed(request.host):
            return json_error(421, f"this page does not answer to the host name {request.host!r}; use the "
                                   "device's address (or add the name to allowed_hosts in web.conf)")
        if not request.path.startswith("/api/"):
            return await handler(request)  # the page itself and its assets
        public = request.path in ("/api/login", "/api/session") or request.method == "OPTIONS"
        cross_site = self.origin_problem(request)
        if cross_site is not None and request.method not in SAFE_METHODS:
            return json_error(403, cross_site)
        session = self.session_of(request)
        if session is not None:
            # Logging in (again) needs no token: there is no session to ride yet; the Origin check covers it.
            if request.method not in SAFE_METHODS and not public:
                token = request.headers.get(CSRF_HEADER, "")
                if not token:
                    return json_error(403, f"missing CSRF token (the {CSRF_HEADER} header); reload the page")
                if not hmac.compare_digest(token, session.csrf_token):
                    return json_error(403, "wrong CSRF token; reload the page")
            return await handler(request)
        if request.cookies.get(SESSION_COOKIE):
            if public:
                return await handler(request)
            return json_error(401, "your login has expired; log in again", login=True)
        # No session: a script. Without cookies it cannot be a forged browser request; it brings the password
        # (HTTP Basic, any user name) unless the login is switched off.
        if public:
            return await handler(request)
        if self.config.login_required:
            password = _basic_password(request)
            if password is None:
                response = json_error(401, "log in first (or pass the password: curl -u :PASSWORD ...)", login=True)
                if "Origin" not in request.headers:
                    response.headers["WWW-Authenticate"] = 'Basic realm="ab-flasher"'
                return response
            if not await self.check_password(password):
                return json_error(401, "wrong password", login=True)
        return await handler(request)


def _basic_password(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[2]
