"""``ab-flasher make-delta`` (publish an image's chunked form) and ``ab-flasher write-delta`` (install one into a
block device or file), registered by abflasher/cli.py."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from abflasher import errors

COMMANDS = ("make-delta", "write-delta")


def add_commands(commands: Any) -> None:
    """Add the delta commands to ``ab-flasher``'s subparsers."""
    from abflasher.delta.publish import DEFAULT_CHUNK_SIZE, DEFAULT_DIGEST, DEFAULT_ZSTD_LEVEL

    make = commands.add_parser(
        "make-delta",
        help="publish an image for delta updates: a casync index and chunk store",
        description="Chunk IMAGE (raw, or gzip/xz/zstd/bzip2) with casync into OUTDIR/NAME.caibx and the chunk store "
        "OUTDIR/default.castr (shared by every release published into OUTDIR), plus NAME.caibx.sha256. Serve OUTDIR "
        "from any static web server; an Update whose image URL names the .caibx then downloads only the chunks the "
        "device does not hold.",
    )
    make.add_argument("image", metavar="IMAGE", help="the image file")
    make.add_argument("outdir", metavar="OUTDIR", help="where the index and the store go")
    make.add_argument("--name", help="index name without .caibx (default: IMAGE's name without its suffixes)")
    make.add_argument("--chunk-size", default=DEFAULT_CHUNK_SIZE, metavar="MIN:AVG:MAX",
                      help=f"casync chunk sizes in bytes (default {DEFAULT_CHUNK_SIZE})")
    make.add_argument("--digest", default=DEFAULT_DIGEST, choices=["sha256", "sha512-256"],
                      help=f"chunk id digest (default {DEFAULT_DIGEST})")
    make.add_argument("--zstd-level", type=int, default=DEFAULT_ZSTD_LEVEL, metavar="N",
                      help="compress the chunks this image adds again at this zstd level "
                      f"(default {DEFAULT_ZSTD_LEVEL}; 0 keeps casync's)")
    make.add_argument("--json", action="store_true", help="print the result (and the manifest artifact) as JSON")

    write = commands.add_parser(
        "write-delta",
        help="install an image from a casync index into a block device or file, reusing chunks it already has",
        description="Build TARGET as the image INDEX (a .caibx path or http(s) URL) describes: chunks already in "
        "place (per --target-index) are left alone, chunks the seeds hold are copied (each checked against its id), "
        "the rest is fetched from the store. Then TARGET is read back and its sha256 compared.",
    )
    write.add_argument("index", metavar="INDEX", help=".caibx path or http(s) URL")
    write.add_argument("target", metavar="TARGET", help="block device or regular file")
    write.add_argument("--store", default="",
                       help="chunk store URL or directory (default: default.castr next to INDEX)")
    write.add_argument("--seed", action="append", default=[], metavar="PATH=INDEX",
                       help="a device or file holding the image the .caibx INDEX describes (repeatable)")
    write.add_argument("--target-index", metavar="INDEX", help=".caibx of what TARGET holds now")
    write.add_argument("--sha256", metavar="HEX", help="expected sha256 of the image (or of the index file)")
    write.add_argument("--size", type=int, metavar="BYTES", help="expected size of the image")
    write.add_argument("--connections", type=int, default=4, help="parallel connections to the store (default 4)")
    write.add_argument("--json", action="store_true", help="print the result as one JSON object")
    write.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def _read_index(path: str) -> Any:
    from abflasher.delta.index import read_index

    try:
        return read_index(path)
    except OSError as exc:
        raise errors.InvalidArgument(f"cannot read index {path}: {exc.strerror}") from exc


def _make(args: argparse.Namespace) -> int:
    from abflasher.delta.publish import make_delta

    published = make_delta(args.image, args.outdir, name=args.name, chunk_size=args.chunk_size, digest=args.digest,
                           zstd_level=args.zstd_level)
    if args.json:
        print(json.dumps({
            "success": True,
            "index": str(published.index),
            "store": str(published.store),
            "checksum_file": str(published.checksum_file),
            "image_size": published.image_size,
            "image_sha256": published.image_sha256,
            "index_sha256": published.index_sha256,
            "chunks": published.chunks,
            "digest": published.digest,
            "artifact": published.manifest_artifact(),
        }))
    else:
        print(f"{published.index}: {published.chunks} chunks of an image of {published.image_size} bytes "
              f"(sha256 {published.image_sha256}); chunks in {published.store}")
    return 0


def _write(args: argparse.Namespace) -> int:
    from abflasher.cli import ProgressPrinter, cancel_on_signals
    from abflasher.delta.install import Seed
    from abflasher.delta.store import StoreOptions
    from abflasher.delta.update import install_from_index

    if not 1 <= args.connections <= 16:
        raise errors.InvalidArgument("--connections: use 1 to 16")
    seeds = []
    for spec in args.seed:
        path, sep, index = spec.partition("=")
        if not sep or not path or not index:
            raise errors.InvalidArgument(f"--seed {spec!r}: give PATH=INDEX")
        seeds.append(Seed(path, _read_index(index), path))
    target_index = _read_index(args.target_index) if args.target_index else None
    cancel = cancel_on_signals()
    printer = ProgressPrinter(sys.stderr, enabled=not args.quiet)
    try:
        result = install_from_index(
            args.index, args.store, args.target,
            expected_size=args.size,
            expected_sha256=args.sha256,
            options=StoreOptions(connections=args.connections),
            seeds=seeds,
            target_index=target_index,
            progress=printer,
            cancel=cancel,
        )
    finally:
        printer.close()
    if args.json:
        print(json.dumps({"success": True, "target": args.target, "image_size": result.image_size,
                          "image_sha256": result.image_sha256, "downloaded": result.downloaded,
                          "fetched_chunks": result.fetched_chunks, "written": result.written,
                          "zeroed": result.zeroed, "in_place": result.in_place, "from_seeds": result.from_seeds,
                          "seed_rejected": result.seed_rejected, "verified": result.verified,
                          "seconds": round(result.seconds, 3)}))
    else:
        print(f"built {result.image_size} bytes in {args.target} in {result.seconds:.1f} s: downloaded "
              f"{result.downloaded} bytes, wrote {result.written}, {result.in_place} in place; read-back verified, "
              f"sha256 {result.image_sha256}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the delta command ``args.command`` names."""
    return _make(args) if args.command == "make-delta" else _write(args)
