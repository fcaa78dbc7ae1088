"""The order in which a delta install builds the target, and which chunks it will have to fetch.

A chunk the target's old content holds at another offset can be copied from there only if nothing overwrote that
place first. When a release moves data (a file system rebuilt with ``mkfs -d`` shifts every block after a changed
file), a front-to-back pass would destroy most of those sources before reading them; a back-to-front pass would do
the same to data that moved the other way. So the plan orders the writes: every copy from the old content comes
before every write whose destination overlaps its source (a topological order of that graph, lowest offset first
among the ready ones). A cycle (two chunks that swapped places) is broken by reading one of its copies into memory
before anything overwrites it (a *stash*, within `STASH_BUDGET` bytes) or, past the budget, by taking that chunk
from a seed or the store instead. Nothing of the old content is read after it was overwritten.

The chunks starting in the first ``hold_bytes`` of the image (its superblock or partition table) are *held*: their
region is zeroed before anything else is written and they are written last; they never serve as sources.
"""

from __future__ import annotations

import bisect
import enum
import heapq
from collections.abc import Collection
from dataclasses import dataclass

from abflasher.delta.index import Chunk, ChunkIndex

#: Memory for chunks of the old content read ahead of their turn to break cycles.
STASH_BUDGET = 16 << 20


class Kind(enum.Enum):
    HELD = "held"  # starts in the held region: collected in memory, written last
    ZERO = "zero"  # all zeros: zeroed where the target does not read as zeros already
    IN_PLACE = "in place"  # the target's old index has this chunk at this very offset
    OLD = "old"  # copied from another offset of the target's old content
    OTHER = "other"  # built earlier in this install, a seed, a stash, or the store


@dataclass(frozen=True, slots=True)
class Step:
    number: int  # the chunk's number in the new index
    kind: Kind
    source: int = -1  # OLD: where the target's old content holds the chunk
    stash: tuple[tuple[int, int], ...] = ()  # (chunk number, old offset) to read into memory before this step


@dataclass(frozen=True)
class Plan:
    chunks: tuple[Chunk, ...]  # the index's chunks, by number
    hold_end: int
    steps: tuple[Step, ...]
    fetch: tuple[Chunk, ...]  # expected from the store, in the order the steps need them
    stashed_bytes: int
    demoted: int  # copies given up to break cycles beyond the stash budget


def make_plan(
    index: ChunkIndex,
    *,
    target_index: ChunkIndex | None,
    seed_ids: Collection[bytes],
    hold_bytes: int,
    stash_budget: int = STASH_BUDGET,
) -> Plan:
    chunks = list(index)
    count = len(chunks)
    hold_end = 0
    for chunk in chunks:
        if chunk.offset >= hold_bytes:
            break
        hold_end = chunk.end
    # casync's chunker cuts a run of zeros into chunks of the maximum size (its rolling hash over zeros is constant),
    # so a chunk of zeros has that size, or is the image's last chunk.
    zero_ids = {size: index.digest(bytes(size)) for size in {index.chunk_size_max, chunks[-1].size}}

    def is_zero(chunk: Chunk) -> bool:
        return zero_ids.get(chunk.size) == chunk.id

    old_at: dict[int, tuple[int, bytes]] = {}
    old_by_id: dict[bytes, int] = {}
    if target_index is not None and target_index.digest_name == index.digest_name:
        for chunk in target_index:
            old_at[chunk.offset] = (chunk.size, chunk.id)
            if chunk.offset >= hold_end:
                old_by_id.setdefault(chunk.id, chunk.offset)

    kinds: list[Kind] = []
    sources = [-1] * count
    for number, chunk in enumerate(chunks):
        if chunk.offset < hold_end:
            kinds.append(Kind.HELD)
        elif is_zero(chunk):
            kinds.append(Kind.ZERO)
        elif old_at.get(chunk.offset) == (chunk.size, chunk.id):
            kinds.append(Kind.IN_PLACE)
        elif chunk.id in old_by_id:
            kinds.append(Kind.OLD)
            sources[number] = old_by_id[chunk.id]
        else:
            kinds.append(Kind.OTHER)

    # Each copy must come before every write into its source.
    starts = [chunk.offset for chunk in chunks]
    successors: dict[int, list[int]] = {}
    waiting = [0] * count
    copies = [number for number in range(count) if kinds[number] is Kind.OLD]
    for number in copies:
        source, end = sources[number], sources[number] + chunks[number].size
        other = bisect.bisect_right(starts, source) - 1
        while other < count and starts[other] < end:
            if other != number:
                successors.setdefault(number, []).append(other)
                waiting[other] += 1
            other += 1

    steps = [Step(number, Kind.HELD) for number in range(count) if kinds[number] is Kind.HELD]
    ready = [(starts[n], n) for n in range(count) if kinds[n] is not Kind.HELD and waiting[n] == 0]
    heapq.heapify(ready)
    remaining = count - len(steps)
    done = [False] * count
    pending_stash: list[tuple[int, int]] = []
    stashed = demoted = 0
    next_copy = 0

    def release(number: int) -> None:
        for other in successors.pop(number, ()):
            waiting[other] -= 1
            if waiting[other] == 0 and not done[other]:
                heapq.heappush(ready, (starts[other], other))

    while remaining:
        if not ready:
            # A cycle: give up the lowest copy still waiting to be read.
            while done[copies[next_copy]] or copies[next_copy] not in successors:
                next_copy += 1
            victim = copies[next_copy]
            size = chunks[victim].size
            if stashed + size <= stash_budget:
                pending_stash.append((victim, sources[victim]))
                stashed += size
            else:
                demoted += 1
            kinds[victim] = Kind.OTHER
            sources[victim] = -1
            release(victim)
            continue
        _, number = heapq.heappop(ready)
        if done[number]:
            continue
        done[number] = True
        remaining -= 1
        steps.append(Step(number, kinds[number], sources[number], tuple(pending_stash)))
        pending_stash = []
        release(number)

    # What no local copy will provide: the first need of each such chunk, in step order.
    available: set[bytes] = set()
    fetch: list[Chunk] = []
    for step in steps:
        available.update(chunks[victim].id for victim, _ in step.stash)
        chunk = chunks[step.number]
        local = step.kind in (Kind.ZERO, Kind.IN_PLACE, Kind.OLD) or (
            step.kind is Kind.HELD and old_at.get(chunk.offset) == (chunk.size, chunk.id)
        )
        if not local and chunk.id not in available and chunk.id not in seed_ids:
            fetch.append(chunk)
        available.add(chunk.id)
    return Plan(tuple(chunks), hold_end, tuple(steps), tuple(fetch), stashed, demoted)
