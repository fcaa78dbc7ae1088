"""The lines that arm the firmware's watchdog for a trial (abflasher/boot/watchdog.py), checked against the firmware
model: what ab-flasher writes must arm the trial boot and nothing else."""

from __future__ import annotations

import pytest

from abflasher.boot import slotswitch, watchdog
from tests.pifirmware import FilterContext, parse_config, watchdog_timeout_of


def _armed(text: str, *, tryboot: bool, model: str = "pi4") -> int:
    context = FilterContext(tryboot=tryboot, model=model, boot_partition=1)
    return watchdog_timeout_of(parse_config(text, context))


def test_tryboot_txt_is_armed_whatever_section_came_last() -> None:
    text = slotswitch.render_tryboot("b/", watchdog.arming_lines(45))
    assert _armed(text, tryboot=True) == 45
    # Its included config.txt ends inside [pi5]: the [all] before the arming lines still applies them everywhere.
    context = FilterContext(tryboot=True, model="pi4", boot_partition=1)
    lines = parse_config(text, context, include=lambda name: "os_prefix=a/\n[pi5]\ndtoverlay=something\n")
    assert watchdog_timeout_of(lines) == 45


def test_changing_the_timeout_is_one_sector_in_place() -> None:
    once = slotswitch.render_tryboot("b/", watchdog.arming_lines(45))
    again = slotswitch.retarget_tryboot(once, "b/", watchdog.arming_lines(90))
    assert len(again.encode()) == len(once.encode()) == 512
    assert _armed(again, tryboot=True) == 90
    assert _armed(slotswitch.retarget_tryboot(once, "b/", watchdog.arming_lines(0)), tryboot=True) == 0


def test_the_new_slots_tryboot_section_arms_only_its_trial() -> None:
    config = "arm_64bit=1\n[cm4]\notg_mode=1\n"
    armed = watchdog.arm_tryboot_section(config, 60)
    assert _armed(armed, tryboot=True) == 60
    assert _armed(armed, tryboot=False) == 0, "the committed boots of that slot arm nothing"
    assert _armed(armed + "dtparam=watchdog=on\nkernel_watchdog_timeout=5\n", tryboot=False) == 5, \
        "lines appended later apply to every boot again ([all] closes the section)"


def test_the_cmdline_keeps_the_watchdog_through_the_initramfs() -> None:
    assert watchdog.keep_watchdog_armed("console=tty1 root=PARTUUID=1-02 rootwait\n") == \
        "console=tty1 root=PARTUUID=1-02 rootwait watchdog_disarm=0\n"
    assert watchdog.keep_watchdog_armed("root=/dev/sda2 watchdog_disarm=1 -- single") == \
        "root=/dev/sda2 watchdog_disarm=0 -- single\n"


def test_timeouts_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="out of range"):
        watchdog.arming_lines(-1)
    with pytest.raises(ValueError, match="out of range"):
        watchdog.arming_lines(3601)
    assert watchdog.arming_lines(0) == []


