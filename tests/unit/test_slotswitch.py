"""The in-place slot-switch editors (abflasher/boot/slotswitch.py) and `FatVolume.write_in_place` on both back ends."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from abflasher import errors
from abflasher.boot import bootfiles, slotswitch
from abflasher.boot.fat import DirectoryVolume, MtoolsVolume
from abflasher.boot.fat_mtools import FatGeometry, parse_cluster_chain
from tests import pifirmware
from tests.support.writerecorder import WriteRecorder

SECTOR = 512


# --------------------------------------------------------------------------------------------------- config/tryboot


def test_os_prefix_changes_one_byte() -> None:
    text = "# c\n[pi4]\narm_boost=1\n[all]\nos_prefix=a/\nenable_uart=1\n"
    changed = slotswitch.set_os_prefix_in_place(text, "b/", "config.txt")
    assert changed == text.replace("os_prefix=a/", "os_prefix=b/")
    assert sum(x != y for x, y in zip(text, changed, strict=True)) == 1
    assert slotswitch.set_os_prefix_in_place(changed, "b/", "config.txt") == changed


@pytest.mark.parametrize(("text", "message"), [
    ("arm_64bit=1\n", "no os_prefix"),
    ("[pi4]\nos_prefix=a/\n", "no os_prefix"),
    ("os_prefix=slot_a/\n", "different length"),
])
def test_os_prefix_that_cannot_change_in_place_is_refused(text: str, message: str) -> None:
    with pytest.raises(slotswitch.SwitchFileError, match=message):
        slotswitch.set_os_prefix_in_place(text, "b/", "config.txt")


def test_own_tryboot_includes_config_and_is_one_sector() -> None:
    text = slotswitch.render_tryboot("a/")
    assert len(text.encode()) == SECTOR
    assert slotswitch.is_own_tryboot(text)
    assert not slotswitch.is_own_tryboot("os_prefix=a/\n")
    assert bootfiles.config_os_prefix(slotswitch.set_os_prefix_in_place(text, "b/", "tryboot.txt")) == "b/"
    watched = slotswitch.retarget_tryboot(text, "b/", ["dtparam=watchdog=on", "kernel_watchdog_timeout=60"])
    assert len(watched.encode()) == SECTOR
    assert "kernel_watchdog_timeout=60\n" in watched
    assert bootfiles.config_os_prefix(watched) == "b/"
    with pytest.raises(slotswitch.SwitchFileError, match="do not fit"):
        slotswitch.render_tryboot("a/", ["x" * 400])


def test_retargeting_a_migrated_tryboot_changes_its_first_sector_only() -> None:
    migrated = slotswitch.tryboot_in_place_of("os_prefix=a/\n" + "# image comment\n" * 100, "a/")
    assert migrated is not None
    retargeted = slotswitch.retarget_tryboot(migrated, "b/", ["kernel_watchdog_timeout=60"])
    assert len(retargeted) == len(migrated)
    assert retargeted[SECTOR:] == migrated[SECTOR:]
    assert bootfiles.config_os_prefix(retargeted) == "b/"
    # The old form (a copy of config.txt) keeps its form: only the prefix changes.
    old = "arm_64bit=1\nos_prefix=a/\n"
    assert slotswitch.retarget_tryboot(old, "b/", ["kernel_watchdog_timeout=60"]) == old.replace("a/", "b/")


OLD_COPIES = [
    # The copy form as ab-flasher 0.x wrote it (config.txt with the slot's os_prefix), and copies whose conditional
    # sections a cut could separate from their headers: [pi3] arm_64bit=0 applied on a Pi 4 asks for a kernel7l.img
    # that is not there.
    "# test\n[all]\narm_64bit=1\nenable_uart=1\nos_prefix=a/\n" + "# comment line of the image\n" * 40,
    "dtparam=audio=on\n" * 30 + "[pi3]\narm_64bit=0\n" * 40 + "[all]\nos_prefix=a/\n" + "dtoverlay=vc4-kms-v3d\n" * 20,
    "[pi3]\narm_64bit=0\n" + "# " + "y" * 600 + "\n[all]\nos_prefix=a/\n" + "[pi3]\narm_64bit=0\n" * 30,
]


@pytest.mark.parametrize("old", OLD_COPIES)
def test_turning_an_old_tryboot_into_the_own_form_boots_the_same_after_any_cut(tmp_path: Path, old: str) -> None:
    new = slotswitch.tryboot_in_place_of(old, "a/")
    assert new is not None
    assert len(new.encode()) == len(old.encode())
    assert slotswitch.is_own_tryboot(new)
    boot = tmp_path / "p1"
    for slot in ("a", "b"):
        (boot / slot).mkdir(parents=True)
        (boot / slot / "kernel8.img").write_text(f"kernel {slot}\n")
        (boot / slot / "kernel7.img").write_text(f"32-bit kernel {slot} for a Pi 3\n")
        (boot / slot / "cmdline.txt").write_text(f"root=PARTUUID=1234abcd-0{2 if slot == 'a' else 3}\n")
    (boot / "start4.elf").write_text("firmware\n")
    (boot / "config.txt").write_text(old)
    old_bytes, new_bytes = old.encode(), new.encode()
    expected = {}
    for model in ("pi3", "pi4", "pi5"):
        (boot / "tryboot.txt").write_bytes(old_bytes)
        expected[model] = pifirmware.decide_boot({1: boot}, tryboot=True, model=model).kernel
        assert expected[model].startswith("a/")
    sectors = (len(old_bytes) + SECTOR - 1) // SECTOR
    for written in range(sectors + 1):
        mixed = new_bytes[:written * SECTOR] + old_bytes[written * SECTOR:]
        (boot / "tryboot.txt").write_bytes(mixed)
        for model, kernel in expected.items():
            decision = pifirmware.decide_boot({1: boot}, tryboot=True, model=model)
            assert (decision.os_prefix, decision.kernel) == ("a/", kernel), (written, model)


def test_an_old_tryboot_too_small_for_the_own_form_is_left_alone() -> None:
    assert slotswitch.tryboot_in_place_of("os_prefix=a/\n", "a/") is None


# --------------------------------------------------------------------------------------------------- autoboot.txt


CANONICAL = "[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n"


@pytest.mark.parametrize(("primary", "trial"), [(2, 2), (3, 3), (2, 3), (3, 2)])
def test_autoboot_in_place(primary: int, trial: int) -> None:
    changed = slotswitch.set_autoboot_in_place(CANONICAL, primary, trial)
    assert len(changed) == len(CANONICAL)
    parsed = bootfiles.parse_autoboot(changed)
    assert (parsed.boot_partition, parsed.tryboot_partition, parsed.tryboot_a_b) == (primary, trial, True)


def test_autoboot_keeps_comments_and_crlf() -> None:
    text = "# mine\r\n[all]\r\ntryboot_a_b=1\r\nboot_partition = 2\r\n[tryboot]\r\nboot_partition=3\r\n"
    assert slotswitch.set_autoboot_in_place(text, 3, 3) == text.replace("= 2", "= 3")


@pytest.mark.parametrize(("text", "message"), [
    ("[all]\ntryboot_a_b=1\nboot_partition=2\n", "under \\[tryboot\\]"),
    ("[all]\nboot_partition=2\n[tryboot]\nboot_partition=3\n", "tryboot_a_b"),
    ("[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n", "digits"),
])
def test_autoboot_that_cannot_switch_in_place_is_refused(text: str, message: str) -> None:
    with pytest.raises(slotswitch.SwitchFileError, match=message):
        slotswitch.set_autoboot_in_place(text, 2, 10 if "digits" in message else 3)


# --------------------------------------------------------------------------------------------------- write_in_place


def _fat_image(path: Path) -> MtoolsVolume:
    subprocess.run(["mkfs.vfat", "-C", "-F", "16", str(path), "16384"], check=True, capture_output=True, timeout=60,
                   env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    return MtoolsVolume(str(path))


def test_mtools_in_place_writes_only_the_changed_sectors_of_a_fragmented_file(tmp_path: Path) -> None:
    image = tmp_path / "fat.img"
    volume = _fat_image(image)
    volume.write_atomic("/spacer.bin", b"s" * 3000)
    old = os.urandom(9000)
    volume.write_atomic("/x/data.bin", old)
    subprocess.run(["mdel", "-i", str(image), "::/spacer.bin"], check=True, capture_output=True, timeout=60,
                   env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    volume.write_atomic("/later.bin", b"l" * 5000)
    before = image.read_bytes()
    new = bytearray(old)
    new[10] ^= 1
    new[8999] ^= 1
    assert volume.write_in_place("/X/DATA.BIN", bytes(new)) == 2
    assert volume.read("/x/data.bin") == bytes(new)
    after = image.read_bytes()
    changed = [i for i in range(0, len(after), SECTOR) if before[i:i + SECTOR] != after[i:i + SECTOR]]
    assert len(changed) == 2, "only the two data sectors: no FAT, no directory"
    assert volume.write_in_place("/x/data.bin", bytes(new)) == 0
    assert image.read_bytes() == after


def test_geometry_and_cluster_runs(tmp_path: Path) -> None:
    image = tmp_path / "fat.img"
    _fat_image(image)
    geometry = FatGeometry.from_boot_sector(image.read_bytes()[:SECTOR], "test")
    assert geometry.cluster_bytes % SECTOR == 0
    assert parse_cluster_chain("::/a <2> <4-6> <9>") == [2, 4, 5, 6, 9]
    with pytest.raises(errors.DeviceError, match="no FAT boot sector"):
        FatGeometry.from_boot_sector(bytes(SECTOR), "test")


@pytest.mark.parametrize("kind", ["directory", "mtools"])
def test_in_place_refuses_what_it_cannot_do_and_changes_nothing(tmp_path: Path, kind: str) -> None:
    if kind == "mtools":
        volume: DirectoryVolume | MtoolsVolume = _fat_image(tmp_path / "fat.img")
    else:
        (tmp_path / "dir").mkdir()
        volume = DirectoryVolume(tmp_path / "dir")
    volume.write_atomic("/config.txt", b"os_prefix=a/\n")
    volume.makedirs("/a")
    with pytest.raises(errors.DeviceError, match="cannot be rewritten in place"):
        volume.write_in_place("/config.txt", b"os_prefix=ab/\n")
    with pytest.raises(errors.DeviceError, match="no file"):
        volume.write_in_place("/tryboot.txt", b"x")
    with pytest.raises(errors.DeviceError, match="no file"):
        volume.write_in_place("/a", b"x")
    assert volume.read("/config.txt") == b"os_prefix=a/\n"
    assert volume.write_in_place("/CONFIG.TXT", b"os_prefix=b/\n") == 1
    assert volume.read("/config.txt") == b"os_prefix=b/\n"


def test_directory_in_place_is_one_sector_write_per_changed_sector_and_nothing_else(tmp_path: Path) -> None:
    """On a mounted FAT the kernel writes back what the file's pages hold: one aligned sector per change, each
    flushed before the next, and no rename, truncation or new file that would touch the FAT or the directory."""
    root = tmp_path / "boot"
    root.mkdir()
    volume = DirectoryVolume(root)
    old = bytes(range(256)) * 12
    volume.write_atomic("/tryboot.txt", old)
    new = bytearray(old)
    new[5] ^= 0xFF
    new[2000] ^= 0xFF
    with WriteRecorder(tmp_path / "trace") as recorder:
        assert volume.write_in_place("/tryboot.txt", bytes(new)) == 2
    writes = recorder.writes()
    assert [(w.path, w.offset, len(w.data)) for w in writes] == [
        (str(root / "tryboot.txt"), 0, SECTOR), (str(root / "tryboot.txt"), 3 * SECTOR, SECTOR)]
    assert sorted(path.name for path in root.iterdir()) == ["tryboot.txt"]
