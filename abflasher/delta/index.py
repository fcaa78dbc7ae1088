"""casync blob indexes (``.caibx``): parsed, checked and written back, as casync 2 and desync read and write them.

The format (casync's src/caformat.h), all integers little-endian 64-bit:

- an INDEX object: size (48), type ``CA_FORMAT_INDEX``, feature flags, chunk size min, avg and max;
- a TABLE object: size (``UINT64_MAX``, it is written incrementally), type ``CA_FORMAT_TABLE``, then one item per chunk:
  the chunk's *end* offset in the blob and its 32-byte id, the digest of the chunk's uncompressed bytes;
- the table's tail: two zero words, the offset of the INDEX object from the start of the TABLE object (48), the
  TABLE object's size (16 + 40 per item + 40), and ``CA_FORMAT_TABLE_TAIL_MARKER``.

The digest is SHA-512/256 when the feature flag ``CA_FORMAT_SHA512_256`` is set (casync's default), SHA-256
otherwise (``casync make --digest=sha256``).
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import threading
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO

from abflasher import errors
from abflasher.delta.words import PageCache, WordFile, sort_words

CA_FORMAT_INDEX = 0x96824D9C7B129FF9
CA_FORMAT_TABLE = 0xE75B9E112F17417D
CA_FORMAT_TABLE_TAIL_MARKER = 0x4B4F050E5549ECD1
CA_FORMAT_SHA512_256 = 0x2000000000000000
ID_SIZE = 32
#: A chunk with id ID (hex) is the file STORE/ID[:4]/ID.cacnk of a chunk store (.castr).
CHUNK_SUFFIX = ".cacnk"
_HEADER = struct.Struct("<QQQQQQ")
_TABLE_HEADER = struct.Struct("<QQ")
_ITEM = struct.Struct("<Q32s")
_TAIL = struct.Struct("<QQQQQ")
_ITEMS_AT = _HEADER.size + _TABLE_HEADER.size
_UINT64_MAX = 0xFFFFFFFFFFFFFFFF
#: Larger chunks would make the installer's memory depend on what the publisher chose: refused.
MAX_CHUNK_SIZE = 16 << 20
#: An index of more chunks than this describes more than any slot holds (1 TiB at the smallest useful chunks).
MAX_CHUNKS = 1 << 26
#: The id lookup table packs a chunk number (below MAX_CHUNKS) under the first bits of its id, in one 64-bit word.
_NUMBER_BITS = 26
_NUMBER_MASK = (1 << _NUMBER_BITS) - 1
#: Chunks per page of the table: what one read of an index file brings in (10 KiB), and one fence in memory.
PAGE_CHUNKS = 256
_PAGE_SHIFT = 8
_PAGE_MASK = PAGE_CHUNKS - 1
_PAGE_BYTES = PAGE_CHUNKS * _ITEM.size
#: Pages cached per index: enough for the few threads that walk it in order (a lookup reads what it needs alone).
CACHED_PAGES = 8
#: Pages read at a time when an index is checked or copied whole.
_PIECE_PAGES = 16


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk of the blob: where it is, how long, and its id (the digest of its uncompressed bytes)."""

    offset: int
    size: int
    id: bytes

    @property
    def end(self) -> int:
        return self.offset + self.size

    @property
    def hex(self) -> str:
        return self.id.hex()


def _words(data: bytes) -> array[int]:
    words = array("Q", data)
    if sys.byteorder != "little":
        words.byteswap()
    return words


class ChunkIndex:
    """A parsed ``.caibx``: the chunking parameters, the digest, and the table of chunk end offsets and ids.

    The table stays where it is (the index's file, or for a small index built in memory, its bytes) and is read a
    page of `PAGE_CHUNKS` chunks at a time, a few pages cached: an index takes the same memory whatever the image's
    size (docs/delta-updates.md, "Memory"). Looking chunks up by id (`numbers_of`) sorts a table of the ids' first
    bits and the chunk numbers into a temporary file in `scratch_dir` (None: the system's), made on first use.
    """

    def __init__(self, feature_flags: int, chunk_size_min: int, chunk_size_avg: int, chunk_size_max: int,  # noqa: PLR0917
                 ends: Sequence[int], ids: bytes) -> None:
        """An index of the chunks ending at ``ends`` with ``ids`` (`ID_SIZE` bytes each, back to back)."""
        items = bytearray(_ITEM.size * len(ends))  # packed in place: no object per chunk
        for n, end in enumerate(ends):
            _ITEM.pack_into(items, n * _ITEM.size, end, ids[n * ID_SIZE : (n + 1) * ID_SIZE])
        fences = array("Q", ends[::PAGE_CHUNKS])
        self._setup((feature_flags, chunk_size_min, chunk_size_avg, chunk_size_max), len(ends), fences,
                    bytes(items), None)

    def _setup(self, params: tuple[int, int, int, int], count: int, fences: array[int], items: bytes | None,
               handle: IO[bytes] | None) -> None:
        self.feature_flags, self.chunk_size_min, self.chunk_size_avg, self.chunk_size_max = params
        self._count = count
        self._fences = fences  # the end of the first chunk of each page
        self._items = items
        self._handle = handle
        self._fd = handle.fileno() if handle is not None else -1
        self._pages = PageCache(self._read_page, CACHED_PAGES)
        self._cached = self._pages.pages  # read directly on the hot paths: a method call each costs as much
        self._table: WordFile | None = None
        self._table_lock = threading.Lock()
        #: Where the id lookup table's temporary file goes (None: the system's temporary directory).
        self.scratch_dir: str | None = None

    @classmethod
    def _made(cls, params: tuple[int, int, int, int], count: int, fences: array[int], items: bytes | None,
              handle: IO[bytes] | None) -> ChunkIndex:
        index = cls.__new__(cls)
        index._setup(params, count, fences, items, handle)
        return index

    def close(self) -> None:
        """Close the index's file and drop its lookup table (an index in memory stays usable)."""
        if self._handle is not None:
            self._handle.close()
        if self._table is not None:
            self._table.close()
            self._table = None

    def __enter__(self) -> ChunkIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def digest_name(self) -> str:
        """The hashlib name of the chunk digest."""
        return "sha512_256" if self.feature_flags & CA_FORMAT_SHA512_256 else "sha256"

    @property
    def digest_label(self) -> str:
        """The digest as casync names it (``--digest=``)."""
        return "sha512-256" if self.feature_flags & CA_FORMAT_SHA512_256 else "sha256"

    @property
    def size(self) -> int:
        """The size of the blob (the image) the index describes."""
        return self.end(self._count - 1) if self._count else 0

    def __len__(self) -> int:
        return self._count

    def _read(self, offset: int, size: int) -> bytes:
        """Bytes of the table's items (``offset`` counts from the first item)."""
        size = min(size, self._count * _ITEM.size - offset)
        if self._items is not None:
            return self._items[offset : offset + size]
        data = os.pread(self._fd, size, _ITEMS_AT + offset)
        if len(data) != size:
            raise errors.DeviceError("an index file was cut short while in use")
        return data

    def _read_page(self, number: int) -> tuple[array[int], bytes]:
        """Page ``number``: its chunks' ends, and its raw items."""
        raw = self._read(number * _PAGE_BYTES, _PAGE_BYTES)
        return (_words(raw)[:: _ITEM.size // 8], raw)

    def end(self, number: int) -> int:
        """Where chunk ``number`` ends (read on its own unless its page is cached: a lookup lands anywhere)."""
        if not 0 <= number < self._count:
            raise IndexError(number)
        page = self._cached.get(number >> _PAGE_SHIFT)
        if page is not None:
            return page[0][number & _PAGE_MASK]
        return int.from_bytes(self._read(number * _ITEM.size, 8), "little")

    def start(self, number: int) -> int:
        return self.end(number - 1) if number else 0

    def id_of(self, number: int) -> bytes:
        """Chunk ``number``'s id (read on its own unless its page is cached: a lookup lands anywhere)."""
        if not 0 <= number < self._count:
            raise IndexError(number)
        return self._id_to_check(number)

    def chunk(self, number: int) -> Chunk:
        if not 0 <= number < self._count:
            raise IndexError(number)
        ends, raw = self._cached.get(number >> _PAGE_SHIFT) or self._pages.get(number >> _PAGE_SHIFT)
        within = number & _PAGE_MASK
        at = within * _ITEM.size + 8
        start = ends[within - 1] if within else self.start(number)
        return Chunk(start, ends[within] - start, raw[at : at + ID_SIZE])

    def __getitem__(self, number: int) -> Chunk:
        return self.chunk(number)

    def __iter__(self) -> Iterator[Chunk]:
        return self.chunks_from(0)

    def chunks_from(self, first: int) -> Iterator[Chunk]:
        """The chunks from number ``first`` on, in order, read a page at a time past the cache (a pass over the
        whole index leaves the pages that lookups use where they are)."""
        start = self.start(first) if 0 < first < self._count else 0
        for page_number in range(first >> _PAGE_SHIFT, (self._count + _PAGE_MASK) >> _PAGE_SHIFT):
            ends, raw = self._cached.get(page_number) or self._read_page(page_number)
            for within in range(first - (page_number << _PAGE_SHIFT) if first > page_number << _PAGE_SHIFT else 0,
                                len(ends)):
                at = within * _ITEM.size + 8
                end = ends[within]
                yield Chunk(start, end - start, raw[at : at + ID_SIZE])
                start = end

    def number_at(self, offset: int) -> int:
        """The number of the chunk holding byte ``offset`` (the number of chunks for an offset past the end)."""
        page = bisect_right(self._fences, offset)
        if page == 0:
            return 0
        return (page - 1) * PAGE_CHUNKS + bisect_right(self._pages.get(page - 1)[0], offset)

    def _ids_table(self) -> WordFile:
        """Every chunk number under the first bits of its id, sorted, in a temporary file."""
        with self._table_lock:
            if self._table is None:
                self._table = sort_words(self._table_words(), self.scratch_dir)
            return self._table

    def _table_words(self) -> Iterator[list[int]]:
        """The table's words, a page at a time."""
        for page_number in range((self._count + PAGE_CHUNKS - 1) // PAGE_CHUNKS):
            raw = self._read(page_number * _PAGE_BYTES, _PAGE_BYTES)
            firsts = _words(raw)[1 :: _ITEM.size // 8]
            if sys.byteorder == "little":
                firsts.byteswap()  # the id's first 8 bytes, read big-endian: the words sort as the ids do
            base = page_number * PAGE_CHUNKS
            yield [(first >> _NUMBER_BITS) << _NUMBER_BITS | (base + within) for within, first in enumerate(firsts)]

    def _id_to_check(self, number: int) -> bytes:
        """Chunk ``number``'s id, read on its own unless its page is cached (a lookup lands anywhere)."""
        page = self._cached.get(number >> _PAGE_SHIFT)
        if page is not None:
            at = (number & _PAGE_MASK) * _ITEM.size + 8
            return page[1][at : at + ID_SIZE]
        return self._read(number * _ITEM.size + 8, ID_SIZE)

    def numbers_of(self, chunk_id: bytes) -> Iterator[int]:
        """The numbers of the chunks whose id is ``chunk_id``, lowest first."""
        return iter(self.numbers_list(chunk_id))

    def numbers_list(self, chunk_id: bytes) -> list[int]:
        """`numbers_of` as a list."""
        table = self._table or self._ids_table()
        return [number for word in table.under(int.from_bytes(chunk_id[:8], "big") >> _NUMBER_BITS, _NUMBER_BITS)
                if self._id_to_check(number := word & _NUMBER_MASK) == chunk_id]

    def __contains__(self, chunk_id: object) -> bool:
        return isinstance(chunk_id, bytes) and bool(self.numbers_list(chunk_id))

    def digest(self, data: bytes | memoryview) -> bytes:
        return hashlib.new(self.digest_name, data).digest()

    def holds(self, chunk: Chunk, data: bytes | memoryview) -> bool:
        """Whether ``data`` is ``chunk``: its size, and its digest is the chunk's id."""
        return len(data) == chunk.size and self.digest(data) == chunk.id

    def _params(self) -> tuple[int, int, int, int]:
        return (self.feature_flags, self.chunk_size_min, self.chunk_size_avg, self.chunk_size_max)

    def _pieces(self) -> Iterator[bytes]:
        """The table's items, a few pages at a time."""
        piece = _PIECE_PAGES * _PAGE_BYTES
        for offset in range(0, self._count * _ITEM.size, piece):
            yield self._read(offset, piece)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ChunkIndex):
            return NotImplemented
        return (self._params(), len(self)) == (other._params(), len(other)) and all(
            mine == theirs for mine, theirs in zip(self._pieces(), other._pieces(), strict=True)
        )

    __hash__ = None  # type: ignore[assignment]

    def write_to(self, handle: IO[bytes]) -> None:
        """Write the ``.caibx`` to ``handle``, a few pages at a time."""
        handle.write(_HEADER.pack(48, CA_FORMAT_INDEX, *self._params()))
        handle.write(_TABLE_HEADER.pack(_UINT64_MAX, CA_FORMAT_TABLE))
        for piece in self._pieces():
            handle.write(piece)
        table_size = _TABLE_HEADER.size + self._count * _ITEM.size + _TAIL.size
        handle.write(_TAIL.pack(0, 0, 48, table_size, CA_FORMAT_TABLE_TAIL_MARKER))

    def to_bytes(self) -> bytes:
        import io

        out = io.BytesIO()
        self.write_to(out)
        return out.getvalue()


def _check(read: Callable[[int, int], bytes], length: int, where: str
           ) -> tuple[tuple[int, int, int, int], int, array[int]]:
    """Check the ``.caibx`` of ``length`` bytes that ``read(offset, size)`` reads, a few pages at a time; returns its
    chunking parameters, its number of chunks and its fences (the end of the first chunk of each page)."""
    def bad(why: str) -> errors.BadImage:
        return errors.BadImage(f"{where} is not a usable casync blob index (.caibx): {why}")

    fixed = _HEADER.size + _TABLE_HEADER.size + _TAIL.size
    if length < fixed:
        raise bad(f"{length} bytes is too short")
    size, kind, flags, low, avg, high = _HEADER.unpack(read(0, _HEADER.size))
    if size != _HEADER.size or kind != CA_FORMAT_INDEX:
        raise bad("it does not start with an INDEX object (is it a .caidx of a directory tree, or not casync's?)")
    if not 1 <= low <= avg <= high <= MAX_CHUNK_SIZE:
        raise bad(f"chunk sizes {low}:{avg}:{high} are not min <= avg <= max <= {MAX_CHUNK_SIZE}")
    table_size, table_kind = _TABLE_HEADER.unpack(read(_HEADER.size, _TABLE_HEADER.size))
    if table_size != _UINT64_MAX or table_kind != CA_FORMAT_TABLE:
        raise bad("the INDEX object is not followed by a TABLE object")
    items = length - fixed
    if items % _ITEM.size:
        raise bad("its table is not a whole number of items")
    count = items // _ITEM.size
    if count > MAX_CHUNKS:
        raise bad(f"{count} chunks is more than any slot holds")
    zero1, zero2, index_offset, tail_size, marker = _TAIL.unpack(read(length - _TAIL.size, _TAIL.size))
    if marker != CA_FORMAT_TABLE_TAIL_MARKER or zero1 or zero2:
        raise bad("its table has no valid tail (truncated?)")
    if index_offset != _HEADER.size or tail_size != length - _HEADER.size:
        raise bad("its table's tail does not match the table")
    if not count:
        raise bad("it lists no chunks (an empty image)")
    fences = array("Q")
    previous = number = 0
    piece = _PIECE_PAGES * _PAGE_BYTES
    for offset in range(0, items, piece):
        data = read(_ITEMS_AT + offset, min(piece, items - offset))
        if len(data) != min(piece, items - offset):
            raise bad("it was cut short while being read")
        ends = _words(data)[:: _ITEM.size // 8]
        fences.extend(ends[::PAGE_CHUNKS])
        for end in ends:
            chunk_size = end - previous
            # The chunker never makes a chunk above max; only the last one may be below min.
            if chunk_size <= 0 or chunk_size > high:
                raise bad(f"chunk {number} at byte {previous} has size {chunk_size} (max {high})")
            previous = end
            number += 1
    return (flags, low, avg, high), count, fences


def parse_index(data: bytes, where: str = "the index") -> ChunkIndex:
    """The ``.caibx`` in ``data``; BadImage saying what is wrong with it otherwise."""
    params, count, fences = _check(lambda offset, size: data[offset : offset + size], len(data), where)
    return ChunkIndex._made(params, count, fences, bytes(data[_ITEMS_AT : len(data) - _TAIL.size]), None)


def open_index(handle: IO[bytes], where: str = "the index") -> ChunkIndex:
    """The ``.caibx`` in the open file ``handle``, read from it as it is used (the index owns and closes it);
    BadImage saying what is wrong with it otherwise (``handle`` is closed then)."""
    try:
        fd = handle.fileno()
        params, count, fences = _check(lambda offset, size: os.pread(fd, size, offset), os.fstat(fd).st_size, where)
    except BaseException:
        handle.close()
        raise
    return ChunkIndex._made(params, count, fences, None, handle)


def read_index(path: str | os.PathLike[str], where: str | None = None) -> ChunkIndex:
    """The ``.caibx`` file at ``path``, read as it is used (see `open_index`); OSError when it cannot be opened."""
    return open_index(open(path, "rb", buffering=0), str(path) if where is None else where)
