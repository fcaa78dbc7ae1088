"""End-to-end (the slow tier, docs/slow-tier.md): the `.deb` installed in a Debian guest booted by QEMU, with the
firmware model choosing what boots between boots. Run with `scripts/test-slow` (or `pytest --slow tests/slow` as root).

1. A good update: slot A (1.0.0) installs 1.1.0 into B through ab-flasherd (`abflasherctl update --file --reboot`),
   reboots with `0 tryboot`; the firmware boots B once on trial; ab-flasher-boot-check commits it; the next normal
   boot is B.
2. A bad update: the same with an image whose health check fails; the boot-check rejects it and reboots; the
   firmware boots A again, which records B as bad.
3. A trial that hangs before systemd (its init never starts it): the firmware armed the watchdog for the trial
   (tryboot.txt), the reset boots A without the flag, and `abflasherctl status` shows B bad.
4. A trial whose health check hangs: the commit deadline (ab-flasher-trial-deadline.service) reboots into A.
5. A power cut (QEMU killed) while the update writes: A boots, and the next update succeeds.

Each of 3-5 prints (and adds to the timings file) its boots, its wall time and the time from the fault (the hang,
the power cut) to the old slot running again (its driver's first report).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.slow.guest import (
    CACHE_DIR,
    FAILING_HEALTH_CHECK,
    HANGING_HEALTH_CHECK,
    HANGING_INIT,
    SHARED_STATE_DIR,
    BaseRoot,
    Timings,
    UpdateImage,
    build_deb,
    build_e2e_disk,
    ensure_base_root,
    make_guest_tree,
    make_update_image,
)
from tests.slow.qemu import GuestBoot, QemuPi

pytestmark = [pytest.mark.slow, pytest.mark.root]

TEST_TIMEOUT = 1800
LOG_DIR = CACHE_DIR / "logs"
TIMINGS_FILE = CACHE_DIR / "timings.txt"
# Diagnostic mode (docs/slow-tier.md): ABTEST_SHARED_STATE=1 keeps ab-flasher's state on the data partition, shared by
# both slots, instead of the shipped /var/lib/ab-flasher inside each root.
SHARED_STATE = os.environ.get("ABTEST_SHARED_STATE", "") == "1"


# The hanging-health-check image: a deadline the TCG guest reaches well after its boot-check started the check
# (boot to boot-check ~30 s), and a health timeout that does not end the check first.
DEADLINE_CONFIG = "trial_deadline = 100\nhealth_timeout = 900\n"


@dataclass(frozen=True)
class GuestBuild:
    base: BaseRoot
    tree: Path
    good: UpdateImage
    bad: UpdateImage
    hang_init: UpdateImage
    hang_health: UpdateImage
    images: dict[str, Path]  # by guest path
    timings: Timings


@pytest.fixture(scope="module")
def guest_build(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[GuestBuild]:
    work = tmp_path_factory.mktemp("guest")
    timings = Timings()
    with timings.phase("base root (debootstrap, or the cache)"):
        base = ensure_base_root()
    with timings.phase("make deb"):
        deb = build_deb(work / "deb")
    with timings.phase("guest tree (copy of the base + dpkg -i)"):
        tree = make_guest_tree(base, deb, work / "tree", state_dir=SHARED_STATE_DIR if SHARED_STATE else None)
    variants: dict[str, dict[str, Any]] = {
        "good": {},
        "bad": {"health_checks": {"50-abtest-fail": FAILING_HEALTH_CHECK}},
        "hang-init": {"replaced": {"usr/sbin/init": HANGING_INIT}},
        "hang-health": {"health_checks": {"50-abtest-hang": HANGING_HEALTH_CHECK}, "config": DEADLINE_CONFIG},
    }
    made: dict[str, UpdateImage] = {}
    images: dict[str, Path] = {}
    with timings.phase(f"update images (mkfs.ext4 -d + gzip -1, {len(variants)})"):
        for name, variant in variants.items():
            path = work / f"root-1.1.0-{name}.img.gz"
            sha = make_update_image(tree, path, "1.1.0", **variant)
            made[name] = UpdateImage(f"/data/{path.name}", sha, "1.1.0")
            images[made[name].guest_path] = path
    build = GuestBuild(base=base, tree=tree, good=made["good"], bad=made["bad"], hang_init=made["hang-init"],
                       hang_health=made["hang-health"], images=images, timings=timings)
    yield build
    timings.save(TIMINGS_FILE, request.config)
    shutil.rmtree(work)  # the guest tree and images: a few hundred MiB per run


MakePi = Callable[[UpdateImage], QemuPi]


@pytest.fixture
def make_pi(guest_build: GuestBuild, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MakePi]:
    """A Pi whose disk holds root A (1.0.0), both update images, and a request for ``update``."""
    made: list[QemuPi] = []

    def make(update: UpdateImage) -> QemuPi:
        with guest_build.timings.phase(f"{request.node.name}: disk image"):
            # Only the image this test installs: the data partition holds one or two, not all of them.
            image = guest_build.images[update.guest_path]
            disk = build_e2e_disk(tmp_path / "disk.img", guest_build.tree, guest_build.base,
                                  {image.name: image}, update)
        boots = tmp_path / "boots"
        boots.mkdir()
        pi = QemuPi(disk, boots, timings=guest_build.timings)
        made.append(pi)
        return pi

    yield make
    # The serial consoles outlive tmp_path's cleanup: they are what to read when a boot misbehaves.
    for pi in made:
        logs = LOG_DIR / request.node.name
        shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir(parents=True)
        for boot in pi.boots:
            (logs / f"boot{boot.number}.log").write_text(boot.console)
    for pi in made:
        pi.disk.path.unlink(missing_ok=True)
        shutil.rmtree(pi.workdir, ignore_errors=True)  # each boot's kernel and initrd, copied out of the FAT


def _describe(boot: GuestBoot) -> str:
    return (f"boot {boot.number} (partition {boot.decision.partition}, {boot.decision.kernel}, root partition "
            f"{boot.root_partition}, ended by {boot.ended}); console tail:\n{boot.tail()}")


def _boot_update_from_a(pi: QemuPi, update: UpdateImage) -> GuestBoot:
    first = pi.boot()
    assert first.root_partition == 2, _describe(first)
    assert first.value("version") == "1.0.0", _describe(first)
    assert first.value("update-start") == update.guest_path, _describe(first)
    assert first.ended == "reboot", _describe(first)
    assert not first.values("update-did-not-reboot"), _describe(first)
    return first


def _slot_states(state: dict[str, object]) -> dict[str, object]:
    slots = state.get("slots")
    assert isinstance(slots, dict), state
    return {name: entry.get("state") for name, entry in slots.items() if isinstance(entry, dict)}


@pytest.mark.timeout(TEST_TIMEOUT)
def test_good_update_is_tried_once_then_committed(make_pi: MakePi, guest_build: GuestBuild) -> None:
    pi = make_pi(guest_build.good)
    _boot_update_from_a(pi, guest_build.good)

    trial = pi.boot()
    assert trial.decision.tryboot, "the update's `reboot '0 tryboot'` did not reach the firmware model"
    assert trial.decision.os_prefix == "b/", _describe(trial)
    assert trial.root_partition == 3, _describe(trial)
    verdict = trial.boot_check_verdict()
    assert any(line.endswith(" committed") or " committed:" in line for line in verdict), \
        f"the boot-check did not commit the trial of slot b: {verdict}\n{_describe(trial)}"
    assert trial.value("version") == "1.1.0", _describe(trial)
    assert trial.ended == "poweroff", _describe(trial)
    # The trial was armed and systemd took the watchdog over in time (the package's RuntimeWatchdogSec drop-in).
    assert trial.decision.watchdog_armed, trial.decision
    assert trial.value("watchdog") == "15s active", _describe(trial)
    state_b = trial.state()
    assert _slot_states(state_b).get("b") == "good", state_b
    assert "trial" not in state_b, state_b

    # Committed: the firmware boots B without the one-shot flag from now on.
    assert pi.decide(tryboot=False).os_prefix == "b/"

    after = pi.boot()
    assert not after.decision.tryboot
    assert after.root_partition == 3, _describe(after)
    assert after.value("version") == "1.1.0", _describe(after)
    assert after.ended == "poweroff", _describe(after)
    assert _slot_states(after.state()).get("b") == "good", _describe(after)


@pytest.mark.timeout(TEST_TIMEOUT)
def test_bad_update_falls_back_to_the_old_slot(make_pi: MakePi, guest_build: GuestBuild) -> None:
    pi = make_pi(guest_build.bad)
    _boot_update_from_a(pi, guest_build.bad)

    trial = pi.boot()
    assert trial.decision.tryboot, "the update's `reboot '0 tryboot'` did not reach the firmware model"
    assert trial.root_partition == 3, _describe(trial)
    assert trial.ended == "reboot", _describe(trial)
    # Rejected for the right reason: its own health check, not something else that stops every trial.
    verdict = trial.boot_check_verdict()
    assert any("failed its health checks" in line and "50-abtest-fail" in line for line in verdict), \
        f"the boot-check rejected the trial for another reason than its failing health check: {verdict}"

    # Never committed: without the flag the firmware boots A.
    assert pi.decide(tryboot=False).os_prefix == "a/"
    back = pi.boot()
    assert not back.decision.tryboot
    assert back.root_partition == 2, _describe(back)
    assert back.value("version") == "1.0.0", _describe(back)
    assert back.ended == "poweroff", _describe(back)
    state_a = back.state()
    assert _slot_states(state_a).get("b") == "bad", state_a
    assert _slot_states(state_a).get("a") == "good", state_a
    assert "trial" not in state_a, state_a


def _report(pi: QemuPi, guest_build: GuestBuild, scenario: str, fault_at: float, back: GuestBoot) -> str:
    """One line for the timings report: boots, wall time, time from the fault to the old slot running."""
    boots = pi.boots
    wall = boots[-1].started + boots[-1].seconds - boots[0].started
    faulty = boots[back.number - 2]  # the boot the fault ended
    ended = faulty.started + faulty.seconds - fault_at
    recovered = back.seen["version"] - fault_at
    line = (f"{scenario}: {len(boots)} boots ({', '.join(b.ended for b in boots)}), wall {wall:.0f} s, "
            f"fault -> reset {ended:.0f} s, fault -> old slot running {recovered:.0f} s")
    guest_build.timings.phases.append((line, wall))
    print(line)
    return line


def _ctl_slot_states(boot: GuestBoot) -> dict[str, object]:
    status = json.loads(boot.value("ctl-status"))
    return {slot["name"]: slot["state"] for slot in status["slots"]}


@pytest.mark.timeout(TEST_TIMEOUT)
def test_a_trial_that_hangs_before_systemd_is_reset_by_the_watchdog(make_pi: MakePi, guest_build: GuestBuild) -> None:
    pi = make_pi(guest_build.hang_init)
    _boot_update_from_a(pi, guest_build.hang_init)

    trial = pi.boot()
    assert trial.decision.tryboot, "the update's `reboot '0 tryboot'` did not reach the firmware model"
    assert trial.decision.watchdog_armed, f"the update did not arm the watchdog in tryboot.txt: {trial.decision}"
    assert "watchdog_disarm=0" in trial.decision.cmdline.split(), trial.decision.cmdline
    assert trial.values("firmware-watchdog"), _describe(trial)
    assert "hang-start" in trial.seen, _describe(trial)
    assert trial.ended == "watchdog", _describe(trial)

    # The reset cleared the one-shot flag: the committed slot boots.
    back = pi.boot()
    assert not back.decision.tryboot
    assert not back.decision.watchdog_armed, "the committed configuration must not arm the watchdog"
    assert back.root_partition == 2, _describe(back)
    assert back.value("version") == "1.0.0", _describe(back)
    assert _ctl_slot_states(back) == {"a": "good", "b": "bad"}, back.value("ctl-status")
    assert back.ended == "poweroff", _describe(back)
    _report(pi, guest_build, "hang before systemd", trial.seen["hang-start"], back)


@pytest.mark.timeout(TEST_TIMEOUT)
def test_a_trial_whose_health_check_hangs_is_ended_by_the_deadline(make_pi: MakePi, guest_build: GuestBuild) -> None:
    pi = make_pi(guest_build.hang_health)
    _boot_update_from_a(pi, guest_build.hang_health)

    trial = pi.boot()
    assert trial.decision.tryboot
    assert trial.root_partition == 3, _describe(trial)
    assert "health-hang-start" in trial.seen, _describe(trial)
    verdict = trial.boot_check_verdict()
    assert any("not committed within trial_deadline (100 s)" in line for line in verdict), \
        f"the deadline did not end the trial: {verdict}\n{_describe(trial)}"
    assert trial.ended == "reboot", _describe(trial)

    back = pi.boot()
    assert not back.decision.tryboot
    assert back.root_partition == 2, _describe(back)
    assert back.value("version") == "1.0.0", _describe(back)
    assert _ctl_slot_states(back) == {"a": "good", "b": "bad"}, back.value("ctl-status")
    _report(pi, guest_build, "health check hangs", trial.seen["health-hang-start"], back)


@pytest.mark.timeout(TEST_TIMEOUT)
def test_a_power_cut_while_writing_leaves_the_old_slot_and_the_next_update_works(
        make_pi: MakePi, guest_build: GuestBuild) -> None:
    pi = make_pi(guest_build.good)
    cut = pi.boot(power_cut_after=("update-writing", 1.0))
    assert cut.ended == "power-cut", _describe(cut)
    assert cut.root_partition == 2
    cut_at = cut.started + cut.seconds

    # The request was consumed by the cut boot: ask again, as an operator (or a fleet manager) would.
    pi.write_data_file("/abtest/request", f"{guest_build.good.guest_path} {guest_build.good.sha256}\n")
    again = pi.boot()
    assert not again.decision.tryboot
    assert again.root_partition == 2, _describe(again)
    assert again.value("version") == "1.0.0", _describe(again)
    assert _slot_states(again.state()).get("b") == "incomplete", "the power cut did not hit the write"
    assert again.value("update-start") == guest_build.good.guest_path, _describe(again)
    assert again.ended == "reboot", _describe(again)

    trial = pi.boot()
    assert trial.decision.tryboot
    assert trial.root_partition == 3, _describe(trial)
    assert trial.value("version") == "1.1.0", _describe(trial)
    assert any(" committed" in line for line in trial.boot_check_verdict()), _describe(trial)
    assert _slot_states(trial.state()).get("b") == "good", trial.state()
    _report(pi, guest_build, "power cut while writing", cut_at, again)
