#!/usr/bin/env python3
"""Upload benchmark: an image uploaded to the upload page over loopback (``curl -T``, the page streaming it into the
service's UpdateFromFd) against ``abflasherctl update --file`` of the same image into the same slot of the same loop
device; and the memory and storage writes of both processes during the upload.

- **throughput**: wall time of each client from its start until it returns (both return when the service's job has
  written, verified and configured the slot), ``--repeat`` interleaved rounds, medians compared:
  ``ratio = ctl_median_s / upload_median_s``. Target: ≥ 0.8 (the page costs at most a quarter more time).
- **peak RSS** of the page (ab-flasher-web) and of the service (ab-flasherd): VmHWM, and the largest VmRSS sampled
  every 50 ms, over all runs. Target: each ≤ 64 MB (MiB, read strictly).
- **storage writes** (``write_bytes`` of /proc/PID/io, bytes a process dirtied): the page's must stay ~0 (it has no
  file to write: the upload goes through a pipe), the service's at most the image's size plus 16 MiB (state file,
  the new root's fstab and boot files) per upload: nothing grows anywhere but the target partition.

The image is ctl_bench's (bench/install_bench.py's cached ext4 of ``--size-mb`` MiB with a /.ab_version, gzip -6);
the device tests/support/simpi.py's simulated Pi; the bus a private dbus-daemon with python-dbusmock's polkitd
template granting the actions (the benchmark measures streaming, not polkit); the page runs with a password, which
curl sends (the page runs as root here: the bus is permissive). Needs root. The last line printed is one JSON
object; exits 0 whether or not the targets were met, non-zero when a step failed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

# The sibling module: `python bench/upload_bench.py` has bench/ on its path.
from common_cli import add_image_size, add_python, parse, run_as_root

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.bus import DBusDaemon  # noqa: E402
from tests.support.polkit import DbusmockPolkit  # noqa: E402
from tests.support.serviceprocess import ServiceProcess, config_file_text, rss_kib  # noqa: E402
from tests.support.simpi import SimulatedPi  # noqa: E402
from tests.support.webrig import PASSWORD, WebProcess  # noqa: E402

MIB = 1 << 20
TARGET_RATIO = 0.8
TARGET_PEAK_RSS_MB = 64.0
PAGE_WRITE_LIMIT = 1 * MIB
SERVICE_EXTRA_WRITE_LIMIT = 16 * MIB
RUN_TIMEOUT = 3600.0


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load bench/{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ctl_bench = _load("ctl_bench")
install_bench = ctl_bench.install_bench
log = install_bench.log
BenchError = install_bench.BenchError
CACHE: Path = install_bench.CACHE
VERSION: str = ctl_bench.VERSION


def storage_writes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise BenchError(f"no write_bytes for {pid}")


def time_ctl(python: str, bus: DBusDaemon, image: Path) -> float:
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address)
    started = time.perf_counter()
    done = subprocess.run([python, "-m", "abflasher.ctl", "--json", "update", "--file", str(image), VERSION],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    seconds = time.perf_counter() - started
    events = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    completed = next((e for e in events if e.get("event") == "completed"), None)
    if done.returncode != 0 or completed is None or not completed.get("success"):
        raise BenchError(f"abflasherctl update --file failed ({done.returncode}): {done.stderr.strip() or completed}")
    return seconds


def time_upload(page: WebProcess, image: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(["curl", "-sS", "-u", f":{PASSWORD}", "-T", str(image), page.url("/api/upload"), "-w",
                           "\n%{http_code}"],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    seconds = time.perf_counter() - started
    if not done.stdout.endswith("\n200"):
        raise BenchError(f"the upload failed: {done.stdout.strip()} {done.stderr.strip()}")
    return seconds


def measure(args: argparse.Namespace) -> dict[str, Any]:
    image = ctl_bench.versioned_image(args.size_mb)
    raw_bytes = args.size_mb * MIB
    workdir = Path(tempfile.mkdtemp(dir=CACHE, prefix="upload-bench-"))
    workdir.chmod(0o755)
    (workdir / "pi").mkdir()
    try:
        with SimulatedPi(workdir / "pi", "prefix", root_mb=args.size_mb + 16,
                         config={"upload_idle_timeout": 120.0}) as pi:
            config_path = workdir / "ab-flasher.conf"
            config_path.write_text(config_file_text(pi.config))
            with DBusDaemon.permissive(workdir) as bus:
                polkit = DbusmockPolkit(bus.address, workdir)
                try:
                    asyncio.run(polkit.set_allowed(["org.abflasher.update", "org.abflasher.update-from-source"]))
                    daemon = [args.python, "-m", "abflasher.service.daemon", "--config", str(config_path)]
                    # The page as root: the private bus is permissive.
                    with ServiceProcess(daemon, bus, cwd=REPO) as service, WebProcess(bus, args.python) as page:
                        return _rounds(args, bus, service, page, image=image, raw_bytes=raw_bytes)
                finally:
                    polkit.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _rounds(args: argparse.Namespace, bus: DBusDaemon, service: ServiceProcess, page: WebProcess, *, image: Path,
            raw_bytes: int) -> dict[str, Any]:
    ctl_runs: list[float] = []
    upload_runs: list[float] = []
    page_writes: list[int] = []
    service_writes: list[int] = []
    page_sampler = ctl_bench.RssSampler(page.server_pid)
    service_sampler = ctl_bench.RssSampler(service.pid)
    for round_number in range(1, args.repeat + 1):
        log(f"round {round_number}/{args.repeat}: abflasherctl update --file ...")
        install_bench.drop_caches()
        ctl_runs.append(time_ctl(args.python, bus, image))
        log(f"round {round_number}/{args.repeat}: curl -T to the page ...")
        install_bench.drop_caches()
        page_before, service_before = storage_writes(page.server_pid), storage_writes(service.pid)
        upload_runs.append(time_upload(page, image))
        page_writes.append(storage_writes(page.server_pid) - page_before)
        service_writes.append(storage_writes(service.pid) - service_before)
    page_peak = max(page_sampler.stop(), rss_kib(page.server_pid)[1]) / 1024
    service_peak = max(service_sampler.stop(), rss_kib(service.pid)[1]) / 1024
    ctl_median, upload_median = statistics.median(ctl_runs), statistics.median(upload_runs)
    ratio = ctl_median / upload_median
    compressed = image.stat().st_size
    return {
        "image": str(image),
        "image_mb": args.size_mb,
        "compressed_bytes": compressed,
        "repeat": args.repeat,
        "ctl_median_s": round(ctl_median, 2),
        "ctl_runs_s": [round(s, 2) for s in ctl_runs],
        "upload_median_s": round(upload_median, 2),
        "upload_runs_s": [round(s, 2) for s in upload_runs],
        "upload_mb_per_s": round(raw_bytes / 1e6 / upload_median, 1),
        "upload_compressed_mb_per_s": round(compressed / 1e6 / upload_median, 1),
        "ratio": round(ratio, 3),
        "page_peak_rss_mb": round(page_peak, 1),
        "service_peak_rss_mb": round(service_peak, 1),
        "page_storage_writes": page_writes,
        "service_storage_writes": service_writes,
        "targets": {
            "ratio": {"value": round(ratio, 3), "limit": TARGET_RATIO, "met": ratio >= TARGET_RATIO},
            "page_peak_rss_mb": {"value": round(page_peak, 1), "limit": TARGET_PEAK_RSS_MB,
                                 "met": page_peak <= TARGET_PEAK_RSS_MB},
            "service_peak_rss_mb": {"value": round(service_peak, 1), "limit": TARGET_PEAK_RSS_MB,
                                    "met": service_peak <= TARGET_PEAK_RSS_MB},
            "page_storage_writes": {"value": max(page_writes), "limit": PAGE_WRITE_LIMIT,
                                    "met": max(page_writes) <= PAGE_WRITE_LIMIT},
            "service_storage_writes": {"value": max(service_writes), "limit": raw_bytes + SERVICE_EXTRA_WRITE_LIMIT,
                                       "met": max(service_writes) <= raw_bytes + SERVICE_EXTRA_WRITE_LIMIT},
        },
        "python": args.python,
        "cpus": os.cpu_count(),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_image_size(parser)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (default 3; medians compared)")
    add_python(parser, "for the service, the page and the client")
    return parse(parser, argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run_as_root(parse_args(argv), report, name="upload_bench",
                       not_root="upload_bench needs root (loop devices, mounts, drop_caches)")


def report(args: argparse.Namespace) -> int:
    """Measure, then print the verdicts and the JSON line."""
    if shutil.which("curl") is None:
        log("upload_bench needs curl (Debian curl)")
        return 2
    result = measure(args)
    targets = result["targets"]

    def verdict(name: str) -> str:
        return "met" if targets[name]["met"] else "MISSED"

    print(f"{result['image_mb']} MiB image ({result['compressed_bytes'] / 1e6:.0f} MB compressed), "
          f"{result['repeat']} interleaved rounds:")
    print(f"  abflasherctl update --file: median {result['ctl_median_s']:.2f} s {result['ctl_runs_s']}")
    print(f"  curl -T to the page:        median {result['upload_median_s']:.2f} s {result['upload_runs_s']} "
          f"({result['upload_mb_per_s']:.0f} MB/s of image)")
    print(f"  ratio (ctl / upload): {result['ratio']:.2f} (target ≥ {TARGET_RATIO}: {verdict('ratio')})")
    print(f"  peak RSS: page {result['page_peak_rss_mb']:.1f} MiB ({verdict('page_peak_rss_mb')}), service "
          f"{result['service_peak_rss_mb']:.1f} MiB ({verdict('service_peak_rss_mb')}) (target ≤ 64)")
    print(f"  storage writes per upload: page {max(result['page_storage_writes'])} B "
          f"({verdict('page_storage_writes')}), service {max(result['service_storage_writes']) / MIB:.1f} MiB "
          f"({verdict('service_storage_writes')})")
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
