"""The bytes that switch slots, and how each change keeps the file's size so it can be written in place.

Pure functions: no I/O. Every change the firmware might read half-way is made by `FatVolume.write_in_place` (one
sector at a time, same size, same clusters), so each function here returns text of exactly the length of the text
it edits, or raises `SwitchFileError` (docs/boot-atomicity.md says why each is safe):

- the prefix layout's ``config.txt`` and ``tryboot.txt``: `set_os_prefix_in_place` changes only the value of the
  effective ``os_prefix=`` line (``a/`` and ``b/`` have one length);
- ``tryboot.txt`` in its own form (`render_tryboot`): ``include config.txt``, then the slot to try, so a trial boot
  reads the committed configuration plus one setting and never goes stale when ``config.txt`` is edited;
  `tryboot_in_place_of` turns a ``tryboot.txt`` of the old form (a full copy of ``config.txt``) into that form
  without changing its size, sector by sector in an order where every mix of old and new sectors boots the same;
- ``autoboot.txt``: `set_autoboot_in_place` changes the digits of the ``boot_partition`` values in force normally
  and under ``[tryboot]``. The file is at most 512 bytes, so it always lies in one sector.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from abflasher.boot import bootfiles

SECTOR = 512
TRYBOOT_HEADER = (
    "# Written by ab-flasher: a trial boot (reboot '0 tryboot') reads this file instead of config.txt.\n"
    "# It is config.txt plus the slot to try; ab-flasher changes the os_prefix value in place. Edit config.txt.\n"
)
INCLUDE_LINE = "include config.txt"
# A comment line of the padding is at most this long (the firmware reads config lines into a bounded buffer).
PADDING_LINE_CHARS = 64


class SwitchFileError(bootfiles.BootFileError):
    """A slot-switch file cannot be changed in place (its shape or a value's length does not allow it)."""


def set_os_prefix_in_place(text: str, prefix: str, what: str) -> str:
    """``text`` (config.txt or tryboot.txt) with its effective unconditional ``os_prefix`` value set to ``prefix``;
    SwitchFileError unless that keeps every byte but the value's own in place."""
    if bootfiles.config_os_prefix(text) is None:
        raise SwitchFileError(f"{what} has no os_prefix line under [all] for ab-flasher to switch")
    changed = bootfiles.set_config_os_prefix(text, prefix)
    if len(changed.encode()) != len(text.encode()):
        raise SwitchFileError(f"{what} sets os_prefix={bootfiles.config_os_prefix(text)}, which cannot be changed "
                              f"to {prefix} in place (a different length): set it to a slot's folder (a/ or b/)")
    return changed


def _padded(head: str, size: int) -> str:
    """``head`` then comment lines up to ``size`` bytes; no line break on the last byte of a sector, so each sector
    ends inside a comment line (which then runs on into whatever the next sector holds)."""
    padding: list[str] = []
    line_chars = 0
    for position in range(len(head.encode()), size):
        if line_chars >= PADDING_LINE_CHARS - 1 and position % SECTOR != SECTOR - 1:
            padding.append("\n")
            line_chars = 0
        else:
            padding.append("#")
            line_chars += 1
    return head + "".join(padding)


def _own_head(prefix: str, extra: Sequence[str], *, guard: bool) -> str:
    head = f"{TRYBOOT_HEADER}{INCLUDE_LINE}\n[all]\nos_prefix={prefix}\n" + "".join(f"{line}\n" for line in extra)
    # [none]: a filter never true, so old lines after this text (while it is being written over them) are ignored.
    head += "[none]\n" if guard else ""
    if len(head.encode()) >= SECTOR - 2:
        raise SwitchFileError(f"the trial settings {list(extra)} do not fit in tryboot.txt's first sector")
    return head


def render_tryboot(prefix: str, extra: Sequence[str] = ()) -> str:
    """tryboot.txt in ab-flasher's own form, trying the slot whose boot files are in folder ``prefix`` with the
    ``extra`` settings (the trial's watchdog), padded to exactly one sector: any later change of it, whatever its
    length, is then one sector written in place."""
    return _padded(_own_head(prefix, extra, guard=True), SECTOR)


def retarget_tryboot(text: str, prefix: str, extra: Sequence[str] = ()) -> str:
    """tryboot.txt trying ``prefix`` with ``extra``, of ``text``'s size, changing only its first sector when it is
    of ab-flasher's own form (a full sector or more); otherwise only the os_prefix value (`set_os_prefix_in_place`).
    """
    data = text.encode()
    if not is_own_tryboot(text) or len(data) < SECTOR:
        return set_os_prefix_in_place(text, prefix, "tryboot.txt")
    first = render_tryboot(prefix, extra)
    return first + data[SECTOR:].decode(errors="surrogateescape")


def is_own_tryboot(text: str) -> bool:
    """Is ``text`` a tryboot.txt of ab-flasher's own form (it includes config.txt before choosing a slot)?"""
    return any(line.strip() == INCLUDE_LINE for line in text.splitlines())


def tryboot_in_place_of(old: str, prefix: str, extra: Sequence[str] = ()) -> str | None:
    """tryboot.txt of ab-flasher's form, of exactly ``old``'s size, to be written over ``old`` sector by sector in
    ascending order; None when ``old`` is smaller than a sector.

    Sector 0 gets the whole new configuration, ending in ``[none]`` (a filter never true) and then a comment line
    that runs on past the sector's end; every later sector gets comment lines whose last one also runs on. So after
    any number of sectors are written, the first partial line of the first old sector is commented out, whatever
    old lines follow are ignored under ``[none]`` until an old ``[all]`` line, and the old lines after that are a
    copy of config.txt lines ending with this same os_prefix: every state boots config.txt with ``prefix``.
    """
    size = len(old.encode())
    if size < SECTOR:
        return None
    return _padded(_own_head(prefix, extra, guard=True), size)


def _autoboot_lines_in_force(text: str) -> tuple[int | None, int | None]:
    """Indexes of the ``boot_partition`` lines in force without and with the tryboot flag (later lines win)."""
    in_force: dict[bool, int | None] = {False: None, True: None}
    for tryboot in (False, True):
        filters: dict[str, bool] = {}
        for index, line in enumerate(text.splitlines()):
            stripped = line.strip()
            section = stripped[1:-1].strip().lower() if stripped.startswith("[") and stripped.endswith("]") else None
            if section is not None:
                if section == "all":
                    filters.clear()
                elif section == "tryboot":
                    filters["tryboot"] = tryboot
                else:
                    filters[section] = False
                continue
            key, sep, value = stripped.partition("=")
            if sep and key.strip() == "boot_partition" and re.fullmatch(r"\d+", value.strip()) \
                    and all(filters.values()):
                in_force[tryboot] = index
    return in_force[False], in_force[True]


def set_autoboot_in_place(text: str, primary: int, trial: int) -> str:
    """autoboot.txt booting ``primary`` normally and ``trial`` with the tryboot flag, same length as ``text``."""
    normal, tryboot = _autoboot_lines_in_force(text)
    if normal is None or tryboot is None or normal == tryboot:
        raise SwitchFileError("autoboot.txt needs a boot_partition under [all] and another under [tryboot] for "
                              "ab-flasher to switch slots in place: replace it with "
                              f"{bootfiles.render_autoboot(primary, trial)!r}")
    lines = text.splitlines(keepends=True)
    for index, number in ((normal, primary), (tryboot, trial)):
        key, sep, value = lines[index].partition("=")
        digits = re.search(r"\d+", value)
        assert digits is not None  # _autoboot_lines_in_force matched \d+ there
        lines[index] = key + sep + value[:digits.start()] + str(number) + value[digits.end():]
    changed = "".join(lines)
    if len(changed.encode()) != len(text.encode()):
        raise SwitchFileError(f"autoboot.txt cannot switch to partitions {primary} and {trial} in place (their "
                              "numbers have another number of digits than the ones it holds)")
    parsed = bootfiles.parse_autoboot(changed)
    if (parsed.boot_partition, parsed.tryboot_partition, parsed.tryboot_a_b) != (primary, trial, True):
        raise SwitchFileError("autoboot.txt does not select the slots as intended after the change (is "
                              "tryboot_a_b=1 set for the trial?): replace it with "
                              f"{bootfiles.render_autoboot(primary, trial)!r}")
    return changed
