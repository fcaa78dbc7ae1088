from __future__ import annotations

import io

import pytest
import zstandard

from abflasher import errors
from abflasher.image import formats
from abflasher.image.formats import ImageFormat, detect_format, open_decoder
from tests.support.images import MIB, compress, payload

pytestmark = pytest.mark.timeout(60)

FORMATS = ["gzip", "xz", "bzip2", "zstd", "raw"]
COMPRESSED = ["gzip", "xz", "bzip2", "zstd"]


def decode_all(
    blob: bytes, fmt: str, *, read_size: int = 1 << 20, gzip_impl: str = "auto", chunk: int = 65536
) -> bytes:
    stream = io.BytesIO(blob)
    head = stream.read(formats.DETECT_BYTES)
    decoder = open_decoder(ImageFormat(fmt), lambda: stream.read(chunk), head, gzip_impl=gzip_impl)
    out = bytearray()
    while True:
        data = decoder.read(read_size)
        assert len(data) <= read_size
        if not data:
            return bytes(out)
        out += data


@pytest.mark.parametrize("fmt", FORMATS)
def test_detects_format_from_magic_bytes(fmt: str) -> None:
    assert detect_format(compress(payload(64 * 1024), fmt)[:4096]) is ImageFormat(fmt)


def test_detection_ignores_what_the_name_says() -> None:
    # the bytes decide; there is no name to go by at all
    assert detect_format(compress(b"x" * 100, "xz")) is ImageFormat.XZ


def test_empty_image_is_rejected() -> None:
    with pytest.raises(errors.BadImage, match="empty"):
        detect_format(b"")


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (b"hello, world\n" * 400, "unknown image format"),
        (b"PK\x03\x04" + bytes(100), "zip"),
        (b"\x1f\x9d\x90" + bytes(100), "unsupported compression"),
        (bytes(4096), "unknown image format"),
    ],
)
def test_unknown_formats_are_named(head: bytes, message: str) -> None:
    with pytest.raises(errors.BadImage, match=message):
        detect_format(head)


@pytest.mark.parametrize(
    "head",
    [
        bytes(1080) + b"\x53\xef" + bytes(100),
        b"hsqs" + bytes(2000),
        bytes(510) + b"\x55\xaa" + bytes(1000),
        bytes(1024) + b"\xe2\xe1\xf5\xe0" + bytes(100),
    ],
    ids=["ext4", "squashfs", "mbr-or-fat", "erofs"],
)
def test_raw_partition_images_are_recognised(head: bytes) -> None:
    assert detect_format(head) is ImageFormat.RAW


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("members", [1, 3])
def test_round_trip(fmt: str, members: int) -> None:
    data = payload(5 * MIB + 12345)
    assert decode_all(compress(data, fmt, members=members), fmt) == data


@pytest.mark.parametrize("impl", list(formats.available_gzip_implementations()))
def test_every_installed_gzip_inflater_decodes_the_same(impl: str) -> None:
    data = payload(3 * MIB)
    assert decode_all(compress(data, "gzip", members=2), "gzip", gzip_impl=impl) == data


def test_small_reads_and_tiny_input_chunks() -> None:
    data = payload(300_000)
    for fmt in COMPRESSED:
        assert decode_all(compress(data, fmt, members=2), fmt, read_size=777, chunk=13) == data


def test_unknown_inflater_is_an_invalid_argument() -> None:
    with pytest.raises(errors.InvalidArgument, match="unknown gzip inflater"):
        formats.gzip_implementation("pigz")


@pytest.mark.parametrize("fmt", COMPRESSED)
@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.999])
def test_truncated_stream_is_detected(fmt: str, fraction: float) -> None:
    blob = compress(payload(2 * MIB), fmt)
    cut = blob[: max(16, int(len(blob) * fraction))]
    with pytest.raises(errors.BadImage, match="truncated|corrupt"):
        decode_all(cut, fmt)


@pytest.mark.parametrize("fmt", COMPRESSED)
def test_truncated_by_one_byte(fmt: str) -> None:
    blob = compress(payload(1 * MIB), fmt)
    with pytest.raises(errors.BadImage, match="truncated|corrupt"):
        decode_all(blob[:-1], fmt)


@pytest.mark.parametrize("fmt", COMPRESSED)
@pytest.mark.parametrize("garbage", [b"garbage!", b"\x00" * 7, b"\x01"], ids=["text", "zeros", "one-byte"])
def test_trailing_garbage_is_detected(fmt: str, garbage: bytes) -> None:
    blob = compress(payload(1 * MIB), fmt) + garbage
    with pytest.raises(errors.BadImage, match="trailing garbage|corrupt|truncated"):
        decode_all(blob, fmt)


def test_xz_stream_padding_is_accepted() -> None:
    data = payload(1 * MIB)
    xz = compress(data, "xz")
    assert decode_all(xz + b"\x00" * 8, "xz") == data
    assert decode_all(xz + b"\x00" * 4 + xz, "xz") == data + data


@pytest.mark.parametrize("fmt", COMPRESSED)
def test_corrupt_data_is_detected(fmt: str) -> None:
    blob = bytearray(compress(payload(2 * MIB), fmt))
    middle = len(blob) // 2
    blob[middle : middle + 64] = bytes(b ^ 0x5A for b in blob[middle : middle + 64])
    with pytest.raises(errors.BadImage, match="corrupt|truncated|trailing"):
        decode_all(bytes(blob), fmt)


def test_gzip_crc_mismatch_is_corruption() -> None:
    blob = bytearray(compress(payload(MIB), "gzip"))
    blob[-8] ^= 0xFF  # CRC32 field of the trailer
    with pytest.raises(errors.BadImage, match="corrupt"):
        decode_all(bytes(blob), "gzip")


def test_zstd_output_stays_bounded_for_highly_compressible_input() -> None:
    # 512 MiB of zeros is a few KiB of zstd RLE blocks: one careless decompress() call would return it all.
    size = 512 * MIB
    compressor = zstandard.ZstdCompressor(level=1)
    chunk = bytes(8 * MIB)
    writer = compressor.compressobj()
    blob = b"".join(writer.compress(chunk) for _ in range(size // len(chunk))) + writer.flush()
    stream = io.BytesIO(blob)
    decoder = open_decoder(ImageFormat.ZSTD, lambda: stream.read(65536), stream.read(4096))
    total = 0
    largest_pending = 0
    while data := decoder.read(MIB):
        total += len(data)
        largest_pending = max(largest_pending, len(decoder._output))  # type: ignore[attr-defined]
    assert total == size
    assert largest_pending <= 64 * MIB


def test_gzip_bomb_output_is_bounded_per_read() -> None:
    # 64 MiB of zeros deflates to ~64 KiB; each read still returns at most what was asked for.
    blob = compress(bytes(64 * MIB), "gzip")
    assert len(blob) < 128 * 1024
    assert len(decode_all(blob, "gzip", read_size=MIB)) == 64 * MIB
