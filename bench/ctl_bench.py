#!/usr/bin/env python3
"""Service benchmark: ``abflasherctl status`` round trip, and the service's memory idle and during a 1 GiB install.

- **status round trip**: the whole ``abflasherctl status`` process (interpreter start, imports, bus connection,
  GetSlots + GetAll, the table), run ``--runs`` times against the idle service; median and 90th percentile.
  Target: median ≤ 0.3 s.
- **service RSS**: ab-flasherd's VmRSS when idle (after start-up and the status runs), and its peak (VmHWM, plus the
  largest VmRSS sampled every 50 ms) while it installs the engine benchmark's image (bench/install_bench.py's cached
  gzip'd ext4 of ``--size-mb`` MiB, with a /.ab_version added) sent by ``abflasherctl update --file`` (fd passing,
  the whole path an upload takes). Target: peak ≤ 64 MB (MiB, read strictly).

The device is tests/support/simpi.py's simulated Pi (a real disk image on a loop device, prefix layout, root
partitions big enough for the image); the bus is a private dbus-daemon; polkit is python-dbusmock's polkitd template
allowing the update action (the benchmark measures the service, not polkit). Needs root. The last line printed is one
JSON object; exits 0 whether or not the targets were met, non-zero when a step failed.
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
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

# The sibling module: `python bench/ctl_bench.py` has bench/ on its path.
from common_cli import add_image_size, add_python, parse, run_as_root

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.bus import DBusDaemon, stop_process  # noqa: E402
from tests.support.polkit import DbusmockPolkit  # noqa: E402
from tests.support.serviceprocess import ServiceProcess, config_file_text, rss_kib  # noqa: E402
from tests.support.simpi import SimulatedPi  # noqa: E402

MIB = 1 << 20
VERSION = "2.0.0"
TARGET_STATUS_S = 0.3
TARGET_PEAK_RSS_MB = 64.0
RSS_SAMPLE_INTERVAL = 0.05
INSTALL_TIMEOUT = 3600.0


def _load_install_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("install_bench", REPO / "bench" / "install_bench.py")
    if spec is None or spec.loader is None:
        raise ImportError("cannot load bench/install_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["install_bench"] = module
    spec.loader.exec_module(module)
    return module


install_bench = _load_install_bench()
log = install_bench.log
BenchError = install_bench.BenchError
CACHE: Path = install_bench.CACHE


def versioned_image(size_mb: int) -> Path:
    """The engine benchmark's image with /.ab_version = VERSION (the service installs only slot images), gzip -6,
    cached next to it."""
    image = install_bench.build_image(size_mb)
    out = CACHE / f"ctl-{image.raw.stem}-{VERSION}.img.gz"
    if out.exists():
        return out
    log(f"adding /.ab_version to a copy of {image.raw.name} and compressing it (cached for later runs)...")
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="ctl-") as tmp:
        raw = Path(tmp) / "image.img"
        install_bench.run("cp", "--sparse=always", image.raw, raw)
        version_file = Path(tmp) / "ab_version"
        version_file.write_text(VERSION + "\n")
        commands = Path(tmp) / "debugfs.cmd"
        # the engine benchmark's image has a placeholder version that is not a version number
        commands.write_text(f"rm /.ab_version\nwrite {version_file} /.ab_version\n")
        install_bench.run("debugfs", "-w", "-f", commands, raw)
        partial = out.with_suffix(".tmp")
        with open(partial, "wb") as handle:
            subprocess.run(["gzip", "-6", "-n", "-c", str(raw)], stdout=handle, check=True, timeout=3600)
        partial.rename(out)
    return out


def ctl(python: str, bus: DBusDaemon, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address)
    return subprocess.run([python, "-m", "abflasher.ctl", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, check=False)


def time_status(python: str, bus: DBusDaemon, runs: int) -> list[float]:
    ctl(python, bus, "status")  # warm the page cache: measure the round trip, not the first disk read
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        done = ctl(python, bus, "status")
        timings.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise BenchError(f"abflasherctl status failed: {done.stderr.strip()}")
    return timings


class RssSampler:
    """The largest VmRSS of ``pid`` seen every RSS_SAMPLE_INTERVAL seconds, from a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.max_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.max_kib = max(self.max_kib, rss_kib(self.pid)[0])
            except (OSError, KeyError):
                return
            self._stop.wait(RSS_SAMPLE_INTERVAL)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(10)
        return self.max_kib


def measure(args: argparse.Namespace) -> dict[str, Any]:
    image = versioned_image(args.size_mb)
    workdir = Path(tempfile.mkdtemp(dir=CACHE, prefix="ctl-bench-"))
    workdir.chmod(0o755)
    (workdir / "pi").mkdir()
    try:
        with SimulatedPi(workdir / "pi", "prefix", root_mb=args.size_mb + 16) as pi:
            config_path = workdir / "ab-flasher.conf"
            config_path.write_text(config_file_text(pi.config))
            with DBusDaemon.permissive(workdir) as bus:
                polkit = DbusmockPolkit(bus.address, workdir)
                try:
                    asyncio.run(polkit.set_allowed(["org.abflasher.update"]))
                    daemon = [args.python, "-m", "abflasher.service.daemon", "--config", str(config_path)]
                    with ServiceProcess(daemon, bus, cwd=REPO) as service:
                        return _measure_service(args, bus, service, image)
                finally:
                    polkit.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _measure_service(args: argparse.Namespace, bus: DBusDaemon, service: ServiceProcess, image: Path) -> dict[str, Any]:
    log(f"timing `abflasherctl status` ({args.runs} runs)...")
    timings = time_status(args.python, bus, args.runs)
    idle_rss, _ = rss_kib(service.pid)
    log(f"installing {image.name} ({image.stat().st_size / MIB:.0f} MiB compressed) through the service...")
    install_bench.drop_caches()
    sampler = RssSampler(service.pid)
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address)
    started = time.perf_counter()
    client = subprocess.Popen([args.python, "-m", "abflasher.ctl", "--json", "update", "--file", str(image),
                               VERSION], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = client.communicate(timeout=INSTALL_TIMEOUT)
    finally:
        stop_process(client)
    install_s = time.perf_counter() - started
    sampled_peak = sampler.stop()
    rss_after, hwm = rss_kib(service.pid)
    events = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    completed = next((e for e in events if e.get("event") == "completed"), None)
    if client.returncode != 0 or completed is None or not completed.get("success"):
        raise BenchError(f"the install failed ({client.returncode}): {stderr.strip() or completed}")
    status_median = statistics.median(timings)
    peak_mb = max(hwm, sampled_peak) / 1024
    return {
        "image": str(image),
        "image_mb": args.size_mb,
        "status_runs": len(timings),
        "status_median_s": round(status_median, 4),
        "status_p90_s": round(sorted(timings)[max(0, int(len(timings) * 0.9) - 1)], 4),
        "status_min_s": round(min(timings), 4),
        "idle_rss_mb": round(idle_rss / 1024, 1),
        "peak_rss_mb": round(peak_mb, 1),
        "rss_after_install_mb": round(rss_after / 1024, 1),
        "install_s": round(install_s, 2),
        "install_mb_per_s": round(args.size_mb * MIB / 1e6 / install_s, 1),
        "progress_events": sum(1 for e in events if e.get("event") == "progress"),
        "targets": {
            "status_median_s": {"value": round(status_median, 4), "limit": TARGET_STATUS_S,
                                "met": status_median <= TARGET_STATUS_S},
            "peak_rss_mb": {"value": round(peak_mb, 1), "limit": TARGET_PEAK_RSS_MB,
                            "met": peak_mb <= TARGET_PEAK_RSS_MB},
        },
        "python": args.python,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_image_size(parser)
    parser.add_argument("--runs", type=int, default=20, help="abflasherctl status runs (default 20)")
    add_python(parser, "for the service and the client")
    return parse(parser, argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run_as_root(parse_args(argv), report, name="ctl_bench",
                       not_root="ctl_bench needs root (loop devices, mounts, drop_caches)")


def report(args: argparse.Namespace) -> int:
    """Measure, then print the verdicts and the JSON line."""
    result = measure(args)
    targets = result["targets"]
    print(f"abflasherctl status: median {result['status_median_s'] * 1000:.0f} ms, p90 "
          f"{result['status_p90_s'] * 1000:.0f} ms over {result['status_runs']} runs "
          f"(target ≤ {TARGET_STATUS_S * 1000:.0f} ms: {'met' if targets['status_median_s']['met'] else 'MISSED'})")
    print(f"ab-flasherd RSS: idle {result['idle_rss_mb']:.1f} MiB, peak {result['peak_rss_mb']:.1f} MiB during the "
          f"{result['image_mb']} MiB install ({result['install_s']:.1f} s, {result['install_mb_per_s']:.0f} MB/s) "
          f"(target ≤ {TARGET_PEAK_RSS_MB:.0f} MB: {'met' if targets['peak_rss_mb']['met'] else 'MISSED'})")
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
