"""abflasherctl as a process, against the real service process running the fake engine on a private bus with
python-dbusmock's polkitd (no root needed). The same client against real polkitd and real users is in
tests/integration/test_service_bus.py."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_next.constants import MessageType
from dbus_next.message import Message

from abflasher import errors
from abflasher.ctl import Output, ProgressView
from abflasher.ctl_client import EXIT_UNAVAILABLE, ServiceUnavailable, error_from_reply, human_bytes
from abflasher.service.contract import ACTION_MANAGE_BOOT, ACTION_UPDATE, ACTION_UPDATE_FROM_SOURCE
from tests.support.bus import MIB, REPO, DBusDaemon, stop_process
from tests.support.polkit import DbusmockPolkit
from tests.support.serviceprocess import ServiceProcess

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def bus(bus_and_polkit: tuple[DBusDaemon, DbusmockPolkit]) -> DBusDaemon:
    return bus_and_polkit[0]


@pytest.fixture
def polkit(bus_and_polkit: tuple[DBusDaemon, DbusmockPolkit]) -> Iterator[DbusmockPolkit]:
    polkit = bus_and_polkit[1]
    asyncio.run(polkit.set_allowed([ACTION_UPDATE, ACTION_UPDATE_FROM_SOURCE, ACTION_MANAGE_BOOT]))
    yield polkit
    asyncio.run(polkit.set_allowed([]))


def start_fake(bus: DBusDaemon, *args: str) -> ServiceProcess:
    return ServiceProcess([sys.executable, "-m", "tests.support.fakeupdater", "serve-fake", *args], bus, cwd=REPO)


@pytest.fixture
def service(bus: DBusDaemon, polkit: DbusmockPolkit) -> Iterator[ServiceProcess]:
    with start_fake(bus, "--chunk-delay", "0.005") as process:
        yield process


def ctl(bus: DBusDaemon, *args: str, input_bytes: bytes | None = None, stdin: Any = None,
        timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address)
    return subprocess.run(
        [sys.executable, "-m", "abflasher.ctl", *args], env=env, cwd=REPO, capture_output=True, timeout=timeout,
        check=False, input=input_bytes.decode("latin-1") if input_bytes is not None else None, stdin=stdin,
        text=True,
    )


def lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------------


def test_status_shows_the_slot_table(bus: DBusDaemon, service: ServiceProcess) -> None:
    done = ctl(bus, "status")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "booted: slot a, version 1.0" in text
    assert "state:  idle" in text
    header, slot_a, slot_b = [line.split() for line in text.splitlines()[-3:]]
    assert header == ["SLOT", "ROLE", "VERSION", "STATE", "BOOTED", "PRIMARY", "SIZE", "DEVICE"]
    assert slot_a[:6] == ["a", "system", "1.0", "good", "yes", "yes"]
    assert slot_b[:4] == ["b", "system", "-", "unknown"]


def test_status_json(bus: DBusDaemon, service: ServiceProcess) -> None:
    done = ctl(bus, "status", "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["booted_slot"] == "a"
    assert status["state"] == "idle"
    assert status["progress"] == {"stage": "", "percent": 0, "done": 0, "total": 0}
    assert [s["name"] for s in status["slots"]] == ["a", "b"]
    assert status["slots"][0]["size"] == 64 * MIB


def test_update_prints_plain_progress_lines_when_not_on_a_terminal(bus: DBusDaemon, service: ServiceProcess) -> None:
    done = ctl(bus, "update", "2.0")
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[0] == "update job 1 started"
    writing = [line for line in out if line.startswith("writing:")]
    assert writing, out
    assert writing[-1].startswith("writing: 100%")
    assert len(writing) <= 12, "one line per 10 percent at most"
    assert out[-1] == "installed 2.0 into slot b; reboot to try it"
    assert "\r" not in done.stdout, "no progress bar when stdout is not a terminal"


def test_update_json_is_a_stream_of_events(bus: DBusDaemon, service: ServiceProcess) -> None:
    done = ctl(bus, "--json", "update", "2.0")
    assert done.returncode == 0, done.stderr
    events = lines(done.stdout)
    assert events[0] == {"event": "job", "job": "1"}
    progress = [e for e in events if e["event"] == "progress"]
    assert progress
    assert progress[-1]["done"] == progress[-1]["total"] == 4 * MIB
    assert events[-1] == {"event": "completed", "job": "1", "success": True, "error": "",
                          "message": "installed 2.0 into slot b; reboot to try it"}


def test_update_with_no_version_installs_the_channels_newest(bus: DBusDaemon, service: ServiceProcess) -> None:
    done = ctl(bus, "--json", "update")
    assert done.returncode == 0, done.stderr
    assert lines(done.stdout)[-1]["message"] == "installed 9.9 into slot b; reboot to try it"


def test_update_from_a_file_and_from_standard_input(bus: DBusDaemon, service: ServiceProcess, tmp_path: Path) -> None:
    image = tmp_path / "image.img"
    image.write_bytes(os.urandom(MIB))
    done = ctl(bus, "--json", "update", "--file", str(image), "3.0")
    assert done.returncode == 0, done.stderr
    assert lines(done.stdout)[-1]["message"] == "installed 3.0 into slot b; reboot to try it"
    with open(image, "rb") as handle:
        piped = subprocess.Popen(["cat"], stdin=handle, stdout=subprocess.PIPE)
        try:
            done = ctl(bus, "--json", "update", "--file", "-", stdin=piped.stdout)
        finally:
            assert piped.stdout is not None
            piped.stdout.close()
            stop_process(piped)
    assert done.returncode == 0, done.stderr
    assert lines(done.stdout)[-1]["success"] is True


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["update", "1.0"], 5, "version 1.0 is already running"),
        (["update", "0.5"], 6, "allow a downgrade"),
        (["mark-good"], 13, "not a trial boot"),
        (["cancel"], 2, "nothing to cancel: no update is running"),
        (["update", "--file", "/nonexistent/image"], 2, "image file /nonexistent/image does not exist"),
        (["update", "--file", "/"], 2, "is a directory"),
    ],
)
def test_errors_are_one_line_with_their_own_exit_code(
    bus: DBusDaemon, service: ServiceProcess, args: list[str], code: int, message: str
) -> None:
    done = ctl(bus, *args)
    assert done.returncode == code, done.stderr
    assert message in done.stderr
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("abflasherctl: ")
    assert "Traceback" not in done.stderr


def test_not_authorized_says_what_to_do_and_json_carries_the_error(
    bus: DBusDaemon, service: ServiceProcess, polkit: DbusmockPolkit
) -> None:
    asyncio.run(polkit.set_allowed([]))
    done = ctl(bus, "--json", "reboot", "trial")
    assert done.returncode == errors.NotAuthorized.exit_code
    assert "add yourself to the abflasher group" in done.stderr
    assert lines(done.stdout) == [{"event": "error", "error": "NotAuthorized",
                                   "message": done.stderr.removeprefix("abflasherctl: ").strip()}]


def test_without_the_service_or_the_bus_the_error_says_so(bus: DBusDaemon, polkit: DbusmockPolkit) -> None:
    done = ctl(bus, "status")
    assert done.returncode == EXIT_UNAVAILABLE
    assert "the ab-flasher service is not running" in done.stderr
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS="unix:path=/nonexistent/socket")
    done2 = subprocess.run([sys.executable, "-m", "abflasher.ctl", "status"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=60, check=False)
    assert done2.returncode == EXIT_UNAVAILABLE
    assert "cannot connect to the system bus" in done2.stderr
    assert done2.stderr.count("\n") == 1


def test_watch_with_nothing_running(bus: DBusDaemon, service: ServiceProcess) -> None:
    done = ctl(bus, "watch")
    assert done.returncode == 0
    assert done.stdout.strip() == "no update is running (state: idle)"


def test_check_reports_what_is_available(bus: DBusDaemon, service: ServiceProcess) -> None:
    done = ctl(bus, "check")
    assert done.returncode == 0
    assert done.stdout.strip() == "update available: 9.9 (running 1.0); install it: abflasherctl update 9.9"


def test_interrupting_a_followed_update_cancels_it(bus: DBusDaemon, polkit: DbusmockPolkit) -> None:
    with start_fake(bus, "--chunk-delay", "0.05", "--image-size", str(16 * MIB)) as service:
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address)
        client = subprocess.Popen([sys.executable, "-m", "abflasher.ctl", "--json", "update", "2.0"], env=env,
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert client.stdout is not None
            first = client.stdout.readline()
            assert json.loads(first)["event"] == "job"
            progress = client.stdout.readline()
            assert json.loads(progress)["event"] == "progress"
            client.send_signal(signal.SIGINT)
            rest, stderr = client.communicate(timeout=60)
        finally:
            stop_process(client)
        assert client.returncode == errors.Cancelled.exit_code, stderr
        completed = [e for e in lines(rest) if e["event"] == "completed"]
        assert completed[0]["error"] == "org.abflasher.Updater1.Error.Cancelled"
        status = json.loads(ctl(bus, "status", "--json").stdout)
        assert status["slots"][1]["state"] == "incomplete"
        assert "job 1: cancel requested" in service.log_text()


# ---------------------------------------------------------------------------------------------------------------------
# Pieces


def test_every_error_class_maps_back_to_its_own_exit_code() -> None:
    codes = set()
    for cls in errors.ALL_ERRORS:
        reply = Message(message_type=MessageType.ERROR, reply_serial=1, error_name=cls.dbus_error_name(),
                        signature="s", body=["why"])
        rebuilt = error_from_reply(reply)
        assert type(rebuilt) is cls
        assert str(rebuilt) == "why"
        codes.add(rebuilt.exit_code)
    assert len(codes) == len(errors.ALL_ERRORS)
    assert EXIT_UNAVAILABLE not in codes
    unknown = Message(message_type=MessageType.ERROR, reply_serial=1,
                      error_name="org.freedesktop.DBus.Error.ServiceUnknown", signature="s", body=["x"])
    assert isinstance(error_from_reply(unknown), ServiceUnavailable)


def test_plain_progress_prints_a_line_per_stage_and_ten_percent() -> None:
    stream = io.StringIO()
    view = ProgressView(Output(stream, as_json=False))
    for done in range(0, 1001, 5):
        view.update("1", "writing", done // 10, done * 1000, 1_000_000)
    view.update("1", "verifying", 100, 1_000_000, 1_000_000)
    view.update("1", "configuring", 100, 1_000_000, 1_000_000)
    view.close()
    printed = stream.getvalue().splitlines()
    assert printed[0] == "writing: 0% (0 B of 1.0 MB)"
    assert printed[10] == "writing: 100% (1.0 MB of 1.0 MB)"
    assert printed[11:] == ["verifying: 100% (1.0 MB of 1.0 MB)", "configuring: 100% (1.0 MB of 1.0 MB)"]


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 999, 1000, 1_234_567, 8 * 10**9)] == [
        "0 B", "999 B", "1.0 kB", "1.2 MB", "8.0 GB"]


def test_on_a_terminal_update_draws_a_progress_bar(bus: DBusDaemon, service: ServiceProcess) -> None:
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address, TERM="dumb", COLUMNS="100")
    command = f"{sys.executable} -m abflasher.ctl --no-ask-password update 2.0"
    done = subprocess.run(["script", "-qec", command, "/dev/null"], env=env, cwd=REPO, capture_output=True,
                          timeout=60, check=False, stdin=subprocess.DEVNULL)
    output = done.stdout.decode(errors="replace")
    assert done.returncode == 0, output
    assert "\r" in output
    assert "writing: 100%" in output, output
    assert "4.19M/4.19M" in output, "a tqdm bar counts bytes"
    assert "installed 2.0 into slot b" in output
