"""What the bytes are: detect the compression from magic bytes (never the file name) and decode it as a stream.

Every decoder here is pull-based and bounded: ``read(n)`` never returns more than ``n`` bytes however well the input
compresses, so memory stays flat for any image. Multi-member gzip, multi-stream xz/bzip2 and multi-frame zstd are
decoded as one image; anything after the last member is trailing garbage and an error, as is a stream that ends
before its end-of-stream marker.
"""

from __future__ import annotations

import bz2
import collections
import enum
import lzma
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from abflasher import errors
from abflasher.image.child_decoder import ChildDecoder, GzipFraming, igzip_path


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


def is_ext_file_system(head: bytes) -> bool:
    """Do these first bytes (at least 1082 of them) hold an ext2/3/4 superblock?"""
    return head[_EXT_MAGIC_OFFSET : _EXT_MAGIC_OFFSET + 2] == b"\x53\xef"


def _looks_like_raw_image(head: bytes) -> bool:
    """A partition or disk image we recognise: a file system, or a disk with a partition table."""
    if is_ext_file_system(head):
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


@dataclass(frozen=True)
class GzipInflater:
    """A zlib-compatible module: a raw-deflate decompressobj factory and the module's CRC-32."""

    new_raw: Callable[[], Any]
    crc32: Callable[[Any, int], int]


def available_gzip_implementations() -> dict[str, GzipInflater]:
    """gzip inflaters importable here, fastest first."""
    impls: dict[str, GzipInflater] = {}
    try:
        from isal import isal_zlib

        impls["isal"] = GzipInflater(lambda: isal_zlib.decompressobj(wbits=-15), isal_zlib.crc32)
    except ImportError:
        pass
    try:
        from zlib_ng import zlib_ng

        impls["zlib-ng"] = GzipInflater(lambda: zlib_ng.decompressobj(wbits=-15), zlib_ng.crc32)
    except ImportError:
        pass
    impls["zlib"] = GzipInflater(lambda: zlib.decompressobj(wbits=-15), zlib.crc32)
    return impls


#: The names `--inflater` and `gzip_inflater` take. igzip is the program of Debian's isal package, run as a child
#: process (image/child_decoder.py); the others are Python modules inflating in process.
GZIP_INFLATERS = ("auto", "igzip", "isal", "zlib-ng", "zlib")


def gzip_inflater_name(name: str = "auto") -> str:
    """The gzip inflater ``name`` stands for: ``auto`` is igzip when installed, else the fastest importable module
    (isal or zlib-ng from PyPI), else stdlib zlib. InvalidArgument when the one named is not installed."""
    if name == "igzip" or (name == "auto" and igzip_path() is not None):
        if igzip_path() is None:
            raise errors.InvalidArgument("the igzip inflater is not installed (install the Debian package isal)")
        return "igzip"
    return gzip_implementation(name)[0]


def gzip_implementation(name: str = "auto") -> tuple[str, GzipInflater]:
    """Pick an in-process gzip inflater: ``auto`` takes the fastest importable one (isal or zlib-ng), else stdlib
    zlib."""
    impls = available_gzip_implementations()
    if name == "auto":
        first = next(iter(impls))
        return first, impls[first]
    if name not in impls:
        known = ", ".join(GZIP_INFLATERS)
        if name in ("isal", "zlib-ng"):
            raise errors.InvalidArgument(f"the {name} inflater is not installed (python3 module missing)")
        if name == "igzip":
            raise errors.InvalidArgument("igzip is a program, not an in-process inflater")
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


class _MemberInput:
    """Compressed input of a sequence of members, pulled a chunk at a time, with the offset decoded so far."""

    def __init__(self, next_chunk: ChunkSource, head: bytes, format_name: str) -> None:
        self._next = next_chunk
        self._format = format_name
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

    def _decompress(self, max_length: int) -> tuple[Any, bytes, bytes]:
        """All pending input to the current member's decompressor: (the decompressor, that input, its output)."""
        obj = self._obj
        data, self._input = self._input, b""
        try:
            return obj, data, obj.decompress(data, max_length)
        except Exception as exc:
            raise errors.BadImage(
                f"corrupt {self._format} data near compressed byte {self._stream_offset}: {exc}"
            ) from exc

    def _member_follows(self, magic: bytes) -> bool:
        """Between members: False at a clean end of the image, True when another member starts here."""
        while len(self._input) < len(magic) and self._more_input():
            pass
        if not self._input:
            return False
        if self._members and not self._input.startswith(magic):
            raise errors.BadImage(
                f"trailing garbage after the end of the {self._format} stream "
                f"(at compressed byte {self._stream_offset}): the image file is damaged or has data appended"
            )
        return True

    def _truncated(self) -> NoReturn:
        raise errors.BadImage(
            f"the {self._format} image is truncated: it ended after {self._stream_offset} compressed bytes, "
            "before its end-of-stream marker (incomplete download or copy?)"
        )


class _MemberDecoder(_MemberInput):
    """Shared logic of xz/bzip2: a sequence of members, each decoded by a fresh lzma/bz2 decompressor (which keeps
    the input it could not use yet when the output limit is hit, and wants ``b""`` to go on)."""

    def __init__(
        self,
        next_chunk: ChunkSource,
        head: bytes,
        new_member: Callable[[], Any],
        magic: bytes,
        format_name: str,
        *,
        null_padding_allowed: bool = False,
    ) -> None:
        super().__init__(next_chunk, head, format_name)
        self._new_member = new_member
        self._magic = magic
        self._null_padding_allowed = null_padding_allowed

    def _start_member(self) -> bool:
        """Between members: start the next one, or return False at a clean end of the image."""
        while not self._input and self._more_input():
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
        if not self._member_follows(self._magic):
            return False
        self._obj = self._new_member()
        self._members += 1
        return True

    def read(self, max_length: int) -> bytes:
        while True:
            if self._obj is None and not self._start_member():
                return b""
            obj, data, out = self._decompress(max_length)
            self._stream_offset += len(data) - len(self._input)
            if obj.eof:
                self._input = obj.unused_data + self._input
                self._stream_offset -= len(obj.unused_data)
                self._obj = None
            if out:
                return bytes(out)
            # No output: the object is starved unless it still holds input of its own.
            if self._obj is not None and obj.needs_input and not self._more_input():
                self._truncated()


_FHCRC, _FEXTRA, _FNAME, _FCOMMENT = 0x02, 0x04, 0x08, 0x10
_GZIP_RESERVED_FLAGS = 0xE0
#: A gzip header longer than this (its name or comment never ends) is refused rather than buffered.
MAX_GZIP_HEADER = 1 << 20


class GzipMemberCheck:
    """The CRC-32 and length of each gzip member's output, compared with the member's trailer.

    The decoder inflates raw deflate and announces each member's trailer here (``expect``); whoever consumes the
    output feeds all of it, in order, to ``update`` and calls ``finish`` after the last byte. The pipeline does that on
    its hashing thread, beside the sha256: the CRC-32 is a tenth of stdlib zlib's inflate time, and the inflate is the
    one stage that cannot be spread over cores. Used by the decoder itself when nobody else takes it.
    """

    def __init__(self, crc32: Callable[[Any, int], int]) -> None:
        self._crc32 = crc32
        # Appended by the decoding thread, consumed by the one calling update(): deque operations are atomic.
        self._ends: collections.deque[tuple[int, int, int]] = collections.deque()
        self._position = 0
        self._member_start = 0
        self._crc = 0
        self._members = 0

    def expect(self, end: int, crc: int, size: int) -> None:
        """A member's output ends at image byte ``end``; its trailer says CRC-32 ``crc`` and length ``size``."""
        self._ends.append((end, crc, size))

    def update(self, data: Any) -> None:
        view = memoryview(data)
        end = self._position + len(view)
        while self._ends and self._ends[0][0] <= end:
            member_end, crc, size = self._ends.popleft()
            take = member_end - self._position
            if take < 0:
                raise errors.Internal(f"gzip member end {member_end} announced after byte {self._position} was checked")
            if take:
                self._crc = self._crc32(view[:take], self._crc)
                view = view[take:]
                self._position = member_end
            self._close_member(crc, size)
        if len(view):
            self._crc = self._crc32(view, self._crc)
            self._position = end

    def finish(self) -> None:
        """All output was fed: every member must have been checked."""
        self.update(b"")
        if self._ends or self._position != self._member_start:
            raise errors.Internal("gzip output is not covered by the members' trailers")

    def _close_member(self, crc: int, size: int) -> None:
        self._members += 1
        length = self._position - self._member_start
        if self._crc != crc or length & 0xFFFFFFFF != size:
            what = "CRC-32" if self._crc != crc else f"length ({length} bytes)"
            raise errors.BadImage(
                f"corrupt gzip data: the {what} of member {self._members}, which ends at image byte "
                f"{self._position}, does not match the member's trailer (the image file is damaged)"
            )
        self._crc = 0
        self._member_start = self._position


def _gzip_header_length(buf: bytes, crc32: Callable[[Any, int], int]) -> int | None:
    """The length of the RFC 1952 member header at the start of ``buf``, or None when ``buf`` ends inside it."""
    if len(buf) < 10:
        return None
    if not buf.startswith(GZIP_MAGIC):
        raise errors.BadImage("corrupt gzip header: the member does not start with the gzip magic bytes")
    flags = buf[3]
    if flags & _GZIP_RESERVED_FLAGS:
        raise errors.BadImage(f"corrupt gzip header: reserved flag bits are set ({flags:#04x})")
    pos = 10
    if flags & _FEXTRA:
        if len(buf) < pos + 2:
            return None
        pos += 2 + int.from_bytes(buf[pos : pos + 2], "little")
        if len(buf) < pos:
            return None
    for flag in (_FNAME, _FCOMMENT):
        if flags & flag:
            zero = buf.find(b"\0", pos)
            if zero < 0:
                return None
            pos = zero + 1
    if flags & _FHCRC:
        if len(buf) < pos + 2:
            return None
        if int.from_bytes(buf[pos : pos + 2], "little") != crc32(buf[:pos], 0) & 0xFFFF:
            raise errors.BadImage("corrupt gzip header: its CRC-16 does not match")
        pos += 2
    return pos


class _GzipDecoder(_MemberInput):
    """gzip members parsed here, their deflate data inflated raw, their trailers checked by a GzipMemberCheck."""

    def __init__(
        self, next_chunk: ChunkSource, head: bytes, inflater: GzipInflater, check: GzipMemberCheck | None
    ) -> None:
        super().__init__(next_chunk, head, "gzip")
        self._inflater = inflater
        self._own_check = check is None
        self._check = check if check is not None else GzipMemberCheck(inflater.crc32)
        self._output = 0

    def _consume(self, length: int) -> None:
        self._input = self._input[length:]
        self._stream_offset += length

    def _start_member(self) -> bool:
        """Between members: parse the next header, or return False at a clean end of the image."""
        if not self._member_follows(GZIP_MAGIC):
            return False
        while (length := _gzip_header_length(self._input, self._inflater.crc32)) is None:
            if len(self._input) > MAX_GZIP_HEADER:
                raise errors.BadImage(f"corrupt gzip header: longer than {MAX_GZIP_HEADER} bytes")
            if not self._more_input():
                self._truncated()
        self._consume(length)
        self._obj = self._inflater.new_raw()
        self._members += 1
        return True

    def _end_member(self) -> None:
        while len(self._input) < 8 and self._more_input():
            pass
        if len(self._input) < 8:
            self._truncated()
        self._check.expect(
            self._output, int.from_bytes(self._input[:4], "little"), int.from_bytes(self._input[4:8], "little")
        )
        self._consume(8)

    def read(self, max_length: int) -> bytes:
        while True:
            if self._obj is None and not self._start_member():
                if self._own_check:
                    self._check.finish()
                return b""
            obj, data, out = self._decompress(max_length)
            # What the inflater did not use: past the end of the deflate data, or held back by max_length. (At the
            # end, stdlib zlib can leave the same bytes in unconsumed_tail as well: only unused_data counts then.)
            self._input = obj.unused_data if obj.eof else obj.unconsumed_tail
            self._stream_offset += len(data) - len(self._input)
            self._output += len(out)
            if obj.eof:
                self._obj = None
                self._end_member()
            if out:
                if self._own_check:
                    self._check.update(out)
                return bytes(out)
            if self._obj is not None and not self._input and not self._more_input():
                self._truncated()


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


def _no_check() -> None:
    pass


def open_decoder(
    image_format: ImageFormat,
    next_chunk: ChunkSource,
    head: bytes,
    *,
    gzip_impl: str = "auto",
    gzip_check: GzipMemberCheck | None = None,
    source_size: int | None = None,
    check: Callable[[], None] = _no_check,
) -> Decoder:
    """A bounded streaming decoder for ``image_format``; ``head`` is input already read for detection.

    With ``gzip_check`` the caller takes over checking the CRC-32 of gzip members: it must feed that object every
    decoded byte in order and call its finish() after the last; without it the decoder checks them itself. A decoder
    that runs a program (`ChildDecoder`: igzip) must be closed; it calls ``check`` while it waits (raising from it
    abandons the decode) and aligns its input on ``source_size`` when that is known (see image/child_decoder.py).
    """
    if image_format is ImageFormat.GZIP:
        if gzip_inflater_name(gzip_impl) == "igzip":
            # igzip checks every member's trailer; the first header is checked here as the in-process decoder does.
            _gzip_header_length(head, zlib.crc32)
            program = igzip_path()
            assert program is not None
            framing = GzipFraming(source_size)
            return ChildDecoder([program, "-d", "-c"], "gzip", next_chunk, head, framing=framing, check=check)
        _, inflater = gzip_implementation(gzip_impl)
        return _GzipDecoder(next_chunk, head, inflater, gzip_check)
    if image_format is ImageFormat.XZ:
        return _MemberDecoder(
            next_chunk,
            head,
            lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ),
            XZ_MAGIC,
            "xz",
            null_padding_allowed=True,
        )
    if image_format is ImageFormat.BZIP2:
        return _MemberDecoder(next_chunk, head, bz2.BZ2Decompressor, BZIP2_MAGIC, "bzip2")
    if image_format is ImageFormat.ZSTD:
        return _ZstdDecoder(next_chunk, head)
    return _RawDecoder(next_chunk, head)
