"""install_image into real block devices: a loop-attached MBR disk with partition nodes from partx."""

from __future__ import annotations

import hashlib
import mmap
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from abflasher import errors
from abflasher.disk.blockdev import ReadbackVerifier, open_target
from abflasher.image.pipeline import Progress
from abflasher.install import install_image
from tests.support.images import MIB, BytesSource, compress, payload
from tests.support.loopdev import LoopDisk

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]


def device_sha(path: str, length: int | None = None) -> str:
    with open(path, "rb") as handle:
        data = handle.read() if length is None else handle.read(length)
    return hashlib.sha256(data).hexdigest()


def part_size(node: str) -> int:
    with open(node, "rb") as handle:
        return handle.seek(0, os.SEEK_END)


def neighbours(disk: LoopDisk, target: int) -> dict[int, str]:
    return {n: device_sha(disk.partition(n)) for n in (1, 2, 3, 4) if n != target}


def test_installs_into_a_partition_and_verifies(loop_disk: LoopDisk) -> None:
    data = payload(12 * MIB) + bytes(6 * MIB) + payload(MIB, seed=3)
    before = neighbours(loop_disk, 2)
    stages: list[str] = []
    result = install_image(
        BytesSource(compress(data, "gzip")), loop_disk.partition(2), progress=lambda p: stages.append(p.stage)
    )
    assert result.verified
    assert result.stream.zeroed_bytes >= 6 * MIB
    assert device_sha(loop_disk.partition(2), len(data)) == hashlib.sha256(data).hexdigest()
    assert neighbours(loop_disk, 2) == before, "only the target partition may change"
    assert stages[0] == "writing"
    assert stages[-1] == "verifying"


def test_zero_runs_overwrite_what_the_partition_held(loop_disk: LoopDisk) -> None:
    node = loop_disk.partition(3)
    with open(node, "r+b") as handle:
        handle.write(b"\xaa" * part_size(node))
    data = payload(2 * MIB) + bytes(16 * MIB)
    install_image(BytesSource(compress(data, "zstd")), node)
    assert device_sha(node, len(data)) == hashlib.sha256(data).hexdigest()


def test_image_one_byte_larger_than_the_partition(loop_disk: LoopDisk) -> None:
    node = loop_disk.partition(2)
    size = part_size(node)
    data = payload(size + 1)
    before = neighbours(loop_disk, 2)
    with pytest.raises(errors.TooLarge):
        install_image(BytesSource(compress(data, "gzip")), node)
    assert neighbours(loop_disk, 2) == before
    with open(node, "rb") as handle:
        first = handle.read(MIB)
    assert first != data[:MIB]


def test_image_exactly_filling_the_partition(loop_disk: LoopDisk) -> None:
    node = loop_disk.partition(3)
    data = payload(part_size(node))
    assert install_image(BytesSource(compress(data, "gzip")), node).verified


def test_mounted_partition_is_refused(loop_disk: LoopDisk, tmp_path: Path) -> None:
    node = loop_disk.partition(2)
    subprocess.run(["mkfs.ext4", "-q", node], check=True, timeout=60)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    subprocess.run(["mount", "-o", "ro,noload", node, str(mountpoint)], check=True, timeout=60)
    try:
        before = device_sha(node)
        with pytest.raises(errors.DeviceError, match="mounted on"):
            install_image(BytesSource(compress(payload(MIB), "gzip")), node)
        with pytest.raises(errors.DeviceError, match="holds partition"):
            open_target(loop_disk.device)
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True, timeout=60)
    assert device_sha(node) == before


def test_exclusively_opened_partition_is_refused(loop_disk: LoopDisk) -> None:
    node = loop_disk.partition(3)
    holder = os.open(node, os.O_RDONLY | os.O_EXCL)
    try:
        with pytest.raises(errors.DeviceError, match="busy"):
            open_target(node)
    finally:
        os.close(holder)


def test_block_device_size_and_direct_io(loop_disk: LoopDisk) -> None:
    with open_target(loop_disk.partition(2)) as target:
        assert target.is_block_device
        assert target.direct
        assert target.capacity == 24 * MIB
        assert target.logical_block_size == 512


def test_readback_failure_is_an_error(loop_disk: LoopDisk, monkeypatch: pytest.MonkeyPatch) -> None:
    """The medium changes what we wrote (a failing card): the verify must catch it, reading from the device."""
    node = loop_disk.partition(2)
    data = payload(22 * MIB)
    corrupted = threading.Event()
    read = ReadbackVerifier._read

    def after_the_corruption(self: ReadbackVerifier, buffer: mmap.mmap, start: int, end: int) -> None:
        # The verify follows the writes closely; hold it back so the block is changed before it is read.
        assert corrupted.wait(timeout=30)
        read(self, buffer, start, end)

    monkeypatch.setattr(ReadbackVerifier, "_read", after_the_corruption)

    def corrupt_written_block_once(progress: Progress) -> None:
        if progress.stage == "writing" and progress.written >= 12 * MIB and not corrupted.is_set():
            fd = os.open(node, os.O_WRONLY | os.O_DIRECT)
            try:
                buf = mmap.mmap(-1, 4096)
                buf.write(b"\x5a" * 4096)
                os.pwrite(fd, buf, 5 * MIB)
            finally:
                os.close(fd)
            corrupted.set()

    with pytest.raises(errors.ChecksumMismatch, match="read-back verification"):
        install_image(BytesSource(compress(data, "gzip")), node, progress=corrupt_written_block_once)
    assert corrupted.is_set()


def test_cancel_mid_write_leaves_the_partition_incomplete(loop_disk: LoopDisk) -> None:
    node = loop_disk.partition(2)
    data = payload(20 * MIB)
    install_image(BytesSource(compress(data, "gzip")), node)
    cancel = threading.Event()

    def stop_after_some(progress: Progress) -> None:
        if progress.written >= 2 * MIB:
            cancel.set()

    new = payload(20 * MIB, seed=9)
    with pytest.raises(errors.Cancelled):
        install_image(BytesSource(compress(new, "xz"), piece=8192), node, progress=stop_after_some, cancel=cancel)
    with open(node, "rb") as handle:
        assert handle.read(MIB) == bytes(MIB), "a half-written slot must not look like a file system"


def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "abflasher.cli", *args],
        input=stdin.decode("latin-1") if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        encoding="latin-1",
        check=False,
    )


def test_cli_write_from_a_file_with_checksum(loop_disk: LoopDisk, tmp_path: Path) -> None:
    data = payload(5 * MIB)
    image = tmp_path / "root.img.xz"
    image.write_bytes(compress(data, "xz"))
    digest = hashlib.sha256(data).hexdigest()
    (tmp_path / "SHA256SUMS").write_text(f"{digest}  root.img.xz\n")
    done = run_cli("write", str(image), loop_disk.partition(3), "--sha256-file", str(tmp_path / "SHA256SUMS"))
    assert done.returncode == 0, done.stderr
    assert "read-back verified" in done.stdout
    assert device_sha(loop_disk.partition(3), len(data)) == digest


def test_cli_write_from_stdin_json(loop_disk: LoopDisk) -> None:
    data = payload(3 * MIB)
    done = run_cli("write", "-", loop_disk.partition(2), "--json", stdin=compress(data, "gzip"))
    assert done.returncode == 0, done.stderr
    import json

    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["verified"] is True
    assert report["image_sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("args_for", "code", "message"),
    [
        (
            lambda img, dev: ["write", str(img), dev, "--sha256", "ab" * 32],
            errors.ChecksumMismatch.exit_code,
            "mismatch",
        ),
        (lambda img, dev: ["write", str(img), dev, "--sha256", "xyz"], errors.InvalidArgument.exit_code, "hex digit"),
        (lambda img, dev: ["write", str(img), "/dev/null"], errors.DeviceError.exit_code, "not a block device"),
        (lambda img, dev: ["write", "ftp://example.invalid/x.img.gz", dev], errors.InvalidArgument.exit_code, "ftp"),
        (lambda img, dev: ["write", str(img) + ".missing", dev], errors.InvalidArgument.exit_code, "does not exist"),
    ],
    ids=["wrong-sha", "malformed-sha", "char-device", "ftp-url", "missing-image"],
)
def test_cli_errors_are_one_line_with_distinct_exit_codes(
    loop_disk: LoopDisk, tmp_path: Path, args_for: object, code: int, message: str
) -> None:
    image = tmp_path / "root.img.gz"
    image.write_bytes(compress(payload(2 * MIB), "gzip"))
    done = run_cli(*args_for(image, loop_disk.partition(2)))  # type: ignore[operator]
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("ab-flasher:")]
    assert len(lines) == 1
    assert message in lines[0].lower()


def test_cli_write_of_a_real_ext4_root(loop_disk: LoopDisk, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / ".ab_version").write_text("1.1.0\n")
    (tree / "etc" / "hostname").write_text("pi\n")
    image = tmp_path / "root.img"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(image), "16M"], check=True, timeout=60)
    subprocess.run(["gzip", "-6", str(image)], check=True, timeout=60)
    done = run_cli("write", str(image) + ".gz", loop_disk.partition(3), "-q")
    assert done.returncode == 0, done.stderr
    shown = subprocess.run(
        ["debugfs", "-R", "cat /.ab_version", loop_disk.partition(3)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert shown.stdout.strip() == "1.1.0"


@pytest.mark.parametrize(
    "faults",
    [{"drop_after": 300_000, "drop_requests": 2}, {"drop_after": 300_000, "drop_requests": 1, "ignore_range": True}],
    ids=["resumed-with-range", "server-ignores-range"],
)
def test_http_download_that_drops_mid_body_still_installs_and_verifies(
    loop_disk: LoopDisk, faults: dict[str, object]
) -> None:
    from abflasher.image.http import HttpSource
    from tests.support.httpserver import FaultServer

    data = payload(6 * MIB)
    blob = compress(data, "gzip")
    with FaultServer() as server:
        server.add("/root.img.gz", blob, **faults)
        source = HttpSource(server.url("/root.img.gz"), backoff=0.01, read_timeout=5)
        try:
            result = install_image(source, loop_disk.partition(2), expected_sha256=hashlib.sha256(blob).hexdigest())
        finally:
            source.close()
        ranges = [r.range for r in server.requests_for("/root.img.gz")]
    assert result.verified
    assert result.stream.matched == "source"
    assert device_sha(loop_disk.partition(2), len(data)) == hashlib.sha256(data).hexdigest()
    assert len(ranges) >= 2
    assert (ranges[1] or "").startswith("bytes=")


def test_cli_refuses_to_write_when_the_checksum_file_is_missing(loop_disk: LoopDisk) -> None:
    from tests.support.httpserver import FaultServer

    node = loop_disk.partition(3)
    before = device_sha(node)
    with FaultServer() as server:
        server.add("/root.img.gz", compress(payload(MIB), "gzip"))
        done = run_cli(
            "write", server.url("/root.img.gz"), node, "--sha256-url", server.url("/root.img.gz.sha256"), "-q"
        )
    assert done.returncode == errors.Network.exit_code, done.stderr
    assert "refusing to install without verification" in done.stderr
    assert device_sha(node) == before, "nothing may be written without the checksum"
