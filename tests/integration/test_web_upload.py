"""The upload page against real components: ab-flasher-web as a real unprivileged user (granted the page's rights
by the shipped polkit rule), the real service as root on the rig's private system bus with the real polkitd, and the
real engine writing a simulated Pi's disk on a loop device. Uploads as a script (curl) and as the page's tus client
would make them; refusals; resume after a dropped connection; the idle timeout."""

from __future__ import annotations

import base64
import hashlib
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from abflasher.service.contract import RUNNING_STATES
from tests.support.service_rig import Device, Rig, simulated_device, slot_of
from tests.support.serviceprocess import ServiceProcess
from tests.support.webrig import (
    PASSWORD,
    WebClient,
    WebProcess,
    wait_for_state,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

IDLE_TIMEOUT = 4.0
MIB = 1 << 20


@pytest.fixture
def device(rig: Rig, tmp_path: Path) -> Iterator[Device]:
    yield from simulated_device(rig, tmp_path, upload_idle_timeout=IDLE_TIMEOUT)


@pytest.fixture
def service(rig: Rig, device: Device) -> Iterator[ServiceProcess]:
    with ServiceProcess([rig.venv.daemon, "--config", device.config_path], rig.bus) as process:
        yield process


@pytest.fixture
def web(rig: Rig, web_user: str, service: ServiceProcess) -> Iterator[WebProcess]:
    with WebProcess(rig.bus, rig.venv.python, web_user) as process:
        yield process


@pytest.fixture
def client(web: WebProcess) -> WebClient:
    client = WebClient(web)
    assert client.login().status_code == 200
    return client


def curl(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--max-time", str(int(timeout)), *args], capture_output=True, text=True,
                          timeout=timeout + 10, check=False)


def test_curl_uploads_an_image_and_it_is_installed(rig: Rig, device: Device, web: WebProcess,
                                                   client: WebClient) -> None:
    image = rig.images["1.1.0.gz"]
    done = curl("-u", f":{PASSWORD}", "-T", str(image), web.url("/api/upload"), "-w", "\n%{http_code}")
    body, _, code = done.stdout.rpartition("\n")
    assert code == "200", (done.stdout, done.stderr, web.log_text())
    assert '"success": true' in body
    status = client.status()
    assert slot_of(status, "b")["version"] == "1.1.0"
    assert status["state"] == "ready-to-reboot"


# ---------------------------------------------------------------------------------------------------------------------
# Helpers

TUS = {"Tus-Resumable": "1.0.0"}
SLOT_COLUMNS = ("name", "role", "version", "booted", "primary", "state")


def slot_table(client: WebClient) -> list[tuple[Any, ...]]:
    return [tuple(slot[key] for key in SLOT_COLUMNS) for slot in client.status()["slots"]]


@dataclass(frozen=True)
class Snapshot:
    """What must not change when a request is refused: the slot table, every byte of the boot partition (the
    files that decide what boots) and of the running root, and the reboots asked for."""

    slots: list[tuple[Any, ...]]
    boot_partition: str
    booted_root: str
    reboots: list[str]

    @classmethod
    def take(cls, device: Device, client: WebClient) -> Snapshot:
        pi = device.pi
        return cls(slot_table(client), pi.partition_sha(1), pi.partition_sha(pi.image.root("a").number),
                   pi.reboots())


def wait_idle(client: WebClient, what: str = "the service to be idle") -> dict[str, Any]:
    return wait_for_state(client, lambda s: s["state"] not in RUNNING_STATES and (s["upload"] is None or
                          s["upload"]["state"] == "ended"), timeout=120, what=what)


def create_upload(client: WebClient, length: int, **metadata: str) -> requests.Response:
    meta = ",".join(f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in metadata.items())
    return client.request("POST", "/api/uploads", headers={**TUS, "Upload-Length": str(length),
                                                           "Upload-Metadata": meta})


def patch(client: WebClient, location: str, offset: int, data: bytes) -> requests.Response:
    return client.request("PATCH", location, data=data, headers={
        **TUS, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"})


def send_and_drop(web: WebProcess, client: WebClient, location: str, offset: int, *, total: int, part: bytes) -> None:
    """A PATCH announcing ``total`` bytes that sends only ``part`` and then loses its connection."""
    cookie = "; ".join(f"{c.name}={c.value}" for c in client.http.cookies)
    head = (f"PATCH {location} HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\nOrigin: {web.base}\r\n"
            f"Cookie: {cookie}\r\nX-CSRF-Token: {client.csrf}\r\nTus-Resumable: 1.0.0\r\n"
            f"Upload-Offset: {offset}\r\nContent-Type: application/offset+octet-stream\r\n"
            f"Content-Length: {total}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", web.port), timeout=30) as connection:
        connection.sendall(head + part)
        time.sleep(0.5)  # let it arrive before the reset; a test may not time its assertions, only its actions


def head_offset(client: WebClient, location: str) -> int:
    response = client.request("HEAD", location, headers=TUS)
    assert response.status_code == 200, response.text
    return int(response.headers["Upload-Offset"])


def stable_offset(client: WebClient, location: str) -> int:
    """The offset once the server has noticed the dropped connection (the upload is paused)."""
    wait_for_state(client, lambda s: s["upload"] is not None and s["upload"]["state"] == "paused", timeout=30,
                   what="the upload to pause after the dropped connection")
    return head_offset(client, location)


# ---------------------------------------------------------------------------------------------------------------------
# Resumable uploads (tus)


def test_an_upload_resumes_after_a_dropped_connection(rig: Rig, device: Device, web: WebProcess,
                                                       client: WebClient) -> None:
    data = rig.images["1.1.0.gz"].read_bytes()
    created = create_upload(client, len(data), filename="root-1.1.0.img.gz",
                            sha256=hashlib.sha256(data).hexdigest())
    assert created.status_code == 201, created.text
    location = created.headers["Location"]
    assert created.headers["Tus-Resumable"] == "1.0.0"

    send_and_drop(web, client, location, offset=0, total=len(data), part=data[: len(data) // 2])
    offset = stable_offset(client, location)
    assert 0 < offset <= len(data) // 2
    # A PATCH from a stale offset is refused; the client asks again and continues from there.
    stale = patch(client, location, 0, data)
    assert stale.status_code == 409, stale.text
    assert head_offset(client, location) == offset
    done = patch(client, location, offset, data[offset:])
    assert done.status_code == 204, done.text
    assert done.headers["Upload-Offset"] == str(len(data))

    status = wait_idle(client, "the resumed upload's job to end")
    assert status["upload"]["result"]["success"] is True, status
    assert slot_of(status, "b")["version"] == "1.1.0"
    assert status["state"] == "ready-to-reboot"


def test_an_abandoned_upload_ends_cancelled_after_the_idle_timeout_and_frees_the_slot(
        rig: Rig, device: Device, web: WebProcess, client: WebClient) -> None:
    data = rig.images["1.1.0.gz"].read_bytes()
    created = create_upload(client, len(data))
    location = created.headers["Location"]
    send_and_drop(web, client, location, offset=0, total=len(data), part=data[: len(data) // 2])
    status = wait_idle(client, f"the service to give up after {IDLE_TIMEOUT} s without data")
    assert status["upload"]["result"]["error"] == "Cancelled", status
    assert "gave up waiting" in status["upload"]["result"]["message"]
    gone = client.request("HEAD", location, headers=TUS)
    assert gone.status_code == 410
    late = patch(client, location, head_offset_or_zero(gone), data)
    assert late.status_code == 410, late.text
    # The slot is free again: the next upload installs.
    again = client.request("PUT", "/api/upload", data=data)
    assert again.status_code == 200, again.text
    assert slot_of(client.status(), "b")["version"] == "1.1.0"


def head_offset_or_zero(response: requests.Response) -> int:
    return int(response.headers.get("Upload-Offset", "0"))


def test_tus_discovery_and_termination(rig: Rig, device: Device, web: WebProcess, client: WebClient) -> None:
    options = client.request("OPTIONS", "/api/uploads")
    assert options.status_code == 204
    assert options.headers["Tus-Version"] == "1.0.0"
    assert set(options.headers["Tus-Extension"].split(",")) == {"creation", "termination"}
    assert int(options.headers["Tus-Max-Size"]) == slot_of(client.status(), "b")["size"]
    before = Snapshot.take(device, client)
    created = create_upload(client, 1 << 20)
    assert created.status_code == 201
    deleted = client.request("DELETE", created.headers["Location"], headers=TUS)
    assert deleted.status_code == 204, deleted.text
    status = wait_idle(client)
    assert status["upload"]["result"]["error"] == "Cancelled"
    assert Snapshot.take(device, client) == before


# ---------------------------------------------------------------------------------------------------------------------
# Refusals: a clear answer, and nothing changed


def test_state_changing_requests_without_the_csrf_token_or_from_another_site_are_refused(
        rig: Rig, device: Device, web: WebProcess, client: WebClient) -> None:
    data = rig.images["1.1.0.gz"].read_bytes()
    before = Snapshot.take(device, client)
    attempts = {
        "upload": lambda **kw: client.request("PUT", "/api/upload", data=data, **kw),
        "tus create": lambda **kw: client.request("POST", "/api/uploads", headers={
            **TUS, "Upload-Length": str(len(data)), **kw.pop("headers", {})}, **kw),
        "reboot": lambda **kw: client.request("POST", "/api/reboot", json={"mode": "trial"}, **kw),
    }
    for what, attempt in attempts.items():
        no_token = attempt(csrf=False)
        assert no_token.status_code == 403, (what, no_token.text)
        assert "missing CSRF token" in no_token.json()["error"]
        wrong_token = attempt(headers={"X-CSRF-Token": "x" * 43})
        assert wrong_token.status_code == 403, (what, wrong_token.text)
        assert "wrong CSRF token" in wrong_token.json()["error"]
        foreign = attempt(headers={"Origin": "http://evil.example"})
        assert foreign.status_code == 403, (what, foreign.text)
        assert "another site (http://evil.example)" in foreign.json()["error"]
        cross = attempt(headers={"Sec-Fetch-Site": "cross-site"})
        assert cross.status_code == 403, (what, cross.text)
        # DNS rebinding: the attacker's name resolves to the device; the Host header still names the attacker.
        rebound = attempt(headers={"Host": "evil.example", "Origin": "http://evil.example"})
        assert rebound.status_code == 421, (what, rebound.text)
        assert "does not answer to the host name 'evil.example'" in rebound.json()["error"]
    rebound_read = client.http.get(web.url("/api/status"), headers={"Host": "evil.example"}, timeout=30)
    assert rebound_read.status_code == 421
    assert Snapshot.take(device, client) == before
    assert client.status()["upload"] is None


def test_wrong_password_and_no_login_are_refused(rig: Rig, device: Device, web: WebProcess,
                                                 client: WebClient) -> None:
    image = rig.images["1.1.0.gz"]
    before = Snapshot.take(device, client)
    stranger = WebClient(web)
    wrong = stranger.login("guess")
    assert wrong.status_code == 401
    assert wrong.json()["error"] == "wrong password"
    assert stranger.http.get(web.url("/api/status"), timeout=30).status_code == 401
    done = curl("-u", ":guess", "-T", str(image), web.url("/api/upload"), "-w", "\n%{http_code}")
    body, _, code = done.stdout.rpartition("\n")
    assert code == "401", done.stdout
    assert "wrong password" in body
    anonymous = curl("-T", str(image), web.url("/api/upload"), "-w", "\n%{http_code}", "-D", "-")
    assert anonymous.stdout.endswith("\n401"), anonymous.stdout
    assert 'WWW-Authenticate: Basic realm="ab-flasher"' in anonymous.stdout
    assert "curl -u :PASSWORD" in anonymous.stdout
    assert Snapshot.take(device, client) == before


def test_a_second_upload_is_refused_as_busy(rig: Rig, device: Device, web: WebProcess, client: WebClient) -> None:
    data = rig.images["1.1.0.gz"].read_bytes()
    first = create_upload(client, len(data), filename="first.img.gz")
    assert first.status_code == 201, first.text
    location = first.headers["Location"]
    send_and_drop(web, client, location, offset=0, total=len(data), part=data[: len(data) // 2])
    offset = stable_offset(client, location)
    percent = offset * 100 // len(data)
    for second in (create_upload(client, len(data)), client.request("PUT", "/api/upload", data=data)):
        assert second.status_code == 409, second.text
        assert second.json()["error"] == (
            f"busy: an upload (first.img.gz, {percent}% received, update job 1) is in progress; wait for it to "
            "finish or cancel it")
    # A script with the password is refused the same way.
    done = curl("-u", f":{PASSWORD}", "-T", str(rig.images["1.1.0.gz"]), web.url("/api/upload"), "-w",
                "\n%{http_code}")
    assert done.stdout.endswith("\n409"), done.stdout
    assert head_offset(client, location) == offset
    assert client.request("DELETE", location, headers=TUS).status_code == 204
    assert wait_idle(client)["upload"]["result"]["error"] == "Cancelled"


def test_an_image_larger_than_the_slot_is_refused_declared_or_streamed(
        rig: Rig, device: Device, web: WebProcess, client: WebClient) -> None:
    slot_size = slot_of(client.status(), "b")["size"]
    before = Snapshot.take(device, client)
    declared = client.request("POST", "/api/uploads", headers={**TUS, "Upload-Length": str(slot_size + 1)})
    assert declared.status_code == 413, declared.text
    assert f"larger than the target slot ({slot_size} bytes)" in declared.json()["error"]
    # A plain PUT is refused from its Content-Length, before a byte is read (the body is never sent).
    with socket.create_connection(("127.0.0.1", web.port), timeout=30) as connection:
        connection.sendall(
            f"PUT /api/upload HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\nAuthorization: Basic "
            f"{base64.b64encode(f':{PASSWORD}'.encode()).decode()}\r\nContent-Length: {slot_size + 1}\r\n"
            "Expect: 100-continue\r\n\r\n".encode())
        answer = connection.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 413"), answer
    assert Snapshot.take(device, client) == before
    assert client.status()["upload"] is None

    # Streamed without a length (chunked): a raw image that goes on past the slot's end is cut off at the limit,
    # and its job cancelled. The running system and the boot files are untouched.
    raw = rig.images["1.1.0"].read_bytes()

    def body() -> Iterator[bytes]:
        yield raw
        for _ in range((slot_size - len(raw)) // MIB + 2):
            yield bytes(MIB)

    streamed = client.request("PUT", "/api/upload", data=body())
    assert streamed.status_code == 413, streamed.text
    assert f"larger than {slot_size} bytes" in streamed.json()["error"]
    status = wait_idle(client)
    assert status["upload"]["result"]["error"] == "Cancelled"
    after = Snapshot.take(device, client)
    assert (after.boot_partition, after.booted_root, after.reboots) == (
        before.boot_partition, before.booted_root, before.reboots)
    assert slot_of(status, "a") == slot_of(client.status(), "a")
    assert slot_of(status, "b")["version"] != "1.1.0"


def test_a_web_user_without_the_polkit_rights_is_refused(rig: Rig, device: Device, service: ServiceProcess,
                                                          client: WebClient) -> None:
    """The page run as a user the rule does not name (its rights removed) gets polkit's refusal, and says so."""
    with WebProcess(rig.bus, rig.venv.python, rig.users.outsider) as unprivileged:
        page = WebClient(unprivileged)
        assert page.login().status_code == 200
        before = Snapshot.take(device, page)
        data = rig.images["1.1.0.gz"].read_bytes()
        refused = page.request("PUT", "/api/upload", data=data)
        assert refused.status_code == 403, refused.text
        assert "not allowed to install an image of your choosing" in refused.json()["error"]
        # tus: the upload is created; its job, asked for with the first bytes, is refused.
        tus = create_upload(page, len(data))
        assert tus.status_code == 201, tus.text
        first_bytes = patch(page, tus.headers["Location"], 0, data)
        assert first_bytes.status_code == 403, first_bytes.text
        assert "not allowed to install an image of your choosing" in first_bytes.json()["error"]
        assert page.request("HEAD", tus.headers["Location"], headers=TUS).status_code == 404
        reboot = page.request("POST", "/api/reboot", json={"mode": "trial"})
        assert reboot.status_code == 403, reboot.text
        assert "not allowed to reboot" in reboot.json()["error"]
        assert Snapshot.take(device, page) == before
        assert page.status()["upload"]["state"] == "ended"
