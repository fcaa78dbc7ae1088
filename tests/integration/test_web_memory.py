"""The upload page streams: an image larger than the memory budget goes through the page and the service with both
processes' peak RSS ≤ 64 MB, and nothing is written to storage but the target partition (the page writes nothing;
the service writes the image's bytes, nothing beside them). bench/upload_bench.py does the same with a 1 GiB image
and measures the throughput against ``abflasherctl update --file``.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from tests.support.pidisk import build_root_image
from tests.support.service_rig import Rig
from tests.support.serviceprocess import ServiceProcess, config_file_text
from tests.support.simpi import SimulatedPi
from tests.support.webrig import PASSWORD, WebClient, WebProcess

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]

MIB = 1 << 20
#: More than the memory budget: a page or service that held the upload would exceed it.
IMAGE_MB = 160
SLOT_MB = 176
PEAK_RSS_LIMIT = 64 * MIB
#: (The page's peak includes the 16 MiB scrypt takes to check the password it is sent: about 37 MiB idle, 54 after
#: an upload; streaming itself adds about 1 MiB.)
#: What the page may write to storage: its log lines (stderr is a file here).
PAGE_WRITE_LIMIT = 1 * MIB
#: What the service may write beside the image: state.json, the new root's fstab and boot files.
SERVICE_EXTRA_WRITE_LIMIT = 16 * MIB


def storage_writes(pid: int) -> int:
    """Bytes ``pid`` caused to be written to storage (dirtied pages), from /proc/PID/io."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError(f"no write_bytes for {pid}")


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for {pid}")


def files_open_for_writing(pid: int) -> set[str]:
    """Regular files ``pid`` has open for writing now."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            flags = int(Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
        except (OSError, IndexError):
            continue
        if target.startswith("/") and flags & os.O_ACCMODE != os.O_RDONLY and Path(target).is_file():
            found.add(target)
    return found


def test_a_large_upload_streams_in_bounded_memory_and_writes_only_the_target(
        rig: Rig, web_user: str, tmp_path: Path) -> None:
    image = tmp_path / "root-3.0.0.img"
    build_root_image(image, "3.0.0", size_mb=IMAGE_MB, extra_files={"payload.bin": os.urandom(24 * MIB)})
    image.chmod(0o644)
    (tmp_path / "pi").mkdir()
    with SimulatedPi(tmp_path / "pi", "prefix", root_mb=SLOT_MB, config={"upload_idle_timeout": 30.0}) as pi:
        config = tmp_path / "ab-flasher.conf"
        config.write_text(config_file_text(pi.config))
        with ServiceProcess([rig.venv.daemon, "--config", config], rig.bus) as service, \
                WebProcess(rig.bus, rig.venv.python, web_user) as web:
            page_pid = web.server_pid
            page_writes_before = storage_writes(page_pid)
            service_writes_before = storage_writes(service.pid)
            page_log = str(web.log)
            opened: set[str] = set()
            stop = threading.Event()

            def watch() -> None:
                while not stop.wait(0.05):
                    opened.update(files_open_for_writing(page_pid) - {page_log})

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            try:
                done = subprocess.run(
                    ["curl", "-sS", "--max-time", "500", "-u", f":{PASSWORD}", "-T", str(image),
                     web.url("/api/upload?filename=root-3.0.0.img"), "-w", "\n%{http_code}"],
                    capture_output=True, text=True, timeout=520, check=False)
            finally:
                stop.set()
                watcher.join(10)
            assert done.stdout.endswith("\n200"), (done.stdout, done.stderr, web.log_text(), service.log_text())

            client = WebClient(web)
            assert client.login().status_code == 200
            slot_b = next(s for s in client.status()["slots"] if s["name"] == "b")
            assert slot_b["version"] == "3.0.0"

            page_peak, service_peak = peak_rss(page_pid), peak_rss(service.pid)
            page_writes = storage_writes(page_pid) - page_writes_before
            service_writes = storage_writes(service.pid) - service_writes_before

    image_bytes = IMAGE_MB * MIB
    assert page_peak <= PEAK_RSS_LIMIT, f"the page's peak RSS was {page_peak / MIB:.1f} MiB"
    assert service_peak <= PEAK_RSS_LIMIT, f"the service's peak RSS was {service_peak / MIB:.1f} MiB"
    assert not opened, f"the page opened files for writing: {opened}"
    assert page_writes <= PAGE_WRITE_LIMIT, f"the page wrote {page_writes} bytes to storage"
    assert service_writes <= image_bytes + SERVICE_EXTRA_WRITE_LIMIT, (
        f"the service wrote {service_writes} bytes to storage for a {image_bytes}-byte image")
    print(f"\npeak RSS: page {page_peak / MIB:.1f} MiB, service {service_peak / MIB:.1f} MiB; storage writes: "
          f"page {page_writes} B, service {service_writes / MIB:.1f} MiB for a {IMAGE_MB} MiB image")
