"""The target of an install: a partition (or whole disk) block device, or a regular file standing for one.

Opening is exclusive (O_EXCL on a block device makes the kernel refuse a device that is mounted or claimed by
device-mapper/md, and refuses a second writer), and direct (O_DIRECT) wherever the target allows it, so writes bypass
the page cache and the read-back verify reads what the device holds rather than what we just handed the kernel.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from abflasher import errors

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKROGET = 0x125E
BLKZEROOUT = 0x127F
BLKFLSBUF = 0x1261
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

VERIFY_CHUNK = 4 << 20


@dataclass
class Target:
    """An opened install target. ``capacity`` is None for a new/empty regular file, which may grow."""

    path: str
    fd: int
    capacity: int | None
    is_block_device: bool
    direct: bool
    logical_block_size: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _mounted_devices(mountinfo: str) -> dict[tuple[int, int], str]:
    """(major, minor) → mount point for every mounted block-backed file system."""
    mounted: dict[tuple[int, int], str] = {}
    try:
        text = Path(mountinfo).read_text()
    except OSError:
        return mounted
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        major, _, minor = fields[2].partition(":")
        if major.isdigit() and minor.isdigit():
            mounted[(int(major), int(minor))] = fields[4].replace("\\040", " ")
    return mounted


def _swap_devices(swaps: str) -> set[str]:
    try:
        lines = Path(swaps).read_text().splitlines()[1:]
    except OSError:
        return set()
    return {line.split()[0] for line in lines if line.split()}


def check_not_in_use(path: str, rdev: int, *, mountinfo: str, swaps: str, sys_root: str) -> None:
    """Refuse a block device that is mounted, used as swap, held by dm/md, or whose partitions are mounted."""
    major, minor = os.major(rdev), os.minor(rdev)
    mounted = _mounted_devices(mountinfo)
    if (major, minor) in mounted:
        raise errors.DeviceError(f"{path} is mounted on {mounted[(major, minor)]}: refusing to write to it")
    if os.path.realpath(path) in {os.path.realpath(s) for s in _swap_devices(swaps)}:
        raise errors.DeviceError(f"{path} is in use as swap: refusing to write to it")
    sys_dev = Path(sys_root) / "dev" / "block" / f"{major}:{minor}"
    holders = sys_dev / "holders"
    if holders.is_dir() and any(holders.iterdir()):
        names = ", ".join(sorted(p.name for p in holders.iterdir()))
        raise errors.DeviceError(f"{path} is in use by {names}: refusing to write to it")
    if sys_dev.is_dir():
        for child in sys_dev.iterdir():
            dev_file = child / "dev"
            if (child / "partition").is_file() and dev_file.is_file():
                cmaj, _, cmin = dev_file.read_text().strip().partition(":")
                key = (int(cmaj), int(cmin))
                if key in mounted:
                    raise errors.DeviceError(
                        f"{path} holds partition {child.name}, mounted on {mounted[key]}: refusing to write to it"
                    )


def open_target(
    path: str | os.PathLike[str],
    *,
    mountinfo: str = "/proc/self/mountinfo",
    swaps: str = "/proc/swaps",
    sys_root: str = "/sys",
    create: bool = False,
) -> Target:
    """Open ``path`` for writing an image into it, or raise DeviceError saying why it cannot be used."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not create:
            raise errors.DeviceError(f"target {path} does not exist") from None
        st = None
    except OSError as exc:
        raise errors.DeviceError(f"cannot access target {path}: {exc.strerror}") from exc

    if st is not None and stat.S_ISBLK(st.st_mode):
        check_not_in_use(path, st.st_rdev, mountinfo=mountinfo, swaps=swaps, sys_root=sys_root)
        flags = os.O_RDWR | os.O_EXCL | os.O_CLOEXEC
        is_block = True
    elif st is None or stat.S_ISREG(st.st_mode):
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if st is None else 0)
        is_block = False
    else:
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a block device or a regular file"
        raise errors.DeviceError(f"target {path} is {kind}")

    fd, direct = _open_maybe_direct(path, flags)
    try:
        if is_block:
            if struct.unpack("i", fcntl.ioctl(fd, BLKROGET, b"\0" * 4))[0]:
                raise errors.DeviceError(f"{path} is read-only")
            capacity: int | None = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
            block_size = struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
        else:
            size = os.fstat(fd).st_size
            # An existing non-empty file stands for a partition of that size; a new or empty one may grow.
            capacity = size if size > 0 else None
            block_size = 512
    except BaseException:
        os.close(fd)
        raise
    return Target(path, fd, capacity, is_block, direct, block_size)


def _open_maybe_direct(path: str, flags: int) -> tuple[int, bool]:
    try:
        return os.open(path, flags | os.O_DIRECT), True
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise errors.DeviceError(f"{path} is busy (mounted or opened exclusively by another program)") from exc
        if exc.errno != errno.EINVAL:
            raise errors.DeviceError(f"cannot open {path} for writing: {exc.strerror}") from exc
    # tmpfs and some other file systems refuse O_DIRECT; fall back to the page cache and drop it before verifying.
    try:
        return os.open(path, flags), False
    except OSError as exc:
        raise errors.DeviceError(f"cannot open {path} for writing: {exc.strerror}") from exc


def set_direct(fd: int, enabled: bool) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, (flags | os.O_DIRECT) if enabled else (flags & ~os.O_DIRECT))


def zero_range(target: Target, offset: int, length: int) -> bool:
    """Make [offset, offset+length) read back as zeros without transferring the zeros, if the target can.

    Block devices take BLKZEROOUT (WRITE ZEROES, which a loop device turns into a fallocate of its backing file, and
    which the kernel itself falls back to writing zero pages for on devices without it); a regular file gets a hole
    punched. Returns False when the target cannot, and the caller writes the zeros.
    """
    try:
        if target.is_block_device:
            fcntl.ioctl(target.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
        else:
            _fallocate(target.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            end = offset + length
            if os.fstat(target.fd).st_size < end:
                os.ftruncate(target.fd, end)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS):
            return False
        raise errors.DeviceError(f"zeroing {length} bytes at {offset} of {target.path} failed: {exc.strerror}") from exc
    return True


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def drop_cache(fd: int, offset: int, length: int) -> None:
    """Make the next read of this range come from the device, not from pages the write left in memory."""
    os.fsync(fd)
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def readback_sha256(
    path: str,
    length: int,
    *,
    progress: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
) -> str:
    """sha256 of the first ``length`` bytes of ``path`` as stored on the device.

    Reads with O_DIRECT into an aligned buffer where possible; otherwise drops the page cache for the range first.
    A reader thread keeps the device busy while this thread hashes (both release the GIL).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        direct = True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise errors.DeviceError(f"cannot open {path} to verify it: {exc.strerror}") from exc
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        direct = False
    try:
        if not direct:
            os.posix_fadvise(fd, 0, length, os.POSIX_FADV_DONTNEED)
        return _hash_fd(fd, path, length, direct=direct, progress=progress, cancel=cancel)
    finally:
        os.close(fd)


def _hash_fd(
    fd: int,
    path: str,
    length: int,
    *,
    direct: bool,
    progress: Callable[[int], None] | None,
    cancel: threading.Event | None,
) -> str:
    import queue

    digest = hashlib.sha256()
    free: queue.Queue[mmap.mmap] = queue.Queue()
    for _ in range(4):
        free.put(mmap.mmap(-1, VERIFY_CHUNK))
    filled: queue.Queue[tuple[mmap.mmap, int] | BaseException | None] = queue.Queue()
    stop = threading.Event()

    def read_all() -> None:
        offset = 0
        try:
            while offset < length:
                try:
                    buf = free.get(timeout=0.1)
                except queue.Empty:
                    if stop.is_set():
                        return
                    continue
                want = min(VERIFY_CHUNK, length - offset)
                # O_DIRECT reads whole logical blocks; the tail is read rounded up and cut.
                request = (want + 4095) // 4096 * 4096 if direct else want
                got = _pread_full(fd, buf, request, offset)
                if got < want:
                    raise errors.ChecksumMismatch(
                        f"read-back of {path} ended at byte {offset + got}, expected {length} bytes"
                    )
                filled.put((buf, want))
                offset += want
            filled.put(None)
        except BaseException as exc:
            filled.put(exc)

    reader = threading.Thread(target=read_all, name="abflasher-verify-read", daemon=True)
    reader.start()
    done = 0
    try:
        while True:
            if cancel is not None and cancel.is_set():
                raise errors.Cancelled("cancelled while verifying")
            item = filled.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            buf, n = item
            digest.update(memoryview(buf)[:n])
            free.put(buf)
            done += n
            if progress is not None:
                progress(done)
    finally:
        stop.set()
        reader.join()
    return digest.hexdigest()


def _pread_full(fd: int, buf: mmap.mmap, length: int, offset: int) -> int:
    view = memoryview(buf)
    got = 0
    try:
        while got < length:
            n = os.preadv(fd, [view[got:length]], offset + got)
            if n == 0:
                break
            got += n
    except OSError as exc:
        raise errors.DeviceError(f"I/O error reading back at byte {offset + got}: {exc.strerror}") from exc
    finally:
        view.release()
    return got
