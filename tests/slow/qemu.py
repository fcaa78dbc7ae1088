"""Booting the slow tier's guest: the firmware model decides each boot from the disk image, QEMU (TCG) runs it.

The host plays the Pi firmware between boots (docs/slow-tier.md): `QemuPi.boot` asks `tests/pifirmware.py` what
boots, copies that kernel and initrd out of the FAT, runs QEMU with the board's watchdog (i6300esb), watches the
serial console for the guest's ``ABTEST <key>`` lines while it runs, and tells from the console how the boot ended.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests import pifirmware
from tests.slow.guest import MARKER, GuestError, Timings, run
from tests.support.pidisk import PiDisk, ext4_read


@dataclass(frozen=True)
class GuestBoot:
    """One boot: what the firmware model chose, what the guest printed, how it ended and how long it took."""

    number: int
    decision: pifirmware.BootDecision
    root_partition: int
    console: str
    ended: str  # "poweroff", "reboot", "panic", "watchdog" (a reset nobody asked for), "power-cut" or "timeout"
    seconds: float
    started: float = 0.0  # time.monotonic() when QEMU started
    #: time.monotonic() at which the host first saw each ``ABTEST <key>`` on the console (polled every 0.2 s).
    seen: Mapping[str, float] = field(default_factory=dict)

    def values(self, key: str) -> list[str]:
        """Every ``ABTEST <key> <value>`` the guest printed, in order."""
        # The console prefixes the journal's lines ("[ 24.1] abtest-driver[341]: "), a login prompt may precede one.
        pattern = re.compile(rf"(?:^|\s){MARKER} {re.escape(key)}(?: (.*))?$")
        found = []
        for line in self.console.splitlines():
            match = pattern.search(line.rstrip("\r"))
            if match:
                found.append(match.group(1) or "")
        return found

    def value(self, key: str) -> str:
        found = self.values(key)
        if not found:
            raise AssertionError(f"boot {self.number} printed no '{MARKER} {key}' line; console tail:\n"
                                 + self.tail())
        return found[-1]

    def boot_check_verdict(self) -> list[str]:
        """What ``ab-flasher boot-check`` said, from the console (its drop-in sends its output there)."""
        pattern = re.compile(r"\bab-flasher\[\d+\]: (.*)$")
        return [match.group(1) for line in self.console.splitlines() if (match := pattern.search(line.rstrip("\r")))]

    def state(self) -> dict[str, object]:
        loaded: dict[str, object] = json.loads(self.value("state") or "{}")
        return loaded

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.console.splitlines()[-lines:])


class _MarkerAction:
    """Something the host does while the guest runs, once the guest printed a marker (an upload to its page)."""

    def __init__(self, key: str, action: Callable[[], None]) -> None:
        self.key = key
        self._action = action
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self._action()
        except BaseException as exc:  # handed to the test's thread in finish()
            self._error = exc

    @property
    def failed(self) -> bool:
        return self._error is not None

    def finish(self) -> None:
        if self._thread is None:
            raise GuestError(f"the guest never printed '{MARKER} {self.key}'")
        self._thread.join(timeout=600)
        if self._error is not None:
            raise self._error


class QemuPi:
    """A Pi with ``disk``: the firmware model decides each boot, QEMU (TCG) runs it.

    The pending reboot argument is read from the data partition after each boot and consumed by the next one.
    """

    def __init__(self, disk: PiDisk, workdir: Path, *, boot_timeout: float = 900.0,
                 timings: Timings | None = None) -> None:
        self.disk = disk
        self.workdir = workdir
        self.boot_timeout = boot_timeout
        self.timings = timings or Timings()
        self.boots: list[GuestBoot] = []

    def _pending_reboot_argument(self) -> str:
        data = self.disk.by_role("data")
        try:
            argument = ext4_read(self.disk.path, "/abtest/reboot-param", offset=data.offset).decode().strip()
        except FileNotFoundError:
            return ""
        # One-shot, as the firmware clears its flag when it reads it.
        run(["debugfs", "-w", "-R", "rm /abtest/reboot-param", f"{self.disk.path}?offset={data.offset}"],
            timeout=60)
        return argument

    def decide(self, *, tryboot: bool = False, reboot_arg: int = 0) -> pifirmware.BootDecision:
        return pifirmware.decide_boot(self.disk.path, tryboot=tryboot, reboot_arg=reboot_arg)

    def write_data_file(self, path: str, text: str) -> None:
        """Put a file on the data partition while the guest is off (e.g. a new update request)."""
        data = self.disk.by_role("data")
        source = self.workdir / "data-file"
        source.write_text(text)
        # A loop device over the partition: e2fsck cannot restart itself on an ``image?offset=`` name after replaying
        # the journal. The replay must come first after a power cut, or replaying that journal at the guest's next
        # mount could undo this write.
        loop = run(["losetup", "--find", "--show", "--offset", str(data.offset), "--sizelimit",
                    str(data.size_bytes), str(self.disk.path)], timeout=60).strip()
        try:
            fsck = subprocess.run(["e2fsck", "-fy", loop], capture_output=True, text=True, timeout=300, check=False)
            if fsck.returncode > 1:  # 1: it fixed something, which a power cut may leave
                raise GuestError(f"e2fsck of the data partition exited {fsck.returncode}: {fsck.stdout[-2000:]}")
            run(["debugfs", "-w", "-R", f"rm {path}", loop], timeout=60)
            run(["debugfs", "-w", "-R", f"write {source} {path}", loop], timeout=60)
        finally:
            run(["losetup", "-d", loop], timeout=60)
            source.unlink()

    def boot(self, *, power_cut_after: tuple[str, float] | None = None, forward_port: int | None = None,
             on_marker: tuple[str, Callable[[], None]] | None = None) -> GuestBoot:
        """One boot. ``power_cut_after=(key, seconds)``: QEMU is killed (a power cut) that long after the guest
        printed ``ABTEST <key>``. ``forward_port``: the guest gets a network card on QEMU's user network, its port
        80 reachable at 127.0.0.1:forward_port. ``on_marker=(key, action)``: once the guest printed ``ABTEST <key>``,
        ``action`` runs in a thread of its own while the guest keeps running (its exception is raised after the
        boot)."""
        partition_arg, tryboot = pifirmware.parse_reboot_argument(self._pending_reboot_argument())
        decision = self.decide(tryboot=tryboot, reboot_arg=partition_arg)
        root_partition = pifirmware.booted_root_partition(decision, pifirmware.read_mbr_table(self.disk.path))
        number = len(self.boots) + 1
        boot_dir = self.workdir / f"boot{number}"
        boot_dir.mkdir()
        kernel = boot_dir / "kernel"
        initrd = boot_dir / "initrd"
        disk = pifirmware.ImageDisk(self.disk.path)
        kernel_bytes = disk.read_file(decision.partition, decision.kernel)
        initrd_bytes = disk.read_file(decision.partition, decision.os_prefix + "initrd.img")
        if kernel_bytes is None or initrd_bytes is None:
            raise GuestError(f"boot {number}: {decision.kernel} or {decision.os_prefix}initrd.img is missing on "
                             f"partition {decision.partition}")
        kernel.write_bytes(kernel_bytes)
        initrd.write_bytes(initrd_bytes)
        console_path = boot_dir / "console.log"
        accel = os.environ.get("ABTEST_QEMU_ACCEL", "tcg")
        args = [
            "qemu-system-x86_64", "-M", "q35", "-accel", accel, "-cpu", "max" if accel == "tcg" else "host",
            "-smp", "2", "-m", "1024", "-nodefaults", "-display", "none", "-no-reboot",
            "-serial", f"file:{console_path}", "-monitor", "none",
            *(["-nic", f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{forward_port}-:80"] if forward_port
              else ["-nic", "none"]),
            "-device", "virtio-rng-pci",
            # The board's hardware watchdog: its reset, with -no-reboot, ends QEMU like any reset.
            "-device", "i6300esb", "-action", "watchdog=reset",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", self.kernel_cmdline(decision),
            "-drive", f"file={self.disk.path},format=raw,if=virtio,cache=unsafe",
        ]
        label = (f"boot {number}: partition {decision.partition} {decision.kernel} root={decision.root}"
                 f"{' (tryboot)' if tryboot else ''}")
        started = time.monotonic()
        seen: dict[str, float] = {}
        action = _MarkerAction(*on_marker) if on_marker else None
        with self.timings.phase(label), tempfile.TemporaryFile() as qemu_log:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT)
            ended = ""
            try:
                while proc.poll() is None:
                    now = time.monotonic()
                    self._note_markers(console_path, seen, now)
                    if action is not None and action.key in seen:
                        action.start()
                    if action is not None and action.failed:
                        proc.kill()  # the guest would wait for the host in vain
                        ended = "host-action-failed"
                    elif power_cut_after and power_cut_after[0] in seen and \
                            now >= seen[power_cut_after[0]] + power_cut_after[1]:
                        proc.kill()
                        ended = "power-cut"
                    elif now - started > self.boot_timeout:
                        proc.kill()  # the harness's own backstop: a hung guest is reset
                        ended = "timeout"
                    time.sleep(0.2)
                proc.wait(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=60)
            self._note_markers(console_path, seen, time.monotonic())
            qemu_log.seek(0)
            qemu_output = qemu_log.read().decode(errors="replace")
        if action is not None:
            action.finish()
        console = console_path.read_text(errors="replace") if console_path.exists() else ""
        if not ended:
            if proc.returncode != 0:
                raise GuestError(f"boot {number}: qemu exited {proc.returncode}: {qemu_output[-2000:]}")
            if "Kernel panic" in console:
                ended = "panic"
            elif "reboot: Power down" in console:
                ended = "poweroff"
            elif "reboot: Restarting system" in console:
                ended = "reboot"
            else:
                ended = "watchdog"  # QEMU ended without the kernel asking: the emulated watchdog reset it
        result = GuestBoot(number, decision, root_partition, console, ended, time.monotonic() - started,
                           started, seen)
        self.boots.append(result)
        return result

    @staticmethod
    def kernel_cmdline(decision: pifirmware.BootDecision) -> str:
        """What the kernel gets: the firmware's command line (with ``watchdog.open_timeout`` when it armed the
        watchdog), plus the emulation of that arming (see _FIRMWARE_WATCHDOG_HOOK)."""
        if not decision.watchdog_armed:
            return decision.kernel_cmdline
        return f"{decision.kernel_cmdline} abtest.firmware_watchdog={decision.watchdog_timeout}"

    @staticmethod
    def _note_markers(console_path: Path, seen: dict[str, float], now: float) -> None:
        try:
            text = console_path.read_text(errors="replace")
        except FileNotFoundError:
            return
        for match in re.finditer(rf"(?:^|\s){MARKER} ([\w-]+)", text):
            seen.setdefault(match.group(1), now)

    def read_root_file(self, slot: str, path: str) -> bytes:
        """A file of a slot's root file system, read from the disk image while the guest is off."""
        return ext4_read(self.disk.path, path, offset=self.disk.root(slot).offset)  # type: ignore[arg-type]

    def slot_state(self, slot: str) -> dict[str, object]:
        """``/var/lib/ab-flasher/state.json`` as the slot's root file system holds it."""
        loaded: dict[str, object] = json.loads(self.read_root_file(slot, "/var/lib/ab-flasher/state.json"))
        return loaded
