"""The streaming pipeline on in-memory destinations, regular files and pipes, with every bad input."""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from abflasher import errors
from abflasher.disk.blockdev import ReadbackVerifier, open_target
from abflasher.image.destinations import FileObjectWriter, TargetWriter
from abflasher.image.formats import ImageFormat, available_gzip_implementations
from abflasher.image.pipeline import Progress, stream_image
from abflasher.image.sources import FdSource, FileSource
from abflasher.image.stages import BUFFER_SIZE
from abflasher.install import install_image
from tests.support.images import MIB, BytesSource, compress, payload

pytestmark = pytest.mark.timeout(60)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def image() -> bytes:
    return payload(7 * MIB + 4096)


@pytest.mark.parametrize("fmt", ["gzip", "xz", "bzip2", "zstd", "raw"])
def test_streams_every_format_into_a_file_object(image: bytes, fmt: str) -> None:
    out = io.BytesIO()
    blob = compress(image, fmt, members=2)
    result = stream_image(BytesSource(blob, piece=70_001), FileObjectWriter(out), expected_sha256=sha(image))
    assert out.getvalue() == image
    assert result.image_size == len(image)
    assert result.image_sha256 == sha(image)
    assert result.source_sha256 == sha(blob)
    assert result.image_format.value == fmt


def test_image_that_is_not_a_whole_number_of_buffers(tmp_path: Path) -> None:
    data = payload(3 * MIB + 513)
    result = install_image(BytesSource(compress(data, "gzip")), tmp_path / "out.img", create=True)
    assert (tmp_path / "out.img").read_bytes() == data
    assert result.verified


def test_expected_sha256_may_name_the_image_or_the_compressed_file(image: bytes) -> None:
    blob = compress(image, "gzip")
    by_image = stream_image(BytesSource(blob), FileObjectWriter(io.BytesIO()), expected_sha256=sha(image).upper())
    by_file = stream_image(BytesSource(blob), FileObjectWriter(io.BytesIO()), expected_sha256=sha(blob))
    assert (by_image.matched, by_file.matched) == ("image", "source")


def _prefilled(size: int) -> io.BytesIO:
    return io.BytesIO(b"\xaa" * size)


def assert_first_block_invalidated(out: io.BytesIO, image: bytes) -> None:
    """A failed write leaves the target untouched, or with its first block zeroed so nothing mistakes it for an
    image; never with the new image's first block on it."""
    data = out.getvalue()
    untouched = data == b"\xaa" * len(data)
    assert untouched or data[:BUFFER_SIZE] == bytes(BUFFER_SIZE), "the first block must read as zeros"
    assert data[:BUFFER_SIZE] != image[:BUFFER_SIZE]


def test_wrong_sha256_leaves_the_target_incomplete(image: bytes) -> None:
    out = _prefilled(len(image))
    with pytest.raises(errors.ChecksumMismatch, match="expected 00+"):
        stream_image(BytesSource(compress(image, "gzip")), FileObjectWriter(out), expected_sha256="0" * 64)
    assert_first_block_invalidated(out, image)


@pytest.mark.parametrize("junk", [b"", b"\x00" * 100], ids=["empty", "zeros"])
def test_unrecognised_input_leaves_the_target_untouched(junk: bytes) -> None:
    out = _prefilled(4 * MIB)
    with pytest.raises(errors.BadImage):
        stream_image(BytesSource(junk), FileObjectWriter(out))
    assert out.getvalue() == b"\xaa" * (4 * MIB)


def test_text_file_is_not_an_image() -> None:
    out = _prefilled(MIB)
    with pytest.raises(errors.BadImage, match="unknown image format"):
        stream_image(BytesSource(b"<html>404 not found</html>\n" * 300), FileObjectWriter(out))
    assert out.getvalue() == b"\xaa" * MIB


@pytest.mark.parametrize("fraction", [0.2, 0.6, 0.99])
def test_truncated_stream_leaves_the_target_incomplete(image: bytes, fraction: float) -> None:
    blob = compress(image, "gzip")
    out = _prefilled(len(image))
    with pytest.raises(errors.BadImage, match="truncated"):
        stream_image(BytesSource(blob[: int(len(blob) * fraction)]), FileObjectWriter(out))
    assert_first_block_invalidated(out, image)


@pytest.mark.parametrize("field", [-8, -1], ids=["crc32", "isize"])
@pytest.mark.parametrize("impl", list(available_gzip_implementations()))  # igzip: tests/unit/test_child_decoder.py
def test_a_bad_gzip_trailer_is_caught_off_the_inflating_thread(image: bytes, impl: str, field: int) -> None:
    half = len(image) // 2
    second = bytearray(compress(image[half:], "gzip"))
    second[field] ^= 0x01
    blob = compress(image[:half], "gzip") + bytes(second)
    out = _prefilled(len(image))
    with pytest.raises(errors.BadImage, match="of member 2, which ends at image byte"):
        stream_image(BytesSource(blob), FileObjectWriter(out), gzip_impl=impl)
    assert_first_block_invalidated(out, image)


def test_corrupt_deflate_data_fails(image: bytes) -> None:
    blob = bytearray(compress(image, "gzip"))
    middle = len(blob) * 3 // 4
    blob[middle : middle + 200] = bytes(200)
    out = _prefilled(len(image))
    with pytest.raises(errors.BadImage, match="corrupt"):
        stream_image(BytesSource(bytes(blob)), FileObjectWriter(out))
    assert_first_block_invalidated(out, image)


def test_trailing_garbage_fails(image: bytes) -> None:
    out = _prefilled(len(image))
    with pytest.raises(errors.BadImage, match="trailing garbage"):
        stream_image(BytesSource(compress(image, "gzip") + b"appended"), FileObjectWriter(out))
    assert_first_block_invalidated(out, image)


def test_image_one_byte_larger_than_the_target(image: bytes) -> None:
    capacity = len(image) - 1
    out = _prefilled(capacity)
    with pytest.raises(errors.TooLarge, match=f"holds {capacity}"):
        stream_image(BytesSource(compress(image, "gzip")), FileObjectWriter(out, capacity=capacity))
    assert len(out.getvalue()) == capacity, "nothing may be written past the end of the target"
    assert_first_block_invalidated(out, image)


def test_image_exactly_the_size_of_the_target(image: bytes) -> None:
    out = io.BytesIO()
    stream_image(BytesSource(compress(image, "gzip")), FileObjectWriter(out, capacity=len(image)))
    assert out.getvalue() == image


def test_cancel_mid_write(image: bytes) -> None:
    cancel = threading.Event()
    seen: list[Progress] = []

    def on_progress(progress: Progress) -> None:
        seen.append(progress)
        if progress.written >= MIB:
            cancel.set()

    out = _prefilled(len(image))
    with pytest.raises(errors.Cancelled):
        stream_image(
            BytesSource(compress(image, "xz"), piece=4096), FileObjectWriter(out), progress=on_progress, cancel=cancel
        )
    assert seen
    assert_first_block_invalidated(out, image)


def test_cancel_after_the_last_write_still_cancels(image: bytes) -> None:
    cancel = threading.Event()

    def on_progress(progress: Progress) -> None:
        if progress.written == len(image):
            cancel.set()

    out = _prefilled(len(image))
    with pytest.raises(errors.Cancelled):
        stream_image(BytesSource(compress(image, "gzip")), FileObjectWriter(out), progress=on_progress, cancel=cancel)
    assert_first_block_invalidated(out, image)


def test_cancel_before_start_writes_nothing(image: bytes) -> None:
    cancel = threading.Event()
    cancel.set()
    out = _prefilled(MIB)
    with pytest.raises(errors.Cancelled):
        stream_image(BytesSource(compress(image, "gzip")), FileObjectWriter(out), cancel=cancel)
    assert out.getvalue() == b"\xaa" * MIB


def test_progress_is_monotonic_and_ends_at_the_total(image: bytes) -> None:
    blob = compress(image, "bzip2")
    seen: list[Progress] = []
    stream_image(BytesSource(blob, piece=50_000), FileObjectWriter(io.BytesIO()), progress=seen.append)
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    assert [p.written for p in seen] == sorted(p.written for p in seen)
    last = seen[-1]
    assert (last.done, last.total, last.written, last.percent) == (len(blob), len(blob), len(image), 100)


def test_streams_from_a_pipe(image: bytes, tmp_path: Path) -> None:
    blob = compress(image, "zstd")
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        with os.fdopen(write_fd, "wb") as pipe:
            for i in range(0, len(blob), 10_000):
                pipe.write(blob[i : i + 10_000])

    feeder = threading.Thread(target=feed)
    feeder.start()
    source = FdSource(read_fd, "pipe")
    assert source.size is None
    result = install_image(source, tmp_path / "out.img", create=True)
    feeder.join(timeout=30)
    assert (tmp_path / "out.img").read_bytes() == image
    assert result.verified


def test_pipe_closed_mid_stream_is_a_truncated_image(image: bytes, tmp_path: Path) -> None:
    blob = compress(image, "gzip")
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(blob[: len(blob) // 2])

    feeder = threading.Thread(target=feed)
    feeder.start()
    with pytest.raises(errors.BadImage, match="truncated"):
        install_image(FdSource(read_fd, "pipe"), tmp_path / "out.img", create=True)
    feeder.join(timeout=30)


def test_zero_runs_become_holes_in_a_regular_file(tmp_path: Path) -> None:
    data = payload(2 * MIB) + bytes(16 * MIB) + payload(MIB, seed=2)
    target = tmp_path / "out.img"
    result = install_image(BytesSource(compress(data, "gzip")), target, create=True)
    assert target.read_bytes() == data
    assert result.stream.zeroed_bytes >= 16 * MIB
    assert os.stat(target).st_blocks * 512 < len(data) - 8 * MIB


def test_zero_runs_overwrite_old_data(tmp_path: Path) -> None:
    data = payload(2 * MIB) + bytes(8 * MIB)
    target = tmp_path / "out.img"
    target.write_bytes(b"\xaa" * len(data))
    install_image(BytesSource(compress(data, "gzip")), target)
    assert target.read_bytes() == data


def test_regular_file_target_keeps_its_size_as_capacity(tmp_path: Path) -> None:
    target = tmp_path / "partition.img"
    target.write_bytes(b"\xaa" * (2 * MIB))
    with pytest.raises(errors.TooLarge):
        install_image(BytesSource(compress(payload(3 * MIB), "gzip")), target)
    assert target.stat().st_size == 2 * MIB


@pytest.mark.parametrize("where", [7, 2 * MIB + 7, 3 * MIB - 1], ids=["first-block", "middle", "last-byte"])
def test_readback_detects_a_changed_byte(tmp_path: Path, where: int) -> None:
    data = payload(3 * MIB)
    target = tmp_path / "out.img"
    install_image(BytesSource(compress(data, "gzip")), target, create=True)
    with open(target, "r+b") as handle:
        handle.seek(where)
        handle.write(b"\x00" if data[where] else b"\x01")
    verifier = ReadbackVerifier(str(target))
    try:
        verifier.first_block(memoryview(data)[:BUFFER_SIZE])
        verifier.durable(len(data))
        assert verifier.finish(len(data)) != sha(data)
    finally:
        verifier.close()


def test_readback_of_an_intact_target_matches(tmp_path: Path) -> None:
    data = payload(5 * MIB + 100)
    target = tmp_path / "out.img"
    target.write_bytes(data)
    verifier = ReadbackVerifier(str(target))
    try:
        verifier.first_block(memoryview(data)[:BUFFER_SIZE])
        verifier.durable(2 * MIB)
        verifier.durable(len(data))
        assert verifier.finish(len(data)) == sha(data)
    finally:
        verifier.close()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing" / "x.img", "does not exist"),
        (lambda p: p, "is a directory"),
        (lambda p: Path("/dev/null"), "not a block device or a regular file"),
    ],
    ids=["missing", "directory", "char-device"],
)
def test_unusable_targets(tmp_path: Path, make: object, message: str) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(errors.DeviceError, match=message):
        open_target(path)


def test_fifo_target_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(errors.DeviceError, match="not a block device"):
        open_target(fifo)


def test_source_is_closed_by_the_caller_not_the_pipeline(image: bytes, tmp_path: Path) -> None:
    path = tmp_path / "img.gz"
    path.write_bytes(compress(image, "gzip"))
    source = FileSource(path)
    result = stream_image(source, TargetWriter(open_target(tmp_path / "o", create=True)))
    assert result.source_bytes == path.stat().st_size
    source.close()


class _RecordingDestination(FileObjectWriter):
    """A destination that says its writes bypass the page cache (or not), zeroes ranges itself like BLKZEROOUT, and
    counts flushes."""

    def __init__(self, size: int, *, direct: bool) -> None:
        super().__init__(io.BytesIO(b"\xaa" * size), capacity=size)
        self.cached_writes = not direct
        self.syncs = 0

    def zero(self, offset: int, length: int) -> bool:
        self.write_at(offset, memoryview(bytes(length)))
        return True

    def sync(self) -> None:
        super().sync()
        self.syncs += 1


class _CheckingVerifier:
    """Checks at every ``durable`` that the destination already holds the image up to there."""

    def __init__(self, dest: _RecordingDestination, image: bytes) -> None:
        self.dest = dest
        self.image = image
        self.first = 0
        self.offsets: list[int] = []

    def first_block(self, data: memoryview) -> None:
        self.first = len(data)

    def durable(self, offset: int) -> None:
        held = self.dest._file.getbuffer()[self.first : offset]  # type: ignore[attr-defined]
        assert held == self.image[self.first : offset], f"durable({offset}) before the bytes were there"
        self.offsets.append(offset)


def _image_with_long_zero_runs() -> bytes:
    data = bytearray(payload(40 * MIB))
    data[9 * MIB : 30 * MIB] = bytes(21 * MIB)  # a zero run longer than a write batch, ending on a buffer boundary
    data[-3 * MIB :] = bytes(3 * MIB)  # and one at the very end
    return bytes(data)


def test_direct_writes_are_verified_as_they_land_without_flushing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("abflasher.image.pipeline.SYNC_INTERVAL", 4 * MIB)
    monkeypatch.setattr("abflasher.image.pipeline.DIRECT_SYNC_SECONDS", 3600.0)
    data = _image_with_long_zero_runs()
    dest = _RecordingDestination(len(data), direct=True)
    verifier = _CheckingVerifier(dest, data)
    stream_image(BytesSource(compress(data, "gzip")), dest, verifier=verifier)
    assert dest._file.getvalue() == data
    # Only the flush at the end: the verify does not wait for flushes of direct writes.
    assert dest.syncs == 1
    assert len(verifier.offsets) > 10
    assert verifier.offsets == sorted(verifier.offsets)
    assert verifier.offsets[-1] == len(data)


def test_direct_writes_are_flushed_periodically_by_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("abflasher.image.pipeline.DIRECT_SYNC_SECONDS", 0.0)
    data = payload(12 * MIB)
    dest = _RecordingDestination(len(data), direct=True)
    stream_image(BytesSource(compress(data, "gzip")), dest)
    assert dest._file.getvalue() == data
    assert dest.syncs > 2


def test_cached_writes_are_flushed_before_the_verify_reads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("abflasher.image.pipeline.SYNC_INTERVAL", 4 * MIB)
    data = _image_with_long_zero_runs()
    dest = _RecordingDestination(len(data), direct=False)
    synced_at: list[int] = []
    verifier = _CheckingVerifier(dest, data)
    original_durable = verifier.durable

    def durable(offset: int) -> None:
        synced_at.append(dest.syncs)
        original_durable(offset)

    verifier.durable = durable  # type: ignore[method-assign]
    stream_image(BytesSource(compress(data, "gzip")), dest, verifier=verifier)
    assert dest._file.getvalue() == data
    assert dest.syncs >= len(data) // (4 * MIB) - 1
    # Each durable() came after a flush no earlier durable() had already used.
    assert synced_at == sorted(set(synced_at))
    assert synced_at[0] >= 1
    assert verifier.offsets[-1] == len(data)


def test_target_writer_knows_when_writes_went_through_the_cache(tmp_path: Path) -> None:
    path = tmp_path / "t.img"
    path.write_bytes(bytes(2 * MIB))
    with open_target(path) as target:
        writer = TargetWriter(target)
        assert writer.cached_writes is False
        aligned = mmap.mmap(-1, 4096)
        buf = memoryview(aligned)
        writer.write_at(0, buf)
        assert writer.cached_writes is (not target.direct)
        writer.write_at(4096, buf[:100])  # an odd tail goes through the page cache
        assert writer.cached_writes is True
        writer.sync()
        assert writer.cached_writes is False
        buf.release()
        aligned.close()


def test_a_local_install_does_not_import_the_http_stack(tmp_path: Path) -> None:
    source = tmp_path / "img.gz"
    source.write_bytes(compress(payload(2 * MIB), "gzip"))
    (tmp_path / "out.img").write_bytes(bytes(2 * MIB))
    code = (
        "import sys\n"
        "from abflasher import cli\n"
        f"rc = cli.main(['write', {str(source)!r}, {str(tmp_path / 'out.img')!r}, '-q', '--sha256', '{'0' * 64}'])\n"
        "assert 'requests' not in sys.modules, 'requests was imported'\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert "requests was imported" not in done.stderr
    assert done.returncode == errors.ChecksumMismatch.exit_code, done.stderr


def test_forced_raw_writes_bytes_with_no_file_system_signature(tmp_path: Path) -> None:
    # `--format raw` is documented as "writes any bytes as they are": detection must not refuse them first.
    data = b"not a file system, just bytes\n" * 50_000
    out = io.BytesIO()
    result = stream_image(BytesSource(data), FileObjectWriter(out), image_format=ImageFormat.RAW)
    assert out.getvalue() == data
    assert result.image_format is ImageFormat.RAW
    source = tmp_path / "blob.bin"
    source.write_bytes(data)
    target = tmp_path / "out.img"
    from abflasher import cli

    assert cli.main(["write", str(source), str(target), "--format", "raw", "--create", "-q"]) == 0
    assert target.read_bytes() == data


def test_forced_raw_still_refuses_an_empty_image() -> None:
    out = _prefilled(MIB)
    with pytest.raises(errors.BadImage, match="empty"):
        stream_image(BytesSource(b""), FileObjectWriter(out), image_format=ImageFormat.RAW)
    assert out.getvalue() == b"\xaa" * MIB
