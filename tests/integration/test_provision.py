"""``ab-flasher provision`` lays out disk images the firmware model boots and the engine reads, in every layout.

(The recovery layouts are also built by it for every recovery scenario: tests/support/pidisk.py,
build_provisioned_disk.)
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from abflasher.disk.slots import detect_layout
from abflasher.disk.table import read_table
from tests import pifirmware
from tests.support.loopdev import LoopDisk, make_disk_image
from tests.support.pidisk import IMAGE_BUILD_SIGNATURE, build_root_image, ext4_read
from tests.support.provisioned import slot_boot_tree

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
LAYOUTS = [(scheme, layout) for scheme in ("prefix", "autoboot") for layout in ("ab", "ab+recovery", "main+recovery")]


def provision(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "abflasher.cli", "provision", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=240, check=False)


def root_offset(disk: Path, number: int) -> int:
    table = read_table(str(disk))
    return table.offset_bytes(number)


@pytest.mark.parametrize(("scheme", "layout"), LAYOUTS, ids=[f"{s}-{v}" for s, v in LAYOUTS])
def test_every_layout_boots_its_first_system_slot(tmp_path: Path, scheme: str, layout: str) -> None:
    system = tmp_path / "system.img"
    # The boot files come with the image (/boot/firmware), as in Raspberry Pi OS images: no --boot needed.
    boot = slot_boot_tree(tmp_path / "boot", scheme, "system", "2.0.0")  # type: ignore[arg-type]
    build_root_image(system, "2.0.0", size_mb=24,
                     extra_files={f"boot/firmware/{p.relative_to(boot)}": p.read_bytes()
                                  for p in boot.rglob("*") if p.is_file()})
    packed = tmp_path / "system.img.gz"
    with system.open("rb") as raw, gzip.open(packed, "wb", compresslevel=1) as out:
        shutil.copyfileobj(raw, out)
    args: list[str | Path] = [tmp_path / "disk.img", "--scheme", scheme, "--layout", layout, "--system", packed,
                              "--slot-size", "32", "--boot-size", "16", "--data-size", "8", "--disk-id", "c0ffee01",
                              "--json"]
    if layout != "ab":
        recovery = tmp_path / "recovery.img"
        build_root_image(recovery, "0.5.0-recovery", size_mb=16)
        recovery_boot = slot_boot_tree(tmp_path / "recovery-boot", scheme, "recovery", "0.5.0")  # type: ignore[arg-type]
        with tarfile.open(tmp_path / "recovery-boot.tar", "w") as archive:
            for child in recovery_boot.iterdir():
                archive.add(child, child.name)
        args += ["--recovery", recovery, "--recovery-boot", tmp_path / "recovery-boot.tar"]
    done = provision(*args)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["scheme"], report["layout"], report["disk_id"]) == (scheme, layout, "c0ffee01")

    disk = tmp_path / "disk.img"
    found = detect_layout(read_table(str(disk)), str(disk))
    assert (found.kind, found.variant) == (scheme, layout)
    first = found.slots[0]
    for flag in (False, True):
        decision = pifirmware.decide_boot(disk, tryboot=flag)
        assert pifirmware.booted_root_partition(decision, pifirmware.read_mbr_table(disk)) == first.root_partition
        assert decision.root == f"PARTUUID={first.root_partuuid}"
    offset = root_offset(disk, first.root_partition)
    assert ext4_read(disk, "/.ab_version", offset=offset) == b"2.0.0\n"
    fstab = ext4_read(disk, "/etc/fstab", offset=offset).decode()
    assert f"PARTUUID={first.root_partuuid}  /  " in fstab
    assert f"PARTUUID={first.boot_partuuid}  /boot/firmware" in fstab
    assert f"PARTUUID={found.table.partition(found.data_partition or 0).partuuid}  /data" in fstab
    assert f"{IMAGE_BUILD_SIGNATURE:08x}" not in fstab, "every partition of the build machine was replaced"
    recovery_slot = found.recovery
    if recovery_slot is not None:
        recovery_fstab = ext4_read(disk, "/etc/fstab", offset=root_offset(disk, recovery_slot.root_partition))
        root_line = next(line for line in recovery_fstab.decode().splitlines() if line.split()[1:2] == ["/"])
        assert root_line.split()[3].split(",")[0] == "ro", "recovery is mounted read-only"
        assert b"tmpfs  /var/lib/ab-flasher" in recovery_fstab
    for empty in found.slots[1:]:
        if empty.role == "system":
            with disk.open("rb") as image:
                image.seek(root_offset(disk, empty.root_partition))
                assert image.read(1 << 20) == bytes(1 << 20), f"slot {empty.name} is left empty"


def test_bad_requests_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    system = tmp_path / "system.img"
    build_root_image(system, "2.0.0", size_mb=16)
    packed = tmp_path / "system.img.gz"
    with system.open("rb") as raw, gzip.open(packed, "wb") as out:
        shutil.copyfileobj(raw, out)
    disk = tmp_path / "disk.img"
    boot = slot_boot_tree(tmp_path / "boot", "prefix", "system", "2.0.0")
    cases = [
        (["--layout", "main+recovery", "--system", system, "--boot", boot], "need a recovery image"),
        (["--system", system, "--recovery", system, "--boot", boot], "A/B layout has no recovery slot"),
        (["--system", packed, "--boot", boot], "is compressed: say how large its slot is"),
        (["--system", tmp_path / "missing.img", "--boot", boot], "does not exist"),
    ]
    for args, message in cases:
        done = provision(disk, *args)
        assert done.returncode == 2, done.stderr
        assert message in done.stderr
        assert not disk.exists()
    no_boot_files = provision(disk, "--system", system)
    assert no_boot_files.returncode == 2
    assert "have no cmdline.txt: give them with --boot" in no_boot_files.stderr


def test_a_whole_block_device_gets_the_data_partition_in_the_rest(tmp_path: Path) -> None:
    system = tmp_path / "system.img"
    boot = slot_boot_tree(tmp_path / "boot", "autoboot", "system", "3.0.0")
    build_root_image(system, "3.0.0", size_mb=16)
    recovery = tmp_path / "recovery.img"
    build_root_image(recovery, "0.1.0-recovery", size_mb=16)
    # A used card: an old table with one partition, which provisioning replaces.
    card = make_disk_image(tmp_path / "card.img", 300, "label: dos\n,64M,83\n")
    with LoopDisk(card) as loop:
        done = provision(loop.device, "--scheme", "autoboot", "--layout", "main+recovery", "--system", system,
                         "--recovery", recovery, "--boot", boot, "--recovery-boot", boot, "--boot-size", "16")
        assert done.returncode == 0, done.stderr
        assert "autoboot scheme, main+recovery layout" in done.stdout
        found = detect_layout(read_table(loop.device), loop.device)
        assert (found.kind, found.variant) == ("autoboot", "main+recovery")
        data = found.table.partition(found.data_partition or 0)
        last_end = max(p.start + p.size for p in found.table.partitions if not p.is_extended)
        assert last_end * 512 > (300 - 4) << 20, "the data partition takes the rest of the card"
        assert data.size * 512 > 150 << 20
        decision = pifirmware.decide_boot(card, tryboot=False)
        assert decision.root == f"PARTUUID={found.slot('main').root_partuuid}"
