"""The delta install's plan: the target is built from its start to its end, and a copy from its old content never
reads anything already overwritten (it is stashed first, within a memory budget), so the slot can be rebuilt in
place however the release moved its data. Checked by carrying plans out on a bytearray."""

from __future__ import annotations

import hashlib
import random

import pytest

from abflasher.delta.index import ChunkIndex
from abflasher.delta.plan import Kind, make_plan

SIZE = 64


def index_of(contents: list[bytes]) -> ChunkIndex:
    ends, position = [], 0
    for content in contents:
        position += len(content)
        ends.append(position)
    ids = b"".join(hashlib.sha256(content).digest() for content in contents)
    return ChunkIndex(0, 1, SIZE, SIZE, tuple(ends), ids)


def block(name: int) -> bytes:
    return hashlib.sha512(str(name).encode()).digest()[:SIZE] if name else bytes(SIZE)


def carry_out(old: list[int], new: list[int], stash_budget: int, hold: int = SIZE) -> tuple[bytes, int, int]:
    """Apply the plan of old → new to the old image as the installer does; returns (the result, chunks fetched,
    the most stashed chunks waiting at once). Fails if a copy would read anything but the chunk it was planned for,
    or if the steps do not go from the start to the end."""
    old_blocks, new_blocks = [block(n) for n in old], [block(n) for n in new]
    index, target_index = index_of(new_blocks), index_of(old_blocks)
    plan = make_plan(index, target_index=target_index, hold_bytes=hold, stash_budget=stash_budget)
    # The slot: the old image, then whatever the partition holds past it.
    device = bytearray(b"".join(old_blocks)) + bytearray(b"\xee" * SIZE * max(0, len(new) - len(old)))
    device[: plan.hold_end] = bytes(plan.hold_end)
    stash: dict[bytes, bytes] = {}
    fetched = {chunk.id for chunk in plan.fetch}
    stashed = 0
    assert [step.number for step in plan.steps] == list(range(len(new)))
    for step in plan.steps:
        for number, source in step.stash:
            data = bytes(device[source : source + SIZE])
            assert data == new_blocks[number], "a stash read something overwritten"
            stash[plan.chunks[number].id] = data
        stashed = max(stashed, len(stash))
        chunk = plan.chunks[step.number]
        wanted = new_blocks[step.number]
        if step.kind is Kind.HELD:
            continue
        if step.kind is Kind.OLD:
            assert bytes(device[step.source : step.source + SIZE]) == wanted, "a copy read something overwritten"
        elif step.kind is Kind.IN_PLACE:
            assert bytes(device[chunk.offset : chunk.end]) == wanted
        elif step.kind is Kind.OTHER and stash.pop(chunk.id, None) is None:
            # From the store, or from a chunk of the new image written before.
            assert chunk.id in fetched or wanted in {new_blocks[s.number] for s in plan.steps[: plan.steps.index(step)]}
        device[chunk.offset : chunk.end] = wanted
    device[: plan.hold_end] = b"".join(new_blocks)[: plan.hold_end]
    return bytes(device[: index.size]), len(plan.fetch), stashed


def test_data_moved_towards_the_end_is_stashed_just_before_it_is_overwritten() -> None:
    old = [1, *range(10, 30)]
    new = [1, 99, 98, *range(10, 30)]  # two new chunks inserted: everything after them moves two chunks on
    result, fetched, stashed = carry_out(old, new, stash_budget=3 * SIZE)
    assert result == b"".join(block(n) for n in new)
    assert fetched == 2, "only the new chunks come from the store"
    assert stashed <= 3, "memory follows how far the data moved, not how much of it did"


def test_past_the_stash_budget_moved_data_is_fetched() -> None:
    old = [1, *range(10, 30)]
    new = [1, 99, 98, *range(10, 30)]
    result, fetched, stashed = carry_out(old, new, stash_budget=0)
    assert result == b"".join(block(n) for n in new)
    assert (fetched, stashed) == (22, 0)


def test_data_moved_towards_the_start_is_copied_with_nothing_stashed() -> None:
    old = [1, 99, 98, *range(10, 30)]
    new = [1, *range(10, 30)]
    result, fetched, stashed = carry_out(old, new, stash_budget=0)
    assert result == b"".join(block(n) for n in new)
    assert (fetched, stashed) == (0, 0)


def test_swapped_chunks_are_stashed_or_else_fetched() -> None:
    old, new = [1, 10, 11, 12], [1, 12, 11, 10]
    result, fetched, stashed = carry_out(old, new, stash_budget=SIZE)
    assert result == b"".join(block(n) for n in new)
    assert (fetched, stashed) == (0, 1)
    result, fetched, stashed = carry_out(old, new, stash_budget=0)
    assert result == b"".join(block(n) for n in new)
    assert (fetched, stashed) == (1, 0)


def test_the_held_start_is_never_a_source() -> None:
    old, new = [10, 11, 12], [1, 10, 11]  # old's first chunk is in the held region, zeroed before anything is read
    result, fetched, _ = carry_out(old, new, stash_budget=1 << 20)
    assert result == b"".join(block(n) for n in new)
    assert fetched == 2, "chunk 10 lived in the held region: fetched, not copied"


@pytest.mark.parametrize("seed", range(40))
def test_any_reshuffle_is_rebuilt_exactly(seed: int) -> None:
    rng = random.Random(seed)
    old = [rng.choice([0, 0, *range(1, 60)]) for _ in range(rng.randrange(4, 60))]
    new = list(old)
    for _ in range(rng.randrange(1, 12)):
        what = rng.random()
        if what < 0.3 and len(new) > 2:
            new.pop(rng.randrange(1, len(new)))
        elif what < 0.6:
            new.insert(rng.randrange(1, len(new)), rng.randrange(100, 140))
        else:
            i, j = rng.randrange(len(new)), rng.randrange(len(new))
            new[i], new[j] = new[j], new[i]
    budget = rng.choice([0, SIZE, 4 * SIZE, 1 << 20])
    result, _, stashed = carry_out(old, new, stash_budget=budget, hold=rng.choice([1, SIZE + 1, 3 * SIZE]))
    assert result == b"".join(block(n) for n in new)
    assert stashed * SIZE <= budget
