"""The main job on a simulated Raspberry Pi: update from 1.0.0 to 1.1.0, try it once, commit it.

A real disk image (MBR, FAT boot, ext4 roots, data partition) is attached to a loop device; the update is served
over HTTP from 127.0.0.1 with a sha256 file next to it; which partition boots is decided by the firmware model
(tests/pifirmware.py) from the bytes on the disk, with and without the one-shot tryboot flag.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from abflasher.cli import ProgressPrinter, format_status
from abflasher.updater import UpdateRequest
from tests.support.httpserver import serve_files
from tests.support.pidisk import build_root_image
from tests.support.simpi import SimulatedPi


def say(text: str = "") -> None:
    print(text, flush=True)


def firmware_line(pi: SimulatedPi, tryboot: bool) -> str:
    decision = pi.firmware(tryboot=tryboot)
    slot = pi.slot_for(decision)
    flag = "with the tryboot flag   " if tryboot else "without the tryboot flag"
    return (
        f"  firmware {flag}: partition {decision.partition}, {decision.config_file}, "
        f"kernel {decision.kernel}, root={decision.root} -> slot {slot}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layout", choices=["prefix", "autoboot"], default="prefix")
    parser.add_argument("--root-mb", type=int, default=192, help="size of each root slot")
    args = parser.parse_args()
    if os.geteuid() != 0:
        say("the demo attaches loop devices: run it as root")
        return 2
    with tempfile.TemporaryDirectory(prefix="ab-flasher-demo-") as tmp:
        work = Path(tmp)
        say(f"== a simulated Pi ({args.layout} layout), slot A at 1.0.0, slot B empty")
        with SimulatedPi(work, args.layout, root_mb=args.root_mb) as pi:
            say(f"  disk {pi.image.path} on {pi.loop.device}")
            say(format_status(pi.updater().status()))
            say(firmware_line(pi, tryboot=False))

            say("\n== the update: version 1.1.0, a gzip'd ext4 root image with its sha256 file, served over HTTP")
            raw = work / "root-1.1.0.img"
            filler = {f"usr/share/app/data{i}.bin": os.urandom(1 << 20) for i in range(24)}
            build_root_image(raw, "1.1.0", size_mb=args.root_mb - 8, extra_files=filler)
            image = gzip.compress(raw.read_bytes(), compresslevel=6)
            raw.unlink()
            digest = hashlib.sha256(image).hexdigest()
            files = {"/1.1.0/root.img.gz": image, "/1.1.0/root.img.gz.sha256": f"{digest}  root.img.gz\n".encode()}
            with serve_files(files) as server:
                base = server.url("/{version}/root.img.gz")
                pi.config = pi.config.__class__(**{**pi.config.__dict__, "image_url": base, "require_checksum": True})
                say(f"  image_url = {base}   ({len(image) >> 20} MiB compressed)")
                updater = pi.updater()
                prepared = updater.prepare(UpdateRequest(version="1.1.0"))
                say(f"  target: slot {prepared.target_slot} (neither booted nor committed)")
                printer = ProgressPrinter(sys.stdout, enabled=True)
                try:
                    outcome = updater.run(prepared, printer, threading.Event())
                finally:
                    printer.close()
            say(f"  {outcome.message}")
            say(format_status(pi.updater().status()))
            say(firmware_line(pi, tryboot=False))
            say(firmware_line(pi, tryboot=True))

            say("\n== reboot '0 tryboot': the firmware starts slot B once")
            booted = pi.boot(tryboot=True)
            say(f"  booted slot {booted}; the boot check runs the health checks and commits")
            result = pi.updater().boot_check()
            say(f"  {result.message}")
            say(format_status(pi.updater().status()))
            say(firmware_line(pi, tryboot=False))

            say("\n== a normal reboot now starts the new version")
            booted = pi.boot(tryboot=False)
            status = pi.updater().status()
            say(f"  booted slot {booted}, version {status.booted_version}")
            ok = status.booted_version == "1.1.0" and not status.trial_active
    say("\nupdate 1.0.0 -> 1.1.0: " + ("committed and running" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
