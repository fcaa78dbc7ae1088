"""Reading and changing files on a FAT boot partition, mounted or not.

One interface, `FatVolume`, two ways in:

- `DirectoryVolume`: the file system is mounted (or, in tests, a plain directory stands for it); plain file I/O.
- `MtoolsVolume`: the partition is not mounted (or the kernel has no vfat driver); every operation is an mtools
  command on the device, or on a disk image at a byte offset (``-i DEV@@OFFSET``).

`open_volume` picks the right one and never hands out an `MtoolsVolume` for a file system the kernel has mounted:
mtools writing under a mounted FAT corrupts it.

Paths are volume paths, ``/``-separated, relative to the root (``/config.txt``, ``a/cmdline.txt``). Names are
case-insensitive as on FAT: an existing entry is found whatever the case asked for, and keeps its own case when it is
replaced. Names that FAT cannot hold (``"*:<>?\\|``, control characters) are refused, and so are ``[`` and ``]``,
which mtools would take as wildcards.

Atomic replacement. FAT has no atomic rename, so "atomic" here means: the new content is written in full under a
temporary 8.3 name (``ABF12345.TMP``) in the target's folder and flushed to the device first; only then is the old
entry replaced by the new one, and the result is read back and compared. A crash before the replacement leaves the
old file intact plus a temp file, which `cleanup_stale_temp` removes on the next start; a crash during the
replacement (a few directory-sector writes) can at worst leave the target missing next to a complete temp file, which
the caller detects and repairs on its next start (every boot file ab-flasher writes can be regenerated). Any
file or folder whose name matches the temp pattern is treated as debris of such a write.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from abflasher import errors
from abflasher.disk.mounts import mount_points

TEMP_NAME_RE = re.compile(r"ABF\d{5}\.TMP", re.IGNORECASE)
# Characters FAT long names cannot hold, plus mtools' wildcard brackets.
_FORBIDDEN_NAME_CHARS = frozenset('"*:<>?\\|[]') | frozenset(chr(code) for code in range(32)) | {"\x7f"}
SECTOR = 512
MTOOLS_TIMEOUT = 120.0
_NOT_FOUND_RE = re.compile(r'File ".*" not found')


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

    def remove(self, path: str) -> None:
        """Delete file ``path``; a missing file is fine, a folder is an error."""
        ...

    def makedirs(self, path: str) -> None:
        """Create folder ``path`` and its parents, like ``mkdir -p``."""
        ...

    def remove_tree(self, path: str) -> None:
        """Delete folder (or file) ``path`` with everything in it; missing is fine; the root is refused."""
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


# --------------------------------------------------------------------------------------------------- paths


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


def _file_parts(path: str) -> list[str]:
    parts = split_path(path)
    if not parts:
        raise errors.InvalidArgument(f"FAT path {path!r} is the volume root, not a file")
    return parts


def _join(parts: Sequence[str]) -> str:
    return "/" + "/".join(parts)


def _new_temp_name(taken: set[str], like: str = "") -> str:
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


def _check_read_back(where: str, description: str, written: bytes, read: bytes) -> None:
    if read != written:
        raise errors.DeviceError(
            f"{where} on {description} reads back different from what was written: the medium may be failing"
        )


def _first_difference(expected: Path, actual: Path) -> str | None:
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
            difference = _first_difference(want, got)
            if difference is not None:
                return f"{name}/{difference}"
        elif want.read_bytes() != got.read_bytes():
            return f"{name} has different contents"
    return None


def _local_source(src: Path) -> Path:
    src = Path(src)
    if not src.is_dir():
        raise errors.InvalidArgument(f"{src} is not a directory: import_tree copies a local directory")
    return src


# --------------------------------------------------------------------------------------------------- directory


class DirectoryVolume:
    """A FAT file system reached through a directory: its mount point, or a plain directory standing for it."""

    def __init__(self, root: Path, *, description: str | None = None) -> None:
        self.root = Path(root)
        self.description = description or f"FAT directory {self.root}"

    # ----------------------------------------------------------------------------------------------- helpers

    @contextmanager
    def _os_errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise errors.DeviceError(f"{action} on {self.description} failed: {exc.strerror or exc}") from exc

    def _child(self, folder: Path, name: str) -> Path | None:
        """``folder/name`` as it exists, matching the name case-insensitively (an exact match first)."""
        exact = folder / name
        if os.path.lexists(exact):
            return exact
        lowered = name.lower()
        try:
            candidates = sorted(entry for entry in os.listdir(folder) if entry.lower() == lowered)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return folder / candidates[0] if candidates else None

    def _resolve(self, parts: Sequence[str]) -> Path | None:
        current = self.root
        for name in parts:
            if not current.is_dir():
                return None
            found = self._child(current, name)
            if found is None:
                return None
            current = found
        return current

    def _target(self, parts: Sequence[str]) -> tuple[Path, Path]:
        """(existing parent folder, path of the entry: its existing spelling or the name asked for)."""
        parent = self._resolve(parts[:-1])
        if parent is None or not parent.is_dir():
            self.makedirs(_join(parts[:-1]))
            parent = self._resolve(parts[:-1])
            assert parent is not None
        return parent, self._child(parent, parts[-1]) or parent / parts[-1]

    @staticmethod
    def _fsync_dir(folder: Path) -> None:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _write_file(path: Path, data: bytes, *, exclusive: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
        fd = os.open(path, flags, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _copy_in(self, src: Path, dest: Path) -> None:
        """Copy a local tree into the volume, file by file and flushed (FAT has no modes or owners to copy)."""
        os.mkdir(dest)
        for child in sorted(src.iterdir()):
            if child.is_dir():
                self._copy_in(child, dest / child.name)
            elif child.is_file():
                self._write_file(dest / child.name, child.read_bytes(), exclusive=True)
        self._fsync_dir(dest)

    def _temp_in(self, folder: Path) -> Path:
        taken = {name.lower() for name in os.listdir(folder)}
        return folder / _new_temp_name(taken)

    # ----------------------------------------------------------------------------------------------- interface

    def read(self, path: str) -> bytes | None:
        parts = _file_parts(path)
        found = self._resolve(parts)
        if found is None:
            return None
        if found.is_dir():
            raise errors.DeviceError(f"{_join(parts)} is a folder on {self.description}, not a file")
        with self._os_errors(f"reading {_join(parts)}"):
            return found.read_bytes()

    def exists(self, path: str) -> bool:
        return self._resolve(split_path(path)) is not None

    def listdir(self, path: str = "/") -> list[str]:
        parts = split_path(path)
        found = self._resolve(parts)
        if found is None or not found.is_dir():
            raise errors.DeviceError(f"there is no folder {_join(parts)} on {self.description}")
        with self._os_errors(f"listing {_join(parts)}"):
            return sorted(os.listdir(found), key=lambda name: (name.lower(), name))

    def write_atomic(self, path: str, data: bytes) -> None:
        parts = _file_parts(path)
        where = _join(parts)
        with self._os_errors(f"writing {where}"):
            parent, target = self._target(parts)
            if target.is_dir():
                raise errors.DeviceError(f"{where} is a folder on {self.description}: refusing to replace it")
            temp = self._temp_in(parent)
            try:
                self._write_file(temp, data, exclusive=True)
                os.rename(temp, target)
            except BaseException:
                with suppress(OSError):
                    temp.unlink()
                raise
            self._fsync_dir(parent)
            _check_read_back(where, self.description, data, target.read_bytes())

    def remove(self, path: str) -> None:
        parts = _file_parts(path)
        found = self._resolve(parts)
        if found is None:
            return
        if found.is_dir():
            raise errors.DeviceError(f"{_join(parts)} is a folder on {self.description}: use remove_tree")
        with self._os_errors(f"removing {_join(parts)}"):
            found.unlink()
            self._fsync_dir(found.parent)

    def makedirs(self, path: str) -> None:
        current = self.root
        with self._os_errors(f"creating folder {path}"):
            for name in split_path(path):
                found = self._child(current, name)
                if found is None:
                    found = current / name
                    os.mkdir(found)
                    self._fsync_dir(current)
                elif not found.is_dir():
                    raise errors.DeviceError(f"{found.relative_to(self.root)} is a file on {self.description}, "
                                             f"so folder {path} cannot be created")
                current = found

    def remove_tree(self, path: str) -> None:
        parts = split_path(path)
        if not parts:
            raise errors.InvalidArgument(f"refusing to remove the whole of {self.description}")
        found = self._resolve(parts)
        if found is None:
            return
        with self._os_errors(f"removing {_join(parts)}"):
            if found.is_dir():
                shutil.rmtree(found)
            else:
                found.unlink()
            self._fsync_dir(found.parent)

    def export_tree(self, src_dir: str, dest: Path) -> None:
        parts = split_path(src_dir)
        found = self._resolve(parts)
        if found is None or not found.is_dir():
            raise errors.DeviceError(f"there is no folder {_join(parts)} on {self.description} to copy")
        with self._os_errors(f"copying {_join(parts)} out"):
            shutil.copytree(found, dest, dirs_exist_ok=True)

    def import_tree(self, src: Path, dest_dir: str) -> None:
        source = _local_source(src)
        parts = split_path(dest_dir)
        if not parts:
            self._replace_root(source)
            return
        where = _join(parts)
        with self._os_errors(f"copying {source} to {where}"):
            parent, target = self._target(parts)
            temp = self._temp_in(parent)
            try:
                self._copy_in(source, temp)
                difference = _first_difference(source, temp)
                if difference is not None:
                    raise errors.DeviceError(f"the copy of {source} on {self.description} reads back different "
                                             f"({difference}): the medium may be failing")
            except BaseException:
                shutil.rmtree(temp, ignore_errors=True)
                raise
            # From here the old folder is gone until the rename: a crash leaves it missing (the temp copy is
            # removed as debris on the next start) and the caller writes it again.
            if target.is_dir():
                shutil.rmtree(target)
            elif os.path.lexists(target):
                target.unlink()
            os.rename(temp, target)
            self._fsync_dir(parent)

    def _replace_root(self, source: Path) -> None:
        with self._os_errors(f"copying {source} to the root"):
            for name in os.listdir(self.root):
                old = self.root / name
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old)
                else:
                    old.unlink()
            for child in sorted(source.iterdir()):
                if child.is_dir():
                    self._copy_in(child, self.root / child.name)
                elif child.is_file():
                    self._write_file(self.root / child.name, child.read_bytes(), exclusive=True)
            self._fsync_dir(self.root)
            difference = _first_difference(source, self.root)
        if difference is not None:
            raise errors.DeviceError(f"the copy of {source} on {self.description} reads back different "
                                     f"({difference}): the medium may be failing")

    def cleanup_stale_temp(self) -> list[str]:
        removed: list[str] = []
        with self._os_errors("removing stale temp files"):
            for folder, dirs, files in os.walk(self.root):
                here = Path(folder)
                found = False
                for name in sorted(files):
                    if TEMP_NAME_RE.fullmatch(name):
                        (here / name).unlink()
                        removed.append(_join((here / name).relative_to(self.root).parts))
                        found = True
                for name in sorted(dirs):
                    if TEMP_NAME_RE.fullmatch(name):
                        shutil.rmtree(here / name)
                        removed.append(_join((here / name).relative_to(self.root).parts))
                        found = True
                dirs[:] = [name for name in dirs if not TEMP_NAME_RE.fullmatch(name)]
                if found:
                    self._fsync_dir(here)
        return sorted(removed)


# --------------------------------------------------------------------------------------------------- mtools


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
            raise errors.DeviceError(f"there is no folder {_join(parts)} on {self.description}{purpose}")
        return entries

    def _prepare_parent(self, parts: Sequence[str]) -> dict[str, _Entry]:
        entries = self._entries(parts[:-1])
        if entries is None:
            self.makedirs(_join(parts[:-1]))
            entries = self._require_entries(parts[:-1], "")
        return entries

    # ----------------------------------------------------------------------------------------------- interface

    def read(self, path: str) -> bytes | None:
        parts = _file_parts(path)
        entry = self._lookup(parts)
        if entry is None:
            return None
        if entry.is_dir:
            raise errors.DeviceError(f"{_join(parts)} is a folder on {self.description}, not a file")
        return self._run_unless_missing("mtype", self._mpath(parts))

    def exists(self, path: str) -> bool:
        return self._lookup(split_path(path)) is not None

    def listdir(self, path: str = "/") -> list[str]:
        parts = split_path(path)
        entries = self._require_entries(parts, "")
        return sorted((entry.name for entry in entries.values()), key=lambda name: (name.lower(), name))

    def write_atomic(self, path: str, data: bytes) -> None:
        parts = _file_parts(path)
        where = _join(parts)
        entries = self._prepare_parent(parts)
        existing = entries.get(parts[-1].lower())
        if existing is not None and existing.is_dir:
            # mren would move the temp file *into* that folder.
            raise errors.DeviceError(f"{where} is a folder on {self.description}: refusing to replace it")
        target = [*parts[:-1], existing.name if existing else parts[-1]]
        temp = [*parts[:-1], _new_temp_name(set(entries), target[-1])]
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
        _check_read_back(where, self.description, data, self._run("mtype", self._mpath(target)))

    def remove(self, path: str) -> None:
        parts = _file_parts(path)
        entry = self._lookup(parts)
        if entry is None:
            return
        if entry.is_dir:
            raise errors.DeviceError(f"{_join(parts)} is a folder on {self.description}: use remove_tree")
        self._run_unless_missing("mdel", self._mpath(parts))
        self._sync()

    def makedirs(self, path: str) -> None:
        parts = split_path(path)
        created = False
        for depth in range(1, len(parts) + 1):
            entry = self._lookup(parts[:depth])
            if entry is None:
                self._run("mmd", self._mpath(parts[:depth]))
                created = True
            elif not entry.is_dir:
                raise errors.DeviceError(f"{_join(parts[:depth])} is a file on {self.description}, "
                                         f"so folder {_join(parts)} cannot be created")
        if created:
            self._sync()

    def remove_tree(self, path: str) -> None:
        parts = split_path(path)
        if not parts:
            raise errors.InvalidArgument(f"refusing to remove the whole of {self.description}")
        entry = self._lookup(parts)
        if entry is None:
            return
        self._run_unless_missing("mdeltree" if entry.is_dir else "mdel", self._mpath(parts))
        self._sync()

    def export_tree(self, src_dir: str, dest: Path) -> None:
        parts = split_path(src_dir)
        entries = self._require_entries(parts, " to copy")
        try:
            Path(dest).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise errors.DeviceError(f"cannot create {dest}: {exc.strerror or exc}") from exc
        if entries:
            sources = [self._mpath([*parts, entry.name]) for entry in sorted(entries.values(), key=lambda e: e.name)]
            self._run("mcopy", "-s", "-n", "-m", "-Q", *sources, str(dest) + "/")

    def import_tree(self, src: Path, dest_dir: str) -> None:
        source = _local_source(src)
        parts = split_path(dest_dir)
        if not parts:
            self._replace_root(source)
            return
        entries = self._prepare_parent(parts)
        existing = entries.get(parts[-1].lower())
        target = [*parts[:-1], existing.name if existing else parts[-1]]
        temp = [*parts[:-1], _new_temp_name(set(entries), target[-1])]
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
            self.export_tree(_join(folder), readback)
            difference = _first_difference(source, readback)
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


# --------------------------------------------------------------------------------------------------- choosing


@dataclass(frozen=True)
class _BlockRange:
    """A block device (partition) covering bytes [start, start+size) of the device the FAT is addressed in."""

    name: str
    dev: tuple[int, int]
    start: int
    size: int


def _read_dev(path: Path) -> tuple[int, int] | None:
    try:
        major, _, minor = path.read_text().strip().partition(":")
        return int(major), int(minor)
    except (OSError, ValueError):
        return None


def _partitions_of(sys_root: Path, dev: tuple[int, int]) -> list[_BlockRange]:
    """The partitions of whole disk ``dev`` with their byte ranges, from sysfs (none for a partition)."""
    ranges: list[_BlockRange] = []
    disk = sys_root / "dev" / "block" / f"{dev[0]}:{dev[1]}"
    try:
        children = sorted(disk.iterdir())
    except OSError:
        return ranges
    for child in children:
        if not (child / "partition").is_file():
            continue
        number = _read_dev(child / "dev")
        try:
            start = int((child / "start").read_text()) * SECTOR
            size = int((child / "size").read_text()) * SECTOR
        except (OSError, ValueError):
            continue
        if number is not None:
            ranges.append(_BlockRange(child.name, number, start, size))
    return ranges


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
        number = _read_dev(loop / "dev")
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
    for part in _partitions_of(sys_root, dev):
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
