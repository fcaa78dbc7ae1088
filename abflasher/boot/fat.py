"""Reading and changing files on a FAT boot partition, mounted or not.

One interface, `FatVolume`, two ways in:

- `DirectoryVolume` (`fat_directory`): the file system is mounted (or, in tests, a plain directory stands for it);
  plain file I/O.
- `MtoolsVolume` (`fat_mtools`): the partition is not mounted (or the kernel has no vfat driver); every operation is
  an mtools command on the device, or on a disk image at a byte offset (``-i DEV@@OFFSET``).

`open_volume` picks the right one and never hands out an `MtoolsVolume` for a file system the kernel has mounted:
mtools writing under a mounted FAT corrupts it.

Two kinds of change, and what a power cut can leave of each (docs/boot-atomicity.md has the whole argument):

- `write_in_place` rewrites an existing file without changing its size or its clusters, one sector at a time, each
  sector flushed before the next. A single sector written in place is the one write an SD card (or a FAT file
  system) performs atomically, so a file whose change lies within one sector is always either old or new. This is
  how every file the firmware reads to choose a slot is changed.
- `write_atomic` replaces (or creates) a file through a flushed temporary 8.3 name (``ABF12345.TMP``), then a
  rename. FAT has no atomic rename: a power cut in the rename can leave the target unreadable. It is used only for
  files no firmware decision depends on at that moment (a slot's own boot files while no trial points at them).
  Any file or folder whose name matches the temp pattern is debris of such a write; `cleanup_stale_temp` removes it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Protocol

from abflasher import errors
from abflasher.boot.fat_directory import DirectoryVolume
from abflasher.boot.fat_mtools import MtoolsVolume
from abflasher.boot.fatpaths import SECTOR, TEMP_NAME_RE, split_path
from abflasher.disk.mounts import mount_points, partitions_of, read_dev_number

__all__ = ["TEMP_NAME_RE", "DirectoryVolume", "FatVolume", "MtoolsVolume", "open_volume", "split_path"]


class FatVolume(Protocol):
    """A FAT file system ab-flasher may read and change. Every error is an `errors.AbFlasherError`."""

    description: str

    def read(self, path: str) -> bytes | None:
        """Contents of file ``path``, or None if there is no such file."""
        ...

    def exists(self, path: str) -> bool: ...

    def listdir(self, path: str = "/") -> list[str]:
        """Names in folder ``path`` (sorted, case-insensitively); DeviceError if there is no such folder."""
        ...

    def write_atomic(self, path: str, data: bytes) -> None:
        """Replace (or create) file ``path`` with ``data`` via a flushed temp file; parent folders are created."""
        ...

    def write_in_place(self, path: str, data: bytes) -> int:
        """Rewrite existing file ``path`` with ``data`` of the same size, keeping its clusters and directory entry.

        Only the 512-byte sectors that differ are written, in ascending order, each flushed to the medium before the
        next; the result is read back and compared. Returns how many sectors were written (0: already so, nothing
        written). DeviceError if the file is missing, is a folder or has another size.
        """
        ...

    def makedirs(self, path: str) -> None:
        """Create folder ``path`` and its parents, like ``mkdir -p``."""
        ...

    def export_tree(self, src_dir: str, dest: Path) -> None:
        """Copy the contents of folder ``src_dir`` into local directory ``dest`` (created if missing)."""
        ...

    def import_tree(self, src: Path, dest_dir: str) -> None:
        """Make folder ``dest_dir`` a copy of local directory ``src``: built aside, verified, then swapped in.

        ``dest_dir="/"`` makes the whole volume a copy of ``src`` (for a slot's own boot partition, just formatted):
        there is no aside there, so its old contents are removed first, then the copy is written and verified.
        """
        ...

    def cleanup_stale_temp(self) -> list[str]:
        """Remove temp files/folders left by interrupted writes anywhere on the volume; return their paths."""
        ...



def _loop_devices_of(sys_root: Path, image: str) -> list[tuple[str, tuple[int, int], int]]:
    """(name, device number, offset into ``image``) of each loop device whose backing file is ``image``."""
    found: list[tuple[str, tuple[int, int], int]] = []
    try:
        devices = sorted((sys_root / "block").glob("loop*"))
    except OSError:
        return found
    for loop in devices:
        try:
            backing = (loop / "loop" / "backing_file").read_text().strip()
            offset = int((loop / "loop" / "offset").read_text())
        except (OSError, ValueError):
            continue
        number = read_dev_number(loop / "dev")
        try:
            same = os.path.samefile(backing, image)
        except OSError:
            same = False
        if same and number is not None:
            found.append((loop.name, number, offset))
    return found


def _mounted_at(mounts: dict[tuple[int, int], list[tuple[str, str]]], dev: tuple[int, int], what: str) -> str | None:
    """The mount point showing the whole file system of ``dev``, None if it is not mounted."""
    entries = mounts.get(dev)
    if not entries:
        return None
    for fs_root, mount_point in entries:
        if fs_root == "/":
            return mount_point
    raise errors.DeviceError(f"{what} is mounted only as a bind mount of a sub-folder ({entries[0][1]}): unmount it "
                             "or mount it whole, ab-flasher will not write to a mounted FAT behind its back")


def _mounted_fat_in(
    mounts: dict[tuple[int, int], list[tuple[str, str]]], sys_root: Path, dev: tuple[int, int], offset: int, what: str,
) -> str | None:
    """Mount point of the file system at byte ``offset`` of block device ``dev``, if the kernel has it mounted."""
    if offset == 0:
        mounted = _mounted_at(mounts, dev, what)
        if mounted is not None:
            return mounted
    for part in partitions_of(sys_root, dev):
        if not part.start <= offset < part.start + part.size:
            continue
        mounted = _mounted_at(mounts, part.dev, f"partition {part.name}")
        if mounted is None:
            continue
        if part.start == offset:
            return mounted
        raise errors.DeviceError(f"byte {offset} of {what} lies inside partition {part.name}, which is mounted on "
                                 f"{mounted}: refusing to write to it with mtools")
    if offset and _mounted_at(mounts, dev, what) is not None:
        raise errors.DeviceError(f"{what} is mounted as a whole: refusing to write inside it with mtools")
    return None


def open_volume(
    device_or_dir: str,
    *,
    offset: int = 0,
    mountinfo: str = "/proc/self/mountinfo",
    sys_root: str = "/sys",
) -> FatVolume:
    """The FAT file system at ``device_or_dir`` (+ byte ``offset``), through the kernel if it is mounted.

    - a directory → `DirectoryVolume` on it (``offset`` must be 0);
    - a block device (or a disk image attached to a loop device) whose file system at ``offset`` the kernel has
      mounted (looked up by major:minor in ``mountinfo``, partitions in ``sys_root``) → `DirectoryVolume` on the
      mount point: mtools must never write under a mounted FAT;
    - anything else (a block device, or an image file) → `MtoolsVolume`.
    """
    path = os.fspath(device_or_dir)
    try:
        st = os.stat(path)
    except OSError as exc:
        reason = "does not exist" if exc.errno == errno.ENOENT else f"cannot be read: {exc.strerror}"
        raise errors.DeviceError(f"FAT volume {path} {reason}") from exc
    if stat.S_ISDIR(st.st_mode):
        if offset:
            raise errors.InvalidArgument(f"{path} is a directory: a byte offset applies only to devices and images")
        return DirectoryVolume(Path(path))
    if offset < 0 or offset % SECTOR:
        raise errors.InvalidArgument(f"FAT offset {offset} must be a non-negative multiple of {SECTOR} bytes")
    mounts = mount_points(mountinfo)
    sys_path = Path(sys_root)
    if stat.S_ISBLK(st.st_mode):
        dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        mounted = _mounted_fat_in(mounts, sys_path, dev, offset, path)
        if mounted is not None:
            return DirectoryVolume(Path(mounted), description=f"FAT file system of {path} mounted on {mounted}")
        return MtoolsVolume(path, offset)
    if stat.S_ISREG(st.st_mode):
        for loop_name, loop_dev, loop_offset in _loop_devices_of(sys_path, path):
            if offset < loop_offset:
                continue
            mounted = _mounted_fat_in(mounts, sys_path, loop_dev, offset - loop_offset, f"/dev/{loop_name}")
            if mounted is not None:
                return DirectoryVolume(Path(mounted),
                                       description=f"FAT file system of {path} (/dev/{loop_name}) mounted on {mounted}")
        return MtoolsVolume(path, offset)
    raise errors.DeviceError(f"FAT volume {path} is neither a directory, a block device nor an image file")
