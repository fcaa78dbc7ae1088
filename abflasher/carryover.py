"""What a device keeps across updates besides its data partition: its identity, its networks, its own fix-ups.

- ``preserve`` (config): files and folders (shell globs) copied from the running system into each new root before
  its trial: SSH host keys, ``/etc/machine-id``, saved networks (NetworkManager, wpa_supplicant) by default, so the
  device keeps its name on the network, its host keys and its Wi-Fi. They are gathered (`gather_preserved`) into a
  private folder first: in main + recovery the running system is recovery, and the files worth keeping are the ones
  of the main system about to be overwritten, gathered from it before its slot is written.
- install hooks (``install_hooks_dir``): executables run in name order with the new root mounted, its path, slot
  and version in their environment; one that fails (or outlives ``install_hook_timeout``) aborts the install, and
  nothing is armed.
- the data partition: never written; each new root's fstab mounts it at ``data_mount`` (`with_data_mount`).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from abflasher import errors
from abflasher.boot import bootfiles
from abflasher.commands import Runner
from abflasher.config import Config

log = logging.getLogger(__name__)

DATA_FSTAB_OPTIONS = "defaults,noatime,nofail"


# ------------------------------------------------------------------------------------------------- the data mount


def with_data_mount(fstab: str, data_spec: str, mount_point: str) -> str:
    """``fstab`` mounting the data partition ``data_spec`` at ``mount_point``: an entry for that mount point gets
    the spec (an image built elsewhere names another disk's partition); without one, a line is added. Unchanged when
    ``mount_point`` is empty or the data partition is already mounted somewhere."""
    if not mount_point:
        return fstab
    mounts = bootfiles.fstab_mounts(fstab)
    if any(spec.lower() == data_spec.lower() for spec in mounts.values()):
        return fstab
    if mount_point.rstrip("/") in mounts:
        return bootfiles.set_fstab_specs(fstab, {mount_point.rstrip("/"): data_spec})
    ending = "" if not fstab or fstab.endswith("\n") else "\n"
    return f"{fstab}{ending}{data_spec}  {mount_point}  ext4  {DATA_FSTAB_OPTIONS}  0  2\n"


# ------------------------------------------------------------------------------------------------- preserved files


def _matches(root: Path, pattern: str) -> list[Path]:
    base = str(root).rstrip("/")
    return sorted(Path(found) for found in glob.glob(base + pattern))


def _copy_entry(source: Path, destination: Path) -> None:
    """``source`` (file, symlink or folder) at ``destination``, replacing what is there, modes and owners kept."""
    if destination.is_symlink() or destination.is_file():
        destination.unlink()
    elif destination.is_dir():
        shutil.rmtree(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if source.is_symlink():
        os.symlink(os.readlink(source), destination)
        return
    if source.is_dir():
        shutil.copytree(source, destination, symlinks=True)
        for folder, _dirs, files in os.walk(destination):
            for name in (folder, *(os.path.join(folder, f) for f in files)):
                original = source / os.path.relpath(name, destination)
                st = original.lstat()
                os.lchown(name, st.st_uid, st.st_gid)
        return
    shutil.copy2(source, destination)
    st = source.stat()
    os.chown(destination, st.st_uid, st.st_gid)


def gather_preserved(config: Config, source_root: Path, stash: Path) -> list[str]:
    """Copy what ``preserve`` names from ``source_root`` into ``stash`` (same relative paths); returns the paths."""
    gathered: list[str] = []
    for pattern in config.preserve:
        for found in _matches(source_root, pattern):
            relative = found.relative_to(source_root)
            _copy_entry(found, stash / relative)
            gathered.append("/" + str(relative))
    return gathered


def restore_preserved(stash: Path, gathered: list[str], new_root: Path) -> None:
    """Put the gathered files into ``new_root``, over what the image has there."""
    for path in gathered:
        relative = path.lstrip("/")
        _copy_entry(stash / relative, new_root / relative)
    if gathered:
        log.info("kept across the update: %s", ", ".join(gathered))


@contextlib.contextmanager
def stash_dir(run_dir: Path) -> Iterator[Path]:
    """A private (0700) folder under the updater's run directory for the gathered files, removed afterwards."""
    path = run_dir / "preserved"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(mode=0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- install hooks


def run_install_hooks(config: Config, check_runner: Runner, new_root: Path, slot: str, version: str) -> int:
    """Run every executable of ``install_hooks_dir``; Incompatible naming the first that fails. Returns how many
    ran. Each runs in its own process group, killed whole at the timeout (abflasher/health.py: run_check)."""
    hooks_dir = Path(config.install_hooks_dir)
    hooks = sorted(p for p in hooks_dir.iterdir() if p.is_file() and os.access(p, os.X_OK)) \
        if hooks_dir.is_dir() else []
    environment = [f"AB_FLASHER_NEW_ROOT={new_root}", f"AB_FLASHER_SLOT={slot}", f"AB_FLASHER_VERSION={version}"]
    for hook in hooks:
        try:
            # env(1) adds the variables: the service's own environment is shared by its threads.
            done = check_runner(["env", *environment, str(hook)], config.install_hook_timeout)
        except subprocess.TimeoutExpired:
            raise errors.Incompatible(f"install hook {hook.name} did not finish within "
                                      f"{config.install_hook_timeout:g} s; nothing was armed") from None
        except OSError as exc:
            raise errors.Incompatible(f"install hook {hook.name} could not run: {exc.strerror}; nothing was "
                                      "armed") from None
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()
            raise errors.Incompatible(f"install hook {hook.name} failed (exit {done.returncode})"
                                      + (f": {detail[-1]}" if detail else "") + "; nothing was armed")
    return len(hooks)
