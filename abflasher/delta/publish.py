"""The publisher's side of delta updates: the chunked form of an image, made with Debian's ``casync``.

``make_delta(IMAGE, OUTDIR)`` writes ``OUTDIR/NAME.caibx`` (the index) and adds the image's chunks to
``OUTDIR/default.castr`` (the store casync and ab-flasher use by default for an index in OUTDIR; chunks already there
from earlier releases are shared, so each release adds only its new chunks), plus ``NAME.caibx.sha256`` (the index's
sha256 in sha256sum format, which the default ``checksum_url`` template finds). A compressed image (gzip, xz, zstd,
bzip2) is decompressed first, by the same decoder an install uses, into a temporary file beside the output (casync
chunks only files and block devices).

Chunks: casync's content-defined chunker with 4/16/64 KiB min/average/max (casync's default is 16/64/256 KiB: on
an ext4 root with 10 % of its files changed, 16 KiB chunks download 12.6 % of the gzipped image where 64 KiB chunks
download 17 %, bench/delta_bench.py), SHA-256 ids (casync's default is SHA-512/256; SHA-256 is what the rest of
ab-flasher uses, and what CPUs with SHA extensions hash fastest), zstd-compressed; the chunks a release adds are then
compressed again at zstd level 19 (casync uses zstd's default level, 3; a chunk is compressed once and downloaded by
every device: 7 % fewer bytes to download).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abflasher import errors
from abflasher.delta.index import CHUNK_SUFFIX, parse_index
from abflasher.image.formats import ImageFormat, detect_format

DEFAULT_CHUNK_SIZE = "4096:16384:65536"
DEFAULT_DIGEST = "sha256"
#: casync compresses at zstd's default (3); new chunks are compressed again at this level (0: keep casync's).
DEFAULT_ZSTD_LEVEL = 19
STORE_NAME = "default.castr"
_CHUNK_SIZE_RE = re.compile(r"^\d+(:\d+:\d+)?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_IMAGE_SUFFIXES = (".gz", ".xz", ".zst", ".bz2", ".img", ".raw", ".ext4")


@dataclass(frozen=True)
class PublishedDelta:
    index: Path
    store: Path
    checksum_file: Path
    image_size: int
    image_sha256: str
    index_sha256: str
    chunks: int
    digest: str

    def manifest_artifact(self) -> dict[str, Any]:
        """The artifact a signed manifest lists for this delta (URLs relative to the manifest in OUTDIR)."""
        return {
            "format": "caibx",
            "url": self.index.name,
            "store": self.store.name,
            "size": self.image_size,
            "sha256": self.image_sha256,
        }


def _name_for(image: Path) -> str:
    name = image.name
    while True:
        stem = next((name[: -len(s)] for s in _IMAGE_SUFFIXES if name.endswith(s) and len(name) > len(s)), None)
        if stem is None:
            return name
        name = stem


def _raw_image(image: Path, workdir: Path) -> tuple[Path, int, str]:
    """(a raw form of ``image``, its size, its sha256): the file itself, or its decompression into ``workdir``."""
    from abflasher.image.sources import FileSource

    source = FileSource(image)
    try:
        head = source.read(4096)
    finally:
        source.close()
    if detect_format(head) is ImageFormat.RAW:
        digest = hashlib.sha256()
        size = 0
        with open(image, "rb", buffering=0) as handle:
            while piece := handle.read(4 << 20):
                digest.update(piece)
                size += len(piece)
        return image, size, digest.hexdigest()
    from abflasher.install import install_image

    raw = workdir / "image.raw"
    source = FileSource(image)
    try:
        result = install_image(source, raw, create=True, verify=False)
    finally:
        source.close()
    return raw, result.image_size, result.sha256


def _chunk_files(store: Path) -> set[str]:
    if not store.is_dir():
        return set()
    return {str(path.relative_to(store)) for path in store.glob(f"*/*{CHUNK_SUFFIX}")}


def _recompress(path: Path, level: int) -> int:
    """Compress the chunk file ``path`` again at zstd ``level`` when that makes it smaller; returns the bytes saved."""
    import zstandard

    packed = path.read_bytes()
    data = zstandard.ZstdDecompressor().decompressobj().decompress(packed)
    smaller = zstandard.ZstdCompressor(level=level).compress(data)
    if len(smaller) >= len(packed) or zstandard.ZstdDecompressor().decompressobj().decompress(smaller) != data:
        return 0
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(smaller)
    os.replace(tmp, path)
    return len(packed) - len(smaller)


def _recompress_new_chunks(store: Path, before: set[str], level: int) -> int:
    """casync compresses at zstd's default level; chunks are made once and downloaded by every device, so the ones
    this release added are compressed again harder (any zstd frame is a valid chunk file for casync and desync)."""
    from concurrent.futures import ThreadPoolExecutor

    added = [store / name for name in sorted(_chunk_files(store) - before)]
    # zstandard releases the GIL while it compresses: one thread per CPU.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return sum(pool.map(lambda path: _recompress(path, level), added))


def make_delta(
    image: str | os.PathLike[str],
    outdir: str | os.PathLike[str],
    *,
    name: str | None = None,
    chunk_size: str = DEFAULT_CHUNK_SIZE,
    digest: str = DEFAULT_DIGEST,
    zstd_level: int = DEFAULT_ZSTD_LEVEL,
    casync: str = "casync",
) -> PublishedDelta:
    """Chunk ``image`` into ``outdir`` (see the module docstring); InvalidArgument or BadImage saying what is wrong."""
    image_path = Path(image)
    out = Path(outdir)
    if not image_path.is_file():
        raise errors.InvalidArgument(f"image {image_path} is not a file")
    name = name or _name_for(image_path)
    if not _NAME_RE.match(name):
        raise errors.InvalidArgument(f"index name {name!r}: use letters, digits and . _ + - only")
    if not _CHUNK_SIZE_RE.match(chunk_size):
        raise errors.InvalidArgument(f"chunk size {chunk_size!r}: give AVG or MIN:AVG:MAX in bytes")
    if digest not in ("sha256", "sha512-256"):
        raise errors.InvalidArgument(f"digest {digest!r}: use sha256 or sha512-256")
    if not 0 <= zstd_level <= 22:
        raise errors.InvalidArgument(f"zstd level {zstd_level}: use 1 to 22, or 0 to keep casync's")
    if shutil.which(casync) is None:
        raise errors.InvalidArgument("casync is not installed (apt install casync)")
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / f"{name}.caibx"
    store = out / STORE_NAME
    with tempfile.TemporaryDirectory(prefix=".make-delta-", dir=out) as tmp:
        raw, size, image_sha256 = _raw_image(image_path, Path(tmp))
        before = _chunk_files(store)
        partial = Path(tmp) / index_path.name
        command = [casync, "make", f"--store={store}", f"--chunk-size={chunk_size}", f"--digest={digest}",
                   "--compression=zstd", str(partial), str(raw)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=24 * 3600)
        except OSError as exc:
            raise errors.InvalidArgument(f"cannot run casync: {exc.strerror}") from exc
        if done.returncode != 0:
            why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
            raise errors.BadImage(f"casync make failed: {why}")
        data = partial.read_bytes()
        index = parse_index(data, str(index_path))
        if index.size != size:
            raise errors.Internal(f"casync indexed {index.size} bytes of an image of {size}")
        if zstd_level:
            _recompress_new_chunks(store, before, zstd_level)
        os.replace(partial, index_path)
    index_sha256 = hashlib.sha256(data).hexdigest()
    checksum = out / f"{index_path.name}.sha256"
    with contextlib.suppress(FileNotFoundError):
        checksum.unlink()
    checksum.write_text(f"{index_sha256}  {index_path.name}\n", encoding="ascii")
    return PublishedDelta(index_path, store, checksum, size, image_sha256, index_sha256, len(index), index.digest_label)
