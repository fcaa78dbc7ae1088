"""FAT names and paths as ab-flasher uses them on both FAT back ends (`fat_directory`, `fat_mtools`).

Paths are volume paths, ``/``-separated, relative to the root (``/config.txt``, ``a/cmdline.txt``). Names that FAT
cannot hold (``"*:<>?\\|``, control characters) are refused, and so are ``[`` and ``]``, which mtools would take as
wildcards.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from pathlib import Path

from abflasher import errors

TEMP_NAME_RE = re.compile(r"ABF\d{5}\.TMP", re.IGNORECASE)
# Characters FAT long names cannot hold, plus mtools' wildcard brackets.
_FORBIDDEN_NAME_CHARS = frozenset('"*:<>?\\|[]') | frozenset(chr(code) for code in range(32)) | {"\x7f"}
SECTOR = 512


def split_path(path: str) -> list[str]:
    """The names along volume path ``path`` (``[]`` for the root); InvalidArgument for a name FAT cannot hold."""
    parts: list[str] = []
    for name in path.split("/"):
        if name in ("", "."):
            continue
        if name == "..":
            raise errors.InvalidArgument(f"FAT path {path!r} contains '..': give a path from the volume root")
        bad = sorted({ch for ch in name if ch in _FORBIDDEN_NAME_CHARS})
        if bad:
            raise errors.InvalidArgument(
                f"FAT path {path!r} contains {', '.join(repr(ch) for ch in bad)}, which a FAT name cannot hold")
        if name.endswith((" ", ".")):
            raise errors.InvalidArgument(f"FAT path {path!r} has a name ending in a space or dot, which FAT drops")
        parts.append(name)
    return parts


def file_parts(path: str) -> list[str]:
    parts = split_path(path)
    if not parts:
        raise errors.InvalidArgument(f"FAT path {path!r} is the volume root, not a file")
    return parts


def join_path(parts: Sequence[str]) -> str:
    return "/" + "/".join(parts)


def new_temp_name(taken: set[str], like: str = "") -> str:
    """A free 8.3 temp name (``taken`` holds lower-cased names), cased like the name ``like`` it will become.

    mtools' ``mren`` keeps the source's short-name case flags when the new name fits 8.3, so ``ABF12345.TMP`` renamed
    to ``config.txt`` would come out as ``CONFIG.TXT``: a lower-case temp name keeps a lower-case target lower-case.
    """
    stem, dot, extension = like.rpartition(".")
    if not dot:
        stem, extension = like, ""
    base = "abf" if stem.islower() else "ABF"
    suffix = "tmp" if extension.islower() else "TMP"
    while True:
        name = f"{base}{secrets.randbelow(100_000):05d}.{suffix}"
        if name.lower() not in taken:
            return name


def check_read_back(where: str, description: str, written: bytes, read: bytes) -> None:
    if read != written:
        raise errors.DeviceError(
            f"{where} on {description} reads back different from what was written: the medium may be failing"
        )


def first_difference(expected: Path, actual: Path) -> str | None:
    """Where local tree ``actual`` differs from ``expected`` (names, kinds, bytes), or None if it is the same."""
    expected_names = sorted(child.name for child in expected.iterdir())
    actual_names = sorted(child.name for child in actual.iterdir())
    if expected_names != actual_names:
        missing = sorted(set(expected_names) - set(actual_names))
        extra = sorted(set(actual_names) - set(expected_names))
        return f"in {expected.name or '/'}: missing {missing}, unexpected {extra}"
    for name in expected_names:
        want, got = expected / name, actual / name
        if want.is_dir() != got.is_dir():
            return f"{name} is a folder on one side only"
        if want.is_dir():
            difference = first_difference(want, got)
            if difference is not None:
                return f"{name}/{difference}"
        elif want.read_bytes() != got.read_bytes():
            return f"{name} has different contents"
    return None


def import_paths(src: Path, dest_dir: str) -> tuple[Path, list[str]]:
    """import_tree's local source folder (checked) and the names along its destination (``[]``: the volume root)."""
    source = Path(src)
    if not source.is_dir():
        raise errors.InvalidArgument(f"{source} is not a directory: import_tree copies a local directory")
    return source, split_path(dest_dir)


def changed_sectors(where: str, description: str, old: bytes, new: bytes) -> list[int]:
    """Indexes of the 512-byte sectors of a file that differ between ``old`` and ``new``, for an in-place rewrite.

    An in-place rewrite keeps the file's size (its directory entry) and clusters (the FAT) as they are, so only data
    sectors change; a new size cannot be written that way.
    """
    if len(old) != len(new):
        raise errors.DeviceError(
            f"{where} on {description} is {len(old)} bytes: it cannot be rewritten in place with {len(new)} bytes"
        )
    return [index for index in range((len(new) + SECTOR - 1) // SECTOR)
            if old[index * SECTOR:(index + 1) * SECTOR] != new[index * SECTOR:(index + 1) * SECTOR]]

