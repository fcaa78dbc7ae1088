"""``ab-flasher write`` by hand never overwrites what keeps this device bootable: its recovery slot, the slot it
runs, or the committed primary (what a reset boots). Writing into the other system slot, or any other disk, stays
allowed (factory flashing of SD cards in a reader)."""

from __future__ import annotations

import os
import stat

from abflasher import errors
from abflasher.config import load_config


def refuse_device_slot(target: str, config_path: str) -> None:
    """Raise when block device ``target`` is the recovery slot, the booted slot or the committed primary of this
    device (as its configuration describes it); do nothing for files, other disks, and machines that are not an
    ab-flasher device at all."""
    try:
        target_st = os.stat(target)
    except OSError:
        return  # not there (yet): open_target says what is wrong
    if not stat.S_ISBLK(target_st.st_mode):
        return
    config = load_config(config_path)
    from abflasher.updater import Updater

    try:
        status = Updater(config).status()
    except (errors.AbFlasherError, OSError):
        return  # no A/B layout here (a workstation flashing cards): nothing of this machine's to protect
    for slot in status.slots:
        try:
            if os.stat(slot.device).st_rdev != target_st.st_rdev:
                continue
        except OSError:
            continue
        if slot.role == "recovery":
            raise errors.InvalidArgument(
                f"{target} is this device's recovery slot ({slot.name}): ab-flasher never writes it, it is what the "
                "device falls back to. Updates go to a system slot (abflasherctl update, or the upload page)"
            )
        if slot.booted:
            raise errors.Busy(f"{target} is slot {slot.name}, the running system: it cannot be overwritten")
        if slot.primary:
            raise errors.Busy(
                f"{target} is slot {slot.name}, the committed primary (what the device boots on a reset): writing "
                "it by hand would leave the device without a bootable system. Install into the other slot "
                "(abflasherctl update), or commit another slot first"
            )
