"""The A/B cycle on a simulated Pi, for both layouts: install → trial → commit, and every way it can go wrong.

Each test builds a real disk (sfdisk + mkfs), attaches it to a loop device, boots it through the firmware model
(tests/pifirmware.py) and drives the real Updater. "The model boots X" is always asked of the disk's bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from abflasher import errors
from abflasher.api import UpdateRequest
from abflasher.config import Config
from abflasher.deadline import enforce_trial_deadline
from abflasher.image.pipeline import Progress
from tests import pifirmware
from tests.support.pidisk import build_root_image
from tests.support.simpi import SimulatedPi

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

LAYOUTS = ["prefix", "autoboot"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=LAYOUTS)
def pi(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SimulatedPi]:
    with SimulatedPi(tmp_path, request.param) as device:
        data_before = device.partition_sha(device.data_partition())
        yield device
        # Whatever the scenario did, the data partition is never written.
        assert device.partition_sha(device.data_partition()) == data_before


def root_image(tmp_path: Path, version: str, *, size_mb: int = 24, extra_files: dict[str, bytes] | None = None) -> Path:
    """A gzip'd ext4 root image carrying ``version``."""
    raw = tmp_path / f"root-{version}.img"
    build_root_image(raw, version, size_mb=size_mb, extra_files={"etc/hostname": "pi\n", **(extra_files or {})})
    packed = raw.with_suffix(".img.gz")
    with open(raw, "rb") as src, gzip.open(packed, "wb", compresslevel=1) as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    raw.unlink()
    return packed


def tryboot_slot(pi: SimulatedPi) -> str | None:
    """The slot a one-shot tryboot would start now; None when the firmware would find nothing to boot (and the
    watchdog/power cycle then brings up the committed slot)."""
    try:
        return pi.slot_for(pi.firmware(tryboot=True))
    except pifirmware.NoBootableSystem:
        return None


def install(pi: SimulatedPi, image: Path, version: str = "", **options: object) -> None:
    updater = pi.updater()
    fd = os.open(image, os.O_RDONLY)
    request = UpdateRequest(version=version, fd=fd, size=image.stat().st_size, **options)  # type: ignore[arg-type]
    prepared = updater.prepare(request)
    updater.run(prepared, lambda p: None, threading.Event())


def test_update_trial_commit(pi: SimulatedPi, tmp_path: Path) -> None:
    data_before = pi.partition_sha(pi.data_partition())
    assert pi.slot_for(pi.firmware(tryboot=False)) == "a"
    status = pi.updater().status()
    assert (status.booted_slot, status.primary_slot, status.booted_version) == ("a", "a", "1.0.0")
    assert [s.state for s in status.slots] == ["good", "unknown"]

    install(pi, root_image(tmp_path, "1.1.0"), "1.1.0")

    assert pi.slot_for(pi.firmware(tryboot=True)) == "b", "the trial must boot the new slot"
    assert pi.slot_for(pi.firmware(tryboot=False)) == "a", "without the flag the old slot still boots"
    status = pi.updater().status()
    assert [(s.name, s.state, s.version) for s in status.slots] == [("a", "good", "1.0.0"), ("b", "trial", "1.1.0")]
    # the new root points at its own partitions
    fstab = (pi.slot_file("b", "/etc/fstab") or b"").decode()
    b = pi.image.root("b")
    assert f"PARTUUID={pi.image.partuuid(b.number)}" in fstab
    assert f"PARTUUID={pi.image.partuuid(pi.data_partition())}" in fstab, "the data line is kept"

    assert pi.boot(tryboot=True) == "b"
    result = pi.updater().boot_check()
    assert (result.trial, result.committed) == (True, True)
    assert pi.slot_for(pi.firmware(tryboot=False)) == "b", "committed: B boots without the flag"
    status = pi.updater().status()
    assert (status.booted_slot, status.primary_slot, status.trial_active) == ("b", "b", False)
    assert pi.partition_sha(pi.data_partition()) == data_before


def test_failed_health_check_is_not_committed(pi: SimulatedPi, tmp_path: Path) -> None:
    data_before = pi.partition_sha(pi.data_partition())
    install(pi, root_image(tmp_path, "1.1.0"), "1.1.0")
    pi.set_health(False)
    assert pi.boot(tryboot=True) == "b"
    result = pi.updater().boot_check()
    assert (result.trial, result.committed) == (True, False)
    assert "app did not start" in result.message
    assert pi.reboots(), "a failed trial reboots back to the committed slot"
    assert pi.slot_for(pi.firmware(tryboot=False)) == "a"
    assert pi.boot(tryboot=False) == "a"
    status = pi.updater().status()
    assert [(s.name, s.state) for s in status.slots] == [("a", "good"), ("b", "bad")]
    assert pi.partition_sha(pi.data_partition()) == data_before


def test_hung_trial_falls_back_on_the_next_reset(pi: SimulatedPi, tmp_path: Path) -> None:
    install(pi, root_image(tmp_path, "1.1.0"), "1.1.0")
    # The firmware arms its watchdog for the trial only, from what the update wrote (abflasher/boot/watchdog.py),
    # and the initramfs is told to leave it running for systemd.
    trial = pi.firmware(tryboot=True)
    assert trial.watchdog_timeout == Config().trial_watchdog_timeout
    assert "watchdog_disarm=0" in trial.cmdline.split()
    assert not pi.firmware(tryboot=False).watchdog_armed, "the committed configuration is not changed"
    assert pi.boot(tryboot=True) == "b"
    # ...and it hangs before the health check: the watchdog resets it, without the one-shot flag.
    assert pi.boot(tryboot=False) == "a"
    result = pi.updater().boot_check()
    assert not result.trial
    assert "did not come up" in result.message
    assert [s.state for s in pi.updater().status().slots] == ["good", "bad"]


def test_a_trial_not_committed_by_its_deadline_is_rejected_and_rebooted(pi: SimulatedPi, tmp_path: Path) -> None:
    install(pi, root_image(tmp_path, "1.1.0"), "1.1.0")
    assert pi.boot(tryboot=True) == "b"
    updater = pi.updater()
    assert updater.trial_undecided() is True
    now = [30.0]
    commands: list[tuple[str, ...]] = []

    def run(command: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        commands.append(tuple(command))
        return subprocess.CompletedProcess(list(command), 0, "", "")

    def sleep(seconds: float) -> None:
        now[0] += seconds

    # The boot-check never ran (a stalled boot): at the deadline the trial is rejected and the device rebooted.
    result = enforce_trial_deadline(updater, 300, pi.config.reboot_command, run, clock=lambda: now[0], sleep=sleep)
    assert result.acted
    assert commands[0] == tuple(pi.config.reboot_command)
    assert [s.state for s in updater.status().slots] == ["good", "bad"]
    assert pi.boot(tryboot=False) == "a"
    assert pi.updater().trial_undecided() is False, "the committed slot is no trial: the deadline does nothing"


def test_update_again_from_b_to_a(pi: SimulatedPi, tmp_path: Path) -> None:
    install(pi, root_image(tmp_path, "1.1.0"), "1.1.0")
    pi.boot(tryboot=True)
    assert pi.updater().boot_check().committed
    install(pi, root_image(tmp_path, "1.2.0"), "1.2.0")
    assert pi.slot_for(pi.firmware(tryboot=True)) == "a"
    assert pi.slot_for(pi.firmware(tryboot=False)) == "b"
    assert pi.boot(tryboot=True) == "a"
    assert pi.updater().boot_check().committed
    assert pi.slot_for(pi.firmware(tryboot=False)) == "a"
    status = pi.updater().status()
    assert [(s.name, s.version, s.state) for s in status.slots] == [("a", "1.2.0", "good"), ("b", "1.1.0", "good")]


def test_mark_good_and_mark_bad_need_a_trial(pi: SimulatedPi, tmp_path: Path) -> None:
    with pytest.raises(errors.NoTrial):
        pi.updater().mark_good()
    with pytest.raises(errors.NoTrial):
        pi.updater().mark_bad()
    install(pi, root_image(tmp_path, "1.1.0"), "1.1.0")
    pi.boot(tryboot=True)
    pi.updater().mark_bad()
    assert pi.slot_for(pi.firmware(tryboot=False)) == "a"
    assert [s.state for s in pi.updater().status().slots][1] == "bad"


def test_rollback_to_the_previous_good_slot(pi: SimulatedPi, tmp_path: Path) -> None:
    install(pi, root_image(tmp_path, "1.1.0"), "1.1.0")
    pi.boot(tryboot=True)
    pi.updater().mark_good()
    pi.updater().rollback()
    assert pi.slot_for(pi.firmware(tryboot=False)) == "a"
    status = pi.updater().status()
    assert (status.booted_slot, status.primary_slot, status.trial_active) == ("b", "a", False)
    assert pi.boot(tryboot=False) == "a"


def test_rollback_needs_a_good_slot(tmp_path: Path) -> None:
    with SimulatedPi(tmp_path, "prefix") as fresh, pytest.raises(errors.InvalidArgument, match="no good slot"):
        fresh.updater().rollback()


@pytest.mark.parametrize("fault", ["checksum", "truncated", "wrong-version", "not-an-image"])
def test_bad_images_leave_the_boot_configuration_byte_identical(pi: SimulatedPi, tmp_path: Path, fault: str) -> None:
    image = root_image(tmp_path, "1.1.0")
    options: dict[str, object] = {}
    version = "1.1.0"
    if fault == "checksum":
        options["sha256"] = "0" * 64
    elif fault == "truncated":
        data = image.read_bytes()
        image.write_bytes(data[: len(data) // 2])
    elif fault == "wrong-version":
        version = "1.3.0"
    else:
        image.write_bytes(b"<html>502 Bad Gateway</html>\n" * 100)
    boot_before = pi.boot_config_files()
    data_before = pi.partition_sha(pi.data_partition())
    booted_before = pi.partition_sha(pi.image.root("a").number)
    with pytest.raises((errors.ChecksumMismatch, errors.BadImage)):
        install(pi, image, version, **options)
    assert pi.boot_config_files() == boot_before
    assert pi.partition_sha(pi.data_partition()) == data_before
    assert pi.partition_sha(pi.image.root("a").number) == booted_before
    assert pi.slot_for(pi.firmware(tryboot=False)) == "a"
    state = {s.name: s.state for s in pi.updater().status().slots}
    assert state["b"] in ("bad", "incomplete", "unknown")
    assert_stray_tryboot_cannot_commit(pi)


def assert_stray_tryboot_cannot_commit(pi: SimulatedPi) -> None:
    """Someone runs `reboot '0 tryboot'` by hand. prefix: no tryboot.txt was armed, so the firmware finds no
    kernel and the next reset boots A. autoboot: [tryboot] always names the other slot, so the firmware tries B,
    whose root is unusable (first block zeroed) or, when complete, is refused by the boot check; A comes back."""
    if tryboot_slot(pi) == "b":
        try:
            pi.boot(tryboot=True)
        except subprocess.CalledProcessError:
            pass  # the kernel cannot mount the incomplete root: panic, watchdog reset
        else:
            result = pi.updater().boot_check()
            assert not result.committed
            assert pi.reboots()
    assert pi.boot(tryboot=False) == "a"
    assert pi.updater().status().primary_slot == "a"


def test_refuses_up_to_date_and_downgrade(pi: SimulatedPi, tmp_path: Path) -> None:
    image = root_image(tmp_path, "1.0.0")
    with pytest.raises(errors.UpToDate):
        install(pi, image, "1.0.0")
    with pytest.raises(errors.Downgrade):
        install(pi, image, "0.9")
    with pytest.raises(errors.Downgrade):
        install(pi, root_image(tmp_path, "0.9"))  # upload without a version: checked against the image's own


INTERRUPTED_WRITER = """
import os, sys, threading
from abflasher.config import Config
from abflasher.deadline import enforce_trial_deadline
from abflasher.api import UpdateRequest
from abflasher.updater import Updater
import json
config = Config(**json.loads(sys.argv[1]))
updater = Updater(config)
prepared = updater.prepare(UpdateRequest(version="1.1.0", fd=0))
def progress(p):
    if p.written:
        print("writing", flush=True)
updater.run(prepared, progress, threading.Event())
"""


def test_interrupted_write_leaves_the_slot_incomplete(pi: SimulatedPi, tmp_path: Path) -> None:
    import dataclasses
    import json

    # 3 MiB that do not compress: half of the image is then more than igzip's first read (1 MiB of compressed input),
    # so the slot is being written before the input stops, whatever the inflater.
    blob = random.Random(7).randbytes(3 << 20)
    image = root_image(tmp_path, "1.1.0", extra_files={"var/blob": blob}).read_bytes()
    fields = {k: v for k, v in dataclasses.asdict(pi.config).items() if k != "extra"}
    proc = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED_WRITER, json.dumps(fields)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(image[: len(image) // 2])
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == b"writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdin.close()
    status = pi.updater().status()
    assert {s.name: s.state for s in status.slots}["b"] == "incomplete"
    assert pi.slot_for(pi.firmware(tryboot=False)) == "a"
    assert_stray_tryboot_cannot_commit(pi)


def test_stale_temp_file_and_corrupt_boot_files_are_repaired(pi: SimulatedPi, tmp_path: Path) -> None:
    import subprocess as sp

    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    p1 = f"{pi.loop.device}p1"
    install(pi, root_image(tmp_path, "1.1.0"), "1.1.0")
    pi.boot(tryboot=True)
    pi.updater().mark_good()  # primary is now b, recorded in the state
    stale = tmp_path / "stale"
    stale.write_bytes(b"half-written")
    sp.run(["mcopy", "-o", "-i", p1, str(stale), "::/ABF00001.TMP"], check=True, env=env, timeout=60)
    if pi.layout == "autoboot":
        junk = tmp_path / "junk"
        junk.write_bytes(b"\x00\xff garbage \x00" * 10)
        sp.run(["mcopy", "-o", "-i", p1, str(junk), "::/autoboot.txt"], check=True, env=env, timeout=60)
    pi.flush()
    result = pi.updater().boot_check()
    assert not result.trial
    listing = sp.run(
        ["mdir", "-b", "-i", p1, "::/"], capture_output=True, text=True, env=env, timeout=60, check=True
    ).stdout
    assert "ABF00001.TMP" not in listing.upper()
    assert pi.slot_for(pi.firmware(tryboot=False)) == "b"
    if pi.layout == "autoboot":
        assert (pi.fat_file(1, "autoboot.txt") or b"").startswith(b"[all]")


def test_progress_stages(pi: SimulatedPi, tmp_path: Path) -> None:
    image = root_image(tmp_path, "1.1.0")
    updater = pi.updater()
    prepared = updater.prepare(UpdateRequest(version="1.1.0", fd=os.open(image, os.O_RDONLY)))
    stages: list[str] = []

    def record(p: Progress) -> None:
        if not stages or stages[-1] != p.stage:
            stages.append(p.stage)

    outcome = updater.run(prepared, record, threading.Event())
    assert stages == ["preparing", "writing", "verifying", "configuring"]
    assert outcome.slot == "b"
    assert outcome.sha256 == hashlib.sha256(gzip.decompress(image.read_bytes())).hexdigest()


def test_trial_reboot_uses_the_tryboot_command(pi: SimulatedPi, tmp_path: Path) -> None:
    with pytest.raises(errors.NoTrial):
        pi.updater().reboot("trial")
    install(pi, root_image(tmp_path, "1.1.0"), "1.1.0", reboot=True)
    assert pi.reboots() == [f"{pi.workdir}/fake-reboot 0 tryboot"]
    pi.updater().reboot("trial")
    assert len(pi.reboots()) == 2


def boot_artifact(tmp_path: Path, layout: str) -> bytes:
    """What a publisher puts next to the image: a boot partition image (autoboot) or a boot tarball (prefix),
    carrying a kernel of its own and a cmdline.txt whose root= names the build machine's disk."""
    tree = tmp_path / "artifact"
    tree.mkdir()
    (tree / "start4.elf").write_bytes(b"firmware")
    (tree / "kernel8.img").write_bytes(b"kernel 1.1.0 from the artifact")
    (tree / "config.txt").write_text("[all]\narm_64bit=1\n")
    (tree / "cmdline.txt").write_text("console=serial0,115200 root=PARTUUID=deadbeef-02 rootwait\n")
    (tree / "ARTIFACT").write_text("1.1.0\n")
    if layout == "prefix":
        import io
        import tarfile

        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            for path in sorted(tree.iterdir()):
                archive.add(path, arcname=path.name)
        return buffer.getvalue()
    image = tmp_path / "boot.img"
    with open(image, "wb") as handle:
        handle.truncate(8 << 20)
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    subprocess.run(["mkfs.vfat", "-n", "BOOT", str(image)], check=True, capture_output=True, timeout=60)
    for path in sorted(tree.iterdir()):
        subprocess.run(
            ["mcopy", "-i", str(image), str(path), f"::/{path.name}"], check=True, env=env, timeout=60
        )
    return gzip.compress(image.read_bytes())


def test_boot_files_come_from_the_published_artifact(pi: SimulatedPi, tmp_path: Path) -> None:
    import dataclasses

    from tests.support.httpserver import serve_files

    image = root_image(tmp_path, "1.1.0").read_bytes()
    artifact = boot_artifact(tmp_path, pi.layout)
    name = "boot.tar.gz" if pi.layout == "prefix" else "boot.img.gz"
    files = {
        "/1.1.0/root.img.gz": image,
        "/1.1.0/root.img.gz.sha256": f"{hashlib.sha256(image).hexdigest()}  root.img.gz\n".encode(),
        f"/1.1.0/{name}": artifact,
        f"/1.1.0/{name}.sha256": f"{hashlib.sha256(artifact).hexdigest()}  {name}\n".encode(),
    }
    with serve_files(files) as server:
        pi.config = dataclasses.replace(
            pi.config,
            image_url=server.url("/{version}/root.img.gz"),
            boot_artifact_url=server.url(f"/{{version}}/{name}"),
            require_checksum=True,
        )
        updater = pi.updater()
        updater.run(updater.prepare(UpdateRequest(version="1.1.0")), lambda p: None, threading.Event())
    decision = pi.firmware(tryboot=True)
    assert pi.slot_for(decision) == "b"
    b_boot = pi.image.boot("b").number if pi.layout == "autoboot" else 1
    marker = pi.fat_file(b_boot, "ARTIFACT" if pi.layout == "autoboot" else "b/ARTIFACT")
    assert marker == b"1.1.0\n"
    assert decision.root == f"PARTUUID={pi.image.partuuid(pi.image.root('b').number)}"
    assert pi.slot_for(pi.firmware(tryboot=False)) == "a"


def test_a_boot_artifact_with_a_wrong_checksum_is_refused(pi: SimulatedPi, tmp_path: Path) -> None:
    import dataclasses

    from tests.support.httpserver import serve_files

    image = root_image(tmp_path, "1.1.0").read_bytes()
    files = {
        "/1.1.0/root.img.gz": image,
        "/1.1.0/root.img.gz.sha256": f"{hashlib.sha256(image).hexdigest()}  root.img.gz\n".encode(),
        "/1.1.0/boot.bin": b"tampered",
        "/1.1.0/boot.bin.sha256": f"{'0' * 64}  boot.bin\n".encode(),
    }
    boot_before = pi.boot_config_files()
    with serve_files(files) as server:
        pi.config = dataclasses.replace(
            pi.config,
            image_url=server.url("/{version}/root.img.gz"),
            boot_artifact_url=server.url("/{version}/boot.bin"),
        )
        updater = pi.updater()
        with pytest.raises(errors.ChecksumMismatch, match="boot artifact"):
            updater.run(updater.prepare(UpdateRequest(version="1.1.0")), lambda p: None, threading.Event())
    assert pi.boot_config_files() == boot_before
    assert {s.name: s.state for s in pi.updater().status().slots}["b"] == "incomplete"


def test_one_change_at_a_time_across_processes(pi: SimulatedPi, tmp_path: Path) -> None:
    """The boot check and the service may run at the same moment at boot; the state-dir lock serialises them."""
    install(pi, root_image(tmp_path, "1.1.0"), "1.1.0")
    pi.boot(tryboot=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl,sys,time; f=open(sys.argv[1],'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); time.sleep(60)", str(Path(pi.config.state_dir) / "lock")],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(errors.Busy, match="another ab-flasher process"):
            pi.updater().mark_good()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    pi.updater().mark_good()
    assert pi.slot_for(pi.firmware(tryboot=False)) == "b"


@pytest.fixture(params=LAYOUTS)
def pi_own_state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SimulatedPi]:
    """As installed: each slot keeps ab-flasher's state in its own /var/lib (the slow QEMU tier found that a fresh
    slot then knew nothing of the trial it was armed for)."""
    with SimulatedPi(tmp_path, request.param, state_in_root=True) as device:
        yield device


def test_each_slot_keeps_its_own_state_copy_and_the_newest_wins(pi_own_state: SimulatedPi, tmp_path: Path) -> None:
    pi = pi_own_state
    install(pi, root_image(tmp_path, "1.1.0"), "1.1.0")
    carried = pi.slot_file("b", "/var/lib/ab-flasher/state.json")
    assert carried is not None, "the new root must carry the state that says it is armed"
    assert b'"trial"' in carried

    assert pi.boot(tryboot=True) == "b"
    result = pi.updater().boot_check()
    assert (result.trial, result.committed) == (True, True), result.message
    assert [(s.name, s.state) for s in pi.updater().status().slots] == [("a", "good"), ("b", "good")]

    # Roll back from B; A's own copy is older than B's, so A must adopt what B recorded (b good, not a failed trial).
    pi.updater().rollback()
    assert pi.boot(tryboot=False) == "a"
    result = pi.updater().boot_check()
    assert "did not come up" not in result.message
    status = pi.updater().status()
    assert (status.booted_slot, status.primary_slot) == ("a", "a")
    assert [(s.name, s.state) for s in status.slots] == [("a", "good"), ("b", "good")]


def test_a_hung_trial_is_recorded_in_the_old_slot(pi_own_state: SimulatedPi, tmp_path: Path) -> None:
    pi = pi_own_state
    install(pi, root_image(tmp_path, "1.1.0"), "1.1.0")
    assert pi.boot(tryboot=True) == "b"  # ...and it hangs before the boot check: the watchdog resets it
    assert pi.boot(tryboot=False) == "a"
    result = pi.updater().boot_check()
    assert "did not come up" in result.message
    assert [s.state for s in pi.updater().status().slots] == ["good", "bad"]


def test_a_state_file_shipped_inside_an_image_is_ignored(pi_own_state: SimulatedPi, tmp_path: Path) -> None:
    pi = pi_own_state
    planted = '{"generation": 999, "primary": "b", "slots": {"b": {"state": "good"}}, "format": 1}\n'
    raw = tmp_path / "planted.img"
    build_root_image(raw, "1.1.0", size_mb=24, extra_files={"var/lib/ab-flasher/state.json": planted})
    image = tmp_path / "planted.img.gz"
    image.write_bytes(gzip.compress(raw.read_bytes(), compresslevel=1))
    install(pi, image, "1.1.0")
    status = pi.updater().status()
    assert status.primary_slot == "a"
    assert [(s.name, s.state) for s in status.slots] == [("a", "good"), ("b", "trial")]
