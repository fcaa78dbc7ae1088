"""Synthetic image payloads and their compressed forms, made in memory for unit tests."""

from __future__ import annotations

import bz2
import gzip
import lzma
import random

import zstandard

MIB = 1 << 20


def payload(size: int = 6 * MIB, *, seed: int = 1) -> bytes:
    """Bytes that look like a partition image: an ext4 superblock magic, text-like data, random data and runs of
    zeros (some aligned to whole MiB so the zero-skipping path is exercised)."""
    rng = random.Random(seed)
    out = bytearray(size)
    out[1080:1082] = b"\x53\xef"
    pos = 4096
    while pos < size:
        kind = rng.choice(("text", "random", "zeros"))
        length = min(size - pos, rng.choice((4096, 65536, 300_000, MIB, 2 * MIB)))
        if kind == "text":
            words = b"the quick brown fox jumps over the lazy raspberry pi "
            out[pos : pos + length] = (words * (length // len(words) + 1))[:length]
        elif kind == "random":
            out[pos : pos + length] = rng.randbytes(length)
        pos += length
    return bytes(out)


def compress(data: bytes, fmt: str, *, members: int = 1) -> bytes:
    """``data`` compressed as ``fmt``, split into ``members`` concatenated members/streams/frames."""
    if fmt == "raw":
        return data
    step = -(-len(data) // members)
    parts = [data[i : i + step] for i in range(0, len(data), step)] or [b""]
    out = b""
    for part in parts:
        if fmt == "gzip":
            out += gzip.compress(part, compresslevel=6, mtime=0)
        elif fmt == "xz":
            out += lzma.compress(part, format=lzma.FORMAT_XZ)
        elif fmt == "bzip2":
            out += bz2.compress(part, compresslevel=1)
        elif fmt == "zstd":
            out += zstandard.ZstdCompressor(level=3).compress(part)
        else:
            raise ValueError(fmt)
    return out


class BytesSource:
    """An ImageSource over bytes in memory, optionally delivering them in odd-sized pieces."""

    def __init__(self, data: bytes, *, piece: int | None = None, known_size: bool = True) -> None:
        self._data = data
        self._pos = 0
        self._piece = piece
        self.size: int | None = len(data) if known_size else None
        self.description = "test bytes"
        self.closed = False

    def read(self, n: int) -> bytes:
        if self._piece is not None:
            n = min(n, self._piece)
        out = self._data[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    def close(self) -> None:
        self.closed = True
