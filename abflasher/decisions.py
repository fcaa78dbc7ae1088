"""Every decision of the update state machine, as pure functions of one look at the device and the state.

Nothing here reads a disk or writes a file: ``Snapshot`` is what the disk, the firmware files and the running kernel
said (abflasher/device.py reads it once per operation), ``State`` is the state file (abflasher/state.py). The
functions answer the questions (is a trial running, what state is a slot in, which slot does an update write, may
we roll back and to what, what does this boot settle) and return new states; ``Updater`` carries the answers out.

Slots have a role: ``system`` slots (A and B) take turns; a ``recovery`` slot is never the target of an update,
never becomes the primary through a rollback, and booting it is never a trial; its state is reported like any other.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass

from abflasher import errors
from abflasher.state import ArmedTrial, InstalledImage, SlotState, State
from abflasher.version import compare_versions

SYSTEM = "system"
RECOVERY = "recovery"


@dataclass(frozen=True)
class SlotView:
    name: str
    role: str  # SYSTEM | RECOVERY


@dataclass(frozen=True)
class Snapshot:
    """One look at the device: its slots, which one runs, which one is committed, what the firmware said."""

    slots: tuple[SlotView, ...]
    booted: str
    primary: str  # what a normal reset boots (the bootloader's committed configuration)
    tryboot_flag: bool | None  # the device tree's chosen/bootloader/tryboot; None when the firmware does not say
    boot_id: str  # the kernel's boot_id of this boot

    def role(self, name: str) -> str:
        return next((slot.role for slot in self.slots if slot.name == name), SYSTEM)


def _copy(state: State) -> State:
    return copy.deepcopy(state)


# ------------------------------------------------------------------------------------------------------ looking


def trial_active(snap: Snapshot, state: State) -> bool:
    """Is the running slot on trial? The firmware says so when the device tree has the tryboot flag; otherwise a
    booted slot other than the primary is a trial, unless we just rolled back to it. A recovery slot never is."""
    if snap.booted == snap.primary or state.rollback_boot_id == snap.boot_id:
        return False
    if snap.role(snap.booted) == RECOVERY:
        return False
    return snap.tryboot_flag is not False


def slot_state(snap: Snapshot, state: State, name: str, version: str, *, on_trial: bool) -> SlotState:
    """What the API reports for slot ``name`` holding ``version`` ("" when unknown); ``on_trial``: it is the booted
    slot and a trial is active."""
    recorded = state.recorded(name)
    if snap.role(name) == RECOVERY and version and recorded is SlotState.UNKNOWN:
        return SlotState.GOOD  # static: written once, at provisioning, and never again
    if on_trial:
        return SlotState.BAD if recorded is SlotState.BAD else SlotState.TRIAL
    if name == snap.booted and name == snap.primary:
        return SlotState.GOOD
    if recorded is not SlotState.UNKNOWN:
        return recorded
    if name == snap.primary and version:
        return SlotState.GOOD
    return SlotState.UNKNOWN


def trial_undecided(snap: Snapshot, state: State, *, reboot_on_failed_health: bool) -> bool:
    """Does the commit deadline still wait for this boot: a trial neither committed nor rejected-and-left-running?"""
    if not trial_active(snap, state):
        return False
    rejected = state.recorded(snap.booted) is SlotState.BAD
    return not rejected or reboot_on_failed_health


# ------------------------------------------------------------------------------------------------------ updating


def check_version_order(version: str, booted_version: str, allow_downgrade: bool) -> None:
    """May ``version`` replace the running ``booted_version`` ("" when unknown: anything may)?"""
    if not booted_version:
        return
    order = compare_versions(version, booted_version)
    if order == 0:
        raise errors.UpToDate(f"version {version} is already running")
    if order < 0 and not allow_downgrade:
        raise errors.Downgrade(
            f"version {version} is older than the running {booted_version}: allow the downgrade explicitly "
            "(--allow-downgrade)"
        )


def refuse_during_trial(snap: Snapshot, state: State) -> None:
    if trial_active(snap, state):
        raise errors.Busy(
            f"slot {snap.booted} is running on trial: commit it (mark-good) or reject it (mark-bad) "
            "before installing another update"
        )


def update_target(snap: Snapshot, state: State) -> str:
    """The slot an update writes: a system slot that is neither booted nor the committed primary; in main +
    recovery, from the recovery system, the main slot even though it is the primary (`recovery_first` then says to
    make recovery the primary before writing it). Never a recovery slot, never the running slot."""
    refuse_during_trial(snap, state)
    return system_target(snap)


def system_target(snap: Snapshot) -> str:
    """`update_target` without the trial check: the slots alone decide (the upload page shows it too)."""
    system = [s.name for s in snap.slots if s.role == SYSTEM]
    free = next((name for name in system if name not in (snap.booted, snap.primary)), None)
    if free is not None:
        return free
    if snap.role(snap.booted) == RECOVERY:
        committed_system = next((name for name in system if name == snap.primary), None)
        if committed_system is not None:
            return committed_system
    if system == [snap.booted]:
        raise errors.Busy(
            f"slot {snap.booted} is this device's only system slot and it is running: it cannot overwrite itself. "
            "Reboot into update mode (abflasherctl reboot recovery) and install the image from there"
        )
    raise errors.Busy(f"slot {snap.primary} is committed but slot {snap.booted} is running: reboot first")


def refuse_recovery_target(snap: Snapshot, target: str) -> None:
    if snap.role(target) == RECOVERY:
        raise errors.InvalidArgument(
            f"slot {target} is the recovery slot: ab-flasher never writes it (it is what the device falls back to); "
            "updates go to a system slot"
        )


def check_target(snap: Snapshot, target: str) -> None:
    """Right before writing: the target (chosen when the request was prepared) must still be free."""
    refuse_recovery_target(snap, target)
    if target == snap.booted or (target == snap.primary and recovery_first(snap, target) is None):
        raise errors.Busy(f"slot {target} is in use (booted or committed); refusing to write it")


def recovery_first(snap: Snapshot, target: str) -> str | None:
    """Main + recovery, running the recovery system: the recovery slot, which must become the committed primary
    before ``target`` (the primary until now) is written, so that a power cut mid-write boots recovery; else None."""
    if target == snap.primary and snap.role(snap.booted) == RECOVERY and snap.role(target) == SYSTEM:
        return snap.booted
    return None


def recovery_promoted(state: State, snap: Snapshot) -> State:
    """``state`` once the running recovery slot is the committed primary (before main is written)."""
    new = _copy(state)
    new.primary = snap.booted
    new.slot(snap.booted).state = SlotState.GOOD
    return new


# ------------------------------------------------------------------------------------------------------ update mode


@dataclass(frozen=True)
class RecoveryBoot:
    slot: str
    tryboot: bool  # boot it once through tryboot; False: it is the committed primary, a plain reboot starts it


def plan_recovery_boot(snap: Snapshot) -> RecoveryBoot:
    """``Reboot('recovery')``: which slot, and how."""
    slot = next((s.name for s in snap.slots if s.role == RECOVERY), None)
    if slot is None:
        raise errors.Incompatible(
            "this device has no recovery slot (its disk has an A/B layout without one: see docs/layouts.md)"
        )
    return RecoveryBoot(slot=slot, tryboot=snap.primary != slot)


def recovery_armed(state: State, snap: Snapshot, plan: RecoveryBoot) -> State:
    """``state`` once the one-shot boot of recovery replaces a trial armed for a slot that is not running: that trial
    will not happen, so it must not be taken for a fallback later; its slot is not trusted until installed again."""
    new = _copy(state)
    trial = new.trial
    if plan.tryboot and trial is not None and trial.slot != snap.booted:
        record = new.slot(trial.slot)
        record.state = SlotState.BAD
        record.installed.result = "its trial was replaced by a boot into recovery; install it again"
        new.trial = None
    return new


def recorded(state: State, slot: str, slot_state: SlotState, **installed: str | int) -> State:
    """``state`` with a step of an install into ``slot`` recorded; a trial of ``slot`` ends unless it is one."""
    new = _copy(state)
    record = new.slot(slot)
    record.state = slot_state
    merged = record.installed.to_json() | installed
    record.installed = InstalledImage.from_json(merged)
    if new.trial is not None and new.trial.slot == slot and slot_state is not SlotState.TRIAL:
        new.trial = None
    return new


def armed(state: State, snap: Snapshot, target: str, installed: InstalledImage) -> State:
    """``state`` once a trial of ``target`` is armed: the primary stays, and the running slot is what a rollback
    returns to."""
    new = _copy(state)
    record = new.slot(target)
    record.state = SlotState.TRIAL
    record.installed = copy.deepcopy(installed)
    new.trial = ArmedTrial(slot=target, armed_boot_id=snap.boot_id)
    new.primary = snap.primary
    new.slot(snap.booted).state = SlotState.GOOD
    return new


def may_reboot_into_trial(snap: Snapshot, state: State, firmware_trial: str | None) -> None:
    """A trial reboot needs a trial armed in the state and in the firmware files, of a slot that is not running."""
    armed_slot = state.trial.slot if state.trial is not None else None
    if armed_slot is None or armed_slot == snap.booted or firmware_trial != armed_slot:
        raise errors.NoTrial("no slot is waiting for a trial boot: install an update first")


# ------------------------------------------------------------------------------------------------------ deciding


def require_trial(snap: Snapshot, state: State) -> None:
    if not trial_active(snap, state):
        raise errors.NoTrial(
            f"slot {snap.booted} is not running on trial (it is the committed slot, or was rolled back to)"
        )


def committed(state: State, snap: Snapshot) -> State:
    """``state`` once the booted slot is committed: it is the primary and good; no trial waits."""
    new = _copy(state)
    record = new.slot(snap.booted)
    record.state = SlotState.GOOD
    record.installed.result = "committed"
    new.trial = None
    new.primary = snap.booted
    return new


def rejected(state: State, snap: Snapshot, why: str) -> State:
    """``state`` once the booted slot is rejected: bad, the primary stays what it was."""
    new = _copy(state)
    record = new.slot(snap.booted)
    record.state = SlotState.BAD
    record.installed.result = why
    new.trial = None
    new.primary = snap.primary
    return new


@dataclass(frozen=True)
class Rollback:
    slot: str  # becomes the primary
    running: bool  # it is the booted slot (else the rollback takes effect at the next reset)


def rollback_source(snap: Snapshot, state: State) -> str:
    """The slot a rollback would return to: the system slot that is not the primary (never a recovery slot)."""
    if trial_active(snap, state):
        raise errors.Busy("a trial is running: use mark-bad to reject it instead")
    source = next((s.name for s in snap.slots if s.role == SYSTEM and s.name != snap.primary), None)
    if source is None:
        raise errors.InvalidArgument(f"there is no other slot than {snap.primary} to roll back to")
    return source


def plan_rollback(snap: Snapshot, state: State, source_version: str) -> Rollback:
    """May we roll back to ``rollback_source`` (holding ``source_version``)? Only to a slot known to be good, or the
    running one the state says nothing about (a device set up by hand)."""
    source = rollback_source(snap, state)
    known = state.recorded(source)
    running = source == snap.booted
    good = known is SlotState.GOOD or (known is SlotState.UNKNOWN and running and bool(source_version))
    if not good:
        raise errors.InvalidArgument(
            f"slot {source} is {known}{f' ({source_version})' if source_version else ''}: there is no good slot "
            "to roll back to"
        )
    return Rollback(slot=source, running=running)


def rolled_back(state: State, snap: Snapshot, plan: Rollback) -> State:
    new = _copy(state)
    new.primary = plan.slot
    new.slot(plan.slot).state = SlotState.GOOD
    # Rolled back to a slot that is not running: until the next boot, the running slot is not the primary, and
    # must not be taken for a trial.
    new.rollback_boot_id = None if plan.running else snap.boot_id
    return new


# ------------------------------------------------------------------------------------------------------ booting


class TrialBoot(enum.Enum):
    ARMED = "armed"  # the armed slot booted on trial: run the health checks, then commit or reject
    UNARMED = "unarmed"  # a tryboot nobody armed (a stray `reboot '0 tryboot'`): never commit it


def trial_boot(snap: Snapshot, state: State) -> TrialBoot:
    armed_slot = state.trial.slot if state.trial is not None else None
    return TrialBoot.ARMED if armed_slot == snap.booted else TrialBoot.UNARMED


@dataclass(frozen=True)
class NormalBoot:
    state: State
    fell_back: str | None  # the slot whose trial did not commit, if one did not
    disarm: bool  # no trial waits any more: point a stray tryboot at the committed slot

    def message(self, snap: Snapshot) -> str:
        if self.fell_back is not None:
            return f"the trial of slot {self.fell_back} did not come up healthy; running slot {snap.booted}"
        return f"slot {snap.booted} booted normally"


def normal_boot(snap: Snapshot, state: State) -> NormalBoot:
    """What a boot that is no trial settles: a trial armed in an earlier boot that we are not running fell back."""
    new = _copy(state)
    fell_back: str | None = None
    trial = new.trial
    if trial is not None and trial.slot != snap.booted and trial.armed_boot_id != snap.boot_id:
        fell_back = trial.slot
        record = new.slot(fell_back)
        record.state = SlotState.BAD
        record.installed.result = "trial boot did not commit; fell back"
        new.trial = None
    if snap.booted == snap.primary:
        new.slot(snap.booted).state = SlotState.GOOD
    new.primary = snap.primary
    # Nothing waits for a trial (or it fell back): a stray tryboot must start the committed slot. Devices set up by
    # hand, or by older versions, arrive with a trial of the other slot armed.
    return NormalBoot(state=new, fell_back=fell_back, disarm=new.trial is None)
