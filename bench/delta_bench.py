#!/usr/bin/env python3
"""Delta update benchmark: update a slot holding v1 to v2 from a local HTTP server, against a full install of v2 and
against `casync extract --seed` of the same pair.

v1 is install_bench.py's realistic root image (cached in bench/.cache/); v2 is the same file tree with about 10 % of
its files changed (given the content of other files of this machine's /usr), some added and some removed, rebuilt
with `mkfs.ext4 -d` (so blocks move). With `--release updated`, v2 has the same changes made to v1's file system
mounted in place instead, so files that did not change stay where they were: what a delta install costs when the
release keeps its layout. Both are published with `ab-flasher make-delta` into one directory served by a plain
static HTTP/1.1 server (nginx when installed, keep-alive, no Range needed) in its own process. On one loop device
(direct I/O to its backing file) with two partitions, the timed runs are, round-robin:

| row | what runs | PART before |
| --- | --- | --- |
| full install of v2 | `ab-flasher write v2.img.gz PART` (read-back verify included) | discarded |
| delta, target holds v1 | `ab-flasher write-delta URL/v2.caibx PART --target-index v1.caibx` (verify too) | v1 |
| delta, booted holds v1 | the same with `--seed OTHER=v1.caibx`, nothing known of PART; OTHER holds v1 | discarded |
| casync extract --seed | `casync extract --store=URL/default.castr --seed=OTHER URL/v2.caibx PART` (no verify) | v1 |

with the page cache dropped before each run. Measured: wall time (process start to exit), bytes the server sent,
sectors the kernel wrote to the partition (/sys/class/block/PART/stat), peak RSS (GNU time). Targets (issue 13): with
the target holding v1, downloaded <= 15 % of v2's .gz, written <= 20 % of the image, wall <= 0.35 x the full install.

Needs root. The last line printed is one JSON object. Exits 0 whether or not the targets were met (a measurement);
non-zero only when a tool or a check failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The sibling benchmark: `python bench/delta_bench.py` has bench/ on its path.
from common_cli import add_image_size, add_python, parse, run_as_root
from install_bench import (
    CACHE,
    FS_BLOCK,
    MB,
    MIB,
    RECIPE,
    REPO,
    BenchError,
    BenchImage,
    _fill_tree,
    _fs_used,
    _mkfs,
    _usr_files,
    build_image,
    drop_caches,
    ensure_tools,
    log,
    run,
    run_timed,
    sha256_of,
)

#: ab-flasher make-delta's default (abflasher/delta/publish.py).
DEFAULT_CHUNK_SIZE = "4096:16384:65536"
# Bump when the recipe of v2 changes, so a cached v2 made by an older one is rebuilt.
DELTA_RECIPE = "d1"
CHANGED_SHARE = 0.08
REMOVED_SHARE = 0.02
ADDED_SHARE = 0.02
TARGET_DOWNLOAD_VS_GZ = 0.15
TARGET_WRITTEN_VS_IMAGE = 0.20
TARGET_WALL_VS_FULL = 0.35

VERIFY_SCRIPT = """
import sys
from abflasher.disk.blockdev import ReadbackVerifier
verifier = ReadbackVerifier(sys.argv[1])
verifier.first_block(memoryview(b""))
print(verifier.finish(int(sys.argv[2])))
verifier.close()
"""
SERVER_SCRIPT = r"""
import http.server, os, socket, sys
root, log_path = sys.argv[1], sys.argv[2]
log = open(log_path, "a", buffering=1)
class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=root, **kwargs)
    def setup(self):
        super().setup()
        # As web servers do on keep-alive connections: without it the body waits for the ACK of the headers.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    def log_message(self, *args):
        pass
    def copyfile(self, source, outputfile):
        before = source.tell()
        super().copyfile(source, outputfile)
        log.write(f"{self.path} {source.tell() - before}\n")
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
"""


# --------------------------------------------------------------------------------------------------- v2


@dataclass(frozen=True)
class Release:
    name: str
    raw: Path
    gz: Path
    image_bytes: int
    image_sha256: str
    gz_bytes: int


def _tree_files(tree: Path) -> list[Path]:
    return sorted(p for p in tree.rglob("*") if p.is_file() and not p.is_symlink() and p.name != ".ab_version")


def _mutate(tree: Path, rng: random.Random, spare: list[tuple[Path, int]]) -> dict[str, int]:
    """Change, remove and add files of ``tree`` as a release does; new content is real files of this /usr not in the
    sample (``spare``), so it compresses as a real update's does."""
    files = _tree_files(tree)
    rng.shuffle(files)
    changed = files[: int(len(files) * CHANGED_SHARE)]
    removed = files[len(changed) : len(changed) + int(len(files) * REMOVED_SHARE)]
    changed_bytes = 0
    for path in changed:
        size = path.stat().st_size
        # The spare file nearest in size stands for the new version of this one.
        best = min(range(len(spare)), key=lambda n: abs(spare[n][1] - size))
        source, new_size = spare.pop(best)
        shutil.copyfile(source, path)
        changed_bytes += new_size
    for path in removed:
        path.unlink()
    added_bytes = 0
    for n in range(int(len(files) * ADDED_SHARE)):
        source, size = spare.pop(rng.randrange(len(spare)))
        dest = tree / "usr" / "lib" / "added" / f"{n:05d}-{source.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
        added_bytes += size
    (tree / ".ab_version").write_text(f"bench-{RECIPE}-{DELTA_RECIPE}\n")
    return {"files": len(files), "changed": len(changed), "removed": len(removed),
            "added": int(len(files) * ADDED_SHARE), "changed_bytes": changed_bytes, "added_bytes": added_bytes}


def _gzip(raw: Path, gz: Path) -> None:
    tmp = gz.with_suffix(".gz.tmp")
    with open(tmp, "wb") as out:
        subprocess.run(["gzip", "-6", "-n", "-c", str(raw)], stdout=out, check=True, timeout=3600)
    tmp.rename(gz)


def _cached_release(name: str, stem_name: str) -> tuple[Path, Path, tuple[Release, dict[str, Any]] | None]:
    """The image and .gz paths of a release, and the release itself when the cache holds it."""
    stem = CACHE / stem_name
    raw, gz = Path(f"{stem}.img"), Path(f"{stem}.img.gz")
    manifest = stem.with_suffix(".json")
    if manifest.exists() and raw.exists() and gz.exists():
        data = json.loads(manifest.read_text())
        release = Release(name, raw, gz, data["image_bytes"], data["image_sha256"], data["gz_bytes"])
        return raw, gz, (release, data["changes"])
    return raw, gz, None


def _finish_release(name: str, raw: Path, gz: Path, changes: dict[str, Any]) -> tuple[Release, dict[str, Any]]:
    """Compress the built image and note it in the cache."""
    _gzip(raw, gz)
    release = Release(name, raw, gz, raw.stat().st_size, sha256_of(raw), gz.stat().st_size)
    raw.with_suffix(".json").write_text(json.dumps({
        "image_bytes": release.image_bytes, "image_sha256": release.image_sha256, "gz_bytes": release.gz_bytes,
        "changes": changes}, indent=2) + "\n")
    return release, changes


def build_v2(v1: BenchImage) -> tuple[Release, dict[str, Any]]:
    """v2 of ``v1`` (cached): the v1 tree rebuilt, mutated, and made into a file system of the same size."""
    raw, gz, cached = _cached_release("v2", f"rootfs-{RECIPE}-{DELTA_RECIPE}-v2-{v1.size_mb}M")
    if cached is not None:
        return cached
    log(f"building v2 of the {v1.size_mb} MiB image...")
    size_bytes = v1.size_mb * MIB
    empty = raw.with_suffix(".empty")
    _mkfs(empty, size_bytes, None)
    empty_used, _ = _fs_used(empty)
    empty.unlink()
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="tree-v2-") as tree_dir:
        tree = Path(tree_dir)
        _fill_tree(tree, size_bytes, empty_used)
        sampled = {f"/{p.relative_to(tree)}" for p in _tree_files(tree)}
        spare = [(p, s) for p, s in _usr_files() if str(p) not in sampled and s <= 8 * MIB]
        changes = _mutate(tree, random.Random(f"ab-flasher-delta-{DELTA_RECIPE}"), spare)
        tmp = raw.with_suffix(".img.tmp")
        _mkfs(tmp, size_bytes, tree)
    tmp.rename(raw)
    return _finish_release("v2", raw, gz, changes)


def build_v2_updated(v1: BenchImage) -> tuple[Release, dict[str, Any]]:
    """v2 made the other way a release can be made (cached): v1's file system mounted and changed in place, the same
    changes as build_v2's, so the kernel's allocator leaves every file that did not change where it was."""
    raw, gz, cached = _cached_release("v2u", f"rootfs-{RECIPE}-{DELTA_RECIPE}-v2u-{v1.size_mb}M")
    if cached is not None:
        return cached
    log(f"building v2 of the {v1.size_mb} MiB image by updating v1's file system in place...")
    tmp = raw.with_suffix(".img.tmp")
    run("cp", "--sparse=always", v1.raw, tmp)
    device = run("losetup", "--find", "--show", tmp).stdout.strip()
    try:
        with tempfile.TemporaryDirectory(dir=CACHE, prefix="mnt-v2u-") as mount_dir:
            tree = Path(mount_dir)
            run("mount", "-t", "ext4", device, tree)
            try:
                sampled = {f"/{p.relative_to(tree)}" for p in _tree_files(tree)}
                spare = [(p, s) for p, s in _usr_files() if str(p) not in sampled and s <= 8 * MIB]
                changes = _mutate(tree, random.Random(f"ab-flasher-delta-{DELTA_RECIPE}"), spare)
            finally:
                run("umount", tree)
    finally:
        run("losetup", "-d", device)
    tmp.rename(raw)
    return _finish_release("v2u", raw, gz, changes)


def blocks_that_differ(v1: Path, v2: Path) -> int:
    """Bytes of v2 in 4 KiB blocks that v1 does not hold at the same offset: what any installer that writes the slot
    in place must write at the least, wherever it finds the data."""
    differing = 0
    with open(v1, "rb", buffering=0) as old, open(v2, "rb", buffering=0) as new:
        while True:
            a, b = old.read(4 * MIB), new.read(4 * MIB)
            if not b:
                return differing
            for at in range(0, len(b), FS_BLOCK):
                if a[at : at + FS_BLOCK] != b[at : at + FS_BLOCK]:
                    differing += len(b[at : at + FS_BLOCK])


def publish(releases: Sequence[Release], chunk_size: str, env: dict[str, str], python: str) -> Path:
    """Both releases' indexes and their shared store, made by ab-flasher make-delta (cached per chunk size)."""
    out = CACHE / f"delta-pub-{RECIPE}-{DELTA_RECIPE}-{releases[0].image_bytes >> 20}M-{chunk_size.replace(':', '_')}"
    if all((out / f"{r.name}.caibx").exists() for r in releases):
        return out
    shutil.rmtree(out, ignore_errors=True)
    for release in releases:
        log(f"publishing {release.name} with ab-flasher make-delta --chunk-size {chunk_size}...")
        run(python, "-m", "abflasher.cli", "make-delta", release.raw, out, "--name", release.name,
            "--chunk-size", chunk_size, timeout=3600, env=env, cwd=REPO)
    return out


# --------------------------------------------------------------------------------------------------- the rig


@dataclass
class Disk:
    device: str
    booted: str  # the partition standing for the booted slot (a seed)
    target: str


@contextmanager
def two_slot_disk(capacity: int) -> Iterator[Disk]:
    """A sparse disk image with two partitions of ``capacity`` bytes, attached with direct I/O (as install_bench)."""
    part_mib = -(-capacity // MIB)
    backing = CACHE / f"delta-disk-{os.getpid()}.img"
    with open(backing, "wb") as handle:
        handle.truncate((2 * part_mib + 2) * MIB)
    device = ""
    try:
        run("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", backing,
            input=f"label: dos\nstart=2048, size={part_mib * 2048}, type=83\nsize={part_mib * 2048}, type=83\n")
        device = run("losetup", "--find", "--show", "--direct-io=on", "--sector-size", "512", backing).stdout.strip()
        run("partx", "-a", device)
        deadline = time.monotonic() + 10
        while not (os.path.exists(f"{device}p1") and os.path.exists(f"{device}p2")):
            if time.monotonic() > deadline:
                raise BenchError(f"the partitions of {device} did not appear")
            time.sleep(0.05)
        yield Disk(device, f"{device}p1", f"{device}p2")
    finally:
        if device:
            subprocess.run(["partx", "-d", device], capture_output=True, timeout=60, check=False)
            subprocess.run(["losetup", "-d", device], capture_output=True, timeout=60, check=False)
        backing.unlink(missing_ok=True)


NGINX_CONF = """
user root;
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log;
events {{ worker_connections 256; }}
http {{
    log_format served '$request_uri $body_bytes_sent';
    access_log {log_file} served;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    default_type application/octet-stream;
    sendfile on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def static_server(root: Path, log_file: Path, kind: str) -> Iterator[str]:
    """A static HTTP/1.1 server for ``root`` in its own process (nginx, as a fleet's update server would be, or
    Python's http.server); yields its base URL. Each request is logged as "PATH BYTES" to ``log_file``."""
    if kind == "nginx":
        with tempfile.TemporaryDirectory(prefix="delta-nginx-") as work:
            port = _free_port()
            conf = Path(work) / "nginx.conf"
            conf.write_text(NGINX_CONF.format(work=work, log_file=log_file, port=port, root=root))
            proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", work], stderr=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + 10
                while True:
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
                        break
                    except OSError:
                        if proc.poll() is not None or time.monotonic() > deadline:
                            raise BenchError(f"nginx did not start (see {work}/error.log)") from None
                        time.sleep(0.05)
                yield f"http://127.0.0.1:{port}"
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        return
    proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, str(root), str(log_file)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        port_line = proc.stdout.readline().strip()
        if not port_line.isdigit():
            raise BenchError("the HTTP server did not start")
        yield f"http://127.0.0.1:{port_line}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def served_bytes(log_file: Path) -> tuple[int, int]:
    """(bytes, requests) the server logged so far."""
    if not log_file.exists():
        return 0, 0
    lines = log_file.read_text().split("\n")
    sizes = [int(line.rsplit(" ", 1)[1]) for line in lines if line.strip()]
    return sum(sizes), len(sizes)


def sectors_written(partition: str) -> int:
    return int(Path(f"/sys/class/block/{Path(partition).name}/stat").read_text().split()[6])


def put_image(raw: Path, partition: str) -> None:
    run("blkdiscard", "-f", partition)
    run("dd", f"if={raw}", f"of={partition}", "bs=4M", "oflag=direct", "conv=fsync,sparse", "status=none",
        timeout=1800)


# --------------------------------------------------------------------------------------------------- runs


@dataclass
class Row:
    key: str
    label: str
    wall_s: list[float] = field(default_factory=list)
    downloaded: list[int] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    written_device: list[int] = field(default_factory=list)
    written_engine: list[int] = field(default_factory=list)
    peak_rss_kib: list[int] = field(default_factory=list)

    def median(self, values: list[int] | list[float]) -> float:
        return float(statistics.median(values)) if values else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "wall_s": round(self.median(self.wall_s), 3),
            "wall_s_runs": [round(w, 3) for w in self.wall_s],
            "downloaded_bytes": int(self.median(self.downloaded)),
            "requests": int(self.median(self.requests)),
            "written_device_bytes": int(self.median(self.written_device)),
            "written_engine_bytes": int(self.median(self.written_engine)) if self.written_engine else None,
            "peak_rss_mb": round(max(self.peak_rss_kib) / 1024, 1) if self.peak_rss_kib else None,
        }


def _bench(args: argparse.Namespace) -> int:
    ensure_tools()
    if not shutil.which("casync"):
        raise BenchError("casync is not installed (apt install casync)")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("LC_ALL", "C")
    v1_image = build_image(args.size_mb)
    v1 = Release("v1", v1_image.raw, v1_image.gz, v1_image.image_bytes, v1_image.image_sha256, v1_image.gz_bytes)
    v2, changes = build_v2_updated(v1_image) if args.release == "updated" else build_v2(v1_image)
    pub = publish([v1, v2], args.chunk_size, env, args.python)
    v2_index = pub / f"{v2.name}.caibx"
    log_file = CACHE / f"delta-served-{os.getpid()}.log"
    log_file.unlink(missing_ok=True)
    rows = {key: Row(key, label) for key, label in (
        ("full", "full install of v2 (ab-flasher write .gz)"),
        ("delta_target", "delta, target holds v1"),
        ("delta_booted", "delta, booted slot holds v1"),
        ("casync", "casync extract --seed (anchor)"),
        ("verify", "read-back verify alone (reference)"),
    )}
    try:
        with two_slot_disk(v2.image_bytes) as disk, static_server(pub, log_file, args.server) as base:
            log(f"slots {disk.booted} (booted, holds v1) and {disk.target} (target); v2 {v2.image_bytes >> 20} MiB, "
                f"{v2.gz_bytes / MB:.0f} MB gzipped; server {base}")
            put_image(v1.raw, disk.booted)
            v2_url = f"{base}/{v2.name}.caibx"
            commands = {
                "full": [args.python, "-m", "abflasher.cli", "write", str(v2.gz), disk.target, "--json", "-q",
                         "--sha256", v2.image_sha256],
                "delta_target": [args.python, "-m", "abflasher.cli", "write-delta", v2_url, disk.target,
                                 "--target-index", str(pub / "v1.caibx"), "--sha256", v2.image_sha256, "--json",
                                 "-q"],
                "delta_booted": [args.python, "-m", "abflasher.cli", "write-delta", v2_url, disk.target,
                                 "--seed", f"{disk.booted}={pub / 'v1.caibx'}", "--sha256", v2.image_sha256,
                                 "--json", "-q"],
                "casync": ["casync", "extract", f"--store={base}/default.castr", f"--seed={disk.booted}",
                           v2_url, disk.target],
                # What every install ends with: the slot read back with O_DIRECT and hashed (ReadbackVerifier).
                "verify": [args.python, "-c", VERIFY_SCRIPT, disk.target, str(v2.image_bytes)],
            }
            before_state = {"full": None, "delta_target": v1.raw, "delta_booted": None, "casync": v1.raw,
                            "verify": v2.raw}
            for round_index in range(args.repeat):
                log(f"round {round_index + 1}/{args.repeat}:")
                for key, row in rows.items():
                    holds = before_state[key]
                    if holds is None:
                        run("blkdiscard", "-f", disk.target)
                    else:
                        put_image(holds, disk.target)
                    drop_caches()
                    served_before, requests_before = served_bytes(log_file)
                    sectors_before = sectors_written(disk.target)
                    timed = run_timed(commands[key], cwd=REPO, env=env)
                    served_after, requests_after = served_bytes(log_file)
                    row.wall_s.append(timed.wall_s)
                    row.downloaded.append(served_after - served_before)
                    row.requests.append(requests_after - requests_before)
                    row.written_device.append((sectors_written(disk.target) - sectors_before) * 512)
                    row.peak_rss_kib.append(timed.peak_rss_kib)
                    if key == "verify":
                        if timed.stdout.strip() != v2.image_sha256:
                            raise BenchError(f"the read-back verify of v2 gave {timed.stdout.strip()}")
                    elif key != "casync":
                        result = json.loads(timed.stdout.strip().splitlines()[-1])
                        if not result.get("success") or result.get("image_sha256") != v2.image_sha256:
                            raise BenchError(f"{row.label} did not install v2: {result}")
                        if "written" in result:
                            row.written_engine.append(int(result["written"]))
                    if args.check:
                        drop_caches()
                        held = sha256_of(disk.target, v2.image_bytes)
                        if held != v2.image_sha256:
                            raise BenchError(f"after {row.label} the partition holds {held}, v2 is {v2.image_sha256}")
                    log(f"  {row.label:44} {timed.wall_s:7.2f} s  downloaded {row.downloaded[-1] / MB:7.1f} MB  "
                        f"written {row.written_device[-1] / MB:7.1f} MB  {timed.peak_rss_kib / 1024:6.1f} MiB")
    finally:
        log_file.unlink(missing_ok=True)

    full, delta = rows["full"], rows["delta_target"]
    ratios = {
        "downloaded_vs_v2_gz": delta.median(delta.downloaded) / v2.gz_bytes,
        "written_vs_image": delta.median(delta.written_device) / v2.image_bytes,
        "wall_vs_full_install": delta.median(delta.wall_s) / full.median(full.wall_s),
    }
    targets = {
        "downloaded_vs_v2_gz": {"value": round(ratios["downloaded_vs_v2_gz"], 3), "limit": TARGET_DOWNLOAD_VS_GZ},
        "written_vs_image": {"value": round(ratios["written_vs_image"], 3), "limit": TARGET_WRITTEN_VS_IMAGE},
        "wall_vs_full_install": {"value": round(ratios["wall_vs_full_install"], 3), "limit": TARGET_WALL_VS_FULL},
    }
    for outcome in targets.values():
        outcome["pass"] = outcome["value"] <= outcome["limit"]

    print()
    header = f"{'run':46} {'wall s':>8} {'/ full':>7} {'downloaded MB':>14} {'/ v2.gz':>8} {'written MB':>11} " \
             f"{'/ image':>8} {'requests':>9} {'RSS MiB':>8}"
    print(header)
    print("-" * len(header))
    for row in rows.values():
        wall = row.median(row.wall_s)
        down = row.median(row.downloaded)
        written = row.median(row.written_device)
        print(f"{row.label:46} {wall:8.2f} {wall / full.median(full.wall_s):7.3f} {down / MB:14.1f} "
              f"{down / v2.gz_bytes:8.3f} {written / MB:11.1f} {written / v2.image_bytes:8.3f} "
              f"{int(row.median(row.requests)):9d} {max(row.peak_rss_kib) / 1024:8.1f}")
    print()
    for name, outcome in targets.items():
        print(f"target {name:22} {'PASS' if outcome['pass'] else 'MISS'}: {outcome['value']} <= {outcome['limit']}")

    index_bytes = v2_index.stat().st_size
    least_written = blocks_that_differ(v1.raw, v2.raw)
    verify_row = rows["verify"]
    print(f"\nv2's 4 KiB blocks that v1 does not hold at the same offset: {least_written / MB:.1f} MB, "
          f"{least_written / v2.image_bytes:.3f} of the image (the least any in-place install writes)")
    print(f"read-back verify alone: {verify_row.median(verify_row.wall_s) / full.median(full.wall_s):.3f} of the "
          "full install's wall time (the least any install that reads the slot back takes)")
    report: dict[str, Any] = {
        "bench": "delta",
        "recipe": f"{RECIPE}-{DELTA_RECIPE}",
        "release": args.release,
        **{key: round(value, 3) for key, value in ratios.items()},
        "image_mb": args.size_mb,
        "image_bytes": v2.image_bytes,
        "v2_gz_bytes": v2.gz_bytes,
        "v2_index_bytes": index_bytes,
        "chunk_size": args.chunk_size,
        "store_bytes": sum(p.stat().st_size for p in (pub / "default.castr").rglob("*.cacnk")),
        "changes": changes,
        "least_written_bytes": least_written,
        "least_written_vs_image": round(least_written / v2.image_bytes, 3),
        "verify_alone_vs_full_install": round(verify_row.median(verify_row.wall_s) / full.median(full.wall_s), 3),
        "delta_vs_casync_wall": round(delta.median(delta.wall_s) / rows["casync"].median(rows["casync"].wall_s), 3),
        "runs": {key: row.summary() for key, row in rows.items()},
        "targets": targets,
        "all_targets_pass": all(t["pass"] for t in targets.values()),
        "setup": {
            "repeat": args.repeat,
            "target_prep": "v1 written (dd, direct) or blkdiscard, then drop_caches, before every run",
            "server": f"{args.server}, HTTP/1.1 keep-alive, own process, 127.0.0.1",
            "written": "sectors the kernel wrote to the target partition (/sys/class/block/*/stat) during the run",
            "content_checked": args.check,
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": args.python,
            "index": str(v2_index),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "fs_block": FS_BLOCK,
            "v1_sha256": v1.image_sha256,
            "v2_sha256_check": hashlib.sha256(v2.image_sha256.encode()).hexdigest()[:8],
        },
    }
    print(json.dumps(report, sort_keys=False))
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_image_size(parser)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per row, interleaved (default 3)")
    parser.add_argument("--chunk-size", default=DEFAULT_CHUNK_SIZE, metavar="MIN:AVG:MAX",
                        help=f"casync chunk sizes the releases are published with (default {DEFAULT_CHUNK_SIZE}, "
                        "ab-flasher make-delta's)")
    parser.add_argument("--release", choices=("rebuilt", "updated"), default="rebuilt",
                        help="how v2 is made from v1's tree: rebuilt with mkfs.ext4 -d (issue 13's recipe: blocks "
                        "after a changed file move) or updated (v1's file system mounted and changed in place: "
                        "unchanged files stay where they are)")
    parser.add_argument("--server", choices=("nginx", "python"), default="nginx" if shutil.which("nginx") else "python",
                        help="the local static HTTP server: nginx (the default when installed: apt install "
                        "nginx-light) or Python's http.server, whose CPU competes with the install on a small machine")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip hashing the partition after each run")
    add_python(parser, "that runs ab-flasher")
    return parse(parser, argv, check=True)


def main(argv: Sequence[str] | None = None) -> int:
    return run_as_root(parse_args(argv), _bench, name="delta_bench",
                       not_root="delta_bench: needs root (loop devices, dropping caches): run it with sudo")


if __name__ == "__main__":
    sys.exit(main())
