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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from abflasher import errors
from abflasher.disk.mounts import mount_points, partitions_of

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKROGET = 0x125E
BLKZEROOUT = 0x127F
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

VERIFY_CHUNK = 2 << 20


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


def _swap_devices(swaps: str) -> set[str]:
    try:
        lines = Path(swaps).read_text().splitlines()[1:]
    except OSError:
        return set()
    return {line.split()[0] for line in lines if line.split()}


def check_not_in_use(path: str, rdev: int, *, mountinfo: str, swaps: str, sys_root: str) -> None:
    """Refuse a block device that is mounted, used as swap, held by dm/md, or whose partitions are mounted."""
    major, minor = os.major(rdev), os.minor(rdev)
    mounted = {device: points[0][1] for device, points in mount_points(mountinfo).items()}
    if (major, minor) in mounted:
        raise errors.DeviceError(f"{path} is mounted on {mounted[(major, minor)]}: refusing to write to it")
    if os.path.realpath(path) in {os.path.realpath(s) for s in _swap_devices(swaps)}:
        raise errors.DeviceError(f"{path} is in use as swap: refusing to write to it")
    sys_dev = Path(sys_root) / "dev" / "block" / f"{major}:{minor}"
    holders = sys_dev / "holders"
    if holders.is_dir() and any(holders.iterdir()):
        names = ", ".join(sorted(p.name for p in holders.iterdir()))
        raise errors.DeviceError(f"{path} is in use by {names}: refusing to write to it")
    for partition in partitions_of(Path(sys_root), (major, minor)):
        if partition.dev in mounted:
            raise errors.DeviceError(
                f"{path} holds partition {partition.name}, mounted on {mounted[partition.dev]}: refusing to write to it"
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


class ReadbackVerifier:
    """Reads the target back while the install is still writing it, and proves it holds the decoded image.

    The writer reports how far the device holds the image (``durable``): after each direct write, or after a flush of
    writes that went through the page cache. A thread reads up to there with O_DIRECT and hashes, so by the time the
    last block is written most of the verify is done. The image's first block reaches the device last (it is what
    makes the target look valid), so the hash starts from the in-memory copy of it and the device's copy is compared
    byte for byte at the end: sha256(first block in memory + rest from the device) equal to the stream's sha256, and
    the device's first block equal to the one in memory, is the device equal to the image.
    """

    def __init__(self, path: str, *, cancel: threading.Event | None = None,
                 observe: Callable[[int, memoryview], None] | None = None) -> None:
        """``observe(offset, piece)``, when given, is called with each piece read from the device, in order (the
        piece is only valid during the call)."""
        self.path = path
        self._cancel = cancel
        self._observe = observe
        self._fd, self._direct = self._open(path)
        self._hash = hashlib.sha256()
        self._first: memoryview | None = None
        self._position = 0
        self._durable = 0
        self._finishing = False
        self._stopped = False
        self._error: BaseException | None = None
        self._report: Callable[[int], None] | None = None
        self._cond = threading.Condition()
        self._buffer = mmap.mmap(-1, VERIFY_CHUNK)
        self._spare = mmap.mmap(-1, VERIFY_CHUNK)
        self._thread = threading.Thread(target=self._run, name="abflasher-verify", daemon=True)
        self._thread.start()

    @staticmethod
    def _open(path: str) -> tuple[int, bool]:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise errors.DeviceError(f"cannot open {path} to verify it: {exc.strerror}") from exc
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC), False

    def first_block(self, data: memoryview) -> None:
        """``data`` must stay unchanged until finish(): it is kept, not copied."""
        with self._cond:
            self._first = data
            self._hash.update(self._first)
            self._position = len(self._first)

    def durable(self, offset: int) -> None:
        with self._cond:
            self._durable = max(self._durable, offset)
            self._cond.notify()

    def _next_segment(self, start: int | None, *, wait: bool) -> tuple[int, int] | None:
        """The next piece to read back from ``start`` (None: from where the hash is): what the device holds already,
        at most VERIFY_CHUNK. With ``wait``, waits until there is one (None once finished or stopped); without, None
        when there is none yet."""
        with self._cond:
            while not self._stopped and (
                self._first is None or (self._position if start is None else start) >= self._durable
            ):
                if self._finishing or not wait:
                    return None
                self._cond.wait(timeout=0.5)
            if self._stopped:
                return None
            start = self._position if start is None else start
            return start, min(self._durable, start + VERIFY_CHUNK)

    def _run(self) -> None:
        # The next piece is read (the kernel and the device working) while this one is hashed (a core working):
        # reading back a slot that is already written, as a delta install does, costs the slower of the two.
        buffers = (self._buffer, self._spare)
        with ThreadPoolExecutor(1, thread_name_prefix="abflasher-readback") as reader:
            ahead: tuple[int, int, Future[None]] | None = None
            current = 0
            try:
                while True:
                    if ahead is None:
                        segment = self._next_segment(None, wait=True)
                        if segment is None:
                            return
                        start, end = segment
                        read = reader.submit(self._read, buffers[current], start, end)
                    else:
                        start, end, read = ahead
                    read.result()
                    following = self._next_segment(end, wait=False)
                    ahead = None
                    if following is not None:
                        ahead = (*following, reader.submit(self._read, buffers[1 - current], *following))
                    with memoryview(buffers[current]) as view:
                        if self._observe is not None:
                            self._observe(start, view[: end - start])
                        self._hash.update(view[: end - start])
                    if ahead is not None:
                        current = 1 - current
                    with self._cond:
                        self._position = end
                        report = self._report
                    if report is not None:
                        report(end)
                    if self._cancel is not None and self._cancel.is_set():
                        raise errors.Cancelled("cancelled while verifying")
            except BaseException as exc:
                self._error = exc
                if ahead is not None:
                    ahead[2].cancel()

    def _read(self, buffer: mmap.mmap, start: int, end: int) -> None:
        want = end - start
        if not self._direct:
            os.posix_fadvise(self._fd, start, want, os.POSIX_FADV_DONTNEED)
        # O_DIRECT reads whole logical blocks; the tail of the image is read rounded up and cut.
        request = (want + 4095) // 4096 * 4096 if self._direct else want
        got = _pread_full(self._fd, buffer, request, start)
        if got < want:
            raise errors.ChecksumMismatch(f"read-back of {self.path} ended at byte {start + got}, expected {end}")

    def finish(self, size: int, progress: Callable[[int], None] | None = None) -> str:
        """Wait until all ``size`` bytes were read back; returns the sha256 of the image as the device holds it."""
        digest = self.image_hash(size, progress)
        return digest if self.first_block_matches() else "first block differs on the device"

    def image_hash(self, size: int, progress: Callable[[int], None] | None = None) -> str:
        """Wait until all ``size`` bytes were read back; returns the sha256 of the first block as given and the rest
        as the device holds it (a delta update checks it before it writes the first block)."""
        with self._cond:
            self._durable = max(self._durable, size)
            self._finishing = True
            self._report = progress
            position = self._position
            self._cond.notify()
        if progress is not None:
            progress(position)
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._first is None:
            raise errors.Internal("the verify never saw the image's first block")
        return self._hash.hexdigest()

    def first_block_matches(self) -> bool:
        """Whether the device holds the first block as given (read now, once it is written)."""
        assert self._first is not None
        length = len(self._first)
        if not self._direct:
            os.posix_fadvise(self._fd, 0, length, os.POSIX_FADV_DONTNEED)
        got = _pread_full(self._fd, self._buffer, (length + 4095) // 4096 * 4096 if self._direct else length, 0)
        return got >= length and self._buffer[:length] == self._first

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._buffer.close()
        self._spare.close()
