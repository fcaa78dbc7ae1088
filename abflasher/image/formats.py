"""What the bytes are: detect the compression from magic bytes (never the file name) and decode it as a stream.

Every decoder here is pull-based and bounded: ``read(n)`` never returns more than ``n`` bytes however well the input
compresses, so memory stays flat for any image. Multi-member gzip, multi-stream xz/bzip2 and multi-frame zstd are
decoded as one image; anything after the last member is trailing garbage and an error, as is a stream that ends
before its end-of-stream marker.
"""

from __future__ import annotations

import bz2
import enum
import lzma
import zlib
from collections.abc import Callable
from typing import Any, Protocol

from abflasher import errors


class ImageFormat(enum.StrEnum):
    GZIP = "gzip"
    XZ = "xz"
    ZSTD = "zstd"
    BZIP2 = "bzip2"
    RAW = "raw"


GZIP_MAGIC = b"\x1f\x8b\x08"
XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BZIP2_MAGIC = b"BZh"

#: How many leading bytes detection looks at: enough for the ext2/3/4 superblock magic at 1080.
DETECT_BYTES = 4096

_EXT_MAGIC_OFFSET = 1080
_EROFS_MAGIC_OFFSET = 1024
_F2FS_MAGIC_OFFSET = 1024


def _looks_like_raw_image(head: bytes) -> bool:
    """A partition or disk image we recognise: a file system, or a disk with a partition table."""
    if head[_EXT_MAGIC_OFFSET : _EXT_MAGIC_OFFSET + 2] == b"\x53\xef":
        return True
    if head[:4] in (b"hsqs", b"sqsh"):
        return True
    if head[_EROFS_MAGIC_OFFSET : _EROFS_MAGIC_OFFSET + 4] == b"\xe2\xe1\xf5\xe0":
        return True
    if head[_F2FS_MAGIC_OFFSET : _F2FS_MAGIC_OFFSET + 4] == b"\x10\x20\xf5\xf2":
        return True
    # FAT boot sectors and MBR disks both end their first sector with 55 AA; a GPT disk carries a protective MBR.
    return len(head) >= 512 and head[510:512] == b"\x55\xaa"


def detect_format(head: bytes) -> ImageFormat:
    """The format of an image from its first bytes (up to DETECT_BYTES of them)."""
    if not head:
        raise errors.BadImage("the image is empty")
    if head.startswith(GZIP_MAGIC):
        return ImageFormat.GZIP
    if head.startswith(XZ_MAGIC):
        return ImageFormat.XZ
    if head.startswith(ZSTD_MAGIC):
        return ImageFormat.ZSTD
    if head.startswith(BZIP2_MAGIC) and len(head) > 3 and head[3:4] in b"123456789":
        return ImageFormat.BZIP2
    if _looks_like_raw_image(head):
        return ImageFormat.RAW
    if head[:1] == b"\x1f" and head[1:2] in (b"\x8b", b"\x9d", b"\x1e", b"\xa0"):
        raise errors.BadImage("unsupported compression (an old compress/pack format): recompress with gzip or xz")
    if head.startswith(b"PK\x03\x04"):
        raise errors.BadImage("the image is a zip archive: unpack it or recompress the image with gzip, xz or zstd")
    raise errors.BadImage(
        "unknown image format: not gzip, xz, zstd or bzip2, and not a raw partition or disk image "
        "(no file system or partition table signature found)"
    )


class ChunkSource(Protocol):
    def __call__(self) -> bytes:
        """The next chunk of compressed input; ``b""`` at the end."""
        ...


class Decoder(Protocol):
    def read(self, max_length: int) -> bytes:
        """Up to ``max_length`` decoded bytes; ``b""`` only at the (verified) end of the image."""
        ...


def available_gzip_implementations() -> dict[str, Callable[[], Any]]:
    """gzip inflaters importable here, fastest first; each value makes a zlib-compatible decompressobj."""
    impls: dict[str, Callable[[], Any]] = {}
    try:
        from isal import isal_zlib

        impls["isal"] = lambda: isal_zlib.decompressobj(wbits=31)
    except ImportError:
        pass
    try:
        from zlib_ng import zlib_ng

        impls["zlib-ng"] = lambda: zlib_ng.decompressobj(wbits=31)
    except ImportError:
        pass
    impls["zlib"] = lambda: zlib.decompressobj(wbits=31)
    return impls


def gzip_implementation(name: str = "auto") -> tuple[str, Callable[[], Any]]:
    """Pick a gzip inflater: ``auto`` takes the fastest importable one (isal or zlib-ng), else stdlib zlib."""
    impls = available_gzip_implementations()
    if name == "auto":
        first = next(iter(impls))
        return first, impls[first]
    if name not in impls:
        known = ", ".join(["auto", "isal", "zlib-ng", "zlib"])
        if name in ("isal", "zlib-ng"):
            raise errors.InvalidArgument(f"the {name} inflater is not installed (python3 module missing)")
        raise errors.InvalidArgument(f"unknown gzip inflater {name!r}; use one of {known}")
    return name, impls[name]


class _RawDecoder:
    def __init__(self, next_chunk: ChunkSource, head: bytes) -> None:
        self._next = next_chunk
        self._pending = head

    def read(self, max_length: int) -> bytes:
        if not self._pending:
            self._pending = self._next()
        out, self._pending = self._pending[:max_length], self._pending[max_length:]
        return out


class _MemberDecoder:
    """Shared logic of gzip/xz/bzip2: a sequence of members, each decoded by a fresh stdlib-style object.

    ``zlib_style`` says how the decompress object hands back input it could not use yet when the output limit is
    hit: zlib-like objects return it in ``unconsumed_tail`` (to be passed again), lzma/bz2 keep it and want ``b""``.
    """

    def __init__(
        self,
        next_chunk: ChunkSource,
        head: bytes,
        new_member: Callable[[], Any],
        magic: bytes,
        format_name: str,
        *,
        zlib_style: bool,
        null_padding_allowed: bool = False,
    ) -> None:
        self._next = next_chunk
        self._new_member = new_member
        self._magic = magic
        self._format = format_name
        self._zlib_style = zlib_style
        self._null_padding_allowed = null_padding_allowed
        self._obj: Any = None
        self._input = head
        self._input_ended = False
        self._members = 0
        self._stream_offset = 0

    def _more_input(self) -> bool:
        if self._input_ended:
            return False
        chunk = self._next()
        if not chunk:
            self._input_ended = True
            return False
        self._input += chunk
        return True

    def _start_member(self) -> bool:
        """Between members: start the next one, or return False at a clean end of the image."""
        while len(self._input) < len(self._magic) and self._more_input():
            pass
        if self._null_padding_allowed and self._input.startswith(b"\0"):
            # xz allows stream padding between and after streams: NUL bytes, a multiple of four of them.
            while not self._input.strip(b"\0") and self._more_input():
                pass
            stripped = self._input.lstrip(b"\0")
            padding = len(self._input) - len(stripped)
            if padding % 4:
                raise errors.BadImage(
                    f"trailing garbage after the end of the xz stream: {padding} NUL bytes of padding "
                    "is not a multiple of four"
                )
            self._stream_offset += padding
            self._input = stripped
            while len(self._input) < len(self._magic) and self._more_input():
                pass
        if not self._input:
            return False
        if self._members and not self._input.startswith(self._magic):
            raise errors.BadImage(
                f"trailing garbage after the end of the {self._format} stream "
                f"(at compressed byte {self._stream_offset}): the image file is damaged or has data appended"
            )
        self._obj = self._new_member()
        self._members += 1
        return True

    def read(self, max_length: int) -> bytes:
        while True:
            if self._obj is None and not self._start_member():
                return b""
            obj = self._obj
            data, self._input = self._input, b""
            try:
                out = obj.decompress(data, max_length)
            except Exception as exc:
                raise self._corrupt(exc) from exc
            if self._zlib_style:
                self._input = obj.unconsumed_tail
            self._stream_offset += len(data) - len(self._input)
            if obj.eof:
                self._input = obj.unused_data + self._input
                self._stream_offset -= len(obj.unused_data)
                self._obj = None
            if out:
                return bytes(out)
            # No output: the object is starved unless it still holds input of its own.
            starved = not self._input if self._zlib_style else obj.needs_input
            if self._obj is not None and starved and not self._more_input():
                return self._truncated()

    def _truncated(self) -> bytes:
        raise errors.BadImage(
            f"the {self._format} image is truncated: it ended after {self._stream_offset} compressed bytes, "
            "before its end-of-stream marker (incomplete download or copy?)"
        )

    def _corrupt(self, exc: Exception) -> errors.BadImage:
        return errors.BadImage(
            f"corrupt {self._format} data near compressed byte {self._stream_offset}: {exc}"
        )


class _ZstdDecoder:
    """zstd frames, decoded with python3-zstandard.

    Its decompressobj cannot bound its output, and zstd RLE blocks turn 4 input bytes into 128 KiB, so input is fed
    in slices sized from the last observed ratio, which keeps each call near ``_TARGET_OUTPUT`` bytes.
    """

    _TARGET_OUTPUT = 4 << 20
    _MAX_SLICE = 8 << 10

    def __init__(self, next_chunk: ChunkSource, head: bytes) -> None:
        import zstandard

        self._zstd = zstandard
        self._dctx = zstandard.ZstdDecompressor()
        self._next = next_chunk
        self._input = head
        self._input_ended = False
        self._obj: Any = None
        self._frames = 0
        self._slice = 1024
        self._output = b""
        self._stream_offset = 0

    def read(self, max_length: int) -> bytes:
        while not self._output:
            if not self._decode_some():
                return b""
        out, self._output = self._output[:max_length], self._output[max_length:]
        return out

    def _decode_some(self) -> bool:
        if not self._input and not self._input_ended:
            self._input = self._next()
            self._input_ended = not self._input
        if self._obj is None:
            while len(self._input) < 4 and not self._input_ended:
                chunk = self._next()
                self._input_ended = not chunk
                self._input += chunk
            if not self._input:
                return False
            skippable_frame = (self._input[0] & 0xF0) == 0x50 and self._input[1:4] == b"\x2a\x4d\x18"
            if self._frames and not (self._input.startswith(ZSTD_MAGIC) or skippable_frame):
                raise errors.BadImage(
                    f"trailing garbage after the end of the zstd stream (at compressed byte {self._stream_offset})"
                )
            self._obj = self._dctx.decompressobj()
            self._frames += 1
        if not self._input:
            raise errors.BadImage(
                f"the zstd image is truncated: it ended after {self._stream_offset} compressed bytes, "
                "inside a frame (incomplete download or copy?)"
            )
        piece, self._input = self._input[: self._slice], self._input[self._slice :]
        try:
            out = self._obj.decompress(piece)
        except self._zstd.ZstdError as exc:
            raise errors.BadImage(f"corrupt zstd data near compressed byte {self._stream_offset}: {exc}") from exc
        used = len(piece) - len(self._obj.unused_data)
        self._stream_offset += used
        ratio = max(1, len(out) // max(1, used))
        self._slice = max(64, min(self._MAX_SLICE, self._TARGET_OUTPUT // ratio))
        if self._obj.eof:
            self._input = self._obj.unused_data + self._input
            self._obj = None
        self._output = out
        return True


def open_decoder(
    image_format: ImageFormat, next_chunk: ChunkSource, head: bytes, *, gzip_impl: str = "auto"
) -> Decoder:
    """A bounded streaming decoder for ``image_format``; ``head`` is input already read for detection."""
    if image_format is ImageFormat.GZIP:
        _, new_member = gzip_implementation(gzip_impl)
        return _MemberDecoder(next_chunk, head, new_member, GZIP_MAGIC, "gzip", zlib_style=True)
    if image_format is ImageFormat.XZ:
        return _MemberDecoder(
            next_chunk,
            head,
            lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ),
            XZ_MAGIC,
            "xz",
            zlib_style=False,
            null_padding_allowed=True,
        )
    if image_format is ImageFormat.BZIP2:
        return _MemberDecoder(next_chunk, head, bz2.BZ2Decompressor, BZIP2_MAGIC, "bzip2", zlib_style=False)
    if image_format is ImageFormat.ZSTD:
        return _ZstdDecoder(next_chunk, head)
    return _RawDecoder(next_chunk, head)
