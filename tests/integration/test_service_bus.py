"""The service against real components: a private system-type dbus-daemon enforcing the project's dbus/ policy,
the real polkitd with the project's policy and rules installed, real users in and out of the abflasher group
running abflasherctl from their own venv, and the real engine writing a simulated Pi disk on a loop device.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_next.constants import MessageType

from abflasher.service.interface import METHOD_ACTIONS
from tests.support.bus import (
    BUS_NAME,
    bus_call,
    name_has_owner,
    stop_process,
    wait_until,
)
from tests.support.pidisk import build_root_image
from tests.support.service_rig import (
    ERR,
    IMAGE_MB,
    MIB,
    Device,
    Rig,
    json_lines,
    simulated_device,
    slot_of,
    status_of,
    tryboot_slot,
    wait_for_writing,
)
from tests.support.serviceprocess import ServiceProcess
from tests.support.signals import SignalRecorder, get_slots_concurrently
from tests.support.users import popen_as, run_as

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def device(rig: Rig, tmp_path: Path) -> Iterator[Device]:
    yield from simulated_device(rig, tmp_path)


@pytest.fixture
def service(rig: Rig, device: Device) -> Iterator[ServiceProcess]:
    """ab-flasherd as root with the real engine, from the same venv the users run abflasherctl from."""
    with ServiceProcess([rig.venv.daemon, "--config", device.config_path], rig.bus) as process:
        yield process


# ---------------------------------------------------------------------------------------------------------------------


def test_a_member_installs_a_version_and_follows_it_to_completion(
    rig: Rig, device: Device, service: ServiceProcess
) -> None:
    image_size = IMAGE_MB * MIB
    with SignalRecorder(rig.bus.address) as recorder:
        member = popen_as(rig.users.member, [rig.venv.ctl, "--json", "update", "1.1.0"], bus=rig.bus,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            job = wait_for_writing(recorder)
            # 20 readers at once while the image streams in, and an outsider's status
            replies = asyncio.run(get_slots_concurrently(rig.bus.address, 20))
            outsider = status_of(rig, rig.users.outsider)
            stdout, stderr = member.communicate(timeout=120)
        finally:
            stop_process(member)
        assert member.returncode == 0, stderr.decode()
        completed = recorder.wait_for(lambda m: m.member == "Completed", 10, "Completed")
        signals = [m for m in recorder.messages() if m.member in ("Progress", "Completed")]

    assert len(replies) == 20
    assert all(r.message_type == MessageType.METHOD_RETURN for r in replies)
    assert outsider["state"] in ("writing", "preparing")

    # abflasherctl followed it: progress lines, then Completed(success)
    events = json_lines(stdout)
    assert events[0] == {"event": "job", "job": job}
    assert events[-1]["event"] == "completed"
    assert events[-1]["success"] is True
    assert "1.1.0" in events[-1]["message"]
    assert [e for e in events if e["event"] == "progress"], "no progress reached the client"

    # the signals: in order, bytes monotonic per stage, the last one the image size, Completed last
    assert completed.body[:3] == [job, True, ""]
    assert signals[-1].member == "Completed"
    progress = [tuple(m.body[1:]) for m in signals if m.member == "Progress" and m.body[0] == job]
    order = ["preparing", "writing", "verifying", "configuring"]
    stages = [p[0] for p in progress]
    assert stages == sorted(stages, key=order.index), stages
    assert {"writing", "verifying"} <= set(stages)
    for stage in set(stages):
        done = [p[2] for p in progress if p[0] == stage]
        assert done == sorted(done), f"{stage} went backwards: {done}"
    assert [p for p in progress if p[0] == "writing"][-1][1:] == (100, image_size, image_size)
    assert [p for p in progress if p[0] == "verifying"][-1][1:] == (100, image_size, image_size)
    assert progress[-1][2] == image_size
    # rate-limited: the install took a few seconds; ~10 a second plus stage boundaries
    writing = [m for m in signals if m.member == "Progress" and m.body[1] == "writing"]
    assert len(writing) <= 10 * 10 + 4

    status = status_of(rig, rig.users.member)
    assert slot_of(status, "b")["version"] == "1.1.0"
    assert slot_of(status, "b")["state"] == "trial"
    assert slot_of(status, "a")["booted"] is True
    assert status["state"] == "ready-to-reboot"
    human = rig.ctl(rig.users.member, "status")
    assert human.returncode == 0
    assert "1.1.0" in human.stdout.decode()


def test_the_whole_cycle_through_the_service(rig: Rig, device: Device) -> None:
    """update → reboot trial → (the device reboots; a new service starts) → mark-good, all as the member."""
    member = rig.users.member
    with ServiceProcess([rig.venv.daemon, "--config", device.config_path], rig.bus):
        assert rig.ctl(member, "update", "1.1.0").returncode == 0
        reboot = rig.ctl(member, "reboot", "trial")
        assert reboot.returncode == 0, reboot.stderr.decode()
        assert device.pi.reboots() == [f"{device.pi.workdir / 'fake-reboot'} 0 tryboot"]
    assert device.pi.boot(tryboot=True) == "b"
    with ServiceProcess([rig.venv.daemon, "--config", device.config_path], rig.bus, log_name="after-reboot.log"):
        status = status_of(rig, member)
        assert (status["booted_slot"], status["trial_active"], status["booted_version"]) == ("b", True, "1.1.0")
        good = rig.ctl(member, "mark-good")
        assert good.returncode == 0, good.stderr.decode()
        status = status_of(rig, member)
        assert (status["primary_slot"], status["trial_active"]) == ("b", False)
        assert slot_of(status, "b")["state"] == "good"
        assert rig.ctl(member, "mark-good").returncode == 13  # NoTrial: nothing left to commit
    assert device.pi.slot_for(device.pi.firmware(tryboot=False)) == "b"


#: Each mutating abflasherctl command and the D-Bus method it calls.
OUTSIDER_COMMANDS: dict[str, list[str]] = {
    "Update": ["update", "1.1.0"],
    "UpdateFromFd": ["update", "--file", "IMAGE"],
    "Cancel": ["cancel"],
    "Reboot": ["reboot", "trial"],
    "MarkGood": ["mark-good"],
    "MarkBad": ["mark-bad"],
    "Rollback": ["rollback"],
}


def test_an_outsider_is_refused_every_mutating_method_and_can_still_read(
    rig: Rig, device: Device, service: ServiceProcess
) -> None:
    assert set(OUTSIDER_COMMANDS) == set(METHOD_ACTIONS), "a mutating method is missing from this test"
    before = status_of(rig, rig.users.outsider)
    state_file = device.pi.config.state_file
    state_before = state_file.read_bytes() if state_file.exists() else None
    for method, command in OUTSIDER_COMMANDS.items():
        argv = [str(rig.images["1.1.0.gz"]) if arg == "IMAGE" else arg for arg in command]
        done = rig.ctl(rig.users.outsider, *argv)
        error = done.stderr.decode()
        assert done.returncode == 3, (method, done.returncode, error)
        assert "not allowed" in error, (method, error)
        # An image of the caller's choosing needs an administrator even in the group.
        hint = "administrator's password" if method == "UpdateFromFd" else "add yourself to the abflasher group"
        assert hint in error, (method, error)
        assert "Traceback" not in error
        assert error.count("\n") == 1, f"{method}: one line expected: {error!r}"
    for mode in ("normal", "recovery"):
        assert rig.ctl(rig.users.outsider, "reboot", mode).returncode == 3
    assert rig.ctl(rig.users.outsider, "update", "0.9", "--allow-downgrade").returncode == 3

    # nothing changed, nothing was rebooted, and reading still works
    assert status_of(rig, rig.users.outsider) == before
    assert (state_file.read_bytes() if state_file.exists() else None) == state_before
    assert not device.pi.reboots()
    check = rig.ctl(rig.users.outsider, "check", "--json")
    assert check.returncode == 0, check.stderr.decode()
    assert json.loads(check.stdout) == {"available": "1.2.0", "current": "1.0.0", "update_available": True}
    assert rig.ctl(rig.users.outsider, "watch").returncode == 0
    assert "denied" in service.log_text()


def test_a_member_still_needs_an_administrator_to_downgrade(rig: Rig, device: Device, service: ServiceProcess) -> None:
    done = rig.ctl(rig.users.member, "update", "0.9.0", "--allow-downgrade")
    assert done.returncode == 3, done.stderr.decode()
    assert "downgrades need an administrator" in done.stderr.decode()
    plain = rig.ctl(rig.users.member, "update", "0.9.0")
    assert plain.returncode == 6, plain.stderr.decode()
    assert "--allow-downgrade" in plain.stderr.decode()


def test_a_second_update_is_busy_and_cancel_leaves_the_target_incomplete(
    rig: Rig, device: Device, service: ServiceProcess
) -> None:
    member = rig.users.member
    with SignalRecorder(rig.bus.address) as recorder:
        started = rig.ctl(member, "--json", "update", "1.2.0", "--url", device.url("/slow/root-1.2.0.img"),
                          "--detach")
        assert started.returncode == 0, started.stderr.decode()
        job = json_lines(started.stdout)[0]["job"]
        wait_for_writing(recorder)

        second = rig.ctl(member, "update", "1.1.0")
        assert second.returncode == 4, second.stderr.decode()
        assert f"update job {job} is running" in second.stderr.decode()
        busy_boot = rig.ctl(member, "mark-good")
        assert busy_boot.returncode == 4

        # a watcher (read-only, the outsider) follows the job to its end
        watcher = popen_as(rig.users.outsider, [rig.venv.ctl, "--json", "watch"], bus=rig.bus,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            recorder.wait_for(lambda m: m.member == "Progress" and len(recorder.messages("Progress")) > 3, 30,
                              "more progress")
            cancel = rig.ctl(member, "cancel")
            assert cancel.returncode == 0, cancel.stderr.decode()
            watched, _ = watcher.communicate(timeout=60)
        finally:
            stop_process(watcher)
        completed = recorder.wait_for(lambda m: m.member == "Completed", 10, "Completed")

    assert completed.body[:3] == [job, False, ERR + "Cancelled"]
    assert watcher.returncode == 14
    watched_events = json_lines(watched)
    assert next(e for e in watched_events if e["event"] == "completed")["error"] == ERR + "Cancelled"
    assert watched_events[-1] == {"event": "error", "error": "Cancelled", "message": completed.body[3]}
    status = status_of(rig, member)
    assert slot_of(status, "b")["state"] == "incomplete"
    assert status["state"] == "idle"
    assert "cancel" in status["last_error"]
    # and the half-written slot is not offered to the firmware
    assert device.pi.slot_for(device.pi.firmware(tryboot=False)) == "a"
    assert tryboot_slot(device.pi) != "b"
    # free again afterwards
    again = rig.ctl(member, "--json", "update", "1.1.0")
    assert again.returncode == 0, again.stderr.decode()


def test_update_from_a_pipe_fed_by_another_process(rig: Rig, device: Device, service: ServiceProcess) -> None:
    member = rig.users.member
    image = rig.images["1.1.0.gz"]
    feeder = popen_as(member, ["cat", image], bus=rig.bus, stdout=subprocess.PIPE)
    try:
        assert feeder.stdout is not None
        done = subprocess.run(
            ["runuser", "-u", member, "--", "env", "-i", f"DBUS_SYSTEM_BUS_ADDRESS={rig.bus.address}",
             str(rig.venv.ctl), "--json", "update", "--file", "-", "1.1.0"],
            stdin=feeder.stdout, capture_output=True, timeout=120, check=False,
        )
        feeder.stdout.close()
        feeder.wait(30)
    finally:
        stop_process(feeder)
    assert done.returncode == 0, done.stderr.decode()
    assert json_lines(done.stdout)[-1]["success"] is True
    status = status_of(rig, member)
    assert slot_of(status, "b")["version"] == "1.1.0"
    assert slot_of(status, "b")["installed"]["source"] == "uploaded image"


def test_a_pipe_that_breaks_mid_stream_fails_cleanly(
    rig: Rig, device: Device, service: ServiceProcess, tmp_path: Path
) -> None:
    member = rig.users.member
    # 3 MiB that do not compress: half of the image is more than igzip's first read (1 MiB of compressed input), so
    # the slot is being written before the pipe breaks, whatever the inflater.
    raw = tmp_path / "root-1.1.0.img"
    build_root_image(raw, "1.1.0", size_mb=IMAGE_MB,
                     extra_files={"etc/hostname": "pi\n", "var/blob": random.Random(7).randbytes(3 << 20)})
    image = tmp_path / "root-1.1.0.img.gz"
    subprocess.run(f"gzip -1 -c {raw} > {image}", shell=True, check=True, timeout=120)
    image.chmod(0o644)
    half = image.stat().st_size // 2
    script = (
        "import sys, time\n"
        f"data = open({str(image)!r}, 'rb').read()[:{half}]\n"
        "sys.stdout.buffer.write(data); sys.stdout.flush()\n"
        "time.sleep(600)\n"
    )
    with SignalRecorder(rig.bus.address) as recorder:
        # the uploader: our own child (so killing it by PID really closes the pipe's write end)
        feeder = subprocess.Popen(["/usr/bin/python3", "-c", script], stdout=subprocess.PIPE)
        try:
            assert feeder.stdout is not None
            client = subprocess.Popen(
                ["runuser", "-u", member, "--", "env", "-i", f"DBUS_SYSTEM_BUS_ADDRESS={rig.bus.address}",
                 str(rig.venv.ctl), "--json", "update", "--file", "-", "1.1.0"],
                stdin=feeder.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            feeder.stdout.close()
            try:
                recorder.wait_for(lambda m: m.member == "Progress" and m.body[1] == "writing", 60, "writing")
                # the uploader dies mid-stream
                feeder.kill()
                stdout, stderr = client.communicate(timeout=120)
            finally:
                stop_process(client)
        finally:
            stop_process(feeder)
    assert client.returncode == 9, stderr.decode()
    events = json_lines(stdout)
    completed = next(e for e in events if e["event"] == "completed")
    assert completed["error"] == ERR + "BadImage"
    assert events[-1]["event"] == "error"
    assert "Traceback" not in stderr.decode()
    status = status_of(rig, member)
    assert slot_of(status, "b")["state"] == "incomplete"
    assert status["state"] == "failed"
    assert tryboot_slot(device.pi) != "b"
    # the service is fine afterwards
    assert service.process.poll() is None


def test_sigterm_cancels_a_running_job_and_exits(rig: Rig, device: Device) -> None:
    with ServiceProcess([rig.venv.daemon, "--config", device.config_path], rig.bus) as process:
        with SignalRecorder(rig.bus.address) as recorder:
            started = rig.ctl(rig.users.member, "update", "1.2.0", "--url", device.url("/slow/root-1.2.0.img"),
                              "--detach")
            assert started.returncode == 0, started.stderr.decode()
            wait_for_writing(recorder)
            process.process.send_signal(signal.SIGTERM)
            assert process.process.wait(60) == 0
            completed = recorder.wait_for(lambda m: m.member == "Completed", 10, "Completed")
        assert completed.body[1:3] == [False, ERR + "Cancelled"]
        assert "cancelling job" in process.log_text()
    with ServiceProcess([rig.venv.daemon, "--config", device.config_path], rig.bus, log_name="service2.log"):
        assert slot_of(status_of(rig, rig.users.outsider), "b")["state"] == "incomplete"


def test_a_non_root_process_cannot_own_the_bus_name(rig: Rig) -> None:
    script = (
        "import asyncio\n"
        "from dbus_next.aio.message_bus import MessageBus\n"
        "from dbus_next.constants import BusType\n"
        "async def main():\n"
        "    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()\n"
        "    try:\n"
        f"        print(await bus.request_name({BUS_NAME!r}))\n"
        "    except Exception as exc:\n"
        "        print('refused', type(exc).__name__, getattr(exc, 'type', ''))\n"
        "asyncio.run(main())\n"
    )
    for user in (rig.users.member, rig.users.outsider):
        done = run_as(user, [rig.venv.python, "-c", script], bus=rig.bus, timeout=60)
        assert done.returncode == 0, done.stderr.decode()
        assert done.stdout.decode().split() == ["refused", "DBusError", "org.freedesktop.DBus.Error.AccessDenied"]
    assert not name_has_owner(rig.bus.address, BUS_NAME)


def test_the_service_is_started_by_bus_activation(rig: Rig, device: Device) -> None:
    shipped = (REPO / "dbus" / "org.abflasher.Updater.service").read_text()
    assert "Name=org.abflasher.Updater" in shipped
    assert "SystemdService=ab-flasher.service" in shipped
    assert "User=root" in shipped
    exec_line = f"Exec={rig.venv.daemon} --config {device.config_path} --idle-timeout 60"
    service_file = rig.service_dir / "org.abflasher.Updater.service"
    service_file.write_text(
        "\n".join(exec_line if line.startswith("Exec=") else line for line in shipped.splitlines()) + "\n"
    )
    activated_pid = 0
    try:
        reload = asyncio.run(bus_call(rig.bus.address, "ReloadConfig"))
        assert reload.message_type == MessageType.METHOD_RETURN, reload.body
        assert not name_has_owner(rig.bus.address, BUS_NAME)
        done = rig.ctl(rig.users.outsider, "status", "--json")
        assert done.returncode == 0, done.stderr.decode()
        assert json.loads(done.stdout)["booted_version"] == "1.0.0"
        owner = asyncio.run(bus_call(rig.bus.address, "GetConnectionUnixProcessID", "s", [BUS_NAME]))
        activated_pid = int(owner.body[0])
        uid = asyncio.run(bus_call(rig.bus.address, "GetConnectionUnixUser", "s", [BUS_NAME]))
        assert uid.body[0] == 0, "the activated service must run as root"
    finally:
        service_file.unlink()
        asyncio.run(bus_call(rig.bus.address, "ReloadConfig"))
        if activated_pid:
            os.kill(activated_pid, signal.SIGTERM)
            wait_until(lambda: not name_has_owner(rig.bus.address, BUS_NAME), timeout=30, what="the service to stop")
            wait_until(lambda: not Path(f"/proc/{activated_pid}").exists()
                       or "zombie" in Path(f"/proc/{activated_pid}/status").read_text(errors="replace").lower()
                       or "(Z)" in Path(f"/proc/{activated_pid}/status").read_text(errors="replace"),
                       timeout=30, what="the activated service to exit")


def test_the_idle_service_exits_and_gives_its_name_back(rig: Rig) -> None:
    argv = [rig.venv.python, "-m", "tests.support.fakeupdater", "serve-fake", "--idle-timeout", "0.5"]
    with ServiceProcess(argv, rig.bus, cwd=rig.venv.src, log_name="idle.log") as process:
        assert rig.ctl(rig.users.outsider, "status").returncode == 0
        assert process.process.wait(30) == 0
        assert not name_has_owner(rig.bus.address, BUS_NAME)


def test_a_terminal_user_gets_a_polkit_password_prompt(rig: Rig, device: Device, service: ServiceProcess) -> None:
    """With a terminal, abflasherctl starts pkttyagent (as fwupdmgr does), so polkit can ask the outsider for an
    administrator's password instead of refusing outright."""
    command = f"{rig.venv.ctl} mark-good"
    done = subprocess.run(
        ["runuser", "-u", rig.users.outsider, "--", "env", "-i", f"DBUS_SYSTEM_BUS_ADDRESS={rig.bus.address}",
         "TERM=dumb", "script", "-qec", command, "/dev/null"],
        input=b"\n\n\n", capture_output=True, timeout=120, check=False,
    )
    output = done.stdout.decode(errors="replace")
    assert "AUTHENTICATING FOR org.abflasher.manage-boot" in output, output
    assert done.returncode != 0
    assert not device.pi.reboots()
