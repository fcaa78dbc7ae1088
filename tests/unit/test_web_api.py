"""The upload page's HTTP API against the real service process with a fake engine (tests/support/fakeupdater.py)
on a private permissive bus with python-dbusmock's polkitd: TLS, the login switched off, a busy service, and an
upload's job cancelled when the page stops. No root needed (the page runs as the test's user)."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.bus import REPO, DBusDaemon, wait_until
from tests.support.polkit import DbusmockPolkit
from tests.support.serviceprocess import ServiceProcess
from tests.support.webrig import PASSWORD, WebClient, WebProcess

pytestmark = pytest.mark.timeout(120)

TUS = {"Tus-Resumable": "1.0.0"}
ACTIONS = ["org.abflasher.update", "org.abflasher.update-from-source", "org.abflasher.manage-boot"]
#: A raw image to the fake engine: an ext4 superblock's magic where format detection looks for it.
IMAGE = bytes(1080) + b"\x53\xef" + bytes(4 * 1024 * 1024 - 1082)


@pytest.fixture
def fake_bus(bus_and_polkit: tuple[DBusDaemon, DbusmockPolkit], request: pytest.FixtureRequest) -> Iterator[DBusDaemon]:
    """The service with the fake engine (a fresh one per test) on the module's bus; ``request.param`` (indirect
    parametrization) says whether it has a recovery slot: none (default), present, or booted."""
    bus, polkit = bus_and_polkit
    asyncio.run(polkit.set_allowed(ACTIONS))
    recovery = getattr(request, "param", "none")
    fake = [sys.executable, "-m", "tests.support.fakeupdater", "serve-fake", "--chunk-delay", "0.01",
            "--recovery", recovery]
    with ServiceProcess(fake, bus, cwd=REPO):
        yield bus


def self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    key.chmod(0o644)
    return cert, key


def test_tls_serves_https_with_a_secure_cookie(fake_bus: DBusDaemon, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    with WebProcess(fake_bus, sys.executable, tls_certificate=str(cert), tls_key=str(key)) as web:
        assert web.base.startswith("https://")
        client = WebClient(web)
        client.http.trust_env = False  # REQUESTS_CA_BUNDLE would replace the certificate to trust
        client.http.verify = str(cert)
        login = client.login()
        assert login.status_code == 200, login.text
        assert "Secure" in login.headers["Set-Cookie"]
        assert "HttpOnly" in login.headers["Set-Cookie"]
        assert "SameSite=Strict" in login.headers["Set-Cookie"]
        upload = client.request("PUT", "/api/upload", data=IMAGE)
        assert upload.status_code == 200, upload.text
        assert upload.json()["success"] is True
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{web.port}/api/session", timeout=10)


def test_with_the_login_switched_off_scripts_need_nothing_but_browsers_still_need_the_token(
        fake_bus: DBusDaemon) -> None:
    with WebProcess(fake_bus, sys.executable, login_required="no") as web:
        script = requests.put(web.url("/api/upload"), data=IMAGE, timeout=60)
        assert script.status_code == 200, script.text
        browser = requests.Session()
        session = browser.get(web.url("/api/session"), timeout=10).json()
        assert session["authenticated"] is True
        assert session["login_required"] is False
        no_token = browser.put(web.url("/api/upload"), data=IMAGE, headers={"Origin": web.base}, timeout=10)
        assert no_token.status_code == 403
        assert "missing CSRF token" in no_token.json()["error"]
        foreign = requests.put(web.url("/api/upload"), data=IMAGE, headers={"Origin": "http://evil.example"},
                               timeout=10)
        assert foreign.status_code == 403
        with_token = browser.put(web.url("/api/upload"), data=IMAGE,
                                 headers={"Origin": web.base, "X-CSRF-Token": session["csrf_token"]}, timeout=60)
        assert with_token.status_code == 200, with_token.text


def paused_upload(client: WebClient) -> str:
    """A tus upload whose first bytes started the job, then whose connection dropped: its Location."""
    created = client.request("POST", "/api/uploads", headers={**TUS, "Upload-Length": str(len(IMAGE))})
    assert created.status_code == 201, created.text
    location = created.headers["Location"]
    cookie = "; ".join(f"{c.name}={c.value}" for c in client.http.cookies)
    head = (f"PATCH {location} HTTP/1.1\r\nHost: 127.0.0.1:{client.web.port}\r\nOrigin: {client.web.base}\r\n"
            f"Cookie: {cookie}\r\nX-CSRF-Token: {client.csrf}\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n"
            f"Content-Type: application/offset+octet-stream\r\nContent-Length: {len(IMAGE)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", client.web.port), timeout=30) as connection:
        connection.sendall(head + IMAGE[: len(IMAGE) // 2])
        wait_until(lambda: client.status()["state"] == "writing", timeout=30, what="the job to write")
    wait_until(lambda: client.status()["upload"]["state"] == "paused", timeout=30, what="the upload to pause")
    return location


def test_a_busy_service_is_reported_and_stopping_the_page_cancels_its_job(fake_bus: DBusDaemon) -> None:
    with WebProcess(fake_bus, sys.executable) as first, WebProcess(fake_bus, sys.executable) as second:
        owner = WebClient(first)
        assert owner.login().status_code == 200
        paused_upload(owner)
        other = WebClient(second)
        assert other.login().status_code == 200
        busy = other.request("PUT", "/api/upload", data=IMAGE)
        assert busy.status_code == 409, busy.text
        assert busy.json()["error"].startswith("busy: update job")
        assert other.status()["upload"]["state"] == "ended"

        first.close()  # SIGTERM: the page cancels the job of its upload before it exits
        assert first.process.returncode == 0, first.log_text()
        assert "cancelling the upload's update job" in first.log_text()
        status = other.status()
        assert status["state"] == "idle", status
        again = other.request("PUT", "/api/upload", data=IMAGE)
        assert again.status_code == 200, again.text


def test_the_password_protects_the_api(fake_bus: DBusDaemon) -> None:
    with WebProcess(fake_bus, sys.executable) as web:
        assert requests.get(web.url("/api/status"), timeout=10).status_code == 401
        assert requests.get(web.url("/api/status"), auth=("", PASSWORD), timeout=30).status_code == 200
        assert requests.get(web.url("/"), timeout=10).status_code == 200, "the page itself (its login form)"
        assert requests.get(web.url("/static/app.js"), timeout=10).status_code == 200
        assert requests.get(web.url("/static/../settings.py"), timeout=10).status_code == 404


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_plain_upload_whose_connection_drops_is_cancelled_not_installed(fake_bus: DBusDaemon, framing: str) -> None:
    """A PUT cannot be resumed: the bytes it got must never be taken for the whole image."""
    with WebProcess(fake_bus, sys.executable) as web:
        client = WebClient(web)
        assert client.login().status_code == 200
        half = IMAGE[: len(IMAGE) // 2]
        length = f"Content-Length: {len(IMAGE)}" if framing == "content-length" else "Transfer-Encoding: chunked"
        body = half if framing == "content-length" else f"{len(half):x}\r\n".encode() + half + b"\r\n"
        auth = base64.b64encode(f":{PASSWORD}".encode()).decode()
        with socket.create_connection(("127.0.0.1", web.port), timeout=30) as connection:
            connection.sendall(f"PUT /api/upload HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\n"
                               f"Authorization: Basic {auth}\r\n{length}\r\n\r\n".encode() + body)
            wait_until(lambda: client.status()["state"] == "writing", timeout=30, what="the job to write")
        wait_until(lambda: (client.status()["upload"] or {}).get("state") == "ended", timeout=60,
                   what="the upload to end")
        status = client.status()
        assert status["upload"]["result"]["error"] == "Cancelled", status
        assert status["state"] == "idle"
        assert next(s for s in status["slots"] if s["name"] == "b")["version"] != "from-fd"


def web_command(bus: DBusDaemon, tmp_path: Path, config: str, *args: str) -> subprocess.CompletedProcess[str]:
    conf = tmp_path / "web.conf"
    conf.write_text(config)
    return subprocess.run([sys.executable, "-m", "abflasher.web", "--config", str(conf), *args], env=bus.env(),
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(("fake_bus", "config", "enabled", "why"), [
    ("booted", "", True, "the booted slot is the recovery system"),
    ("present", "", False, "not the recovery system"),
    ("none", "", False, "not the recovery system"),
    ("none", "[web]\nenabled = yes\n", True, "enabled = yes"),
    ("booted", "[web]\nenabled = no\n", False, "enabled = no"),
], indirect=["fake_bus"])
def test_the_page_serves_in_update_mode_unless_configured_otherwise(
        fake_bus: DBusDaemon, tmp_path: Path, config: str, enabled: bool, why: str) -> None:
    check = web_command(fake_bus, tmp_path, config, "--check-enabled")
    assert check.returncode == (0 if enabled else 1), check.stderr
    assert why in check.stderr
    if not enabled:
        # Started anyway (without the unit's ExecCondition), it says why it does not serve, and exits 0.
        served = web_command(fake_bus, tmp_path, config)
        assert served.returncode == 0, served.stderr
        assert "not serving" in served.stderr


def test_hash_password_prints_a_config_line_that_logs_in(fake_bus: DBusDaemon, tmp_path: Path) -> None:
    made = subprocess.run([sys.executable, "-m", "abflasher.web", "--hash-password"], input="s3cret\n", text=True,
                          capture_output=True, timeout=60, check=False, cwd=REPO)
    assert made.returncode == 0, made.stderr
    line = made.stdout.strip()
    assert line.startswith("password_hash = scrypt$")
    empty = subprocess.run([sys.executable, "-m", "abflasher.web", "--hash-password"], input="\n", text=True,
                           capture_output=True, timeout=60, check=False, cwd=REPO)
    assert empty.returncode == 2
    assert "the password is empty" in empty.stderr
    with WebProcess(fake_bus, sys.executable, password_hash=line.split(" = ", 1)[1]) as web:
        client = WebClient(web)
        assert client.login("s3cret").status_code == 200
        assert client.login(PASSWORD).status_code == 401


def test_a_bad_configuration_is_refused_with_its_reason(fake_bus: DBusDaemon, tmp_path: Path) -> None:
    done = web_command(fake_bus, tmp_path, "[web]\nport = 99999\n")
    assert done.returncode == 2
    assert "port = '99999': use a port number (1-65535)" in done.stderr


def test_the_event_stream_reports_the_upload_and_the_job(fake_bus: DBusDaemon) -> None:
    with WebProcess(fake_bus, sys.executable) as web:
        client = WebClient(web)
        assert client.login().status_code == 200
        stream = client.http.get(web.url("/api/events"), stream=True, timeout=60)
        assert stream.headers["Content-Type"] == "text/event-stream"
        lines = stream.iter_lines(decode_unicode=True)

        def next_event() -> dict[str, Any]:
            for line in lines:
                if line.startswith("data: "):
                    event: dict[str, Any] = json.loads(line[len("data: "):])
                    return event
            raise AssertionError("the event stream ended")

        assert next_event()["event"] == "status"
        uploading = threading.Thread(target=client.request, args=("PUT", "/api/upload"), kwargs={"data": IMAGE})
        uploading.start()
        try:
            seen = [next_event()]
            while seen[-1]["event"] != "completed":
                seen.append(next_event())
            seen.append(next_event())
        finally:
            uploading.join(60)
            stream.close()
        kinds = [event["event"] for event in seen]
        assert {"upload", "progress"} <= set(kinds), kinds
        stages = [event["stage"] for event in seen if event["event"] == "progress"]
        assert (stages[0], stages[-1]) == ("writing", "verifying"), stages
        assert seen[-2]["success"] is True
        assert seen[-1]["event"] == "status", "a fresh status follows the end of a job"
        uploads = [event for event in seen if event["event"] == "upload"]
        assert {"receiving", "received"} <= {event["state"] for event in uploads}
        assert uploads[-1]["offset"] == len(IMAGE)
