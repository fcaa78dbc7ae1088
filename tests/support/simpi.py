"""A simulated Raspberry Pi for scenario tests: a real disk on a loop device, booted through the firmware model.

``SimulatedPi.boot(tryboot=...)`` asks ``tests/pifirmware.py`` which partition and ``root=`` the firmware would
pick from what is on the disk now, then makes that the running system the engine sees: the chosen root partition
is mounted read-only at ``root_path``, ``proc/cmdline`` carries the firmware's cmdline, the device tree says
whether this was a tryboot, and the boot id changes. A reboot command run by the engine is recorded, not obeyed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid
from pathlib import Path

from abflasher.config import Config
from abflasher.updater import Updater
from tests import pifirmware
from tests.support.loopdev import LoopDisk
from tests.support.pidisk import Layout, PiDisk, SwitchFiles, Variant, build_pi_disk
from tests.support.provisioned import build_provisioned_disk

MIB = 1 << 20


class SimulatedPi:
    def __init__(
        self,
        workdir: Path,
        layout: Layout,
        *,
        version_a: str = "1.0.0",
        root_mb: int = 32,
        health_ok: bool = True,
        state_in_root: bool = False,
        config: dict[str, object] | None = None,
        switch_files: SwitchFiles = "disarmed",
        variant: Variant = "ab",
        root_extra_files: dict[str, bytes | str] | None = None,
    ) -> None:
        """``state_in_root``: keep ab-flasher's state where an installed system keeps it, in /var/lib of the running
        root (mounted read-write then), so each slot has its own copy; otherwise one directory outside the disk."""
        self.workdir = workdir
        self.layout = layout
        if variant == "ab":
            self.image: PiDisk = build_pi_disk(workdir / "disk.img", layout, version_a=version_a, root_mb=root_mb,
                                                switch_files=switch_files, root_extra_files=root_extra_files)
        else:
            self.image = build_provisioned_disk(workdir / "disk.img", layout, variant, version=version_a,
                                                root_mb=root_mb, root_extra_files=root_extra_files)
        self.loop = LoopDisk(self.image.path)
        self.proc = workdir / "proc"
        self.root_mount = workdir / "root"
        self.reboot_log = workdir / "reboots.log"
        self.health_dir = workdir / "health.d"
        self.health_dir.mkdir()
        self.set_health(health_ok)
        self.state_in_root = state_in_root
        self.decision: pifirmware.BootDecision | None = None
        self.booted_partition: int | None = None
        self._mounted = False
        fake_reboot = workdir / "fake-reboot"
        fake_reboot.write_text(f'#!/bin/sh\necho "$0 $*" >> {self.reboot_log}\n')
        fake_reboot.chmod(0o755)
        self.config = Config(
            disk=self.loop.device,
            root_path=str(self.root_mount),
            proc_path=str(self.proc),
            sys_path="/sys",
            state_dir=str(self.root_mount / "var/lib/ab-flasher" if state_in_root else workdir / "state"),
            run_dir=str(workdir / "run"),
            health_dir=str(self.health_dir),
            health_systemd="off",
            health_timeout=20.0,
            tryboot_command=(str(fake_reboot), "0 tryboot"),
            tryboot_fallback_command=(),
            reboot_command=(str(fake_reboot),),
            require_checksum=False,
            **config or {},  # type: ignore[arg-type]
        )
        try:
            self.boot(tryboot=False)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ the device

    def updater(self) -> Updater:
        return Updater(self.config)

    def set_health(self, ok: bool) -> None:
        check = self.health_dir / "10-app"
        check.write_text("#!/bin/sh\nexit 0\n" if ok else "#!/bin/sh\necho 'app did not start' >&2\nexit 1\n")
        check.chmod(0o755)

    def flush(self) -> None:
        """Drop cached blocks of the disk and its partitions so every reader sees what is on the medium."""
        nodes = [self.loop.device, *(f"{self.loop.device}p{n}" for n in range(1, 10))]
        for node in nodes:
            if os.path.exists(node):
                subprocess.run(["blockdev", "--flushbufs", node], check=False, capture_output=True, timeout=60)

    def firmware(self, *, tryboot: bool) -> pifirmware.BootDecision:
        """What the firmware would boot now, without booting it."""
        self.flush()
        return pifirmware.decide_boot(self.loop.device, tryboot=tryboot)

    def root_partition_for(self, decision: pifirmware.BootDecision) -> int:
        return pifirmware.booted_root_partition(decision, pifirmware.read_mbr_table(self.image.path))

    def slot_for(self, decision: pifirmware.BootDecision) -> str:
        partition = self.root_partition_for(decision)
        return self.roots()[partition]

    def roots(self) -> dict[int, str]:
        """Root partition number → slot name."""
        return {self.image.root(name).number: name for name in self.image.slot_names}  # type: ignore[arg-type]

    def boot(self, *, tryboot: bool) -> str:
        """Reset the device (with or without the one-shot tryboot flag); returns the slot that came up."""
        self._unmount()
        decision = self.firmware(tryboot=tryboot)
        partition = self.root_partition_for(decision)
        self.root_mount.mkdir(exist_ok=True)
        subprocess.run(
            ["mount", "-o", "rw" if self.state_in_root else "ro,noload", f"{self.loop.device}p{partition}",
             str(self.root_mount)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self._mounted = True
        self.proc.mkdir(exist_ok=True)
        (self.proc / "cmdline").write_text(decision.cmdline.strip() + "\n")
        bootloader = self.proc / "device-tree" / "chosen" / "bootloader"
        bootloader.mkdir(parents=True, exist_ok=True)
        (bootloader / "tryboot").write_bytes(int(tryboot).to_bytes(4, "big"))
        (bootloader / "partition").write_bytes(decision.partition.to_bytes(4, "big"))
        random_dir = self.proc / "sys" / "kernel" / "random"
        random_dir.mkdir(parents=True, exist_ok=True)
        (random_dir / "boot_id").write_text(str(uuid.uuid4()) + "\n")
        if not (self.proc / "self").exists():
            (self.proc / "self").symlink_to("/proc/self")
        self.decision = decision
        self.booted_partition = partition
        return self.slot_for(decision)

    def reboots(self) -> list[str]:
        return self.reboot_log.read_text().splitlines() if self.reboot_log.exists() else []

    # ------------------------------------------------------------------ evidence

    def partition_sha(self, number: int) -> str:
        self.flush()
        digest = hashlib.sha256()
        with open(f"{self.loop.device}p{number}", "rb") as handle:
            while chunk := handle.read(4 * MIB):
                digest.update(chunk)
        return digest.hexdigest()

    def data_partition(self) -> int:
        return self.image.by_role("data").number

    def fat_file(self, partition: int, name: str) -> bytes | None:
        self.flush()
        done = subprocess.run(
            ["mtype", "-i", f"{self.loop.device}p{partition}", f"::/{name}"],
            capture_output=True,
            timeout=60,
            check=False,
            env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
        )
        return done.stdout if done.returncode == 0 else None

    def boot_config_files(self) -> dict[str, bytes | None]:
        """The files that decide what boots: config.txt/tryboot.txt (prefix) or autoboot.txt (autoboot)."""
        if self.layout == "prefix":
            return {name: self.fat_file(1, name) for name in ("config.txt", "tryboot.txt")}
        return {"autoboot.txt": self.fat_file(1, "autoboot.txt")}

    def slot_file(self, slot: str, path: str) -> bytes | None:
        self.flush()
        node = f"{self.loop.device}p{self.image.root(slot).number}"  # type: ignore[arg-type]
        done = subprocess.run(
            ["debugfs", "-R", f"cat {path}", node], capture_output=True, timeout=60, check=False
        )
        return done.stdout if done.returncode == 0 and b"not found" not in done.stderr else None

    # ------------------------------------------------------------------ teardown

    def _unmount(self) -> None:
        if self._mounted:
            subprocess.run(["umount", str(self.root_mount)], check=False, capture_output=True, timeout=60)
            self._mounted = False

    def close(self) -> None:
        self._unmount()
        self.loop.close()

    def __enter__(self) -> SimulatedPi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
