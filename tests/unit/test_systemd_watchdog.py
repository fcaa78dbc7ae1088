"""runtime_watchdog masks and unmasks the package's systemd drop-in; an administrator's own file is never touched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from abflasher import errors
from abflasher.config import parse_config
from abflasher.systemd_watchdog import ADMIN_DIR, DROP_IN_NAME, sync_mask


def test_no_masks_the_drop_in_and_yes_unmasks_it(tmp_path: Path) -> None:
    mask = tmp_path / ADMIN_DIR / DROP_IN_NAME
    assert sync_mask(True, tmp_path) is None
    assert not mask.is_symlink()
    assert "masked" in (sync_mask(False, tmp_path) or "")
    assert os.readlink(mask) == "/dev/null"
    assert sync_mask(False, tmp_path) is None, "masking twice changes nothing"
    assert "unmasked" in (sync_mask(True, tmp_path) or "")
    assert not mask.exists()
    assert not mask.is_symlink()


def test_an_administrators_file_of_that_name_is_left_alone(tmp_path: Path) -> None:
    mask = tmp_path / ADMIN_DIR / DROP_IN_NAME
    mask.parent.mkdir(parents=True)
    mask.write_text("[Manager]\nRuntimeWatchdogSec=10s\n")
    assert sync_mask(True, tmp_path) is None
    assert sync_mask(False, tmp_path) is None
    assert mask.read_text() == "[Manager]\nRuntimeWatchdogSec=10s\n"


@pytest.mark.parametrize(("text", "message"), [
    ("trial_deadline = -1", "trial_deadline"),
    ("trial_deadline = soon", "trial_deadline"),
    ("trial_watchdog_timeout = 4000", "trial_watchdog_timeout"),
    ("runtime_watchdog = maybe", "runtime_watchdog"),
])
def test_bad_watchdog_and_deadline_options_are_refused(text: str, message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=message):
        parse_config(f"[ab-flasher]\n{text}\n")


def test_watchdog_and_deadline_options_parse() -> None:
    config = parse_config("[ab-flasher]\ntrial_deadline = 90\ntrial_watchdog_timeout = 0\nruntime_watchdog = no\n")
    assert (config.trial_deadline, config.trial_watchdog_timeout, config.runtime_watchdog) == (90.0, 0, False)
