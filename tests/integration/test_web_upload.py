"""The upload page against real components: ab-flasher-web as a real unprivileged user (granted the page's rights
by the shipped polkit rule), the real service as root on the rig's private system bus with the real polkitd, and the
real engine writing a simulated Pi's disk on a loop device. Uploads as a script (curl) and as the page's tus client
would make them; refusals; resume after a dropped connection; the idle timeout."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.service_rig import Device, Rig, service_rig, simulated_device, slot_of
from tests.support.serviceprocess import ServiceProcess
from tests.support.webrig import PASSWORD, WebClient, WebProcess, installed_web_rules, system_user

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

IDLE_TIMEOUT = 4.0


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    yield from service_rig()


@pytest.fixture(scope="module")
def web_user(rig: Rig) -> Iterator[str]:
    with system_user() as user, installed_web_rules(user):
        yield user


@pytest.fixture
def device(rig: Rig, tmp_path: Path) -> Iterator[Device]:
    yield from simulated_device(rig, tmp_path, upload_idle_timeout=IDLE_TIMEOUT)


@pytest.fixture
def service(rig: Rig, device: Device) -> Iterator[ServiceProcess]:
    with ServiceProcess([rig.venv.daemon, "--config", device.config_path], rig.bus) as process:
        yield process


@pytest.fixture
def web(rig: Rig, web_user: str, service: ServiceProcess) -> Iterator[WebProcess]:
    with WebProcess(rig, web_user) as process:
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
