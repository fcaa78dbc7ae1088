"""Build a slot from a casync index: chunks already in place are left alone, chunks the device holds are copied from
where they are (each checked against its id first), only the rest is downloaded; then the whole slot is read back.

The plan (delta/plan.py) builds the slot from its start to its end, says when the target's old content must be read
so that nothing is read after it was overwritten, and which chunks no local copy will provide. Each chunk then comes
from the first place that has it:

1. **in place**: the target slot's old index says the same chunk is already at the same offset, and reading it there
   gives bytes whose digest is the chunk's id: nothing is written (SD-card wear);
2. **the target's old content elsewhere**, read at the chunk's step when it lies further on, or read into memory
   (stashed) just before the step that overwrites it;
3. **already built**: an earlier chunk of the new image with the same id, read back from the target;
4. **a seed**: a slot (the booted one, read-only) whose index says it holds the chunk; it may have changed since (a
   mounted file system does), so the bytes read are used only when their digest is the chunk's id;
5. **the store**: fetched ahead of need on a few parallel connections (delta/store.py), each checked against its id.

Chunks of zeros are never fetched: where the target does not read as zeros already they are zeroed (BLKZEROOUT, a
punched hole). As in the full install, the image's start (the chunks beginning in its first `HOLD_BYTES`: the
superblock or partition table) is zeroed first and written last: the whole slot is read back with O_DIRECT (the held
start from memory) and its sha256 must equal the image's before the start is written, so an install that fails, is
cancelled or builds another image leaves a slot that nothing mistakes for a file system.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from abflasher import errors
from abflasher.delta.index import Chunk, ChunkIndex
from abflasher.delta.plan import SEED_UNKNOWN, Kind, Plan, Step, make_plan
from abflasher.delta.readback import compare_start, read_back
from abflasher.delta.store import ChunkFetcher, ChunkStore
from abflasher.disk.blockdev import Target, open_target, set_direct, zero_range
from abflasher.image.pipeline import Progress

log = logging.getLogger(__name__)

#: Chunks that start within this many bytes of the image's start are written last (see the module docstring).
HOLD_BYTES = 64 << 10
PROGRESS_INTERVAL = 0.05
#: Steps whose chunks lie next to each other on the target are built together, up to this many bytes: one read of
#: what they check or copy, one write of what changed (chunk-sized I/O at odd offsets costs a device round trip each).
BATCH_BYTES = 2 << 20
_IOV_MAX = 1024

ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class Seed:
    """A slot (or file) that may hold chunks of the new image: ``index`` is what it held when it was written."""

    path: str
    index: ChunkIndex
    description: str


@dataclass(frozen=True)
class DeltaResult:
    image_size: int
    image_sha256: str
    downloaded: int  # bytes received from the store, compressed
    fetched_chunks: int
    written: int  # bytes written to the target (zeroed ranges not included)
    zeroed: int
    in_place: int  # bytes found in place and not written
    from_seeds: int  # bytes copied from a seed or from elsewhere in the target
    seed_rejected: int  # chunks a seed's index promised whose bytes did not match (fetched or found elsewhere)
    repaired: int  # chunks the target's old index placed that the read-back found changed (fetched, then verified)
    verified: bool
    seconds: float

    @property
    def sha256(self) -> str:
        return self.image_sha256


class _Device:
    """An fd read (and for the target written) at any byte offset, with errors that say where."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    def read(self, offset: int, size: int) -> bytes:
        try:
            data = os.pread(self.fd, size, offset)
        except OSError as exc:
            raise errors.DeviceError(f"reading {self.path} at byte {offset} failed: {exc.strerror}") from exc
        return data

    def write(self, offset: int, data: bytes | memoryview) -> None:
        done = 0
        try:
            with memoryview(data) as view:
                while done < len(view):
                    done += os.pwrite(self.fd, view[done:], offset + done)
        except OSError as exc:
            raise errors.DeviceError(f"write to {self.path} failed at byte {offset + done}: {exc.strerror}") from exc

    def writev(self, offset: int, pieces: Sequence[bytes | memoryview]) -> None:
        """``pieces`` back to back from ``offset``, in as few calls as the kernel allows."""
        if len(pieces) == 1:
            self.write(offset, pieces[0])
            return
        total = sum(len(piece) for piece in pieces)
        try:
            done = os.pwritev(self.fd, pieces[:_IOV_MAX], offset)
        except OSError as exc:
            raise errors.DeviceError(f"write to {self.path} failed at byte {offset}: {exc.strerror}") from exc
        if done < total:
            # A short write (or more pieces than one call takes): the rest, from where it stopped.
            self.write(offset + done, b"".join(pieces)[done:])


class _Span:
    """Bytes read from a device at ``start``, handed out as views; what lies outside them is read on demand."""

    def __init__(self, device: _Device, start: int, data: bytes) -> None:
        self._device, self._start, self._view = device, start, memoryview(data)

    def get(self, offset: int, size: int) -> memoryview | bytes:
        if self._start <= offset and offset + size <= self._start + len(self._view):
            return self._view[offset - self._start : offset - self._start + size]
        return self._device.read(offset, size)


@dataclass(frozen=True)
class _Prepared:
    """What a batch's steps found on the devices: each candidate (chunk, bytes) and whether the bytes are the chunk;
    the first ``stashes`` are the batch's stashes; ``local`` maps a step's chunk number to its candidate."""

    candidates: list[tuple[Chunk, memoryview | bytes]]
    good: list[bool]
    stashes: int
    local: dict[int, int]
    zeros: dict[int, bool]


class _Builder:
    """One delta install: carries out the plan's steps (delta/plan.py), each chunk from the first place that has it."""

    def __init__(self, index: ChunkIndex, plan: Plan, store: ChunkStore, target: Target, *,
                 seeds: Sequence[tuple[_Device, Seed]], progress: ProgressCallback | None,
                 cancel: threading.Event) -> None:
        self.index = index
        self.plan = plan
        self.chunks = plan.chunks
        self.store = store
        self.target = target
        self.device = _Device(target.fd, target.path)
        self.seeds = seeds
        self.progress = progress
        self.cancel = cancel
        self.written = self.zeroed = self.in_place = self.from_seeds = self.seed_rejected = 0
        self.done = 0
        #: The held chunks in image order, once known; the region they cover is written last.
        self.held: list[tuple[int, bytes, bytes]] = []  # (offset, id, bytes)
        self.held_in_place: dict[bytes, bytes] = {}
        #: Chunks of the old content read ahead of their turn (plan.py), by id.
        self.stash: dict[bytes, bytes] = {}
        #: The chunks of the batch being built, by id: a chunk the new image holds twice is written from memory.
        self.batch_built: dict[bytes, bytes | memoryview] = {}
        #: For each chunk number of the new image, 1 once it is on the target (written or found in place); a chunk id
        #: is looked up in the indexes (ChunkIndex.numbers_of), never in a dict keyed by id: memory stays flat.
        self.built = bytearray(len(index))
        #: For each chunk number, 1 when it was taken as in place without being read (checked by the read-back).
        self.trusted = bytearray(len(index))
        self.repaired = 0
        self._reported = 0.0

    def run(self, fetcher: ChunkFetcher) -> None:
        held_steps = list(self.plan.steps[: self.plan.held])
        # The held chunks the target holds in place are read before their region is zeroed.
        for step in held_steps:
            chunk = self.chunks[step.number]
            data = self._checked(self.device, chunk.offset, chunk)
            if data is not None:
                self.held_in_place[chunk.id] = data
        self._zero(0, self.plan.hold_end)
        for step in held_steps:
            self._build_held(step.number, self.chunks[step.number], fetcher)
        for _, seed in self.seeds:
            next(seed.index.numbers_of(b""), None)  # its id table, made now rather than by two threads at once
        # While one batch is put together and written, the next one's bytes are read and hashed on another thread:
        # the steps go from the start to the end, so what a batch reads lies beyond what the batches before it
        # write (plan.py), and reading it early is safe.
        with ThreadPoolExecutor(1, thread_name_prefix="abflasher-delta-read") as reader:
            ahead: tuple[list[tuple[Step, Chunk]], Future[_Prepared]] | None = None
            for batch in self._batches(self.plan.held):
                prepared = reader.submit(self._prepare, batch)
                if ahead is not None:
                    self._finish(ahead[0], ahead[1].result(), fetcher)
                ahead = (batch, prepared)
                if self.cancel.is_set():
                    raise errors.Cancelled("the install was cancelled")
            if ahead is not None:
                self._finish(ahead[0], ahead[1].result(), fetcher)

    def _batches(self, first: int) -> Iterator[list[tuple[Step, Chunk]]]:
        """The steps from ``first`` on, in runs of up to `BATCH_BYTES` (the steps' chunks follow each other)."""
        batch: list[tuple[Step, Chunk]] = []
        size = 0
        for step in self.plan.steps.starting_at(first):
            chunk = self.chunks[step.number]
            if batch and size + chunk.size > BATCH_BYTES:
                yield batch
                batch, size = [], 0
            batch.append((step, chunk))
            size += chunk.size
        if batch:
            yield batch

    def _build_held(self, number: int, chunk: Chunk, fetcher: ChunkFetcher) -> None:
        if self.plan.fetches(number):
            data: bytes | None = fetcher.take(chunk)
        else:
            data = self.held_in_place.get(chunk.id)
        self.held.append((chunk.offset, chunk.id, data if data is not None else bytes(self._obtain(chunk, fetcher))))
        self.built[number] = 1
        self.done += chunk.size
        self.report(self.done)

    def _prepare(self, batch: list[tuple[Step, Chunk]]) -> _Prepared:
        """Read what ``batch`` checks in place, copies and stashes from the target and the seeds, a large read each,
        and hash every such candidate (on the reader thread: this touches nothing the installer changes)."""
        planned, stashed_by_then = self.plan.fetches, self.plan.stashed
        # What the steps check in place, and the sources they stash (those start within the batch's chunks).
        here = self._span([(chunk.offset, chunk.size) for step, chunk in batch
                           if step.kind is Kind.ZERO and not planned(step.number)] +
                          [(offset, self.chunks[number].size) for step, _ in batch for number, offset in step.stash])
        there = self._span([(step.source, chunk.size) for step, chunk in batch
                            if step.kind is Kind.OLD and not planned(step.number)])
        candidates: list[tuple[Chunk, memoryview | bytes]] = []
        for step, _ in batch:
            for number, offset in step.stash:
                stashed = self.chunks[number]
                candidates.append((stashed, here.get(offset, stashed.size)))
        stashes = len(candidates)
        local: dict[int, int] = {}  # step number -> its candidate
        zeros: dict[int, bool] = {}  # step number of a chunk of zeros -> whether the target holds zeros there
        seeded: dict[int, tuple[_Device, int]] = {}
        for step, chunk in batch:
            if planned(step.number):
                continue
            if step.kind is Kind.ZERO:
                zeros[step.number] = here.get(chunk.offset, chunk.size) == bytes(chunk.size)
            elif step.kind is Kind.OLD:
                local[step.number] = len(candidates)
                candidates.append((chunk, there.get(step.source, chunk.size)))
            elif step.kind is Kind.OTHER and not stashed_by_then(step.number):
                # The plan knows which seed holds the chunk, unless it gave up a copy for it.
                found = (self.seeds[step.seed][0], step.source) if step.seed >= 0 else (
                    self._seed_of(chunk) if step.seed == SEED_UNKNOWN else None)
                if found is not None:
                    seeded[step.number] = found
        # A seed's chunks that moved together stay together: read a run at a time too.
        for device, _ in self.seeds:
            span = self._span([(offset, self.chunks[n].size) for n, (other, offset) in seeded.items()
                               if other is device], device)
            for number, (other, offset) in seeded.items():
                if other is device:
                    local[number] = len(candidates)
                    candidates.append((self.chunks[number], span.get(offset, self.chunks[number].size)))
        good = [self.index.holds(chunk, data) for chunk, data in candidates]
        return _Prepared(candidates, good, stashes, local, zeros)

    def _finish(self, batch: list[tuple[Step, Chunk]], prepared: _Prepared, fetcher: ChunkFetcher) -> None:
        """Put ``batch`` together from what `_prepare` found and checked, the stashes, the fetcher and the rest of
        the places `_obtain` looks, and write the chunks that changed in runs."""
        candidates, good = prepared.candidates, prepared.good
        # Stashes are kept before any step of the batch writes: a stash's source is not overwritten before its step.
        for (stashed, stashed_bytes), ok in zip(candidates[: prepared.stashes], good, strict=False):
            if ok:
                self.stash[stashed.id] = bytes(stashed_bytes)
        out: list[tuple[int, int, bytes | memoryview | None]] = []  # (offset, size, bytes, or None for zeros)
        for step, chunk in batch:
            data: bytes | memoryview | None = None
            position = prepared.local.get(step.number)
            if self.plan.fetches(step.number):
                # A chunk the plan fetches is taken from the fetcher, which holds it within its budget until then.
                data = fetcher.take(chunk)
            elif step.kind is Kind.IN_PLACE:
                # Taken on the word of the target's old index, not read: the read-back checks it (delta/readback.py).
                self.in_place += chunk.size
                self.trusted[step.number] = 1
                continue
            elif step.number in prepared.zeros:
                # Reading is free of wear, and zeroing may not be (a card without WRITE ZEROES gets zeros written).
                if prepared.zeros[step.number]:
                    self.in_place += chunk.size
                else:
                    out.append((chunk.offset, chunk.size, None))
                continue
            elif position is not None and good[position]:
                data = candidates[position][1]
                self.from_seeds += chunk.size
            elif position is not None and step.kind is Kind.OTHER:
                self.seed_rejected += 1
            if data is None:
                data = self._obtain(chunk, fetcher, seeds=position is None)
            self.batch_built[chunk.id] = data
            out.append((chunk.offset, chunk.size, data))
        self.batch_built.clear()
        self._write_runs(out)
        for step, chunk in batch:
            self.built[step.number] = 1
            self.done += chunk.size
        self.report(self.done)

    def _span(self, ranges: Sequence[tuple[int, int]], device: _Device | None = None) -> _Span:
        """The bytes of ``device`` (the target) in ``ranges`` (offset, size): one read when they lie close together,
        as a run of chunks moved together does; otherwise each is read when asked for."""
        device = device or self.device
        if not ranges:
            return _Span(device, 0, b"")
        low = min(offset for offset, _ in ranges)
        high = max(offset + size for offset, size in ranges)
        if high - low > 2 * BATCH_BYTES:
            return _Span(device, 0, b"")
        return _Span(device, low, device.read(low, high - low))

    def _seed_of(self, chunk: Chunk) -> tuple[_Device, int] | None:
        """Where the first seed whose index lists ``chunk`` holds it."""
        return next(((device, seed.index.start(n)) for device, seed in self.seeds
                     for n in seed.index.numbers_of(chunk.id)), None)

    def _write_runs(self, out: list[tuple[int, int, bytes | memoryview | None]]) -> None:
        """Write the changed chunks, those that are next to each other in one call (the kernel then reads no partial
        page of theirs from the device first), zeros as a zeroed range."""
        out.sort(key=lambda item: item[0])
        run: list[bytes | memoryview] = []
        run_start = run_end = 0
        for offset, size, data in out:
            if data is None:
                self._zero(offset, size)
                self.zeroed += size
                continue
            if run and offset != run_end:
                self.device.writev(run_start, run)
                run = []
            if not run:
                run_start = run_end = offset
            run.append(data)
            run_end += len(data)
            self.written += len(data)
        if run:
            self.device.writev(run_start, run)

    def report(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.progress is not None and (force or now - self._reported >= PROGRESS_INTERVAL):
            self._reported = now
            self.progress(Progress("writing", done, self.index.size, self.written, self.store.downloaded))

    def _checked(self, device: _Device, offset: int, chunk: Chunk) -> bytes | None:
        data = device.read(offset, chunk.size)
        if self.index.holds(chunk, data):
            return data
        return None

    def _obtain(self, chunk: Chunk, fetcher: ChunkFetcher, *, seeds: bool = True) -> bytes | memoryview:
        """The chunk's bytes, checked against its id, from the first place that has them (module docstring)."""
        # Each of these was checked against its id when it was obtained.
        kept = self.stash.pop(chunk.id, None) or self.batch_built.get(chunk.id)
        if kept is not None:
            self.from_seeds += chunk.size
            return kept
        for _, held_id, held in self.held:
            if held_id == chunk.id:
                return held
        built = next((n for n in self.index.numbers_of(chunk.id) if self.built[n]), None)
        if built is not None:
            data = self._checked(self.device, self.index.start(built), chunk)
            if data is not None:
                self.from_seeds += chunk.size
                return data
        seed = self._seed_of(chunk) if seeds else None
        if seed is not None:
            data = self._checked(seed[0], seed[1], chunk)
            if data is not None:
                self.from_seeds += chunk.size
                return data
            self.seed_rejected += 1
        return fetcher.fetch_now(chunk)

    def _zero(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        if not zero_range(self.target, offset, length):
            zeros = bytes(min(length, 1 << 20))
            for position in range(offset, offset + length, len(zeros)):
                self.device.write(position, zeros[: min(len(zeros), offset + length - position)])

    def repair(self, numbers: Sequence[int]) -> None:
        """Write the chunks ``numbers`` (taken as in place, found changed by the read-back) from the store."""
        log.info("%d chunks the target's old index placed had changed since it was written: fetching them",
                 len(numbers))
        connection = self.store.connection() if self.store.remote else None
        try:
            for number in numbers:
                if self.cancel.is_set():
                    raise errors.Cancelled("the install was cancelled")
                chunk = self.chunks[number]
                self.device.write(chunk.offset, self.store.fetch(chunk, connection))
                self.written += chunk.size
                self.in_place -= chunk.size
                self.repaired += 1
        finally:
            if connection is not None:
                connection.close()
        self.sync()

    def held_bytes(self) -> bytes:
        return b"".join(data for _, _, data in sorted(self.held))

    def write_held(self) -> None:
        for offset, _, data in self.held:
            self.device.write(offset, data)
            self.written += len(data)

    def sync(self) -> None:
        try:
            os.fsync(self.target.fd)
        except OSError as exc:
            raise errors.DeviceError(f"flushing {self.target.path} failed: {exc.strerror}") from exc


def install_delta(
    index: ChunkIndex,
    store: ChunkStore,
    target: str | os.PathLike[str],
    *,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
    seeds: Sequence[Seed] = (),
    target_index: ChunkIndex | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    mountinfo: str = "/proc/self/mountinfo",
    sys_root: str = "/sys",
    scratch_dir: str | None = None,
) -> DeltaResult:
    """Build ``target`` as the image ``index`` describes, from ``seeds``, the target's old content (described by
    ``target_index``) and ``store``; then read the target back and compare sha256. The plan's and the indexes'
    lookup tables go to temporary files in ``scratch_dir`` (None: the system's temporary directory), removed
    whatever ends the install.

    Raises BadImage (the index does not describe ``expected_size`` bytes), TooLarge, ChecksumMismatch (a chunk the
    store keeps serving corrupt; the image's sha256 is not ``expected_sha256``; the read-back differs), Network,
    DeviceError, Cancelled. On any of them the target's first `HOLD_BYTES` read as zeros or were never written.
    """
    started = time.monotonic()
    cancel = cancel or store.cancel
    if expected_size is not None and index.size != expected_size:
        raise errors.BadImage(
            f"the index describes an image of {index.size} bytes, the update says {expected_size}: refusing it"
        )
    expected = expected_sha256.lower() if expected_sha256 else None
    with open_target(target, mountinfo=mountinfo, sys_root=sys_root) as opened:
        if opened.capacity is not None and index.size > opened.capacity:
            raise errors.TooLarge(
                f"the image is larger than {opened.path}: {index.size} bytes, the target holds {opened.capacity}"
            )
        # Chunks start at any byte: the page cache merges them into whole blocks; the verify reads the device.
        if opened.direct:
            set_direct(opened.fd, False)
        with contextlib.ExitStack() as stack:
            opened_seeds: list[tuple[_Device, Seed]] = []
            for seed in seeds:
                try:
                    fd = os.open(seed.path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    continue  # a seed is an offer, not a requirement
                stack.callback(os.close, fd)
                opened_seeds.append((_Device(fd, seed.path), seed))
            for used in (index, target_index, *(seed.index for _, seed in opened_seeds)):
                if used is not None and used.scratch_dir is None:
                    used.scratch_dir = scratch_dir
            plan = make_plan(index, target_index=target_index, hold_bytes=HOLD_BYTES, scratch_dir=scratch_dir,
                             seeds=[seed.index for _, seed in opened_seeds])
            stack.callback(plan.close)
            builder = _Builder(index, plan, store, opened, seeds=opened_seeds, progress=progress, cancel=cancel)
            fetcher = ChunkFetcher(store, plan.fetch)
            try:
                builder.run(fetcher)
            finally:
                fetcher.close()
            for device, _ in opened_seeds:
                with contextlib.suppress(OSError):
                    os.posix_fadvise(device.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        builder.sync()
        builder.report(index.size, force=True)

        image_sha256 = _verify(builder, opened.path, expected=expected, progress=progress, cancel=cancel)
        with contextlib.suppress(OSError):
            os.posix_fadvise(opened.fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return DeltaResult(
        image_size=index.size,
        image_sha256=image_sha256,
        downloaded=store.downloaded,
        fetched_chunks=store.fetched_chunks,
        written=builder.written,
        zeroed=builder.zeroed,
        in_place=builder.in_place,
        from_seeds=builder.from_seeds,
        seed_rejected=builder.seed_rejected,
        repaired=builder.repaired,
        verified=True,
        seconds=time.monotonic() - started,
    )


def _verify(builder: _Builder, path: str, *, expected: str | None, progress: ProgressCallback | None,
            cancel: threading.Event) -> str:
    """Read the slot back until it is the image (readback.py): once, or twice when chunks taken as in place had
    changed and were written; then write the held start and compare it on the device. Returns the image's sha256."""
    trusted: bytearray | None = builder.trusted
    while True:
        # The verify reads with O_DIRECT from where the block it holds in memory ends: a whole number of pages.
        held = builder.held_bytes()
        aligned = min(builder.index.size, -(-len(held) // 4096) * 4096)
        held += builder.device.read(len(held), aligned - len(held))
        image_sha256, changed = read_back(path, builder.index, held=held, expected=expected, trusted=trusted,
                                          progress=progress, cancel=cancel)
        if image_sha256 is not None:
            break
        builder.repair(changed)
        trusted = None  # the second read-back proves every byte
    builder.write_held()
    builder.sync()
    compare_start(path, held)
    return image_sha256
