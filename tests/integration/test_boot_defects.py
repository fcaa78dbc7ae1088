"""Boot-configuration defects that let a stray tryboot, or a new root's fstab, start something that cannot run.

Each was found by asking the firmware model what boots at every step of an update; each test failed before the fix.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from abflasher.api import UpdateRequest
from abflasher.image.pipeline import Progress
from tests.integration.test_ab_cycle import LAYOUTS, install, root_image, tryboot_slot
from tests.support.pidisk import IMAGE_BUILD_SIGNATURE, fstab_text
from tests.support.simpi import SimulatedPi

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]


@pytest.fixture(params=LAYOUTS)
def legacy_pi(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SimulatedPi]:
    """A device as earlier versions (or a hand-made setup) left it: a trial of the other slot armed in autoboot.txt,
    no tryboot.txt in the prefix layout."""
    with SimulatedPi(tmp_path, request.param, switch_files="legacy") as device:
        yield device


def test_a_stray_tryboot_while_the_other_slot_is_written_starts_the_committed_slot(
    legacy_pi: SimulatedPi, tmp_path: Path
) -> None:
    """Defect: in the autoboot layout disarm() rewrote the canonical autoboot.txt, whose [tryboot] always names the
    other slot, so while the update wrote that slot a stray `reboot '0 tryboot'` booted the half-written slot."""
    pi = legacy_pi
    image = root_image(tmp_path, "1.1.0")
    seen: list[str | None] = []

    def watch(progress: Progress) -> None:
        if progress.stage == "writing" and not seen:
            seen.append(tryboot_slot(pi))

    updater = pi.updater()
    fd = os.open(image, os.O_RDONLY)
    prepared = updater.prepare(UpdateRequest(version="1.1.0", fd=fd, size=image.stat().st_size))
    updater.run(prepared, watch, threading.Event())
    assert seen == ["a"], "while slot b is being written, a tryboot must start the committed slot a"
    assert tryboot_slot(pi) == "b", "armed after the verify"


def test_a_normal_boot_disarms_a_trial_nobody_armed(legacy_pi: SimulatedPi) -> None:
    pi = legacy_pi
    pi.updater().boot_check()
    assert tryboot_slot(pi) == "a", "with no trial pending, a tryboot starts the committed slot"
    assert pi.slot_for(pi.firmware(tryboot=False)) == "a"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_rejected_trial_is_disarmed(tmp_path: Path, layout: str) -> None:
    """Defect: after a failed trial tryboot.txt still named the rejected slot until the next update."""
    with SimulatedPi(tmp_path, layout) as pi:  # type: ignore[arg-type]
        install(pi, root_image(tmp_path, "1.1.0"), "1.1.0")
        pi.set_health(False)
        assert pi.boot(tryboot=True) == "b"
        result = pi.updater().boot_check()
        assert (result.trial, result.committed) == (True, False)
        assert tryboot_slot(pi) == "a", "a stray tryboot must not start the rejected slot again"
        assert pi.boot(tryboot=False) == "a"
        assert tryboot_slot(pi) == "a"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mark_bad_and_rollback_disarm(tmp_path: Path, layout: str) -> None:
    with SimulatedPi(tmp_path, layout) as pi:  # type: ignore[arg-type]
        install(pi, root_image(tmp_path, "1.1.0"), "1.1.0")
        assert pi.boot(tryboot=True) == "b"
        pi.updater().mark_bad()
        assert tryboot_slot(pi) == "a"
        assert pi.boot(tryboot=False) == "a"
        install(pi, root_image(tmp_path, "1.2.0"), "1.2.0")
        assert pi.boot(tryboot=True) == "b"
        pi.updater().mark_good()
        assert (pi.slot_for(pi.firmware(tryboot=False)), tryboot_slot(pi)) == ("b", "b")
        pi.updater().rollback()
        assert (pi.slot_for(pi.firmware(tryboot=False)), tryboot_slot(pi)) == ("a", "a")


def test_the_data_line_of_an_image_from_the_other_layout_names_the_data_partition(tmp_path: Path) -> None:
    """Defect: the fstab fix-up mapped partitions by number, so an image whose fstab mounts /data from partition 4
    (the prefix layout's data) got, on an autoboot disk, a /data line naming p4 (the extended partition) plus
    a second one naming p7: a root that would never pass its boot."""
    with SimulatedPi(tmp_path, "autoboot") as pi:
        install(pi, root_image(tmp_path, "1.1.0"), "1.1.0")
        fstab = (pi.slot_file("b", "/etc/fstab") or b"").decode()
        data_lines = [line.split() for line in fstab.splitlines() if line.split()[1:2] == ["/data"]]
        data = pi.image.partuuid(pi.data_partition())
        assert [fields[0] for fields in data_lines] == [f"PARTUUID={data}"], fstab
        mounts = {fields[1]: fields[0] for fields in (line.split() for line in fstab.splitlines()) if fields}
        assert mounts["/"] == f"PARTUUID={pi.image.partuuid(pi.image.root('b').number)}"
        assert mounts["/boot/firmware"] == f"PARTUUID={pi.image.partuuid(pi.image.boot('b').number)}"
        assert f"{IMAGE_BUILD_SIGNATURE:08x}" not in fstab.lower()
        assert fstab_text(IMAGE_BUILD_SIGNATURE, root=2, boot=1, data=4).count("/data") == 1
