"""The partition table of a disk or a disk image, as util-linux `sfdisk --json` reports it, with PARTUUIDs.

sfdisk reads image files as well as block devices, and needs no root for files. PARTUUIDs are computed the way the
kernel and blkid compute them, because that is what `root=PARTUUID=...` in cmdline.txt and `/etc/fstab` refer to:
on MBR the 32-bit disk signature as 8 lowercase hex digits, '-', and the partition number as 2 hex digits
(partition 10 is `-0a`); on GPT the partition's own GUID, lower case.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Literal

from abflasher.errors import DeviceError, InvalidArgument

# MBR types of extended partitions (the containers of logical partitions 5, 6, ...): DOS, Win95 LBA, Linux.
DOS_EXTENDED_TYPES = frozenset({"5", "f", "85"})

# sfdisk lives in /usr/sbin, which is not on every caller's PATH (unprivileged shells, some service managers).
_SBIN_PATH = "/usr/sbin:/sbin"

_SFDISK_TIMEOUT_SECONDS = 60

_GUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
_DOS_ID = re.compile(r"0x[0-9A-Fa-f]{1,8}")
_TRAILING_NUMBER = re.compile(r"([1-9][0-9]*)$")

# Whole disks whose kernel names end in a digit; their partitions get a 'p' before the number.
_DIGIT_DISK_NAME = re.compile(
    r"(mmcblk[0-9]+|mmcblk[0-9]+boot[0-9]+|nvme[0-9]+n[0-9]+|loop[0-9]+|nbd[0-9]+|md[0-9]+|zram[0-9]+|ram[0-9]+"
    r"|rbd[0-9]+|dm-[0-9]+|sr[0-9]+)"
)


@dataclass(frozen=True)
class Partition:
    """One entry of a partition table; start and size are in sectors of the table's sector size."""

    number: int
    start: int
    size: int
    type: str  # MBR: hex without 0x as sfdisk prints it ("c", "83", "5"); GPT: type GUID, lower case
    partuuid: str
    node: str | None  # the partition's device node for disks under /dev; None for image files
    bootable: bool  # MBR: the boot flag; GPT: the LegacyBIOSBootable attribute
    name: str | None  # GPT partition name; None on MBR or when unnamed

    @property
    def is_extended(self) -> bool:
        """An MBR extended partition: a container for logical partitions, never a file system."""
        return self.type in DOS_EXTENDED_TYPES


@dataclass(frozen=True)
class PartitionTable:
    label: Literal["dos", "gpt"]
    id: str  # the disk identifier as sfdisk prints it: "0x1234abcd" or a GUID
    device: str
    sector_size: int
    partitions: tuple[Partition, ...]

    @property
    def ptuuid(self) -> str:
        """The disk identifier the way blkid prints PTUUID: 8 lower-case hex digits on MBR, a lower-case GUID."""
        if self.label == "dos":
            return f"{int(self.id, 16):08x}"
        return self.id.lower()

    def partition(self, number: int) -> Partition:
        for partition in self.partitions:
            if partition.number == number:
                return partition
        present = ", ".join(str(partition.number) for partition in self.partitions) or "none"
        raise DeviceError(f"{self.device} has no partition {number} (its partitions: {present})")

    def by_partuuid(self, partuuid: str) -> Partition:
        wanted = partuuid.strip().lower()
        for partition in self.partitions:
            if partition.partuuid == wanted:
                return partition
        raise DeviceError(f"{self.device} has no partition with PARTUUID {partuuid.strip()!r}")

    def offset_bytes(self, number: int) -> int:
        return self.partition(number).start * self.sector_size

    def size_bytes(self, number: int) -> int:
        return self.partition(number).size * self.sector_size

    def is_extended(self, number: int) -> bool:
        return self.partition(number).is_extended


def _mbr_partuuid(signature: int, number: int) -> str:
    return f"{signature:08x}-{number:02x}"


def _require(entry: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = entry.get(key)
    # bool is an int subclass; a JSON true is never a valid sector count.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidArgument(f"{where}: '{key}' is missing or not a {kind.__name__}")
    return value


def parse_sfdisk_json(text: str, device: str) -> PartitionTable:
    """Parse what `sfdisk --json DEVICE` printed. Pure: no I/O.

    Raises InvalidArgument for output that is not sfdisk's JSON, DeviceError for a table type other than MBR/GPT.
    """
    where = f"sfdisk output for {device}"
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{where} is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    table = document.get("partitiontable") if isinstance(document, dict) else None
    if not isinstance(table, dict):
        raise InvalidArgument(f"{where} has no 'partitiontable' object")

    label = _require(table, "label", str, where)
    if label not in ("dos", "gpt"):
        raise DeviceError(f"{device} has a {label!r} partition table; only MBR (dos) and GPT are supported")
    disk_id = _require(table, "id", str, where)
    if label == "dos" and not _DOS_ID.fullmatch(disk_id):
        raise InvalidArgument(f"{where}: MBR disk id {disk_id!r} is not 0x followed by up to 8 hex digits")
    if label == "gpt" and not _GUID.fullmatch(disk_id):
        raise InvalidArgument(f"{where}: GPT disk id {disk_id!r} is not a GUID")
    unit = table.get("unit", "sectors")
    if unit != "sectors":
        raise InvalidArgument(f"{where}: unit is {unit!r}, expected 'sectors'")
    # util-linux before 2.36 did not print the sector size; those tables were all 512-byte ones.
    sector_size = _require(table, "sectorsize", int, where) if "sectorsize" in table else 512
    if sector_size <= 0:
        raise InvalidArgument(f"{where}: sector size {sector_size} is not positive")

    entries = table.get("partitions", [])
    if not isinstance(entries, list):
        raise InvalidArgument(f"{where}: 'partitions' is not a list")
    signature = int(disk_id, 16) if label == "dos" else 0
    # sfdisk names partitions of image files "disk.img1", which is not a file; only /dev names are real nodes.
    has_nodes = device.startswith("/dev/")
    partitions: list[Partition] = []
    for index, entry in enumerate(entries):
        entry_where = f"{where}, partition entry {index + 1}"
        if not isinstance(entry, dict):
            raise InvalidArgument(f"{entry_where} is not an object")
        node = _require(entry, "node", str, entry_where)
        number_match = _TRAILING_NUMBER.search(node)
        if number_match is None:
            raise InvalidArgument(f"{entry_where}: node {node!r} does not end in a partition number")
        number = int(number_match.group(1))
        start = _require(entry, "start", int, entry_where)
        size = _require(entry, "size", int, entry_where)
        if start < 0 or size < 0:
            raise InvalidArgument(f"{entry_where}: negative start or size")
        partition_type = _require(entry, "type", str, entry_where).lower()
        if label == "dos":
            partuuid = _mbr_partuuid(signature, number)
            bootable = entry.get("bootable") is True
            name = None
        else:
            uuid = _require(entry, "uuid", str, entry_where)
            if not _GUID.fullmatch(uuid):
                raise InvalidArgument(f"{entry_where}: partition GUID {uuid!r} is not a GUID")
            partuuid = uuid.lower()
            attributes = entry.get("attrs", "")
            bootable = isinstance(attributes, str) and "LegacyBIOSBootable" in attributes.split()
            raw_name = entry.get("name")
            name = raw_name if isinstance(raw_name, str) and raw_name else None
        if any(existing.number == number for existing in partitions):
            raise InvalidArgument(f"{where} lists partition {number} twice")
        partitions.append(
            Partition(
                number=number,
                start=start,
                size=size,
                type=partition_type,
                partuuid=partuuid,
                node=node if has_nodes else None,
                bootable=bootable,
                name=name,
            )
        )
    return PartitionTable(label=label, id=disk_id, device=device, sector_size=sector_size, partitions=tuple(partitions))


def _find_sfdisk(sfdisk: str) -> str:
    if os.sep in sfdisk:
        found = sfdisk if os.access(sfdisk, os.X_OK) else None
    else:
        found = shutil.which(sfdisk) or shutil.which(sfdisk, path=_SBIN_PATH)
    if found is None:
        raise DeviceError(f"{sfdisk!r} was not found; install util-linux's sfdisk (Debian package 'fdisk')")
    return found


def read_table(disk: str, *, sfdisk: str = "sfdisk") -> PartitionTable:
    """The partition table of a block device or image file, read with `sfdisk --json`.

    Raises DeviceError when sfdisk is missing or fails, the disk does not exist or has no (supported) table.
    """
    executable = _find_sfdisk(sfdisk)
    if not os.path.exists(disk):
        raise DeviceError(f"{disk} does not exist")
    # Messages are matched below, so they must not be translated.
    environment = {**os.environ, "LC_ALL": "C"}
    try:
        result = subprocess.run(
            [executable, "--json", "--", disk],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=_SFDISK_TIMEOUT_SECONDS,
            env=environment,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise DeviceError(f"sfdisk did not finish reading {disk} within {_SFDISK_TIMEOUT_SECONDS} s") from None
    except OSError as exc:
        raise DeviceError(f"could not run {executable}: {exc.strerror or exc}") from None
    if result.returncode != 0:
        message = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        if "does not contain a recognized partition table" in message:
            raise DeviceError(f"{disk} has no partition table (neither MBR nor GPT)")
        raise DeviceError(f"sfdisk could not read the partition table of {disk}: {message}")
    try:
        return parse_sfdisk_json(result.stdout, disk)
    except InvalidArgument as exc:
        # Garbage from sfdisk is a problem of this machine, not of the caller's request.
        raise DeviceError(str(exc)) from None


def partition_node(disk: str, number: int) -> str:
    """The Linux device name of partition `number` of `disk`: a 'p' goes between when the disk name ends in a digit.

    /dev/sda, 5 -> /dev/sda5; /dev/mmcblk0, 5 -> /dev/mmcblk0p5; /dev/nvme0n1 -> p5; /dev/loop3 -> p5.
    """
    if not disk or disk.endswith("/"):
        raise InvalidArgument(f"disk name {disk!r} is not a device path like /dev/mmcblk0")
    if number < 1:
        raise InvalidArgument(f"partition number {number} is not 1 or more")
    separator = "p" if disk[-1].isdigit() else ""
    return f"{disk}{separator}{number}"


def split_partition_node(node: str) -> tuple[str, int]:
    """The reverse of partition_node(): '/dev/mmcblk0p5' -> ('/dev/mmcblk0', 5), '/dev/sda5' -> ('/dev/sda', 5).

    Raises InvalidArgument for a name that is not a partition, such as a whole disk '/dev/mmcblk0'.
    """
    directory, _, base = node.rpartition("/")
    if _DIGIT_DISK_NAME.fullmatch(base):
        raise InvalidArgument(f"{node} is a whole disk, not a partition")
    with_separator = re.fullmatch(r"(.*[0-9])p([1-9][0-9]*)", base)
    if with_separator is not None:
        disk_base, number = with_separator.group(1), with_separator.group(2)
    else:
        plain = re.fullmatch(r"(.*[^0-9])([1-9][0-9]*)", base)
        if plain is None:
            raise InvalidArgument(f"{node!r} is not a partition device name like /dev/sda1 or /dev/mmcblk0p1")
        disk_base, number = plain.group(1), plain.group(2)
    prefix = f"{directory}/" if directory or node.startswith("/") else ""
    return f"{prefix}{disk_base}", int(number)


def disk_signature(image_path: str) -> int:
    """The 32-bit MBR disk signature (offset 440, little-endian) of a disk or image; the base of MBR PARTUUIDs."""
    try:
        with open(image_path, "rb") as image:
            sector = image.read(512)
    except OSError as exc:
        raise DeviceError(f"cannot read the MBR of {image_path}: {exc.strerror or exc}") from None
    if len(sector) < 512:
        raise DeviceError(f"{image_path} is smaller than one 512-byte sector, so it has no MBR")
    if sector[510:512] != b"\x55\xaa":
        raise DeviceError(f"{image_path} has no MBR (the boot signature 55 AA at offset 510 is missing)")
    return int.from_bytes(sector[440:444], "little")
