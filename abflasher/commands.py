"""The external commands the engine runs (mount, umount, systemctl, the reboots), behind one runner type that tests
can replace."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Sequence

from abflasher import errors
from abflasher.config import Config

log = logging.getLogger(__name__)

#: Runs argv with a timeout in seconds; never raises for a non-zero exit.
Runner = Callable[[Sequence[str], float], "subprocess.CompletedProcess[str]"]


def run_command(cmd: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)


def reboot_normally(config: Config, run: Runner) -> None:
    done = run(config.reboot_command, 60)
    if done.returncode != 0:
        raise errors.Internal(f"reboot failed: {done.stderr.strip()}")


def reboot_into_trial(config: Config, run: Runner) -> None:
    """The one-shot trial reboot (``reboot '0 tryboot'``), or the configured fallback when it is not there."""
    for command in (config.tryboot_command, config.tryboot_fallback_command):
        if not command:
            continue
        try:
            done = run(command, 60)
        except FileNotFoundError:
            continue
        if done.returncode == 0:
            return
        log.warning("%s failed: %s", " ".join(command), done.stderr.strip())
    raise errors.Internal("could not reboot into the trial: every configured reboot command failed")
