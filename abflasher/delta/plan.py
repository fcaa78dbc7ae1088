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

import enum
import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

from abflasher.delta.index import Chunk, ChunkIndex
from abflasher.delta.words import WordFile, WordWriter, sort_words

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
#: A chunk's byte in the plan: its kind's code in the low bits, and these flags.
_KIND_MASK = 0x07
_FETCHED = 0x08  # expected from the store (the installer takes it from the fetcher at its step)
_STASHED = 0x10  # a stash holds it by its step
_SEEDED = 0x20  # a seed holds it: its source word is the seed's number above the offset there
_DEMOTED = 0x40  # a copy given up beyond the stash budget: which seed holds it is not known
_SEED_SHIFT = 56
#: `Step.seed` of a chunk no seed holds, and of one whose seeds were not looked up.
NO_SEED = -1
SEED_UNKNOWN = -2
#: A stash is kept on disk as one word: the step that reads it, above the stashed chunk's number.
_NUMBER_BITS = 26
_NUMBER_MASK = (1 << _NUMBER_BITS) - 1


@dataclass(frozen=True, slots=True)
class Step:
    number: int  # the chunk's number in the new index
    kind: Kind
    source: int = -1  # OLD: where the target's old content holds the chunk; with ``seed``: where that seed does
    seed: int = NO_SEED  # OTHER and HELD: the number of the first seed that holds the chunk, or NO_SEED, SEED_UNKNOWN
    stash: tuple[tuple[int, int], ...] = ()  # (chunk number, old offset) to read into memory before this step


class Steps(Sequence[Step]):
    """The plan's steps (the chunks in order: a step's position is its chunk's number), made into Step objects as
    they are read from the plan's byte per chunk and its files of sources and stashes."""

    def __init__(self, flags: bytearray, sources: WordFile, stashes: WordFile) -> None:
        self._flags, self._sources, self._stashes = flags, sources, stashes

    def __len__(self) -> int:
        return len(self._flags)

    def _step(self, number: int, stash: tuple[tuple[int, int], ...]) -> Step:
        flags = self._flags[number]
        kind = _KINDS[flags & _KIND_MASK]
        if kind is Kind.OLD:
            return Step(number, kind, self._sources[number], stash=stash)
        if flags & _SEEDED:
            word = self._sources[number]
            return Step(number, kind, word & ((1 << _SEED_SHIFT) - 1), word >> _SEED_SHIFT, stash)
        return Step(number, kind, seed=SEED_UNKNOWN if flags & _DEMOTED else NO_SEED, stash=stash)

    def _stash(self, words: Iterator[int] | Sequence[int]) -> tuple[tuple[int, int], ...]:
        flags, sources = self._flags, self._sources
        return tuple((n, sources[n]) for word in words if flags[n := word & _NUMBER_MASK] & _STASHED)

    @overload
    def __getitem__(self, position: int) -> Step: ...
    @overload
    def __getitem__(self, position: slice) -> Sequence[Step]: ...
    def __getitem__(self, position: int | slice) -> Step | Sequence[Step]:
        if isinstance(position, slice):
            return [self[p] for p in range(*position.indices(len(self)))]
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(position)
        return self._step(position, self._stash(self._stashes.under(position, _NUMBER_BITS)))

    def __iter__(self) -> Iterator[Step]:
        return self.starting_at(0)

    def starting_at(self, first: int) -> Iterator[Step]:
        """The steps from position ``first`` on, reading the stashes in one pass."""
        stashes = self._stashes
        next_stash = 0
        while next_stash < len(stashes) and stashes[next_stash] >> _NUMBER_BITS < first:
            next_stash += 1
        for position in range(first, len(self)):
            words = []
            while next_stash < len(stashes) and stashes[next_stash] >> _NUMBER_BITS == position:
                words.append(stashes[next_stash])
                next_stash += 1
            yield self._step(position, self._stash(words) if words else ())


class FetchList(Sequence[Chunk]):
    """The chunks the plan fetches, in step order, found in its byte per chunk as they are read (in order: a read
    before the last one starts over)."""

    def __init__(self, index: ChunkIndex, flags: bytearray, count: int) -> None:
        self._index, self._flags, self._count = index, flags, count
        self._position = -1  # the last one read, and its chunk's number
        self._number = -1

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, position: int) -> Chunk: ...
    @overload
    def __getitem__(self, position: slice) -> Sequence[Chunk]: ...
    def __getitem__(self, position: int | slice) -> Chunk | Sequence[Chunk]:
        if isinstance(position, slice):
            return [self[p] for p in range(*position.indices(len(self)))]
        if position < 0:
            position += len(self)
        if not 0 <= position < self._count:
            raise IndexError(position)
        if position < self._position:
            self._position = self._number = -1
        flags = self._flags
        while self._position < position:
            self._number += 1
            while not flags[self._number] & _FETCHED:
                self._number += 1
            self._position += 1
        return self._index.chunk(self._number)


class _Finder:
    """Finds chunks of an index by id, from chunk ``first`` on: first the chunk after the last one found (data that
    moved together stays together, so most chunks are found without a lookup), then through `ChunkIndex.numbers_of`.
    Any chunk of the id will do: what is read from it is checked against the id before it is used."""

    def __init__(self, index: ChunkIndex, first: int = 0) -> None:
        self.index, self.first, self.last = index, first, -2

    def find(self, chunk_id: bytes) -> Chunk | None:
        """A chunk with ``chunk_id``, or None."""
        following = self.last + 1
        if self.first <= following < len(self.index):
            chunk = self.index.chunk(following)
            if chunk.id == chunk_id:
                self.last = following
                return chunk
        number = next((n for n in self.index.numbers_list(chunk_id) if n >= self.first), -1)
        if number < 0:
            return None
        self.last = number
        return self.index.chunk(number)


@dataclass(frozen=True)
class Plan:
    chunks: ChunkIndex  # the index's chunks, by number
    hold_end: int
    held: int  # how many chunks are held (the first ones)
    steps: Steps
    fetch: FetchList  # expected from the store, in the order the steps need them
    stashed_bytes: int
    demoted: int  # copies given up beyond the stash budget
    #: A byte per chunk: its kind's code and the _FETCHED and _STASHED flags.
    flags: bytearray
    _files: tuple[WordFile, ...]

    def fetches(self, number: int) -> bool:
        """Whether chunk ``number`` comes from the fetcher."""
        return bool(self.flags[number] & _FETCHED)

    def stashed(self, number: int) -> bool:
        """Whether a stash holds chunk ``number`` by its step."""
        return bool(self.flags[number] & _STASHED)

    def close(self) -> None:
        """Remove the plan's temporary files."""
        for file in self._files:
            file.close()


def make_plan(
    index: ChunkIndex,
    *,
    target_index: ChunkIndex | None,
    seeds: Sequence[ChunkIndex] = (),
    hold_bytes: int,
    stash_budget: int = STASH_BUDGET,
    scratch_dir: str | None = None,
) -> Plan:
    """The plan of an install of ``index`` (see the module docstring); its temporary files go to ``scratch_dir``
    (None: the system's) and `Plan.close` removes them."""
    # Memory: a byte per chunk; the sources and stashes are in temporary files (docs/delta-updates.md, "Memory").
    count = len(index)
    held = 0
    hold_end = 0
    while held < count and index.start(held) < hold_bytes:
        hold_end = index.end(held)
        held += 1
    # casync's chunker cuts a run of zeros into chunks of the maximum size (its rolling hash over zeros is constant),
    # so a chunk of zeros has that size, or is the image's last chunk.
    last_size = index.chunk(count - 1).size
    zero_ids = {size: index.digest(bytes(size)) for size in {index.chunk_size_max, last_size}}

    old = target_index if target_index is not None and target_index.digest_name == index.digest_name else None

    def old_in_place(chunk: Chunk) -> bool:
        """Whether the target's old index has ``chunk`` at its very offset."""
        if old is None:
            return False
        candidate = old.number_at(chunk.offset)
        return (
            candidate < len(old) and old.start(candidate) == chunk.offset and old.end(candidate) == chunk.end
            and old.id_of(candidate) == chunk.id
        )

    # The old content outside the held region: its chunks from the first one starting at or past its end.
    old_first = 0
    if old is not None:
        old_first = old.number_at(hold_end)
        if old_first < len(old) and old.start(old_first) < hold_end:
            old_first += 1
    old_finder = _Finder(old, old_first) if old is not None else None
    seed_finders = [_Finder(seed) for seed in seeds]
    last_seed: list[_Finder] = []  # the finder that found the last chunk a seed holds, tried first

    def old_source(chunk_id: bytes) -> int:
        """Where the old content holds ``chunk_id`` outside the held region, or -1."""
        found = old_finder.find(chunk_id) if old_finder is not None else None
        return found.offset if found is not None else -1

    def seed_source(chunk_id: bytes) -> int:
        """The number of a seed that holds ``chunk_id`` above the offset there, or -1."""
        for finder in (*last_seed, *seed_finders):
            if (found := finder.find(chunk_id)) is not None:
                last_seed[:] = [finder]
                return seed_finders.index(finder) << _SEED_SHIFT | found.offset
        return -1

    flags = bytearray(count)
    files: list[WordFile] = []
    codes = {kind: _CODE[kind] for kind in Kind}
    try:
        sources_out = WordWriter(scratch_dir)
        try:
            # The old index is walked alongside the new one: the old chunk at a new chunk's offset is at hand.
            old_chunks = old.chunks_from(0) if old is not None else iter(())
            there = next(old_chunks, None)
            for number, chunk in enumerate(index.chunks_from(0)):
                while there is not None and there.end <= chunk.offset:
                    there = next(old_chunks, None)
                source = 0
                if number < held:
                    code = codes[Kind.HELD]
                    if (found := seed_source(chunk.id)) >= 0:
                        code, source = code | _SEEDED, found
                elif there == chunk:
                    code = codes[Kind.IN_PLACE]
                elif zero_ids.get(chunk.size) == chunk.id:
                    code = codes[Kind.ZERO]
                elif (found := old_source(chunk.id)) >= 0:
                    code = codes[Kind.OLD]
                    source = found
                else:
                    code = codes[Kind.OTHER]
                    if (found := seed_source(chunk.id)) >= 0:
                        code, source = code | _SEEDED, found
                flags[number] = code
                sources_out.append(source)
            sources = sources_out.finish()
        except BaseException:
            sources_out.abandon()
            raise
        files.append(sources)

        # The steps go from the image's start to its end (held chunks first), so the target is written in long runs.
        # A copy whose source starts below its own offset (data the release moved towards the end) would find its
        # source overwritten by then: it is read into memory (stashed) just before the step whose chunk holds the
        # source's first byte, as long as the stashed bytes waiting for their step stay within the budget; past it
        # the chunk is taken from a seed or the store instead. A copy from further on is read at its own step,
        # before anything overwrote it.
        old_code, other_code = _CODE[Kind.OLD], _CODE[Kind.OTHER]

        def moved_back() -> Iterator[tuple[int]]:
            """(the step that overwrites its source) << _NUMBER_BITS | number, for each copy from further back."""
            number = flags.find(old_code)
            while number >= 0:
                source = sources[number]
                if source < index.start(number):
                    yield (index.number_at(source) << _NUMBER_BITS | number,)
                number = flags.find(old_code, number + 1)

        stashes = sort_words(moved_back(), scratch_dir)
        files.append(stashes)
        waiting: list[tuple[int, int]] = []  # (the step that uses it, its size): stashed bytes not used yet
        stashed = demoted = waiting_bytes = 0
        for word in (stashes[n] for n in range(len(stashes))):
            position, number = word >> _NUMBER_BITS, word & _NUMBER_MASK
            while waiting and waiting[0][0] < position:
                waiting_bytes -= heapq.heappop(waiting)[1]
            size = index.chunk(number).size
            if waiting_bytes + size > stash_budget:
                flags[number] = other_code | _DEMOTED
                demoted += 1
                continue
            heapq.heappush(waiting, (number, size))
            waiting_bytes += size
            stashed += size
            flags[number] = other_code | _STASHED
        del waiting

        # What no local copy will provide: the first need of each such chunk, in step order. A chunk is available
        # when a chunk of the same id was built at an earlier step or stashed at or before this one.
        def available(chunk_id: bytes, position: int) -> bool:
            return any(
                other < position or (flags[other] & _STASHED and index.number_at(sources[other]) <= position)
                for other in index.numbers_list(chunk_id)
            )

        local_codes = {_CODE[Kind.ZERO], _CODE[Kind.IN_PLACE], old_code}
        fetches = 0
        for number in range(count):
            code = flags[number]
            if code & _KIND_MASK in local_codes or code & _SEEDED:
                continue
            chunk = index.chunk(number)
            if number < held and old_in_place(chunk):
                continue
            if code & _DEMOTED and seed_source(chunk.id) >= 0:
                continue
            if not available(chunk.id, number):
                flags[number] |= _FETCHED
                fetches += 1
    except BaseException:
        for file in files:
            file.close()
        raise
    return Plan(index, hold_end, held, Steps(flags, sources, stashes), FetchList(index, flags, fetches), stashed,
                demoted, flags, tuple(files))
