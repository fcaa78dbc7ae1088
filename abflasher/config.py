"""/etc/ab-flasher/ab-flasher.conf → a frozen dataclass, passed explicitly to whatever needs it (no globals).

The file is INI (configparser), one ``[ab-flasher]`` section; every option is documented in the shipped conffile
(debian/ab-flasher.conf) and in ab-flasher.conf(5). Paths to /proc, /sys, /dev and the root file system are options
too, so tests point the engine at fixtures without the code knowing it is under test.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from abflasher import errors

DEFAULT_PATH = "/etc/ab-flasher/ab-flasher.conf"
SECTION = "ab-flasher"


@dataclass(frozen=True)
class Config:
    # Where updates come from. {version} is replaced; checksum_url may use {image_url} too.
    image_url: str = ""
    checksum_url: str = "{image_url}.sha256"
    #: URL of a text file holding the newest version (one line), for Check(); empty: no channel.
    channel_url: str = ""
    #: Compatible string the image's /.ab_compatible must match (like RAUC's compatible); empty: no check.
    compatible: str = ""
    #: Refuse images whose checksum cannot be established (a URL without sha256 and no checksum file).
    require_checksum: bool = True

    # The disk.
    #: prefix | autoboot | auto (detect from the partition table and the boot partition).
    layout: str = "auto"
    #: Whole-disk device holding the slots; empty: the disk the booted root lives on.
    disk: str = ""
    #: Where the firmware's boot partition (p1, prefix layout) or the booted slot's boot partition is mounted.
    boot_mount: str = "/boot/firmware"

    # The running system (overridable for tests and chroots).
    root_path: str = "/"
    proc_path: str = "/proc"
    sys_path: str = "/sys"
    dev_path: str = "/dev"
    state_dir: str = "/var/lib/ab-flasher"
    run_dir: str = "/run/ab-flasher"

    # Rebooting and committing.
    #: Command that reboots into the one-shot tryboot mode.
    tryboot_command: tuple[str, ...] = ("systemctl", "reboot", "0 tryboot")
    #: Used when tryboot_command fails to start (e.g. no systemd).
    tryboot_fallback_command: tuple[str, ...] = ("reboot", "0 tryboot")
    reboot_command: tuple[str, ...] = ("systemctl", "reboot")
    #: Directory of executables that must all exit 0 for a trial boot to be committed.
    health_dir: str = "/etc/ab-flasher/health.d"
    health_timeout: float = 120.0
    #: Ask systemd whether the system came up: running | degraded-ok | off.
    health_systemd: str = "running"
    #: Reboot back to the committed slot when a trial boot fails its health checks.
    reboot_on_failed_health: bool = True
    #: Seconds after boot by which a trial must be committed, or it is rejected and the device reboots into the
    #: committed slot, whatever is stuck (ab-flasher-trial-deadline.service); 0: no deadline.
    trial_deadline: float = 600.0
    #: Keep the package's systemd drop-in that makes systemd pet the hardware watchdog (RuntimeWatchdogSec); no:
    #: mask it, leaving systemd's own setting alone (from the next boot).
    runtime_watchdog: bool = True
    #: Arm the Pi firmware's watchdog for a trial boot (kernel_watchdog_timeout, in seconds); 0: do not arm.
    trial_watchdog_timeout: int = 60

    # Image handling.
    #: gzip inflater: auto (igzip when installed, else isal or zlib-ng, else zlib) | igzip | zlib | isal | zlib-ng.
    gzip_inflater: str = "auto"
    http_connect_timeout: float = 10.0
    http_read_timeout: float = 60.0
    http_retries: int = 5
    #: Seconds an uploaded image (UpdateFromFd, a pipe or socket) may send nothing before the update is cancelled,
    #: so an uploader that vanished without closing frees the service; 0: wait forever.
    upload_idle_timeout: float = 60.0
    #: Optional boot artifact URL ({version}): a boot partition image (autoboot) or a tarball (prefix).
    boot_artifact_url: str = ""

    # Signed updates and unattended updates (docs/trust.md, docs/publishing.md).
    #: OpenSSH allowed_signers file of the keys updates must be signed by. When it lists a key, only signed bundles
    #: and signed channels are installed, on every path, and channel_url names the channel's manifest.json; when it
    #: is missing or lists none, the simple mode applies (image_url and its checksum file).
    trusted_keys: str = "/etc/ab-flasher/allowed_signers"
    #: How far ab-flasher-update.timer goes: off | check | download-and-install | install-and-reboot.
    auto_update: str = "off"
    #: When the timer fires (systemd OnCalendar= syntax), and the random delay it adds (a systemd time span).
    auto_update_schedule: str = "daily"
    auto_update_randomized_delay: str = "1h"
    #: When install-and-reboot may reboot into the new version: HH:MM-HH:MM, local time, may wrap midnight; empty:
    #: at once.
    maintenance_window: str = ""
    # Delta updates (docs/delta-updates.md): an image_url (or a request's url) ending in .caibx names a casync index.
    #: The chunk store of the index ({version} and {image_url} are replaced); empty: casync's default,
    #: default.castr next to the index.
    delta_store_url: str = ""
    #: Parallel connections to the chunk store.
    delta_connections: int = 4
    # Data and configuration across updates (abflasher/carryover.py, docs/layouts.md).
    #: Where each new root mounts the data partition (an fstab line is added if its image has none); empty: none.
    data_mount: str = "/data"
    #: Paths (shell globs) copied from the running system into each new root before its trial: its identity and
    #: its saved networks. Directories are copied whole. Empty: nothing.
    preserve: tuple[str, ...] = (
        "/etc/ssh/ssh_host_*_key", "/etc/ssh/ssh_host_*_key.pub", "/etc/machine-id",
        "/etc/NetworkManager/system-connections", "/etc/wpa_supplicant/wpa_supplicant.conf",
    )
    #: Executables run in name order with the new root mounted (AB_FLASHER_NEW_ROOT, AB_FLASHER_SLOT,
    #: AB_FLASHER_VERSION in their environment); one that fails aborts the install before anything is armed.
    install_hooks_dir: str = "/etc/ab-flasher/install.d"
    install_hook_timeout: float = 300.0

    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def image_url_for(self, version: str) -> str:
        if not self.image_url:
            raise errors.InvalidArgument(
                "no image URL: set image_url in /etc/ab-flasher/ab-flasher.conf or pass one with the request"
            )
        return self.image_url.replace("{version}", version)

    def delta_store_url_for(self, version: str, image_url: str) -> str:
        return self.delta_store_url.replace("{version}", version).replace("{image_url}", image_url)

    def checksum_url_for(self, version: str, image_url: str) -> str:
        return self.checksum_url.replace("{version}", version).replace("{image_url}", image_url)

    @property
    def state_file(self) -> Path:
        return Path(self.state_dir) / "state.json"


_BOOL_TRUE = {"1", "yes", "true", "on"}
_BOOL_FALSE = {"0", "no", "false", "off"}


def _convert(name: str, raw: str, annotation: str) -> object:
    value = raw.strip()
    try:
        if annotation == "bool":
            lowered = value.lower()
            if lowered in _BOOL_TRUE:
                return True
            if lowered in _BOOL_FALSE:
                return False
            raise ValueError("expected yes or no")
        if annotation == "int":
            return int(value)
        if annotation == "float":
            return float(value)
        if annotation == "tuple[str, ...]":
            return tuple(shlex.split(value))
    except ValueError as exc:
        raise errors.InvalidArgument(f"configuration option {name} = {raw!r}: {exc}") from exc
    return value


def _validate(config: Config) -> None:
    if config.layout not in ("auto", "prefix", "autoboot"):
        raise errors.InvalidArgument(f"configuration option layout = {config.layout!r}: use auto, prefix or autoboot")
    if config.health_systemd not in ("running", "degraded-ok", "off"):
        raise errors.InvalidArgument(
            f"configuration option health_systemd = {config.health_systemd!r}: use running, degraded-ok or off"
        )
    if config.upload_idle_timeout < 0:
        raise errors.InvalidArgument(
            f"configuration option upload_idle_timeout = {config.upload_idle_timeout:g}: "
            "use 0 (no limit) or a number of seconds"
        )
    if config.data_mount and not config.data_mount.startswith("/"):
        raise errors.InvalidArgument(f"configuration option data_mount = {config.data_mount!r}: use an absolute "
                                     "path, or nothing to add no data mount")
    for pattern in config.preserve:
        if not pattern.startswith("/") or ".." in pattern.split("/"):
            raise errors.InvalidArgument(f"configuration option preserve: {pattern!r} is not an absolute path "
                                         "without '..'")
    for name in ("health_timeout", "trial_deadline", "install_hook_timeout"):
        if getattr(config, name) < 0:
            raise errors.InvalidArgument(f"configuration option {name} = {getattr(config, name):g}: must be >= 0")
    if not 0 <= config.trial_watchdog_timeout <= 3600:
        raise errors.InvalidArgument(
            f"configuration option trial_watchdog_timeout = {config.trial_watchdog_timeout}: use 0 (off) or "
            "1 to 3600 seconds"
        )
    for name in ("image_url", "channel_url", "boot_artifact_url"):
        value = getattr(config, name)
        if value and not value.startswith(("http://", "https://")):
            raise errors.InvalidArgument(f"configuration option {name} = {value!r}: only http(s) URLs are allowed")


AUTO_UPDATE_LEVELS = ("off", "check", "download-and-install", "install-and-reboot")
_WINDOW_RE = re.compile(r"^([01]?[0-9]|2[0-3]):([0-5][0-9])-([01]?[0-9]|2[0-3]):([0-5][0-9])$")
_UNIT_VALUE_RE = re.compile(r"^[A-Za-z0-9 :*,./~-]+$")


def _validate_auto_update(config: Config) -> None:
    if config.auto_update not in AUTO_UPDATE_LEVELS:
        raise errors.InvalidArgument(
            f"configuration option auto_update = {config.auto_update!r}: use {', '.join(AUTO_UPDATE_LEVELS)}"
        )
    if config.maintenance_window and not _WINDOW_RE.match(config.maintenance_window.replace(" ", "")):
        raise errors.InvalidArgument(
            f"configuration option maintenance_window = {config.maintenance_window!r}: use HH:MM-HH:MM, e.g. "
            "02:00-05:00 (empty: any time)"
        )
    for name in ("auto_update_schedule", "auto_update_randomized_delay"):
        if not _UNIT_VALUE_RE.match(getattr(config, name)):
            raise errors.InvalidArgument(f"configuration option {name} = {getattr(config, name)!r} is not a systemd "
                                         "calendar or time span value")
def _validate_delta(config: Config) -> None:
    if config.delta_store_url and not config.delta_store_url.startswith(("http://", "https://")):
        raise errors.InvalidArgument(
            f"configuration option delta_store_url = {config.delta_store_url!r}: only http(s) URLs are allowed"
        )
    if not 1 <= config.delta_connections <= 16:
        raise errors.InvalidArgument(
            f"configuration option delta_connections = {config.delta_connections}: use 1 to 16"
        )


def parse_config(text: str, *, source: str = "<config>", overrides: dict[str, str] | None = None) -> Config:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=None)
    try:
        parser.read_string(text, source=source)
    except configparser.Error as exc:
        raise errors.InvalidArgument(f"cannot parse {source}: {exc}") from exc
    values = dict(parser.items(SECTION)) if parser.has_section(SECTION) else {}
    values.update(overrides or {})
    fields = {f.name: f for f in dataclasses.fields(Config) if f.name != "extra"}
    kwargs: dict[str, object] = {}
    extra: dict[str, str] = {}
    for key, raw in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            extra[key] = raw
            continue
        kwargs[name] = _convert(name, raw, str(fields[name].type))
    config = Config(**kwargs, extra=extra)  # type: ignore[arg-type]
    _validate(config)
    _validate_auto_update(config)
    _validate_delta(config)
    return config


def load_config(path: str | os.PathLike[str] = DEFAULT_PATH, *, overrides: dict[str, str] | None = None) -> Config:
    """The configuration at ``path``; a missing file means all defaults."""
    return parse_config(read_config_text(path), source=os.fspath(path), overrides=overrides)


def read_config_text(path: str | os.PathLike[str]) -> str:
    """The text of configuration file ``path``; "" when there is none (all defaults)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise errors.InvalidArgument(f"cannot read {path}: {exc.strerror}") from exc
