"""The indexes of images installed by delta updates, kept in the state directory so the next update knows which
chunks each slot holds without reading (re-chunking) the slot.

``STATE_DIR/delta/SHA256.caibx`` is the index of the image whose sha256 is SHA256; the state file records which
image each slot holds (``installed.sha256``), so a slot's index is found through its record. ``SLOT.building`` names
the image an install into SLOT is building: an install of the same image that follows a failed one then finds the
chunks already written in place instead of writing them again.

The state directory lives in each slot's root (/var/lib/ab-flasher): the update copies this folder into the new root
with the state file (`carry_indexes`), so the new slot knows the indexes on its first boot as the old one did.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from abflasher import errors
from abflasher.delta.index import ChunkIndex, read_index
from abflasher.state import write_atomically

log = logging.getLogger(__name__)

FOLDER = "delta"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _folder(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / FOLDER


def kept_index(state_dir: str | os.PathLike[str], image_sha256: str | None) -> ChunkIndex | None:
    """The kept index of the image with ``image_sha256``; None when there is none or it is unreadable (an index is
    only ever a hint: every chunk it promises is checked against its id before it is used)."""
    if not image_sha256 or not _SHA256_RE.match(image_sha256):
        return None
    path = _folder(state_dir) / f"{image_sha256}.caibx"
    try:
        return read_index(path)
    except FileNotFoundError:
        return None
    except (OSError, errors.BadImage) as exc:
        log.warning("ignoring the kept index %s: %s", path, exc)
        return None


def keep_index(state_dir: str | os.PathLike[str], image_sha256: str, index: ChunkIndex,
               still_used: Iterable[str | None] = ()) -> None:
    """Keep ``index`` as the one of image ``image_sha256``; drop every kept index not of it nor of ``still_used``."""
    folder = _folder(state_dir)
    write_atomically(folder / f"{image_sha256}.caibx", index.write_to)
    wanted = {f"{sha}.caibx" for sha in (image_sha256, *still_used) if sha}
    for path in folder.glob("*.caibx"):
        if path.name not in wanted:
            with contextlib.suppress(OSError):
                path.unlink()


def scratch_dir(state_dir: str | os.PathLike[str]) -> str:
    """Where a delta install keeps its temporary files (the index it downloads, its lookup tables): the state
    directory's delta folder, on the root file system like the kept indexes (never the data partition)."""
    folder = _folder(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


def building(state_dir: str | os.PathLike[str], slot: str) -> str | None:
    """The sha256 of the image the last unfinished install into ``slot`` was building, if any."""
    try:
        text = (_folder(state_dir) / f"{slot}.building").read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if _SHA256_RE.match(text) else None


def set_building(state_dir: str | os.PathLike[str], slot: str, image_sha256: str | None) -> None:
    """Record (or with None, forget) which image an install into ``slot`` is building."""
    path = _folder(state_dir) / f"{slot}.building"
    if image_sha256 is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    write_atomically(path, image_sha256.encode("ascii") + b"\n")


def carry_indexes(state_dir: str | os.PathLike[str], new_state_dir: Path) -> None:
    """Copy the kept indexes into a new root's state directory (see the module docstring)."""
    source = _folder(state_dir)
    if not source.is_dir():
        return
    target = new_state_dir / FOLDER
    target.mkdir(parents=True, exist_ok=True)
    for path in source.glob("*.caibx"):
        shutil.copyfile(path, target / path.name)
