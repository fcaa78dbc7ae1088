"""Data and configuration across updates (abflasher/carryover.py): the data mount, preserved files, install hooks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from abflasher import errors
from abflasher.carryover import gather_preserved, restore_preserved, run_install_hooks, with_data_mount
from abflasher.config import Config, parse_config
from abflasher.health import run_check

DATA = "PARTUUID=1234abcd-04"


def test_the_data_mount_is_added_when_the_image_has_none() -> None:
    image = "PARTUUID=deadbeef-02  /  ext4  defaults  0  1\n"
    assert with_data_mount(image, DATA, "/data") == image + f"{DATA}  /data  ext4  defaults,noatime,nofail  0  2\n"
    assert with_data_mount(image.rstrip("\n"), DATA, "/srv") == image + f"{DATA}  /srv  ext4  " \
        "defaults,noatime,nofail  0  2\n"
    assert with_data_mount(image, DATA, "") == image, "no data_mount: nothing added"


def test_the_images_own_data_entry_gets_this_disks_partition() -> None:
    image = "PARTUUID=deadbeef-02  /  ext4  defaults  0  1\nPARTUUID=deadbeef-04  /data  ext4  noatime  0  2\n"
    assert with_data_mount(image, DATA, "/data") == image.replace("deadbeef-04", "1234abcd-04")
    mounted_elsewhere = image.replace("PARTUUID=deadbeef-04  /data", f"{DATA}  /var/app")
    assert with_data_mount(mounted_elsewhere, DATA, "/data") == mounted_elsewhere


def test_preserved_files_and_folders_are_copied_with_modes(tmp_path: Path) -> None:
    running, stash, new = tmp_path / "running", tmp_path / "stash", tmp_path / "new"
    for path, mode in (("etc/ssh/ssh_host_ed25519_key", 0o600), ("etc/ssh/ssh_host_ed25519_key.pub", 0o644),
                       ("etc/machine-id", 0o444), ("etc/NetworkManager/system-connections/home.nmconnection", 0o600)):
        (running / path).parent.mkdir(parents=True, exist_ok=True)
        (running / path).write_text(f"running {path}\n")
        (running / path).chmod(mode)
    (running / "etc/ssh/sshd_config").write_text("not preserved\n")
    (new / "etc/ssh").mkdir(parents=True)
    (new / "etc/machine-id").write_text("image's own\n")
    (new / "etc/ssh/sshd_config").write_text("image's sshd_config\n")
    stash.mkdir()
    config = Config()
    gathered = gather_preserved(config, running, stash)
    assert sorted(gathered) == ["/etc/NetworkManager/system-connections", "/etc/machine-id",
                                "/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/ssh_host_ed25519_key.pub"]
    restore_preserved(stash, gathered, new)
    assert (new / "etc/machine-id").read_text() == "running etc/machine-id\n"
    assert (new / "etc/ssh/ssh_host_ed25519_key").stat().st_mode & 0o777 == 0o600
    assert (new / "etc/NetworkManager/system-connections/home.nmconnection").read_text().startswith("running")
    assert (new / "etc/ssh/sshd_config").read_text() == "image's sshd_config\n"
    assert not (new / "etc/wpa_supplicant").exists(), "what the running system lacks is not invented"


def test_preserve_paths_must_be_absolute_without_dotdot() -> None:
    for bad in ("etc/machine-id", "/etc/../root/.ssh"):
        with pytest.raises(errors.InvalidArgument, match="preserve"):
            parse_config(f"[ab-flasher]\npreserve = {bad}\n")
    assert parse_config("[ab-flasher]\npreserve =\n").preserve == ()


def _hook(directory: Path, name: str, body: str) -> None:
    directory.mkdir(exist_ok=True)
    (directory / name).write_text("#!/bin/sh\n" + body)
    (directory / name).chmod(0o755)


def test_hooks_run_in_order_with_the_new_root_slot_and_version(tmp_path: Path) -> None:
    hooks, log = tmp_path / "install.d", tmp_path / "log"
    _hook(hooks, "20-second", f'echo "second $AB_FLASHER_SLOT" >> {log}\n')
    _hook(hooks, "10-first", f'echo "first $AB_FLASHER_NEW_ROOT $AB_FLASHER_VERSION" >> {log}\n')
    (hooks / "30-not-executable").write_text("#!/bin/sh\nexit 1\n")
    config = Config(install_hooks_dir=str(hooks))
    assert run_install_hooks(config, run_check, tmp_path / "root", "b", "1.2.0") == 2
    assert log.read_text() == f"first {tmp_path / 'root'} 1.2.0\nsecond b\n"
    assert "AB_FLASHER_SLOT" not in os.environ


def test_a_failing_or_hanging_hook_aborts(tmp_path: Path) -> None:
    hooks = tmp_path / "install.d"
    _hook(hooks, "10-fails", "echo 'disk quota' >&2\nexit 4\n")
    with pytest.raises(errors.Incompatible, match=r"install hook 10-fails failed \(exit 4\): disk quota"):
        run_install_hooks(Config(install_hooks_dir=str(hooks)), run_check, tmp_path, "b", "1")
    (hooks / "10-fails").unlink()
    _hook(hooks, "10-hangs", "sleep 60\n")
    with pytest.raises(errors.Incompatible, match="did not finish within 0.5 s"):
        run_install_hooks(Config(install_hooks_dir=str(hooks), install_hook_timeout=0.5), run_check, tmp_path,
                          "b", "1")


def test_no_hooks_directory_runs_nothing(tmp_path: Path) -> None:
    assert run_install_hooks(Config(install_hooks_dir=str(tmp_path / "none")), run_check, tmp_path, "b", "1") == 0
