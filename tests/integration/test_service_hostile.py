"""The root service under hostile and stalled callers, through the real bus, the real polkitd and the real engine:
a Cancel that stops a job whatever its source does, an upload that went silent, secrets in a URL, a flood of
Check() calls, property writes, a huge version, and the group's limits."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import MessageType
from dbus_next.message import Message

from tests.support.bus import BUS_NAME, INTERFACE, OBJECT_PATH, stop_process, wait_until
from tests.support.service_rig import (
    ERR,
    Device,
    Rig,
    call_as,
    json_lines,
    serve_image,
    simulated_device,
    slot_of,
    status_of,
)
from tests.support.serviceprocess import ServiceProcess
from tests.support.signals import SignalRecorder
from tests.support.users import TestUsers

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

#: A cancelled job must have ended by then: the engine stops within a fraction of a second, the service's Cancel
#: itself gives up (with an error) after 30 s, and the old engine did not stop before its source let go.
CANCEL_WITHIN = 15.0
PASSWORD = "PASS-5ecret"
TOKEN = "TOK-5ecret"


@pytest.fixture
def device(rig: Rig, tmp_path: Path) -> Iterator[Device]:
    yield from simulated_device(rig, tmp_path, upload_idle_timeout=3.0)


@pytest.fixture
def service(rig: Rig, device: Device) -> Iterator[ServiceProcess]:
    with ServiceProcess([rig.venv.daemon, "--config", device.config_path], rig.bus) as process:
        yield process


def _upload_from(rig: Rig, user: str, stdin: int, *args: str) -> subprocess.Popen[bytes]:
    """``abflasherctl --json update --file - ARGS`` as ``user``, its standard input the given fd."""
    return subprocess.Popen(
        ["runuser", "-u", user, "--", "env", "-i", f"DBUS_SYSTEM_BUS_ADDRESS={rig.bus.address}",
         str(rig.venv.ctl), "--json", "update", "--file", "-", *args],
        stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _assert_free_again(rig: Rig) -> None:
    again = rig.ctl(rig.users.member, "--json", "update", "1.1.0")
    assert again.returncode == 0, again.stderr.decode()


# ---------------------------------------------------------------------------------------------------------------------
# Cancel


def test_cancel_stops_a_download_from_a_crawling_server(rig: Rig, device: Device, service: ServiceProcess) -> None:
    """About 4 KiB/s: no read timeout ever fires, and a 256 KiB read would take a minute."""
    member = rig.users.member
    serve_image(device.server, "/crawl/root-1.2.0.img", rig.images["1.2.0"], piece_size=4096, piece_delay=1.0)
    with SignalRecorder(rig.bus.address) as recorder:
        started = rig.ctl(member, "--json", "update", "1.2.0", "--url", device.url("/crawl/root-1.2.0.img"),
                          "--detach")
        assert started.returncode == 0, started.stderr.decode()
        job = json_lines(started.stdout)[0]["job"]
        wait_until(lambda: device.server.count("/crawl/root-1.2.0.img") > 0, timeout=60, what="the download")
        cancel = rig.ctl(member, "cancel", timeout=CANCEL_WITHIN)
        assert cancel.returncode == 0, cancel.stderr.decode()
        completed = recorder.wait_for(lambda m: m.member == "Completed", CANCEL_WITHIN, "Completed")
    assert completed.body[:3] == [job, False, ERR + "Cancelled"]
    status = status_of(rig, member)
    assert status["state"] == "idle"
    assert slot_of(status, "b")["state"] == "incomplete"
    _assert_free_again(rig)


def test_cancel_stops_an_upload_from_a_pipe_that_sends_nothing(
    rig: Rig, device: Device, service: ServiceProcess
) -> None:
    """The uploader keeps its end open and sends nothing: not even the first bytes (the format detection)."""
    member = rig.users.member
    read_end, write_end = os.pipe()
    with SignalRecorder(rig.bus.address) as recorder:
        client = _upload_from(rig, member, read_end, "1.1.0")
        os.close(read_end)
        try:
            recorder.wait_for(lambda m: m.member == "Progress" and m.body[1] == "preparing", 60, "the job")
            cancel = rig.ctl(member, "cancel", timeout=CANCEL_WITHIN)
            assert cancel.returncode == 0, cancel.stderr.decode()
            stdout, stderr = client.communicate(timeout=CANCEL_WITHIN)
        finally:
            stop_process(client)
            os.close(write_end)
    assert client.returncode == 14, stderr.decode()
    completed = next(e for e in json_lines(stdout) if e["event"] == "completed")
    assert completed["error"] == ERR + "Cancelled"
    # Not a byte arrived: the update never got to tell a bundle from an image (abflasher/trust/), so it never touched
    # the target either.
    assert slot_of(status_of(rig, member), "b")["state"] == "unknown"
    _assert_free_again(rig)


def test_an_uploader_that_went_silent_is_given_up_after_the_idle_timeout(
    rig: Rig, device: Device, service: ServiceProcess
) -> None:
    """upload_idle_timeout = 3 in this device's configuration; nobody cancels."""
    member = rig.users.member
    image = rig.images["1.1.0.gz"].read_bytes()
    read_end, write_end = os.pipe()
    client = _upload_from(rig, member, read_end, "1.1.0")
    os.close(read_end)
    try:
        os.write(write_end, image[:60_000])  # some of it, then nothing
        stdout, stderr = client.communicate(timeout=120)
    finally:
        stop_process(client)
        os.close(write_end)
    assert client.returncode == 14, stderr.decode()
    completed = next(e for e in json_lines(stdout) if e["event"] == "completed")
    assert completed["error"] == ERR + "Cancelled"
    assert "no data from uploaded image for 3 s" in completed["message"]
    status = status_of(rig, member)
    assert slot_of(status, "b")["state"] == "incomplete"
    assert status["state"] == "idle"
    _assert_free_again(rig)


# ---------------------------------------------------------------------------------------------------------------------
# Secrets


def test_credentials_and_tokens_in_a_url_appear_nowhere(rig: Rig, device: Device, service: ServiceProcess) -> None:
    member, outsider = rig.users.member, rig.users.outsider
    sha = hashlib.sha256(rig.images["1.1.0"].read_bytes()).hexdigest()

    def secret(path: str) -> str:
        return device.url(path).replace("http://", f"http://abft:{PASSWORD}@") + f"?token={TOKEN}"

    seen: list[str] = []
    with SignalRecorder(rig.bus.address) as recorder:
        # The first request fails (404): an error, and a failed install recorded.
        missing = rig.ctl(member, "--json", "update", "1.1.0", "--url", secret("/missing.img"), "--sha256", sha)
        assert missing.returncode == 8, missing.stderr.decode()
        seen += [missing.stdout.decode(), missing.stderr.decode()]
        failed = status_of(rig, outsider)
        assert slot_of(failed, "b")["installed"]["result"].startswith("failed"), slot_of(failed, "b")
        seen += [repr(failed)]
        # Then one that works.
        done = rig.ctl(member, "--json", "update", "1.1.0", "--url", secret("/root-1.1.0.img"), "--sha256", sha)
        assert done.returncode == 0, done.stderr.decode()
        seen += [done.stdout.decode(), done.stderr.decode()]
        recorder.wait_for(lambda m: m.member == "Completed" and m.body[1], 10, "Completed")
        seen += [repr(m.body) for m in recorder.messages()]
    installed = status_of(rig, outsider)
    assert slot_of(installed, "b")["installed"]["source"] == device.url("/root-1.1.0.img")
    seen += [repr(installed)]

    state_file = device.pi.config.state_file
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    seen += [state_file.read_text(), service.log_text()]
    assert all(PASSWORD not in text and TOKEN not in text for text in seen), [
        text for text in seen if PASSWORD in text or TOKEN in text
    ]
    # the server did get the credentials: they were only kept out of everything else
    assert any(record.headers.get("Authorization", "").startswith("Basic ") for record in device.server.requests)


# ---------------------------------------------------------------------------------------------------------------------
# Floods and malformed calls


async def _checks_at_once(address: str, callers: int, pid: int) -> tuple[int, int, list[Message]]:
    """``callers`` connections calling Check at the same time; the service's thread count before, and at most while
    they wait."""
    threads_before = len(os.listdir(f"/proc/{pid}/task"))
    buses = [await MessageBus(bus_address=address).connect() for _ in range(callers)]
    try:
        calls = [
            asyncio.ensure_future(
                bus.call(Message(destination=BUS_NAME, path=OBJECT_PATH, interface=INTERFACE, member="Check"))
            )
            for bus in buses
        ]
        most = 0
        while not all(call.done() for call in calls):
            most = max(most, len(os.listdir(f"/proc/{pid}/task")))
            await asyncio.wait(calls, timeout=0.05)
        replies = [reply for reply in await asyncio.wait_for(asyncio.gather(*calls), 60) if reply is not None]
        return threads_before, most, replies
    finally:
        for bus in buses:
            bus.disconnect()


def test_a_flood_of_checks_leaves_the_thread_count_bounded(rig: Rig, device: Device, service: ServiceProcess) -> None:
    """Check() needs no authorization: any local user may call it as often as they like."""
    device.server.add("/latest", b"1.2.0\n", stall_after=0, stall_seconds=4)  # a slow channel
    before, most, replies = asyncio.run(_checks_at_once(rig.bus.address, 60, service.pid))
    assert len(replies) == 60
    assert all(reply.message_type == MessageType.METHOD_RETURN for reply in replies), replies[0].body
    assert all(reply.body[0]["available"].value == "1.2.0" for reply in replies)
    assert most <= before + 3, f"{most - before} more threads while flooded"
    assert device.server.count("/latest") == 1


def test_a_channel_publishing_a_huge_version_is_a_clean_error(
    rig: Rig, device: Device, service: ServiceProcess
) -> None:
    device.server.add("/latest", b"9" * 5000 + b"\n")
    done = rig.ctl(rig.users.outsider, "check")
    assert done.returncode == 8, done.stderr.decode()
    assert "does not name a version" in done.stderr.decode()
    assert "9999" not in done.stderr.decode()


def test_a_megabyte_all_digit_version_is_invalid_argument(rig: Rig, device: Device, service: ServiceProcess) -> None:
    name, message = call_as(rig, rig.users.member, "Update", "sa{sv}", "['1' * (1 << 20), {}]")
    assert name == ERR + "InvalidArgument"
    assert len(message) < 200
    assert "Traceback" not in service.log_text()


def test_anyones_property_write_gets_a_clean_error_and_no_traceback(
    rig: Rig, device: Device, service: ServiceProcess
) -> None:
    for user in (rig.users.outsider, rig.users.member):
        name, _ = call_as(rig, user, "Set", "ssv", f"[{INTERFACE!r}, 'State', Variant('s', 'idle')]",
                          interface="org.freedesktop.DBus.Properties")
        assert name == "org.freedesktop.DBus.Error.PropertyReadOnly"
    assert "Traceback" not in service.log_text()


def test_an_outsider_is_refused_before_its_arguments_are_looked_at(
    rig: Rig, device: Device, service: ServiceProcess
) -> None:
    for body in ("['1.1.0', {'bogus': Variant('s', 'x')}]", "['', {}]", "['1.1.0', {'reboot': Variant('s', 'x')}]"):
        name, _ = call_as(rig, rig.users.outsider, "Update", "sa{sv}", body)
        assert name == ERR + "NotAuthorized", body


# ---------------------------------------------------------------------------------------------------------------------
# What the group may do


def test_the_group_installs_channel_versions_but_not_images_of_its_choosing(
    rig: Rig, device: Device, service: ServiceProcess
) -> None:
    """The shipped rules, without the rig's extra grant: a member of the group who is not the rig's ``member``."""
    others = TestUsers()
    try:
        plain = others.member
        from_url = rig.ctl(plain, "update", "1.1.0", "--url", device.url("/root-1.1.0.img"))
        assert from_url.returncode == 3, from_url.stderr.decode()
        assert "administrator" in from_url.stderr.decode()
        from_file = rig.ctl(plain, "update", "--file", str(rig.images["1.1.0.gz"]), "1.1.0")
        assert from_file.returncode == 3, from_file.stderr.decode()
        assert not device.server.count("/root-1.1.0.img")
        channel = rig.ctl(plain, "--json", "update", "1.1.0")
        assert channel.returncode == 0, channel.stderr.decode()
    finally:
        others.close()
