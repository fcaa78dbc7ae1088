"""Arming the Raspberry Pi firmware's hardware watchdog for a trial boot only (docs/watchdog.md).

The firmware starts the watchdog before the kernel when the config file it read has ``kernel_watchdog_timeout=N``
(and, on firmware since mid-2025, ``dtparam=watchdog=on``) and hands it to Linux with ``watchdog.open_timeout=N``
on the command line: the kernel keeps it alive for N seconds, by then systemd must have opened /dev/watchdog
(RuntimeWatchdogSec, the package's drop-in). A trial whose kernel or init hangs is therefore reset, and the reset
clears the one-shot tryboot flag, so the committed slot boots. The committed configuration is never changed: the
lines go only where the firmware looks on a trial boot,

- prefix layout: ``tryboot.txt``, after its ``[all]`` (`slotswitch.render_tryboot` puts `arming_lines` there;
  the file is one sector, so a change of the timeout is one sector written in place);
- autoboot layout: a ``[tryboot]`` section at the end of the new slot's own ``config.txt`` (the firmware reads
  that file on both kinds of boot; the section is true only with the tryboot flag).

And the new slot's ``cmdline.txt`` gets ``watchdog_disarm=0``: Raspberry Pi OS's initramfs otherwise stops a
running watchdog before systemd can take it over. Everything here is a pure function of text; the boot layouts call
them where they write those files.
"""

from __future__ import annotations

#: Marks the lines ab-flasher added, so rewriting a file replaces them instead of adding more.
MARKER = "# ab-flasher: hardware watchdog for trial boots (docs/watchdog.md)"
DISARM_ARGUMENT = "watchdog_disarm"
MAX_TIMEOUT = 3600


def arming_lines(timeout: int) -> list[str]:
    """The config.txt settings that make the firmware start the watchdog with ``timeout`` seconds; none for 0."""
    if not 0 <= timeout <= MAX_TIMEOUT:
        raise ValueError(f"watchdog timeout {timeout} is out of range 0..{MAX_TIMEOUT}")
    if timeout == 0:
        return []
    return ["dtparam=watchdog=on", f"kernel_watchdog_timeout={timeout}"]


def _without_block(text: str) -> list[str]:
    """The lines of ``text`` without an earlier ab-flasher block (the marker and the lines up to a blank line)."""
    lines = text.splitlines()
    if MARKER not in lines:
        return lines
    start = lines.index(MARKER)
    end = start + 1
    while end < len(lines) and lines[end].strip():
        end += 1
    kept = lines[:start] + lines[end:]
    while kept and not kept[-1].strip():
        kept.pop()
    return kept


def _with_block(text: str, block: list[str]) -> str:
    lines = _without_block(text)
    if block:
        if lines and lines[-1].strip():
            lines.append("")
        lines += [MARKER, *block]
    return "\n".join(lines) + "\n" if lines else ""


def arm_tryboot_section(config_txt: str, timeout: int) -> str:
    """A slot's own ``config.txt`` (autoboot layout) with a ``[tryboot]`` section arming the watchdog at its end.

    ``[all]`` first: filters of different kinds add up, so after a ``[cm4]`` a bare ``[tryboot]`` would mean "a
    CM4 on trial"; and ``[all]`` after it, so that anything appended later applies to every boot again."""
    lines = arming_lines(timeout)
    return _with_block(config_txt, ["[all]", "[tryboot]", *lines, "[all]"] if lines else [])


def keep_watchdog_armed(cmdline: str) -> str:
    """The kernel command line with ``watchdog_disarm=0`` (one line; an existing ``watchdog_disarm=`` replaced)."""
    first, _newline, rest = cmdline.partition("\n")
    words = [word for word in first.split() if not word.startswith(DISARM_ARGUMENT + "=")]
    # Words after "--" go to init, not to the kernel's command line the initramfs reads: stay before them.
    at = words.index("--") if "--" in words else len(words)
    words.insert(at, f"{DISARM_ARGUMENT}=0")
    return " ".join(words) + "\n" + rest
