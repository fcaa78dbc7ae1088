"""Power cuts inside the boot-file edits of a prefix-layout disk, replayed sector by sector (no root needed).

The disk is an image file with a small FAT12 boot partition: there mtools writes FAT1, FAT2 and the root directory
as one multi-sector write, so a torn file replacement shows up (as it would on a real card with any geometry: the
device may commit the sectors of one write in any partial order). Every edit is recorded with strace
(tests/support/writerecorder.py), proven complete by replaying it, and then cut at every sector boundary.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from abflasher.boot.fat import MtoolsVolume
from abflasher.boot.raspberrypi import PrefixBoot
from abflasher.disk.slots import detect_layout
from abflasher.disk.table import read_table
from tests import pifirmware
from tests.support.writerecorder import WriteRecorder, check_replay, crash_states

pytestmark = pytest.mark.timeout(300)

MIB = 1 << 20
SECTOR = 512
SIGNATURE = 0x5EC7C0DE
P1_START = 2048  # sectors
P1_SECTORS = 2048  # 1 MiB: FAT12, one-sector FATs next to the root directory

CONFIG = "# small test disk\n[all]\narm_64bit=1\nos_prefix=a/\n"


def _run(*args: str, data: bytes | None = None) -> None:
    subprocess.run(args, input=data, check=True, capture_output=True, timeout=60,
                   env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def build_small_prefix_disk(path: Path, tryboot: str | None) -> None:
    """An MBR disk: p1 a 1 MiB FAT12 boot partition with a/ and b/, p2/p3 (empty) Linux roots."""
    with path.open("wb") as handle:
        handle.truncate(4 * MIB)
    script = (f"label: dos\nlabel-id: 0x{SIGNATURE:08x}\nunit: sectors\n\n"
              f"start={P1_START}, size={P1_SECTORS}, type=1, bootable\n"
              "start=4096, size=2048, type=83\nstart=6144, size=2048, type=83\n")
    _run("sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(path), data=script.encode())
    _run("mkfs.vfat", "--invariant", "-F", "12", "-n", "BOOT", "--offset", str(P1_START), str(path),
         str(P1_SECTORS // 2))
    image = f"{path}@@{P1_START * SECTOR}"
    files = {"start4.elf": "fake firmware\n", "config.txt": CONFIG}
    if tryboot is not None:
        files["tryboot.txt"] = tryboot
    for slot, root in (("a", 2), ("b", 3)):
        _run("mmd", "-i", image, f"::/{slot}")
        files[f"{slot}/kernel8.img"] = f"kernel {slot}\n"
        files[f"{slot}/cmdline.txt"] = f"console=serial0 root=PARTUUID={SIGNATURE:08x}-{root:02x} rootwait\n"
    for name, content in files.items():
        source = path.parent / "staging"
        source.write_text(content)
        _run("mcopy", "-i", image, str(source), f"::/{name}")


def prefix_boot(disk: Path) -> PrefixBoot:
    layout = detect_layout(read_table(str(disk)), str(disk))
    return PrefixBoot(layout, lambda node: MtoolsVolume(str(disk), P1_START * SECTOR))


def partition_bytes(disk: Path) -> bytes:
    with disk.open("rb") as handle:
        handle.seek(P1_START * SECTOR)
        return handle.read(P1_SECTORS * SECTOR)


def slot_booted(disk: pifirmware.PartitionImagesDisk, *, tryboot: bool) -> str | None:
    """The slot the firmware boots from this state, or None when it boots nothing or a broken slot."""
    try:
        decision = pifirmware.decide_boot(disk, tryboot=tryboot)
        root = pifirmware.booted_root_partition(decision, disk.table())
    except pifirmware.FirmwareModelError:
        return None
    slot = {2: "a", 3: "b"}.get(root)
    if slot is None or decision.kernel != f"{slot}/kernel8.img" or decision.os_prefix != f"{slot}/":
        return None
    return slot


@pytest.mark.parametrize("operation", ["set_trial", "commit"])
def test_a_cut_inside_a_boot_file_edit_leaves_a_bootable_committed_slot(tmp_path: Path, operation: str) -> None:
    """Defect: `mren -D o` wrote the FATs before the directory sector in one write, so a cut between them left the
    old directory entry pointing at freed clusters and config.txt (or tryboot.txt) unreadable: nothing booted."""
    disk = tmp_path / "disk.img"
    build_small_prefix_disk(disk, tryboot=None)
    boot = prefix_boot(disk)
    boot.repair("a")
    if operation == "commit":
        boot.set_trial("b")
    pre = tmp_path / "pre.img"
    pre.write_bytes(partition_bytes(disk))

    with WriteRecorder(tmp_path / "trace") as recorder:
        if operation == "commit":
            boot.commit("b")
        else:
            boot.set_trial("b")
    post = tmp_path / "post.img"
    post.write_bytes(partition_bytes(disk))
    writes = [w for w in recorder.writes({str(disk): "p1"})]
    # Writes to the disk image are at disk offsets: make them partition offsets.
    writes = [type(w)(w.time, w.pid, w.path, w.offset - P1_START * SECTOR, w.data) for w in writes]
    assert writes, "the edit wrote nothing"
    check_replay({"p1": pre}, {"p1": post}, writes, tmp_path)

    working = tmp_path / "working.img"
    working.write_bytes(pre.read_bytes())
    state_disk = pifirmware.PartitionImagesDisk(disk, {1: working})
    committed_after = "b" if operation == "commit" else "a"
    tried = 0
    for state in crash_states({"p1": working}, writes):
        tried += 1
        normal = slot_booted(state_disk, tryboot=False)
        assert normal in {"a", committed_after}, f"{state.label}: without the flag it boots {normal}"
        flagged = slot_booted(state_disk, tryboot=True)
        assert flagged in {"a", "b"}, f"{state.label}: with the flag it boots {flagged}"
    assert tried >= 2
