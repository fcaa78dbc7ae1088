"""The freshly written root file system of the target slot: checked, mounted, and made to fit this device.

Before a trial is armed, the new root must hold an ext2/3/4 file system with a valid ``/.ab_version`` (the requested
version, or for an upload without one, a version the ordering rules allow) and, if configured, the right
``/.ab_compatible``; its ``/etc/fstab`` is pointed at its own partitions (boot/bootfiles.py does the editing); and it
gets the state as it will be once its trial is armed (abflasher/state.py), so it knows on its trial boot that it was
armed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from abflasher import carryover, errors
from abflasher.boot import bootfiles
from abflasher.commands import Runner
from abflasher.config import Config
from abflasher.decisions import check_version_order
from abflasher.delta.kept import carry_indexes
from abflasher.disk.slots import COMPATIBLE_FILE, VERSION_FILE, DiskLayout, Slot, read_version_file
from abflasher.image.formats import is_ext_file_system
from abflasher.state import STATE_FILE_MODE, write_atomically
from abflasher.version import compare_versions, parse_version

log = logging.getLogger(__name__)

#: For a request without a version (an upload): check the image's version against the booted one.
BootedVersion = Callable[[], str]


def read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def run_dir(config: Config) -> Path:
    """The updater's private directory (0700) under which new roots are mounted and artifacts downloaded."""
    path = Path(config.run_dir)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def unmount_leftovers(config: Config, run: Runner) -> None:
    """Unmount new roots a killed job left mounted in run_dir (its own, 0700): they would hold the target busy.
    A power cut clears them by itself; a killed service, restarted by systemd, does not."""
    for mountpoint in sorted(run_dir(config).glob("slot-*")):
        if os.path.ismount(mountpoint):
            done = run(["umount", str(mountpoint)], 120)
            if done.returncode != 0:
                raise errors.DeviceError(f"a root left mounted on {mountpoint} by an interrupted update cannot be "
                                         f"unmounted: {done.stderr.strip()}")
        with contextlib.suppress(OSError):
            mountpoint.rmdir()


@contextlib.contextmanager
def mounted(config: Config, run: Runner, device: str, *, read_only: bool = False) -> Iterator[Path]:
    mountpoint = Path(tempfile.mkdtemp(prefix="slot-", dir=run_dir(config)))
    try:
        # noload: a read-only look does not even replay the journal (the slot is about to be overwritten).
        options = "ro,noload,nosuid,nodev,noexec" if read_only else "rw,nosuid,nodev,noexec"
        done = run(["mount", "-t", "ext4", "-o", options, device, str(mountpoint)], 120)
        if done.returncode != 0:
            raise errors.BadImage(f"the root file system on {device} cannot be mounted: {done.stderr.strip()}")
        try:
            yield mountpoint
        finally:
            umount = run(["umount", str(mountpoint)], 120)
            if umount.returncode != 0:
                log.error("umount %s failed: %s", mountpoint, umount.stderr.strip())
    finally:
        with contextlib.suppress(OSError):
            mountpoint.rmdir()


def check_root_file_system(device: str) -> None:
    with open(device, "rb") as handle:
        head = handle.read(2048)
    if not is_ext_file_system(head):
        raise errors.Incompatible(
            "the image is not an ext2/3/4 root file system (ab-flasher writes root partition images, "
            "not whole-disk images)"
        )


def image_version(root: Path, requested: str, allow_downgrade: bool, booted_version: BootedVersion) -> str:
    """The version the new root holds; it must be ``requested``, or, with none requested, one that may replace the
    booted version."""
    version = read_version_file(read_or_none(root / VERSION_FILE))
    if not version:
        raise errors.BadImage(f"the image has no readable /{VERSION_FILE}: it is not an ab-flasher slot image")
    try:
        parse_version(version)
    except errors.InvalidArgument:
        # Not quoted: the file came with the image, and is no caller's argument.
        raise errors.BadImage(f"the image's /{VERSION_FILE} does not hold a valid version (like 1.4.0)") from None
    if requested and compare_versions(version, requested) != 0:
        raise errors.BadImage(f"the image holds version {version}, not the requested {requested}")
    if not requested:
        check_version_order(version, booted_version(), allow_downgrade)
    return version


def check_compatible(root: Path, wanted: str) -> None:
    compatible = read_version_file(read_or_none(root / COMPATIBLE_FILE))
    if wanted and compatible and compatible != wanted:
        raise errors.Incompatible(f"the image is for {compatible!r}, this device is {wanted!r}")


def fstab_for(layout: DiskLayout, target: Slot, image_fstab: str, running_root: str) -> str:
    """The new root's fstab: its own root and boot partitions, and the data partition where the running system
    mounts it (by role, never by partition number: the image may come from the other layout)."""
    data = layout.data_partition
    running = read_or_none(Path(running_root, "etc", "fstab")) or b""
    return bootfiles.fstab_for_slot(
        image_fstab,
        running.decode("utf-8", "replace"),
        root=f"PARTUUID={target.root_partuuid}",
        boot=f"PARTUUID={target.boot_partuuid}",
        data=f"PARTUUID={layout.table.partition(data).partuuid}" if data is not None else None,
    )


def fix_fstab(root: Path, layout: DiskLayout, target: Slot, running_root: str, data_mount: str = "") -> None:
    fstab_path = root / "etc" / "fstab"
    fstab = fstab_path.read_text() if fstab_path.is_file() else ""
    new_fstab = fstab_for(layout, target, fstab, running_root)
    if layout.data_partition is not None:
        data_spec = f"PARTUUID={layout.table.partition(layout.data_partition).partuuid}"
        new_fstab = carryover.with_data_mount(new_fstab, data_spec, data_mount)
    if new_fstab != fstab:
        st = fstab_path.stat() if fstab_path.exists() else None
        write_atomically(
            fstab_path,
            new_fstab,
            mode=st.st_mode & 0o7777 if st else 0o644,
            owner=(st.st_uid, st.st_gid) if st else None,
        )


def fix_up_root(
    config: Config,
    run: Runner,
    layout: DiskLayout,
    target: Slot,
    *,
    requested: str,
    allow_downgrade: bool,
    booted_version: BootedVersion,
    carried_state: Callable[[str], tuple[str, str]] | None,
    preserved: tuple[Path, list[str]] | None = None,
    check_runner: Runner | None = None,
) -> str:
    """Check the new root on ``target`` and make it fit this device; returns the version it holds.

    ``carried_state(version)`` gives (path inside the root, text) of the state copy the new root gets, or is None
    when the state is not kept inside the root. ``preserved``: the folder and paths `carryover.gather_preserved`
    gathered, put into the new root. Then the install hooks run (through ``check_runner``) on the finished root.
    """
    check_root_file_system(target.root_device)
    with mounted(config, run, target.root_device) as root:
        version = image_version(root, requested, allow_downgrade, booted_version)
        check_compatible(root, config.compatible)
        fix_fstab(root, layout, target, config.root_path, config.data_mount)
        if preserved is not None:
            carryover.restore_preserved(preserved[0], preserved[1], root)
        if carried_state is not None:
            inside, text = carried_state(version)
            write_atomically(root / inside.lstrip("/"), text, mode=STATE_FILE_MODE)
            # The indexes a delta update keeps travel with the state (docs/delta-updates.md).
            carry_indexes(config.state_dir, (root / inside.lstrip("/")).parent)
        if check_runner is not None:
            carryover.run_install_hooks(config, check_runner, root, target.name, version)
    return version
