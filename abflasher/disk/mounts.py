"""What is mounted where, from /proc/self/mountinfo (a parameter, so tests can give their own)."""

from __future__ import annotations

import re
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
