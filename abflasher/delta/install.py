"""Build a slot from a casync index: chunks already in place are left alone, chunks the device holds are copied from
where they are (each checked against its id first), only the rest is downloaded; then the whole slot is read back.

Where a chunk comes from, in this order (docs/delta-updates.md):

1. **in place**: the target slot's old index says the same chunk is already at the same offset, and reading it there
   gives bytes whose digest is the chunk's id: nothing is written (SD-card wear);
2. **already built**: an earlier chunk of the new image with the same id, read back from the target;
3. **a seed**: a slot (the booted one, read-only) whose index says it holds the chunk; it may have changed since
   (a mounted file system does), so the bytes read are used only when their digest is the chunk's id;
4. **the target's old content elsewhere**: only at or after the offset being written, and after the held region, since
   the slot is built front to back: nothing there has been overwritten yet, so no chunk is read after being
   overwritten;
5. **the store**: fetched ahead of need on a few parallel connections (`delta/store.py`), each checked against its id.

Chunks of zeros are never fetched: where the target does not read as zeros already they are zeroed (BLKZEROOUT, a
punched hole). As in the full install the
image's start (the chunks beginning in the first `HOLD_BYTES`: the superblock or partition table) is zeroed first
and written last, after the image's sha256, computed over the chunks in order, matched the expected one; so an
install that fails or is cancelled leaves a slot that nothing mistakes for a file system. At the end the whole slot
is read back with O_DIRECT and its sha256 must equal the image's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from abflasher import errors
from abflasher.delta.index import Chunk, ChunkIndex
from abflasher.delta.store import ChunkFetcher, ChunkStore
from abflasher.disk.blockdev import ReadbackVerifier, Target, open_target, set_direct, zero_range
from abflasher.image.pipeline import Progress

#: Chunks that start within this many bytes of the image's start are written last (see the module docstring).
HOLD_BYTES = 64 << 10
PROGRESS_INTERVAL = 0.05

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


class _Builder:
    """One delta install: the plan (which chunks must be fetched) and the pass that builds the slot front to back."""

    def __init__(self, index: ChunkIndex, store: ChunkStore, target: Target, *,
                 seeds: Sequence[tuple[_Device, Seed]], target_index: ChunkIndex | None,
                 progress: ProgressCallback | None, cancel: threading.Event) -> None:
        self.index = index
        self.store = store
        self.target = target
        self.device = _Device(target.fd, target.path)
        self.seeds = seeds
        self.progress = progress
        self.cancel = cancel
        self.hash = hashlib.sha256()
        self.written = self.zeroed = self.in_place = self.from_seeds = self.seed_rejected = 0
        self.hold_end = 0
        for chunk in index:
            if chunk.offset >= HOLD_BYTES:
                break
            self.hold_end = chunk.end
        self.held: list[tuple[int, bytes]] = []
        self.held_in_place: dict[bytes, bytes] = {}
        # Where each chunk id may be found: in the seeds, and in the target's old content.
        self.in_seeds: dict[bytes, list[tuple[int, int]]] = {}
        for number, (_, seed) in enumerate(seeds):
            for chunk in seed.index:
                places = self.in_seeds.setdefault(chunk.id, [])
                if len(places) < 2:
                    places.append((number, chunk.offset))
        self.old_at: dict[int, tuple[int, bytes]] = {}
        self.old_by_id: dict[bytes, list[int]] = {}
        if target_index is not None and target_index.digest_name == index.digest_name:
            for chunk in target_index:
                self.old_at[chunk.offset] = (chunk.size, chunk.id)
                self.old_by_id.setdefault(chunk.id, []).append(chunk.offset)
        #: Chunks of the new image already on the target (written or found in place), by id: their offset.
        self.built: dict[bytes, int] = {}
        self._zero_ids: dict[int, bytes] = {}
        self._reported = 0.0

    # -- the plan ------------------------------------------------------------------------------------------------

    def zero_id(self, size: int) -> bytes:
        if size not in self._zero_ids:
            self._zero_ids[size] = self.index.digest(bytes(size))
        return self._zero_ids[size]

    def _old_elsewhere(self, chunk: Chunk) -> list[int]:
        """Offsets of the target's old content holding ``chunk`` that are still intact when it is written."""
        floor = max(chunk.offset, self.hold_end)
        return [offset for offset in self.old_by_id.get(chunk.id, ()) if offset >= floor]

    def to_fetch(self) -> list[Chunk]:
        """The chunks that no local copy is expected to provide, first occurrences only, in the order needed."""
        planned: list[Chunk] = []
        seen: set[bytes] = set()
        for chunk in self.index:
            known = chunk.id in seen
            seen.add(chunk.id)
            if known or chunk.id == self.zero_id(chunk.size) or chunk.id in self.in_seeds:
                continue
            if self.old_at.get(chunk.offset) == (chunk.size, chunk.id) or self._old_elsewhere(chunk):
                continue
            planned.append(chunk)
        return planned

    # -- building ------------------------------------------------------------------------------------------------

    def run(self, fetcher: ChunkFetcher, planned: set[bytes]) -> None:
        # The held chunks the target holds in place are read before their region is zeroed.
        for chunk in self.index:
            if chunk.offset >= self.hold_end:
                break
            data = self._in_place(chunk)
            if data is not None:
                self.in_place -= chunk.size  # they are written again, at the end
                self.held_in_place[chunk.id] = data
        self._zero(0, self.hold_end)
        for chunk in self.index:
            if self.cancel.is_set():
                raise errors.Cancelled("the install was cancelled")
            held = chunk.offset < self.hold_end
            if chunk.id == self.zero_id(chunk.size):
                self.hash.update(bytes(chunk.size))
                if held:
                    continue  # the held region is zeroed already
                # Reading is free of wear, and zeroing may not be (a card without WRITE ZEROES gets zeros written).
                if self.device.read(chunk.offset, chunk.size).count(0) == chunk.size:
                    self.in_place += chunk.size
                else:
                    self._zero(chunk.offset, chunk.size)
                    self.zeroed += chunk.size
            elif not held and (data := self._in_place(chunk)) is not None:
                self.hash.update(data)
            else:
                data = self._obtain(chunk, fetcher, planned)
                self.hash.update(data)
                if held:
                    self.held.append((chunk.offset, data))
                    continue
                self.device.write(chunk.offset, data)
                self.written += chunk.size
            if not held:
                self.built.setdefault(chunk.id, chunk.offset)
            self.report(chunk.end)

    def report(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.progress is not None and (force or now - self._reported >= PROGRESS_INTERVAL):
            self._reported = now
            self.progress(Progress("writing", done, self.index.size, self.written, self.store.downloaded))

    def _in_place(self, chunk: Chunk) -> bytes | None:
        """The chunk's bytes when the target already holds them at its offset (its old index says so and the
        bytes there match the id); None otherwise."""
        if self.old_at.get(chunk.offset) != (chunk.size, chunk.id):
            return None
        data = self.device.read(chunk.offset, chunk.size)
        if len(data) != chunk.size or self.index.digest(data) != chunk.id:
            return None
        self.in_place += chunk.size
        return data

    def _checked(self, device: _Device, offset: int, chunk: Chunk) -> bytes | None:
        data = device.read(offset, chunk.size)
        if len(data) == chunk.size and self.index.digest(data) == chunk.id:
            return data
        return None

    def _obtain(self, chunk: Chunk, fetcher: ChunkFetcher, planned: set[bytes]) -> bytes:
        """The chunk's bytes, checked against its id, from the first place that has them (module docstring)."""
        if chunk.id in planned:
            planned.discard(chunk.id)
            return fetcher.take(chunk)
        if chunk.id in self.held_in_place:
            return self.held_in_place[chunk.id]
        if chunk.id in self.built:
            data = self._checked(self.device, self.built[chunk.id], chunk)
            if data is not None:
                self.from_seeds += chunk.size
                return data
        for number, offset in self.in_seeds.get(chunk.id, ()):
            data = self._checked(self.seeds[number][0], offset, chunk)
            if data is not None:
                self.from_seeds += chunk.size
                return data
            self.seed_rejected += 1
        for offset in self._old_elsewhere(chunk):
            data = self._checked(self.device, offset, chunk)
            if data is not None:
                self.from_seeds += chunk.size
                return data
        for _, data in self.held:
            if self.index.digest(data) == chunk.id and len(data) == chunk.size:
                return data
        return fetcher.fetch_now(chunk)

    def _zero(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        if not zero_range(self.target, offset, length):
            zeros = bytes(min(length, 1 << 20))
            for position in range(offset, offset + length, len(zeros)):
                self.device.write(position, zeros[: min(len(zeros), offset + length - position)])

    def write_held(self) -> None:
        for offset, data in self.held:
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
    verify: bool = True,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    mountinfo: str = "/proc/self/mountinfo",
    sys_root: str = "/sys",
) -> DeltaResult:
    """Build ``target`` as the image ``index`` describes, from ``seeds``, the target's old content (described by
    ``target_index``) and ``store``; then read the target back and compare sha256.

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
            builder = _Builder(index, store, opened, seeds=opened_seeds, target_index=target_index,
                               progress=progress, cancel=cancel)
            planned = builder.to_fetch()
            fetcher = ChunkFetcher(store, planned)
            try:
                builder.run(fetcher, {chunk.id for chunk in planned})
            finally:
                fetcher.close()
            for device, _ in opened_seeds:
                with contextlib.suppress(OSError):
                    os.posix_fadvise(device.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        image_sha256 = builder.hash.hexdigest()
        if expected is not None and image_sha256 != expected:
            builder.sync()
            raise errors.ChecksumMismatch(
                f"sha256 mismatch: expected {expected}, the chunks of the index make {image_sha256}; "
                "the target was left incomplete"
            )
        builder.write_held()
        builder.sync()
        builder.report(index.size, force=True)
        if verify:
            _read_back(opened.path, index.size, image_sha256, progress, cancel)
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
        verified=verify,
        seconds=time.monotonic() - started,
    )


def _read_back(path: str, size: int, image_sha256: str, progress: ProgressCallback | None,
               cancel: threading.Event) -> None:
    """The existing read-back verify over the whole image, straight from the device."""
    verifier = ReadbackVerifier(path, cancel=cancel)
    try:
        verifier.first_block(memoryview(b""))

        def report(done: int) -> None:
            if progress is not None:
                progress(Progress("verifying", done, size, size))

        actual = verifier.finish(size, report)
    finally:
        verifier.close()
    if actual != image_sha256:
        raise errors.ChecksumMismatch(
            f"read-back verification of {path} failed: the device holds {actual} for the first {size} bytes, "
            f"{image_sha256} was written (failing medium?)"
        )
