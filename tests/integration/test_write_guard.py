"""``ab-flasher write`` by hand on a device in a recovery layout (laid out by ``ab-flasher provision``, booted
through the firmware model): the recovery slot, the running slot and the committed primary are refused, each with
its own error and nothing written; the free system slot, and a disk that is not this device's, are written."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_ab_cycle import root_image
from tests.support.bus import REPO
from tests.support.serviceprocess import config_file_text
from tests.support.simpi import SimulatedPi

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]


@pytest.fixture
def pi(tmp_path: Path) -> Iterator[SimulatedPi]:
    """A/B + recovery, booted into update mode: recovery runs, a is the committed primary, b is free."""
    (tmp_path / "device").mkdir()
    with SimulatedPi(tmp_path / "device", "prefix", variant="ab+recovery") as device:
        device.updater().reboot("recovery")
        assert device.boot(tryboot=True) == "recovery"
        device.updater().boot_check()
        yield device


def write(pi: SimulatedPi, tmp_path: Path, image: Path, slot: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "ab-flasher.conf"
    config.write_text(config_file_text(pi.config))
    target = f"{pi.loop.device}p{pi.image.root(slot).number}"  # type: ignore[arg-type]
    return subprocess.run([sys.executable, "-m", "abflasher.cli", "write", "-q", "--config", str(config),
                           str(image), target], cwd=REPO, capture_output=True, text=True, timeout=240, check=False)


def test_the_slots_that_keep_the_device_bootable_are_refused(pi: SimulatedPi, tmp_path: Path) -> None:
    image = root_image(tmp_path, "1.1.0")
    before = {slot: pi.partition_sha(pi.image.root(slot).number) for slot in ("a", "recovery")}  # type: ignore[arg-type]

    recovery = write(pi, tmp_path, image, "recovery")
    assert recovery.returncode == 2, recovery.stderr  # InvalidArgument
    assert "is this device's recovery slot (recovery): ab-flasher never writes it" in recovery.stderr

    primary = write(pi, tmp_path, image, "a")
    assert primary.returncode == 4, primary.stderr  # Busy
    assert "slot a, the committed primary" in primary.stderr

    assert {slot: pi.partition_sha(pi.image.root(slot).number) for slot in before} == before  # type: ignore[arg-type]

    free = write(pi, tmp_path, image, "b")
    assert free.returncode == 0, free.stderr
    assert pi.slot_file("b", "/.ab_version") is not None


def test_another_disk_is_written(tmp_path: Path) -> None:
    image = root_image(tmp_path, "1.1.0")
    other = tmp_path / "card.img"
    other.write_bytes(b"\0" * (32 << 20))
    loop = subprocess.run(["losetup", "--find", "--show", str(other)], capture_output=True, text=True, timeout=60,
                          check=True).stdout.strip()
    try:
        done = subprocess.run([sys.executable, "-m", "abflasher.cli", "write", "-q", "--config",
                               str(tmp_path / "none.conf"), str(image), loop], cwd=REPO, capture_output=True,
                              text=True, timeout=240, check=False)
        assert done.returncode == 0, done.stderr
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=60, check=False)
