"""The read-back's check of chunks taken as in place (delta/readback.py): which ones changed, in bounded memory."""

from __future__ import annotations

import hashlib
import random

import pytest

from abflasher.delta.index import ChunkIndex
from abflasher.delta.readback import TrustedChunks


def index_of(image: bytes, cuts: list[int]) -> ChunkIndex:
    ends = [*cuts, len(image)]
    starts = [0, *cuts]
    ids = b"".join(hashlib.sha256(image[s:e]).digest() for s, e in zip(starts, ends, strict=True))
    return ChunkIndex(0, 1, 4096, 1 << 16, ends, ids)


def feed(check: TrustedChunks, image: bytes, first: int, piece: int) -> int:
    """Give ``image`` to ``check`` as the read-back does (its first bytes, then pieces); returns the most bytes the
    check held at once."""
    check.observe(0, memoryview(image[:first]))
    most = 0
    for start in range(first, len(image), piece):
        check.observe(start, memoryview(image[start : start + piece]))
        most = max(most, len(check._buffer))
    return most


def test_the_chunks_that_changed_are_named_in_bounded_memory() -> None:
    rng = random.Random(3)
    image = bytearray(rng.randbytes(4 << 20))
    cuts = sorted(rng.sample(range(1, len(image)), 300))
    index = index_of(bytes(image), cuts)
    trusted = bytearray(b"\x01") * len(index)
    trusted[7] = 0  # a chunk written by the install, not taken on trust: never named
    for number in (7, 8, 200):
        image[index.start(number)] ^= 0xFF
    check = TrustedChunks(index, trusted)
    most = feed(check, bytes(image), 4096, 64 << 10)
    assert check.finish() == [8, 200]
    assert most <= (64 << 10) + max(index.chunk(n).size for n in range(len(index)))


def test_a_failure_of_the_check_itself_is_not_lost() -> None:
    image = random.Random(4).randbytes(1 << 20)
    index = index_of(image, [100_000, 500_000])
    check = TrustedChunks(index, bytearray(b"\x01") * len(index))
    check._trusted = None  # type: ignore[assignment]
    feed(check, image, 4096, 1 << 18)
    with pytest.raises(TypeError):
        check.finish()
