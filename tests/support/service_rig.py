"""The rig of the service's integration tests: a private system-type dbus-daemon enforcing the project's dbus/
policy, the real polkitd with the project's policy and rules installed, real users running abflasherctl from their
own venv, and a simulated Pi with an HTTP server of update images for the real engine.

The shipped rules keep images of the caller's choosing (a URL, a file) for administrators; the rig adds a rule of
the kind a fleet would write, granting them to the ``member`` user alone, so the tests can show both sides.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abflasher.service.contract import ERROR_PREFIX
from tests.pifirmware import KernelNotFound
from tests.support.bus import REPO, DBusDaemon, world_readable_tempdir
from tests.support.clientvenv import ClientVenv
from tests.support.httpserver import FaultServer
from tests.support.pidisk import Variant, build_root_image
from tests.support.polkit import POLKIT_RULES_DIR, PolkitDaemon, installed_polkit_files
from tests.support.serviceprocess import config_file_text
from tests.support.signals import SignalRecorder
from tests.support.simpi import SimulatedPi
from tests.support.users import TestUsers, run_as

MIB = 1 << 20
IMAGE_MB = 24
ERR = ERROR_PREFIX
#: A fleet's own rule next to the shipped ones (see the module docstring).
SOURCES_RULES_FILE = "49-abflasher-test-sources.rules"


@dataclass
class Rig:
    workdir: Path
    venv: ClientVenv
    users: TestUsers
    bus: DBusDaemon
    polkit: PolkitDaemon
    service_dir: Path
    images: dict[str, Path]

    def ctl(self, user: str, *args: str, timeout: float = 120.0, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        return run_as(user, [self.venv.ctl, *args], bus=self.bus, timeout=timeout, **kwargs)


def service_rig() -> Iterator[Rig]:
    """The rig for one test module (use as a module-scoped fixture's body: ``yield from service_rig()``)."""
    workdir = world_readable_tempdir("abft-rig-")
    cleanups: list[Any] = []
    try:
        venv = ClientVenv(workdir)
        users = TestUsers()
        cleanups.append(users.close)
        polkit_files = installed_polkit_files()
        polkit_files.__enter__()
        cleanups.append(lambda: polkit_files.__exit__(None, None, None))
        sources_rule = POLKIT_RULES_DIR / SOURCES_RULES_FILE
        sources_rule.write_text(
            "polkit.addRule(function(action, subject) {\n"
            f'    if (action.id == "org.abflasher.update-from-source" && subject.user == "{users.member}")\n'
            "        return polkit.Result.YES;\n"
            "});\n"
        )
        cleanups.append(lambda: sources_rule.unlink(missing_ok=True))
        service_dir = workdir / "system-services"
        service_dir.mkdir()
        bus = DBusDaemon.system(workdir, policy_dirs=[REPO / "dbus"], service_dir=service_dir)
        cleanups.append(bus.close)
        polkit = PolkitDaemon(bus)
        cleanups.append(polkit.close)
        images = {}
        for version in ("1.1.0", "1.2.0"):
            raw = workdir / f"root-{version}.img"
            build_root_image(raw, version, size_mb=IMAGE_MB, extra_files={"etc/hostname": "pi\n"})
            packed = workdir / f"root-{version}.img.gz"
            subprocess.run(f"gzip -1 -c {raw} > {packed}", shell=True, check=True, timeout=120)
            raw.chmod(0o644)
            packed.chmod(0o644)
            images[version] = raw
            images[f"{version}.gz"] = packed
        yield Rig(workdir, venv, users, bus, polkit, service_dir, images)
    finally:
        for cleanup in reversed(cleanups):
            cleanup()
        subprocess.run(["rm", "-rf", "--one-file-system", str(workdir)], check=False, timeout=120)


@dataclass
class Device:
    pi: SimulatedPi
    server: FaultServer
    config_path: Path

    def url(self, path: str) -> str:
        return self.server.url(path)


def serve_image(server: FaultServer, path: str, image: Path, **faults: Any) -> None:
    data = image.read_bytes()
    server.add(path, data, **faults)
    name = path.rsplit("/", 1)[-1]
    server.add(f"{path}.sha256", f"{hashlib.sha256(data).hexdigest()}  {name}\n".encode())


def simulated_device(rig: Rig, tmp_path: Path, variant: Variant = "ab", **config: object) -> Iterator[Device]:
    """A simulated Pi (prefix layout, slot a 1.0.0 booted; ``variant``: with a recovery slot, main 1.0.0 booted)
    and an HTTP server with its update images: raw ext4 images, slowed to about 4 s (/root-*.img) or a minute
    (/slow/*) so tests can act while they install. ``config`` adds options to its ab-flasher.conf."""
    with FaultServer() as server:
        for version in ("1.1.0", "1.2.0"):
            serve_image(server, f"/root-{version}.img", rig.images[version], piece_delay=0.0025)
            serve_image(server, f"/slow/root-{version}.img", rig.images[version], piece_delay=0.04)
        server.add("/latest", b"1.2.0\n")
        settings = {"image_url": server.url("/root-{version}.img"), "channel_url": server.url("/latest"), **config}
        (tmp_path / "pi").mkdir()
        with SimulatedPi(tmp_path / "pi", "prefix", config=settings, variant=variant) as pi:
            config_path = tmp_path / "ab-flasher.conf"
            config_path.write_text(config_file_text(pi.config))
            yield Device(pi, server, config_path)


def json_lines(output: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.decode().splitlines() if line.strip()]


def status_of(rig: Rig, user: str) -> dict[str, Any]:
    done = rig.ctl(user, "status", "--json")
    assert done.returncode == 0, done.stderr.decode()
    status: dict[str, Any] = json.loads(done.stdout)
    return status


def slot_of(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next(slot for slot in status["slots"] if slot["name"] == name)


def tryboot_slot(pi: SimulatedPi) -> str | None:
    """The slot a tryboot would start, None when no trial is armed (the firmware finds no kernel and the watchdog
    resets into the normal boot)."""
    try:
        return pi.slot_for(pi.firmware(tryboot=True))
    except KernelNotFound:
        return None


def wait_for_writing(recorder: SignalRecorder, timeout: float = 60.0) -> str:
    first = recorder.wait_for(lambda m: m.member == "Progress" and m.body[1] == "writing", timeout, "writing")
    return str(first.body[0])


_CALL_SCRIPT = """
import asyncio, json, sys
from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import BusType
from dbus_next.message import Message
from dbus_next.signature import Variant

async def main():
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    interface, member, signature = sys.argv[1:4]
    body = eval(sys.stdin.read(), {"Variant": Variant})
    reply = await bus.call(Message(destination="org.abflasher.Updater", path="/org/abflasher/Updater",
                                   interface=interface, member=member, signature=signature, body=body))
    print(json.dumps([reply.error_name or "", str(reply.body[0]) if reply.body else ""]))

asyncio.run(main())
"""


def call_as(
    rig: Rig, user: str, member: str, signature: str, body: str, *, interface: str = "org.abflasher.Updater1"
) -> tuple[str, str]:
    """(error name or "", first value of the reply as text) of one raw D-Bus call made as ``user``. ``body`` is a
    Python expression (``Variant`` is defined), evaluated in the caller's process: a megabyte argument costs the
    command line nothing."""
    done = run_as(user, [rig.venv.python, "-c", _CALL_SCRIPT, interface, member, signature], bus=rig.bus,
                  input_bytes=body.encode(), timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    name, value = json.loads(done.stdout)
    return str(name), str(value)
