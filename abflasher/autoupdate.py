"""Unattended updates: what ``ab-flasher-update.service`` (started by ``ab-flasher-update.timer``) does, and the
systemd generator that turns the configuration into the timer's schedule.

``auto_update`` says how far a run goes:

- ``off``: nothing (the generator does not even enable the timer);
- ``check``: ask the channel, record what it offers;
- ``download-and-install``: install the channel's newest version into the other slot and arm its trial; it runs
  after the next reboot, whenever that happens;
- ``install-and-reboot``: the same, then wait for the maintenance window and reboot into the trial. The trial boot
  is committed by ab-flasher-boot-check.service after its health checks, or falls back.

Each run's outcome goes to the journal (standard output) and to ``state_dir/auto-update.json``, which
``abflasherctl status`` shows (the service's AutoUpdate property).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from abflasher import errors
from abflasher.config import DEFAULT_PATH, Config, load_config
from abflasher.state import write_atomically

if TYPE_CHECKING:
    from abflasher.updater import Updater

log = logging.getLogger(__name__)

OUTCOME_FILE = "auto-update.json"
TIMER_UNIT = "ab-flasher-update.timer"
UNIT_DIR = "/lib/systemd/system"
_WINDOW_RE = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")
DAY_MINUTES = 24 * 60


@dataclass(frozen=True)
class Window:
    """A daily maintenance window, local time, in minutes after midnight; ``end`` < ``start`` wraps midnight."""

    start: int
    end: int

    def __str__(self) -> str:
        return f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"

    def seconds_until_open(self, now: datetime.datetime) -> float:
        """0 when ``now`` is inside the window, else how long until it opens."""
        minute = now.hour * 60 + now.minute + now.second / 60 + now.microsecond / 60e6
        if self.start <= self.end:
            inside = self.start <= minute < self.end
        else:
            inside = minute >= self.start or minute < self.end
        if inside:
            return 0.0
        return ((self.start - minute) % DAY_MINUTES) * 60


def parse_window(text: str) -> Window | None:
    """``HH:MM-HH:MM`` (checked by the configuration already); None for an empty text (any time)."""
    match = _WINDOW_RE.match(text.replace(" ", ""))
    if not text.strip() or match is None:
        return None
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    return Window(h1 * 60 + m1, h2 * 60 + m2)


@dataclass(frozen=True)
class Outcome:
    """What one run did: ``result`` is off, trial, up-to-date, available, installed, waiting, rebooting or failed."""

    result: str
    message: str
    version: str = ""
    time: int = 0

    def summary(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(self.time)) if self.time else "?"
        return f"{when}: {self.message}"


def _outcome_path(config: Config) -> Path:
    return Path(config.state_dir) / OUTCOME_FILE


def record_outcome(config: Config, outcome: Outcome) -> None:
    print(f"ab-flasher auto-update: {outcome.message}", flush=True)
    data = {"result": outcome.result, "message": outcome.message, "version": outcome.version, "time": outcome.time}
    write_atomically(_outcome_path(config), json.dumps(data) + "\n")


def last_outcome(config: Config) -> Outcome | None:
    """The last run's outcome; None when the timer never ran (or its record is unreadable)."""
    try:
        data = json.loads(_outcome_path(config).read_text(encoding="utf-8"))
        return Outcome(str(data["result"]), str(data["message"]), str(data.get("version", "")), int(data["time"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def last_outcome_summary(config: Config) -> str:
    outcome = last_outcome(config)
    return outcome.summary() if outcome is not None else ""


def _armed_version(updater: Updater) -> str:
    """The version whose trial is armed (installed, waiting for a reboot), if any."""
    status = updater.status()
    return next((s.version for s in status.slots if not s.booted and s.state == "trial"), "")


def run_auto_update(
    updater: Updater,
    *,
    now: Callable[[], datetime.datetime] = datetime.datetime.now,
    sleep: Callable[[float], None] = time.sleep,
    cancel: threading.Event | None = None,
) -> Outcome:
    """One run of the timer's service, as far as ``auto_update`` says; the outcome is recorded too."""
    config = updater.config
    level = config.auto_update

    def done(result: str, message: str, version: str = "") -> Outcome:
        outcome = Outcome(result, message, version, int(now().timestamp()))
        record_outcome(config, outcome)
        return outcome

    if level == "off":
        return Outcome("off", "unattended updates are off (auto_update = off)")
    try:
        status = updater.status()
        if status.trial_active:
            return done("trial", f"slot {status.booted_slot} is running on trial; nothing to do until it is decided")
        offer = updater.check()
        if not offer.update_available:
            return done("up-to-date", f"up to date: running {offer.current}, the channel offers {offer.available}",
                        offer.available)
        version = offer.available
        if level == "check":
            return done("available", f"version {version} is available (running {offer.current})", version)
        if _armed_version(updater) != version:
            from abflasher.api import UpdateRequest

            prepared = updater.prepare(UpdateRequest(version="" if offer.signer else version))
            outcome = updater.run(prepared, lambda progress: None, cancel or threading.Event())
            log.info("%s", outcome.message)
        if level == "download-and-install":
            return done("installed", f"version {version} is installed and runs after the next reboot", version)
        window = parse_window(config.maintenance_window)
        wait = window.seconds_until_open(now()) if window is not None else 0.0
        if wait > 0:
            done("waiting", f"version {version} is installed; rebooting into it when the maintenance window {window} "
                 f"opens (in {wait / 60:.0f} min)", version)
            sleep(wait)
        message = f"rebooting into version {version} on trial"
        outcome_rebooting = done("rebooting", message, version)
        updater.reboot("trial")
        return outcome_rebooting
    except errors.AbFlasherError as exc:
        done("failed", f"failed: {exc}")
        raise


def auto_update_main(config_path: str = DEFAULT_PATH) -> int:
    from abflasher.updater import Updater

    run_auto_update(Updater(load_config(config_path)))
    return 0


# --- the systemd generator -------------------------------------------------------------------------------------


def generate_units(config: Config, normal_dir: Path, unit_dir: str = UNIT_DIR) -> None:
    """What systemd-generator(7) ab-flasher-generator writes into ``normal_dir``: the timer's schedule from the
    configuration, and the timer enabled (wanted by timers.target) unless auto_update is off."""
    dropin = normal_dir / f"{TIMER_UNIT}.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "50-ab-flasher-conf.conf").write_text(
        "# Written by ab-flasher-generator from /etc/ab-flasher/ab-flasher.conf: edit that file, not this one.\n"
        "[Timer]\n"
        "OnCalendar=\n"
        f"OnCalendar={config.auto_update_schedule}\n"
        f"RandomizedDelaySec={config.auto_update_randomized_delay}\n"
    )
    if config.auto_update != "off":
        wants = normal_dir / "timers.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        link = wants / TIMER_UNIT
        if not link.is_symlink():
            os.symlink(f"{unit_dir}/{TIMER_UNIT}", link)


def generator_main(argv: Sequence[str], config_path: str = DEFAULT_PATH) -> int:
    """systemd runs generators with three directories; a broken configuration must not break the boot: the timer
    then stays off and the reason goes to the kernel log (where generator output ends up)."""
    if not argv:
        print("usage: ab-flasher-generator NORMAL_DIR [EARLY_DIR LATE_DIR]", file=sys.stderr)
        return 2
    try:
        config = load_config(config_path)
    except errors.AbFlasherError as exc:
        print(f"ab-flasher-generator: {exc}; the update timer stays off", file=sys.stderr)
        return 0
    generate_units(config, Path(argv[0]))
    return 0
