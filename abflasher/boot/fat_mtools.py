"""A FAT file system that is not mounted, reached with mtools on a block device or an image at a byte offset.

Every operation is an mtools command on the device, or on a disk image at a byte offset (``-i DEV@@OFFSET``).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from abflasher import errors
from abflasher.boot import fatpaths
from abflasher.boot.fatpaths import SECTOR, TEMP_NAME_RE

MTOOLS_TIMEOUT = 120.0
_NOT_FOUND_RE = re.compile(r'File ".*" not found')
_CLUSTER_RUN_RE = re.compile(r"<(\d+)(?:-(\d+))?>")


@dataclass(frozen=True)
class FatGeometry:
    """Where a FAT file system keeps file data, from its boot sector (the BIOS parameter block)."""

    cluster_bytes: int
    data_start: int  # byte offset of cluster 2 from the start of the file system

    @classmethod
    def from_boot_sector(cls, boot: bytes, description: str) -> FatGeometry:
        if len(boot) < SECTOR or boot[510:512] != b"\x55\xaa":
            raise errors.DeviceError(f"{description} has no FAT boot sector")
        sector_bytes = int.from_bytes(boot[11:13], "little")
        sectors_per_cluster = boot[13]
        reserved = int.from_bytes(boot[14:16], "little")
        fats = boot[16]
        root_entries = int.from_bytes(boot[17:19], "little")
        fat_sectors = int.from_bytes(boot[22:24], "little") or int.from_bytes(boot[36:40], "little")
        if sector_bytes not in (512, 1024, 2048, 4096) or not sectors_per_cluster or not fats or not fat_sectors:
            raise errors.DeviceError(f"{description} has an unusable FAT boot sector")
        root_sectors = (root_entries * 32 + sector_bytes - 1) // sector_bytes
        first_data_sector = reserved + fats * fat_sectors + root_sectors
        return cls(sectors_per_cluster * sector_bytes, first_data_sector * sector_bytes)

    def cluster_offset(self, cluster: int) -> int:
        return self.data_start + (cluster - 2) * self.cluster_bytes


def parse_cluster_chain(listing: str) -> list[int]:
    """The clusters of a file, in order, from `mshowfat`'s ``<2> <4-5>`` runs."""
    clusters: list[int] = []
    for match in _CLUSTER_RUN_RE.finditer(listing):
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else first
        clusters.extend(range(first, last + 1))
    return clusters


@dataclass(frozen=True)
class _Entry:
    name: str
    is_dir: bool


class MtoolsVolume:
    """A FAT file system that is not mounted, reached with mtools on a block device or an image at a byte offset.

    Each call runs one or a few mtools commands; mtools writes straight to the device (no cache of its own), and
    after each change the device is fsynced so the data has left the page cache before the next step relies on it.
    """

    def __init__(self, device: str, offset: int = 0, *, timeout: float = MTOOLS_TIMEOUT) -> None:
        if offset < 0 or offset % SECTOR:
            raise errors.InvalidArgument(f"FAT offset {offset} must be a non-negative multiple of {SECTOR} bytes")
        self.device = os.fspath(device)
        self.offset = offset
        self.timeout = timeout
        where = f"at byte {offset} of {self.device}" if offset else f"on {self.device}"
        self.description = f"FAT file system {where}"

    # ----------------------------------------------------------------------------------------------- running

    def _image(self) -> str:
        return f"{self.device}@@{self.offset}" if self.offset else self.device

    def _run(self, tool: str, *args: str) -> bytes:
        """Run an mtools command on this volume and return its output; DeviceError with mtools' message if it fails."""
        proc = self._call(tool, *args)
        if proc.returncode != 0:
            raise errors.DeviceError(f"{tool} on {self.description} failed: {self._message(proc)}")
        return proc.stdout

    def _run_unless_missing(self, tool: str, *args: str) -> bytes | None:
        """Like `_run`, but None when the command failed only because the path it was given does not exist."""
        proc = self._call(tool, *args)
        if proc.returncode == 0:
            return proc.stdout
        message = self._message(proc)
        if _NOT_FOUND_RE.search(message):
            return None
        raise errors.DeviceError(f"{tool} on {self.description} failed: {message}")

    def _call(self, tool: str, *args: str) -> subprocess.CompletedProcess[bytes]:
        env = {
            **os.environ,
            # mtools would otherwise refuse geometries no floppy ever had, and read a user's ~/.mtoolsrc.
            "MTOOLS_SKIP_CHECK": "1",
            "MTOOLSRC": os.devnull,
            "LC_ALL": "C.UTF-8",
        }
        try:
            return subprocess.run([tool, "-i", self._image(), *args], capture_output=True, env=env,
                                  timeout=self.timeout, check=False, stdin=subprocess.DEVNULL)
        except FileNotFoundError as exc:
            raise errors.DeviceError(f"{tool} is not installed: install the mtools package") from exc
        except subprocess.TimeoutExpired as exc:
            raise errors.DeviceError(f"{tool} on {self.description} did not finish in {self.timeout:.0f} s") from exc

    @staticmethod
    def _message(proc: subprocess.CompletedProcess[bytes]) -> str:
        lines = [line.strip() for line in proc.stderr.decode(errors="replace").splitlines() if line.strip()]
        message = "; ".join(lines) or f"exit code {proc.returncode}"
        if "Cannot initialize" in message:
            message += " (is there a FAT file system at that device and offset?)"
        return message

    def _discard(self, tool: str, path: str) -> None:
        """Best-effort removal of a temp entry while another error is on its way up."""
        with suppress(errors.DeviceError):
            self._run_unless_missing(tool, path)

    @staticmethod
    def _mpath(parts: Sequence[str]) -> str:
        return "::/" + "/".join(parts)

    def _sync(self) -> None:
        """Flush what mtools wrote out of the page cache to the medium."""
        try:
            fd = os.open(self.device, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise errors.DeviceError(f"flushing {self.device} failed: {exc.strerror or exc}") from exc

    def _entries(self, parts: Sequence[str]) -> dict[str, _Entry] | None:
        """Folder ``parts`` by lower-cased name, or None if it does not exist or is a file."""
        target = self._mpath(parts)
        listing = self._run_unless_missing("mdir", "-a", "-b", target)
        if listing is None:
            return None
        prefix = target.rstrip("/") + "/"
        entries: dict[str, _Entry] = {}
        for line in listing.decode(errors="surrogateescape").splitlines():
            if not line.startswith(prefix):
                # `mdir -b` on a file prints the file itself instead of a listing.
                return None
            name = line[len(prefix):]
            entry = _Entry(name.rstrip("/"), name.endswith("/"))
            entries[entry.name.lower()] = entry
        return entries

    def _lookup(self, parts: Sequence[str]) -> _Entry | None:
        if not parts:
            return _Entry("", True)
        entries = self._entries(parts[:-1])
        return None if entries is None else entries.get(parts[-1].lower())

    def _require_entries(self, parts: Sequence[str], purpose: str) -> dict[str, _Entry]:
        entries = self._entries(parts)
        if entries is None:
            raise errors.DeviceError(f"there is no folder {fatpaths.join_path(parts)} on {self.description}{purpose}")
        return entries

    def _prepare_parent(self, parts: Sequence[str]) -> dict[str, _Entry]:
        entries = self._entries(parts[:-1])
        if entries is None:
            self.makedirs(fatpaths.join_path(parts[:-1]))
            entries = self._require_entries(parts[:-1], "")
        return entries

    # ----------------------------------------------------------------------------------------------- interface

    def read(self, path: str) -> bytes | None:
        parts = fatpaths.file_parts(path)
        entry = self._lookup(parts)
        if entry is None:
            return None
        if entry.is_dir:
            raise errors.DeviceError(f"{fatpaths.join_path(parts)} is a folder on {self.description}, not a file")
        return self._run_unless_missing("mtype", self._mpath(parts))

    def exists(self, path: str) -> bool:
        return self._lookup(fatpaths.split_path(path)) is not None

    def listdir(self, path: str = "/") -> list[str]:
        parts = fatpaths.split_path(path)
        entries = self._require_entries(parts, "")
        return sorted((entry.name for entry in entries.values()), key=lambda name: (name.lower(), name))

    def write_atomic(self, path: str, data: bytes) -> None:
        parts = fatpaths.file_parts(path)
        where = fatpaths.join_path(parts)
        entries = self._prepare_parent(parts)
        existing = entries.get(parts[-1].lower())
        if existing is not None and existing.is_dir:
            # mren would move the temp file *into* that folder.
            raise errors.DeviceError(f"{where} is a folder on {self.description}: refusing to replace it")
        target = [*parts[:-1], existing.name if existing else parts[-1]]
        temp = [*parts[:-1], fatpaths.new_temp_name(set(entries), target[-1])]
        with tempfile.TemporaryDirectory(prefix="abflasher-fat-") as staging:
            local = Path(staging) / "data"
            local.write_bytes(data)
            try:
                self._run("mcopy", "-o", str(local), self._mpath(temp))
                self._sync()
            except BaseException:
                self._discard("mdel", self._mpath(temp))
                raise
        # `mren -D o` deletes the old entry and renames the temp one within one mtools process: the only moment the
        # target is missing is between those two directory writes (see the module docstring).
        try:
            self._run("mren", "-D", "o", self._mpath(temp), self._mpath(target))
        except BaseException:
            self._discard("mdel", self._mpath(temp))
            raise
        self._sync()
        fatpaths.check_read_back(where, self.description, data, self._run("mtype", self._mpath(target)))

    def write_in_place(self, path: str, data: bytes) -> int:
        parts = fatpaths.file_parts(path)
        where = fatpaths.join_path(parts)
        entry = self._lookup(parts)
        if entry is None or entry.is_dir:
            raise errors.DeviceError(f"there is no file {where} on {self.description} to rewrite in place")
        changed = fatpaths.changed_sectors(where, self.description, self._run("mtype", self._mpath(parts)), data)
        if not changed:
            return 0
        # mtools has no in-place write: it finds the clusters (mshowfat) and the data area (the boot sector), and
        # the sectors are written here, straight to the device, so the FAT and the directory are never touched.
        clusters = parse_cluster_chain(self._run("mshowfat", self._mpath(parts)).decode(errors="replace"))
        try:
            fd = os.open(self.device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise errors.DeviceError(f"opening {self.device} to rewrite {where} failed: {exc.strerror}") from exc
        try:
            geometry = FatGeometry.from_boot_sector(os.pread(fd, SECTOR, self.offset), self.description)
            if len(clusters) * geometry.cluster_bytes < len(data):
                raise errors.DeviceError(f"{where} on {self.description} has fewer clusters than its size needs: "
                                         "run fsck.vfat on it")
            for index in changed:
                start = index * SECTOR
                cluster = clusters[start // geometry.cluster_bytes]
                position = self.offset + geometry.cluster_offset(cluster) + start % geometry.cluster_bytes
                os.pwrite(fd, data[start:start + SECTOR], position)
                # One sector on the medium before the next is written: the order is what makes it safe.
                os.fsync(fd)
        except OSError as exc:
            raise errors.DeviceError(f"rewriting {where} on {self.description} failed: {exc.strerror}") from exc
        finally:
            os.close(fd)
        fatpaths.check_read_back(where, self.description, data, self._run("mtype", self._mpath(parts)))
        return len(changed)

    def makedirs(self, path: str) -> None:
        parts = fatpaths.split_path(path)
        created = False
        for depth in range(1, len(parts) + 1):
            entry = self._lookup(parts[:depth])
            if entry is None:
                self._run("mmd", self._mpath(parts[:depth]))
                created = True
            elif not entry.is_dir:
                raise errors.DeviceError(f"{fatpaths.join_path(parts[:depth])} is a file on {self.description}, "
                                         f"so folder {fatpaths.join_path(parts)} cannot be created")
        if created:
            self._sync()

    def export_tree(self, src_dir: str, dest: Path) -> None:
        parts = fatpaths.split_path(src_dir)
        entries = self._require_entries(parts, " to copy")
        try:
            Path(dest).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise errors.DeviceError(f"cannot create {dest}: {exc.strerror or exc}") from exc
        if entries:
            sources = [self._mpath([*parts, entry.name]) for entry in sorted(entries.values(), key=lambda e: e.name)]
            self._run("mcopy", "-s", "-n", "-m", "-Q", *sources, str(dest) + "/")

    def import_tree(self, src: Path, dest_dir: str) -> None:
        source, parts = fatpaths.import_paths(src, dest_dir)
        if not parts:
            self._replace_root(source)
            return
        entries = self._prepare_parent(parts)
        existing = entries.get(parts[-1].lower())
        target = [*parts[:-1], existing.name if existing else parts[-1]]
        temp = [*parts[:-1], fatpaths.new_temp_name(set(entries), target[-1])]
        try:
            self._run("mmd", self._mpath(temp))
            self._copy_in(source, temp)
        except BaseException:
            self._discard("mdeltree", self._mpath(temp))
            raise
        # From here the old folder is gone until the rename: a crash leaves it missing (the temp copy is removed as
        # debris on the next start) and the caller writes it again.
        if existing is not None:
            self._run_unless_missing("mdeltree" if existing.is_dir else "mdel", self._mpath(target))
        self._run("mren", self._mpath(temp), self._mpath(target))
        self._sync()

    def _copy_in(self, source: Path, folder: Sequence[str]) -> None:
        """Copy the contents of local ``source`` into existing (empty) ``folder``, flush, and verify by reading back."""
        children = sorted(str(child) for child in source.iterdir() if child.is_dir() or child.is_file())
        if children:
            self._run("mcopy", "-s", "-o", "-m", "-Q", *children, self._mpath(folder).rstrip("/") + "/")
        self._sync()
        with tempfile.TemporaryDirectory(prefix="abflasher-fat-") as staging:
            readback = Path(staging) / "tree"
            self.export_tree(fatpaths.join_path(folder), readback)
            difference = fatpaths.first_difference(source, readback)
        if difference is not None:
            raise errors.DeviceError(f"the copy of {source} on {self.description} reads back different "
                                     f"({difference}): the medium may be failing")

    def _replace_root(self, source: Path) -> None:
        for entry in self._require_entries([], "").values():
            self._run_unless_missing("mdeltree" if entry.is_dir else "mdel", self._mpath([entry.name]))
        self._copy_in(source, [])

    def cleanup_stale_temp(self) -> list[str]:
        listing = self._run("mdir", "-/", "-a", "-b", "::/")
        stale: list[tuple[str, bool]] = []
        for line in listing.decode(errors="surrogateescape").splitlines():
            if not line.startswith("::/"):
                continue
            relative = line[len("::/"):]
            is_dir = relative.endswith("/")
            names = relative.rstrip("/").split("/")
            if not TEMP_NAME_RE.fullmatch(names[-1]):
                continue
            # Inside a stale temp folder: goes with it.
            if any(TEMP_NAME_RE.fullmatch(name) for name in names[:-1]):
                continue
            stale.append(("/" + "/".join(names), is_dir))
        for path, is_dir in stale:
            self._run_unless_missing("mdeltree" if is_dir else "mdel", "::" + path)
        if stale:
            self._sync()
        return sorted(path for path, _ in stale)

