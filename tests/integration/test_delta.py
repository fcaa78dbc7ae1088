"""Delta updates on real loop devices from a real HTTP server: a casync index and chunk store made by Debian's
casync (``make_delta``), installed by the engine from seeds, chunks in place and the store, and every way that can
go wrong (docs/delta-updates.md)."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard

from abflasher import errors
from abflasher.api import UpdateRequest
from abflasher.delta.index import Chunk, ChunkIndex, parse_index
from abflasher.delta.install import HOLD_BYTES, DeltaResult, Seed, _Builder
from abflasher.delta.publish import make_delta
from abflasher.delta.store import StoreOptions
from abflasher.delta.update import install_from_index
from abflasher.image.pipeline import Progress
from tests.support.httpserver import FaultServer
from tests.support.loopdev import LoopDisk
from tests.support.pidisk import build_root_image
from tests.support.simpi import SimulatedPi

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

MIB = 1 << 20
IMAGE_MB = 20
FAST = StoreOptions(retries=2, backoff=0.01, max_backoff=0.05, connections=3)


def blobs(version: int) -> dict[str, bytes]:
    """Files of random content (as incompressible as real binaries' deltas are), ~10 % changed per version."""
    rng = random.Random(1)
    files = {f"usr/lib/blob-{n:02d}.bin": rng.randbytes(160_000 + 7_000 * n) for n in range(24)}
    for step in range(1, version):
        rng = random.Random(100 + step)
        files[f"usr/lib/blob-{step:02d}.bin"] = rng.randbytes(150_000)  # changed
        files[f"usr/lib/new-{step:02d}.bin"] = rng.randbytes(90_000)  # added
        files.pop(f"usr/lib/blob-{10 + step:02d}.bin", None)  # removed
    return files


@dataclass(frozen=True)
class Release:
    version: str
    raw: Path
    sha256: str
    index: ChunkIndex
    index_path: Path


@dataclass(frozen=True)
class Published:
    root: Path
    releases: dict[str, Release]

    def serve(self, server: FaultServer) -> None:
        for path in self.root.rglob("*"):
            if path.is_file():
                server.add(f"/pub/{path.relative_to(self.root)}", path.read_bytes())

    def chunk_path(self, chunk: Chunk) -> str:
        return f"/pub/default.castr/{chunk.hex[:4]}/{chunk.hex}.cacnk"


def publish(tmp_path: Path, versions: dict[str, int]) -> Published:
    out = tmp_path / "pub"
    releases = {}
    for version, generation in versions.items():
        raw = tmp_path / f"root-{version}.img"
        build_root_image(raw, version, size_mb=IMAGE_MB, extra_files=blobs(generation))
        made = make_delta(raw, out, name=f"root-{version}")
        assert made.image_sha256 == hashlib.sha256(raw.read_bytes()).hexdigest()
        releases[version] = Release(version, raw, made.image_sha256, parse_index(made.index.read_bytes()), made.index)
    return Published(out, releases)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    return publish(tmp_path_factory.mktemp("delta"), {"1.1.0": 1, "1.2.0": 2})


@pytest.fixture
def server(published: Published) -> Iterator[FaultServer]:
    with FaultServer() as running:
        published.serve(running)
        yield running


def put(node: str, data: bytes) -> None:
    fd = os.open(node, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(node: str, length: int, offset: int = 0) -> bytes:
    fd = os.open(node, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def sectors_written(node: str) -> int:
    """The kernel's count of sectors written to the block device ``node`` (its /sys stat, field 7)."""
    return int(Path(f"/sys/class/block/{os.path.basename(node)}/stat").read_text().split()[6])


def chunk_requests(server: FaultServer) -> list[str]:
    with server.lock:
        return [r.path for r in server.requests if r.path.endswith(".cacnk")]


def needed_from_store(published: Published, new: str, old: str) -> list[Chunk]:
    """Chunks of release ``new`` that release ``old`` does not have (and that are not zeros)."""
    index = published.releases[new].index
    have = {c.id for c in published.releases[old].index}
    return [c for c in index if c.id not in have and c.id != index.digest(bytes(c.size))]


def install(server: FaultServer, published: Published, version: str, target: str, **kwargs: Any) -> DeltaResult:
    release = published.releases[version]
    kwargs.setdefault("expected_sha256", release.sha256)
    kwargs.setdefault("expected_size", release.index.size)
    kwargs.setdefault("options", FAST)
    return install_from_index(server.url(f"/pub/{release.index_path.name}"), "", target, **kwargs)


def seed_of(published: Published, version: str, node: str) -> Seed:
    return Seed(node, published.releases[version].index, f"{node} holding {version}")


def test_builds_the_new_release_from_the_seed_and_fetches_only_what_changed(
    loop_disk: LoopDisk, server: FaultServer, published: Published
) -> None:
    seed, target = loop_disk.partition(2), loop_disk.partition(3)
    put(seed, published.releases["1.1.0"].raw.read_bytes())
    put(target, random.Random(5).randbytes(2 * MIB))  # an old slot: garbage, nothing known of it
    result = install(server, published, "1.2.0", target, seeds=[seed_of(published, "1.1.0", seed)])
    new = published.releases["1.2.0"]
    assert read(target, new.index.size) == new.raw.read_bytes()
    assert result.verified
    assert result.image_sha256 == new.sha256
    needed = needed_from_store(published, "1.2.0", "1.1.0")
    assert sorted(chunk_requests(server)) == sorted({published.chunk_path(c) for c in needed})
    full_store = sum(p.stat().st_size for p in (published.root / "default.castr").rglob("*.cacnk"))
    assert result.downloaded < full_store / 3
    # Keep-alive: the server runs one thread per connection; one for the index, the rest for the chunks.
    assert len(needed) > 2 * FAST.connections
    with server.lock:
        assert len(server.threads) <= 1 + FAST.connections


def test_a_corrupted_local_chunk_is_fetched_instead(
    loop_disk: LoopDisk, server: FaultServer, published: Published
) -> None:
    seed, target = loop_disk.partition(2), loop_disk.partition(3)
    old = published.releases["1.1.0"]
    image = bytearray(old.raw.read_bytes())
    new_ids = {c.id for c in published.releases["1.2.0"].index}
    victim = next(c for c in old.index if c.id in new_ids and c.offset > HOLD_BYTES and
                  c.id != old.index.digest(bytes(c.size)))
    image[victim.offset + victim.size // 2] ^= 0xFF
    put(seed, bytes(image))
    result = install(server, published, "1.2.0", target, seeds=[seed_of(published, "1.1.0", seed)])
    assert read(target, old.index.size) == published.releases["1.2.0"].raw.read_bytes()
    assert result.seed_rejected >= 1
    assert published.chunk_path(victim) in chunk_requests(server)


def test_a_corrupted_remote_chunk_is_refused_retried_then_a_clear_error(
    loop_disk: LoopDisk, server: FaultServer, published: Published
) -> None:
    target = loop_disk.partition(3)
    chunk = needed_from_store(published, "1.2.0", "1.1.0")[0]
    # A well-formed zstd chunk of the right size, with other content: only the id check can tell.
    server.add(published.chunk_path(chunk), zstandard.compress(bytes(chunk.size - 1) + b"x"))
    with pytest.raises(errors.ChecksumMismatch, match=f"chunk {chunk.hex}.*corrupt.*does not match its id"):
        install(server, published, "1.2.0", target)
    assert server.count(published.chunk_path(chunk)) == FAST.retries + 1
    assert read(target, HOLD_BYTES) == bytes(HOLD_BYTES), "the slot must not look like a file system"


def test_a_missing_chunk_is_a_clear_error(loop_disk: LoopDisk, server: FaultServer, published: Published) -> None:
    target = loop_disk.partition(3)
    chunk = needed_from_store(published, "1.2.0", "1.1.0")[-1]
    with server.lock:
        del server.resources[published.chunk_path(chunk)]
    with pytest.raises(errors.Network, match=f"chunk {chunk.hex} .*missing \\(HTTP 404\\)"):
        install(server, published, "1.2.0", target)
    assert read(target, HOLD_BYTES) == bytes(HOLD_BYTES)


def test_a_connection_dropped_mid_chunk_is_resumed(
    loop_disk: LoopDisk, server: FaultServer, published: Published
) -> None:
    seed, target = loop_disk.partition(2), loop_disk.partition(3)
    put(seed, published.releases["1.1.0"].raw.read_bytes())
    chunk = needed_from_store(published, "1.2.0", "1.1.0")[0]
    path = published.chunk_path(chunk)
    body = server.resources[path].body
    server.add(path, body, drop_after=len(body) // 2, drop_requests=1, etag='"c1"')
    install(server, published, "1.2.0", target, seeds=[seed_of(published, "1.1.0", seed)])
    assert read(target, published.releases["1.2.0"].index.size) == published.releases["1.2.0"].raw.read_bytes()
    first, second = server.requests_for(path)
    assert first.range is None
    assert (second.range, second.if_range) == (f"bytes={len(body) // 2}-", '"c1"'), "resumed, not restarted"


def test_an_index_of_another_size_is_refused_before_anything_is_written(
    loop_disk: LoopDisk, server: FaultServer, published: Published
) -> None:
    target = loop_disk.partition(3)
    before = read(target, 4 * MIB)
    size = published.releases["1.2.0"].index.size
    with pytest.raises(errors.BadImage, match=f"describes an image of {size} bytes, the update says {size + 4096}"):
        install(server, published, "1.2.0", target, expected_size=size + 4096)
    assert read(target, 4 * MIB) == before
    assert not chunk_requests(server)


def test_an_index_of_another_image_fails_its_sha256_and_leaves_the_slot_invalid(
    loop_disk: LoopDisk, server: FaultServer, published: Published
) -> None:
    target = loop_disk.partition(3)
    with pytest.raises(errors.ChecksumMismatch, match="sha256 mismatch: expected " + "0" * 64):
        install(server, published, "1.2.0", target, expected_sha256="0" * 64)
    assert read(target, HOLD_BYTES) == bytes(HOLD_BYTES)


def test_a_seed_modified_during_the_install_is_caught_by_the_chunk_check(
    loop_disk: LoopDisk, server: FaultServer, published: Published
) -> None:
    seed, target = loop_disk.partition(2), loop_disk.partition(3)
    old = published.releases["1.1.0"]
    put(seed, old.raw.read_bytes())
    new_ids = {c.id for c in published.releases["1.2.0"].index}
    reused = [c for c in old.index if c.id in new_ids and c.offset > HOLD_BYTES
              and c.id != old.index.digest(bytes(c.size))]
    later = reused[len(reused) // 2 :]
    assert len(later) >= 4
    changed = threading.Event()

    def change_the_seed(progress: Progress) -> None:
        # The booted slot's file system writes while the install runs: here, every chunk of its second half.
        if not changed.is_set() and progress.stage == "writing":
            changed.set()
            fd = os.open(seed, os.O_WRONLY)
            try:
                for chunk in later:
                    os.pwrite(fd, b"\xa5" * chunk.size, chunk.offset)
                os.fsync(fd)
            finally:
                os.close(fd)

    result = install(server, published, "1.2.0", target, seeds=[seed_of(published, "1.1.0", seed)],
                     progress=change_the_seed)
    assert changed.is_set()
    assert read(target, old.index.size) == published.releases["1.2.0"].raw.read_bytes()
    assert result.seed_rejected >= len(later) // 2


def test_chunks_in_place_are_not_written_again(
    loop_disk: LoopDisk, server: FaultServer, published: Published
) -> None:
    target = loop_disk.partition(3)
    release = published.releases["1.2.0"]
    put(target, release.raw.read_bytes())
    before = sectors_written(target)
    result = install(server, published, "1.2.0", target, target_index=release.index)
    written = (sectors_written(target) - before) * 512
    # Only the held start of the image (the chunks that begin in its first HOLD_BYTES) is zeroed and written again,
    # so an interrupted install leaves no valid superblock; nothing else of the 20 MiB reaches the device.
    held = max(c.end for c in release.index if c.offset < HOLD_BYTES)
    held_blocks = -(-held // 4096) * 4096
    assert 0 < written <= 2 * held_blocks, (written, held)
    assert result.written == held
    assert result.in_place == release.index.size - held
    assert not chunk_requests(server)
    assert read(target, release.index.size) == release.raw.read_bytes()


@pytest.mark.parametrize(("vouched", "changed"), [("image", "data"), ("image", "zeros"), ("index", "data")])
def test_a_chunk_in_place_that_changed_since_its_index_was_kept_is_repaired_after_the_read_back(
    loop_disk: LoopDisk, server: FaultServer, published: Published, vouched: str, changed: str
) -> None:
    """Chunks the target's old index places are not read before the install: the read-back checks them. One that
    changed since (the old slot was mounted and written, as a slot that ran a system is) is fetched, and the slot is
    read back again."""
    target = loop_disk.partition(3)
    new = published.releases["1.2.0"]
    # Zeros in place: an install of this very release after one that stopped halfway (its index is the target's).
    old = new if changed == "zeros" else published.releases["1.1.0"]
    old_places = {(c.offset, c.id) for c in old.index}
    image = bytearray(old.raw.read_bytes())
    victim = next(c for c in new.index if (c.offset, c.id) in old_places and c.offset > HOLD_BYTES and
                  (c.id == new.index.digest(bytes(c.size))) == (changed == "zeros"))
    image[victim.offset + victim.size // 2] ^= 0xFF
    put(target, bytes(image))
    sha256 = new.sha256 if vouched == "image" else hashlib.sha256(new.index_path.read_bytes()).hexdigest()
    result = install(server, published, "1.2.0", target, target_index=old.index, expected_sha256=sha256)
    assert read(target, new.index.size) == new.raw.read_bytes()
    assert result.repaired == 1
    assert published.chunk_path(victim) in chunk_requests(server)


def test_a_difference_outside_the_chunks_in_place_still_fails_the_read_back(
    loop_disk: LoopDisk, server: FaultServer, published: Published, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A medium that does not keep what was written is not repaired: the install fails, nothing armed."""
    target = loop_disk.partition(3)
    old, new = published.releases["1.1.0"], published.releases["1.2.0"]
    put(target, old.raw.read_bytes())
    old_places = {(c.offset, c.id) for c in old.index}
    written = next(c for c in new.index if (c.offset, c.id) not in old_places and c.offset > HOLD_BYTES)
    original_sync = _Builder.sync

    def sync_then_fail_the_medium(self: _Builder) -> None:
        original_sync(self)
        if not getattr(self, "damaged", False):
            self.damaged = True  # type: ignore[attr-defined]
            fd = os.open(target, os.O_WRONLY)
            try:
                os.pwrite(fd, b"\x5a", written.offset + written.size // 2)
                os.fsync(fd)
            finally:
                os.close(fd)

    monkeypatch.setattr(_Builder, "sync", sync_then_fail_the_medium)
    with pytest.raises(errors.ChecksumMismatch, match="sha256 mismatch"):
        install(server, published, "1.2.0", target, target_index=old.index)
    assert read(target, HOLD_BYTES) == bytes(HOLD_BYTES), "the start of the slot stays zeros: nothing mistakes it"


# ----------------------------------------------------------------------------------------------- through Update


@pytest.fixture
def pi(tmp_path: Path) -> Iterator[SimulatedPi]:
    with SimulatedPi(tmp_path, "prefix", config={"http_retries": 2}) as device:
        yield device


def update(pi: SimulatedPi, server: FaultServer, release: Release, **options: object) -> list[Progress]:
    updater = pi.updater()
    seen: list[Progress] = []
    request = UpdateRequest(version=release.version, url=server.url(f"/pub/{release.index_path.name}"),
                            sha256=release.sha256, **options)  # type: ignore[arg-type]
    updater.run(updater.prepare(request), seen.append, threading.Event())
    return seen


def test_delta_updates_through_update_trial_boot_and_reuse_the_kept_index(
    pi: SimulatedPi, server: FaultServer, published: Published
) -> None:
    progress = update(pi, server, published.releases["1.1.0"])
    assert pi.slot_for(pi.firmware(tryboot=True)) == "b"
    assert pi.slot_for(pi.firmware(tryboot=False)) == "a"
    assert any(p.stage == "writing" and p.downloaded > 0 for p in progress), "progress counts downloaded bytes"
    assert pi.boot(tryboot=True) == "b"
    result = pi.updater().boot_check()
    assert (result.trial, result.committed) == (True, True)
    assert pi.slot_for(pi.firmware(tryboot=False)) == "b"
    status = pi.updater().status()
    assert [(s.name, s.state, s.version) for s in status.slots] == [("a", "good", "1.0.0"), ("b", "good", "1.1.0")]

    # The next update seeds from the booted slot through the index kept for it: only the changes are fetched.
    first = len(chunk_requests(server))
    update(pi, server, published.releases["1.2.0"])
    fetched = set(chunk_requests(server)[first:])
    assert fetched <= {published.chunk_path(c) for c in needed_from_store(published, "1.2.0", "1.1.0")}
    assert pi.boot(tryboot=True) == "a"
    assert pi.updater().boot_check().committed
    assert pi.slot_file("a", "/.ab_version") == b"1.2.0\n"


def test_a_corrupt_store_fails_the_update_with_nothing_armed(
    pi: SimulatedPi, server: FaultServer, published: Published
) -> None:
    release = published.releases["1.1.0"]
    chunk = next(c for c in release.index if c.offset > HOLD_BYTES and c.id != release.index.digest(bytes(c.size)))
    server.add(published.chunk_path(chunk), zstandard.compress(bytes(chunk.size)))
    with pytest.raises(errors.ChecksumMismatch, match=f"chunk {chunk.hex}"):
        update(pi, server, release)
    assert server.count(published.chunk_path(chunk)) == 3
    assert pi.slot_for(pi.firmware(tryboot=True)) == "a", "nothing armed: a tryboot still starts the old slot"
    assert [s.state for s in pi.updater().status().slots] == ["good", "bad"]


def test_a_store_without_a_delta_index_is_refused(pi: SimulatedPi, server: FaultServer) -> None:
    request = UpdateRequest(version="1.1.0", url=server.url("/img.gz"), store=server.url("/pub/default.castr"))
    with pytest.raises(errors.InvalidArgument, match="only used with a delta update"):
        pi.updater().prepare(request)


def test_after_a_full_install_the_booted_release_seeds_through_its_published_index(
    tmp_path: Path, server: FaultServer, published: Published
) -> None:
    template = server.url("/pub/root-{version}.caibx")
    with SimulatedPi(tmp_path, "prefix", config={"http_retries": 2, "image_url": template}) as pi:
        full = published.releases["1.1.0"]
        fd = os.open(full.raw, os.O_RDONLY)
        updater = pi.updater()
        updater.run(updater.prepare(UpdateRequest(version="1.1.0", fd=fd, size=full.index.size)), lambda p: None,
                    threading.Event())
        assert pi.boot(tryboot=True) == "b"
        assert pi.updater().boot_check().committed
        # Slot b holds 1.1.0, installed in full: no index kept for it, but the channel publishes one.
        update(pi, server, published.releases["1.2.0"])
        fetched = set(chunk_requests(server))
        needed = {published.chunk_path(c) for c in needed_from_store(published, "1.2.0", "1.1.0")}
        # The new root's fstab differs from the published image's: the few chunks holding it fail their check and
        # are fetched too; everything else of 1.1.0 comes from the booted slot.
        assert len(fetched - needed) <= 4, fetched - needed
        assert server.count("/pub/root-1.1.0.caibx") == 1
        assert pi.boot(tryboot=True) == "a"
        assert pi.updater().boot_check().committed


def test_a_cancelled_delta_install_stops_and_leaves_the_slot_invalid(
    loop_disk: LoopDisk, server: FaultServer, published: Published
) -> None:
    target = loop_disk.partition(3)
    put(target, published.releases["1.1.0"].raw.read_bytes())
    cancel = threading.Event()

    def cancel_at_once(progress: Progress) -> None:
        cancel.set()

    with pytest.raises(errors.Cancelled):
        install(server, published, "1.2.0", target, progress=cancel_at_once, cancel=cancel)
    assert read(target, HOLD_BYTES) == bytes(HOLD_BYTES)
