"""Reading and editing the small text files that decide what a Raspberry Pi boots. Pure functions: no I/O.

Every editor changes only what it is asked to and keeps the rest byte for byte: comments, order, other sections,
blank lines, each line's own ending (``\\n`` or ``\\r\\n``) and whether the file ends with a newline. A line it adds
uses the file's first line ending (``\\n`` for a file without one).

- ``config.txt``: `config_os_prefix`, `set_config_os_prefix`, `conditional_os_prefixes`.
- ``autoboot.txt``: `parse_autoboot`, `render_autoboot` (docs/architecture.md, "Disk layouts").
- ``cmdline.txt``: `cmdline_root`, `set_cmdline_root`.
- ``/etc/fstab``: `fstab_mounts`, `set_fstab_mounts`.

Filters follow the firmware: a ``[section]`` line starts a conditional part, ``[all]`` ends it; ``#``
starts a comment only at the beginning of a line; ``key=value`` with blanks around either side ignored; later values
win.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise

from abflasher import errors

AUTOBOOT_MAX_BYTES = 512
# The firmware keeps a boot partition number in 6 bits, and 63 means "halt".
MAX_BOOT_PARTITION = 62
DEFAULT_BOOT_MOUNTPOINT = "/boot/firmware"
LEGACY_BOOT_MOUNTPOINT = "/boot"


class BootFileError(errors.InvalidArgument):
    """A boot file (config.txt, autoboot.txt, cmdline.txt, fstab, .ab_version) or a value for one is unusable."""


# --------------------------------------------------------------------------------------------------- lines

_Line = tuple[str, str]  # (content, ending): ending is "\n", "\r\n" or "" (last line without a newline)
_LINE_RE = re.compile(r"[^\n]*\n|[^\n]+\Z")


def _split_lines(text: str) -> list[_Line]:
    lines: list[_Line] = []
    for match in _LINE_RE.finditer(text):
        raw = match.group(0)
        if raw.endswith("\r\n"):
            lines.append((raw[:-2], "\r\n"))
        elif raw.endswith("\n"):
            lines.append((raw[:-1], "\n"))
        else:
            lines.append((raw, ""))
    return lines


def _join_lines(lines: Iterable[_Line]) -> str:
    return "".join(content + ending for content, ending in lines)


def _newline_of(lines: list[_Line]) -> str:
    return next((ending for _, ending in lines if ending), "\n")


def _insert_lines(lines: list[_Line], index: int, new: list[str]) -> list[_Line]:
    """``lines`` with ``new`` inserted before position ``index``; the file keeps (or gets) its final newline rule."""
    newline = _newline_of(lines)
    result = list(lines)
    if index == len(result) and result and result[-1][1] == "":
        # Appending after a last line without a newline: that line needs one now, the new last line goes without.
        result[-1] = (result[-1][0], newline)
        added = [(content, newline) for content in new]
        added[-1] = (added[-1][0], "")
    else:
        added = [(content, newline) for content in new]
    result[index:index] = added
    return result


def _check_value(value: str, what: str, *, allow_empty: bool = False) -> None:
    if not isinstance(value, str):
        raise BootFileError(f"{what} must be text, not {type(value).__name__}")
    if not value and not allow_empty:
        raise BootFileError(f"{what} must not be empty")
    if any(ch.isspace() or not ch.isprintable() for ch in value) or '"' in value:
        raise BootFileError(f"{what} {value!r} must not contain blanks, quotes or control characters")


def _check_text(text: str, what: str) -> None:
    if not isinstance(text, str):
        raise BootFileError(f"{what} must be given as text, not {type(text).__name__}")
    junk = next((ch for ch in text if (not ch.isprintable() and ch not in "\t\r\n") or ch == "\ufffd"), None)
    if junk is not None:
        raise BootFileError(f"{what} contains the control or undecodable character {junk!r}: it is not a text file")


# --------------------------------------------------------------------------------------------------- config.txt


def _section_name(stripped: str) -> str | None:
    """The filter named by a ``[section]`` line (lower-cased), None if the line is not one."""
    if stripped.startswith("[") and stripped.endswith("]"):
        return stripped[1:-1].strip().lower()
    return None


def _setting(stripped: str) -> tuple[str, str] | None:
    if not stripped or stripped.startswith("#"):
        return None
    key, sep, value = stripped.partition("=")
    return (key.strip(), value.strip()) if sep else None


@dataclass(frozen=True)
class _ConfigLine:
    index: int
    unconditional: bool  # outside any filter (file start, or after [all])
    section: str | None  # the filter line in force ("[pi4]"), None if unconditional
    key: str | None
    value: str | None


def _config_lines(lines: list[_Line]) -> list[_ConfigLine]:
    parsed: list[_ConfigLine] = []
    section: str | None = None
    for index, (content, _) in enumerate(lines):
        stripped = content.strip()
        name = _section_name(stripped)
        if name is not None:
            section = None if name == "all" else stripped
            parsed.append(_ConfigLine(index, section is None, section, None, None))
            continue
        setting = _setting(stripped)
        key, value = setting if setting else (None, None)
        parsed.append(_ConfigLine(index, section is None, section, key, value))
    return parsed


def config_os_prefix(text: str) -> str | None:
    """The ``os_prefix`` config.txt sets for every board: the last one outside conditional sections.

    Lines under a filter other than ``[all]`` (``[pi4]``, ``[tryboot]``, ``[none]``...) are ignored, and so are
    ``include``d files: ab-flasher manages ``os_prefix`` only in the unconditional part. `conditional_os_prefixes`
    finds the ones it ignores. None if there is none; ``""`` for an explicit ``os_prefix=``.
    """
    value: str | None = None
    for line in _config_lines(_split_lines(text)):
        if line.unconditional and line.key == "os_prefix":
            value = line.value
    return value


def conditional_os_prefixes(text: str) -> list[tuple[str, str]]:
    """(section line, value) of each ``os_prefix`` under a conditional filter: on a matching board they override
    the unconditional value, so a caller switching slots should refuse or warn about them."""
    return [(line.section or "", line.value or "") for line in _config_lines(_split_lines(text))
            if not line.unconditional and line.key == "os_prefix"]


def set_config_os_prefix(text: str, prefix: str) -> str:
    """config.txt with its effective unconditional ``os_prefix`` set to ``prefix`` (e.g. ``"b/"``).

    The last unconditional ``os_prefix=`` line is rewritten in place. Without one, a line is added after the last
    non-blank line if the file ends in its unconditional part, or ``[all]`` and the line are added if it ends inside
    a conditional section, so the setting always applies to every board.
    """
    _check_value(prefix, "os_prefix", allow_empty=True)
    lines = _split_lines(text)
    parsed = _config_lines(lines)
    effective = [line for line in parsed if line.unconditional and line.key == "os_prefix"]
    if effective:
        index = effective[-1].index
        content, ending = lines[index]
        lines[index] = (content[: content.index("=") + 1] + prefix, ending)
        return _join_lines(lines)
    non_blank = [line.index for line in parsed if lines[line.index][0].strip()]
    insert_at = non_blank[-1] + 1 if non_blank else 0
    ends_unconditional = parsed[insert_at - 1].unconditional if insert_at else True
    new = [f"os_prefix={prefix}"] if ends_unconditional else ["[all]", f"os_prefix={prefix}"]
    return _join_lines(_insert_lines(lines, insert_at, new))


# --------------------------------------------------------------------------------------------------- autoboot.txt


@dataclass(frozen=True)
class AutobootConfig:
    """What autoboot.txt tells the firmware.

    ``boot_partition``: the partition booted normally; ``tryboot_partition``: the one booted with the tryboot flag
    (``[all]`` values count there too, later values win, exactly like the firmware); ``tryboot_a_b``: the value in
    tryboot mode, the only mode where it matters (config.txt instead of tryboot.txt). None: no value applies.
    """

    tryboot_a_b: bool
    boot_partition: int | None
    tryboot_partition: int | None


def _autoboot_settings(text: str, *, tryboot: bool) -> tuple[int | None, bool]:
    filters: dict[str, bool] = {}
    boot_partition: int | None = None
    tryboot_a_b = False
    for content, _ in _split_lines(text):
        stripped = content.strip()
        name = _section_name(stripped)
        if name is not None:
            if name == "all":
                filters.clear()
            elif name == "tryboot":
                filters["tryboot"] = tryboot
            elif name == "none":
                filters["none"] = False
            else:
                # Board, EDID, GPIO... filters are never true for autoboot.txt in the firmware (tests/pifirmware.py).
                filters["other:" + re.split(r"[=:]", name, maxsplit=1)[0]] = False
            continue
        setting = _setting(stripped)
        if setting is None or not all(filters.values()):
            continue
        key, value = setting
        if not re.fullmatch(r"\d+", value):
            continue  # the firmware ignores a value it cannot read as a number
        if key == "boot_partition":
            boot_partition = int(value)
        elif key == "tryboot_a_b":
            tryboot_a_b = int(value) == 1
    return boot_partition, tryboot_a_b


def parse_autoboot(text: str | bytes) -> AutobootConfig:
    """Parse autoboot.txt; BootFileError if the firmware would ignore it or it names no boot partition."""
    data = text.encode("utf-8", errors="surrogateescape") if isinstance(text, str) else bytes(text)
    if len(data) > AUTOBOOT_MAX_BYTES:
        raise BootFileError(f"autoboot.txt is {len(data)} bytes: the firmware ignores one over "
                            f"{AUTOBOOT_MAX_BYTES} bytes, rewrite it in the canonical form")
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BootFileError(f"autoboot.txt is not text (undecodable byte at offset {exc.start})") from exc
    _check_text(decoded, "autoboot.txt")
    boot_partition, _ = _autoboot_settings(decoded, tryboot=False)
    tryboot_partition, tryboot_a_b = _autoboot_settings(decoded, tryboot=True)
    if boot_partition is None and tryboot_partition is None:
        raise BootFileError("autoboot.txt sets no boot_partition the firmware would use: rewrite it in the "
                            "canonical form")
    return AutobootConfig(tryboot_a_b=tryboot_a_b, boot_partition=boot_partition,
                          tryboot_partition=tryboot_partition)


def _check_partition(number: int, what: str) -> None:
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= MAX_BOOT_PARTITION:
        raise BootFileError(f"{what} must be a partition number from 1 to {MAX_BOOT_PARTITION}, not {number!r}")


def render_autoboot(primary: int, trial: int) -> str:
    """The canonical autoboot.txt: boot ``primary``, and ``trial`` when the tryboot flag is set."""
    _check_partition(primary, "the primary boot partition")
    _check_partition(trial, "the trial boot partition")
    return f"[all]\ntryboot_a_b=1\nboot_partition={primary}\n[tryboot]\nboot_partition={trial}\n"


# --------------------------------------------------------------------------------------------------- cmdline.txt


def _cmdline_args(line: str) -> list[tuple[int, int]]:
    """(start, end) of each argument, split like the kernel does: on blanks outside double quotes."""
    spans: list[tuple[int, int]] = []
    index, length = 0, len(line)
    while index < length:
        while index < length and line[index].isspace():
            index += 1
        if index >= length:
            break
        start, quoted = index, False
        while index < length and (quoted or not line[index].isspace()):
            if line[index] == '"':
                quoted = not quoted
            index += 1
        spans.append((start, index))
    return spans


def _kernel_args(line: str) -> tuple[list[tuple[int, int]], int | None]:
    """The argument spans before ``--`` (the rest goes to init), and the index of ``--`` among all spans."""
    spans = _cmdline_args(line)
    for position, (start, end) in enumerate(spans):
        if line[start:end] == "--":
            return spans[:position], position
    return spans, None


def _root_value(arg: str) -> str | None:
    unquoted = arg[1:] if arg.startswith('"') else arg
    if not unquoted.startswith("root="):
        return None
    value = unquoted[len("root="):]
    return value[:-1] if arg.startswith('"') and value.endswith('"') else value


def cmdline_root(text: str) -> str | None:
    """The ``root=`` the kernel gets from cmdline.txt (its first line; the last ``root=`` wins), or None."""
    lines = _split_lines(text)
    if not lines:
        return None
    first = lines[0][0]
    value: str | None = None
    for start, end in _kernel_args(first)[0]:
        found = _root_value(first[start:end])
        if found is not None:
            value = found
    return value


def set_cmdline_root(text: str, root: str) -> str:
    """cmdline.txt with ``root=`` set to ``root`` (e.g. ``PARTUUID=1234abcd-03``) on its first line.

    Every kernel ``root=`` argument is rewritten in place (so the one that wins is ours); without one, ``root=``
    is added after the last kernel argument (before ``--`` if there is one). Nothing else changes.
    """
    _check_value(root, "root=")
    lines = _split_lines(text)
    if not lines:
        return f"root={root}\n"
    first, ending = lines[0]
    args, separator = _kernel_args(first)
    roots = [(start, end) for start, end in args if _root_value(first[start:end]) is not None]
    if roots:
        for start, end in reversed(roots):
            first = first[:start] + f"root={root}" + first[end:]
    elif separator is not None:
        start = _cmdline_args(first)[separator][0]
        first = first[:start] + f"root={root} " + first[start:]
    elif args:
        end = args[-1][1]
        first = first[:end] + f" root={root}" + first[end:]
    else:
        first = f"root={root}" + first
    lines[0] = (first, ending)
    return _join_lines(lines)


# --------------------------------------------------------------------------------------------------- fstab


def _fstab_unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def _normal_mountpoint(path: str) -> str:
    return path.rstrip("/") or "/"


def _fstab_fields(content: str) -> list[tuple[int, int]] | None:
    """Spans of the fields of an fstab entry line, None for a comment or blank line."""
    stripped = content.strip()
    if not stripped or stripped.startswith("#"):
        return None
    return [match.span() for match in re.finditer(r"[^ \t]+", content)]


def fstab_mounts(text: str) -> dict[str, str]:
    """Mount point → fs_spec of each entry of an fstab (a later entry for the same mount point wins)."""
    mounts: dict[str, str] = {}
    for content, _ in _split_lines(text):
        fields = _fstab_fields(content)
        if fields and len(fields) >= 2:
            mount_point = _normal_mountpoint(_fstab_unescape(content[fields[1][0]:fields[1][1]]))
            mounts[mount_point] = content[fields[0][0]:fields[0][1]]
    return mounts


def _replace_spec(content: str, fields: list[tuple[int, int]], spec: str) -> str:
    """The entry with its first field replaced, later columns kept where they were when blanks allow it.

    A gap of several spaces grows or shrinks so the next field stays in its column, but never below two spaces: a
    spec too long for its column pushes the fields after it right rather than squeezing the whole line. Single
    spaces (a line that is not aligned) and gaps with tabs are kept as they are.
    """
    result = content[: fields[0][0]] + spec
    for (_, prev_end), (start, end) in pairwise(fields):
        separator = content[prev_end:start]
        if len(separator) > 1 and separator.strip(" ") == "":
            separator = " " * max(2, start - len(result))
        result += separator + content[start:end]
    return result + content[fields[-1][1]:]


def set_fstab_mounts(
    text: str, *, root: str, boot: str | None, boot_mountpoint: str = DEFAULT_BOOT_MOUNTPOINT,
) -> str:
    """fstab with the fs_spec of ``/`` set to ``root`` and that of the boot mount point set to ``boot``.

    The boot entry is the one mounted on ``boot_mountpoint``, or, if there is none, on ``/boot`` (the legacy mount
    point). ``boot=None`` leaves it alone; a missing boot entry is not added (the image decides whether it mounts
    the boot partition). A missing ``/`` entry is added before the first entry: ``ROOT / ext4 defaults,noatime 0 1``.
    Everything else (other entries such as ``/data``, options, dump/pass fields, comments) is kept, and the columns
    stay aligned where the blanks allow.
    """
    _check_value(root, "the root fs_spec")
    if boot is not None:
        _check_value(boot, "the boot fs_spec")
    if not boot_mountpoint.startswith("/"):
        raise BootFileError(f"boot mount point {boot_mountpoint!r} must be an absolute path")
    entries = _fstab_entries(_split_lines(text))
    wanted: dict[str, str] = {"/": root}
    if boot is not None:
        mount_points = {mount_point for _, _, mount_point in entries}
        boot_target = _normal_mountpoint(boot_mountpoint)
        if boot_target not in mount_points and LEGACY_BOOT_MOUNTPOINT in mount_points:
            boot_target = LEGACY_BOOT_MOUNTPOINT
        wanted[boot_target] = boot
    text = _set_specs(text, wanted)
    if not any(mount_point == "/" for _, _, mount_point in entries):
        lines = _split_lines(text)
        insert_at = entries[0][0] if entries else len(lines)
        text = _join_lines(_insert_lines(lines, insert_at, [f"{root} / ext4 defaults,noatime 0 1"]))
    return text


def _fstab_entries(lines: list[_Line]) -> list[tuple[int, list[tuple[int, int]], str]]:
    """(line index, field spans, normalized mount point) of each entry line."""
    entries: list[tuple[int, list[tuple[int, int]], str]] = []
    for index, (content, _) in enumerate(lines):
        fields = _fstab_fields(content)
        if fields and len(fields) >= 2:
            entries.append((index, fields, _normal_mountpoint(_fstab_unescape(content[fields[1][0]:fields[1][1]]))))
    return entries


def _set_specs(text: str, wanted: dict[str, str]) -> str:
    lines = _split_lines(text)
    for index, fields, mount_point in _fstab_entries(lines):
        if mount_point in wanted:
            content, ending = lines[index]
            lines[index] = (_replace_spec(content, fields, wanted[mount_point]), ending)
    return _join_lines(lines)


def set_fstab_specs(text: str, wanted: dict[str, str]) -> str:
    """fstab with the fs_spec of each mount point in ``wanted`` set; other lines kept as they are."""
    return _set_specs(text, wanted)


def fstab_for_slot(image_fstab: str, running_fstab: str, *, root: str, boot: str | None, data: str | None) -> str:
    """A freshly written root's fstab, every partition of this disk named by its role, never by its number.

    ``/`` gets ``root`` and the boot mount point ``boot`` (`set_fstab_mounts`). The data partition (``data``, its
    fs_spec) is where the running system mounts it: the image's entry for that mount point gets ``data`` (an image
    built on another disk, or for the other layout, numbers its partitions differently), and an image without one
    gets the running system's line. A running system that does not mount ``data`` adds nothing.
    """
    fstab = set_fstab_mounts(image_fstab, root=root, boot=boot)
    if data is None:
        return fstab
    running = _split_lines(running_fstab)
    data_entry = next(((index, mount_point) for index, fields, mount_point in _fstab_entries(running)
                       if running[index][0][fields[0][0]:fields[0][1]].lower() == data.lower()), None)
    if data_entry is None:
        return fstab
    index, mount_point = data_entry
    if mount_point in fstab_mounts(fstab):
        return _set_specs(fstab, {mount_point: data})
    lines = _split_lines(fstab)
    return _join_lines(_insert_lines(lines, len(lines), [running[index][0]]))
