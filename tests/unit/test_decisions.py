"""Every decision of the update state machine (abflasher/decisions.py), without a disk or root."""

from __future__ import annotations

import pytest

from abflasher import decisions, errors
from abflasher.decisions import RECOVERY, SYSTEM, Rollback, SlotView, Snapshot, TrialBoot
from abflasher.state import ArmedTrial, InstalledImage, SlotRecord, SlotState, State

BOOT_ID = "this-boot"
AB = (SlotView("a", SYSTEM), SlotView("b", SYSTEM))
WITH_RECOVERY = (SlotView("recovery", RECOVERY), *AB)
MAIN_RECOVERY = (SlotView("main", SYSTEM), SlotView("recovery", RECOVERY))


def snap(
    booted: str = "a",
    primary: str = "a",
    *,
    flag: bool | None = None,
    slots: tuple[SlotView, ...] = AB,
) -> Snapshot:
    return Snapshot(slots=slots, booted=booted, primary=primary, tryboot_flag=flag, boot_id=BOOT_ID)


def state(
    *,
    trial: str | None = None,
    armed_in: str = "earlier-boot",
    rollback_boot_id: str | None = None,
    **recorded: SlotState,
) -> State:
    return State(
        slots={name: SlotRecord(value) for name, value in recorded.items()},
        trial=ArmedTrial(trial, armed_in) if trial else None,
        rollback_boot_id=rollback_boot_id,
    )


# --------------------------------------------------------------------------------------------- trial_active


@pytest.mark.parametrize(
    ("snapshot", "current", "active"),
    [
        (snap("a", "a", flag=True), state(), False),  # the primary runs: never a trial
        (snap("b", "a", flag=None), state(rollback_boot_id=BOOT_ID), False),  # just rolled back to it
        (snap("b", "a", flag=False), state(), False),  # the firmware says this was no tryboot
        (snap("b", "a", flag=True), state(), True),
        (snap("b", "a", flag=None), state(), True),  # no word from the firmware: a non-primary slot is a trial
        (snap("b", "a", flag=None), state(rollback_boot_id="an-older-boot"), True),
        (snap("recovery", "a", flag=True, slots=WITH_RECOVERY), state(), False),  # recovery is never on trial
    ],
)
def test_trial_active(snapshot: Snapshot, current: State, active: bool) -> None:
    assert decisions.trial_active(snapshot, current) is active


# --------------------------------------------------------------------------------------------- slot_state


@pytest.mark.parametrize(
    ("name", "current", "version", "on_trial", "expected"),
    [
        ("b", state(b=SlotState.BAD), "1.1", True, SlotState.BAD),  # rejected but still running
        ("b", state(b=SlotState.GOOD), "1.1", True, SlotState.TRIAL),
        ("b", state(), "", True, SlotState.TRIAL),
        ("a", state(a=SlotState.BAD), "1.0", False, SlotState.GOOD),  # booted and committed: good, whatever recorded
        ("b", state(b=SlotState.INCOMPLETE), "", False, SlotState.INCOMPLETE),
        ("b", state(b=SlotState.TRIAL), "1.1", False, SlotState.TRIAL),
        ("b", state(b=SlotState.GOOD), "1.1", False, SlotState.GOOD),
        ("b", state(b=SlotState.BAD), "1.1", False, SlotState.BAD),
        ("b", state(), "1.1", False, SlotState.UNKNOWN),
        ("b", state(b=SlotState.UNKNOWN), "1.1", False, SlotState.UNKNOWN),
    ],
)
def test_slot_state(name: str, current: State, version: str, on_trial: bool, expected: SlotState) -> None:
    booted = "b" if on_trial else "a"
    assert decisions.slot_state(snap(booted, "a"), current, name, version, on_trial=on_trial) is expected


def test_a_primary_not_running_is_good_when_it_holds_a_version() -> None:
    rolled_back = snap("b", "a")
    assert decisions.slot_state(rolled_back, state(), "a", "1.0", on_trial=False) is SlotState.GOOD
    assert decisions.slot_state(rolled_back, state(), "a", "", on_trial=False) is SlotState.UNKNOWN


def test_a_recovery_slot_reports_its_recorded_state() -> None:
    device = snap("a", "a", slots=WITH_RECOVERY)
    assert decisions.slot_state(device, state(recovery=SlotState.GOOD), "recovery", "r1", on_trial=False) == "good"
    # Static, written once at provisioning: good as long as it holds a version.
    assert decisions.slot_state(device, state(), "recovery", "r1", on_trial=False) is SlotState.GOOD
    assert decisions.slot_state(device, state(), "recovery", "", on_trial=False) is SlotState.UNKNOWN


@pytest.mark.parametrize(
    ("current", "reboot_on_failed_health", "undecided"),
    [
        (state(b=SlotState.TRIAL), False, True),
        (state(b=SlotState.BAD), True, True),  # rejected, but the reboot back did not happen: still overdue
        (state(b=SlotState.BAD), False, False),  # rejected and left running on purpose
    ],
)
def test_trial_undecided(current: State, reboot_on_failed_health: bool, undecided: bool) -> None:
    on_trial = snap("b", "a", flag=True)
    assert decisions.trial_undecided(on_trial, current, reboot_on_failed_health=reboot_on_failed_health) is undecided


def test_no_trial_is_never_undecided() -> None:
    assert decisions.trial_undecided(snap(), state(), reboot_on_failed_health=True) is False


# --------------------------------------------------------------------------------------------- updating


def test_version_order() -> None:
    decisions.check_version_order("1.0", "", False)  # the booted version is unknown: anything goes
    decisions.check_version_order("1.1", "1.0", False)
    decisions.check_version_order("0.9", "1.0", True)
    with pytest.raises(errors.UpToDate):
        decisions.check_version_order("1.0", "1.0", True)
    with pytest.raises(errors.Downgrade, match="allow the downgrade"):
        decisions.check_version_order("0.9", "1.0", False)


@pytest.mark.parametrize(
    ("snapshot", "target"),
    [
        (snap("a", "a"), "b"),
        (snap("b", "b"), "a"),
        (snap("a", "a", slots=WITH_RECOVERY), "b"),  # never the recovery slot
        (snap("recovery", "a", slots=WITH_RECOVERY), "b"),  # from recovery, the slot that is not committed
    ],
)
def test_update_target(snapshot: Snapshot, target: str) -> None:
    assert decisions.update_target(snapshot, state()) == target


def test_no_update_target_during_a_trial_or_after_a_rollback() -> None:
    with pytest.raises(errors.Busy, match="running on trial"):
        decisions.update_target(snap("b", "a", flag=True), state())
    with pytest.raises(errors.Busy, match="reboot first"):
        decisions.update_target(snap("b", "a", slots=WITH_RECOVERY), state(rollback_boot_id=BOOT_ID))


def test_check_target() -> None:
    decisions.check_target(snap("a", "a"), "b")
    for device, target in ((snap("a", "a"), "a"), (snap("b", "a", flag=False), "a"),
                           (snap("main", "main", slots=MAIN_RECOVERY), "main")):
        with pytest.raises(errors.Busy, match="refusing to write it"):
            decisions.check_target(device, target)
    for device in (snap("a", "a", slots=WITH_RECOVERY), snap("recovery", "recovery", slots=MAIN_RECOVERY),
                   snap("main", "main", slots=MAIN_RECOVERY)):
        with pytest.raises(errors.InvalidArgument, match="recovery slot: ab-flasher never writes it"):
            decisions.check_target(device, "recovery")
    # Main + recovery from recovery: main, the primary, may be written (recovery becomes the primary first).
    decisions.check_target(snap("recovery", "main", slots=MAIN_RECOVERY), "main")


# --------------------------------------------------------------------------------------------- main + recovery


def test_main_and_recovery_update_target() -> None:
    from_recovery = snap("recovery", "main", slots=MAIN_RECOVERY)
    assert decisions.update_target(from_recovery, state()) == "main"
    assert decisions.recovery_first(from_recovery, "main") == "recovery"
    after_failed_main = snap("recovery", "recovery", slots=MAIN_RECOVERY)
    assert decisions.update_target(after_failed_main, state()) == "main"
    assert decisions.recovery_first(after_failed_main, "main") is None, "recovery is the primary already"
    assert decisions.recovery_first(snap("recovery", "a", slots=WITH_RECOVERY), "b") is None
    with pytest.raises(errors.Busy, match=r"cannot overwrite itself.*reboot recovery"):
        decisions.update_target(snap("main", "main", slots=MAIN_RECOVERY), state())
    with pytest.raises(errors.Busy, match="cannot overwrite itself"):
        decisions.update_target(snap("main", "recovery", slots=MAIN_RECOVERY, flag=False), state())


def test_recovery_promoted() -> None:
    after = decisions.recovery_promoted(state(main=SlotState.GOOD), snap("recovery", "main", slots=MAIN_RECOVERY))
    assert after.primary == "recovery"
    assert after.slots["recovery"].state is SlotState.GOOD


def test_recovery_boot_plan() -> None:
    assert decisions.plan_recovery_boot(snap("a", "a", slots=WITH_RECOVERY)) == \
        decisions.RecoveryBoot("recovery", tryboot=True)
    assert decisions.plan_recovery_boot(snap("recovery", "recovery", slots=MAIN_RECOVERY)) == \
        decisions.RecoveryBoot("recovery", tryboot=False)
    with pytest.raises(errors.Incompatible, match="no recovery slot"):
        decisions.plan_recovery_boot(snap("a", "a"))


def test_a_recovery_boot_replaces_an_armed_trial() -> None:
    device = snap("a", "a", slots=WITH_RECOVERY)
    plan = decisions.plan_recovery_boot(device)
    after = decisions.recovery_armed(state(trial="b", b=SlotState.TRIAL), device, plan)
    assert after.trial is None
    assert after.slots["b"].state is SlotState.BAD
    # A trial running now is not replaced: the recovery boot ends it as a fallback, as any other reset would.
    running = snap("b", "a", slots=WITH_RECOVERY, flag=True)
    kept = decisions.recovery_armed(state(trial="b", b=SlotState.TRIAL), running, plan)
    assert kept.trial is not None


def test_recovery_failed_main_falls_back_to_recovery() -> None:
    # main armed from recovery (recovery is the primary), then a reset without the flag: recovery runs again.
    settled = decisions.normal_boot(snap("recovery", "recovery", slots=MAIN_RECOVERY), state(trial="main"))
    assert settled.fell_back == "main"
    assert settled.state.slots["main"].state is SlotState.BAD
    assert settled.state.primary == "recovery"


def test_recorded_merges_the_install_and_ends_a_trial_of_that_slot_only() -> None:
    before = state(trial="b", b=SlotState.TRIAL)
    before.slots["b"].installed = InstalledImage(version="1.1", source="https://x/os.img")
    after = decisions.recorded(before, "b", SlotState.INCOMPLETE, result="writing", time=5)
    assert after.slots["b"] == SlotRecord(
        SlotState.INCOMPLETE, InstalledImage(version="1.1", source="https://x/os.img", result="writing", time=5)
    )
    assert after.trial is None
    assert before.slots["b"].state is SlotState.TRIAL, "the input stays as it was"
    assert before.trial is not None
    assert decisions.recorded(before, "b", SlotState.TRIAL).trial == before.trial
    assert decisions.recorded(before, "a", SlotState.BAD).trial == before.trial


def test_armed() -> None:
    installed = InstalledImage(version="1.1", sha256="ab", result="installed")
    after = decisions.armed(state(a=SlotState.UNKNOWN), snap("a", "a"), "b", installed)
    assert after.trial == ArmedTrial("b", BOOT_ID)
    assert after.primary == "a"
    assert after.slots["a"].state is SlotState.GOOD, "the running slot is what a rollback returns to"
    assert after.slots["b"] == SlotRecord(SlotState.TRIAL, installed)
    installed.version = "changed"
    assert after.slots["b"].installed.version == "1.1"


@pytest.mark.parametrize(
    ("current", "firmware_trial"),
    [(state(), "b"), (state(trial="a"), "a"), (state(trial="b"), None), (state(trial="b"), "a")],
)
def test_no_trial_reboot_without_an_armed_trial(current: State, firmware_trial: str | None) -> None:
    with pytest.raises(errors.NoTrial):
        decisions.may_reboot_into_trial(snap("a", "a"), current, firmware_trial)


def test_trial_reboot() -> None:
    decisions.may_reboot_into_trial(snap("a", "a"), state(trial="b"), "b")


# --------------------------------------------------------------------------------------------- deciding


def test_require_trial() -> None:
    decisions.require_trial(snap("b", "a", flag=True), state())
    with pytest.raises(errors.NoTrial, match="not running on trial"):
        decisions.require_trial(snap("a", "a"), state())


def test_commit_and_reject() -> None:
    on_trial = snap("b", "a", flag=True)
    before = state(trial="b", b=SlotState.TRIAL)
    good = decisions.committed(before, on_trial)
    assert (good.primary, good.trial, good.slots["b"].state) == ("b", None, SlotState.GOOD)
    assert good.slots["b"].installed.result == "committed"
    bad = decisions.rejected(before, on_trial, "health check failed: x")
    assert (bad.primary, bad.trial, bad.slots["b"].state) == ("a", None, SlotState.BAD)
    assert bad.slots["b"].installed.result == "health check failed: x"
    assert before.trial is not None


def test_rollback_to_a_good_slot_that_does_not_run() -> None:
    device = snap("b", "b")
    current = state(a=SlotState.GOOD)
    assert decisions.rollback_source(device, current) == "a"
    plan = decisions.plan_rollback(device, current, "1.0")
    assert plan == Rollback(slot="a", running=False)
    after = decisions.rolled_back(state(rollback_boot_id=None), device, plan)
    assert (after.primary, after.slots["a"].state, after.rollback_boot_id) == ("a", SlotState.GOOD, BOOT_ID)


def test_rollback_to_the_running_slot_the_state_knows_nothing_of() -> None:
    device = snap("a", "b", flag=False)  # rolled back earlier, or set up by hand
    plan = decisions.plan_rollback(device, state(), "1.0")
    assert plan == Rollback(slot="a", running=True)
    assert decisions.rolled_back(state(rollback_boot_id="old"), device, plan).rollback_boot_id is None


@pytest.mark.parametrize(
    ("device", "current", "version", "message"),
    [
        (snap("a", "b", flag=False), state(), "", "slot a is unknown: there is no good slot"),
        (snap("b", "b"), state(), "1.0", r"slot a is unknown \(1.0\)"),  # not running, nothing recorded
        (snap("b", "b"), state(a=SlotState.BAD), "1.0", r"slot a is bad \(1.0\)"),
        (snap("b", "b"), state(a=SlotState.INCOMPLETE), "", "slot a is incomplete: "),
    ],
)
def test_no_rollback_to_a_slot_not_known_good(device: Snapshot, current: State, version: str, message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=message):
        decisions.plan_rollback(device, current, version)


def test_no_rollback_during_a_trial_or_to_the_recovery_slot() -> None:
    with pytest.raises(errors.Busy, match="mark-bad"):
        decisions.rollback_source(snap("b", "a", flag=True), state())
    with_recovery = snap("b", "b", slots=WITH_RECOVERY)
    assert decisions.rollback_source(with_recovery, state()) == "a"
    alone = snap("a", "a", slots=(SlotView("recovery", RECOVERY), SlotView("a", SYSTEM)))
    with pytest.raises(errors.InvalidArgument, match="no other slot"):
        decisions.rollback_source(alone, state(recovery=SlotState.GOOD))


# --------------------------------------------------------------------------------------------- booting


@pytest.mark.parametrize(
    ("current", "outcome"),
    [(state(trial="b"), TrialBoot.ARMED), (state(trial="c"), TrialBoot.UNARMED), (state(), TrialBoot.UNARMED)],
)
def test_trial_boot(current: State, outcome: TrialBoot) -> None:
    assert decisions.trial_boot(snap("b", "a", flag=True), current) is outcome


def test_a_normal_boot_after_a_trial_armed_in_an_earlier_boot_records_the_fall_back() -> None:
    device = snap("a", "a")
    settled = decisions.normal_boot(device, state(trial="b", b=SlotState.TRIAL))
    assert settled.fell_back == "b"
    assert settled.disarm
    assert settled.state.slots["b"].state is SlotState.BAD
    assert settled.state.slots["b"].installed.result == "trial boot did not commit; fell back"
    assert (settled.state.trial, settled.state.primary, settled.state.slots["a"].state) == (None, "a", "good")
    assert settled.message(device) == "the trial of slot b did not come up healthy; running slot a"


def test_a_normal_boot_keeps_a_trial_armed_in_this_boot() -> None:
    # boot_check runs again in the boot that armed the trial (the service restarted): nothing fell back yet.
    device = snap("a", "a")
    settled = decisions.normal_boot(device, state(trial="b", armed_in=BOOT_ID, b=SlotState.TRIAL))
    assert settled.fell_back is None
    assert not settled.disarm
    assert settled.state.trial == ArmedTrial("b", BOOT_ID)
    assert settled.message(device) == "slot a booted normally"


def test_a_normal_boot_of_a_slot_that_is_not_the_primary() -> None:
    device = snap("b", "a", flag=False)  # rolled back from b: a boots at the next reset
    settled = decisions.normal_boot(device, state(trial="b", b=SlotState.GOOD))
    assert settled.fell_back is None, "a trial of the running slot did not fall back"
    assert not settled.disarm
    assert settled.state.slots["b"].state is SlotState.GOOD
    assert "a" not in settled.state.slots
    nothing = decisions.normal_boot(device, state())
    assert nothing.disarm
    assert nothing.state.primary == "a"
    assert nothing.state.slots == {}
