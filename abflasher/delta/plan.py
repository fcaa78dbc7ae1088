"""The order in which a delta install builds the target, and which chunks it will have to fetch.

A chunk the target's old content holds at another offset can be copied from there only if nothing overwrote that
place first. The steps go from the image's start to its end, so the target is written in long runs and read ahead
of them. A copy from further on (data the release moved towards the start) is read at its own step, before anything
overwrote it. A copy from further back (data moved towards the end: a file system rebuilt with ``mkfs -d`` shifts
every block after a file that grew) would find its source overwritten by then, so it is read into memory just
before the step that overwrites the source's first byte (a *stash*). The stashed bytes waiting for their step stay
within `STASH_BUDGET` (a release moves data by the size of what changed before it, a few MiB); past it the chunk is
taken from a seed or the store instead. Nothing of the old content is read after it was overwritten.

The chunks starting in the first ``hold_bytes`` of the image (its superblock or partition table) are *held*: their
region is zeroed before anything else is written and they are written last; they never serve as sources.
"""

from __future__ import annotations

import bisect
import enum
import heapq
from array import array
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import overload

from abflasher.delta.index import Chunk, ChunkIndex

#: Memory for chunks of the old content read before their source is overwritten, waiting for their step.
STASH_BUDGET = 16 << 20


class Kind(enum.Enum):
    HELD = "held"  # starts in the held region: collected in memory, written last
    ZERO = "zero"  # all zeros, not known to be in place: zeroed where the target does not read as zeros already
    IN_PLACE = "in place"  # the target's old index has this chunk at this very offset (zeros included)
    OLD = "old"  # copied from another offset of the target's old content
    OTHER = "other"  # built earlier in this install, a seed, a stash, or the store


_KINDS = tuple(Kind)
_CODE = {kind: code for code, kind in enumerate(_KINDS)}


@dataclass(frozen=True, slots=True)
class Step:
    number: int  # the chunk's number in the new index
    kind: Kind
    source: int = -1  # OLD: where the target's old content holds the chunk
    stash: tuple[tuple[int, int], ...] = ()  # (chunk number, old offset) to read into memory before this step


class Steps(Sequence[Step]):
    """The plan's steps, kept as arrays (a few bytes a chunk) and made into Step objects as they are read."""

    def __init__(self, order: array[int], kinds: bytearray, sources: array[int],
                 stashes: dict[int, tuple[tuple[int, int], ...]]) -> None:
        self._order, self._kinds, self._sources, self._stashes = order, kinds, sources, stashes

    def __len__(self) -> int:
        return len(self._order)

    @overload
    def __getitem__(self, position: int) -> Step: ...
    @overload
    def __getitem__(self, position: slice) -> Sequence[Step]: ...
    def __getitem__(self, position: int | slice) -> Step | Sequence[Step]:
        if isinstance(position, slice):
            return [self[p] for p in range(*position.indices(len(self)))]
        if position < 0:
            position += len(self)
        number = self._order[position]
        return Step(number, _KINDS[self._kinds[number]], self._sources[number], self._stashes.get(position, ()))


class Chunks(Sequence[Chunk]):
    """Chunks of an index by number, kept as an array of numbers."""

    def __init__(self, index: ChunkIndex, numbers: array[int]) -> None:
        self._index, self._numbers = index, numbers

    def __len__(self) -> int:
        return len(self._numbers)

    @overload
    def __getitem__(self, position: int) -> Chunk: ...
    @overload
    def __getitem__(self, position: slice) -> Sequence[Chunk]: ...
    def __getitem__(self, position: int | slice) -> Chunk | Sequence[Chunk]:
        if isinstance(position, slice):
            return [self._index.chunk(n) for n in self._numbers[position]]
        return self._index.chunk(self._numbers[position])


@dataclass(frozen=True)
class Plan:
    chunks: ChunkIndex  # the index's chunks, by number
    hold_end: int
    steps: Steps
    fetch: Chunks  # expected from the store, in the order the steps need them
    stashed_bytes: int
    demoted: int  # copies given up beyond the stash budget
    #: For each chunk number, 1 when it is in ``fetch`` (the installer takes it from the fetcher at its step).
    fetched: bytearray
    #: For each chunk number, 1 when a stash holds it by its step.
    stashed: bytearray


def make_plan(
    index: ChunkIndex,
    *,
    target_index: ChunkIndex | None,
    seed_ids: Collection[bytes],
    hold_bytes: int,
    stash_budget: int = STASH_BUDGET,
) -> Plan:
    # Memory: arrays of a few bytes a chunk, no object per chunk (docs/delta-updates.md, "Memory").
    count = len(index)
    ends = index.ends
    starts = array("Q", [0])
    starts.extend(ends[:-1] if isinstance(ends, array) else array("Q", ends[:-1]))

    def size_of(number: int) -> int:
        return ends[number] - starts[number]

    hold_end = 0
    for number in range(count):
        if starts[number] >= hold_bytes:
            break
        hold_end = ends[number]
    # casync's chunker cuts a run of zeros into chunks of the maximum size (its rolling hash over zeros is constant),
    # so a chunk of zeros has that size, or is the image's last chunk.
    zero_ids = {size: index.digest(bytes(size)) for size in {index.chunk_size_max, size_of(count - 1)}}

    old = target_index if target_index is not None and target_index.digest_name == index.digest_name else None

    def old_in_place(number: int) -> bool:
        """Whether the target's old index has chunk ``number`` at its very offset."""
        if old is None:
            return False
        offset = starts[number]
        if offset == 0:
            candidate = 0
        else:
            before = bisect.bisect_left(old.ends, offset)
            if before >= len(old.ends) or old.ends[before] != offset:
                return False
            candidate = before + 1
        return (
            candidate < len(old.ends) and old.ends[candidate] == ends[number]
            and old.id_of(candidate) == index.id_of(number)
        )

    def old_source(chunk_id: bytes) -> int:
        """Where the old content holds ``chunk_id`` outside the held region, or -1."""
        if old is not None:
            for candidate in old.numbers_of(chunk_id):
                if old.start(candidate) >= hold_end:
                    return old.start(candidate)
        return -1

    kinds = bytearray(count)
    sources = array("q", [-1]) * count
    copies = array("i")
    for number in range(count):
        chunk_id = index.id_of(number)
        if starts[number] < hold_end:
            kind = Kind.HELD
        elif old_in_place(number):
            kind = Kind.IN_PLACE
        elif zero_ids.get(size_of(number)) == chunk_id:
            kind = Kind.ZERO
        elif (source := old_source(chunk_id)) >= 0:
            kind = Kind.OLD
            sources[number] = source
            copies.append(number)
        else:
            kind = Kind.OTHER
        kinds[number] = _CODE[kind]

    # The steps go from the image's start to its end (held chunks first), so the target is written in long runs. A
    # copy whose source starts below its own offset (data the release moved towards the end) would find its source
    # overwritten by then: it is read into memory (stashed) just before the step whose chunk holds the source's
    # first byte, as long as the stashed bytes waiting for their step stay within the budget; past it the chunk is
    # taken from a seed or the store instead. A copy from further on is read at its own step, before anything
    # overwrote it.
    held_code, old_code, other_code = _CODE[Kind.HELD], _CODE[Kind.OLD], _CODE[Kind.OTHER]
    # Held chunks are the first ones, so the steps are simply the chunks in order: a step's position is its number.
    order = array("i", range(count))
    moved_back = sorted(
        (bisect.bisect_right(starts, sources[n]) - 1, n) for n in copies if sources[n] < starts[n]
    )
    stashes: dict[int, tuple[tuple[int, int], ...]] = {}
    waiting: list[tuple[int, int]] = []  # (the step that uses it, its size): stashed bytes not used yet
    stashed = demoted = waiting_bytes = 0
    for position, number in moved_back:
        while waiting and waiting[0][0] < position:
            waiting_bytes -= heapq.heappop(waiting)[1]
        size = size_of(number)
        if waiting_bytes + size > stash_budget:
            kinds[number] = other_code
            sources[number] = -1
            demoted += 1
            continue
        heapq.heappush(waiting, (number, size))
        waiting_bytes += size
        stashed += size
        stashes[position] = (*stashes.get(position, ()), (number, sources[number]))
        kinds[number] = other_code
        sources[number] = -1
    del moved_back, waiting

    # What no local copy will provide: the first need of each such chunk, in step order. A chunk is available when
    # a chunk of the same id was built at an earlier step or stashed at or before this one.
    position_of = array("i", [0]) * count
    for position, number in enumerate(order):
        position_of[number] = position
    stashed_at = array("i", [-1]) * count
    for position, stash in stashes.items():
        for victim, _ in stash:
            stashed_at[victim] = position

    def available(chunk_id: bytes, position: int) -> bool:
        return any(
            position_of[other] < position or 0 <= stashed_at[other] <= position
            for other in index.numbers_of(chunk_id)
        )

    local_codes = {_CODE[Kind.ZERO], _CODE[Kind.IN_PLACE], old_code}
    fetch = array("i")
    fetched = bytearray(count)
    for position, number in enumerate(order):
        code = kinds[number]
        local = code in local_codes or (code == held_code and old_in_place(number))
        if local:
            continue
        chunk_id = index.id_of(number)
        if chunk_id not in seed_ids and not available(chunk_id, position):
            fetch.append(number)
            fetched[number] = 1
    stashed_flags = bytearray(count)
    for stash in stashes.values():
        for victim, _ in stash:
            stashed_flags[victim] = 1
    return Plan(index, hold_end, Steps(order, kinds, sources, stashes), Chunks(index, fetch), stashed, demoted,
                fetched, stashed_flags)
