"""The upload page in a real browser: headless Chromium (Debian's chromium and chromium-driver, driven by
python3-selenium) against ab-flasher-web run as a real unprivileged user, the real service on the rig's private
bus and the real engine writing a simulated Pi's disk on a loop device.

Screenshots (desktop and phone-sized) are kept in test-artifacts/web/ of the checkout (gitignored); the test
prints where.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import re
import shutil
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service as ChromeDriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from abflasher.image.child_decoder import igzip_path
from tests.support.bus import REPO, DBusDaemon, world_readable_tempdir
from tests.support.polkit import DbusmockPolkit
from tests.support.service_rig import Device, Rig, simulated_device
from tests.support.serviceprocess import ServiceProcess
from tests.support.webrig import PASSWORD, WebClient, WebProcess

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = REPO / "test-artifacts" / "web"
DESKTOP = (1280, 900)
PHONE = (390, 844)
WAIT = 120.0


@pytest.fixture
def device(rig: Rig, tmp_path: Path) -> Iterator[Device]:
    yield from simulated_device(rig, tmp_path)


@pytest.fixture
def web(rig: Rig, web_user: str, device: Device) -> Iterator[WebProcess]:
    with ServiceProcess([rig.venv.daemon, "--config", device.config_path], rig.bus), \
            WebProcess(rig.bus, rig.venv.python, web_user) as process:
        yield process


@pytest.fixture
def fake_device(request: pytest.FixtureRequest) -> Iterator[WebProcess]:
    """The page against the real service process with a fake engine (tests/support/fakeupdater.py) whose slots
    include a recovery slot (``request.param``: present, or booted): the recovery layouts without their disk."""
    workdir = world_readable_tempdir("abft-fake-")
    try:
        with DBusDaemon.permissive(workdir) as bus:
            polkit = DbusmockPolkit(bus.address, workdir)
            try:
                asyncio.run(polkit.set_allowed(["org.abflasher.update", "org.abflasher.update-from-source",
                                                "org.abflasher.manage-boot"]))
                fake = [sys.executable, "-m", "tests.support.fakeupdater", "serve-fake", "--recovery", request.param]
                with ServiceProcess(fake, bus, cwd=REPO), WebProcess(bus, sys.executable) as web:
                    yield web
            finally:
                polkit.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={DESKTOP[0]},{DESKTOP[1]}", "--disable-extensions", "--no-first-run"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=ChromeDriverService(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots of the upload page: {ARTIFACTS}")
    return ARTIFACTS


# ---------------------------------------------------------------------------------------------------------------------


def wait_for(driver: WebDriver, condition: Any, what: str, timeout: float = WAIT) -> Any:
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)
    except TimeoutException:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; page:\n"
                             f"{driver.find_element(By.TAG_NAME, 'body').text}") from None


def element(driver: WebDriver, element_id: str) -> Any:
    return driver.find_element(By.ID, element_id)


def log_in(driver: WebDriver, web: WebProcess) -> None:
    driver.set_window_size(*DESKTOP)
    driver.get(web.url("/"))
    wait_for(driver, expected_conditions.visibility_of_element_located((By.ID, "login-password")), "the login form")
    element(driver, "login-password").send_keys("wrong")
    element(driver, "login-button").click()
    wait_for(driver, lambda d: "wrong password" in element(d, "login-error").text, "the wrong-password message")
    element(driver, "login-password").clear()
    element(driver, "login-password").send_keys(PASSWORD)
    element(driver, "login-button").click()
    wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#slots tbody tr")) >= 2, "the slot table")


def slot_rows(driver: WebDriver) -> list[list[str]]:
    return [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
            for row in driver.find_elements(By.CSS_SELECTOR, "#slots tbody tr")]


def row_of(driver: WebDriver, slot: str) -> list[str]:
    return next(row for row in slot_rows(driver) if row[0] == slot)


# The page's progress as the user saw it: every value the bars and the stage label took, recorded in the page.
_RECORD_PROGRESS = """
window.__seen = [];
const note = () => window.__seen.push([document.getElementById("upload-progress").value,
    document.getElementById("write-stage").textContent, document.getElementById("write-progress").value]);
const observer = new MutationObserver(note);
for (const id of ["upload-percent", "write-stage", "write-percent"])
    observer.observe(document.getElementById(id), {childList: true, characterData: true, subtree: true});
"""


def screenshot(driver: WebDriver, directory: Path, name: str) -> Path:
    """The whole page at the window's width (the window grows to the page's height for the picture)."""
    width, height = driver.get_window_size()["width"], driver.get_window_size()["height"]
    page_height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(width, max(height, page_height + 140))
    path = directory / f"{name}.png"
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.set_window_size(width, height)
    assert path.stat().st_size > 0
    return path


def fits_the_viewport(driver: WebDriver) -> bool:
    """Nothing wider than the window, the slot table included (it would scroll sideways in its box)."""
    return bool(driver.execute_script(
        "const table = document.getElementById('slots');"
        "return document.documentElement.scrollWidth <= window.innerWidth"
        " && table.scrollWidth <= table.parentElement.clientWidth"))


def test_upload_through_the_page_installs_and_shows_progress(
        rig: Rig, device: Device, web: WebProcess, browser: WebDriver, *, artifacts: Path, tmp_path: Path) -> None:
    log_in(browser, web)
    assert row_of(browser, "a")[:6] == ["a", "system", "1.0.0", "yes", "yes", "good"]
    assert not element(browser, "recovery-banner").is_displayed()
    # Update mode needs a recovery slot; this A/B device has none, so the page does not offer it.
    assert not element(browser, "enter-update-mode").is_displayed()
    screenshot(browser, artifacts, "01-desktop-logged-in")

    image = rig.images["1.1.0.gz"]
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    checksum_file = tmp_path / "root-1.1.0.img.gz.sha256"
    checksum_file.write_text(f"{'0' * 64}  other.img.gz\n{digest}  {image.name}\n")
    element(browser, "file-input").send_keys(str(image))
    wait_for(browser, lambda d: image.name in element(d, "file-name").text, "the chosen file's name")
    element(browser, "sha256-file").send_keys(str(checksum_file))
    wait_for(browser, lambda d: element(d, "sha256-input").get_attribute("value") == digest,
             "the checksum read from the .sha256 file")
    browser.execute_script(_RECORD_PROGRESS)
    element(browser, "upload-button").click()

    wait_for(browser, lambda d: element(d, "result").is_displayed(), "the result")
    assert element(browser, "result-title").text == "Installed", element(browser, "result-message").text
    assert "1.1.0" in element(browser, "result-message").text
    assert "reboot into the new system" in element(browser, "result-next").text.lower()
    seen: list[list[Any]] = browser.execute_script("return window.__seen")
    uploads = [int(entry[0]) for entry in seen]
    assert uploads, seen
    assert uploads[-1] == 100, seen
    assert uploads == sorted(uploads), seen
    stages = {entry[1] for entry in seen}
    assert {"Writing", "Verifying"} <= stages, seen
    assert element(browser, "upload-progress").get_attribute("value") == "100"
    assert element(browser, "write-progress").get_attribute("value") == "100"
    assert element(browser, "write-percent").text == "100 %"
    wait_for(browser, lambda d: row_of(d, "b")[2] == "1.1.0", "version 1.1.0 in the slot table")
    assert element(browser, "reboot-new").is_displayed()
    screenshot(browser, artifacts, "02-desktop-installed")
    browser.set_window_size(*PHONE)
    assert fits_the_viewport(browser), "the page is wider than a phone's screen"
    screenshot(browser, artifacts, "03-phone-installed")

    # The next step: reboot into the new system (the simulated Pi records the tryboot reboot).
    element(browser, "reboot-new").click()
    wait_for(browser, expected_conditions.alert_is_present(), "the confirmation")
    browser.switch_to.alert.accept()
    wait_for(browser, lambda d: "rebooting" in element(d, "service-state").text, "the rebooting notice")
    assert any("tryboot" in line for line in device.pi.reboots()), device.pi.reboots()


def _not_an_image(data: bytearray) -> str:
    data[:] = b"these are somebody's notes, chosen by mistake\n" * 2000  # refused before the job starts
    return "unknown image format"


def _damaged_trailer(data: bytearray) -> str:
    data[-8] ^= 0xFF  # the CRC-32: the whole image is written before the damage shows
    # igzip (Debian's isal, the installed inflater) reports the damage without naming the CRC; zlib names it.
    return "corrupt gzip data" if igzip_path() else "CRC-32"


@pytest.mark.parametrize("damage", [_not_an_image, _damaged_trailer], ids=["not-an-image", "crc"])
def test_a_corrupt_image_is_refused_and_changes_nothing(
        rig: Rig, device: Device, web: WebProcess, browser: WebDriver, *, artifacts: Path, tmp_path: Path,
        damage: Any) -> None:
    data = bytearray(rig.images["1.1.0.gz"].read_bytes())
    expected_error = damage(data)
    corrupt = tmp_path / "corrupt-1.1.0.img.gz"
    corrupt.write_bytes(bytes(data))
    with pytest.raises((OSError, EOFError, zlib.error)):
        gzip.decompress(bytes(data))
    state_after = "idle" if damage is _not_an_image else "failed"

    log_in(browser, web)
    client = WebClient(web)
    assert client.login().status_code == 200
    rows_before = slot_rows(browser)
    api_before = client.status()["slots"]
    pi = device.pi
    boot_before, root_before = pi.partition_sha(1), pi.partition_sha(pi.image.root("a").number)

    element(browser, "file-input").send_keys(str(corrupt))
    wait_for(browser, lambda d: not element(d, "upload-button").get_attribute("disabled"), "the upload button")
    element(browser, "upload-button").click()
    wait_for(browser, lambda d: element(d, "result").is_displayed(), "the result")
    assert element(browser, "result-title").text == "Not installed"
    message = element(browser, "result-message").text
    assert re.search(expected_error, message), message
    if damage is _not_an_image:
        assert "Nothing was changed on the running system" in element(browser, "result-next").text
    else:
        wait_for(browser, lambda d: "marked incomplete" in element(d, "result-next").text, "what happened to slot b")
        assert "written into slot b" in element(browser, "result-next").text
    wait_for(browser, lambda d: f"Service: {state_after}" in element(d, "service-state").text,
             f"the service's state: {state_after}")
    name = damage.__name__.strip("_").replace("_", "-")
    screenshot(browser, artifacts, f"05-desktop-{name}")
    browser.set_window_size(*PHONE)
    assert fits_the_viewport(browser), browser.execute_script(
        "const t = document.getElementById('slots'); return [document.documentElement.scrollWidth, "
        "window.innerWidth, t.scrollWidth, t.parentElement.clientWidth]")
    screenshot(browser, artifacts, f"06-phone-{name}")

    # What boots and what runs: every byte as before, and no reboot asked for.
    assert pi.partition_sha(1) == boot_before
    assert pi.partition_sha(pi.image.root("a").number) == root_before
    assert pi.reboots() == []
    rows_after = slot_rows(browser)
    if damage is _not_an_image:
        assert rows_after == rows_before
        assert client.status()["slots"] == api_before
    else:
        # The image was streamed into slot b before its end showed the damage: b is honestly marked incomplete
        # (never bootable); the rest of the table is as before.
        assert rows_after[0] == rows_before[0]
        assert rows_after[1] == [*rows_before[1][:5], "incomplete"]


@pytest.mark.parametrize("fake_device", ["booted"], indirect=True)
def test_on_the_recovery_system_a_banner_says_so(fake_device: WebProcess, browser: WebDriver,
                                                 artifacts: Path) -> None:
    log_in(browser, fake_device)
    banner = element(browser, "recovery-banner")
    assert banner.is_displayed()
    assert "Update mode" in banner.text
    assert row_of(browser, "recovery")[:6] == ["recovery", "recovery", "1.0-recovery", "yes", "yes", "good"]
    assert "slot a" in element(browser, "target-info").text, "from recovery the upload goes into the main slot"
    assert not element(browser, "enter-update-mode").is_displayed(), "already in update mode"
    browser.set_window_size(*PHONE)
    assert fits_the_viewport(browser)
    screenshot(browser, artifacts, "07-phone-recovery-banner")


@pytest.mark.parametrize("fake_device", ["present"], indirect=True)
def test_a_device_with_a_recovery_slot_offers_update_mode(fake_device: WebProcess, browser: WebDriver) -> None:
    log_in(browser, fake_device)
    assert not element(browser, "recovery-banner").is_displayed()
    # A file dropped on the drop zone is chosen like one picked with the file input.
    browser.execute_script(
        "const data = new DataTransfer();"
        "data.items.add(new File([new Uint8Array(2048)], 'dropped.img.gz'));"
        "document.getElementById('drop-zone').dispatchEvent(new DragEvent('drop', {dataTransfer: data}));")
    wait_for(browser, lambda d: "dropped.img.gz (2.0 kB)" in element(d, "file-name").text, "the dropped file")
    assert element(browser, "upload-button").is_enabled()
    button = element(browser, "enter-update-mode")
    assert button.is_displayed()
    button.click()
    wait_for(browser, expected_conditions.alert_is_present(), "the confirmation")
    assert "update mode" in browser.switch_to.alert.text
    browser.switch_to.alert.accept()
    wait_for(browser, lambda d: "rebooting" in element(d, "service-state").text, "the rebooting notice")
    assert "reboot (recovery) requested" in fake_device.log_text()
