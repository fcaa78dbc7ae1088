"""A delta install's memory does not grow with the image: the indexes are read from their files, their lookup tables
and the plan's sources and stashes are in temporary files, and the plan keeps a byte per chunk. Measured with
tracemalloc on generated indexes of a 512 MiB and a 2 GiB image (16 KiB chunks), no disk of that size needed."""

from __future__ import annotations

import hashlib
import random
import tracemalloc
from pathlib import Path

import pytest

from abflasher.delta import kept
from abflasher.delta.index import ChunkIndex
from abflasher.delta.install import HOLD_BYTES
from abflasher.delta.plan import NO_SEED, Kind, make_plan

pytestmark = pytest.mark.timeout(300)

CHUNK = 16 << 10
#: Chunks of a 512 MiB image: past what the lookup tables sort in memory at a time (delta/words.py).
SMALL = (512 << 20) // CHUNK


def chunk_id(name: int) -> bytes:
    return hashlib.sha256(name.to_bytes(8, "little")).digest()


def keep(state: Path, label: str, names: list[int]) -> str:
    """Keep an index of chunks ``names`` (CHUNK bytes each) in ``state`` as the image ``label``'s; returns the name
    it is kept under."""
    index = ChunkIndex(0, CHUNK // 4, CHUNK, CHUNK * 4, [CHUNK * (n + 1) for n in range(len(names))],
                       b"".join(chunk_id(name) for name in names))
    sha = hashlib.sha256(label.encode()).hexdigest()
    kept.keep_index(state, sha, index, still_used=kept_names(state))
    return sha


def kept_names(state: Path) -> list[str]:
    return [path.stem for path in (state / kept.FOLDER).glob("*.caibx")]


def release_pair(chunks: int) -> tuple[list[int], list[int], list[int]]:
    """Old and new chunk names of a release that changed, added and removed runs of chunks (so data moves), and the
    booted slot's (another release)."""
    rng = random.Random(chunks)
    old = list(range(chunks))
    new: list[int] = []
    booted: list[int] = []
    position = 0
    while position < chunks:
        run = rng.randrange(1, 16)
        roll = rng.random()
        if roll < 0.06:
            new += [chunks + name for name in old[position : position + run]]  # changed
        elif roll < 0.09:
            new += [*old[position : position + run], *(2 * chunks + position + n for n in range(run))]  # grew
        elif roll >= 0.11:
            new += old[position : position + run]  # else removed
        position += run
        # The booted slot holds another release: it lacks a few of the new chunks.
        booted += [3 * chunks + name if rng.random() < 0.05 else name for name in new[len(booted) :]]
    return old, new, booted


def peak_of_an_install(state: Path, chunks: int) -> int:
    """The most memory the indexes, the plan and going through its steps and fetches as the installer does take."""
    old, new, booted = release_pair(chunks)
    names = [keep(state, "old", old), keep(state, "new", new), keep(state, "booted", booted)]
    tracemalloc.start()
    try:
        old_index, new_index, booted_index = (kept.kept_index(state, name) for name in names)
        assert old_index is not None
        assert new_index is not None
        assert booted_index is not None
        plan = make_plan(new_index, target_index=old_index, seeds=[booted_index], hold_bytes=HOLD_BYTES,
                         scratch_dir=str(state))
        built = bytearray(len(new_index))
        kinds = dict.fromkeys(Kind, 0)
        for step in plan.steps.starting_at(plan.held):
            chunk = plan.chunks[step.number]
            kinds[step.kind] += 1
            if step.kind is Kind.OTHER and not plan.fetches(step.number) and not plan.stashed(step.number):
                # Not fetched: a seed holds it (the installer looks up which one if the plan did not), or it is built
                # before.
                assert step.seed != NO_SEED or next(new_index.numbers_of(chunk.id)) < step.number
            built[step.number] = 1
        fetched = sum(chunk.size for chunk in plan.fetch)
        assert kinds[Kind.IN_PLACE]
        assert kinds[Kind.OTHER]
        assert fetched
        assert plan.stashed_bytes, "the release moved data towards the end"
        plan.close()
        for index in (old_index, new_index, booted_index):
            index.close()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_an_install_takes_as_much_memory_for_2_gib_as_for_512_mib(tmp_path: Path) -> None:
    small = peak_of_an_install(tmp_path / "small", SMALL)
    large = peak_of_an_install(tmp_path / "large", 4 * SMALL)
    # A byte or two a chunk (the plan's, the installer's) is all that grows: 1.5 GiB more take under 512 KiB more
    # (an index and its lookup table in memory took 48 bytes a chunk each: 4.5 MiB more per index).
    assert large - small < 512 << 10, f"512 MiB: {small >> 10} KiB, 2 GiB: {large >> 10} KiB"
    assert small < 8 << 20, f"{small >> 10} KiB for 512 MiB"
