"""``ab-flasher provision``: lay out a new card or disk image as a factory would, in any supported layout.

From a system root image (and a recovery root image for the recovery layouts), boot files (a tarball or folder;
by default the image's own ``/boot/firmware``) and a data size, it writes the partition table (sfdisk), formats the
FAT boot partitions (mkfs.vfat) and fills them (mtools, through the product's FatVolume), writes each root image
with a read-back verify (the same ``install_image`` updates use), formats the data partition (mkfs.ext4), and fixes
every root up for its partitions: ``/etc/fstab`` (root, boot, data at ``data_mount``; the recovery root mounted
read-only with a tmpfs for the service's state) and the boot files' ``cmdline.txt root=``, by PARTUUID. The
switch files are written disarmed, the first system slot committed. Partition tables: docs/layouts.md.

An image file is attached to a loop device for the work (``losetup``, partition nodes by ``partx -a``: nothing
needs the kernel to scan partitions, nor device-mapper or a vfat driver).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from abflasher import errors
from abflasher.boot import bootfiles
from abflasher.boot.fat import open_volume
from abflasher.boot.raspberrypi import extract_boot_tarball
from abflasher.boot.slotswitch import render_tryboot
from abflasher.carryover import with_data_mount
from abflasher.commands import run_command
from abflasher.config import Config
from abflasher.disk.blockdev import check_not_in_use
from abflasher.disk.slots import (
    AB,
    VERSION_FILE,
    DiskLayout,
    LayoutShape,
    Slot,
    detect_layout,
    layout_shape,
    read_version_file,
)
from abflasher.disk.table import partition_node, read_table
from abflasher.image.formats import ImageFormat, detect_format
from abflasher.image.sources import FileSource
from abflasher.install import install_image
from abflasher.newroot import mounted

MIB = 1 << 20
SECTOR = 512
FAT_TYPE = "c"
LINUX_TYPE = "83"
EXTENDED_TYPE = "5"
#: The autoboot layout's p1 holds autoboot.txt (and bootcode.bin for a Pi 3): small.
AUTOBOOT_MB = 32
#: Files the firmware reads from p1 itself whatever os_prefix says (prefix layout).
FIRMWARE_PATTERNS = ("start*.elf", "fixup*.dat", "bootcode.bin", "config.txt", "LICENCE*")
RECOVERY_STATE_TMPFS = "/var/lib/ab-flasher"
_SBIN = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


@dataclass(frozen=True)
class ProvisionRequest:
    target: str  # a block device, or an image file (created or grown to the needed size)
    kind: str  # prefix | autoboot
    variant: str  # ab | ab+recovery | main+recovery
    system_image: str
    recovery_image: str | None = None
    boot_files: str | None = None  # tarball or folder; None: the system image's /boot/firmware
    recovery_boot_files: str | None = None
    slot_mb: int | None = None  # each system root; None: the system image's size (raw images only)
    recovery_mb: int | None = None
    boot_mb: int = 256  # prefix: p1 (every slot's folder); autoboot: each slot's boot partition
    data_mb: int | None = None  # None: the rest of a block device, 64 MiB in a new image file
    signature: int | None = None  # MBR disk signature (PARTUUIDs); None: random
    data_mount: str = "/data"


@dataclass(frozen=True)
class _Part:
    number: int
    role: str  # root:<slot>, boot:<slot>, firmware, data, extended
    type: str
    size_mb: int | None  # None: the rest (the extended partition)


def _run(argv: list[str], what: str, *, input_text: str | None = None, timeout: float = 600) -> str:
    try:
        done = subprocess.run(argv, input=input_text, capture_output=True, text=True, timeout=timeout, check=False,
                              env={**os.environ, "PATH": _SBIN, "MTOOLS_SKIP_CHECK": "1"})
    except FileNotFoundError:
        raise errors.DeviceError(f"{argv[0]} is missing: install it to provision ({what})") from None
    except subprocess.TimeoutExpired:
        raise errors.DeviceError(f"{what} did not finish within {timeout:g} s") from None
    if done.returncode != 0:
        raise errors.DeviceError(f"{what} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def _image_mb(path: str, given: int | None, what: str) -> int:
    if given is not None:
        return given
    with open(path, "rb") as image:
        head = image.read(4096)
    if detect_format(head) is not ImageFormat.RAW:
        raise errors.InvalidArgument(f"the {what} image {path} is compressed: say how large its slot is "
                                     f"(--{'slot' if what == 'system' else 'recovery'}-size MiB)")
    return -(-os.stat(path).st_size // MIB)


def plan(shape: LayoutShape, request: ProvisionRequest, slot_mb: int, recovery_mb: int) -> list[_Part]:
    """Every partition of ``shape`` with its size, in number order (data sized later when it takes the rest)."""
    parts = [_Part(1, "firmware", FAT_TYPE, AUTOBOOT_MB if shape.kind == "autoboot" else request.boot_mb)]
    for name, role, root, boot in shape.slots:
        size = recovery_mb if role == "recovery" else slot_mb
        parts.append(_Part(root, f"root:{name}", LINUX_TYPE, size))
        if boot is not None:
            parts.append(_Part(boot, f"boot:{name}", FAT_TYPE, request.boot_mb))
    parts.append(_Part(shape.data, "data", LINUX_TYPE, request.data_mb))
    if shape.extended is not None:
        parts.append(_Part(shape.extended, "extended", EXTENDED_TYPE, None))
    return sorted(parts, key=lambda part: part.number)


def _required_mb(parts: list[_Part], data_mb: int) -> int:
    # 1 MiB before the first partition and before each logical one (its EBR, aligned), 1 MiB spare at the end.
    sizes = [(p.size_mb if p.size_mb is not None else data_mb) + (1 if p.number > 4 else 0)
             for p in parts if p.role != "extended"]
    return 2 + sum(sizes)


def _sfdisk_script(parts: list[_Part], signature: int, data_mb: int, disk: str) -> str:
    """An sfdisk script naming every partition by its node, so the numbers are the layout's (an unused primary
    number, like p4 of main + recovery with the prefix scheme, stays unused)."""
    lines = ["label: dos", f"label-id: 0x{signature:08x}", "unit: sectors", ""]
    for part in parts:
        fields = [f"type={part.type}"]
        size = data_mb if part.role == "data" else part.size_mb
        if size is not None:  # the extended partition takes the rest
            fields.insert(0, f"size={size * MIB // SECTOR}")
        if part.role == "firmware":
            fields.append("bootable")
        lines.append(f"{partition_node(disk, part.number)} : " + ", ".join(fields))
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def attached(target: str, size_mb: int) -> Iterator[str]:
    """``target`` as a whole-disk block device: itself, or a loop device on the image file (grown to
    ``size_mb``), detached afterwards."""
    st = os.stat(target) if os.path.exists(target) else None
    if st is not None and stat.S_ISBLK(st.st_mode):
        check_not_in_use(target, st.st_rdev, mountinfo="/proc/self/mountinfo", swaps="/proc/swaps", sys_root="/sys")
        size = int(_run(["blockdev", "--getsize64", target], f"reading the size of {target}"))
        if size < size_mb * MIB:
            raise errors.TooLarge(f"{target} holds {size // MIB} MiB; this layout needs {size_mb} MiB")
        yield target
        return
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise errors.InvalidArgument(f"{target} is neither a block device nor an image file")
    with open(target, "ab") as image:
        if image.tell() < size_mb * MIB:
            image.truncate(size_mb * MIB)
    loop = _run(["losetup", "--find", "--show", "--sector-size", "512", target], f"attaching {target}").strip()
    try:
        yield loop
    finally:
        subprocess.run(["partx", "-d", loop], capture_output=True, timeout=60, check=False)
        subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=60, check=False)


def _partition_nodes(disk: str, layout: DiskLayout) -> None:
    """Make the kernel's partition nodes (partx: works where the kernel does not scan, e.g. loop devices)."""
    subprocess.run(["partx", "-d", disk], capture_output=True, timeout=60, check=False, env={"PATH": _SBIN})
    _run(["partx", "-a", disk], f"adding the partitions of {disk}")
    missing = [layout.node(p.number) for p in layout.table.partitions if not os.path.exists(layout.node(p.number))]
    if missing:
        raise errors.DeviceError(f"partx did not create {', '.join(missing)}")


def _boot_tree(source: str | None, root_device: str, into: Path) -> None:
    """The boot files for one slot: a tarball, a folder, or the root image's /boot/firmware (debugfs rdump)."""
    into.mkdir(parents=True)
    if source is None:
        _run(["debugfs", "-R", f"rdump /boot/firmware {into}", root_device], f"reading /boot/firmware of {root_device}")
        inner = into / "firmware"
        if inner.is_dir():
            for child in inner.iterdir():
                child.rename(into / child.name)
            inner.rmdir()
    elif os.path.isdir(source):
        shutil.copytree(source, into, dirs_exist_ok=True)
    else:
        extract_boot_tarball(Path(source), into)
    if not (into / "cmdline.txt").is_file():
        where = source or f"/boot/firmware of {root_device}"
        raise errors.InvalidArgument(f"the boot files from {where} have no cmdline.txt: give them with --boot")


def _slot_tree(tree: Path, slot: Slot) -> None:
    cmdline = tree / "cmdline.txt"
    cmdline.write_text(bootfiles.set_cmdline_root(cmdline.read_text(), f"PARTUUID={slot.root_partuuid}"))


def _root_fstab(layout: DiskLayout, slot: Slot, image_fstab: str, data_mount: str) -> str:
    fstab = bootfiles.set_fstab_mounts(image_fstab, root=f"PARTUUID={slot.root_partuuid}",
                                       boot=f"PARTUUID={slot.boot_partuuid}")
    if layout.data_partition is not None:
        fstab = with_data_mount(fstab, f"PARTUUID={layout.table.partition(layout.data_partition).partuuid}",
                                data_mount)
    if slot.role == "recovery":
        fstab = read_only_root(fstab)
    return fstab


def read_only_root(fstab: str) -> str:
    """The recovery root's fstab: ``/`` mounted read-only, and a tmpfs where the service keeps its state."""
    lines = fstab.splitlines()
    for index, line in enumerate(lines):
        fields = line.split()
        if len(fields) >= 4 and not line.lstrip().startswith("#") and fields[1] == "/":
            options = [o for o in fields[3].split(",") if o not in ("rw", "defaults")]
            fields[3] = ",".join(["ro", *options])
            lines[index] = "  ".join(fields)
    if RECOVERY_STATE_TMPFS not in bootfiles.fstab_mounts(fstab):
        lines.append(f"tmpfs  {RECOVERY_STATE_TMPFS}  tmpfs  mode=0700  0  0")
    return "\n".join(lines) + "\n"


def _fix_root(layout: DiskLayout, slot: Slot, data_mount: str, workdir: Path) -> str:
    """Check the root's version and write its fstab; returns the version."""
    config = Config(run_dir=str(workdir / "run"))
    with mounted(config, run_command, slot.root_device) as root:
        version = read_version_file((root / VERSION_FILE).read_bytes() if (root / VERSION_FILE).is_file() else b"")
        if not version:
            raise errors.BadImage(f"the image for slot {slot.name} has no readable /{VERSION_FILE}: it is not an "
                                  "ab-flasher slot image")
        fstab_path = root / "etc" / "fstab"
        image_fstab = fstab_path.read_text() if fstab_path.is_file() else ""
        fstab_path.parent.mkdir(parents=True, exist_ok=True)
        fstab_path.write_text(_root_fstab(layout, slot, image_fstab, data_mount))
        os.sync()
    return version


def _fill_boot(layout: DiskLayout, written: dict[str, Path], primary: Slot) -> None:
    """The boot partitions: each written slot's tree in its folder (prefix) or partition (autoboot), the
    firmware's files and config.txt on p1 (prefix), the switch files disarmed with ``primary`` committed."""
    firmware = open_volume(layout.node(1))
    if layout.kind == "prefix":
        primary_tree = written[primary.name]
        top = Path(tempfile.mkdtemp(prefix="firmware-", dir=primary_tree.parent))
        for pattern in FIRMWARE_PATTERNS:
            for found in primary_tree.glob(pattern):
                shutil.copy2(found, top / found.name)
        config = (top / "config.txt").read_text() if (top / "config.txt").is_file() else "[all]\n"
        assert primary.boot_prefix is not None
        (top / "config.txt").write_text(bootfiles.set_config_os_prefix(config, primary.boot_prefix))
        (top / "tryboot.txt").write_text(render_tryboot(primary.boot_prefix))
        for child in top.iterdir():
            firmware.write_atomic(child.name, child.read_bytes())
        for name, tree in written.items():
            prefix = layout.slot(name).boot_prefix
            assert prefix is not None
            firmware.import_tree(tree, prefix.rstrip("/"))
        return
    assert primary.boot_partition is not None
    bootcode = written[primary.name] / "bootcode.bin"
    if bootcode.is_file():
        firmware.write_atomic("bootcode.bin", bootcode.read_bytes())  # a Pi 3 reads it from p1 before autoboot.txt
    firmware.write_atomic("autoboot.txt", bootfiles.render_autoboot(primary.boot_partition,
                                                                    primary.boot_partition).encode())
    for name, tree in written.items():
        number = layout.slot(name).boot_partition
        assert number is not None
        open_volume(layout.node(number)).import_tree(tree, "/")


def _zero_head(device: str) -> None:
    """An empty slot reads as empty (no stale file system or version from an earlier use of the card)."""
    with open(device, "r+b") as handle:
        handle.write(bytes(MIB))
        handle.flush()
        os.fsync(handle.fileno())


def provision(request: ProvisionRequest) -> DiskLayout:
    """Lay out ``request.target``; returns the layout as ab-flasher now reads it from the disk."""
    shape = layout_shape(request.kind, request.variant)
    has_recovery = request.variant != AB
    if has_recovery != (request.recovery_image is not None):
        raise errors.InvalidArgument("the recovery layouts need a recovery image (--recovery), the A/B layout none"
                                     if has_recovery else "the A/B layout has no recovery slot: drop --recovery")
    for image in (request.system_image, request.recovery_image):
        if image is not None and not os.path.isfile(image):
            raise errors.InvalidArgument(f"image {image} does not exist")
    slot_mb = _image_mb(request.system_image, request.slot_mb, "system")
    recovery_mb = _image_mb(request.recovery_image, request.recovery_mb, "recovery") if request.recovery_image \
        else 0
    parts = plan(shape, request, slot_mb, recovery_mb)
    is_file = not os.path.exists(request.target) or stat.S_ISREG(os.stat(request.target).st_mode)
    data_mb = request.data_mb if request.data_mb is not None else 64
    needed = _required_mb(parts, data_mb)
    if not is_file and request.data_mb is None:
        disk_mb = int(_run(["blockdev", "--getsize64", request.target], "reading the disk size")) // MIB
        data_mb = disk_mb - needed + data_mb
        if data_mb < 1:
            raise errors.TooLarge(f"{request.target} holds {disk_mb} MiB; this layout needs {needed - 63} MiB")
    signature = request.signature if request.signature is not None else secrets.randbits(32) or 1
    with attached(request.target, needed) as disk, tempfile.TemporaryDirectory(prefix="ab-flasher-provision-") as tmp:
        work = Path(tmp)
        _run(["sfdisk", "--quiet", "--wipe", "always", "--no-reread", "--no-tell-kernel", disk],
             f"writing the partition table of {disk}", input_text=_sfdisk_script(parts, signature, data_mb, disk))
        layout = detect_layout(read_table(disk), disk, request.kind)
        _partition_nodes(disk, layout)
        for part in parts:
            if part.type == FAT_TYPE:
                label = "BOOT" if part.role == "firmware" else part.role.split(":")[1][:8].upper()
                _run(["mkfs.vfat", "-n", label, layout.node(part.number)], f"formatting p{part.number}")
        assert layout.data_partition is not None
        _run(["mkfs.ext4", "-q", "-F", "-L", "data", layout.node(layout.data_partition)], "formatting the data "
             "partition")
        system = [s for s in layout.slots if s.role == "system"]
        primary = system[0]
        images = {primary.name: (request.system_image, request.boot_files)}
        recovery = layout.recovery
        if recovery is not None and request.recovery_image is not None:
            images[recovery.name] = (request.recovery_image, request.recovery_boot_files)
        for empty in system[1:]:
            _zero_head(empty.root_device)
        trees: dict[str, Path] = {}
        for name, (image, boot_files) in images.items():
            slot = layout.slot(name)
            source = FileSource(image)
            try:
                install_image(source, slot.root_device)
            finally:
                source.close()
            _fix_root(layout, slot, request.data_mount, work)
            trees[name] = work / f"boot-{name}"
            _boot_tree(boot_files, slot.root_device, trees[name])
            _slot_tree(trees[name], slot)
        _fill_boot(layout, trees, primary)
        os.sync()
    return detect_layout(read_table(request.target), request.target, request.kind)
