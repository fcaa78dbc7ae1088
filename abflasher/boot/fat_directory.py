"""A FAT file system reached through a directory: its mount point (or, in tests, a plain directory standing for it).

Names are case-insensitive as on FAT: an existing entry is found whatever the case asked for, and keeps its own case
when it is replaced.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from abflasher import errors
from abflasher.boot.fatpaths import (
    SECTOR,
    TEMP_NAME_RE,
    changed_sectors,
    check_read_back,
    file_parts,
    first_difference,
    import_paths,
    join_path,
    new_temp_name,
    split_path,
)


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
            self.makedirs(join_path(parts[:-1]))
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
        return folder / new_temp_name(taken)

    # ----------------------------------------------------------------------------------------------- interface

    def read(self, path: str) -> bytes | None:
        parts = file_parts(path)
        found = self._resolve(parts)
        if found is None:
            return None
        if found.is_dir():
            raise errors.DeviceError(f"{join_path(parts)} is a folder on {self.description}, not a file")
        with self._os_errors(f"reading {join_path(parts)}"):
            return found.read_bytes()

    def exists(self, path: str) -> bool:
        return self._resolve(split_path(path)) is not None

    def listdir(self, path: str = "/") -> list[str]:
        parts = split_path(path)
        found = self._resolve(parts)
        if found is None or not found.is_dir():
            raise errors.DeviceError(f"there is no folder {join_path(parts)} on {self.description}")
        with self._os_errors(f"listing {join_path(parts)}"):
            return sorted(os.listdir(found), key=lambda name: (name.lower(), name))

    def write_atomic(self, path: str, data: bytes) -> None:
        parts = file_parts(path)
        where = join_path(parts)
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
            check_read_back(where, self.description, data, target.read_bytes())

    def write_in_place(self, path: str, data: bytes) -> int:
        parts = file_parts(path)
        where = join_path(parts)
        found = self._resolve(parts)
        if found is None or found.is_dir():
            raise errors.DeviceError(f"there is no file {where} on {self.description} to rewrite in place")
        with self._os_errors(f"rewriting {where} in place"):
            # No O_TRUNC: the file keeps its size and clusters; only the changed sectors reach the medium.
            changed = changed_sectors(where, self.description, found.read_bytes(), data)
            fd = os.open(found, os.O_RDWR | os.O_CLOEXEC)
            try:
                for index in changed:
                    start = index * SECTOR
                    os.pwrite(fd, data[start:start + SECTOR], start)
                    # One sector on the medium before the next is written: the order is what makes it safe.
                    os.fsync(fd)
            finally:
                os.close(fd)
            check_read_back(where, self.description, data, found.read_bytes())
        return len(changed)

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

    def export_tree(self, src_dir: str, dest: Path) -> None:
        parts = split_path(src_dir)
        found = self._resolve(parts)
        if found is None or not found.is_dir():
            raise errors.DeviceError(f"there is no folder {join_path(parts)} on {self.description} to copy")
        with self._os_errors(f"copying {join_path(parts)} out"):
            shutil.copytree(found, dest, dirs_exist_ok=True)

    def import_tree(self, src: Path, dest_dir: str) -> None:
        source, parts = import_paths(src, dest_dir)
        if not parts:
            self._replace_root(source)
            return
        where = join_path(parts)
        with self._os_errors(f"copying {source} to {where}"):
            parent, target = self._target(parts)
            temp = self._temp_in(parent)
            try:
                self._copy_in(source, temp)
                difference = first_difference(source, temp)
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
            difference = first_difference(source, self.root)
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
                        removed.append(join_path((here / name).relative_to(self.root).parts))
                        found = True
                for name in sorted(dirs):
                    if TEMP_NAME_RE.fullmatch(name):
                        shutil.rmtree(here / name)
                        removed.append(join_path((here / name).relative_to(self.root).parts))
                        found = True
                dirs[:] = [name for name in dirs if not TEMP_NAME_RE.fullmatch(name)]
                if found:
                    self._fsync_dir(here)
        return sorted(removed)

