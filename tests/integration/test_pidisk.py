"""Simulated Pi disk images (tests/support/pidisk.py) and the firmware model reading them through mtools/sfdisk.

No root needed: everything works on image files.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.pifirmware import (
    ImageDisk,
    KernelNotFound,
    NoBootablePartition,
    PiDevice,
    booted_root_partition,
    decide_boot,
    read_mbr_table,
)
from tests.support.pidisk import (
    MIB,
    build_pi_disk,
    build_root_image,
    ext4_read,
    fat_delete,
    fat_exists,
    fat_list,
    fat_read,
    fat_write,
    prefix_config_text,
    read_ab_version,
)

REQUIRED_TOOLS = ("sfdisk", "mkfs.vfat", "mkfs.ext4", "debugfs", "mcopy", "mdir", "mmd", "mdel")

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(any(shutil.which(tool) is None for tool in REQUIRED_TOOLS),
                       reason="needs fdisk, dosfstools, e2fsprogs and mtools (apt-get install ...)"),
]


def root_number(image: ImageDisk, *, tryboot: bool) -> int:
    return booted_root_partition(decide_boot(image, tryboot=tryboot), image.table())


def test_prefix_disk_boots_slot_a_without_flag(tmp_path: Path) -> None:
    disk = build_pi_disk(tmp_path / "disk.img", "prefix", version_a="1.0.0", version_b="1.1.0")
    decision = decide_boot(ImageDisk(disk.path))
    assert (decision.partition, decision.config_file, decision.os_prefix) == (1, "config.txt", "a/")
    assert (decision.kernel, decision.cmdline_file) == ("a/kernel8.img", "a/cmdline.txt")
    assert decision.root == "PARTUUID=1234abcd-02"
    assert booted_root_partition(decision, read_mbr_table(disk.path)) == disk.root("a").number == 2
    assert read_ab_version(disk.path, offset=disk.root("a").offset) == "1.0.0"


def test_prefix_disk_trial_boots_slot_b_with_tryboot_txt_and_flag(tmp_path: Path) -> None:
    disk = build_pi_disk(tmp_path / "disk.img", "prefix", version_a="1.0.0", version_b="1.1.0")
    boot = disk.by_role("boot")
    fat_write(disk.path, boot.offset, "tryboot.txt", prefix_config_text("b"))
    image = ImageDisk(disk.path)
    decision = decide_boot(image, tryboot=True)
    assert (decision.config_file, decision.os_prefix, decision.kernel) == ("tryboot.txt", "b/", "b/kernel8.img")
    assert booted_root_partition(decision, image.table()) == 3
    assert read_ab_version(disk.path, offset=disk.root("b").offset) == "1.1.0"
    # The flag is one-shot: the next boot is slot A again.
    assert root_number(image, tryboot=False) == 2


def test_autoboot_disk_boots_p2_then_trial_p3(tmp_path: Path) -> None:
    disk = build_pi_disk(tmp_path / "disk.img", "autoboot", version_a="1.0.0", version_b="2.0.0",
                         switch_files="legacy")
    assert fat_list(disk.path, disk.by_role("autoboot").offset) == ["autoboot.txt"]
    image = ImageDisk(disk.path)
    normal = decide_boot(image)
    assert (normal.partition, normal.config_file, normal.kernel, normal.root) == (
        2, "config.txt", "kernel8.img", "PARTUUID=1234abcd-05")
    assert booted_root_partition(normal, image.table()) == 5
    trial = decide_boot(image, tryboot=True)
    assert (trial.partition, trial.config_file, trial.root) == (3, "config.txt", "PARTUUID=1234abcd-06")
    assert booted_root_partition(trial, image.table()) == 6
    assert read_ab_version(disk.path, offset=disk.partition(5).offset) == "1.0.0"
    assert read_ab_version(disk.path, offset=disk.partition(6).offset) == "2.0.0"


def test_autoboot_disk_with_primary_b(tmp_path: Path) -> None:
    disk = build_pi_disk(tmp_path / "disk.img", "autoboot", version_a="1.0.0", version_b="2.0.0", primary="b",
                         switch_files="legacy")
    text = fat_read(disk.path, disk.by_role("autoboot").offset, "autoboot.txt").decode()
    assert text == "[all]\ntryboot_a_b=1\nboot_partition=3\n[tryboot]\nboot_partition=2\n"
    image = ImageDisk(disk.path)
    assert (root_number(image, tryboot=False), root_number(image, tryboot=True)) == (6, 5)


def test_autoboot_trial_of_unbootable_slot_hangs_once_then_falls_back(tmp_path: Path) -> None:
    disk = build_pi_disk(tmp_path / "disk.img", "autoboot", slot_b_boot_files=False, switch_files="legacy")
    device = PiDevice(disk.path)
    with pytest.raises(NoBootablePartition) as caught:
        device.reboot_with_argument("0 tryboot")
    assert caught.value.tryboot is True
    assert device.root_partition(device.power_cycle()) == 5


def test_prefix_disk_without_b_folder_drops_the_prefix_and_hangs(tmp_path: Path) -> None:
    disk = build_pi_disk(tmp_path / "disk.img", "prefix", slot_b_boot_files=False)
    fat_write(disk.path, disk.by_role("boot").offset, "tryboot.txt", prefix_config_text("b"))
    device = PiDevice(disk.path)
    # No b/kernel8.img drops the prefix, and there is no top-level kernel8.img: the trial boot hangs.
    with pytest.raises(KernelNotFound):
        device.reboot(tryboot=True)
    assert device.root_partition(device.power_cycle()) == 2


def test_empty_slot_b_root_is_zeros(tmp_path: Path) -> None:
    disk = build_pi_disk(tmp_path / "disk.img", "prefix")
    root_b = disk.root("b")
    with disk.path.open("rb") as fh:
        fh.seek(root_b.offset)
        assert fh.read(root_b.size_bytes) == bytes(root_b.size_bytes)
    assert read_ab_version(disk.path, offset=root_b.offset) is None


def test_disk_signature_and_partuuids(tmp_path: Path) -> None:
    disk = build_pi_disk(tmp_path / "disk.img", "autoboot", signature=0x0000BEEF)
    with disk.path.open("rb") as fh:
        fh.seek(440)
        assert fh.read(4) == bytes.fromhex("efbe0000")
    table = read_mbr_table(disk.path)
    assert table.signature == 0x0000BEEF
    assert table.numbers() == [1, 2, 3, 4, 5, 6, 7]
    assert disk.partuuid(7) == table.partuuid(7) == "0000beef-07"
    assert [p.role for p in disk.partitions] == ["autoboot", "boot_a", "boot_b", "extended", "root_a", "root_b",
                                                 "data"]
    blkid = shutil.which("blkid")
    if blkid is not None:
        out = subprocess.run([blkid, "-p", "-O", str(disk.partition(5).offset), "-s", "TYPE", "-o", "value",
                              str(disk.path)], capture_output=True, text=True, timeout=30, check=False)
        assert out.stdout.strip() == "ext4"


def test_root_fstab_and_cmdline_name_the_slot_partuuids(tmp_path: Path) -> None:
    disk = build_pi_disk(tmp_path / "disk.img", "autoboot", version_b="1.0.1")
    fstab_b = ext4_read(disk.path, "/etc/fstab", offset=disk.root("b").offset).decode()
    assert "PARTUUID=1234abcd-06  /  ext4" in fstab_b
    assert "PARTUUID=1234abcd-03  /boot/firmware  vfat" in fstab_b
    assert "PARTUUID=1234abcd-07  /data  ext4" in fstab_b
    cmdline_b = fat_read(disk.path, disk.boot("b").offset, "cmdline.txt").decode()
    assert "root=PARTUUID=1234abcd-06 " in cmdline_b


def test_debugfs_reads_ab_version_in_place(tmp_path: Path) -> None:
    disk = build_pi_disk(tmp_path / "disk.img", "prefix", version_a="3.2.1")
    proc = subprocess.run(["debugfs", "-R", "cat /.ab_version", f"{disk.path}?offset={disk.root('a').offset}"],
                          capture_output=True, text=True, timeout=30, check=True)
    assert proc.stdout == "3.2.1\n"


def test_size_mb_grows_the_data_partition_and_refuses_too_small(tmp_path: Path) -> None:
    disk = build_pi_disk(tmp_path / "big.img", "prefix", size_mb=96)
    assert disk.path.stat().st_size == 96 * MIB
    data = disk.by_role("data")
    assert data.offset + data.size_bytes == 96 * MIB
    with pytest.raises(ValueError, match="needs at least"):
        build_pi_disk(tmp_path / "small.img", "autoboot", size_mb=32)


def test_build_root_image(tmp_path: Path) -> None:
    image = tmp_path / "root.img"
    build_root_image(image, "1.4.0", size_mb=8, extra_files={"etc/motd": "hello\n"})
    assert image.stat().st_size == 8 * MIB
    assert read_ab_version(image) == "1.4.0"
    assert ext4_read(image, "/etc/motd") == b"hello\n"
    assert "PARTUUID=deadbeef-02  /  ext4" in ext4_read(image, "/etc/fstab").decode()
    with pytest.raises(FileNotFoundError):
        ext4_read(image, "/nope")


def test_fat_helpers(tmp_path: Path) -> None:
    disk = build_pi_disk(tmp_path / "disk.img", "prefix")
    offset = disk.by_role("boot").offset
    assert sorted(fat_list(disk.path, offset)) == ["a/", "b/", "config.txt", "fixup4.dat", "start4.elf",
                                                  "tryboot.txt"]
    fat_write(disk.path, offset, "deep/er/file.txt", b"one")
    fat_write(disk.path, offset, "deep/er/file.txt", "two")
    assert fat_read(disk.path, offset, "/DEEP/ER/FILE.TXT") == b"two"
    assert fat_exists(disk.path, offset, "deep/er")
    fat_delete(disk.path, offset, "deep/er/file.txt")
    assert not fat_exists(disk.path, offset, "deep/er/file.txt")
    with pytest.raises(FileNotFoundError):
        fat_read(disk.path, offset, "deep/er/file.txt")
    with pytest.raises(FileNotFoundError):
        fat_list(disk.path, offset, "config.txt")
