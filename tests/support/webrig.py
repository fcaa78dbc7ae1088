"""The upload page for tests: ``ab-flasher-web`` run as a real unprivileged user (granted the page's rights by the
shipped polkit rule, or not) against the service on the rig's private bus, and an HTTP client for it.

The shipped rule (polkit/org.abflasher.Web.rules) names the ``ab-flasher-web`` user; the tests install it with the
name of a user they create, so the package's own user on this machine (if any) is never touched.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

from abflasher.web.settings import hash_password
from tests.support.bus import REPO, DBusDaemon, stop_process, wait_until, world_readable_tempdir
from tests.support.polkit import POLKIT_RULES_DIR
from tests.support.users import _kill_processes_of, popen_as

WEB_RULES_FILE = "org.abflasher.Web.rules"
SHIPPED_WEB_USER = "ab-flasher-web"
PASSWORD = "correct horse battery staple"
START_TIMEOUT = 30.0


@contextlib.contextmanager
def system_user(prefix: str = "abft-w") -> Iterator[str]:
    """A real unprivileged system user, removed afterwards (and whatever still runs as it)."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell",
                    "/usr/sbin/nologin", name], check=True, capture_output=True, timeout=30)
    try:
        yield name
    finally:
        with contextlib.suppress(KeyError):
            _kill_processes_of({pwd.getpwnam(name).pw_uid})
        subprocess.run(["userdel", name], capture_output=True, timeout=30, check=False)


@contextlib.contextmanager
def installed_web_rules(user: str) -> Iterator[Path]:
    """The shipped rule for the page's user, naming ``user``, where polkitd reads rules; removed afterwards."""
    text = (REPO / "polkit" / WEB_RULES_FILE).read_text()
    assert f'subject.user == "{SHIPPED_WEB_USER}"' in text
    target = POLKIT_RULES_DIR / WEB_RULES_FILE
    before = target.read_bytes() if target.exists() else None
    target.write_text(text.replace(f'"{SHIPPED_WEB_USER}"', f'"{user}"'))
    target.chmod(0o644)
    try:
        yield target
    finally:
        if before is None:
            target.unlink(missing_ok=True)
        else:
            target.write_bytes(before)


def granted_web_user() -> Iterator[str]:
    """A web user the shipped rule grants the page's rights (a module-scoped fixture's body: ``yield from``)."""
    with system_user() as user, installed_web_rules(user):
        yield user


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def web_config_text(port: int, **options: str) -> str:
    settings = {"enabled": "yes", "listen_address": "127.0.0.1", "port": str(port),
                "password_hash": hash_password(PASSWORD), **options}
    return "[web]\n" + "".join(f"{key} = {value}\n" for key, value in settings.items())


class WebProcess:
    """``python -m abflasher.web`` on ``bus``, as ``user`` (None: as this process's user); ready once it listens.
    ``options`` go into its web.conf (enabled, on 127.0.0.1, a free port and the test password by default)."""

    def __init__(self, bus: DBusDaemon, python: str | os.PathLike[str], user: str | None = None,
                 **options: str) -> None:
        self.port = free_port()
        self.scheme = "https" if options.get("tls_certificate") else "http"
        self.base = f"{self.scheme}://127.0.0.1:{self.port}"
        workdir = world_readable_tempdir("abft-web-")
        self.config = workdir / "web.conf"
        self.config.write_text(web_config_text(self.port, **options))
        self.config.chmod(0o644)
        self.log = workdir / "web.log"
        self._final_log = ""
        argv = [python, "-m", "abflasher.web", "--config", self.config]
        with open(self.log, "ab") as log:
            if user is None:
                self.process = subprocess.Popen(list(map(str, argv)), env=bus.env(), cwd=REPO,
                                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            else:
                self.process = popen_as(user, argv, bus=bus, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self._as_user = user is not None
        try:
            wait_until(self._listening, timeout=START_TIMEOUT, what=f"ab-flasher-web to listen\n{self.log_text()}")
        except BaseException:
            self.close()
            raise

    def _listening(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"ab-flasher-web exited with {self.process.returncode}:\n{self.log_text()}")
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def log_text(self) -> str:
        """Its log (kept after close(), which removes its directory)."""
        if self.log.exists():
            self._final_log = self.log.read_text(errors="replace")
        return self._final_log

    @property
    def server_pid(self) -> int:
        """The Python process (runuser's child: ``env -i`` execs it)."""
        if not self._as_user:
            return self.process.pid
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return int(children[0])

    def url(self, path: str) -> str:
        return self.base + path

    def close(self) -> None:
        # runuser passes SIGTERM on to the server, which cancels an upload's job before it exits.
        stop_process(self.process)
        self.log_text()
        subprocess.run(["rm", "-rf", str(self.config.parent)], check=False, timeout=60)

    def __enter__(self) -> WebProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WebClient:
    """A browser-like session: logged in with a cookie, sending the CSRF token and a same-origin Origin."""

    def __init__(self, web: WebProcess) -> None:
        self.web = web
        self.http = requests.Session()
        self.csrf = ""

    def login(self, password: str = PASSWORD) -> requests.Response:
        response = self.http.post(self.web.url("/api/login"), json={"password": password},
                                  headers={"Origin": self.web.base}, timeout=30)
        if response.ok:
            self.csrf = response.json()["csrf_token"]
        return response

    def headers(self, extra: dict[str, str] | None = None, *, csrf: bool = True) -> dict[str, str]:
        headers = {"Origin": self.web.base, **(extra or {})}
        if csrf and self.csrf:
            headers.setdefault("X-CSRF-Token", self.csrf)
        return headers

    def request(self, method: str, path: str, *, csrf: bool = True, headers: dict[str, str] | None = None,
                timeout: float = 120, **kwargs: Any) -> requests.Response:
        return self.http.request(method, self.web.url(path), headers=self.headers(headers, csrf=csrf),
                                 timeout=timeout, **kwargs)

    def status(self) -> dict[str, Any]:
        response = self.request("GET", "/api/status")
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result


def wait_for_state(client: WebClient, predicate: Any, *, timeout: float, what: str) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def check() -> bool:
        found.clear()
        found.update(client.status())
        return bool(predicate(found))

    wait_until(check, timeout=timeout, what=what, interval=0.2)
    return found


def rss_peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for {pid}")

