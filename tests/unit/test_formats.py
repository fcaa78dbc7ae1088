from __future__ import annotations

import io
import zlib

import pytest
import zstandard

from abflasher import errors
from abflasher.image import formats
from abflasher.image.child_decoder import ChildDecoder
from abflasher.image.formats import ImageFormat, detect_format, open_decoder
from tests.support.images import MIB, compress, payload

pytestmark = pytest.mark.timeout(60)

FORMATS = ["gzip", "xz", "bzip2", "zstd", "raw"]
COMPRESSED = ["gzip", "xz", "bzip2", "zstd"]
#: Every gzip inflater installed here: the in-process modules and igzip (Debian's isal) as a child process.
GZIP_INFLATERS = [*formats.available_gzip_implementations(), "igzip"]


def decode_all(
    blob: bytes, fmt: str, *, read_size: int = 1 << 20, gzip_impl: str = "auto", chunk: int = 65536
) -> bytes:
    stream = io.BytesIO(blob)
    head = stream.read(formats.DETECT_BYTES)
    decoder = open_decoder(
        ImageFormat(fmt), lambda: stream.read(chunk), head, gzip_impl=gzip_impl, source_size=len(blob)
    )
    out = bytearray()
    try:
        while True:
            data = decoder.read(read_size)
            assert len(data) <= read_size
            if not data:
                return bytes(out)
            out += data
    finally:
        if isinstance(decoder, ChildDecoder):
            decoder.close()


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


@pytest.mark.parametrize("impl", GZIP_INFLATERS)
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


# gzip members are parsed by ab-flasher and inflated as raw deflate; their CRC-32 is checked by GzipMemberCheck.


def gzip_member(
    data: bytes, *, extra: bytes | None = None, name: bytes | None = None, comment: bytes | None = None,
    header_crc: bool = False, flags: int = 0,
) -> bytes:
    """One RFC 1952 member with whichever optional header fields are asked for."""
    fields = b""
    if extra is not None:
        flags |= 0x04
        fields += len(extra).to_bytes(2, "little") + extra
    if name is not None:
        flags |= 0x08
        fields += name + b"\0"
    if comment is not None:
        flags |= 0x10
        fields += comment + b"\0"
    header = b"\x1f\x8b\x08" + bytes([flags | (0x02 if header_crc else 0)]) + bytes(4) + b"\x00\x03" + fields
    if header_crc:
        header += (zlib.crc32(header) & 0xFFFF).to_bytes(2, "little")
    deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = deflate.compress(data) + deflate.flush()
    return header + body + zlib.crc32(data).to_bytes(4, "little") + (len(data) & 0xFFFFFFFF).to_bytes(4, "little")


@pytest.mark.parametrize("impl", GZIP_INFLATERS)
def test_gzip_optional_header_fields_split_anywhere(impl: str) -> None:
    first, second = payload(200_000), payload(150_000, seed=2)
    blob = gzip_member(first, extra=b"AB\x02\x00xy", name=b"rootfs.img", comment=b"built by ci", header_crc=True)
    blob += gzip_member(second, name=b"second")
    assert decode_all(blob, "gzip", gzip_impl=impl, chunk=1, read_size=4096) == first + second
    assert decode_all(blob, "gzip", gzip_impl=impl, chunk=7) == first + second


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (lambda: bytearray(gzip_member(b"x" * 1000, header_crc=True)), "CRC-16"),
        (lambda: bytearray(gzip_member(b"x" * 1000, flags=0x20)), "reserved flag"),
    ],
    ids=["header-crc", "reserved-flags"],
)
def test_bad_gzip_headers(blob: object, message: str) -> None:
    data = blob()  # type: ignore[operator]
    if message == "CRC-16":
        data[11] ^= 0xFF
    with pytest.raises(errors.BadImage, match=message):
        decode_all(bytes(data), "gzip")


def test_gzip_length_mismatch_is_corruption() -> None:
    blob = bytearray(compress(payload(MIB), "gzip"))
    blob[-1] ^= 0x01  # ISIZE field of the trailer
    with pytest.raises(errors.BadImage, match="corrupt gzip data: the length"):
        decode_all(bytes(blob), "gzip", gzip_impl="zlib")


def test_gzip_header_whose_name_never_ends_is_refused() -> None:
    blob = b"\x1f\x8b\x08\x08" + bytes(6) + b"n" * (formats.MAX_GZIP_HEADER + 10)
    with pytest.raises(errors.BadImage, match="longer than"):
        decode_all(blob, "gzip", gzip_impl="zlib")
    # igzip skips a name of any length without keeping it; the file then ends inside the header.
    with pytest.raises(errors.BadImage, match="truncated"):
        decode_all(blob, "gzip", gzip_impl="igzip")


@pytest.mark.parametrize("cut", [3, 9, 12, -1, -5, -8])
def test_gzip_cut_in_a_header_or_a_trailer_is_truncated(cut: int) -> None:
    blob = gzip_member(payload(300_000), name=b"img") + gzip_member(b"tail", name=b"x")
    cut_at = len(blob) + cut if cut < 0 else len(blob) - len(gzip_member(b"tail", name=b"x")) + cut
    with pytest.raises(errors.BadImage, match="truncated"):
        decode_all(blob[:cut_at], "gzip")


@pytest.mark.parametrize("impl", GZIP_INFLATERS)
def test_members_ending_exactly_at_a_read_boundary(impl: str) -> None:
    data = payload(4 * MIB)
    assert decode_all(compress(data, "gzip", members=4), "gzip", gzip_impl=impl, read_size=MIB) == data


def test_member_check_accepts_trailers_announced_after_their_bytes() -> None:
    check = formats.GzipMemberCheck(zlib.crc32)
    check.update(b"abc")
    check.expect(3, zlib.crc32(b"abc"), 3)
    check.update(memoryview(b"de"))
    check.expect(5, zlib.crc32(b"de"), 2)
    check.finish()


def test_member_check_splits_a_buffer_at_member_ends() -> None:
    check = formats.GzipMemberCheck(zlib.crc32)
    check.expect(2, zlib.crc32(b"ab"), 2)
    check.expect(2, zlib.crc32(b""), 0)  # an empty member
    check.expect(5, zlib.crc32(b"cde"), 3)
    check.update(b"abcdefg")
    check.expect(7, zlib.crc32(b"fg"), 2)
    check.finish()


def test_member_check_names_the_bad_member() -> None:
    check = formats.GzipMemberCheck(zlib.crc32)
    check.expect(2, zlib.crc32(b"ab"), 2)
    check.expect(4, zlib.crc32(b"cX"), 2)
    with pytest.raises(errors.BadImage, match="CRC-32 of member 2, which ends at image byte 4"):
        check.update(b"abcd")


def test_member_check_refuses_output_no_trailer_covers() -> None:
    check = formats.GzipMemberCheck(zlib.crc32)
    check.expect(2, zlib.crc32(b"ab"), 2)
    check.update(b"abc")
    with pytest.raises(errors.Internal):
        check.finish()


def test_data_forced_as_gzip_that_is_not_gzip_is_refused() -> None:
    with pytest.raises(errors.BadImage, match="gzip magic"):
        decode_all(payload(64 * 1024), "gzip")
