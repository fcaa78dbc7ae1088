#!/usr/bin/env python3
"""Install benchmark: ab-flasher (with read-back verify) against `gzip -dc | dd` and `bmaptool copy --bmap`.

Builds (once, cached in bench/.cache/) a realistic ext4 image of --size-mb MiB from a deterministic sample of the files
under /usr plus some random data, compresses it with gzip -6 and makes its bmap. Then, on one loop device, times each
tool writing that image into the same partition, with the partition discarded and the page cache dropped before every
run, and checks afterwards (outside the timing) that the partition holds the image. See bench/README.md.

Needs root. The last line printed is one JSON object, so the numbers can be tracked over time. Exits 0 whether or not
the targets were met (it is a measurement); non-zero only when a tool or a check failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import installed_deb
from common_cli import BenchError, add_image_size, add_python, parse, run_as_root

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / ".cache"
# Bump when the image recipe changes, so images cached by an older recipe are rebuilt rather than reused.
RECIPE = "v1"
MIB = 1 << 20
MB = 1_000_000

# A root file system a bit over half full, as a fresh OS image with room for updates: 60% of its blocks in use, of
# which random data (standing for already-compressed payloads) is 5% of the whole size and files from /usr the rest.
FS_USED_SHARE = 0.60
RANDOM_SHARE = 0.05
FS_BLOCK = 4096
MAX_FILE_BYTES = 64 * MIB
RANDOM_BLOB_BYTES = 4 * MIB
FS_UUID = "5eed0000-ab00-4f1a-8000-000000000001"

TARGET_RATIO_VS_GZIP_DD = 0.5
TARGET_RATIO_VS_BMAPTOOL = 0.8
# ab-flasher as installed from its .deb (Debian packages only, igzip from the recommended isal package).
TARGET_DEB_RATIO_VS_GZIP_DD = 0.35
TARGET_DEB_RATIO_VS_BMAPTOOL = 0.4
TARGET_PEAK_RSS_MB = 64.0
RSS_FLAT_FRACTION = 0.10
RSS_FLAT_MB = 4.0

RUN_TIMEOUT = 1800.0
TIME = "/usr/bin/time"
HASH_CHUNK = 4 * MIB


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(*cmd: str | os.PathLike[str], timeout: float = 600.0, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run an untimed helper command; raise BenchError with its stderr when it fails."""
    argv = [os.fspath(c) for c in cmd]
    try:
        return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.CalledProcessError as exc:
        raise BenchError(f"{' '.join(argv)} failed ({exc.returncode}): {exc.stderr.strip()}") from exc
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{' '.join(argv)} did not finish within {timeout:.0f} s") from exc


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def sha256_of(path: Path | str, length: int | None = None) -> str:
    """sha256 of the first ``length`` bytes of ``path`` (all of it when None)."""
    digest = hashlib.sha256()
    remaining = length
    with open(path, "rb", buffering=0) as handle:
        while remaining is None or remaining > 0:
            want = HASH_CHUNK if remaining is None else min(HASH_CHUNK, remaining)
            chunk = handle.read(want)
            if not chunk:
                break
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    if remaining:
        raise BenchError(f"{path} ended {remaining} bytes short of {length}")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------- the image


@dataclass(frozen=True)
class BenchImage:
    size_mb: int
    raw: Path
    gz: Path
    bmap: Path
    image_bytes: int
    image_sha256: str
    gz_bytes: int
    mapped_bytes: int
    usr_file_bytes: int
    usr_file_count: int
    random_bytes: int
    fs_used_fraction: float

    def describe(self) -> dict[str, Any]:
        described = asdict(self)
        for key in ("raw", "gz", "bmap"):
            described[key] = str(described[key])
        return described


def _usr_files() -> list[tuple[Path, int]]:
    """Every regular file under /usr (not symlinks), with its size, in a fixed pseudo-random order.

    Ordering by a hash of the path gives a representative sample of libraries, executables, Python modules, locale
    catalogues, gzipped docs and icons whatever the budget, and the same sample on every run of the same machine.
    """
    files: list[tuple[Path, int]] = []
    for root, dirs, names in os.walk("/usr"):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            try:
                st = path.lstat()
            except OSError:
                continue
            if path.is_symlink() or not path.is_file() or not 0 < st.st_size <= MAX_FILE_BYTES:
                continue
            files.append((path, st.st_size))
    files.sort(key=lambda item: hashlib.sha1(os.fsencode(item[0])).digest())
    return files


def _blocks(size: int) -> int:
    return -(-size // FS_BLOCK) * FS_BLOCK


def _fill_tree(tree: Path, size_bytes: int, empty_used: int) -> tuple[int, int, int]:
    """Populate ``tree`` so the file system it becomes is FS_USED_SHARE full, given that an empty one already uses
    ``empty_used`` bytes (journal, inode tables, bitmaps); returns (usr bytes, usr files, random bytes)."""
    for name in ("bin", "boot", "dev", "etc", "home", "lib", "mnt", "opt", "proc", "root", "run", "sbin", "srv", "sys",
                 "tmp", "var/cache", "var/lib", "var/log"):
        (tree / name).mkdir(parents=True, exist_ok=True)
    (tree / ".ab_version").write_text(f"bench-{RECIPE}\n")
    (tree / "etc" / "hostname").write_text("abbench\n")

    random_budget = int(size_bytes * RANDOM_SHARE)
    usr_budget = int(size_bytes * FS_USED_SHARE) - empty_used - random_budget
    usr_bytes = usr_count = usr_blocks = 0
    for source, size in _usr_files():
        if usr_blocks + _blocks(size) > usr_budget:
            continue
        dest = tree / source.relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(source, dest)
        except OSError:
            continue
        dest.chmod(source.stat().st_mode & 0o7777)
        usr_bytes += size
        usr_blocks += _blocks(size)
        usr_count += 1
        if usr_budget - usr_blocks < FS_BLOCK:
            break

    # Already-compressed payloads (initramfs, firmware blobs, package caches) do not compress again.
    rng = random.Random(f"ab-flasher-bench-{RECIPE}")
    blobs = tree / "var" / "cache" / "blobs"
    blobs.mkdir(parents=True)
    random_bytes = 0
    index = 0
    while random_bytes < random_budget:
        n = min(RANDOM_BLOB_BYTES, random_budget - random_bytes)
        (blobs / f"blob-{index:04d}.bin").write_bytes(rng.randbytes(n))
        random_bytes += n
        index += 1
    return usr_bytes, usr_count, random_bytes


def _mkfs(image: Path, size_bytes: int, tree: Path | None) -> None:
    with open(image, "wb") as handle:
        handle.truncate(size_bytes)
    # Fixed UUID and hash seed keep the image the same from one build to the next; -b 4096 -T default so a small
    # --quick image has the block size of a real root file system rather than mke2fs's "small" profile.
    populate = ["-d", str(tree)] if tree is not None else []
    run("mkfs.ext4", "-F", "-q", "-b", str(FS_BLOCK), "-T", "default", "-L", "abbench", "-U", FS_UUID,
        "-E", f"hash_seed={FS_UUID},root_owner=0:0", *populate, image, timeout=1800)


def _fs_used(raw: Path) -> tuple[int, int]:
    """(used bytes, total bytes) of the ext4 file system in ``raw``."""
    info = run("dumpe2fs", "-h", raw).stdout
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    total = int(fields["Block count"].strip())
    free = int(fields["Free blocks"].strip())
    return (total - free) * FS_BLOCK, total * FS_BLOCK


def _mapped_bytes(bmap: Path) -> int:
    root = ElementTree.parse(bmap).getroot()
    return int(root.findtext("BlockSize", "0")) * int(root.findtext("MappedBlocksCount", "0"))


def build_image(size_mb: int) -> BenchImage:
    """The cached image of ``size_mb`` MiB, built first if the cache does not hold it."""
    CACHE.mkdir(parents=True, exist_ok=True)
    stem = CACHE / f"rootfs-{RECIPE}-{size_mb}M"
    manifest = stem.with_suffix(".json")
    if manifest.exists():
        data = json.loads(manifest.read_text())
        image = BenchImage(**{**data, "raw": Path(data["raw"]), "gz": Path(data["gz"]), "bmap": Path(data["bmap"])})
        if image.raw.exists() and image.gz.exists() and image.bmap.exists():
            return image

    log(f"building the {size_mb} MiB benchmark image in {CACHE} (cached for later runs)...")
    raw = Path(f"{stem}.img")
    gz = Path(f"{stem}.img.gz")
    bmap = Path(f"{stem}.bmap")
    size_bytes = size_mb * MIB
    tmp_raw = raw.with_suffix(".img.tmp")
    _mkfs(tmp_raw, size_bytes, None)
    empty_used, _ = _fs_used(tmp_raw)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="tree-") as tree_dir:
        tree = Path(tree_dir)
        usr_bytes, usr_count, random_bytes = _fill_tree(tree, size_bytes, empty_used)
        _mkfs(tmp_raw, size_bytes, tree)
    used, total = _fs_used(tmp_raw)
    tmp_raw.rename(raw)

    log("compressing it with gzip -6...")
    tmp_gz = gz.with_suffix(".gz.tmp")
    with open(tmp_gz, "wb") as out:
        try:
            subprocess.run(["gzip", "-6", "-n", "-c", str(raw)], stdout=out, check=True, timeout=3600)
        except subprocess.CalledProcessError as exc:
            raise BenchError(f"gzip -6 of {raw} failed ({exc.returncode})") from exc
    tmp_gz.rename(gz)

    log("making its bmap...")
    tmp_bmap = bmap.with_suffix(".bmap.tmp")
    run("bmaptool", "-q", "create", "-o", tmp_bmap, raw, timeout=1800)
    tmp_bmap.rename(bmap)

    image = BenchImage(
        size_mb=size_mb,
        raw=raw,
        gz=gz,
        bmap=bmap,
        image_bytes=raw.stat().st_size,
        image_sha256=sha256_of(raw),
        gz_bytes=gz.stat().st_size,
        mapped_bytes=_mapped_bytes(bmap),
        usr_file_bytes=usr_bytes,
        usr_file_count=usr_count,
        random_bytes=random_bytes,
        fs_used_fraction=round(used / total, 4),
    )
    manifest.write_text(json.dumps(image.describe(), indent=2) + "\n")
    return image


# --------------------------------------------------------------------------------------------------- the target


@dataclass
class LoopTarget:
    backing: Path
    device: str
    partition: str
    direct_io: bool
    capacity: int


@contextmanager
def loop_target(capacity: int) -> Iterator[LoopTarget]:
    """A sparse disk image on the same disk as the cache, one partition of at least ``capacity`` bytes, attached as a
    loop device with direct I/O to its backing file (so reads and writes reach the disk, not the host page cache)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    part_mib = -(-capacity // MIB)
    backing = CACHE / f"target-disk-{os.getpid()}.img"
    with open(backing, "wb") as handle:
        handle.truncate((part_mib + 2) * MIB)
    device = ""
    try:
        run("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", backing,
            input=f"label: dos\nstart=2048, size={part_mib * 2048}, type=83\n")
        device = run("losetup", "--find", "--show", "--direct-io=on", "--sector-size", "512", backing).stdout.strip()
        dio = Path(f"/sys/block/{Path(device).name}/loop/dio")
        direct_io = dio.exists() and dio.read_text().strip() == "1"
        run("partx", "-a", device)
        partition = f"{device}p1"
        deadline = time.monotonic() + 10
        while not os.path.exists(partition):
            if time.monotonic() > deadline:
                raise BenchError(f"{partition} did not appear after partx -a {device}")
            time.sleep(0.05)
        yield LoopTarget(backing, device, partition, direct_io, part_mib * MIB)
    finally:
        if device:
            subprocess.run(["partx", "-d", device], capture_output=True, timeout=60, check=False)
            subprocess.run(["losetup", "-d", device], capture_output=True, timeout=60, check=False)
        backing.unlink(missing_ok=True)


def prepare_target(target: LoopTarget) -> None:
    """The same starting point for every tool: the partition discarded (reads as zeros, like a trimmed card) and no
    page cache anywhere."""
    run("blkdiscard", "-f", target.partition)
    drop_caches()


# --------------------------------------------------------------------------------------------------- timed runs


@dataclass
class Timed:
    wall_s: float
    peak_rss_kib: int
    stdout: str
    stderr: str


def run_timed(cmd: Sequence[str], *, cwd: Path, env: dict[str, str]) -> Timed:
    """Run ``cmd``, timing it from start to exit, with its peak RSS as measured by GNU time.

    Not this process's wait4 rusage: a child's ru_maxrss starts at the high-water mark of the process it was forked
    from (the kernel carries it over exec), so anything started from this Python process would report at least this
    process's size. /usr/bin/time is tiny and reports the ru_maxrss it gets from wait4 for its own child, which for
    `sh -c 'a | b'` is the largest of sh, a and b.
    """
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile("r", prefix="rusage-") as rusage,
    ):
        started = time.monotonic()
        proc = subprocess.Popen([TIME, "-f", "%M", "-o", rusage.name, *cmd], stdout=out, stderr=err, cwd=cwd, env=env)
        try:
            returncode = proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise BenchError(f"{' '.join(cmd)} did not finish within {RUN_TIMEOUT:.0f} s") from None
        wall = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
        # On failure GNU time writes "Command exited with non-zero status N" before the formatted line.
        lines = rusage.read().split()
    if returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {returncode}: {stderr.strip()[-2000:]}")
    if not lines or not lines[-1].isdigit():
        raise BenchError(f"{TIME} reported no peak RSS for {' '.join(cmd)}")
    return Timed(wall, int(lines[-1]), stdout, stderr)


@dataclass(frozen=True)
class Tool:
    key: str
    label: str
    inflater: str | None = None
    writes: bool = True


GZIP_DD = Tool("gzip_dd", "gzip -dc | dd bs=4M conv=fsync")
BMAPTOOL = Tool("bmaptool", "bmaptool copy --bmap")
ABF_ZLIB = Tool("abflasher_zlib", "ab-flasher (zlib)", "zlib")
ABF_FAST = Tool("abflasher_fast", "ab-flasher (auto)", "auto")
# A reference, not a tool: the same interpreter inflating the image with stdlib zlib and discarding the output. No
# pipeline that inflates with stdlib zlib can beat it, so it shows how much of the zlib row is the inflate itself.
INFLATE_ONLY = Tool("zlib_inflate_only", "zlib inflate only (no write)", writes=False)
INFLATE_ONLY_SCRIPT = """
import sys, zlib
inflater = zlib.decompressobj(wbits=31)
with open(sys.argv[1], "rb", buffering=0) as source:
    while chunk := source.read(256 << 10):
        while chunk:
            inflater.decompress(chunk, 1 << 20)
            chunk = inflater.unconsumed_tail
assert inflater.eof
"""
# ab-flasher as `apt install ab-flasher` (with Recommends) has it: see installed_deb.py.
ABF_DEB = Tool("abflasher_deb", "ab-flasher (.deb, Debian only)", "auto")
# A reference: igzip alone, its output discarded. No install that inflates with igzip can be faster.
IGZIP_ONLY = Tool("igzip_inflate_only", "igzip -dc > /dev/null (no write)", writes=False)
# Only with --extra-inflaters: each fast inflater by name, to see whether "auto" picks the faster one here.
ABF_EXTRA = (
    Tool("abflasher_isal", "ab-flasher (isal)", "isal"),
    Tool("abflasher_zlib_ng", "ab-flasher (zlib-ng)", "zlib-ng"),
)


@dataclass
class Measurement:
    tool: str
    label: str
    image_mb: int
    wall_s: list[float] = field(default_factory=list)
    peak_rss_kib: list[int] = field(default_factory=list)
    engine_s: list[float] = field(default_factory=list)
    inflater: str | None = None

    @property
    def wall_median(self) -> float:
        return statistics.median(self.wall_s)

    @property
    def peak_rss_mb(self) -> float:
        return max(self.peak_rss_kib) / 1024

    def mb_per_s(self, image_bytes: int) -> float:
        return image_bytes / self.wall_median / MB

    def summary(self, image_bytes: int) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "label": self.label,
            "image_mb": self.image_mb,
            "wall_s": round(self.wall_median, 3),
            "wall_s_runs": [round(w, 3) for w in self.wall_s],
            "mb_per_s": round(self.mb_per_s(image_bytes), 1),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "peak_rss_kib_runs": self.peak_rss_kib,
        }
        if self.engine_s:
            summary["engine_s_runs"] = [round(s, 3) for s in self.engine_s]
        if self.inflater is not None:
            summary["inflater"] = self.inflater
        return summary


class Runner:
    def __init__(self, target: LoopTarget, python: str, check: bool, deb: installed_deb.InstalledDeb) -> None:
        self.target = target
        self.python = python
        self.check = check
        self.deb = deb
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), self.env.get("PYTHONPATH", "")) if p)
        self.env.setdefault("LC_ALL", "C")

    def command(self, tool: Tool, image: BenchImage) -> list[str]:
        part = self.target.partition
        if tool is GZIP_DD:
            return ["sh", "-c", 'gzip -dc "$1" | dd of="$2" bs=4M conv=fsync status=none', "sh", str(image.gz), part]
        if tool is BMAPTOOL:
            return ["bmaptool", "-q", "copy", "--bmap", str(image.bmap), str(image.gz), part]
        if tool is INFLATE_ONLY:
            return [self.python, "-c", INFLATE_ONLY_SCRIPT, str(image.gz)]
        if tool is IGZIP_ONLY:
            return ["sh", "-c", 'igzip -dc "$1" > /dev/null', "sh", str(image.gz)]
        if tool is ABF_DEB:
            return self.deb.command("write", str(image.gz), part, "--json", "-q")
        assert tool.inflater is not None
        return [self.python, "-m", "abflasher.cli", "write", str(image.gz), part,
                "--inflater", tool.inflater, "--json", "-q"]

    def measure(self, tool: Tool, image: BenchImage, into: Measurement) -> None:
        prepare_target(self.target)
        timed = run_timed(self.command(tool, image), cwd=REPO, env=self.env)
        if tool.inflater is not None:
            result = json.loads(timed.stdout.strip().splitlines()[-1])
            if not (result.get("success") and result.get("verified")):
                raise BenchError(f"{tool.label} did not report a verified install: {result}")
            if result.get("image_sha256") != image.image_sha256:
                raise BenchError(f"{tool.label} wrote {result.get('image_sha256')}, the image is {image.image_sha256}")
            into.inflater = result.get("inflater")
            into.engine_s.append(float(result.get("seconds", 0.0)))
        if self.check and tool.writes:
            drop_caches()
            held = sha256_of(self.target.partition, image.image_bytes)
            if held != image.image_sha256:
                raise BenchError(f"after {tool.label} the partition holds {held}, the image is {image.image_sha256}")
        into.wall_s.append(timed.wall_s)
        into.peak_rss_kib.append(timed.peak_rss_kib)
        log(f"  {tool.label:32} {image.size_mb:5d} MiB  {timed.wall_s:7.2f} s  {timed.peak_rss_kib / 1024:6.1f} MiB")


# --------------------------------------------------------------------------------------------------- report


def target_result(value: float | bool, limit: float | bool, *, at_most: bool = True) -> dict[str, Any]:
    if isinstance(limit, bool):
        return {"value": value, "limit": limit, "pass": value is limit}
    passed = float(value) <= limit if at_most else float(value) >= limit
    return {"value": value, "limit": limit, "pass": passed}


def print_table(measurements: Sequence[Measurement], image_bytes_by_mb: dict[int, int], reference: dict[str, float],
                image_mb: int) -> None:
    header = (f"{'tool':34} {'image':>7} {'wall s':>8} {'MB/s':>8} {'peak RSS MiB':>13} {'/ gzip|dd':>10} "
              f"{'/ bmaptool':>11}")
    print(header)
    print("-" * len(header))
    for m in measurements:
        same_image = m.image_mb == image_mb
        vs_dd = f"{m.wall_median / reference['gzip_dd']:.3f}" if same_image else "-"
        vs_bmap = f"{m.wall_median / reference['bmaptool']:.3f}" if same_image else "-"
        label = m.label if m.inflater is None or m.inflater in m.label else f"{m.label} [{m.inflater}]"
        print(f"{label:34} {m.image_mb:5d}Mi {m.wall_median:8.2f} {m.mb_per_s(image_bytes_by_mb[m.image_mb]):8.1f} "
              f"{m.peak_rss_mb:13.1f} {vs_dd:>10} {vs_bmap:>11}")


def ensure_tools() -> None:
    """bmaptool and GNU time come from Debian packages that a minimal system may lack."""
    missing = [package for program, package in (("bmaptool", "bmap-tools"), (TIME, "time"))
               if not shutil.which(program)]
    if not missing:
        return
    log(f"installing missing Debian packages: {' '.join(missing)}...")
    result = subprocess.run(["apt-get", "install", "-y", *missing], capture_output=True, text=True, timeout=900,
                            check=False)
    if result.returncode != 0:
        run("apt-get", "update", timeout=900)
        run("apt-get", "install", "-y", *missing, timeout=900)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_image_size(parser)
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed runs per tool, interleaved; the median wall time is reported (default 3)")
    parser.add_argument("--extra-inflaters", action="store_true",
                        help="also time ab-flasher with --inflater isal and --inflater zlib-ng (not used for targets)")
    parser.add_argument("--rss-double", action="store_true",
                        help="also run ab-flasher on a 2x image and check that its peak RSS stays flat")
    parser.add_argument("--no-check", action="store_true",
                        help="skip hashing the partition after each run (ab-flasher still verifies itself)")
    parser.add_argument("--deb", type=Path, default=None,
                        help="the release package to unpack for the .deb row (default: build it with make deb)")
    add_python(parser, "that runs ab-flasher")
    return parse(parser, argv, check=True)


def main(argv: Sequence[str] | None = None) -> int:
    return run_as_root(parse_args(argv), _bench, name="install_bench",
                       not_root="install_bench: needs root (loop devices, dropping caches): run it with sudo")


def _bench(args: argparse.Namespace) -> int:
    ensure_tools()
    image = build_image(args.size_mb)
    double = build_image(args.size_mb * 2) if args.rss_double else None
    images_bytes = {image.size_mb: image.image_bytes}
    if double is not None:
        images_bytes[double.size_mb] = double.image_bytes
    bmap_decompressor = "pigz" if shutil.which("pigz") else "gzip"

    try:
        deb = installed_deb.prepare(REPO, CACHE, args.deb)
    except installed_deb.DebError as exc:
        raise BenchError(str(exc)) from exc
    if deb.igzip is None:
        log("igzip is not installed (Debian package isal): the .deb row inflates with stdlib zlib")

    main_tools = (GZIP_DD, BMAPTOOL, ABF_ZLIB, ABF_FAST, ABF_DEB)
    references = (INFLATE_ONLY, IGZIP_ONLY) if deb.igzip else (INFLATE_ONLY,)
    timed_tools = main_tools + references + (ABF_EXTRA if args.extra_inflaters else ())
    results = {tool.key: Measurement(tool.key, tool.label, image.size_mb) for tool in timed_tools}
    doubled_tools = (ABF_ZLIB, ABF_FAST, ABF_DEB)
    doubled = {tool.key: Measurement(tool.key, tool.label, args.size_mb * 2) for tool in doubled_tools}
    with loop_target(max(images_bytes.values())) as target:
        direct = "on" if target.direct_io else "off"
        log(f"target {target.partition} ({target.capacity >> 20} MiB, loop direct I/O {direct}), "
            f"image {image.image_bytes >> 20} MiB, {image.gz_bytes / MB:.0f} MB gzipped, "
            f"{image.mapped_bytes >> 20} MiB mapped")
        runner = Runner(target, args.python, check=not args.no_check, deb=deb)
        for round_index in range(args.repeat):
            log(f"round {round_index + 1}/{args.repeat}:")
            for tool in timed_tools:
                runner.measure(tool, image, results[tool.key])
            if double is not None:
                for tool in doubled_tools:
                    runner.measure(tool, double, doubled[tool.key])

    gzip_dd, bmaptool, abf_zlib, abf_fast, abf_deb = (results[t.key] for t in main_tools)
    reference = {"gzip_dd": gzip_dd.wall_median, "bmaptool": bmaptool.wall_median}
    ratio_vs_gzip_dd = abf_zlib.wall_median / gzip_dd.wall_median
    ratio_vs_bmaptool = abf_fast.wall_median / bmaptool.wall_median
    deb_ratio_vs_gzip_dd = abf_deb.wall_median / gzip_dd.wall_median
    deb_ratio_vs_bmaptool = abf_deb.wall_median / bmaptool.wall_median
    peak_rss_mb = max(abf_zlib.peak_rss_mb, abf_fast.peak_rss_mb, abf_deb.peak_rss_mb)

    print()
    print_table([*results.values(), *(doubled.values() if double else [])], images_bytes, reference, image.size_mb)
    print()

    targets: dict[str, Any] = {
        "ratio_vs_gzip_dd": target_result(round(ratio_vs_gzip_dd, 3), TARGET_RATIO_VS_GZIP_DD),
        "ratio_vs_bmaptool": target_result(round(ratio_vs_bmaptool, 3), TARGET_RATIO_VS_BMAPTOOL),
        "peak_rss_mb": target_result(round(peak_rss_mb, 1), TARGET_PEAK_RSS_MB),
        "deb_ratio_vs_gzip_dd": target_result(round(deb_ratio_vs_gzip_dd, 3), TARGET_DEB_RATIO_VS_GZIP_DD),
        "deb_ratio_vs_bmaptool": target_result(round(deb_ratio_vs_bmaptool, 3), TARGET_DEB_RATIO_VS_BMAPTOOL),
        "deb_peak_rss_mb": target_result(round(abf_deb.peak_rss_mb, 1), TARGET_PEAK_RSS_MB),
    }
    rss_double: dict[str, Any] | None = None
    if double is not None:
        peak_2x = max(m.peak_rss_mb for m in doubled.values())
        growth = peak_2x - peak_rss_mb
        rss_flat = growth <= max(RSS_FLAT_FRACTION * peak_rss_mb, RSS_FLAT_MB)
        rss_double = {
            "image_mb": double.size_mb,
            "image_bytes": double.image_bytes,
            "peak_rss_mb_1x": round(peak_rss_mb, 1),
            "peak_rss_mb_2x": round(peak_2x, 1),
            "growth_mb": round(growth, 1),
            "rss_flat": rss_flat,
            "runs": {key: m.summary(double.image_bytes) for key, m in doubled.items()},
        }
        targets["rss_flat"] = target_result(rss_flat, True)
        targets["peak_rss_mb_2x"] = target_result(round(peak_2x, 1), TARGET_PEAK_RSS_MB)

    for name, outcome in targets.items():
        verdict = "PASS" if outcome["pass"] else "MISS"
        relation = "" if isinstance(outcome["limit"], bool) else " <= "
        print(f"target {name:18} {verdict}: {outcome['value']}{relation}{'' if relation == '' else outcome['limit']}")

    report: dict[str, Any] = {
        "bench": "install",
        "recipe": RECIPE,
        "ratio_vs_gzip_dd": round(ratio_vs_gzip_dd, 3),
        "ratio_vs_bmaptool": round(ratio_vs_bmaptool, 3),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "mb_per_s": round(abf_fast.mb_per_s(image.image_bytes), 1),
        "mb_per_s_zlib": round(abf_zlib.mb_per_s(image.image_bytes), 1),
        "zlib_inflate_only_ratio_vs_gzip_dd": round(results[INFLATE_ONLY.key].wall_median / gzip_dd.wall_median, 3),
        "deb_ratio_vs_gzip_dd": round(deb_ratio_vs_gzip_dd, 3),
        "deb_ratio_vs_bmaptool": round(deb_ratio_vs_bmaptool, 3),
        "deb_mb_per_s": round(abf_deb.mb_per_s(image.image_bytes), 1),
        "inflater_deb": abf_deb.inflater,
        "igzip_inflate_only_ratio_vs_gzip_dd": (
            round(results[IGZIP_ONLY.key].wall_median / gzip_dd.wall_median, 3) if deb.igzip else None
        ),
        "deb": deb.describe(),
        "inflater_slow": abf_zlib.inflater,
        "inflater_fast": abf_fast.inflater,
        "image_mb": image.size_mb,
        "image_bytes": image.image_bytes,
        "image": image.describe(),
        "runs": {key: m.summary(image.image_bytes) for key, m in results.items()},
        "rss_double": rss_double,
        "targets": targets,
        "all_targets_pass": all(t["pass"] for t in targets.values()),
        "setup": {
            "repeat": args.repeat,
            "target_prep": "blkdiscard + drop_caches before every run",
            "loop_direct_io": target.direct_io,
            "content_checked": not args.no_check,
            "bmaptool_decompressor": bmap_decompressor,
            "mb": "10^6 bytes for throughput; MiB for RSS",
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": args.python,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }
    print(json.dumps(report, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
