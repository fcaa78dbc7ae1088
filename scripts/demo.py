"""The main job on a simulated Raspberry Pi, through the product's own front door.

A real disk image (MBR, FAT boot, ext4 roots A/B, data partition) is attached to a loop device and "booted" at
1.0.0. The update is served over HTTP from 127.0.0.1 with a sha256 file next to it. ``ab-flasherd`` runs on a
private system-type D-Bus with a real polkitd, and ``abflasherctl`` asks it for the update, with progress. Which
partition the Pi firmware boots is decided by the firmware model (tests/pifirmware.py) from the bytes on the disk,
with and without the one-shot tryboot flag; after the trial boot, ``ab-flasher boot-check`` (what the boot unit
runs) commits the new slot.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.bus import DBusDaemon  # noqa: E402
from tests.support.httpserver import serve_files  # noqa: E402
from tests.support.pidisk import build_root_image  # noqa: E402
from tests.support.polkit import PolkitDaemon, installed_polkit_files  # noqa: E402
from tests.support.serviceprocess import ServiceProcess, config_file_text  # noqa: E402
from tests.support.simpi import SimulatedPi  # noqa: E402

PYTHON = sys.executable


def say(text: str = "") -> None:
    print(text, flush=True)


COMMANDS = {"abflasher.ctl": "abflasherctl", "abflasher.cli": "ab-flasher"}


def run(argv: list[str], env: dict[str, str]) -> int:
    """Run ``python -m MODULE ARGS`` and show it as the installed command would be typed."""
    say("$ " + " ".join([COMMANDS[argv[2]], *argv[3:]]))
    return subprocess.run(argv, env=env, cwd=REPO, check=False, timeout=600).returncode


def firmware_line(pi: SimulatedPi, tryboot: bool) -> str:
    decision = pi.firmware(tryboot=tryboot)
    flag = "with the tryboot flag   " if tryboot else "without the tryboot flag"
    return (
        f"  firmware {flag}: partition {decision.partition}, {decision.config_file}, "
        f"kernel {decision.kernel}, root={decision.root} -> slot {pi.slot_for(decision)}"
    )


def update_image(work: Path, root_mb: int) -> tuple[bytes, str]:
    raw = work / "root-1.1.0.img"
    payload = {f"usr/share/app/data{i}.bin": os.urandom(1 << 20) for i in range(24)}
    build_root_image(raw, "1.1.0", size_mb=root_mb - 8, extra_files=payload)
    image = gzip.compress(raw.read_bytes(), compresslevel=6)
    raw.unlink()
    return image, hashlib.sha256(image).hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layout", choices=["prefix", "autoboot"], default="prefix")
    parser.add_argument("--root-mb", type=int, default=192, help="size of each root slot")
    args = parser.parse_args()
    if os.geteuid() != 0:
        say("the demo attaches loop devices and starts a system bus: run it as root")
        return 2
    bin_dir = Path(PYTHON).parent
    ctl = [PYTHON, "-m", "abflasher.ctl"]
    with tempfile.TemporaryDirectory(prefix="ab-flasher-demo-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        say(f"== a simulated Pi ({args.layout} layout): slot A runs 1.0.0, slot B is empty")
        (work / "pi").mkdir()
        pi = stack.enter_context(SimulatedPi(work / "pi", args.layout, root_mb=args.root_mb))
        say(f"  disk image {pi.image.path} attached as {pi.loop.device}")
        say(firmware_line(pi, tryboot=False))

        image, digest = update_image(work, args.root_mb)
        files = {"/1.1.0/root.img.gz": image, "/1.1.0/root.img.gz.sha256": f"{digest}  root.img.gz\n".encode()}
        server = stack.enter_context(serve_files(files))
        config = dataclasses.replace(pi.config, image_url=server.url("/{version}/root.img.gz"), require_checksum=True)
        config_path = work / "ab-flasher.conf"
        config_path.write_text(config_file_text(config))
        say(f"  update channel: {config.image_url} ({len(image) >> 20} MiB, sha256 file beside it)")

        say("\n== ab-flasherd on a private system bus, with polkitd and the project's D-Bus and polkit policy")
        work.chmod(0o711)  # polkitd drops to its own user and must reach the bus socket
        (work / "bus").mkdir(mode=0o755)
        bus = stack.enter_context(DBusDaemon.system(work / "bus", policy_dirs=[REPO / "dbus"]))
        stack.enter_context(installed_polkit_files())
        stack.enter_context(contextlib.closing(PolkitDaemon(bus)))
        daemon = [PYTHON, "-m", "abflasher.service.daemon", "--config", str(config_path)]
        service = ServiceProcess(daemon, bus, cwd=REPO)
        env = bus.env({**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"})

        say("")
        run([*ctl, "status"], env)
        say("")
        if run([*ctl, "update", "1.1.0"], env) != 0:
            service.close()
            say(service.log_text())
            return 1
        say("")
        run([*ctl, "status"], env)
        say(firmware_line(pi, tryboot=False))
        say(firmware_line(pi, tryboot=True))

        say("\n== reboot '0 tryboot': the firmware starts slot B once")
        service.close()
        say(f"  booted slot {pi.boot(tryboot=True)}")
        run([PYTHON, "-m", "abflasher.cli", "boot-check", "--config", str(config_path)], env)
        say(firmware_line(pi, tryboot=False))

        say("\n== after the commit, a normal reboot starts 1.1.0")
        say(f"  booted slot {pi.boot(tryboot=False)}")
        service = ServiceProcess(daemon, bus, cwd=REPO)
        say("")
        run([*ctl, "status"], env)
        status = subprocess.run(
            [*ctl, "status", "--json"], env=env, cwd=REPO, capture_output=True, text=True, check=False, timeout=60
        ).stdout
        service.close()
        ok = '"booted_version": "1.1.0"' in status and '"trial_active": false' in status
    say("\nupdate 1.0.0 -> 1.1.0: " + ("committed and running" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
