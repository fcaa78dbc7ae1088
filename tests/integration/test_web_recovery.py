"""The upload page on the recovery layouts, against the real service and the real engine on a disk laid out by
``ab-flasher provision`` and booted through the firmware model (tests/support/simpi.py), in headless Chromium:

- in update mode (main + recovery, the recovery system booted): the banner, the target the engine writes (main),
  an upload through the page that promotes recovery first and arms main's trial, the slot table, and the reboot
  into the new system (a tryboot);
- on the normal system: "enter update mode" calls Reboot('recovery'), which arms the recovery slot's tryboot;
- a reboot whose command makes the service stop before it replies still answers success;
- a CRC-damaged image: the page says the target slot was overwritten and is incomplete, and what to do; boot files,
  the other slots and the recovery slot are byte-identical to before;
- with trusted keys configured, a bundle made by the publisher installs through the page and a bare image is
  refused with the signature error, nothing armed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions

from abflasher.trust.publish import Published
from tests.integration import test_signed_service, test_web_browser
from tests.integration.test_signed_service import COMPATIBLE
from tests.integration.test_web_browser import (
    PHONE,
    element,
    fits_the_viewport,
    log_in,
    row_of,
    screenshot,
    wait_for,
)
from tests.support.pidisk import Variant
from tests.support.service_rig import Device, Rig, simulated_device
from tests.support.serviceprocess import ServiceProcess, config_file_text
from tests.support.signing import Key, write_allowed_signers
from tests.support.simpi import SimulatedPi
from tests.support.webrig import WebClient, WebProcess

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

#: The headless Chromium and the screenshots' folder of the page's browser tests; the owner's key and a release
#: made by the publisher (ab-flasher bundle) of the signed-updates tests.
browser = test_web_browser.browser
artifacts = test_web_browser.artifacts
owner = test_signed_service.owner
release = test_signed_service.release


def booted_into_recovery(pi: SimulatedPi) -> None:
    """Update mode as the companion enters it: Reboot('recovery') armed a tryboot of recovery, the device reset."""
    pi.updater().reboot("recovery")
    assert pi.boot(tryboot=True) == "recovery"
    pi.updater().boot_check()  # ab-flasher-boot-check.service


def partition_digests(pi: SimulatedPi) -> dict[int, str]:
    return {part.number: pi.partition_sha(part.number) for part in pi.image.partitions if part.role != "extended"}


@contextlib.contextmanager
def serving(rig: Rig, device: Device, web_user: str) -> Iterator[WebProcess]:
    """The real service and the page (as the web user) on ``device``."""
    with ServiceProcess([rig.venv.daemon, "--config", device.config_path], rig.bus), \
            WebProcess(rig.bus, rig.venv.python, web_user) as process:
        yield process


@pytest.fixture
def device(request: pytest.FixtureRequest, rig: Rig, tmp_path: Path) -> Iterator[Device]:
    variant: Variant = request.param
    yield from simulated_device(rig, tmp_path, variant=variant)


@pytest.fixture
def web(rig: Rig, web_user: str, device: Device) -> Iterator[WebProcess]:
    with serving(rig, device, web_user) as process:
        yield process


def upload_through_the_page(driver: WebDriver, file: Path) -> None:
    element(driver, "file-input").send_keys(str(file))
    wait_for(driver, lambda d: file.name in element(d, "file-name").text, "the chosen file's name")
    wait_for(driver, lambda d: element(d, "upload-button").is_enabled(), "the upload button")
    element(driver, "upload-button").click()
    wait_for(driver, lambda d: element(d, "result").is_displayed(), "the result")


def confirm(driver: WebDriver) -> None:
    wait_for(driver, expected_conditions.alert_is_present(), "the confirmation")
    driver.switch_to.alert.accept()
    wait_for(driver, lambda d: "rebooting" in element(d, "service-state").text, "the rebooting notice")


# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["main+recovery"], indirect=True)
def test_in_update_mode_the_page_installs_main(rig: Rig, device: Device, web_user: str, browser: WebDriver,
                                               artifacts: Path) -> None:
    pi = device.pi
    booted_into_recovery(pi)
    data_before = pi.partition_sha(pi.data_partition())
    recovery_before = pi.partition_sha(pi.image.root("recovery").number)  # type: ignore[arg-type]
    reboots_before = len(pi.reboots())
    with serving(rig, device, web_user) as web:
        log_in(browser, web)
        assert element(browser, "recovery-banner").is_displayed()
        assert row_of(browser, "recovery")[:6] == ["recovery", "recovery", "0.9.0-recovery", "yes", "", "good"]
        assert row_of(browser, "main")[:6] == ["main", "system", "1.0.0", "", "yes", "good"]
        # The target the page names is the one the engine writes: main, from the recovery system.
        assert "slot main" in element(browser, "target-info").text
        assert not element(browser, "enter-update-mode").is_displayed(), "already in update mode"

        upload_through_the_page(browser, rig.images["1.1.0.gz"])
        assert element(browser, "result-title").text == "Installed", element(browser, "result-message").text
        wait_for(browser, lambda d: row_of(d, "main")[2] == "1.1.0", "version 1.1.0 in the slot table")
        # Recovery was promoted to the committed primary before main was written; main is armed for its trial.
        assert row_of(browser, "recovery")[4] == "yes"
        assert row_of(browser, "main")[4:6] == ["", "trial"]
        assert pi.slot_for(pi.firmware(tryboot=False)) == "recovery", "a power cut now boots recovery"
        assert pi.slot_for(pi.firmware(tryboot=True)) == "main"
        screenshot(browser, artifacts, "08-desktop-update-mode-installed")
        browser.set_window_size(*PHONE)
        assert fits_the_viewport(browser)
        screenshot(browser, artifacts, "09-phone-update-mode-installed")

        element(browser, "reboot-new").click()
        confirm(browser)
        assert pi.reboots()[reboots_before:] == [f"{pi.workdir / 'fake-reboot'} 0 tryboot"]
    assert pi.partition_sha(pi.image.root("recovery").number) == recovery_before  # type: ignore[arg-type]
    assert pi.partition_sha(pi.data_partition()) == data_before
    assert pi.boot(tryboot=True) == "main"


@pytest.mark.parametrize("device", ["main+recovery"], indirect=True)
def test_on_the_normal_system_enter_update_mode_arms_recovery(device: Device, web: WebProcess,
                                                              browser: WebDriver) -> None:
    pi = device.pi
    log_in(browser, web)
    assert not element(browser, "recovery-banner").is_displayed()
    # main is the only system slot and it runs: the page says why there is no target, as the engine would.
    assert "Reboot into update mode" in element(browser, "target-info").text
    button = element(browser, "enter-update-mode")
    assert button.is_displayed()
    button.click()
    confirm(browser)
    assert pi.reboots() == [f"{pi.workdir / 'fake-reboot'} 0 tryboot"]
    assert pi.slot_for(pi.firmware(tryboot=True)) == "recovery", "Reboot('recovery') armed recovery's tryboot"
    assert pi.slot_for(pi.firmware(tryboot=False)) == "main", "once: a plain reset still boots main"


@pytest.mark.parametrize("device", ["main+recovery"], indirect=True)
@pytest.mark.parametrize("mode", ["recovery", "normal"])
def test_a_reboot_that_stops_the_service_answers_success(rig: Rig, device: Device, web: WebProcess,
                                                         mode: str) -> None:
    """systemd stops the page and the service as soon as the reboot command queued the reboot, before the replies
    were sent: the page must still report that the reboot was accepted (it was: the tryboot is armed, the reboot
    runs), not that the service could not be reached (503)."""
    pi = device.pi
    fake_reboot = pi.workdir / "fake-reboot"
    # As systemd does: the reboot command returns at once; the page (ordered after the service) gets SIGTERM, then
    # the service (the command's parent).
    fake_reboot.write_text(f'#!/bin/sh\necho "$0 $*" >> {pi.reboot_log}\n'
                           f'kill -TERM {web.server_pid}\nkill -TERM $PPID\n')
    client = WebClient(web)
    assert client.login().status_code == 200
    response = client.request("POST", "/api/reboot", json={"mode": mode}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json() == {"rebooting": mode}
    assert len(pi.reboots()) == 1
    if mode == "recovery":
        assert pi.slot_for(pi.firmware(tryboot=True)) == "recovery"


@pytest.mark.parametrize("device", ["ab+recovery"], indirect=True)
def test_a_damaged_image_leaves_an_incomplete_target_and_everything_else_as_before(
        rig: Rig, device: Device, web: WebProcess, browser: WebDriver, *, tmp_path: Path,
        artifacts: Path) -> None:
    data = bytearray(rig.images["1.1.0.gz"].read_bytes())
    data[-8] ^= 0xFF  # the gzip CRC-32: the damage shows only after the whole image was written into slot b
    corrupt = tmp_path / "root-1.1.0.img.gz"
    corrupt.write_bytes(bytes(data))
    pi = device.pi
    target = pi.image.root("b").number  # type: ignore[arg-type]
    before = partition_digests(pi)
    boot_files_before = pi.boot_config_files()

    log_in(browser, web)
    assert "slot b" in element(browser, "target-info").text
    upload_through_the_page(browser, corrupt)
    assert element(browser, "result-title").text == "Not installed"
    message = element(browser, "result-message").text
    assert "CRC-32" in message or "damaged" in message, message  # the Python inflater's words, or igzip's
    wait_for(browser, lambda d: "incomplete" in element(d, "result-next").text, "what happened to slot b")
    next_step = element(browser, "result-next").text
    assert "written into slot b" in next_step, next_step
    assert "upload it again" in next_step, next_step
    assert row_of(browser, "b")[5] == "incomplete"
    screenshot(browser, artifacts, "10-desktop-damaged-incomplete")

    after = partition_digests(pi)
    assert {n: d for n, d in after.items() if n != target} == {n: d for n, d in before.items() if n != target}
    assert pi.boot_config_files() == boot_files_before
    assert pi.reboots() == []
    assert pi.slot_for(pi.firmware(tryboot=True)) == "a", "nothing armed"


@pytest.fixture
def signed_device(rig: Rig, tmp_path: Path, owner: Key) -> Iterator[Device]:
    """Main + recovery in update mode, with trusted keys configured (only signed bundles install)."""
    for device in simulated_device(rig, tmp_path, variant="main+recovery"):
        allowed = write_allowed_signers(tmp_path / "allowed_signers", owner.allowed_line())
        allowed.chmod(0o644)
        device.pi.config = dataclasses.replace(device.pi.config, trusted_keys=str(allowed), compatible=COMPATIBLE)
        device.config_path.write_text(config_file_text(device.pi.config))
        booted_into_recovery(device.pi)
        yield device


def test_with_trusted_keys_a_bundle_installs_through_the_page_and_a_bare_image_is_refused(
        rig: Rig, signed_device: Device, web_user: str, browser: WebDriver, release: Published) -> None:
    pi = signed_device.pi
    with serving(rig, signed_device, web_user) as web:
        log_in(browser, web)
        boot_files_before = pi.boot_config_files()
        main_before = pi.partition_sha(pi.image.root("main").number)  # type: ignore[arg-type]
        bare = release.artifacts[0]
        assert bare.name.endswith(".img.gz")
        upload_through_the_page(browser, bare)
        assert element(browser, "result-title").text == "Not installed"
        assert "not a signed bundle" in element(browser, "result-message").text
        assert "signed by a key it trusts" in element(browser, "result-next").text
        assert pi.boot_config_files() == boot_files_before, "nothing armed"
        assert pi.partition_sha(pi.image.root("main").number) == main_before  # type: ignore[arg-type]
        assert row_of(browser, "main")[4:6] == ["yes", "good"]

        assert release.bundle.name.endswith(".tar")
        upload_through_the_page(browser, release.bundle)
        assert element(browser, "result-title").text == "Installed", element(browser, "result-message").text
        wait_for(browser, lambda d: row_of(d, "main")[2] == "1.1.0", "version 1.1.0 in the slot table")
        assert row_of(browser, "main")[5] == "trial"
        assert pi.slot_for(pi.firmware(tryboot=True)) == "main"
