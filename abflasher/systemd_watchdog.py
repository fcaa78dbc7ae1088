"""systemd pets the hardware watchdog while the system runs: the package's drop-in, and the option to leave it alone.

The package ships ``/usr/lib/systemd/system.conf.d/60-ab-flasher-watchdog.conf`` (``RuntimeWatchdogSec=15s``):
systemd reads it when it starts, so it opens /dev/watchdog within the firmware's ``watchdog.open_timeout`` on a
trial boot (Debian and Raspberry Pi OS bookworm leave RuntimeWatchdogSec off), and a committed system that hangs
is reset too. ``runtime_watchdog = no`` in ab-flasher.conf masks it the standard systemd way, a link to /dev/null of
the same name in /etc/systemd/system.conf.d, so systemd's own setting applies from the next boot;
``ab-flasher boot-check`` keeps that link in step with the option on every boot. A drop-in only masks the same
name: one of the administrator's own in /etc/systemd/system.conf.d that sorts later still wins over ours.
"""

from __future__ import annotations

import os
from pathlib import Path

DROP_IN_NAME = "60-ab-flasher-watchdog.conf"
ADMIN_DIR = "etc/systemd/system.conf.d"  # under the root directory
MASK_TARGET = "/dev/null"


def sync_mask(keep: bool, root: str | os.PathLike[str] = "/") -> str | None:
    """Mask (``keep`` False) or unmask the package's drop-in; what changed, or None when nothing did.

    Only a link to /dev/null is ours to remove: a real file of that name is the administrator's replacement.
    """
    mask = Path(root, ADMIN_DIR, DROP_IN_NAME)
    ours = mask.is_symlink() and os.readlink(mask) == MASK_TARGET
    if keep:
        if not ours:
            return None
        mask.unlink()
        return f"unmasked the systemd watchdog drop-in ({mask} removed); it applies from the next boot"
    if ours or mask.exists() or mask.is_symlink():
        return None
    mask.parent.mkdir(parents=True, exist_ok=True)
    mask.symlink_to(MASK_TARGET)
    return (f"masked the systemd watchdog drop-in ({mask} -> {MASK_TARGET}, runtime_watchdog = no); systemd's own "
            "setting applies from the next boot")
