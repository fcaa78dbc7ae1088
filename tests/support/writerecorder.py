"""Record every write a piece of the product makes to chosen files or devices, and rebuild what a power cut leaves.

There is no device-mapper here (no dm-log-writes), so the recording is done in user space: `WriteRecorder` attaches
``strace`` to this very process (all its threads and every child it starts: mtools, mkfs.vfat), with every byte of
every write dumped in hex. `parse_strace` turns that into `RecordedWrite`s in the order they were made, with the file
offset each one landed at (tracked through openat, lseek, read and write, as the kernel does).

`check_replay` proves nothing escaped the recording: the image before, plus the recorded writes, must equal the
image after. `crash_states` then walks the writes and yields every state a power cut could leave: after each whole
write, and inside each multi-sector write after each of its sectors (a device commits a write sector by sector; one
sector is the unit it writes atomically).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

SECTOR = 512
ATTACH_TIMEOUT = 20.0
DETACH_TIMEOUT = 60.0
TRACED_CALLS = "openat,open,creat,lseek,read,pread64,write,pwrite64,writev,pwritev,pwritev2,ioctl,dup,dup2,dup3"

_CALL_RE = re.compile(r"^(?P<time>\d+\.\d+) (?P<name>\w+)\((?P<args>.*)\) += (?P<result>-?\d+)(?P<rest>.*)$")
_FD_RE = re.compile(r"^(\d+)<(.*?)>")
_DUMP_RE = re.compile(r"^ \| [0-9a-f]{5}  ((?:[0-9a-f]{2} {1,2}){1,16})")


@dataclass(frozen=True)
class RecordedWrite:
    time: float
    pid: int
    path: str
    offset: int
    data: bytes

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


@dataclass(frozen=True)
class RecordedZeroing:
    """A BLKZEROOUT/BLKDISCARD ioctl: the device range it names is changed (the recording keeps only the path)."""

    time: float
    pid: int
    path: str


class WriteRecorder:
    """``with WriteRecorder(workdir) as recorder: ...`` then ``recorder.writes()``: what this process wrote."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._prefix = self.workdir / "trace"
        self._strace: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> WriteRecorder:
        for old in self.workdir.glob("trace.*"):
            old.unlink()
        self._strace = subprocess.Popen(
            ["strace", "-p", str(os.getpid()), "-f", "-ff", "-qq", "-y", "-ttt", "-s", "0", "-e",
             f"trace={TRACED_CALLS}", "-e", "write=all", "-o", str(self._prefix)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + ATTACH_TIMEOUT
        while not self._all_threads_traced():
            if self._strace.poll() is not None:
                raise RuntimeError(f"strace could not attach: {self._strace.stderr.read().decode()}")  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                self._stop()
                raise RuntimeError("strace did not attach to the test process in time")
            time.sleep(0.02)
        return self

    @staticmethod
    def _all_threads_traced() -> bool:
        for task in Path("/proc/self/task").iterdir():
            try:
                status = (task / "status").read_text()
            except OSError:
                continue
            tracer = re.search(r"^TracerPid:\s+(\d+)", status, re.MULTILINE)
            if tracer is None or tracer.group(1) == "0":
                return False
        return True

    def _stop(self) -> None:
        if self._strace is None:
            return
        if self._strace.poll() is None:
            self._strace.send_signal(signal.SIGINT)
            try:
                self._strace.wait(timeout=DETACH_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._strace.kill()
                self._strace.wait(timeout=DETACH_TIMEOUT)
        if self._strace.stderr is not None:
            self._strace.stderr.close()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stop()

    def events(self) -> list[RecordedWrite | RecordedZeroing]:
        events: list[RecordedWrite | RecordedZeroing] = []
        for trace in sorted(self.workdir.glob("trace.*")):
            events.extend(parse_strace(trace.read_text(errors="replace"), int(trace.suffix[1:])))
        return sorted(events, key=lambda event: event.time)

    def writes(self, paths: Mapping[str, str] | None = None) -> list[RecordedWrite]:
        """The data writes, in order; with ``paths``, only those to these paths, renamed by the mapping."""
        found = [event for event in self.events() if isinstance(event, RecordedWrite)]
        if paths is None:
            return found
        return [RecordedWrite(w.time, w.pid, paths[w.path], w.offset, w.data) for w in found if w.path in paths]


def _fd_and_path(args: str) -> tuple[int, str] | None:
    match = _FD_RE.match(args)
    return (int(match.group(1)), match.group(2)) if match else None


def parse_strace(text: str, pid: int) -> list[RecordedWrite | RecordedZeroing]:
    """The writes in one ``strace -ff -y -ttt -e write=all`` output file (one process or thread)."""
    events: list[RecordedWrite | RecordedZeroing] = []
    positions: dict[int, int] = {}
    pending: tuple[float, str, int, int] | None = None  # time, path, offset, length of the write being dumped
    dumped = bytearray()

    def finish() -> None:
        nonlocal pending
        if pending is not None:
            when, path, offset, length = pending
            if len(dumped) != length:
                raise ValueError(f"strace dumped {len(dumped)} of the {length} bytes written to {path}")
            events.append(RecordedWrite(when, pid, path, offset, bytes(dumped)))
        pending = None
        dumped.clear()

    for line in text.splitlines():
        dump = _DUMP_RE.match(line)
        if dump:
            dumped.extend(bytes.fromhex(dump.group(1).replace(" ", "")))
            continue
        if line.startswith(" * "):
            continue  # "* N bytes in buffer K" of writev/pwritev
        match = _CALL_RE.match(line)
        if match is None:
            continue
        finish()
        name, args, result = match.group("name"), match.group("args"), int(match.group("result"))
        when = float(match.group("time"))
        if result < 0:
            continue
        if name in ("openat", "open", "creat"):
            positions[result] = 0
            continue
        if name in ("dup", "dup2", "dup3"):
            continue
        target = _fd_and_path(args)
        if target is None:
            continue
        fd, path = target
        if name == "lseek":
            positions[fd] = result
        elif name == "read":
            positions[fd] = positions.get(fd, 0) + result
        elif name in ("write", "writev"):
            start = positions.get(fd, 0)
            positions[fd] = start + result
            pending = (when, path, start, result)
        elif name in ("pwrite64", "pwritev", "pwritev2"):
            offset = int(args.rsplit(",", 2 if name == "pwritev2" else 1)[1].strip())
            pending = (when, path, offset, result)
        elif name == "ioctl" and ("BLKZEROOUT" in args or "BLKDISCARD" in args):
            events.append(RecordedZeroing(when, pid, path))
    finish()
    return events


def apply_write(image: Path, write: RecordedWrite, length: int | None = None) -> None:
    """Put the first ``length`` bytes (all by default) of ``write`` into ``image`` at its offset."""
    data = write.data if length is None else write.data[:length]
    with image.open("r+b") as handle:
        handle.seek(write.offset)
        handle.write(data)


def check_replay(pre: Mapping[str, Path], post: Mapping[str, Path], writes: list[RecordedWrite],
                 scratch: Path) -> None:
    """Assert that each image in ``pre`` plus the recorded writes to it is byte-for-byte its ``post``."""
    for name, before in pre.items():
        replayed = scratch / f"replay-{name}"
        replayed.write_bytes(before.read_bytes())
        for write in writes:
            if write.path == name:
                apply_write(replayed, write)
        if replayed.read_bytes() != post[name].read_bytes():
            raise AssertionError(f"{name}: the image before plus the recorded writes is not the image after: "
                                 "a write escaped the recording")
        replayed.unlink()


@dataclass(frozen=True)
class CrashState:
    """A state a power cut can leave: writes ``[0, index)`` whole, and ``sectors`` sectors of write ``index``."""

    index: int
    sectors: int  # 0: the state between writes index-1 and index
    label: str


def crash_states(working: Mapping[str, Path], writes: list[RecordedWrite]) -> Iterator[CrashState]:
    """Walk ``writes``, applying them to the ``working`` images (the images before, which are changed in place),
    and yield after each state a power cut could leave, ending with the state after the last write.

    A sector that a write leaves as it was (mtools rewrites whole FAT regions) makes no new state: the medium is the
    same as one already yielded, so it is not yielded again.
    """
    yield CrashState(0, 0, "before the first write")
    for index, write in enumerate(writes):
        image = working[write.path]
        # Sector boundaries are those of the device: a write that starts inside a sector completes it first.
        boundaries = [*range((write.offset // SECTOR + 1) * SECTOR, write.end, SECTOR), write.end]
        start = write.offset
        with image.open("r+b") as handle:
            for count, boundary in enumerate(boundaries, start=1):
                new = write.data[start - write.offset:boundary - write.offset]
                handle.seek(start)
                old = handle.read(len(new))
                start = boundary
                if old == new:
                    continue
                handle.seek(boundary - len(new))
                handle.write(new)
                handle.flush()
                if boundary == write.end:
                    break
                yield CrashState(index, count, f"write {index + 1}/{len(writes)} to {write.path} at byte "
                                               f"{write.offset}, cut after {boundary - write.offset} of "
                                               f"{len(write.data)}")
        yield CrashState(index + 1, 0, f"after write {index + 1}/{len(writes)} to {write.path} at byte "
                                       f"{write.offset} ({len(write.data)} bytes)")
