"""The casync formats as ab-flasher reads them: blob indexes made by Debian's casync, chunk files, store paths."""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import zstandard

from abflasher import errors
from abflasher.delta import kept
from abflasher.delta.index import CA_FORMAT_SHA512_256, parse_index
from abflasher.delta.store import decompress_chunk, default_store_url
from abflasher.delta.update import is_index_url

pytestmark = pytest.mark.skipif(shutil.which("casync") is None, reason="casync is not installed")


def casync_index(tmp_path: Path, data: bytes, digest: str) -> tuple[bytes, Path]:
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    index = tmp_path / f"blob-{digest}.caibx"
    subprocess.run(["casync", "make", f"--digest={digest}", f"--store={tmp_path / 'store'}", str(index), str(blob)],
                   check=True, capture_output=True, timeout=120)
    return index.read_bytes(), tmp_path / "store"


@pytest.mark.parametrize(("digest", "hashlib_name"), [("sha256", "sha256"), ("sha512-256", "sha512_256")])
def test_an_index_made_by_casync_is_read_exactly(tmp_path: Path, digest: str, hashlib_name: str) -> None:
    data = os.urandom(900_000) + bytes(600_000) + os.urandom(300_000)
    raw, store = casync_index(tmp_path, data, digest)
    index = parse_index(raw)
    assert index.digest_name == hashlib_name
    assert bool(index.feature_flags & CA_FORMAT_SHA512_256) == (digest == "sha512-256")
    assert (index.chunk_size_min, index.chunk_size_avg, index.chunk_size_max) == (16384, 65536, 262144)
    assert index.size == len(data)
    assert index.to_bytes() == raw, "written back byte for byte"
    for chunk in index:
        assert hashlib.new(hashlib_name, data[chunk.offset : chunk.end]).digest() == chunk.id
        packed = (store / chunk.hex[:4] / f"{chunk.hex}.cacnk").read_bytes()
        assert decompress_chunk(packed, chunk.size) == data[chunk.offset : chunk.end]


def test_broken_indexes_are_refused_with_a_reason(tmp_path: Path) -> None:
    raw, _ = casync_index(tmp_path, os.urandom(200_000), "sha256")
    with pytest.raises(errors.BadImage, match="too short"):
        parse_index(raw[:40])
    with pytest.raises(errors.BadImage, match="does not start with an INDEX object"):
        parse_index(b"\0" * 8 + raw[8:])
    with pytest.raises(errors.BadImage, match="not a whole number of items|no valid tail"):
        parse_index(raw[:-7])
    with pytest.raises(errors.BadImage, match="no valid tail"):
        parse_index(raw[:-8] + b"\0" * 8)
    # A chunk above the index's own maximum size.
    broken = bytearray(raw)
    struct.pack_into("<Q", broken, 64, 10_000_000)
    with pytest.raises(errors.BadImage, match="chunk 0 at byte 0 has size"):
        parse_index(bytes(broken))
    with pytest.raises(errors.BadImage, match="chunk sizes"):
        parse_index(raw[:16] + struct.pack("<QQQQ", 0, 1 << 30, 1 << 30, 1 << 31) + raw[48:])


def test_chunk_files_in_each_compression_and_their_faults() -> None:
    data = os.urandom(5000) + bytes(5000)
    assert decompress_chunk(zstandard.compress(data), len(data)) == data
    assert decompress_chunk(lzma.compress(data), len(data)) == data
    assert decompress_chunk(gzip.compress(data), len(data)) == data
    with pytest.raises(ValueError, match="decompresses to more than"):
        decompress_chunk(zstandard.compress(data + b"x"), len(data))
    with pytest.raises(ValueError, match="decompresses to 9999 bytes"):
        decompress_chunk(zstandard.compress(data[:-1]), len(data))
    with pytest.raises(ValueError, match="not zstd, xz or gzip"):
        decompress_chunk(data, len(data))
    with pytest.raises(ValueError, match="corrupt"):
        decompress_chunk(zstandard.compress(data)[:-9] + b"\xff" * 9, len(data))


def test_the_default_store_is_next_to_the_index_as_in_casync() -> None:
    assert default_store_url("https://h/os/v2/root.caibx?t=1") == "https://h/os/v2/default.castr?t=1"
    assert default_store_url("/srv/os/root.caibx") == "/srv/os/default.castr"
    assert is_index_url("https://h/os/root.caibx?token=x")
    assert not is_index_url("https://h/os/root.img.gz")


def test_kept_indexes_follow_the_images_and_are_pruned(tmp_path: Path) -> None:
    raw, _ = casync_index(tmp_path, os.urandom(100_000), "sha256")
    index = parse_index(raw)
    one, two, three = ("1" * 64, "2" * 64, "3" * 64)
    kept.keep_index(tmp_path / "state", one, index)
    kept.keep_index(tmp_path / "state", two, index, still_used=(one,))
    assert kept.kept_index(tmp_path / "state", one) == index
    kept.keep_index(tmp_path / "state", three, index, still_used=(two,))
    assert kept.kept_index(tmp_path / "state", one) is None, "an index no slot holds any more is dropped"
    assert kept.kept_index(tmp_path / "state", two) == index
    assert kept.kept_index(tmp_path / "state", "../../etc/passwd") is None
    (tmp_path / "state" / "delta" / f"{two}.caibx").write_bytes(b"junk")
    assert kept.kept_index(tmp_path / "state", two) is None, "an unreadable index is only a missing hint"
    kept.set_building(tmp_path / "state", "b", one)
    assert kept.building(tmp_path / "state", "b") == one
    kept.set_building(tmp_path / "state", "b", None)
    assert kept.building(tmp_path / "state", "b") is None
    new_root = tmp_path / "newroot" / "var" / "lib" / "ab-flasher"
    kept.carry_indexes(tmp_path / "state", new_root)
    assert sorted(p.name for p in (new_root / "delta").iterdir()) == [f"{two}.caibx", f"{three}.caibx"]


def test_chunk_ids_are_found_through_the_compact_table_even_when_their_first_bytes_collide() -> None:
    from abflasher.delta.index import ChunkIndex

    same_start = [bytes(8) + bytes([n]) * 24 for n in range(4)]
    ids = [same_start[1], same_start[0], same_start[1], b"\xff" * 32, same_start[2]]
    index = ChunkIndex(0, 1, 8, 8, [8 * (n + 1) for n in range(len(ids))], b"".join(ids))
    assert list(index.numbers_of(same_start[1])) == [0, 2]
    assert list(index.numbers_of(same_start[2])) == [4]
    assert list(index.numbers_of(same_start[3])) == []
    assert b"\xff" * 32 in index
    assert same_start[3] not in index
    assert index[3].offset == 24
    assert index.start(0) == 0
