"""FAT volume access (abflasher/boot/fat.py): the same behaviour through a directory and through mtools (a FAT image
file, and a FAT at an offset inside a disk image), atomic replacement and its debris, and which implementation
`open_volume` picks (a mounted FAT must never be written with mtools).

mtools and dosfstools are needed (``apt install mtools dosfstools``); the tests that attach loop devices need root.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from abflasher import errors
from abflasher.boot import bootfiles, fat, fatpaths
from abflasher.boot.fat import TEMP_NAME_RE, DirectoryVolume, FatVolume, MtoolsVolume, open_volume
from abflasher.disk.mounts import mount_points
from tests import pifirmware
from tests.support.loopdev import LoopDisk
from tests.support.pidisk import MIB, build_pi_disk, fat_read, make_fat

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("mcopy") is None or shutil.which("mkfs.vfat") is None,
                       reason="needs mtools and dosfstools"),
]

FAT_SIZE = 16 * MIB
IMAGE_OFFSET = 3 * MIB


def fsck_clean(image: Path, offset: int, size: int, tmp_path: Path) -> None:
    """fsck.fat finds nothing wrong with the FAT at ``offset`` of ``image`` (it has no offset option: copy it out)."""
    copy = tmp_path / "fsck-copy.img"
    with image.open("rb") as src, copy.open("wb") as dst:
        src.seek(offset)
        dst.write(src.read(size))
    proc = subprocess.run(["fsck.fat", "-n", str(copy)], capture_output=True, text=True, timeout=60, check=False)
    copy.unlink()
    assert proc.returncode == 0, proc.stdout + proc.stderr


class VolumeCase:
    """A fresh, empty FAT reached one way, and how to check its on-disk consistency afterwards."""

    def __init__(self, volume: FatVolume, check: Callable[[], None]) -> None:
        self.volume = volume
        self.check = check


@pytest.fixture(params=["directory", "mtools-file", "mtools-offset"])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VolumeCase]:
    kind = request.param
    if kind == "directory":
        root = tmp_path / "fat"
        root.mkdir()
        yield VolumeCase(DirectoryVolume(root), lambda: None)
        return
    image = tmp_path / "disk.img"
    offset = 0 if kind == "mtools-file" else IMAGE_OFFSET
    with image.open("wb") as fh:
        fh.truncate(offset + FAT_SIZE + (MIB if offset else 0))
    make_fat(image, offset, FAT_SIZE, "TESTFAT")
    yield VolumeCase(MtoolsVolume(str(image), offset), lambda: fsck_clean(image, offset, FAT_SIZE, tmp_path))


@pytest.fixture
def mtools_volume(tmp_path: Path) -> tuple[MtoolsVolume, Path]:
    image = tmp_path / "fat.img"
    with image.open("wb") as fh:
        fh.truncate(FAT_SIZE)
    make_fat(image, 0, FAT_SIZE, "TESTFAT")
    return MtoolsVolume(str(image)), image


def make_tree(base: Path, files: dict[str, bytes]) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        target = base / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    return base


def tree_of(base: Path) -> dict[str, bytes | None]:
    """Relative path → contents (None for a folder) of a local tree."""
    return {str(path.relative_to(base)): (None if path.is_dir() else path.read_bytes())
            for path in sorted(base.rglob("*"))}


SLOT_FILES = {
    "kernel8.img": bytes(range(256)) * 64,
    "cmdline.txt": b"console=serial0,115200 console=tty1 root=PARTUUID=1234abcd-02 rootwait\n",
    "bcm2711-rpi-4-b.dtb": b"\xd0\x0d\xfe\xed" + b"\x00" * 100,
    "overlays/README": b"overlays\n",
    "overlays/vc4-kms-v3d.dtbo": b"\xd0\x0d\xfe\xed",
}


# --------------------------------------------------------------------------------------------------- both ways


def test_write_read_and_list(case: VolumeCase) -> None:
    volume = case.volume
    assert volume.read("/config.txt") is None
    assert not volume.exists("config.txt")
    payload = bytes(range(256)) * 20 + b"\r\n\x00end"
    volume.write_atomic("/config.txt", payload)
    assert volume.read("config.txt") == payload
    assert volume.read("/CONFIG.TXT") == payload
    assert volume.exists("Config.Txt")
    assert volume.exists("/")
    volume.write_atomic("config.txt", b"os_prefix=a/\n")
    assert volume.read("config.txt") == b"os_prefix=a/\n"
    volume.write_atomic("/empty.txt", b"")
    assert volume.read("empty.txt") == b""
    assert volume.listdir() == ["config.txt", "empty.txt"]
    assert volume.listdir("/") == volume.listdir("")
    case.check()


def test_write_creates_parent_folders(case: VolumeCase) -> None:
    case.volume.write_atomic("a/overlays/README", b"x\n")
    assert case.volume.listdir("/a") == ["overlays"]
    assert case.volume.listdir("A/Overlays/") == ["README"]
    assert case.volume.read("a/overlays/readme") == b"x\n"
    case.check()


def test_replacing_keeps_the_existing_name(case: VolumeCase) -> None:
    case.volume.write_atomic("CONFIG.TXT", b"one\n")
    case.volume.write_atomic("config.txt", b"two\n")
    assert case.volume.listdir() == ["CONFIG.TXT"]
    assert case.volume.read("config.txt") == b"two\n"
    case.volume.write_atomic("Mixed.Case.txt", b"m\n")
    case.volume.write_atomic("cmdline.txt", b"c\n")
    assert case.volume.listdir() == ["cmdline.txt", "CONFIG.TXT", "Mixed.Case.txt"]
    case.check()


def test_no_temp_files_remain_after_writes(case: VolumeCase) -> None:
    for index in range(5):
        case.volume.write_atomic("a/cmdline.txt", f"root=PARTUUID=1234abcd-0{index}\n".encode())
    assert case.volume.listdir("a") == ["cmdline.txt"]
    assert case.volume.cleanup_stale_temp() == []


def test_writing_over_a_folder_is_refused(case: VolumeCase) -> None:
    case.volume.makedirs("a/overlays")
    with pytest.raises(errors.DeviceError, match="is a folder"):
        case.volume.write_atomic("a", b"x")
    with pytest.raises(errors.DeviceError, match="is a folder"):
        case.volume.read("/a")
    assert case.volume.listdir("a") == ["overlays"]
    case.check()


def test_makedirs(case: VolumeCase) -> None:
    volume = case.volume
    volume.makedirs("a/b/c")
    volume.makedirs("/a/b/c/")
    assert volume.listdir("a/b") == ["c"]
    volume.write_atomic("file", b"x")
    with pytest.raises(errors.DeviceError, match="is a file"):
        volume.makedirs("file/sub")
    with pytest.raises(errors.DeviceError, match="no folder"):
        volume.listdir("nothere")
    case.check()


def test_export_and_import_tree(case: VolumeCase, tmp_path: Path) -> None:
    volume = case.volume
    source = make_tree(tmp_path / "src", SLOT_FILES)
    (source / "empty-folder").mkdir()
    volume.write_atomic("config.txt", b"os_prefix=a/\n")
    volume.import_tree(source, "/a")
    assert volume.listdir("a") == ["bcm2711-rpi-4-b.dtb", "cmdline.txt", "empty-folder", "kernel8.img", "overlays"]
    exported = tmp_path / "out"
    volume.export_tree("a", exported)
    assert tree_of(exported) == tree_of(source)

    # Importing again replaces the folder: files that are no longer in the source are gone.
    smaller = make_tree(tmp_path / "src2", {"kernel8.img": b"new kernel", "overlays/README": b"new\n"})
    volume.import_tree(smaller, "A/")
    again = tmp_path / "out2"
    volume.export_tree("/a/", again)
    assert tree_of(again) == tree_of(smaller)
    assert volume.read("config.txt") == b"os_prefix=a/\n"
    assert volume.cleanup_stale_temp() == []

    # An empty source gives an empty folder; a folder deeper down gets its parents.
    volume.import_tree(make_tree(tmp_path / "empty", {}), "b")
    assert volume.listdir("b") == []
    volume.import_tree(smaller, "slots/c")
    assert volume.read("slots/c/overlays/README") == b"new\n"
    case.check()


def test_import_tree_into_the_root_replaces_everything(case: VolumeCase, tmp_path: Path) -> None:
    volume = case.volume
    volume.write_atomic("old/stale.txt", b"old")
    volume.write_atomic("config.txt", b"old config")
    source = make_tree(tmp_path / "boot", {**SLOT_FILES, "config.txt": b"new config\n", "start4.elf": b"fw"})
    volume.import_tree(source, "/")
    exported = tmp_path / "out"
    volume.export_tree("/", exported)
    assert tree_of(exported) == tree_of(source)
    case.check()


def test_export_tree_of_a_missing_folder(case: VolumeCase, tmp_path: Path) -> None:
    with pytest.raises(errors.DeviceError, match="no folder /nothere"):
        case.volume.export_tree("nothere", tmp_path / "out")


def test_import_tree_needs_a_local_directory(case: VolumeCase, tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidArgument, match="not a directory"):
        case.volume.import_tree(tmp_path / "missing", "a")


def test_cleanup_stale_temp_removes_debris_only(case: VolumeCase, tmp_path: Path) -> None:
    volume = case.volume
    volume.write_atomic("config.txt", b"good\n")
    volume.write_atomic("a/cmdline.txt", b"root=x\n")
    # What interrupted writes leave: temp files next to their targets, a half-built folder copy.
    volume.write_atomic("ABF12345.TMP", b"partial config")
    volume.write_atomic("a/abf00001.tmp", b"partial cmdline")
    volume.import_tree(make_tree(tmp_path / "half", {"kernel8.img": b"k", "overlays/x": b"x"}), "ABF99999.TMP")
    # Names that only look similar stay.
    volume.write_atomic("ABF1234.TMP", b"not ours")
    volume.write_atomic("a/ABF12345.TMP.txt", b"not ours")
    removed = volume.cleanup_stale_temp()
    assert removed == ["/ABF12345.TMP", "/ABF99999.TMP", "/a/abf00001.tmp"]
    assert volume.listdir() == ["a", "ABF1234.TMP", "config.txt"]
    assert volume.listdir("a") == ["ABF12345.TMP.txt", "cmdline.txt"]
    assert volume.read("config.txt") == b"good\n"
    assert volume.cleanup_stale_temp() == []
    case.check()


@pytest.mark.parametrize("bad", ["../etc/passwd", "a/../../x", "con*fig.txt", "what?.txt", "a:b", "x[1].txt",
                                 "tab\there", "trailing.", "trailing ", "back\\slash"])
def test_names_fat_cannot_hold_are_refused(case: VolumeCase, bad: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="FAT path"):
        case.volume.write_atomic(bad, b"x")
    with pytest.raises(errors.InvalidArgument, match="FAT path"):
        case.volume.read(bad)


def test_the_root_is_not_a_file(case: VolumeCase) -> None:
    with pytest.raises(errors.InvalidArgument, match="volume root"):
        case.volume.write_atomic("/", b"x")
    with pytest.raises(errors.InvalidArgument, match="volume root"):
        case.volume.read("")


def test_descriptions_name_the_device() -> None:
    assert "/dev/mmcblk0p1" in MtoolsVolume("/dev/mmcblk0p1").description
    described = MtoolsVolume("/tmp/disk.img", 4 * MIB).description
    assert "/tmp/disk.img" in described
    assert str(4 * MIB) in described
    assert "/boot/firmware" in DirectoryVolume(Path("/boot/firmware")).description


def test_temp_names_are_8_3_and_recognised() -> None:
    for like in ("config.txt", "CONFIG.TXT", "README", "Mixed.Case.txt", ""):
        name = fatpaths.new_temp_name(set(), like)
        assert re.fullmatch(r"[A-Za-z]{3}\d{5}\.[A-Za-z]{3}", name)
        assert TEMP_NAME_RE.fullmatch(name)
    assert fatpaths.new_temp_name(set(), "config.txt").islower()
    assert fatpaths.new_temp_name(set(), "CONFIG.TXT").isupper()


# --------------------------------------------------------------------------------------------------- directory


def test_directory_write_fsyncs_file_then_renames_then_fsyncs_folder(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "fat"
    (root / "a").mkdir(parents=True)
    (root / "a" / "cmdline.txt").write_bytes(b"old\n")
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("rename", f"{os.fspath(src)} -> {os.fspath(dst)}"))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    DirectoryVolume(root).write_atomic("A/CMDLINE.TXT", b"new\n")
    monkeypatch.undo()

    assert [kind for kind, _ in events] == ["fsync", "rename", "fsync"]
    temp = Path(events[0][1])
    assert temp.parent == root / "a"
    assert TEMP_NAME_RE.fullmatch(temp.name)
    assert events[1][1] == f"{temp} -> {root / 'a' / 'cmdline.txt'}"
    assert events[2][1] == str(root / "a")
    assert (root / "a" / "cmdline.txt").read_bytes() == b"new\n"
    assert sorted(os.listdir(root / "a")) == ["cmdline.txt"]


def test_directory_failed_rename_leaves_target_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "fat"
    root.mkdir()
    (root / "config.txt").write_bytes(b"old\n")

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(errors.DeviceError, match="writing /config.txt on FAT directory .* Input/output error"):
        DirectoryVolume(root).write_atomic("config.txt", b"new\n")
    monkeypatch.undo()
    assert os.listdir(root) == ["config.txt"]
    assert (root / "config.txt").read_bytes() == b"old\n"


def test_directory_read_back_mismatch_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = DirectoryVolume._write_file

    def corrupting_write(path: Path, data: bytes, *, exclusive: bool) -> None:
        real_write(path, data[:-1] + b"?", exclusive=exclusive)

    monkeypatch.setattr(DirectoryVolume, "_write_file", staticmethod(corrupting_write))
    with pytest.raises(errors.DeviceError, match="reads back different"):
        DirectoryVolume(tmp_path).write_atomic("config.txt", b"os_prefix=a/\n")


def test_directory_errors_become_device_errors(tmp_path: Path) -> None:
    root = tmp_path / "ro"
    root.mkdir()
    (root / "config.txt").write_bytes(b"x")
    volume = DirectoryVolume(root)
    if os.geteuid() == 0:
        # root ignores permissions: make the folder a file's child instead.
        volume = DirectoryVolume(root / "config.txt")
        with pytest.raises(errors.DeviceError, match="failed"):
            volume.write_atomic("new.txt", b"x")
        return
    root.chmod(0o500)
    try:
        with pytest.raises(errors.DeviceError, match="Permission denied"):
            volume.write_atomic("new.txt", b"x")
    finally:
        root.chmod(0o700)


def test_directory_lookup_ignores_case_like_fat(tmp_path: Path) -> None:
    make_tree(tmp_path / "fat", {"Overlays/README": b"r", "CONFIG.TXT": b"c"})
    volume = DirectoryVolume(tmp_path / "fat")
    assert volume.read("overlays/readme") == b"r"
    volume.write_atomic("overlays/new.dtbo", b"n")
    assert (tmp_path / "fat" / "Overlays" / "new.dtbo").read_bytes() == b"n"
    assert volume.listdir() == ["CONFIG.TXT", "Overlays"]


# --------------------------------------------------------------------------------------------------- mtools


def test_mtools_write_copies_to_temp_flushes_then_renames(mtools_volume: tuple[MtoolsVolume, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    volume, _ = mtools_volume
    volume.write_atomic("config.txt", b"old\n")
    steps: list[str] = []
    real_run, real_sync = MtoolsVolume._run, MtoolsVolume._sync

    def run(self: MtoolsVolume, tool: str, *args: str) -> bytes:
        steps.append(" ".join([tool, *args]))
        return real_run(self, tool, *args)

    def sync(self: MtoolsVolume) -> None:
        steps.append("sync")
        real_sync(self)

    monkeypatch.setattr(MtoolsVolume, "_run", run)
    monkeypatch.setattr(MtoolsVolume, "_sync", sync)
    volume.write_atomic("/CONFIG.txt", b"new\n")
    monkeypatch.undo()

    copy = next(index for index, step in enumerate(steps) if step.startswith("mcopy"))
    temp = re.search(r"::/(\S+)$", steps[copy])
    assert temp is not None
    assert TEMP_NAME_RE.fullmatch(temp.group(1))
    assert steps[copy + 1] == "sync"
    assert steps[copy + 2] == f"mren -D o ::/{temp.group(1)} ::/config.txt"
    assert steps[copy + 3] == "sync"
    assert steps[copy + 4] == "mtype ::/config.txt"
    assert volume.read("config.txt") == b"new\n"


def test_mtools_read_back_mismatch_is_reported(mtools_volume: tuple[MtoolsVolume, Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    volume, _ = mtools_volume
    real_run = MtoolsVolume._run

    def run(self: MtoolsVolume, tool: str, *args: str) -> bytes:
        output = real_run(self, tool, *args)
        return output + b"?" if tool == "mtype" else output

    monkeypatch.setattr(MtoolsVolume, "_run", run)
    with pytest.raises(errors.DeviceError, match="reads back different"):
        volume.write_atomic("config.txt", b"x\n")


def test_mtools_errors_carry_mtools_message(tmp_path: Path) -> None:
    not_fat = tmp_path / "zeros.img"
    not_fat.write_bytes(b"\x00" * MIB)
    with pytest.raises(errors.DeviceError, match=r"mdir on FAT file system on .*zeros.img failed: .*"):
        MtoolsVolume(str(not_fat)).read("config.txt")
    with pytest.raises(errors.DeviceError, match="failed: Can't open .*missing.img"):
        MtoolsVolume(str(tmp_path / "missing.img")).listdir()


def test_mtools_missing_is_a_clear_error(mtools_volume: tuple[MtoolsVolume, Path],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(errors.DeviceError, match="install the mtools package"):
        mtools_volume[0].read("config.txt")


def test_mtools_offset_must_be_sector_aligned() -> None:
    with pytest.raises(errors.InvalidArgument, match="multiple of 512"):
        MtoolsVolume("/tmp/x.img", 100)
    with pytest.raises(errors.InvalidArgument, match="multiple of 512"):
        MtoolsVolume("/tmp/x.img", -512)


def test_mtools_sees_hidden_files(mtools_volume: tuple[MtoolsVolume, Path]) -> None:
    volume, image = mtools_volume
    volume.write_atomic("ABF00042.TMP", b"debris")
    subprocess.run(["mattrib", "-i", str(image), "+h", "::/ABF00042.TMP"], check=True, timeout=60,
                   env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    assert volume.listdir() == ["ABF00042.TMP"]
    assert volume.cleanup_stale_temp() == ["/ABF00042.TMP"]


def test_prefix_disk_switch_slot_through_mtools(tmp_path: Path) -> None:
    """End to end on a simulated Pi disk: edit config.txt in place on the image, and the firmware boots slot B."""
    disk = build_pi_disk(tmp_path / "pi.img", "prefix", version_a="1.0.0", version_b="1.1.0")
    boot = disk.by_role("boot")
    volume = open_volume(str(disk.path), offset=boot.offset, mountinfo=write_mountinfo(tmp_path / "mountinfo", []),
                         sys_root=str(tmp_path / "no-sys"))
    assert isinstance(volume, MtoolsVolume)
    assert pifirmware.decide_boot(disk.path).kernel == "a/kernel8.img"
    config = volume.read("config.txt")
    assert config is not None
    volume.write_atomic("config.txt", bootfiles.set_config_os_prefix(config.decode(), "b/").encode())
    decision = pifirmware.decide_boot(disk.path)
    assert decision.kernel == "b/kernel8.img"
    assert decision.root == f"PARTUUID={disk.partuuid(3)}"
    assert fat_read(disk.path, boot.offset, "config.txt").decode().endswith("os_prefix=b/\n")
    fsck_clean(disk.path, boot.offset, boot.size_bytes, tmp_path)


# --------------------------------------------------------------------------------------------------- interruption


def run_until_killed(action: Callable[[], None], patch: Callable[[], None]) -> int:
    """Run ``action`` in a forked child that ``patch`` makes die (os._exit) mid-way, like a power cut for the FS."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        try:
            patch()
            action()
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_interrupted_directory_write_is_cleaned_up(tmp_path: Path) -> None:
    root = tmp_path / "fat"
    volume = DirectoryVolume(root)
    root.mkdir()
    volume.write_atomic("config.txt", b"os_prefix=a/\n")

    def die_before_rename() -> None:
        os.rename = lambda *args, **kwargs: os._exit(9)

    assert run_until_killed(lambda: volume.write_atomic("config.txt", b"os_prefix=b/\n"), die_before_rename) == 9
    leftovers = [name for name in os.listdir(root) if TEMP_NAME_RE.fullmatch(name)]
    assert len(leftovers) == 1
    assert (root / leftovers[0]).read_bytes() == b"os_prefix=b/\n"
    assert volume.read("config.txt") == b"os_prefix=a/\n"
    assert volume.cleanup_stale_temp() == [f"/{leftovers[0]}"]
    assert os.listdir(root) == ["config.txt"]
    assert volume.read("config.txt") == b"os_prefix=a/\n"


def test_interrupted_mtools_write_is_cleaned_up(mtools_volume: tuple[MtoolsVolume, Path], tmp_path: Path) -> None:
    volume, image = mtools_volume
    volume.write_atomic("a/cmdline.txt", b"root=PARTUUID=1234abcd-02\n")
    real_call = MtoolsVolume._call

    def die_at_rename() -> None:
        def call(self: MtoolsVolume, tool: str, *args: str) -> subprocess.CompletedProcess[bytes]:
            if tool == "mren":
                os._exit(9)
            return real_call(self, tool, *args)

        MtoolsVolume._call = call  # type: ignore[method-assign]

    code = run_until_killed(lambda: volume.write_atomic("a/cmdline.txt", b"root=PARTUUID=1234abcd-03\n"),
                            die_at_rename)
    assert code == 9
    leftovers = [name for name in volume.listdir("a") if TEMP_NAME_RE.fullmatch(name)]
    assert len(leftovers) == 1
    assert volume.read(f"a/{leftovers[0]}") == b"root=PARTUUID=1234abcd-03\n"
    assert volume.read("a/cmdline.txt") == b"root=PARTUUID=1234abcd-02\n"
    assert volume.cleanup_stale_temp() == [f"/a/{leftovers[0]}"]
    assert volume.listdir("a") == ["cmdline.txt"]
    assert volume.read("a/cmdline.txt") == b"root=PARTUUID=1234abcd-02\n"
    fsck_clean(image, 0, FAT_SIZE, tmp_path)


def test_interrupted_mtools_import_is_cleaned_up(mtools_volume: tuple[MtoolsVolume, Path], tmp_path: Path) -> None:
    volume, _ = mtools_volume
    old = make_tree(tmp_path / "old", {"kernel8.img": b"old kernel"})
    volume.import_tree(old, "b")
    real_call = MtoolsVolume._call

    def die_before_swap() -> None:
        # The copy is complete and verified; the process dies before the old folder is deleted.
        def call(self: MtoolsVolume, tool: str, *args: str) -> subprocess.CompletedProcess[bytes]:
            if tool in ("mdeltree", "mren"):
                os._exit(9)
            return real_call(self, tool, *args)

        MtoolsVolume._call = call  # type: ignore[method-assign]

    new = make_tree(tmp_path / "new", SLOT_FILES)
    assert run_until_killed(lambda: volume.import_tree(new, "b"), die_before_swap) == 9
    assert volume.read("b/kernel8.img") == b"old kernel"
    removed = volume.cleanup_stale_temp()
    assert len(removed) == 1
    assert TEMP_NAME_RE.fullmatch(removed[0].lstrip("/"))
    assert volume.listdir() == ["b"]
    assert volume.listdir("b") == ["kernel8.img"]


# --------------------------------------------------------------------------------------------------- open_volume


def write_mountinfo(path: Path, entries: list[tuple[str, str, str]]) -> str:
    """A mountinfo file: (major:minor, root within the file system, mount point) per line, plus a tmpfs."""
    lines = ["22 1 0:21 / /tmp rw,nosuid,nodev shared:5 - tmpfs tmpfs rw"]
    for number, (dev, fs_root, mount_point) in enumerate(entries, start=100):
        escaped = mount_point.replace(" ", "\\040")
        lines.append(f"{number} 1 {dev} {fs_root} {escaped} rw,relatime shared:{number} - vfat /dev/x rw,fmask=0022")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_open_volume_directory(tmp_path: Path) -> None:
    volume = open_volume(str(tmp_path))
    assert isinstance(volume, DirectoryVolume)
    assert volume.root == tmp_path
    with pytest.raises(errors.InvalidArgument, match="directory"):
        open_volume(str(tmp_path), offset=512)


def test_open_volume_image_file(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    mountinfo = write_mountinfo(tmp_path / "mountinfo", [])
    volume = open_volume(str(image), offset=4 * MIB, mountinfo=mountinfo, sys_root=str(tmp_path / "sys"))
    assert isinstance(volume, MtoolsVolume)
    assert (volume.device, volume.offset) == (str(image), 4 * MIB)
    with pytest.raises(errors.InvalidArgument, match="multiple of 512"):
        open_volume(str(image), offset=1000, mountinfo=mountinfo)


def test_open_volume_refuses_what_is_not_a_volume(tmp_path: Path) -> None:
    with pytest.raises(errors.DeviceError, match="does not exist"):
        open_volume(str(tmp_path / "missing"))
    with pytest.raises(errors.DeviceError, match="neither a directory, a block device nor an image"):
        open_volume("/dev/null", mountinfo=write_mountinfo(tmp_path / "mountinfo", []))


def test_mounted_partition_lookup_in_fake_sysfs(tmp_path: Path) -> None:
    """Which mount point (if any) shows the FAT at a byte offset of a disk, from a fake /sys and mountinfo."""
    sys_root = tmp_path / "sys"
    disk = sys_root / "dev" / "block" / "179:0"
    for name, minor, start in (("mmcblk0p1", 1, 8192), ("mmcblk0p2", 2, 1056768)):
        part = disk / name
        part.mkdir(parents=True)
        (part / "partition").write_text(f"{minor}\n")
        (part / "dev").write_text(f"179:{minor}\n")
        (part / "start").write_text(f"{start}\n")
        (part / "size").write_text("1048576\n")
    mounts = mount_points(write_mountinfo(tmp_path / "mountinfo",
                                               [("179:1", "/", "/boot/my firmware"), ("179:2", "/", "/")]))
    assert fat._mounted_fat_in(mounts, sys_root, (179, 0), 8192 * 512, "/dev/mmcblk0") == "/boot/my firmware"
    with pytest.raises(errors.DeviceError, match="inside partition mmcblk0p1, which is mounted"):
        fat._mounted_fat_in(mounts, sys_root, (179, 0), 8192 * 512 + MIB, "/dev/mmcblk0")
    assert fat._mounted_fat_in(mounts, sys_root, (179, 0), 4 * MIB - 512, "/dev/mmcblk0") is None
    assert fat._mounted_fat_in(mounts, sys_root, (179, 1), 0, "/dev/mmcblk0p1") == "/boot/my firmware"
    assert fat._mounted_fat_in(mounts, sys_root, (179, 5), 0, "/dev/mmcblk0p5") is None
    bind_only = mount_points(write_mountinfo(tmp_path / "bind", [("179:1", "/overlays", "/mnt/o")]))
    with pytest.raises(errors.DeviceError, match="bind mount of a sub-folder"):
        fat._mounted_fat_in(bind_only, sys_root, (179, 1), 0, "/dev/mmcblk0p1")


def test_unreadable_mountinfo_is_an_error(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    with pytest.raises(errors.DeviceError, match="to see what is mounted"):
        open_volume(str(image), mountinfo=str(tmp_path / "missing-mountinfo"))


@pytest.fixture
def fat_loop_disk(loop_disk: LoopDisk) -> LoopDisk:
    """The conftest loop disk with a FAT16 on p1 (8 MiB at 1 MiB)."""
    subprocess.run(["mkfs.vfat", "-F", "16", "-s", "1", "-n", "LOOPFAT", loop_disk.partition(1)], check=True,
                   capture_output=True, timeout=60)
    return loop_disk


def dev_of(node: str) -> str:
    rdev = os.stat(node).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


@pytest.mark.root
def test_open_volume_mounted_partition_is_a_directory(fat_loop_disk: LoopDisk, tmp_path: Path) -> None:
    mount_point = tmp_path / "boot firmware"
    mount_point.mkdir()
    p1 = fat_loop_disk.partition(1)
    mountinfo = write_mountinfo(tmp_path / "mountinfo", [(dev_of(p1), "/", str(mount_point))])

    volume = open_volume(p1, mountinfo=mountinfo)
    assert isinstance(volume, DirectoryVolume)
    assert volume.root == mount_point
    assert p1 in volume.description
    volume.write_atomic("config.txt", b"through the mount\n")
    assert (mount_point / "config.txt").read_bytes() == b"through the mount\n"
    # Nothing reached the device itself behind the kernel's back.
    assert MtoolsVolume(p1).read("config.txt") is None

    # The same file system addressed as the whole disk + the partition's offset, or as the image file + offset.
    whole = open_volume(fat_loop_disk.device, offset=MIB, mountinfo=mountinfo)
    assert isinstance(whole, DirectoryVolume)
    assert whole.root == mount_point
    image = open_volume(str(fat_loop_disk.image), offset=MIB, mountinfo=mountinfo)
    assert isinstance(image, DirectoryVolume)
    assert image.root == mount_point
    with pytest.raises(errors.DeviceError, match="which is mounted"):
        open_volume(fat_loop_disk.device, offset=2 * MIB, mountinfo=mountinfo)
    with pytest.raises(errors.DeviceError, match="which is mounted"):
        open_volume(str(fat_loop_disk.image), offset=2 * MIB, mountinfo=mountinfo)


@pytest.mark.root
def test_open_volume_unmounted_partition_uses_mtools(fat_loop_disk: LoopDisk, tmp_path: Path) -> None:
    p1 = fat_loop_disk.partition(1)
    p2 = fat_loop_disk.partition(2)
    # Something else on the disk is mounted: that does not matter for p1.
    mountinfo = write_mountinfo(tmp_path / "mountinfo", [(dev_of(p2), "/", "/")])

    volume = open_volume(p1, mountinfo=mountinfo)
    assert isinstance(volume, MtoolsVolume)
    volume.write_atomic("autoboot.txt", bootfiles.render_autoboot(2, 3).encode())
    whole = open_volume(fat_loop_disk.device, offset=MIB, mountinfo=mountinfo)
    assert isinstance(whole, MtoolsVolume)
    data = whole.read("AUTOBOOT.TXT")
    assert data is not None
    assert bootfiles.parse_autoboot(data).tryboot_partition == 3
    assert whole.cleanup_stale_temp() == []
    subprocess.run(["fsck.fat", "-n", p1], check=True, capture_output=True, timeout=60)
