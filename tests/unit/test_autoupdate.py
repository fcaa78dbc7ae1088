"""The unattended updates' pieces that need no device: the maintenance window, the outcome record, the generator."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from abflasher import errors
from abflasher.autoupdate import Outcome, Window, generate_units, last_outcome, parse_window, record_outcome
from abflasher.config import Config, parse_config

pytestmark = pytest.mark.timeout(30)


def at(hour: int, minute: int) -> datetime.datetime:
    return datetime.datetime(2026, 12, 1, hour, minute)


def test_window() -> None:
    window = parse_window("02:00-05:00")
    assert window == Window(120, 300)
    assert window.seconds_until_open(at(3, 0)) == 0
    assert window.seconds_until_open(at(1, 0)) == 3600
    assert window.seconds_until_open(at(5, 0)) == 21 * 3600
    night = parse_window("23:00-01:30")
    assert night is not None
    assert night.seconds_until_open(at(0, 15)) == 0
    assert night.seconds_until_open(at(23, 59)) == 0
    assert night.seconds_until_open(at(22, 0)) == 3600
    assert parse_window("") is None


def test_configuration_of_unattended_updates() -> None:
    config = parse_config("[ab-flasher]\nauto_update = install-and-reboot\nmaintenance_window = 02:00-05:00\n")
    assert (config.auto_update, config.maintenance_window) == ("install-and-reboot", "02:00-05:00")
    assert Config().auto_update == "off"
    with pytest.raises(errors.InvalidArgument, match="auto_update"):
        parse_config("[ab-flasher]\nauto_update = always\n")
    with pytest.raises(errors.InvalidArgument, match="maintenance_window"):
        parse_config("[ab-flasher]\nmaintenance_window = 2am\n")
    with pytest.raises(errors.InvalidArgument, match="auto_update_schedule"):
        parse_config("[ab-flasher]\nauto_update_schedule = daily\n\tExecStart=/bin/evil\n")


def test_the_outcome_is_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = Config(state_dir=str(tmp_path))
    assert last_outcome(config) is None
    record_outcome(config, Outcome("installed", "version 1.1.0 is installed", "1.1.0", 1_800_000_000))
    assert last_outcome(config) == Outcome("installed", "version 1.1.0 is installed", "1.1.0", 1_800_000_000)
    assert "version 1.1.0 is installed" in capsys.readouterr().out, "the journal gets it too"


@pytest.mark.parametrize("level", ["off", "check"])
def test_the_generator(tmp_path: Path, level: str) -> None:
    config = Config(auto_update=level, auto_update_schedule="Mon *-*-* 03:00", auto_update_randomized_delay="30min")
    generate_units(config, tmp_path)
    dropin = (tmp_path / "ab-flasher-update.timer.d" / "50-ab-flasher-conf.conf").read_text()
    assert "OnCalendar=\nOnCalendar=Mon *-*-* 03:00\n" in dropin
    assert "RandomizedDelaySec=30min" in dropin
    link = tmp_path / "timers.target.wants" / "ab-flasher-update.timer"
    assert link.is_symlink() == (level != "off")
    generate_units(config, tmp_path)  # systemd reruns generators on every daemon-reload


def test_the_timer_units() -> None:
    repo = Path(__file__).resolve().parents[2]
    timer = (repo / "systemd" / "ab-flasher-update.timer").read_text()
    assert "Persistent=true" in timer
    assert "[Install]" not in timer, "the generator enables it, from the configuration"
    service = (repo / "systemd" / "ab-flasher-update.service").read_text()
    assert "ExecStart=/usr/bin/ab-flasher auto-update" in service
