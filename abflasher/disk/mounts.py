"""What is mounted where (/proc/self/mountinfo) and which partitions a disk has (sysfs): both paths are parameters,
so tests can give their own. The FAT volume chooser and the write-target check share these walks."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from abflasher import errors


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def mount_points(mountinfo: str) -> dict[tuple[int, int], list[tuple[str, str]]]:
    """(major, minor) → [(root of the mount within the file system, mount point)] from a mountinfo file."""
    mounts: dict[tuple[int, int], list[tuple[str, str]]] = {}
    try:
        text = Path(mountinfo).read_text()
    except OSError as exc:
        raise errors.DeviceError(f"cannot read {mountinfo} to see what is mounted: {exc.strerror or exc}") from exc
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        major, _, minor = fields[2].partition(":")
        if major.isdigit() and minor.isdigit():
            mounts.setdefault((int(major), int(minor)), []).append(
                (_unescape(fields[3]), _unescape(fields[4])))
    return mounts


SECTOR = 512


@dataclass(frozen=True)
class BlockPartition:
    """A partition of a disk, covering bytes [start, start+size) of it."""

    name: str
    dev: tuple[int, int]
    start: int
    size: int


def read_dev_number(path: Path) -> tuple[int, int] | None:
    """(major, minor) from a sysfs ``dev`` file, None if it cannot be read."""
    try:
        major, _, minor = path.read_text().strip().partition(":")
        return int(major), int(minor)
    except (OSError, ValueError):
        return None


def partitions_of(sys_root: Path, dev: tuple[int, int]) -> list[BlockPartition]:
    """The partitions of whole disk ``dev`` with their byte ranges, from sysfs (none for a partition)."""
    found: list[BlockPartition] = []
    disk = Path(sys_root) / "dev" / "block" / f"{dev[0]}:{dev[1]}"
    try:
        children = sorted(disk.iterdir())
    except OSError:
        return found
    for child in children:
        if not (child / "partition").is_file():
            continue
        number = read_dev_number(child / "dev")
        try:
            start = int((child / "start").read_text()) * SECTOR
            size = int((child / "size").read_text()) * SECTOR
        except (OSError, ValueError):
            continue
        if number is not None:
            found.append(BlockPartition(child.name, number, start, size))
    return found
