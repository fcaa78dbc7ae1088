"""The companion's sequence through the real service, as a member of the abflasher group, on a main + recovery
disk: Reboot('recovery') over D-Bus → recovery boots → the image is uploaded (UpdateFromFd) → main's trial fails
its health check → recovery boots; uploaded again → main is committed and a plain reboot boots it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.service_rig import Device, Rig, simulated_device, slot_of, status_of
from tests.support.serviceprocess import ServiceProcess

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]


@pytest.fixture
def device(rig: Rig, tmp_path: Path) -> Iterator[Device]:
    yield from simulated_device(rig, tmp_path, variant="main+recovery")


def test_the_companion_sequence_over_dbus(rig: Rig, device: Device) -> None:
    member, pi = rig.users.member, device.pi
    data_before = pi.partition_sha(pi.data_partition())
    fake_reboot = str(pi.workdir / "fake-reboot")

    def upload(version: str) -> None:
        done = rig.ctl(member, "update", "--file", str(rig.images[version]))
        assert done.returncode == 0, done.stderr.decode()

    def service(log_name: str) -> ServiceProcess:
        return ServiceProcess([rig.venv.daemon, "--config", device.config_path], rig.bus, log_name=log_name)

    with service("main.log"):
        status = status_of(rig, member)
        assert [(s["name"], s["role"], s["booted"], s["primary"]) for s in status["slots"]] == \
            [("main", "system", True, True), ("recovery", "recovery", False, False)]
        refused = rig.ctl(member, "update", "--file", str(rig.images["1.1.0"]))
        assert refused.returncode == 4, refused.stderr.decode()  # Busy
        assert "cannot overwrite itself" in refused.stderr.decode()
        assert "reboot recovery" in refused.stderr.decode()
        reboot = rig.ctl(member, "reboot", "recovery")
        assert reboot.returncode == 0, reboot.stderr.decode()
        assert pi.reboots() == [f"{fake_reboot} 0 tryboot"]

    assert pi.boot(tryboot=True) == "recovery"
    pi.updater().boot_check()  # ab-flasher-boot-check.service
    pi.set_health(False)
    with service("recovery.log"):
        assert status_of(rig, member)["booted_slot"] == "recovery"
        upload("1.1.0")
        status = status_of(rig, member)
        assert (status["primary_slot"], slot_of(status, "main")["state"]) == ("recovery", "trial")
        assert rig.ctl(member, "reboot", "trial").returncode == 0
    assert pi.boot(tryboot=True) == "main"
    result = pi.updater().boot_check()
    assert (result.trial, result.committed) == (True, False)
    assert pi.reboots()[-1].strip() == fake_reboot

    assert pi.boot(tryboot=False) == "recovery", "a main that failed its health check falls back to recovery"
    pi.updater().boot_check()
    pi.set_health(True)
    with service("recovery-again.log"):
        assert slot_of(status_of(rig, member), "main")["state"] == "bad"
        upload("1.2.0")
        assert rig.ctl(member, "reboot", "trial").returncode == 0
    assert pi.boot(tryboot=True) == "main"
    assert pi.updater().boot_check().committed
    assert pi.boot(tryboot=False) == "main", "committed: a plain reboot boots main"
    with service("main-again.log"):
        status = status_of(rig, member)
        assert (status["booted_slot"], status["primary_slot"], status["booted_version"]) == ("main", "main", "1.2.0")
    assert pi.partition_sha(pi.data_partition()) == data_before
