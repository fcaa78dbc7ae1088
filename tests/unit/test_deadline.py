"""The commit deadline (abflasher/deadline.py), with a fake clock, a fake trial and recorded reboot commands."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from abflasher import errors
from abflasher.deadline import FORCED_REBOOTS, REBOOT_GRACE, enforce_trial_deadline


@dataclass
class FakeTrial:
    undecided: list[bool | None]  # answers to trial_undecided, in order (the last one repeats)
    lock_free: bool = True
    decided_under_lock: bool = False  # the boot-check committed between the look and the lock
    rejected: list[str] = field(default_factory=list)
    hang_on_second_look: bool = False
    looks: int = 0

    def trial_undecided(self) -> bool | None:
        self.looks += 1
        if self.looks > 1 and self.hang_on_second_look:
            threading.Event().wait(3600)
        return self.undecided[min(self.looks, len(self.undecided)) - 1]

    def reject_overdue_trial(self, why: str, *, wait: float) -> str:
        if self.decided_under_lock:
            return "decided"
        if self.lock_free:
            self.rejected.append(why)
        return "rejected" if self.lock_free else "locked"


@dataclass
class FakeTime:
    now: float = 20.0
    slept: list[float] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@dataclass
class Reboots:
    commands: list[tuple[str, ...]] = field(default_factory=list)
    failing: tuple[str, ...] = ()

    def __call__(self, command: Sequence[str], timeout: float) -> object:
        self.commands.append(tuple(command))

        @dataclass
        class Done:
            returncode: int
            stderr: str = "refused"

        return Done(1 if tuple(command) == self.failing else 0)


REBOOT = ("systemctl", "reboot")


def _enforce(trial: FakeTrial, time: FakeTime, reboots: Reboots, deadline: float = 300.0):  # type: ignore[no-untyped-def]
    return enforce_trial_deadline(trial, deadline, REBOOT, reboots, clock=time.clock, sleep=time.sleep)


def test_a_normal_boot_returns_at_once() -> None:
    time, reboots = FakeTime(), Reboots()
    result = _enforce(FakeTrial([False]), time, reboots)
    assert not result.acted
    assert (time.slept, reboots.commands) == ([], [])


def test_a_trial_committed_before_the_deadline_is_left_alone() -> None:
    time, reboots, trial = FakeTime(), Reboots(), FakeTrial([True, False])
    result = _enforce(trial, time, reboots)
    assert not result.acted
    assert time.now >= 300, "it waited for the deadline on the boot clock"
    assert reboots.commands == []
    assert trial.rejected == []


def test_an_overdue_trial_is_rejected_and_the_reboot_escalates_until_it_happens() -> None:
    time, reboots, trial = FakeTime(), Reboots(), FakeTrial([True])
    result = _enforce(trial, time, reboots)
    assert result.acted
    assert trial.rejected == ["not committed within trial_deadline (300 s) of boot"]
    # Nothing rebooted (the fake never does): each step waits its grace, then the next, harder one.
    assert reboots.commands == [REBOOT, *FORCED_REBOOTS]
    assert time.slept[-3:] == [REBOOT_GRACE] * 3


def test_a_failing_reboot_command_goes_to_the_forced_one_at_once() -> None:
    time, trial = FakeTime(), FakeTrial([True])
    reboots = Reboots(failing=REBOOT)
    _enforce(trial, time, reboots)
    assert reboots.commands[:2] == [REBOOT, FORCED_REBOOTS[0]]
    assert time.slept.count(REBOOT_GRACE) == 2


def test_a_locked_state_does_not_stop_the_reboot() -> None:
    time, reboots, trial = FakeTime(), Reboots(), FakeTrial([True], lock_free=False)
    assert _enforce(trial, time, reboots).acted
    assert trial.rejected == []
    assert reboots.commands[0] == REBOOT


def test_a_trial_committed_while_the_deadline_takes_the_lock_is_not_rebooted() -> None:
    time, reboots, trial = FakeTime(), Reboots(), FakeTrial([True], decided_under_lock=True)
    assert not _enforce(trial, time, reboots).acted
    assert reboots.commands == []


@pytest.mark.timeout(120)
def test_a_look_at_the_trial_that_hangs_counts_as_not_committed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("abflasher.deadline.LOOK_TIMEOUT", 0.2)
    time, reboots, trial = FakeTime(), Reboots(), FakeTrial([True], hang_on_second_look=True)
    assert _enforce(trial, time, reboots).acted
    assert reboots.commands[0] == REBOOT


def test_no_deadline_and_no_ab_disk() -> None:
    time, reboots = FakeTime(), Reboots()
    assert not _enforce(FakeTrial([True]), time, reboots, deadline=0).acted
    with pytest.raises(errors.Incompatible):
        _enforce(FakeTrial([None]), time, reboots)
    assert reboots.commands == []
