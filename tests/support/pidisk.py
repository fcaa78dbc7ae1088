"""Simulated Raspberry Pi disks as plain image files, built without root.

The partition table comes from `sfdisk` run on the file, FAT boot partitions from `mkfs.vfat --offset` and are
filled with mtools (`-i IMG@@BYTES`), ext4 roots from `mkfs.ext4 -d DIR -E offset=BYTES`. Nothing is mounted, so
no loop device and no root is needed; a test that wants block devices can `losetup` the finished file itself.

Two layouts (docs/architecture.md, "Disk layouts"):

- ``prefix``: p1 FAT boot (``config.txt`` with ``os_prefix=a/``, ``a/`` and ``b/`` holding each slot's kernel, dtbs,
  overlays and ``cmdline.txt``), p2/p3 root A/B (ext4), p4 data (ext4).
- ``autoboot``: p1 small FAT holding only ``autoboot.txt``, p2/p3 boot A/B (FAT), p4 extended, p5/p6 root A/B
  (ext4), p7 data (ext4).

The disk signature is fixed by default so PARTUUIDs (``1234abcd-02``) are the same on every run.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from abflasher.boot.slotswitch import render_tryboot

SECTOR = 512
MIB = 1024 * 1024

Layout = Literal["prefix", "autoboot"]
Variant = Literal["ab", "ab+recovery", "main+recovery"]
Slot = Literal["a", "b"]
SwitchFiles = Literal["disarmed", "legacy"]
SLOTS: tuple[Slot, Slot] = ("a", "b")

DEFAULT_SIGNATURE = 0x1234ABCD
# The signature a standalone update image carries in its fstab: the machine that built the image, not this disk.
IMAGE_BUILD_SIGNATURE = 0xDEADBEEF

FAT_TYPE = 0x0C
LINUX_TYPE = 0x83
EXTENDED_TYPE = 0x05

MIN_DATA_MB = 4

# mtools otherwise complains about geometries that no floppy drive ever had, and must not read a user's ~/.mtoolsrc.
_MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": os.devnull}


class PiDiskError(RuntimeError):
    """A tool used to build or read a simulated disk failed; the message carries its stderr."""


@dataclass(frozen=True)
class PiPartition:
    """One partition of a simulated disk; ``start`` and ``size`` are in 512-byte sectors."""

    number: int
    start: int
    size: int
    type_id: int
    role: str

    @property
    def offset(self) -> int:
        """Byte offset of the partition in the image (what mtools ``@@`` and debugfs ``?offset=`` take)."""
        return self.start * SECTOR

    @property
    def size_bytes(self) -> int:
        return self.size * SECTOR


@dataclass(frozen=True)
class PiDisk:
    """What `build_pi_disk` made: where it is and which partition plays which role.

    Roles: ``boot`` (prefix p1), ``autoboot`` (autoboot p1), ``boot_a``/``boot_b`` (autoboot p2/p3), ``root_a``,
    ``root_b``, ``data`` and ``extended``.
    """

    path: Path
    layout: Layout
    signature: int
    partitions: tuple[PiPartition, ...]
    variant: Variant = "ab"

    @property
    def slot_names(self) -> tuple[str, ...]:
        return tuple(part.role.removeprefix("root_") for part in self.partitions if part.role.startswith("root_"))

    def partition(self, number: int) -> PiPartition:
        for part in self.partitions:
            if part.number == number:
                return part
        raise KeyError(f"{self.path} has no partition {number}")

    def by_role(self, role: str) -> PiPartition:
        for part in self.partitions:
            if part.role == role:
                return part
        raise KeyError(f"{self.path} ({self.layout} layout) has no partition with role {role!r}")

    def root(self, slot: Slot) -> PiPartition:
        return self.by_role(f"root_{slot}")

    def boot(self, slot: Slot) -> PiPartition:
        """The FAT partition holding a slot's boot files (shared p1 in the prefix layout)."""
        return self.by_role("boot") if self.layout == "prefix" else self.by_role(f"boot_{slot}")

    def partuuid(self, number: int) -> str:
        return mbr_partuuid(self.signature, number)


def mbr_partuuid(signature: int, number: int) -> str:
    """MBR PARTUUID as Linux prints it: the disk signature in 8 hex digits, ``-``, the number in 2 hex digits."""
    return f"{signature:08x}-{number:02x}"


# --------------------------------------------------------------------------------------------------- running tools


def _run(args: list[str], *, input_bytes: bytes | None = None) -> bytes:
    env = {**os.environ, **_MTOOLS_ENV}
    proc = subprocess.run(args, input=input_bytes, capture_output=True, env=env, timeout=60, check=False)
    if proc.returncode != 0:
        stderr = proc.stderr.decode(errors="replace").strip()
        raise PiDiskError(f"{' '.join(args)} failed with exit code {proc.returncode}: {stderr}")
    return proc.stdout


def _mtools_image(img: Path, offset: int) -> str:
    return f"{img}@@{offset}"


def _fat_path(path: str) -> str:
    return "::/" + path.strip("/")


# --------------------------------------------------------------------------------------------------- FAT helpers


def make_fat(img: Path, offset: int, size_bytes: int, label: str) -> None:
    """Format a FAT16 filesystem inside ``img`` at byte ``offset`` (the Pi firmware reads FAT16 and FAT32)."""
    if offset % SECTOR or size_bytes % 1024:
        raise ValueError(f"FAT offset {offset} must be sector aligned and size {size_bytes} a multiple of 1 KiB")
    # mkfs.vfat's default cluster size leaves a small FAT16 under the 4085 clusters FAT16 needs: pick it here.
    sectors_per_cluster = 1
    while size_bytes // (SECTOR * sectors_per_cluster) > 65_000:
        sectors_per_cluster *= 2
    _run(["mkfs.vfat", "--invariant", "-F", "16", "-s", str(sectors_per_cluster), "-n", label,
          "--offset", str(offset // SECTOR), str(img), str(size_bytes // 1024)])


def fat_read(img: Path, offset: int, path: str) -> bytes:
    """Contents of ``path`` on the FAT filesystem at byte ``offset`` of ``img``; `FileNotFoundError` if absent."""
    if not fat_exists(img, offset, path):
        raise FileNotFoundError(f"{path} not found on the FAT filesystem at offset {offset} of {img}")
    return _run(["mcopy", "-n", "-i", _mtools_image(img, offset), _fat_path(path), "-"])


def fat_write(img: Path, offset: int, path: str, data: bytes | str) -> None:
    """Create or replace ``path`` on the FAT filesystem at ``offset``, creating parent folders as needed."""
    payload = data.encode() if isinstance(data, str) else data
    parent = path.strip("/").rpartition("/")[0]
    if parent:
        fat_mkdir(img, offset, parent)
    with tempfile.TemporaryDirectory(prefix="pidisk-") as tmp:
        staged = Path(tmp) / "payload"
        staged.write_bytes(payload)
        _run(["mcopy", "-o", "-i", _mtools_image(img, offset), str(staged), _fat_path(path)])


def fat_mkdir(img: Path, offset: int, path: str) -> None:
    """Create folder ``path`` and its parents (like ``mkdir -p``)."""
    built = ""
    for part in path.strip("/").split("/"):
        built = f"{built}/{part}" if built else part
        if not fat_exists(img, offset, built):
            _run(["mmd", "-i", _mtools_image(img, offset), _fat_path(built)])


def fat_delete(img: Path, offset: int, path: str) -> None:
    _run(["mdel", "-i", _mtools_image(img, offset), _fat_path(path)])


def fat_list(img: Path, offset: int, path: str = "/") -> list[str]:
    """Names in folder ``path`` (sub-folders end with ``/``); `FileNotFoundError` if there is no such folder."""
    target = _fat_path(path)
    env = {**os.environ, **_MTOOLS_ENV}
    proc = subprocess.run(["mdir", "-b", "-i", _mtools_image(img, offset), target], capture_output=True,
                          env=env, timeout=60, check=False)
    if proc.returncode != 0:
        raise FileNotFoundError(f"{path} not found on the FAT filesystem at offset {offset} of {img}")
    names: list[str] = []
    prefix = target.rstrip("/") + "/"
    for line in proc.stdout.decode(errors="replace").splitlines():
        if not line.startswith(prefix):
            # `mdir -b` on a file prints the file itself: that is not a folder listing.
            raise FileNotFoundError(f"{path} is a file, not a folder, on the FAT filesystem at offset {offset}")
        names.append(line[len(prefix):])
    return names


def fat_exists(img: Path, offset: int, path: str) -> bool:
    parent, _, name = path.strip("/").rpartition("/")
    if not name:
        return True
    try:
        entries = fat_list(img, offset, parent or "/")
    except FileNotFoundError:
        return False
    return name.lower() in (entry.rstrip("/").lower() for entry in entries)


def fat_put_tree(img: Path, offset: int, source: Path) -> None:
    """Copy the contents of directory ``source`` (recursively) to the root of the FAT filesystem."""
    entries = sorted(str(child) for child in source.iterdir())
    if entries:
        _run(["mcopy", "-s", "-Q", "-o", "-i", _mtools_image(img, offset), *entries, "::/"])


# --------------------------------------------------------------------------------------------------- ext4 helpers


def make_ext4(img: Path, offset: int, size_bytes: int, source: Path, *, label: str, uuid: str) -> None:
    """Make an ext4 filesystem at byte ``offset`` of ``img`` holding the tree ``source`` (no mount, no root)."""
    if size_bytes % 1024:
        raise ValueError(f"ext4 size {size_bytes} must be a multiple of 1 KiB")
    _run(["mkfs.ext4", "-q", "-F", "-L", label, "-U", uuid, "-d", str(source), "-E", f"offset={offset}",
          str(img), f"{size_bytes // 1024}k"])


def ext4_read(img: Path, path: str, *, offset: int = 0) -> bytes:
    """Contents of ``path`` on the ext4 filesystem at byte ``offset`` of ``img``; `FileNotFoundError` if absent."""
    if any(ch in path for ch in " \"'\n"):
        raise ValueError(f"ext4_read cannot pass {path!r} to debugfs: use a path without blanks or quotes")
    with tempfile.TemporaryDirectory(prefix="pidisk-") as tmp:
        out = Path(tmp) / "out"
        # debugfs exits 0 even when the file is missing; whether it wrote the dump is the reliable answer.
        _run(["debugfs", "-R", f"dump {path} {out}", f"{img}?offset={offset}"])
        if not out.exists():
            raise FileNotFoundError(f"{path} not found on the ext4 filesystem at offset {offset} of {img}")
        return out.read_bytes()


def read_ab_version(img: Path, *, offset: int = 0) -> str | None:
    """The slot version in ``/.ab_version`` of the root filesystem at ``offset``, or None if it has none."""
    if not _has_ext_superblock(img, offset):
        return None
    try:
        return ext4_read(img, "/.ab_version", offset=offset).decode().strip()
    except FileNotFoundError:
        return None


def _has_ext_superblock(img: Path, offset: int) -> bool:
    with img.open("rb") as fh:
        fh.seek(offset + 1024 + 56)
        return fh.read(2) == b"\x53\xef"


# --------------------------------------------------------------------------------------------------- file trees


def fstab_text(signature: int, *, root: int, boot: int, data: int | None) -> str:
    lines = [
        "# ab-flasher test root: PARTUUIDs are rewritten for the slot the root is installed to",
        "proc  /proc  proc  defaults  0  0",
        f"PARTUUID={mbr_partuuid(signature, boot)}  /boot/firmware  vfat  defaults  0  2",
        f"PARTUUID={mbr_partuuid(signature, root)}  /  ext4  defaults,noatime  0  1",
    ]
    if data is not None:
        lines.append(f"PARTUUID={mbr_partuuid(signature, data)}  /data  ext4  defaults,noatime  0  2")
    return "\n".join(lines) + "\n"


def cmdline_text(signature: int, root: int) -> str:
    return (f"console=serial0,115200 console=tty1 root=PARTUUID={mbr_partuuid(signature, root)} rootfstype=ext4 "
            "fsck.repair=yes rootwait\n")


def _write_tree(base: Path, files: Mapping[str, bytes | str]) -> None:
    for rel, content in files.items():
        target = base / rel.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            target.write_text(content)
        else:
            target.write_bytes(content)


def _root_tree(base: Path, version: str, fstab: str, extra_files: Mapping[str, bytes | str] | None) -> None:
    base.mkdir(parents=True, exist_ok=True)
    for mount_point in ("boot/firmware", "data", "proc", "dev", "sys", "tmp"):
        (base / mount_point).mkdir(parents=True, exist_ok=True)
    _write_tree(base, {
        ".ab_version": version + "\n",
        "etc/fstab": fstab,
        "etc/hostname": "abtest\n",
        "etc/os-release": f'PRETTY_NAME="ab-flasher test root {version}"\nID=debian\nVERSION_ID="12"\n',
        "usr/share/abtest/slot-payload.txt": f"payload of the root filesystem for version {version}\n",
    })
    if extra_files:
        _write_tree(base, extra_files)


def _slot_boot_files(slot: str, version: str | None, cmdline: str) -> dict[str, bytes | str]:
    """A slot's OS boot files: what `os_prefix` (or the slot's own boot partition) points at."""
    tag = f"slot {slot} version {version or 'none'}"
    return {
        "kernel8.img": f"fake arm64 kernel, {tag}\n",
        "kernel_2712.img": f"fake arm64 kernel for BCM2712, {tag}\n",
        "bcm2711-rpi-4-b.dtb": f"fake device tree for Pi 4 B, {tag}\n",
        "bcm2712-rpi-5-b.dtb": f"fake device tree for Pi 5 B, {tag}\n",
        "overlays/README": "fake overlays folder\n",
        "overlays/vc4-kms-v3d.dtbo": "fake overlay\n",
        "cmdline.txt": cmdline,
    }


_FIRMWARE_FILES: dict[str, bytes | str] = {
    "start4.elf": "fake VideoCore firmware for BCM2711\n",
    "fixup4.dat": "fake fixup data for BCM2711\n",
}


# --------------------------------------------------------------------------------------------------- builders


@dataclass(frozen=True)
class _Planned:
    role: str
    type_id: int
    size_mb: int | None  # None: fill the rest of the disk
    logical: bool = False


def _plan(layout: Layout, *, boot_mb: int, root_mb: int, autoboot_mb: int) -> list[_Planned]:
    if layout == "prefix":
        return [
            _Planned("boot", FAT_TYPE, boot_mb),
            _Planned("root_a", LINUX_TYPE, root_mb),
            _Planned("root_b", LINUX_TYPE, root_mb),
            _Planned("data", LINUX_TYPE, None),
        ]
    return [
        _Planned("autoboot", FAT_TYPE, autoboot_mb),
        _Planned("boot_a", FAT_TYPE, boot_mb),
        _Planned("boot_b", FAT_TYPE, boot_mb),
        _Planned("extended", EXTENDED_TYPE, None),
        _Planned("root_a", LINUX_TYPE, root_mb, logical=True),
        _Planned("root_b", LINUX_TYPE, root_mb, logical=True),
        _Planned("data", LINUX_TYPE, None, logical=True),
    ]


def _required_mb(plan: list[_Planned]) -> int:
    # 1 MiB before the first partition, and 1 MiB before each logical one (its EBR, aligned).
    total = 1
    for item in plan:
        if item.role == "extended":
            continue
        total += (item.size_mb if item.size_mb is not None else MIN_DATA_MB) + (1 if item.logical else 0)
    return total


def _sfdisk_script(plan: list[_Planned], signature: int) -> str:
    lines = ["label: dos", f"label-id: 0x{signature:08x}", "unit: sectors", ""]
    for index, item in enumerate(plan):
        fields = [f"type={item.type_id:x}"]
        if item.size_mb is not None:
            fields.insert(0, f"size={item.size_mb * MIB // SECTOR}")
        if index == 0:
            fields.append("bootable")
        lines.append(", ".join(fields))
    return "\n".join(lines) + "\n"


def read_partitions(img: Path) -> list[tuple[int, int, int, int]]:
    """(number, start sector, size in sectors, type id) of each partition in ``img``, by `sfdisk --json`."""
    table = json.loads(_run(["sfdisk", "--json", str(img)]))["partitiontable"]
    result: list[tuple[int, int, int, int]] = []
    for entry in table.get("partitions", []):
        suffix = str(entry["node"]).removeprefix(str(img)).removeprefix("p")
        result.append((int(suffix), int(entry["start"]), int(entry["size"]), int(str(entry["type"]), 16)))
    return result


def build_pi_disk(
    path: Path,
    layout: Layout = "prefix",
    *,
    version_a: str | None = "1.0.0",
    version_b: str | None = None,
    primary: Slot = "a",
    signature: int = DEFAULT_SIGNATURE,
    size_mb: int | None = None,
    boot_mb: int = 16,
    root_mb: int = 16,
    autoboot_mb: int = 8,
    slot_b_boot_files: bool = True,
    root_extra_files: Mapping[str, bytes | str] | None = None,
    switch_files: SwitchFiles = "disarmed",
) -> PiDisk:
    """Write a simulated Pi disk image to ``path`` and describe it.

    A slot whose version is None has an all-zero root partition (never written). ``slot_b_boot_files=False`` leaves
    slot B without boot files (prefix: no ``b/`` folder; autoboot: p3 formatted but empty), to simulate a slot that
    cannot boot. ``switch_files`` is how the files that switch slots look: ``"disarmed"``, as ab-flasher leaves them
    (prefix: a ``tryboot.txt`` of ab-flasher's form trying the primary; autoboot: ``[tryboot]`` naming the primary),
    or ``"legacy"``, as earlier versions and hand-made setups left them (prefix: no ``tryboot.txt``; autoboot: the
    canonical ``autoboot.txt`` whose ``[tryboot]`` names the other slot).

    The data partition takes whatever ``size_mb`` leaves (at least 4 MiB); by default the disk is as
    small as the partitions allow (about 60 MiB prefix, 90 MiB autoboot).
    """
    if layout not in ("prefix", "autoboot"):
        raise ValueError(f"unknown layout {layout!r}: use 'prefix' or 'autoboot'")
    if primary not in ("a", "b"):
        raise ValueError(f"primary slot must be 'a' or 'b', not {primary!r}")
    if not 0 <= signature <= 0xFFFFFFFF:
        raise ValueError(f"disk signature {signature:#x} does not fit in 32 bits")
    plan = _plan(layout, boot_mb=boot_mb, root_mb=root_mb, autoboot_mb=autoboot_mb)
    required = _required_mb(plan)
    total_mb = required if size_mb is None else size_mb
    if total_mb < required:
        raise ValueError(f"a {layout} disk with these partition sizes needs at least {required} MiB, not {total_mb}")

    path = Path(path)
    with path.open("wb") as fh:
        fh.truncate(total_mb * MIB)
    _run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(path)],
         input_bytes=_sfdisk_script(plan, signature).encode())
    found = read_partitions(path)
    if len(found) != len(plan):
        raise PiDiskError(f"sfdisk made {len(found)} partitions in {path}, expected {len(plan)}")
    disk = PiDisk(
        path=path,
        layout=layout,
        signature=signature,
        partitions=tuple(PiPartition(number, start, size, type_id, item.role)
                         for (number, start, size, type_id), item in zip(found, plan, strict=True)),
    )
    versions: dict[Slot, str | None] = {"a": version_a, "b": version_b}
    with tempfile.TemporaryDirectory(prefix="pidisk-") as tmp:
        staging = Path(tmp)
        if layout == "prefix":
            _fill_prefix(disk, staging, versions, primary, slot_b_boot_files, switch_files=switch_files)
        else:
            _fill_autoboot(disk, staging, versions, primary, slot_b_boot_files, switch_files=switch_files)
        _fill_roots_and_data(disk, staging, versions, root_extra_files)
    return disk


def _fill_prefix(disk: PiDisk, staging: Path, versions: Mapping[Slot, str | None], primary: Slot,
                 slot_b_boot_files: bool, *, switch_files: SwitchFiles) -> None:
    boot = disk.by_role("boot")
    tree = staging / "boot"
    files: dict[str, bytes | str] = dict(_FIRMWARE_FILES)
    files["config.txt"] = prefix_config_text(primary)
    if switch_files == "disarmed":
        files["tryboot.txt"] = render_tryboot(f"{primary}/")
    for slot in SLOTS:
        if slot == "b" and not slot_b_boot_files:
            continue
        root = disk.root(slot)
        for rel, content in _slot_boot_files(slot, versions[slot], cmdline_text(disk.signature, root.number)).items():
            files[f"{slot}/{rel}"] = content
    _write_tree(tree, files)
    make_fat(disk.path, boot.offset, boot.size_bytes, "BOOT")
    fat_put_tree(disk.path, boot.offset, tree)


def prefix_config_text(slot: Slot) -> str:
    """The ``config.txt`` (or ``tryboot.txt``) of the prefix layout selecting ``slot``."""
    return f"# ab-flasher test disk, prefix layout\n[all]\narm_64bit=1\nenable_uart=1\nos_prefix={slot}/\n"


def autoboot_text(primary_partition: int, trial_partition: int) -> str:
    """The canonical ``autoboot.txt``: ``primary_partition`` boots, ``trial_partition`` with the tryboot flag."""
    return (f"[all]\ntryboot_a_b=1\nboot_partition={primary_partition}\n"
            f"[tryboot]\nboot_partition={trial_partition}\n")


def _fill_autoboot(disk: PiDisk, staging: Path, versions: Mapping[Slot, str | None], primary: Slot,
                   slot_b_boot_files: bool, *, switch_files: SwitchFiles) -> None:
    other: Slot = "b" if primary == "a" else "a"
    selector = disk.by_role("autoboot")
    make_fat(disk.path, selector.offset, selector.size_bytes, "AUTOBOOT")
    trial = disk.boot(other if switch_files == "legacy" else primary).number
    fat_write(disk.path, selector.offset, "autoboot.txt", autoboot_text(disk.boot(primary).number, trial))
    for slot in SLOTS:
        boot = disk.boot(slot)
        make_fat(disk.path, boot.offset, boot.size_bytes, f"BOOT{slot.upper()}")
        if slot == "b" and not slot_b_boot_files:
            continue
        files: dict[str, bytes | str] = dict(_FIRMWARE_FILES)
        files["config.txt"] = "# ab-flasher test disk, autoboot layout\n[all]\narm_64bit=1\nenable_uart=1\n"
        files.update(_slot_boot_files(slot, versions[slot], cmdline_text(disk.signature, disk.root(slot).number)))
        tree = staging / f"boot_{slot}"
        _write_tree(tree, files)
        fat_put_tree(disk.path, boot.offset, tree)


def _fill_roots_and_data(disk: PiDisk, staging: Path, versions: Mapping[Slot, str | None],
                         extra_files: Mapping[str, bytes | str] | None) -> None:
    data = disk.by_role("data")
    for index, slot in enumerate(SLOTS, start=1):
        version = versions[slot]
        if version is None:
            continue
        root = disk.root(slot)
        tree = staging / f"root_{slot}"
        fstab = fstab_text(disk.signature, root=root.number, boot=disk.boot(slot).number, data=data.number)
        _root_tree(tree, version, fstab, extra_files)
        make_ext4(disk.path, root.offset, root.size_bytes, tree, label=f"root{slot}",
                  uuid=f"{disk.signature:08x}-0000-4000-8000-{index:012x}")
    data_tree = staging / "data"
    _write_tree(data_tree, {"README": "the data partition: ab-flasher never writes it\n"})
    make_ext4(disk.path, data.offset, data.size_bytes, data_tree, label="data",
              uuid=f"{disk.signature:08x}-0000-4000-8000-{0xDA7A:012x}")


def build_root_image(
    path: Path,
    version: str,
    size_mb: int = 16,
    extra_files: Mapping[str, bytes | str] | None = None,
    *,
    fstab: str | None = None,
) -> None:
    """Write a standalone ext4 root filesystem image (an update image before compression) to ``path``.

    It carries ``/.ab_version`` = ``version`` and, unless ``fstab`` is given, an ``/etc/fstab`` naming the PARTUUIDs
    of the machine that built it (signature ``deadbeef``, prefix-layout numbers), which an install must rewrite.
    """
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="pidisk-") as tmp:
        tree = Path(tmp) / "root"
        if fstab is None:
            fstab = fstab_text(IMAGE_BUILD_SIGNATURE, root=2, boot=1, data=4)
        _root_tree(tree, version, fstab, extra_files)
        with path.open("wb") as fh:
            fh.truncate(size_mb * MIB)
        make_ext4(path, 0, size_mb * MIB, tree, label="rootfs", uuid="deadbeef-0000-4000-8000-000000000001")

