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

import bisect
import functools
import hashlib
import struct
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from abflasher import errors

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
_UINT64_MAX = 0xFFFFFFFFFFFFFFFF
#: Larger chunks would make the installer's memory depend on what the publisher chose: refused.
MAX_CHUNK_SIZE = 16 << 20
#: An index of more chunks than this describes more than any slot holds (1 TiB at the smallest useful chunks).
MAX_CHUNKS = 1 << 26
#: The id lookup table packs a chunk number (below MAX_CHUNKS) under the first bits of its id, in one 64-bit word.
_NUMBER_BITS = 26


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


@dataclass(frozen=True)
class ChunkIndex:
    """A parsed ``.caibx``: the chunking parameters, the digest, and the table of chunk end offsets and ids."""

    feature_flags: int
    chunk_size_min: int
    chunk_size_avg: int
    chunk_size_max: int
    #: Chunk end offsets; stored as an array('Q') (8 bytes a chunk: memory stays flat whatever the image size).
    ends: Sequence[int]
    ids: bytes  # ID_SIZE bytes per chunk, back to back

    def __post_init__(self) -> None:
        if not isinstance(self.ends, array):
            object.__setattr__(self, "ends", array("Q", self.ends))

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
        return self.ends[-1] if self.ends else 0

    def __len__(self) -> int:
        return len(self.ends)

    def chunk(self, number: int) -> Chunk:
        start = self.ends[number - 1] if number else 0
        return Chunk(start, self.ends[number] - start, self.ids[number * ID_SIZE : (number + 1) * ID_SIZE])

    def __getitem__(self, number: int) -> Chunk:
        return self.chunk(number)

    def __iter__(self) -> Iterator[Chunk]:
        for number in range(len(self.ends)):
            yield self.chunk(number)

    def start(self, number: int) -> int:
        return self.ends[number - 1] if number else 0

    def id_of(self, number: int) -> bytes:
        return self.ids[number * ID_SIZE : (number + 1) * ID_SIZE]

    @functools.cached_property
    def _by_id(self) -> array[int]:
        """Every chunk number under the first bits of its id, sorted: an id lookup in 8 bytes a chunk (a dict keyed
        by id takes ~150)."""
        ids = self.ids
        # Sorted a 256th at a time (by the id's first byte): no list of every chunk, even for a moment.
        buckets = [array("Q") for _ in range(256)]
        for n in range(len(self.ends)):
            buckets[ids[n * ID_SIZE]].append(
                (int.from_bytes(ids[n * ID_SIZE : n * ID_SIZE + 8], "big") >> _NUMBER_BITS) << _NUMBER_BITS | n
            )
        table = array("Q")
        for number, bucket in enumerate(buckets):
            table.extend(sorted(bucket))
            buckets[number] = array("Q")
        return table

    def numbers_of(self, chunk_id: bytes) -> Iterator[int]:
        """The numbers of the chunks whose id is ``chunk_id``, lowest first."""
        table = self._by_id
        prefix = int.from_bytes(chunk_id[:8], "big") >> _NUMBER_BITS
        position = bisect.bisect_left(table, prefix << _NUMBER_BITS)
        mask = (1 << _NUMBER_BITS) - 1
        while position < len(table) and table[position] >> _NUMBER_BITS == prefix:
            number = table[position] & mask
            if self.ids[number * ID_SIZE : (number + 1) * ID_SIZE] == chunk_id:
                yield number
            position += 1

    def __contains__(self, chunk_id: object) -> bool:
        return isinstance(chunk_id, bytes) and next(self.numbers_of(chunk_id), None) is not None

    def digest(self, data: bytes | memoryview) -> bytes:
        return hashlib.new(self.digest_name, data).digest()

    def to_bytes(self) -> bytes:
        header = _HEADER.pack(
            48, CA_FORMAT_INDEX, self.feature_flags, self.chunk_size_min, self.chunk_size_avg, self.chunk_size_max
        )
        items = bytearray(_ITEM.size * len(self.ends))  # packed in place: no object per chunk
        for n, end in enumerate(self.ends):
            _ITEM.pack_into(items, n * _ITEM.size, end, self.ids[n * ID_SIZE : (n + 1) * ID_SIZE])
        table_size = _TABLE_HEADER.size + len(items) + _TAIL.size
        tail = _TAIL.pack(0, 0, 48, table_size, CA_FORMAT_TABLE_TAIL_MARKER)
        return header + _TABLE_HEADER.pack(_UINT64_MAX, CA_FORMAT_TABLE) + bytes(items) + tail


def parse_index(data: bytes, where: str = "the index") -> ChunkIndex:
    """The ``.caibx`` in ``data``; BadImage saying what is wrong with it otherwise."""
    def bad(why: str) -> errors.BadImage:
        return errors.BadImage(f"{where} is not a usable casync blob index (.caibx): {why}")

    fixed = _HEADER.size + _TABLE_HEADER.size + _TAIL.size
    if len(data) < fixed:
        raise bad(f"{len(data)} bytes is too short")
    size, kind, flags, low, avg, high = _HEADER.unpack_from(data, 0)
    if size != _HEADER.size or kind != CA_FORMAT_INDEX:
        raise bad("it does not start with an INDEX object (is it a .caidx of a directory tree, or not casync's?)")
    if not 1 <= low <= avg <= high <= MAX_CHUNK_SIZE:
        raise bad(f"chunk sizes {low}:{avg}:{high} are not min <= avg <= max <= {MAX_CHUNK_SIZE}")
    table_size, table_kind = _TABLE_HEADER.unpack_from(data, _HEADER.size)
    if table_size != _UINT64_MAX or table_kind != CA_FORMAT_TABLE:
        raise bad("the INDEX object is not followed by a TABLE object")
    items = len(data) - fixed
    if items % _ITEM.size:
        raise bad("its table is not a whole number of items")
    count = items // _ITEM.size
    if count > MAX_CHUNKS:
        raise bad(f"{count} chunks is more than any slot holds")
    zero1, zero2, index_offset, tail_size, marker = _TAIL.unpack_from(data, len(data) - _TAIL.size)
    if marker != CA_FORMAT_TABLE_TAIL_MARKER or zero1 or zero2:
        raise bad("its table has no valid tail (truncated?)")
    if index_offset != _HEADER.size or tail_size != len(data) - _HEADER.size:
        raise bad("its table's tail does not match the table")
    ends: array[int] = array("Q")
    ids = bytearray()
    previous = 0
    for end, chunk_id in _ITEM.iter_unpack(data[_HEADER.size + _TABLE_HEADER.size : len(data) - _TAIL.size]):
        chunk_size = end - previous
        # The chunker never makes a chunk above max; only the last one may be below min.
        if chunk_size <= 0 or chunk_size > high:
            raise bad(f"chunk {len(ends)} at byte {previous} has size {chunk_size} (max {high})")
        ends.append(end)
        ids += chunk_id
        previous = end
    if not ends:
        raise bad("it lists no chunks (an empty image)")
    return ChunkIndex(flags, low, avg, high, ends, bytes(ids))
