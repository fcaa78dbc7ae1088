"""The commit deadline: a trial not committed within ``trial_deadline`` seconds of boot is rejected and the device
reboots into the committed slot, whatever is stuck.

The boot-check commits or rejects a trial once the boot has finished, but it cannot act on a boot that never
finishes (a unit that never starts, emergency mode), nor when it hangs itself. So a separate process,
``ab-flasher trial-deadline`` (ab-flasher-trial-deadline.service, started early and kept across emergency mode),
watches the clock: on a trial boot it sleeps until the deadline and, if the trial is still not committed, records
it as bad when it can (the state lock may be held by the stuck boot-check: then the old slot records the fallback
on its next boot) and reboots. A plain reboot is always safe: the one-shot tryboot flag is gone, so the firmware
boots the committed slot. If the reboot itself does not happen (a stop job that never ends), it is forced, then
forced harder (``systemctl reboot --force``, then ``--force --force``).
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from abflasher import errors

log = logging.getLogger(__name__)

#: How long one step of the reboot escalation may take before the next, harder one.
REBOOT_GRACE = 120.0
#: Sleeping in bounded steps keeps the wait on the boot clock (CLOCK_BOOTTIME counts a suspend; sleep does not).
SLEEP_STEP = 30.0
#: Looking at the trial again at the deadline: if that hangs too (a dead disk), the device reboots anyway.
LOOK_TIMEOUT = 60.0

FORCED_REBOOTS: tuple[tuple[str, ...], ...] = (("systemctl", "reboot", "--force"),
                                              ("systemctl", "reboot", "--force", "--force"))


class TrialView(Protocol):
    """What the deadline needs of the updater (``Updater`` provides it)."""

    def trial_undecided(self) -> bool | None:
        """True while the booted slot is on trial and neither committed nor rejected-and-left-running; None when
        this is not an A/B device."""

    def reject_overdue_trial(self, why: str, *, wait: float) -> str:
        """Record the booted trial slot as bad: "rejected"; "locked" when the state stayed locked for ``wait``;
        "decided" when it was committed (or rejected) meanwhile, under the same lock."""


@dataclass(frozen=True)
class DeadlineResult:
    acted: bool  # rebooted (or tried to)
    message: str


def _run(command: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, check=False)


def seconds_since_boot() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _within(seconds: float, what: Callable[[], bool | None]) -> tuple[bool, bool | None]:
    """(finished, result) of ``what`` run on a daemon thread for at most ``seconds``."""
    box: list[bool | None] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            box.append(what())
        except BaseException as exc:  # reported to the caller, who decides
            failure.append(exc)

    thread = threading.Thread(target=run, name="trial-look", daemon=True)
    thread.start()
    thread.join(seconds)
    if failure:
        raise failure[0]
    return (bool(box) or not thread.is_alive()), (box[0] if box else None)


def enforce_trial_deadline(
    view: TrialView,
    deadline: float,
    reboot_command: Sequence[str],
    run: Callable[[Sequence[str], float], object] | None = None,
    *,
    clock: Callable[[], float] = seconds_since_boot,
    sleep: Callable[[float], None] = time.sleep,
    forced_reboots: Sequence[Sequence[str]] = FORCED_REBOOTS,
) -> DeadlineResult:
    """Wait for ``deadline`` (seconds since boot) on a trial boot; reboot if the trial is still undecided then."""
    if deadline <= 0:
        return DeadlineResult(False, "no trial deadline (trial_deadline = 0)")
    undecided = view.trial_undecided()
    if undecided is None:
        raise errors.Incompatible("this device has no A/B slots: no trial deadline to watch")
    if not undecided:
        return DeadlineResult(False, "not a trial boot (or already committed): no deadline")
    log.info("trial boot: it must be committed within %g s of boot (now %.0f s)", deadline, clock())
    while (remaining := deadline - clock()) > 0:
        sleep(min(remaining, SLEEP_STEP))
    try:
        finished, still = _within(LOOK_TIMEOUT, view.trial_undecided)
    except errors.AbFlasherError as exc:
        finished, still = True, True
        log.error("cannot tell whether the trial was committed (%s): treating it as not committed", exc)
    if finished and not still:
        return DeadlineResult(False, "the trial was decided before its deadline")
    why = f"not committed within trial_deadline ({deadline:g} s) of boot"
    if not finished:
        log.error("looking at the trial hung for %g s: treating it as not committed", LOOK_TIMEOUT)
    else:
        try:
            outcome = view.reject_overdue_trial(why, wait=5.0)
        except errors.AbFlasherError as exc:
            outcome = "failed"
            log.error("could not record the trial as bad (%s): the old slot records the fallback", exc)
        if outcome == "decided":
            return DeadlineResult(False, "the trial was decided at its deadline")
        if outcome == "locked":
            log.error("the state is locked (the boot-check is stuck?): the old slot records the fallback")
    log.error("the trial slot was %s: rebooting into the committed slot", why)
    for command in (reboot_command, *forced_reboots):
        try:
            done = (run or _run)(command, 60)
        except Exception as exc:
            log.error("%s failed: %s", " ".join(command), exc)
            continue
        if getattr(done, "returncode", 0) != 0:
            log.error("%s failed: %s", " ".join(command), str(getattr(done, "stderr", "")).strip())
            continue
        sleep(REBOOT_GRACE)
        log.error("still running %g s after %s: forcing", REBOOT_GRACE, " ".join(command))
    return DeadlineResult(True, f"trial {why}; reboot requested")
