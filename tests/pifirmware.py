"""A model of what the Raspberry Pi firmware boots, for tests.

Given a disk and the one-shot tryboot flag, `decide_boot` answers: which FAT partition the firmware boots from, which
config file it read, which kernel and cmdline it loads and what ``root=`` the kernel gets. Scenario tests use
`PiDevice`, which keeps the one-shot state (``reboot 'N tryboot'``) across boots the way the hardware does.

A disk is anything with the `BootDisk` shape: `ImageDisk` (an image file read with sfdisk and mtools, no root
needed) or `DirectoryDisk` (directories standing for FAT partitions). `as_boot_disk` turns a path or a mapping into
one.

The rules, and where this model had to choose (each choice is the conservative one for "can this brick a device"):

1. Requested partition: a non-zero ``reboot N`` partition wins; ``reboot 0`` / no argument means "not given". Else
   ``boot_partition`` from ``autoboot.txt`` on partition 1, else 0. ``autoboot.txt`` is read only if partition 1 is
   FAT and the file is at most 512 bytes: a larger file is ignored as a whole (as if absent). Its sections are
   ``[all]`` (always), ``[tryboot]`` (only with the flag) and ``[none]`` (never); any other section is treated as
   never true, model filters included. Later values win. Unparsable numbers are ignored (the line has no effect).
   ``tryboot_a_b=1`` makes a tryboot boot read ``config.txt`` instead of ``tryboot.txt``.
2. Partition 0 means the first partition, in table order, that is FAT and bootable; bootable = a ``start*.elf`` at
   its root, or (Pi 5 family) a ``config.txt``. A requested partition that is missing or not bootable falls back to
   partition 1 if that is bootable, otherwise nothing boots (older firmware; ``fallback_scan=True`` models newer
   firmware, which then walks on to the first bootable partition). Nothing bootable → `NoBootablePartition`.
   FAT = an MBR type of 0x01/0x04/0x06/0x0b/0x0c/0x0e *and* a FAT boot sector (images); a directory (fixtures).
3. Config file: ``tryboot.txt`` with the flag unless ``tryboot_a_b``; otherwise ``config.txt``. It replaces
   ``config.txt``, it does not add to it; a missing config file is an empty one (all defaults). Lines are
   ``key=value``; ``#`` starts a comment line only (no trailing comments, like the firmware). Filters combine like
   the firmware's: filters of one kind replace each other, different kinds must all be true, ``[all]`` resets them.
   Kinds: ``[none]``, ``[tryboot]``, ``[boot_partition=N]``, model (``[pi3]``, ``[pi3+]``, ``[pi4]``, ``[pi400]``,
   ``[cm4]``, ``[cm4s]``, ``[pi5]``, ``[pi500]``, ``[cm5]``, ``[pi0]``, ``[pi02]``...); any other filter (EDID, HDMI,
   GPIO, serial number) never matches. ``include FILE`` (under a true filter) reads FILE from the partition root.
4. Kernel: ``kernel=`` wins; otherwise ``kernel_2712.img`` then ``kernel8.img`` on the Pi 5 family, ``kernel8.img``
   on other models (``arm_64bit`` is taken as 1 unless set to 0, which picks ``kernel7l.img`` on the Pi 4 family
   and ``kernel7.img`` on older models). ``os_prefix`` is prepended to the kernel, the cmdline file (``cmdline=``,
   default ``cmdline.txt``) and dtbs, but is dropped entirely unless prefix+kernel exists. A name starting with
   ``/`` is taken from the partition root and bypasses the prefix; with such a kernel the prefix is kept for the
   other files. A kernel that does not exist → `KernelNotFound` (the device hangs; a reset boots without the flag).
5. Cmdline: the first line of the cmdline file (the kernel gets one line); a missing file gives an empty cmdline.
   ``root=`` is the last ``root=`` on it (the kernel keeps the last), None if there is none.
6. Watchdog: the firmware starts the hardware watchdog before the kernel when the config lines in effect (after
   filters, so a ``[tryboot]`` section counts only on a tryboot) set ``kernel_watchdog_timeout=N`` (N > 0) *and*
   ``dtparam=watchdog=on`` (newer firmware needs both; the model asks for both, the conservative choice), and
   hands it to Linux with ``watchdog.open_timeout=N`` appended to the cmdline (`BootDecision.kernel_cmdline`).
   Without it a hang strands the device (`PiDevice.hang` raises `Stranded`); with it the hang ends in a reset,
   which boots like a power cycle: without the one-shot flag.
File names on FAT are case-insensitive, here too (also for directory fixtures).
MBR PARTUUID = the 32-bit disk signature at byte 440 (little-endian) as 8 hex digits, ``-``, the partition number as
2 hex digits (partition 10 → ``-0a``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

SECTOR = 512
AUTOBOOT_MAX_BYTES = 512
# The firmware stores the `reboot N` partition in 6 bits, and 63 means "halt".
MAX_REBOOT_PARTITION = 62
FAT_PARTITION_TYPES = frozenset({0x01, 0x04, 0x06, 0x0B, 0x0C, 0x0E})
INCLUDE_DEPTH_LIMIT = 8

# Which model filters are true on which board (a Pi 400 or CM4 is a [pi4] too).
MODEL_FILTERS: Mapping[str, frozenset[str]] = {
    "pi0": frozenset({"pi0"}),
    "pi0w": frozenset({"pi0", "pi0w"}),
    "pi02": frozenset({"pi0", "pi02"}),
    "pi3": frozenset({"pi3"}),
    "pi3+": frozenset({"pi3", "pi3+"}),
    "cm3": frozenset({"pi3", "cm3"}),
    "pi4": frozenset({"pi4"}),
    "pi400": frozenset({"pi4", "pi400"}),
    "cm4": frozenset({"pi4", "cm4"}),
    "cm4s": frozenset({"pi4", "cm4s"}),
    "pi5": frozenset({"pi5"}),
    "pi500": frozenset({"pi5", "pi500"}),
    "cm5": frozenset({"pi5", "cm5"}),
}
KNOWN_MODEL_FILTERS = frozenset({"pi1", "pi2", "cm1", "cm3+", "cm4", "cm4s", "cm5", "pi0", "pi0w", "pi02", "pi3",
                                 "pi3+", "pi4", "pi400", "pi5", "pi500"})
PI5_FAMILY = frozenset({"pi5", "pi500", "cm5"})
PI4_FAMILY = frozenset({"pi4", "pi400", "cm4", "cm4s"})


class FirmwareModelError(Exception):
    """Base of the errors this model raises."""


class NoBootableSystem(FirmwareModelError):
    """The firmware finds nothing to start: the device does not come up (on this boot)."""

    def __init__(self, message: str, *, tryboot: bool) -> None:
        super().__init__(message)
        self.tryboot = tryboot


class NoBootablePartition(NoBootableSystem):
    """No partition qualifies as a boot partition: without the tryboot flag this is a bricked device."""


class KernelNotFound(NoBootableSystem):
    """A boot partition was chosen but the kernel it names is missing: the boot hangs."""


class Stranded(FirmwareModelError):
    """A hang with no watchdog armed: nothing resets the device until someone power-cycles it."""


class UnresolvableRoot(FirmwareModelError):
    """A cmdline ``root=`` that names no partition of the disk."""


# --------------------------------------------------------------------------------------------------- disks


@dataclass(frozen=True)
class TablePartition:
    number: int
    type_id: int
    start: int = 0
    size: int = 0


@dataclass(frozen=True)
class DiskTable:
    """An MBR partition table as the firmware sees it: the disk signature and the partitions in table order."""

    signature: int
    partitions: tuple[TablePartition, ...]

    def numbers(self) -> list[int]:
        return [part.number for part in self.partitions]

    def partuuid(self, number: int) -> str:
        return mbr_partuuid(self.signature, number)


def mbr_partuuid(signature: int, number: int) -> str:
    return f"{signature:08x}-{number:02x}"


class BootDisk(Protocol):
    """What the firmware needs of a disk. Paths are relative to the partition root, ``/``-separated."""

    def table(self) -> DiskTable: ...

    def is_fat(self, number: int) -> bool: ...

    def list_dir(self, number: int, path: str) -> list[str] | None:
        """Names in folder ``path`` of FAT partition ``number``, or None if there is no such folder."""
        ...

    def read_file(self, number: int, path: str) -> bytes | None:
        """Contents of file ``path`` (case-insensitive), or None if there is no such file."""
        ...


def _split(path: str) -> list[str]:
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return parts


class DirectoryDisk:
    """A disk whose FAT partitions are directories: ``{1: tmp/p1, 2: tmp/p2, 5: None}``.

    A None value is a partition that exists in the table but is not FAT (an ext4 root, say). Lookups ignore case,
    as on FAT; an exact-case match is preferred if a case-sensitive directory holds several.
    """

    def __init__(self, partitions: Mapping[int, Path | str | None], *, signature: int = 0x1234ABCD) -> None:
        self._partitions = {number: (Path(p) if p is not None else None) for number, p in partitions.items()}
        self._signature = signature

    def table(self) -> DiskTable:
        return DiskTable(
            signature=self._signature,
            partitions=tuple(TablePartition(number, 0x0C if root is not None else 0x83)
                             for number, root in sorted(self._partitions.items())),
        )

    def is_fat(self, number: int) -> bool:
        root = self._partitions.get(number)
        return root is not None and root.is_dir()

    def _resolve(self, number: int, path: str) -> Path | None:
        current = self._partitions.get(number)
        if current is None or not current.is_dir():
            return None
        for part in _split(path):
            if not current.is_dir():
                return None
            exact = current / part
            if exact.exists():
                current = exact
                continue
            matches = sorted(child for child in current.iterdir() if child.name.lower() == part.lower())
            if not matches:
                return None
            current = matches[0]
        return current

    def list_dir(self, number: int, path: str) -> list[str] | None:
        target = self._resolve(number, path)
        if target is None or not target.is_dir():
            return None
        return sorted(child.name for child in target.iterdir())

    def read_file(self, number: int, path: str) -> bytes | None:
        target = self._resolve(number, path)
        if target is None or not target.is_file():
            return None
        return target.read_bytes()


class ImageDisk:
    """A disk image file, read the way the firmware would: MBR, then FAT through mtools (no mount, no root)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._table: DiskTable | None = None

    def table(self) -> DiskTable:
        # The partition table does not change under a test between boots; file contents do, so only this is kept.
        if self._table is None:
            self._table = read_mbr_table(self.path)
        return self._table

    def _partition(self, number: int) -> TablePartition | None:
        for part in self.table().partitions:
            if part.number == number:
                return part
        return None

    def is_fat(self, number: int) -> bool:
        part = self._partition(number)
        if part is None or part.type_id not in FAT_PARTITION_TYPES:
            return False
        with self.path.open("rb") as fh:
            fh.seek(part.start * SECTOR)
            boot_sector = fh.read(SECTOR)
        if len(boot_sector) < SECTOR or boot_sector[510:512] != b"\x55\xaa":
            return False
        return boot_sector[54:59] == b"FAT16" or boot_sector[54:59] == b"FAT12" or boot_sector[82:87] == b"FAT32"

    def _mtools(self, number: int, args: Sequence[str]) -> subprocess.CompletedProcess[bytes]:
        part = self._partition(number)
        if part is None:
            raise FirmwareModelError(f"{self.path} has no partition {number}")
        env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": os.devnull}
        image = f"{self.path}@@{part.start * SECTOR}"
        return subprocess.run([args[0], "-i", image, *args[1:]], capture_output=True, env=env, timeout=60,
                              check=False)

    def list_dir(self, number: int, path: str) -> list[str] | None:
        if not self.is_fat(number):
            return None
        target = "::/" + "/".join(_split(path))
        proc = self._mtools(number, ["mdir", "-b", target])
        if proc.returncode != 0:
            return None
        prefix = target.rstrip("/") + "/"
        names: list[str] = []
        for line in proc.stdout.decode(errors="replace").splitlines():
            if not line.startswith(prefix):
                return None  # `mdir -b` on a file names the file itself
            names.append(line[len(prefix):].rstrip("/"))
        return names

    def read_file(self, number: int, path: str) -> bytes | None:
        parts = _split(path)
        if not parts or not _file_exists(self, number, "/".join(parts)):
            return None
        proc = self._mtools(number, ["mcopy", "-n", "::/" + "/".join(parts), "-"])
        return proc.stdout if proc.returncode == 0 else None


class PartitionImagesDisk(ImageDisk):
    """A disk image's partition table, with its FAT partitions read from separate images of those partitions: what a
    power cut left on them, rebuilt by a test. Partitions without an image are not FAT."""

    def __init__(self, disk_image: Path | str, fat_images: Mapping[int, Path]) -> None:
        super().__init__(disk_image)
        self.fat_images = dict(fat_images)

    def is_fat(self, number: int) -> bool:
        image = self.fat_images.get(number)
        if image is None:
            return False
        with image.open("rb") as handle:
            return handle.read(SECTOR)[510:512] == b"\x55\xaa"

    def _mtools(self, number: int, args: Sequence[str]) -> subprocess.CompletedProcess[bytes]:
        env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": os.devnull}
        return subprocess.run([args[0], "-i", str(self.fat_images[number]), *args[1:]], capture_output=True, env=env,
                              timeout=60, check=False)


def read_mbr_table(image: Path) -> DiskTable:
    """The MBR of ``image``: signature from byte 440, partitions (logical ones too) from `sfdisk --json`."""
    with image.open("rb") as fh:
        mbr = fh.read(SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        raise FirmwareModelError(f"{image} has no MBR (no 55 aa at byte 510): the firmware cannot boot it")
    signature = int.from_bytes(mbr[440:444], "little")
    proc = subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise FirmwareModelError(f"sfdisk cannot read the table of {image}: {proc.stderr.decode().strip()}")
    table = json.loads(proc.stdout)["partitiontable"]
    if table.get("label") != "dos":
        raise FirmwareModelError(f"{image} has a {table.get('label')} table; this model reads MBR (dos) tables")
    partitions: list[TablePartition] = []
    for entry in table.get("partitions", []):
        number = int(str(entry["node"]).removeprefix(str(image)).removeprefix("p"))
        partitions.append(TablePartition(number, int(str(entry["type"]), 16), int(entry["start"]),
                                         int(entry["size"])))
    return DiskTable(signature=signature, partitions=tuple(sorted(partitions, key=lambda p: p.number)))


def as_boot_disk(disk: BootDisk | Path | str | Mapping[int, Path | str | None]) -> BootDisk:
    """An image path becomes an `ImageDisk`, a mapping a `DirectoryDisk`; a `BootDisk` is returned as is."""
    if isinstance(disk, (str, Path)):
        return ImageDisk(disk)
    if isinstance(disk, Mapping):
        return DirectoryDisk(disk)
    return disk


def _file_exists(disk: BootDisk, number: int, path: str) -> bool:
    parts = _split(path)
    if not parts:
        return False
    entries = disk.list_dir(number, "/".join(parts[:-1]))
    if entries is None:
        return False
    wanted = parts[-1].lower()
    if not any(entry.lower() == wanted for entry in entries):
        return False
    # A folder of that name is not a file the firmware could load.
    return disk.list_dir(number, "/".join(parts)) is None


# --------------------------------------------------------------------------------------------------- config files


@dataclass(frozen=True)
class FilterContext:
    """What the conditional filters of a config file are evaluated against."""

    tryboot: bool
    model: str | None  # None: model filters never match (autoboot.txt)
    boot_partition: int | None  # None: [boot_partition=N] never matches (autoboot.txt)


@dataclass(frozen=True)
class ConfigLine:
    key: str
    value: str


def _filter_kind_and_truth(name: str, context: FilterContext) -> tuple[str, bool] | None:
    """(kind, is it true) for a filter; None for ``[all]``, which resets all kinds."""
    lowered = name.strip().lower()
    if lowered == "all":
        return None
    if lowered == "none":
        return "none", False
    if lowered == "tryboot":
        return "tryboot", context.tryboot
    if lowered.startswith("boot_partition="):
        value = _parse_int(lowered.partition("=")[2])
        return "boot_partition", value is not None and value == context.boot_partition
    if lowered in KNOWN_MODEL_FILTERS:
        matches = context.model is not None and lowered in MODEL_FILTERS.get(context.model, frozenset())
        return "model", matches
    kind = re.split(r"[=:]", lowered, maxsplit=1)[0]
    return f"other:{kind}", False


def parse_config(
    text: str,
    context: FilterContext,
    *,
    include: IncludeReader | None = None,
    _depth: int = 0,
    _filters: dict[str, bool] | None = None,
) -> list[ConfigLine]:
    """The ``key=value`` lines of a config file whose filters are true, in order (later ones win)."""
    filters: dict[str, bool] = {} if _filters is None else _filters
    result: list[ConfigLine] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            verdict = _filter_kind_and_truth(line[1:-1], context)
            if verdict is None:
                filters.clear()
            else:
                filters[verdict[0]] = verdict[1]
            continue
        if not all(filters.values()):
            continue
        if line.startswith("include ") or line.startswith("include\t"):
            name = line.split(None, 1)[1].strip()
            if include is not None and _depth < INCLUDE_DEPTH_LIMIT:
                included = include(name)
                if included is not None:
                    result.extend(parse_config(included, context, include=include, _depth=_depth + 1,
                                               _filters=filters))
            continue
        key, sep, value = line.partition("=")
        if sep:
            result.append(ConfigLine(key.strip(), value.strip()))
    return result


class IncludeReader(Protocol):
    def __call__(self, name: str) -> str | None: ...


def last_value(lines: Iterable[ConfigLine], key: str) -> str | None:
    value: str | None = None
    for line in lines:
        if line.key == key:
            value = line.value
    return value


def _parse_int(text: str) -> int | None:
    text = text.strip()
    if not re.fullmatch(r"\d+", text):
        return None
    return int(text)


@dataclass(frozen=True)
class AutobootSettings:
    boot_partition: int | None
    tryboot_a_b: bool
    ignored_reason: str | None = None


def parse_autoboot(content: bytes | None, *, tryboot: bool) -> AutobootSettings:
    """What ``autoboot.txt`` says for this boot (content None: there is none)."""
    if content is None:
        return AutobootSettings(None, False)
    if len(content) > AUTOBOOT_MAX_BYTES:
        return AutobootSettings(None, False, f"autoboot.txt is {len(content)} bytes, over the "
                                             f"{AUTOBOOT_MAX_BYTES}-byte limit: ignored")
    lines = parse_config(content.decode("utf-8", errors="replace"),
                         FilterContext(tryboot=tryboot, model=None, boot_partition=None))
    boot_partition: int | None = None
    tryboot_a_b = False
    for line in lines:
        number = _parse_int(line.value)
        if number is None:
            continue
        if line.key == "boot_partition":
            boot_partition = number
        elif line.key == "tryboot_a_b":
            tryboot_a_b = number == 1
    return AutobootSettings(boot_partition, tryboot_a_b)


# --------------------------------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class BootDecision:
    """What the firmware boots. Paths are relative to the boot partition's root."""

    partition: int
    config_file: str
    os_prefix: str  # the prefix in effect ("" when none is set or it was dropped)
    kernel: str
    cmdline_file: str
    cmdline: str
    root: str | None  # the cmdline's root= value, e.g. "PARTUUID=1234abcd-05"
    tryboot: bool
    requested_partition: int = 0
    model: str = "pi4"
    notes: tuple[str, ...] = field(default=())
    #: kernel_watchdog_timeout the firmware started the watchdog with; 0: not armed (rule 6).
    watchdog_timeout: int = 0

    @property
    def watchdog_armed(self) -> bool:
        return self.watchdog_timeout > 0

    @property
    def kernel_cmdline(self) -> str:
        """The command line the kernel gets: the cmdline file's, plus what the firmware adds (rule 6)."""
        if not self.watchdog_armed:
            return self.cmdline
        return f"{self.cmdline} watchdog.open_timeout={self.watchdog_timeout}".strip()


def _dtparam_on(lines: Iterable[ConfigLine], name: str) -> bool:
    """Whether ``dtparam=`` lines (``a=on,b`` lists, later ones win) leave the parameter ``name`` on."""
    state = False
    for line in lines:
        if line.key != "dtparam":
            continue
        for item in line.value.split(","):
            key, _equals, value = item.strip().partition("=")
            if key.strip() == name:
                state = value.strip().lower() in ("", "on", "1", "yes", "true")
    return state


def watchdog_timeout_of(lines: list[ConfigLine]) -> int:
    """The watchdog timeout the firmware arms for these config lines (rule 6); 0 when it arms none."""
    timeout = _parse_int(last_value(lines, "kernel_watchdog_timeout") or "") or 0
    return timeout if timeout > 0 and _dtparam_on(lines, "watchdog") else 0


def is_bootable(disk: BootDisk, number: int, model: str) -> bool:
    if not disk.is_fat(number):
        return False
    entries = disk.list_dir(number, "") or []
    if model in PI5_FAMILY and any(name.lower() == "config.txt" for name in entries):
        return True
    return any(re.fullmatch(r"start.*\.elf", name.lower()) and _file_exists(disk, number, name) for name in entries)


def parse_reboot_argument(argument: str) -> tuple[int, bool]:
    """(partition, tryboot) of a ``reboot ARG`` argument, as the Raspberry Pi kernel reads it.

    The watchdog driver takes a leading number as the partition (extra words are for other reboot handlers); the
    firmware driver sets the tryboot flag when the word ``tryboot`` is present.
    """
    words = argument.split()
    partition = 0
    if words and re.fullmatch(r"\d+", words[0]):
        partition = int(words[0])
        if partition > MAX_REBOOT_PARTITION:
            raise ValueError(f"reboot partition {partition} is out of range 0..{MAX_REBOOT_PARTITION}")
    return partition, "tryboot" in words


def _kernel_candidates(model: str, lines: list[ConfigLine]) -> list[str]:
    configured = last_value(lines, "kernel")
    if configured:
        return [configured]
    arm_64bit = last_value(lines, "arm_64bit")
    if model in PI5_FAMILY:
        return ["kernel_2712.img", "kernel8.img"]
    if arm_64bit is not None and _parse_int(arm_64bit) == 0:
        return ["kernel7l.img"] if model in PI4_FAMILY else ["kernel7.img"]
    return ["kernel8.img"]


def _with_prefix(prefix: str, name: str) -> str:
    """Where the firmware looks for ``name``: a leading ``/`` means the partition root, bypassing the prefix."""
    if name.startswith("/"):
        return name.lstrip("/")
    return prefix + name


def decide_boot(
    disk: BootDisk | Path | str | Mapping[int, Path | str | None],
    *,
    tryboot: bool = False,
    reboot_arg: int | None = None,
    model: str = "pi4",
    fallback_scan: bool = False,
) -> BootDecision:
    """What the firmware boots from ``disk`` (the rules are in this module's docstring).

    ``reboot_arg`` is the partition of ``reboot N`` (0 or None: none given). Raises `NoBootablePartition` when no
    partition can be booted and `KernelNotFound` when the chosen partition lacks its kernel.
    """
    if model not in MODEL_FILTERS:
        raise ValueError(f"unknown Pi model {model!r}: use one of {', '.join(sorted(MODEL_FILTERS))}")
    boot_disk = as_boot_disk(disk)
    table = boot_disk.table()
    notes: list[str] = []

    autoboot_content = boot_disk.read_file(1, "autoboot.txt") if boot_disk.is_fat(1) else None
    autoboot = parse_autoboot(autoboot_content, tryboot=tryboot)
    if autoboot.ignored_reason:
        notes.append(autoboot.ignored_reason)

    if reboot_arg:
        requested = reboot_arg
    elif autoboot.boot_partition is not None:
        requested = autoboot.boot_partition
    else:
        requested = 0

    partition = _choose_partition(boot_disk, table, requested, model=model, tryboot=tryboot,
                                  fallback_scan=fallback_scan, notes=notes)

    config_file = "tryboot.txt" if tryboot and not autoboot.tryboot_a_b else "config.txt"
    config_bytes = boot_disk.read_file(partition, config_file)
    if config_bytes is None:
        notes.append(f"{config_file} missing on partition {partition}: all defaults")

    def read_include(name: str) -> str | None:
        included = boot_disk.read_file(partition, name)
        return None if included is None else included.decode("utf-8", errors="replace")

    context = FilterContext(tryboot=tryboot, model=model, boot_partition=partition)
    lines = parse_config(config_bytes.decode("utf-8", errors="replace") if config_bytes else "", context,
                         include=read_include)

    prefix = (last_value(lines, "os_prefix") or "").lstrip("/")
    candidates = _kernel_candidates(model, lines)
    prefix_applies = prefix and not any(name.startswith("/") for name in candidates)
    if prefix_applies and not any(_file_exists(boot_disk, partition, prefix + name) for name in candidates):
        notes.append(f"os_prefix {prefix!r} dropped: no {prefix}{candidates[0]} on partition {partition}")
        prefix = ""
    kernel = next((path for path in (_with_prefix(prefix, name) for name in candidates)
                   if _file_exists(boot_disk, partition, path)), None)
    if kernel is None:
        tried = ", ".join(_with_prefix(prefix, name) for name in candidates)
        raise KernelNotFound(f"partition {partition} ({config_file}) has no kernel: tried {tried}", tryboot=tryboot)

    cmdline_file = _with_prefix(prefix, last_value(lines, "cmdline") or "cmdline.txt")
    cmdline_bytes = boot_disk.read_file(partition, cmdline_file)
    if cmdline_bytes is None:
        notes.append(f"{cmdline_file} missing on partition {partition}: empty cmdline")
        cmdline = ""
    else:
        text = cmdline_bytes.decode("utf-8", errors="replace")
        cmdline = text.splitlines()[0].strip() if text.strip() else ""
    roots = [word.partition("=")[2] for word in cmdline.split() if word.startswith("root=")]

    return BootDecision(
        partition=partition,
        config_file=config_file,
        os_prefix=prefix,
        kernel=kernel,
        cmdline_file=cmdline_file,
        cmdline=cmdline,
        root=roots[-1] if roots else None,
        tryboot=tryboot,
        requested_partition=requested,
        model=model,
        notes=tuple(notes),
        watchdog_timeout=watchdog_timeout_of(lines),
    )


def _choose_partition(disk: BootDisk, table: DiskTable, requested: int, *, model: str, tryboot: bool,
                      fallback_scan: bool, notes: list[str]) -> int:
    def first_bootable() -> int | None:
        return next((number for number in table.numbers() if is_bootable(disk, number, model)), None)

    if requested == 0:
        found = first_bootable()
        if found is None:
            raise NoBootablePartition("no FAT partition with start*.elf"
                                      + (" or config.txt" if model in PI5_FAMILY else "")
                                      + f" on the disk (partitions {table.numbers()})", tryboot=tryboot)
        return found
    if is_bootable(disk, requested, model):
        return requested
    notes.append(f"requested partition {requested} is not bootable")
    if is_bootable(disk, 1, model):
        notes.append("fell back to partition 1")
        return 1
    if fallback_scan:
        found = first_bootable()
        if found is not None:
            notes.append(f"fell back to the first bootable partition, {found}")
            return found
    raise NoBootablePartition(f"requested partition {requested} is not bootable and neither is partition 1",
                              tryboot=tryboot)


def simulate_reboot(disk: BootDisk | Path | str | Mapping[int, Path | str | None], *, tryboot_flag: bool,
                    reboot_arg: int | None = None, model: str = "pi4") -> BootDecision:
    """One boot with the given one-shot state; the same as `decide_boot`."""
    return decide_boot(disk, tryboot=tryboot_flag, reboot_arg=reboot_arg, model=model)


def booted_root_partition(decision: BootDecision, table: DiskTable) -> int:
    """The partition number the kernel mounts as ``/`` for ``decision`` on a disk with ``table``.

    ``root=PARTUUID=<signature>-<nn>`` must match the disk's signature and an existing partition; ``/dev/mmcblk0pN``,
    ``/dev/sdaN`` and ``/dev/nvme0n1pN`` name partition N directly.
    """
    root = decision.root
    if root is None:
        raise UnresolvableRoot(f"the cmdline of partition {decision.partition} ({decision.cmdline_file}) has no "
                               "root=: the kernel would not find its root filesystem")
    number: int | None = None
    if root.upper().startswith("PARTUUID="):
        match = re.fullmatch(r"([0-9a-f]{8})-([0-9a-f]{2})", root[len("PARTUUID="):].lower())
        if match and int(match.group(1), 16) == table.signature:
            number = int(match.group(2), 16)
    else:
        match = re.fullmatch(r"/dev/(?:mmcblk\d+p|nvme\d+n\d+p|sd[a-z]+|vd[a-z]+)(\d+)", root)
        if match:
            number = int(match.group(1))
    if number is None or number not in table.numbers():
        raise UnresolvableRoot(f"root={root} names no partition of this disk (signature {table.signature:08x}, "
                               f"partitions {table.numbers()})")
    return number


# --------------------------------------------------------------------------------------------------- a device


class PiDevice:
    """A Pi attached to ``disk``: it remembers the one-shot ``reboot 'N tryboot'`` state for exactly one boot.

    The firmware clears the flag and the partition when it reads them, so they are gone after the next boot whether
    it succeeds or not; a hang, a watchdog reset or a power cycle boots again without them.
    """

    def __init__(self, disk: BootDisk | Path | str | Mapping[int, Path | str | None], *, model: str = "pi4",
                 fallback_scan: bool = False) -> None:
        self.disk = as_boot_disk(disk)
        self.model = model
        self.fallback_scan = fallback_scan
        self.history: list[BootDecision] = []
        self._pending_partition = 0
        self._pending_tryboot = False

    @property
    def current(self) -> BootDecision | None:
        """The last successful boot, if any."""
        return self.history[-1] if self.history else None

    def boot(self) -> BootDecision:
        """Boot with whatever one-shot state is pending, consuming it."""
        partition, tryboot = self._pending_partition, self._pending_tryboot
        self._pending_partition, self._pending_tryboot = 0, False
        decision = decide_boot(self.disk, tryboot=tryboot, reboot_arg=partition, model=self.model,
                               fallback_scan=self.fallback_scan)
        self.history.append(decision)
        return decision

    def reboot(self, *, tryboot: bool = False, partition: int = 0) -> BootDecision:
        """``reboot 'partition[ tryboot]'`` and the boot that follows."""
        if not 0 <= partition <= MAX_REBOOT_PARTITION:
            raise ValueError(f"reboot partition {partition} is out of range 0..{MAX_REBOOT_PARTITION}")
        self._pending_partition, self._pending_tryboot = partition, tryboot
        return self.boot()

    def reboot_with_argument(self, argument: str) -> BootDecision:
        """``reboot 'ARGUMENT'`` (e.g. ``'0 tryboot'``) and the boot that follows."""
        partition, tryboot = parse_reboot_argument(argument)
        return self.reboot(tryboot=tryboot, partition=partition)

    def power_cycle(self) -> BootDecision:
        """A cold boot: no one-shot state survives."""
        self._pending_partition, self._pending_tryboot = 0, False
        return self.boot()

    # A reset (the watchdog's, or a person's) boots like a power cycle: the one-shot state is gone.
    watchdog_reset = power_cycle

    def hang(self) -> BootDecision:
        """The running boot hangs: the watchdog resets the board if the firmware armed it for this boot (rule 6);
        otherwise the device is stranded."""
        current = self.current
        if current is None:
            raise FirmwareModelError("the device has not booted yet")
        if not current.watchdog_armed:
            raise Stranded(f"the boot of {current.kernel} (partition {current.partition}, {current.config_file}) "
                           "hung with no watchdog armed: nothing resets the device")
        return self.watchdog_reset()

    def root_partition(self, decision: BootDecision | None = None) -> int:
        """The partition mounted as ``/`` by ``decision`` (default: the last boot)."""
        chosen = decision if decision is not None else self.current
        if chosen is None:
            raise FirmwareModelError("the device has not booted yet")
        return booted_root_partition(chosen, self.disk.table())
