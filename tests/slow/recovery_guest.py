"""The slow tier's main + recovery disk: laid out by ``ab-flasher provision`` from a system image (the guest tree at
1.0.0) and a recovery image (the same tree, with the upload page's password, a network configuration for QEMU's
user network, and a marker that tells the test driver it is the recovery system), both booting the guest's x86
kernel from their folders on p1 (``m/`` and ``r/``).

The recovery root is mounted read-only (provision writes ``ro`` into its fstab, and a tmpfs for the service's state);
the image's own fstab adds tmpfs for ``/tmp`` and ``/var/tmp``, which the services' PrivateTmp needs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from abflasher.provision import ProvisionRequest, provision
from abflasher.web.settings import hash_password
from tests.slow.guest import (
    BOOT_MB,
    IMAGE_BUILD_SIGNATURE,
    IMAGE_MB,
    ROOT_MB,
    SIGNATURE,
    BaseRoot,
    _make_ext4,
    guest_cmdline,
    root_variant,
    run,
)
from tests.support.pidisk import PiDisk, fstab_text
from tests.support.provisioned import describe_provisioned

RECOVERY_VERSION = "0.9.0-recovery"
WEB_PASSWORD = "abtest-update-mode"
RECOVERY_MB = IMAGE_MB
DATA_MB = 64
# QEMU's user network: the guest is 10.0.2.15, the host 10.0.2.2 (no DHCP client needed).
_NETWORK = "[Match]\nName=en* eth*\n\n[Network]\nAddress=10.0.2.15/24\nGateway=10.0.2.2\n"
_RECOVERY_FSTAB = (
    f"PARTUUID={IMAGE_BUILD_SIGNATURE:08x}-02  /  ext4  defaults,noatime  0  1\n"
    f"PARTUUID={IMAGE_BUILD_SIGNATURE:08x}-01  /boot/firmware  vfat  defaults  0  2\n"
    "tmpfs  /tmp  tmpfs  mode=1777  0  0\n"
    "tmpfs  /var/tmp  tmpfs  mode=1777  0  0\n"
)


def boot_files(base: BaseRoot, dest: Path) -> Path:
    """One slot's boot files as a factory gets them: the firmware's file, config.txt, the (x86) kernel, its initrd
    and cmdline.txt (provision points ``root=`` at the slot)."""
    dest.mkdir(parents=True)
    (dest / "start4.elf").write_text("fake VideoCore firmware\n")
    (dest / "config.txt").write_text("[all]\narm_64bit=1\nenable_uart=1\ninitramfs initrd.img followkernel\n")
    shutil.copyfile(base.kernel, dest / "kernel8.img")
    shutil.copyfile(base.initrd, dest / "initrd.img")
    (dest / "cmdline.txt").write_text(guest_cmdline(2))
    return dest


def make_system_image(tree: Path, dest: Path, version: str) -> Path:
    with dest.open("wb") as handle:
        handle.truncate(IMAGE_MB << 20)
    with root_variant(tree, version, fstab=fstab_text(IMAGE_BUILD_SIGNATURE, root=2, boot=1, data=4)):
        _make_ext4(dest, 0, IMAGE_MB << 20, tree, label="rootfs", uuid="deadbeef-0000-4000-8000-000000000002")
    return dest


def make_recovery_image(tree: Path, dest: Path) -> Path:
    """The recovery system's root image: the guest tree with the page's password and a network."""
    recovery = dest.parent / "recovery-tree"
    run(["cp", "-a", str(tree), str(recovery)], timeout=600)
    try:
        (recovery / ".ab_version").write_text(RECOVERY_VERSION + "\n")
        (recovery / "etc/fstab").write_text(_RECOVERY_FSTAB)
        web_conf = recovery / "etc/ab-flasher/web.conf"  # root:ab-flasher-web 0640, kept by writing in place
        web_conf.write_text(web_conf.read_text() + f"\n# abtest\npassword_hash = {hash_password(WEB_PASSWORD)}\n")
        # A read-only root brings the state folders its services expect (logind's StateDirectory=systemd/linger).
        (recovery / "var/lib/systemd/linger").mkdir(parents=True, exist_ok=True)
        (recovery / "etc/ab-flasher/abtest-recovery").write_text("the test driver waits here for the host\n")
        network = recovery / "etc/systemd/network/80-abtest.network"
        network.parent.mkdir(parents=True, exist_ok=True)
        network.write_text(_NETWORK)
        run(["chroot", str(recovery), "systemctl", "enable", "systemd-networkd.service"], timeout=120,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        with dest.open("wb") as handle:
            handle.truncate(RECOVERY_MB << 20)
        _make_ext4(dest, 0, RECOVERY_MB << 20, recovery, label="recovery",
                   uuid="deadbeef-0000-4000-8000-000000000003")
    finally:
        shutil.rmtree(recovery)
    return dest


def build_recovery_disk(path: Path, tree: Path, base: BaseRoot, work: Path) -> PiDisk:
    """A main + recovery disk (prefix scheme) laid out by ``ab-flasher provision``: main at 1.0.0, committed."""
    system = make_system_image(tree, work / "system-1.0.0.img", "1.0.0")
    recovery = make_recovery_image(tree, work / "recovery.img")
    boot = boot_files(base, work / "boot-files")
    try:
        provision(ProvisionRequest(
            target=str(path), kind="prefix", variant="main+recovery", system_image=str(system),
            recovery_image=str(recovery), boot_files=str(boot), recovery_boot_files=str(boot), slot_mb=ROOT_MB,
            recovery_mb=RECOVERY_MB, boot_mb=BOOT_MB, data_mb=DATA_MB, signature=SIGNATURE,
        ))
    finally:
        system.unlink()
        recovery.unlink()
        shutil.rmtree(boot)
    disk = describe_provisioned(path, "prefix", "main+recovery", SIGNATURE)
    data = disk.by_role("data")
    run(["debugfs", "-w", "-R", "mkdir abtest", f"{path}?offset={data.offset}"], timeout=60)
    return disk
