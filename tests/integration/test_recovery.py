"""The recovery slot and update mode on a simulated Pi, in both recovery layouts and both boot schemes.

Each disk is laid out by ``ab-flasher provision`` (tests/support/pidisk.py: build_provisioned_disk), booted through
the firmware model (tests/pifirmware.py) and driven through the real Updater: the companion's sequence (update mode
→ recovery boots → upload → the system slot's trial → health fails → back to recovery; health passes → committed, a
plain reboot boots it), a power cut while recovery writes main, recovery never a target, the data partition never
written, the configuration kept across updates, and install hooks.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from abflasher import errors
from abflasher.api import UpdateRequest
from tests.integration.test_ab_cycle import install, root_image
from tests.integration.test_power_cut import _stages_of
from tests.support.pidisk import Layout, Variant, build_root_image
from tests.support.simpi import SimulatedPi
from tests.support.update_driver import save_config

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20

#: What the running system has that each new root must keep (the config's default preserve list).
IDENTITY = {
    "etc/ssh/ssh_host_ed25519_key": "the device's own host key\n",
    "etc/ssh/ssh_host_ed25519_key.pub": "ssh-ed25519 AAAA device\n",
    "etc/machine-id": "0123456789abcdef0123456789abcdef\n",
    "etc/NetworkManager/system-connections/tether.nmconnection": "[connection]\nid=tether\n",
    "etc/wpa_supplicant/wpa_supplicant.conf": "network={\n ssid=\"robot\"\n}\n",
}
COMBINATIONS = [(layout, variant) for variant in ("main+recovery", "ab+recovery") for layout in ("prefix", "autoboot")]


@pytest.fixture(params=COMBINATIONS, ids=[f"{layout}-{variant}" for layout, variant in COMBINATIONS])
def pi(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SimulatedPi]:
    layout, variant = request.param
    (tmp_path / "device").mkdir()
    with SimulatedPi(tmp_path / "device", layout, variant=variant, root_extra_files=IDENTITY) as device:
        data_before = device.partition_sha(device.data_partition())
        yield device
        # Whatever the scenario did, the data partition is never written.
        assert device.partition_sha(device.data_partition()) == data_before


def system_slot(pi: SimulatedPi) -> str:
    """The slot an update from recovery writes: main, or b (a is committed) in A/B + recovery."""
    return "main" if pi.image.variant == "main+recovery" else "b"


def first_slot(pi: SimulatedPi) -> str:
    return "main" if pi.image.variant == "main+recovery" else "a"


def enter_update_mode(pi: SimulatedPi) -> None:
    """Reboot('recovery'): a one-shot tryboot of recovery; the next plain reset returns to the primary."""
    before = len(pi.reboots())
    pi.updater().reboot("recovery")
    assert pi.reboots()[before:] == [f"{pi.workdir / 'fake-reboot'} 0 tryboot"]
    assert pi.slot_for(pi.firmware(tryboot=False)) == first_slot(pi), "recovery is booted once, not committed"
    assert pi.boot(tryboot=True) == "recovery"
    settled = pi.updater().boot_check()
    assert not settled.trial
    status = pi.updater().status()
    assert (status.booted_slot, status.trial_active) == ("recovery", False)
    assert pi.slot_for(pi.firmware(tryboot=True)) == status.primary_slot, "the boot check disarmed the tryboot"


def states(pi: SimulatedPi) -> dict[str, tuple[str, str, bool]]:
    return {s.name: (s.role, s.state, s.primary) for s in pi.updater().status().slots}


def test_the_companion_sequence(pi: SimulatedPi, tmp_path: Path) -> None:
    first, target = first_slot(pi), system_slot(pi)
    assert pi.slot_for(pi.firmware(tryboot=False)) == first
    assert states(pi)["recovery"] == ("recovery", "good", False)
    if pi.image.variant == "main+recovery":
        with pytest.raises(errors.Busy, match=r"cannot overwrite itself.*reboot recovery"):
            install(pi, root_image(tmp_path, "1.1.0"))
    enter_update_mode(pi)

    # Upload (an fd, as UpdateFromFd passes it); the trial is armed, the committed slot is not the one written.
    install(pi, root_image(tmp_path, "1.1.0"))
    status = pi.updater().status()
    expected_primary = "recovery" if pi.image.variant == "main+recovery" else "a"
    assert status.primary_slot == expected_primary
    assert pi.slot_for(pi.firmware(tryboot=False)) == expected_primary
    assert pi.slot_for(pi.firmware(tryboot=True)) == target
    for path, content in IDENTITY.items():
        assert pi.slot_file(target, "/" + path) == content.encode(), f"{path} was not kept"
    fstab = (pi.slot_file(target, "/etc/fstab") or b"").decode()
    assert f"PARTUUID={pi.image.partuuid(pi.data_partition())}  /data" in fstab
    # Its boot files are the system's (kernel and all), not the recovery system's that wrote it.
    kernel = pi.fat_file(1, f"{target[0]}/kernel8.img") if pi.layout == "prefix" else \
        pi.fat_file(pi.image.boot(target).number, "kernel8.img")  # type: ignore[arg-type]
    assert kernel is not None
    assert f"slot {first} ".encode() in kernel, kernel

    # The trial fails its health check: the device comes back to the primary.
    pi.updater().reboot("trial")
    assert pi.boot(tryboot=True) == target
    pi.set_health(False)
    result = pi.updater().boot_check()
    assert (result.trial, result.committed) == (True, False)
    assert pi.reboots()[-1].strip() == f"{pi.workdir / 'fake-reboot'}"
    assert pi.boot(tryboot=False) == expected_primary
    pi.updater().boot_check()
    assert states(pi)[target][1] == "bad"

    # Again, healthy this time: committed, and a plain reboot boots it.
    pi.set_health(True)
    if pi.image.variant == "ab+recovery":
        enter_update_mode(pi)
    install(pi, root_image(tmp_path, "1.2.0"))
    pi.updater().reboot("trial")
    assert pi.boot(tryboot=True) == target
    result = pi.updater().boot_check()
    assert result.committed, result.message
    assert pi.slot_for(pi.firmware(tryboot=False)) == target
    assert pi.boot(tryboot=False) == target
    pi.updater().boot_check()
    status = pi.updater().status()
    assert (status.booted_slot, status.primary_slot, status.booted_version) == (target, target, "1.2.0")
    assert states(pi)["recovery"] == ("recovery", "good", False)
    assert pi.slot_for(pi.firmware(tryboot=True)) == target, "disarmed: a stray tryboot starts the committed slot"


@pytest.mark.parametrize("layout", ["prefix", "autoboot"])
def test_a_main_that_hangs_falls_back_to_recovery(tmp_path: Path, layout: Layout) -> None:
    (tmp_path / "device").mkdir()
    with SimulatedPi(tmp_path / "device", layout, variant="main+recovery") as pi:
        enter_update_mode(pi)
        install(pi, root_image(tmp_path, "1.1.0"))
        assert pi.boot(tryboot=True) == "main"
        # No health check ever runs: the watchdog (or a power cycle) resets without the flag.
        assert pi.boot(tryboot=False) == "recovery"
        assert not pi.updater().boot_check().trial
        assert states(pi)["main"][1] == "bad"
        assert pi.slot_for(pi.firmware(tryboot=True)) == "recovery"


def test_recovery_is_never_a_target(pi: SimulatedPi, tmp_path: Path) -> None:
    recovery_before = pi.partition_sha(pi.image.root("recovery").number)  # type: ignore[arg-type]
    enter_update_mode(pi)
    updater = pi.updater()
    # No request can name the target; one that reached the engine with recovery as its target is refused.
    prepared = updater.prepare(UpdateRequest(version="1.1.0", url="http://192.0.2.1/root.img"))
    assert prepared.target_slot == system_slot(pi)
    with pytest.raises(errors.InvalidArgument, match="recovery slot: ab-flasher never writes it"):
        updater.run(dataclasses.replace(prepared, target_slot="recovery"), lambda p: None, threading.Event())
    install(pi, root_image(tmp_path, "1.1.0"))
    assert pi.updater().status().trial_active is False
    assert pi.partition_sha(pi.image.root("recovery").number) == recovery_before  # type: ignore[arg-type]


def test_a_failing_install_hook_aborts_and_nothing_is_armed(pi: SimulatedPi, tmp_path: Path) -> None:
    hooks = tmp_path / "install.d"
    hooks.mkdir()
    seen = tmp_path / "seen"
    (hooks / "10-record").write_text(f'#!/bin/sh\necho "$AB_FLASHER_SLOT $AB_FLASHER_VERSION" > {seen}\n'
                                     f'test -f "$AB_FLASHER_NEW_ROOT/.ab_version"\n')
    (hooks / "20-refuse").write_text("#!/bin/sh\necho 'no room for the app data' >&2\nexit 3\n")
    for hook in hooks.iterdir():
        hook.chmod(0o755)
    pi.config = dataclasses.replace(pi.config, install_hooks_dir=str(hooks))
    enter_update_mode(pi)
    switch_before = pi.boot_config_files()
    with pytest.raises(errors.Incompatible, match=r"install hook 20-refuse failed \(exit 3\): no room"):
        install(pi, root_image(tmp_path, "1.1.0"))
    assert seen.read_text() == f"{system_slot(pi)} 1.1.0\n"
    assert pi.slot_for(pi.firmware(tryboot=True)) != system_slot(pi), "nothing is armed"
    if pi.image.variant == "ab+recovery":
        assert pi.boot_config_files() == switch_before
    assert states(pi)[system_slot(pi)][1] == "bad"
    (hooks / "20-refuse").unlink()
    install(pi, root_image(tmp_path, "1.1.0"))
    assert pi.slot_for(pi.firmware(tryboot=True)) == system_slot(pi)


@pytest.mark.parametrize("layout", ["prefix", "autoboot"])
def test_a_power_cut_while_recovery_writes_main_boots_recovery(tmp_path: Path, layout: Layout) -> None:
    variant: Variant = "main+recovery"
    image = tmp_path / "root-1.1.0.img"
    build_root_image(image, "1.1.0", size_mb=64, extra_files={"opt/blob": bytes(range(256)) * (160 * 1024)})
    (tmp_path / "device").mkdir()
    with SimulatedPi(tmp_path / "device", layout, variant=variant, root_mb=72) as pi:
        data_before = pi.partition_sha(pi.data_partition())
        enter_update_mode(pi)
        config = tmp_path / "config.json"
        save_config(pi.config, config)
        process = subprocess.Popen([sys.executable, "-m", "tests.support.update_driver", str(config), str(image),
                                    "1.1.0"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        lines = _stages_of(process)
        try:
            deadline = time.monotonic() + 120
            while lines.get(timeout=max(0.1, deadline - time.monotonic())) not in ("writing", "", "done"):
                pass
            time.sleep(0.05)
            process.send_signal(signal.SIGKILL)  # the power cut: nothing after this point runs
        finally:
            process.kill()
            process.wait(timeout=60)
        assert pi.slot_for(pi.firmware(tryboot=False)) == "recovery"
        assert pi.slot_for(pi.firmware(tryboot=True)) == "recovery"
        assert pi.boot(tryboot=False) == "recovery"
        pi.updater().boot_check()
        assert states(pi)["main"][1] == "incomplete"
        # From recovery the upload is simply made again.
        install(pi, image, "1.1.0")
        assert pi.boot(tryboot=True) == "main"
        assert pi.updater().boot_check().committed
        assert pi.partition_sha(pi.data_partition()) == data_before
