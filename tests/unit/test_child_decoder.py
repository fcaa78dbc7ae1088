"""gzip through igzip (Debian's isal) as a child process: every bad input of the in-process decoder, the program's
own failures, cancellation, and what is left behind (no process, no descriptor)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import stat
import subprocess
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from abflasher import errors
from abflasher.image import child_decoder
from abflasher.image.child_decoder import IGZIP_READ_SIZE, igzip_path
from abflasher.image.destinations import FileObjectWriter
from abflasher.image.formats import gzip_inflater_name
from abflasher.image.pipeline import Progress, StreamResult, stream_image
from abflasher.image.stages import BUFFER_SIZE
from tests.support.images import MIB, BytesSource, compress, payload

pytestmark = pytest.mark.timeout(60)


def test_igzip_is_installed_and_auto_picks_it() -> None:
    # The package recommends isal and scripts/setup-dev installs it: without it these tests would test nothing.
    assert igzip_path() is not None, "igzip (Debian package isal) is not installed: run scripts/setup-dev"
    assert gzip_inflater_name("auto") == "igzip"


class _SpawnedPrograms:
    """Every program the child decoder starts, to check afterwards that it was reaped."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def igzip_ran(self) -> bool:
        return bool(self.started) and all(os.path.basename(str(p.args[0])) == "igzip" for p in self.started)


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> Iterator[_SpawnedPrograms]:
    record = _SpawnedPrograms()
    real_popen = subprocess.Popen

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = real_popen(*args, **kwargs)
        record.started.append(proc)
        return proc

    monkeypatch.setattr(child_decoder.subprocess, "Popen", popen)
    fds_before = _open_fds()
    yield record
    for proc in record.started:
        assert proc.returncode is not None, "the program was not reaped"
        with pytest.raises(ChildProcessError):
            os.waitpid(proc.pid, os.WNOHANG)  # nothing left to reap: no zombie
    assert _open_fds() == fds_before, "a descriptor was left open"


def _open_fds() -> set[str]:
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            continue  # the descriptor listdir itself used
        if target.startswith("pipe:"):
            fds.add(f"{name}->{target}")
    return fds


def igzip_stream(blob: bytes, *, known_size: bool = True, piece: int | None = None, **kwargs: Any) -> tuple[bytes,
                                                                                                      StreamResult]:
    out = io.BytesIO()
    result = stream_image(BytesSource(blob, known_size=known_size, piece=piece), FileObjectWriter(out),
                          gzip_impl="igzip", **kwargs)
    assert result.inflater == "igzip"
    return out.getvalue(), result


def igzip_fails(spawned: _SpawnedPrograms, blob: bytes, match: str, *, known_size: bool = True,
                **kwargs: Any) -> errors.AbFlasherError:
    out = io.BytesIO(b"\xaa" * (16 * MIB))
    with pytest.raises(errors.AbFlasherError, match=match) as caught:
        stream_image(BytesSource(blob, known_size=known_size), FileObjectWriter(out), gzip_impl="igzip", **kwargs)
    data = out.getvalue()
    assert data[:BUFFER_SIZE] in (b"\xaa" * BUFFER_SIZE, bytes(BUFFER_SIZE)), "the first block must not be written"
    message = str(caught.value)
    assert "\n" not in message, "one line, never the program's stderr"
    assert spawned.igzip_ran(), "the error must come from the igzip path"
    return caught.value


@pytest.fixture(scope="module")
def image() -> bytes:
    return payload(5 * MIB + 4321)


@pytest.mark.parametrize("members", [1, 3])
@pytest.mark.parametrize("known_size", [True, False], ids=["sized", "pipe"])
def test_round_trip(spawned: _SpawnedPrograms, image: bytes, members: int, known_size: bool) -> None:
    data, result = igzip_stream(compress(image, "gzip", members=members), known_size=known_size, piece=70_001)
    assert data == image
    assert result.image_size == len(image)
    assert len(spawned.started) == 1
    assert spawned.igzip_ran()


@pytest.mark.parametrize("prefix", [0, 1, 21, 22, 23, 65_557, 65_558, 65_579, 65_580, IGZIP_READ_SIZE - 1])
def test_every_alignment_length(spawned: _SpawnedPrograms, prefix: int) -> None:
    # The padding in front of the image takes every length: none needed, a few bytes (too few for a member: a whole
    # read size more), more than one padded member's worth.
    data = payload(2 * MIB)
    blob = compress(data, "gzip")
    size = -(-(len(blob) + 2 + prefix) // IGZIP_READ_SIZE) * IGZIP_READ_SIZE - prefix
    named = bytearray(blob)
    named[3] |= 0x08  # FNAME: a name in the header makes the file exactly ``size`` bytes long
    blob = bytes(named[:10]) + b"n" * (size - len(blob) - 1) + b"\0" + bytes(named[10:])
    assert len(blob) == size
    assert igzip_stream(blob)[0] == data


def test_optional_header_fields_and_an_empty_member(spawned: _SpawnedPrograms) -> None:
    from tests.unit.test_formats import gzip_member

    first, second = payload(200_000), payload(150_000, seed=2)
    blob = gzip_member(first, extra=b"AB\x02\x00xy", name=b"rootfs.img", comment=b"ci", header_crc=True)
    blob += gzip_member(b"") + gzip_member(second, name=b"second", header_crc=True)
    assert igzip_stream(blob)[0] == first + second


@pytest.mark.parametrize("known_size", [True, False], ids=["sized", "pipe"])
@pytest.mark.parametrize("cut", [0.05, 0.5, 0.999, -1, -4, -8, -9])
def test_truncated(spawned: _SpawnedPrograms, image: bytes, cut: float, known_size: bool) -> None:
    blob = compress(image, "gzip", members=2)
    end = int(len(blob) * cut) if cut > 0 else len(blob) + int(cut)
    error = igzip_fails(spawned, blob[:end], "truncated", known_size=known_size)
    assert isinstance(error, errors.BadImage)
    if known_size:
        assert f"ended after {end} compressed bytes" in str(error)


def test_cut_inside_the_second_members_header(spawned: _SpawnedPrograms, image: bytes) -> None:
    first = compress(image[: MIB], "gzip")
    igzip_fails(spawned, first + compress(image[MIB:], "gzip")[:5], "truncated")


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_corrupt_deflate_data(spawned: _SpawnedPrograms, image: bytes, where: float) -> None:
    blob = bytearray(compress(image, "gzip"))
    middle = int(len(blob) * where)
    blob[middle : middle + 64] = bytes(b ^ 0x5A for b in blob[middle : middle + 64])
    igzip_fails(spawned, bytes(blob), "corrupt gzip data")


@pytest.mark.parametrize("field", [-8, -1], ids=["crc32", "isize"])
@pytest.mark.parametrize("member", [0, 1], ids=["first", "last"])
def test_bad_trailer(spawned: _SpawnedPrograms, image: bytes, field: int, member: int) -> None:
    parts = [bytearray(compress(image[: 2 * MIB], "gzip")), bytearray(compress(image[2 * MIB :], "gzip"))]
    parts[member][field] ^= 0x01
    igzip_fails(spawned, bytes(parts[0] + parts[1]), "corrupt gzip data")


@pytest.mark.parametrize(
    "garbage",
    [b"garbage!", b"\x00" * 7, b"\x01", b"\x1f", b"\x1f\x8b", b"\x1f\x8b\x08\x00junk", os.urandom(3 * MIB)],
    ids=["text", "zeros", "one-byte", "half-magic", "magic", "magic-junk", "3MiB-random"],
)
@pytest.mark.parametrize("members", [1, 2])
def test_trailing_garbage(spawned: _SpawnedPrograms, image: bytes, garbage: bytes, members: int) -> None:
    blob = compress(image, "gzip", members=members) + garbage
    # What starts like another member is a member cut short (as the in-process decoder says); anything else is
    # garbage.
    igzip_fails(spawned, blob, "trailing garbage|truncated" if garbage.startswith(b"\x1f") else "trailing garbage")


def test_garbage_that_ends_with_a_gzip_member_is_not_taken_for_one(spawned: _SpawnedPrograms, image: bytes) -> None:
    igzip_fails(spawned, compress(image, "gzip") + b"XY" + compress(b"tail", "gzip"), "trailing garbage")


def test_first_header_checked_like_the_in_process_decoder(spawned: _SpawnedPrograms) -> None:
    blob = bytearray(compress(payload(MIB), "gzip"))
    blob[3] |= 0x20
    with pytest.raises(errors.BadImage, match="reserved flag"):
        stream_image(BytesSource(bytes(blob)), FileObjectWriter(io.BytesIO()), gzip_impl="igzip")
    assert spawned.started == [], "refused before any program ran"


def test_cancel_kills_and_reaps_the_program(spawned: _SpawnedPrograms, image: bytes) -> None:
    # The image's tail is withheld, so the program cannot have ended on its own when the cancel comes: it must be
    # killed, whatever the machine's load.
    from abflasher.image.sources import FdSource

    cancel = threading.Event()

    def on_progress(progress: Progress) -> None:
        if progress.written >= MIB:
            cancel.set()

    blob = compress(image, "gzip")
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        with contextlib.suppress(OSError):  # the test closes the pipe after the cancel
            os.write(write_fd, blob[:-65536])

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    # igzip may hold its output until a whole MiB of input has come: the timer cancels if progress never does.
    timer = threading.Timer(1.0, cancel.set)
    timer.start()
    try:
        with pytest.raises(errors.Cancelled):
            stream_image(FdSource(read_fd, "pipe", cancel=cancel), FileObjectWriter(io.BytesIO()), gzip_impl="igzip",
                         progress=on_progress, cancel=cancel)
    finally:
        timer.cancel()
        os.close(read_fd)
        feeder.join(timeout=10)
        os.close(write_fd)
    assert spawned.started[0].returncode == -signal.SIGKILL


def test_cancel_while_the_source_is_silent(spawned: _SpawnedPrograms, image: bytes) -> None:
    # The feeder waits for input that never comes; the program waits for the feeder: a cancel still ends both.
    from abflasher.image.sources import FdSource

    blob = compress(image, "gzip")
    read_fd, write_fd = os.pipe()
    os.write(write_fd, blob[:60_000])
    cancel = threading.Event()
    timer = threading.Timer(0.5, cancel.set)
    timer.start()
    try:
        with pytest.raises(errors.Cancelled):
            stream_image(FdSource(read_fd, "pipe", cancel=cancel), FileObjectWriter(io.BytesIO()), gzip_impl="igzip",
                         cancel=cancel)
    finally:
        timer.cancel()
        os.close(write_fd)
        os.close(read_fd)


def test_a_program_killed_mid_stream_is_one_clear_error(spawned: _SpawnedPrograms, image: bytes) -> None:
    def on_progress(progress: Progress) -> None:
        if progress.written >= MIB and spawned.started[0].returncode is None:
            os.kill(spawned.started[0].pid, signal.SIGKILL)

    blob = compress(image, "gzip") + compress(image, "gzip")
    out = io.BytesIO()
    with pytest.raises(errors.Internal, match=r"^the gzip decoder igzip was killed by SIGKILL after \d+ bytes"):
        stream_image(BytesSource(blob, piece=8192), FileObjectWriter(out), gzip_impl="igzip", progress=on_progress)
    assert out.getvalue()[:BUFFER_SIZE] == bytes(BUFFER_SIZE)


def _fake_igzip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    program = tmp_path / "igzip"
    program.write_text("#!/bin/sh\n" + script)
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(child_decoder, "igzip_path", lambda: str(program))
    monkeypatch.setattr("abflasher.image.formats.igzip_path", lambda: str(program))


def test_a_program_that_fails_oddly_is_one_line_without_its_stderr(
    spawned: _SpawnedPrograms, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image: bytes
) -> None:
    # Reads a little, writes some output, complains at length and exits 3.
    _fake_igzip(tmp_path, monkeypatch, "head -c 1000 >/dev/null; head -c 5000 /dev/zero; "
                "for i in 1 2 3 4 5; do echo 'line of noise' >&2; done; exit 3\n")
    error = igzip_fails(spawned, compress(image, "gzip"), "gzip")
    assert "line of noise" not in str(error)


def test_a_program_that_cannot_start(spawned: _SpawnedPrograms, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     image: bytes) -> None:
    program = tmp_path / "igzip"
    program.write_text("not executable")
    monkeypatch.setattr(child_decoder, "igzip_path", lambda: str(program))
    monkeypatch.setattr("abflasher.image.formats.igzip_path", lambda: str(program))
    with pytest.raises(errors.Internal, match="cannot start the gzip decoder"):
        stream_image(BytesSource(compress(image, "gzip")), FileObjectWriter(io.BytesIO()), gzip_impl="igzip")


def test_output_is_bounded_per_read_for_a_bomb(spawned: _SpawnedPrograms) -> None:
    # 256 MiB of zeros is ~256 KiB of gzip: the decoder hands it over in buffer-sized reads, nothing accumulates.
    from abflasher.image.formats import ImageFormat, open_decoder

    blob = compress(bytes(256 * MIB), "gzip")
    stream = io.BytesIO(blob)
    decoder = open_decoder(ImageFormat.GZIP, lambda: stream.read(65536), stream.read(4096), gzip_impl="igzip",
                           source_size=len(blob))
    total = 0
    buf = memoryview(bytearray(MIB))
    try:
        assert isinstance(decoder, child_decoder.ChildDecoder)
        while n := decoder.readinto(buf):
            assert n <= MIB
            assert len(decoder._pending) <= 64  # type: ignore[attr-defined]
            total += n
    finally:
        decoder.close()  # type: ignore[attr-defined]
    assert total == 256 * MIB


def test_small_reads(spawned: _SpawnedPrograms) -> None:
    from abflasher.image.formats import ImageFormat, open_decoder

    data = payload(300_000)
    blob = compress(data, "gzip", members=2)
    stream = io.BytesIO(blob)
    decoder = open_decoder(ImageFormat.GZIP, lambda: stream.read(13), stream.read(4096), gzip_impl="igzip")
    out = bytearray()
    try:
        while chunk := decoder.read(7):
            assert len(chunk) <= 7
            out += chunk
    finally:
        decoder.close()  # type: ignore[attr-defined]
    assert bytes(out) == data


def test_padding_members_decode_to_nothing() -> None:
    for length in (22, 23, 65_557, 65_558, 65_579, 65_580, 200_000, IGZIP_READ_SIZE + 21):
        padding = child_decoder._padding_members(length)
        assert len(padding) == length
        assert zlib.decompressobj(wbits=31).decompress(padding) == b""
        done = subprocess.run([igzip_path() or "igzip", "-dc"], input=padding, capture_output=True, timeout=30,
                              check=True)
        assert done.stdout == b""
