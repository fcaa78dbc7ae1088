"""The service's D-Bus API, in-process on a private bus with python-dbusmock's polkitd template and a fake engine.

Fast unit-level cases; tests/integration/test_service_bus.py shows the same against a real system-type dbus-daemon,
the real polkitd and real users.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from dbus_next.constants import MessageType
from dbus_next.signature import Variant

from abflasher import errors
from abflasher.image.pipeline import Progress
from abflasher.service.contract import (
    ACTION_DOWNGRADE,
    ACTION_MANAGE_BOOT,
    ACTION_UPDATE,
    ACTION_UPDATE_FROM_SOURCE,
)
from abflasher.service.dbus_adapter import INTERNAL_ERROR_MESSAGE, method_names
from abflasher.service.interface import METHOD_ACTIONS, READ_ONLY_METHODS, UpdaterInterface
from abflasher.service.progress import ProgressThrottle, progress_tuple
from tests.support.bus import INTERFACE, MIB, REPO
from tests.support.fakeupdater import FakeUpdater
from tests.support.inprocess import InProcessService, error_of, ok, open_fd_count
from tests.support.polkit import DbusmockPolkit

pytestmark = pytest.mark.timeout(60)

ERR = "org.abflasher.Updater1.Error."
ALL_ACTIONS = [ACTION_UPDATE, ACTION_UPDATE_FROM_SOURCE, ACTION_DOWNGRADE, ACTION_MANAGE_BOOT]


def run(coro: Coroutine[Any, Any, Any], timeout: float = 45.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def allow(polkit: DbusmockPolkit, *actions: str) -> None:
    run(polkit.set_allowed(list(actions)))


# ---------------------------------------------------------------------------------------------------------------------
# The interface as published


def _interface_shape(xml: str) -> dict[str, Any]:
    root = ET.fromstring(xml)
    (iface,) = [i for i in root.iter("interface") if i.get("name") == INTERFACE]
    return {
        "methods": {
            m.get("name"): [(a.get("name"), a.get("type"), a.get("direction", "in")) for a in m.iter("arg")]
            for m in iface.iter("method")
        },
        "signals": {
            s.get("name"): [(a.get("name"), a.get("type")) for a in s.iter("arg")] for s in iface.iter("signal")
        },
        "properties": {p.get("name"): (p.get("type"), p.get("access")) for p in iface.iter("property")},
    }


def test_the_introspection_xml_matches_the_live_service(address: str) -> None:
    async def scenario() -> str:
        async with InProcessService(address, FakeUpdater()) as service:
            reply = await service.call("Introspect", interface="org.freedesktop.DBus.Introspectable")
            return str(ok(reply)[0])

    live = _interface_shape(run(scenario()))
    shipped = _interface_shape((REPO / "dbus" / "org.abflasher.Updater1.xml").read_text())
    assert live == shipped


def test_every_method_is_either_read_only_or_guarded_by_a_polkit_action() -> None:
    names = set(method_names(UpdaterInterface(FakeUpdater(), authorizer=None)))  # type: ignore[arg-type]
    unlisted = names - READ_ONLY_METHODS - set(METHOD_ACTIONS)
    assert not unlisted, f"methods neither read-only nor guarded: {sorted(unlisted)}"
    assert not READ_ONLY_METHODS & set(METHOD_ACTIONS)
    assert set(METHOD_ACTIONS) | READ_ONLY_METHODS == names, "the tables name methods the interface does not have"


_DUMMY_ARGS: dict[str, Any] = {"s": "1.2.3", "a{sv}": {}, "b": False, "u": 0, "t": 0}
_MUTATING_ENGINE_CALLS = {"prepare", "run", "mark_good", "mark_bad", "rollback", "reboot"}


def test_every_non_read_only_method_is_refused_without_authorization(address: str, polkit: DbusmockPolkit) -> None:
    """Driven by the live introspection: a method added without a guard (and not listed read-only) fails here."""
    updater = FakeUpdater()

    async def scenario() -> dict[str, tuple[str, str]]:
        async with InProcessService(address, updater) as service:
            xml = str(ok(await service.call("Introspect", interface="org.freedesktop.DBus.Introspectable"))[0])
            results = {}
            for name, args in _interface_shape(xml)["methods"].items():
                if name in READ_ONLY_METHODS:
                    continue
                in_types = [t for _n, t, d in args if d == "in"]
                fds: list[int] = []
                body = []
                for t in in_types:
                    if t == "h":
                        read_end, write_end = os.pipe()
                        os.close(write_end)
                        fds.append(read_end)
                        body.append(len(fds) - 1)
                    else:
                        body.append(_DUMMY_ARGS[t])
                try:
                    reply = await service.call(name, "".join(in_types), body, fds=fds)
                finally:
                    for fd in fds:
                        os.close(fd)
                results[name] = error_of(reply)
            return results

    results = run(scenario())
    assert set(results) == set(METHOD_ACTIONS)
    for name, (error_name, message) in results.items():
        assert error_name == ERR + "NotAuthorized", (name, error_name, message)
        assert "abflasher group" in message
    assert not {call for call, _ in updater.calls} & _MUTATING_ENGINE_CALLS


def test_reading_needs_no_authorization(address: str, polkit: DbusmockPolkit) -> None:
    async def scenario() -> tuple[Any, Any, Any]:
        async with InProcessService(address, FakeUpdater()) as service:
            slots = ok(await service.call("GetSlots"))[0]
            check = ok(await service.call("Check"))[0]
            props = ok(await service.call("GetAll", "s", [INTERFACE], interface="org.freedesktop.DBus.Properties"))[0]
            return slots, check, props

    slots, check, props = run(scenario())
    assert [s["name"].value for s in slots] == ["a", "b"]
    assert slots[0]["booted"].value is True
    assert slots[0]["version"].value == "1.0"
    assert set(slots[0]) == {"name", "role", "device", "partuuid", "size", "version", "booted", "primary", "state",
                             "installed"}
    assert check["update-available"].value is True
    assert check["available"].value == "9.9"
    assert {k: v.value for k, v in props.items()} == {
        "State": "idle", "Progress": ["", 0, 0, 0], "LastError": "", "BootedSlot": "a", "PrimarySlot": "a",
        "BootedVersion": "1.0", "TrialActive": False, "AutoUpdate": "", "Transferred": [0, 0],
    }


def test_each_method_asks_for_its_own_action(address: str, polkit: DbusmockPolkit) -> None:
    updater = FakeUpdater()
    updater.trial = True

    async def scenario() -> dict[str, str]:
        async with InProcessService(address, updater) as service:
            outcome = {}
            await polkit.set_allowed([ACTION_MANAGE_BOOT])
            outcome["update with manage-boot"] = error_of(await service.call("Update", "sa{sv}", ["2.0", {}]))[0]
            ok(await service.call("MarkGood"))
            outcome["mark-good with manage-boot"] = "ok"
            await polkit.set_allowed([ACTION_UPDATE])
            outcome["reboot with update"] = error_of(await service.call("Reboot", "s", ["normal"]))[0]
            reply = await service.call("Update", "sa{sv}", ["0.5", {"allow-downgrade": Variant("b", True)}])
            outcome["downgrade with update"] = error_of(reply)[0]
            await polkit.set_allowed([ACTION_UPDATE, ACTION_DOWNGRADE])
            job = ok(await service.call("Update", "sa{sv}", ["0.5", {"allow-downgrade": Variant("b", True)}]))[0]
            completed = await service.wait_completed(job)
            outcome["downgrade with update+downgrade"] = "ok" if completed.body[1] else completed.body[2]
            return outcome

    assert run(scenario()) == {
        "update with manage-boot": ERR + "NotAuthorized",
        "mark-good with manage-boot": "ok",
        "reboot with update": ERR + "NotAuthorized",
        "downgrade with update": ERR + "NotAuthorized",
        "downgrade with update+downgrade": "ok",
    }


# ---------------------------------------------------------------------------------------------------------------------
# Jobs


def _progress_of(service: InProcessService, job: str) -> list[tuple[str, int, int, int]]:
    return [tuple(m.body[1:]) for m in service.of("Progress") if m.body[0] == job]  # type: ignore[misc]


def test_an_update_reports_progress_in_order_and_completes(address: str, polkit: DbusmockPolkit) -> None:
    allow(polkit, ACTION_UPDATE)
    updater = FakeUpdater(image_size=8 * MIB, chunk=64 * 1024, chunk_delay=0.004)  # ~0.5 s, 128 reports

    async def scenario() -> tuple[InProcessService, str, float, list[Any], list[str]]:
        async with InProcessService(address, updater) as service:
            started = time.monotonic()
            job = ok(await service.call("Update", "sa{sv}", ["2.0", {}]))[0]
            completed = await service.wait_completed(job)
            elapsed = time.monotonic() - started
            slots = ok(await service.call("GetSlots"))[0]
            states = [
                m.body[1]["State"].value for m in service.of("PropertiesChanged", "org.freedesktop.DBus.Properties")
                if "State" in m.body[1]
            ]
            assert completed.body[1:] == [True, "", "installed 2.0 into slot b; reboot to try it"]
            return service, job, elapsed, slots, states

    service, job, elapsed, slots, states = run(scenario())
    assert job == "1"
    progress = _progress_of(service, job)
    stages = [p[0] for p in progress]
    assert stages == sorted(stages, key=["writing", "verifying"].index), "stages out of order"
    for stage in ("writing", "verifying"):
        done = [p[2] for p in progress if p[0] == stage]
        assert done == sorted(done), f"{stage}: bytes went backwards"
        assert done[-1] == 8 * MIB, f"{stage} did not end at the image size"
    assert progress[-1] == ("verifying", 100, 8 * MIB, 8 * MIB)
    # ~10 per second, plus the first and last report of each stage
    assert len(progress) <= elapsed * 10 + 6, (len(progress), elapsed)
    assert states == ["preparing", "writing", "verifying", "ready-to-reboot"]
    b = next(s for s in slots if s["name"].value == "b")
    assert b["version"].value == "2.0"
    assert b["state"].value == "trial"
    assert b["installed"].value["version"].value == "2.0"
    # the Completed signal comes after the last Progress signal
    members = [m.member for m in service.signals if m.interface == INTERFACE]
    assert members[-1] == "Completed"


def test_a_second_request_while_a_job_runs_gets_busy_and_cancel_leaves_the_slot_incomplete(
    address: str, polkit: DbusmockPolkit
) -> None:
    allow(polkit, ACTION_UPDATE, ACTION_MANAGE_BOOT)
    hold = threading.Event()
    updater = FakeUpdater(hold=hold)

    async def scenario() -> None:
        async with InProcessService(address, updater) as service:
            job = ok(await service.call("Update", "sa{sv}", ["2.0", {}]))[0]
            for member, signature, body in (("Update", "sa{sv}", ["2.1", {}]), ("MarkGood", "", []),
                                            ("Reboot", "s", ["trial"]), ("Rollback", "", [])):
                name, message = error_of(await service.call(member, signature, body))
                assert name == ERR + "Busy", (member, name, message)
                assert f"job {job}" in message
                assert "abflasherctl cancel" in message
            assert error_of(await service.call("Cancel", "s", ["99"]))[0] == ERR + "InvalidArgument"
            ok(await service.call("Cancel", "s", [job]))
            # Cancel returns once the engine stopped: Completed is already there
            completed = [m for m in service.of("Completed") if m.body[0] == job]
            assert completed
            assert completed[0].body[1:3] == [False, ERR + "Cancelled"]
            slots = ok(await service.call("GetSlots"))[0]
            assert next(s for s in slots if s["name"].value == "b")["state"].value == "incomplete"
            state = ok(await service.call("Get", "ss", [INTERFACE, "State"],
                                          interface="org.freedesktop.DBus.Properties"))[0]
            assert state.value == "idle"
            # free again
            job2 = ok(await service.call("Update", "sa{sv}", ["2.1", {}]))[0]
            hold.set()
            assert (await service.wait_completed(job2)).body[1] is True
            assert job2 == str(int(job) + 1)

    run(scenario())


def test_cancel_without_a_job_says_so(address: str, polkit: DbusmockPolkit) -> None:
    allow(polkit, ACTION_UPDATE)

    async def scenario() -> tuple[str, str]:
        async with InProcessService(address, FakeUpdater()) as service:
            return error_of(await service.call("Cancel", "s", [""]))

    name, message = run(scenario())
    assert name == ERR + "InvalidArgument"
    assert "no update is running" in message


def test_engine_errors_keep_their_dbus_names(address: str, polkit: DbusmockPolkit) -> None:
    allow(polkit, ACTION_UPDATE, ACTION_MANAGE_BOOT)

    async def scenario() -> list[str]:
        async with InProcessService(address, FakeUpdater()) as service:
            return [
                error_of(await service.call("Update", "sa{sv}", ["1.0", {}]))[0],
                error_of(await service.call("Update", "sa{sv}", ["0.9", {}]))[0],
                error_of(await service.call("MarkGood"))[0],
                error_of(await service.call("Reboot", "s", ["sideways"]))[0],
                error_of(await service.call("Update", "sa{sv}", ["2.0", {"colour": Variant("s", "red")}]))[0],
                error_of(await service.call("Update", "sa{sv}", ["2.0", {"reboot": Variant("s", "yes")}]))[0],
            ]

    assert run(scenario()) == [ERR + n for n in ("UpToDate", "Downgrade", "NoTrial", "InvalidArgument",
                                                  "InvalidArgument", "InvalidArgument")]


def test_an_unexpected_exception_is_logged_and_sent_as_internal_without_details(
    address: str, polkit: DbusmockPolkit, caplog: pytest.LogCaptureFixture
) -> None:
    allow(polkit, ACTION_UPDATE)

    class ExplodingRun(FakeUpdater):
        def run(self, *args: Any) -> Any:
            raise KeyError("secret internals in run")

    async def scenario() -> tuple[tuple[str, str], list[Any]]:
        async with InProcessService(address, ExplodingRun()) as service:
            refused = error_of(await service.call("Update", "sa{sv}", ["explode", {}]))
            job = ok(await service.call("Update", "sa{sv}", ["2.0", {}]))[0]
            completed = await service.wait_completed(job)
            return refused, completed.body

    with caplog.at_level(logging.ERROR):
        (name, message), completed = run(scenario())
    assert name == ERR + "Internal"
    assert message == INTERNAL_ERROR_MESSAGE
    assert completed[1:] == [False, ERR + "Internal", INTERNAL_ERROR_MESSAGE]
    logged = [r for r in caplog.records if r.exc_info]
    assert any("secret internals: /etc/shadow" in str(r.exc_info[1]) for r in logged)  # type: ignore[index]
    assert any("secret internals in run" in str(r.exc_info[1]) for r in logged)  # type: ignore[index]


def test_many_readers_are_answered_while_an_update_runs(address: str, polkit: DbusmockPolkit) -> None:
    allow(polkit, ACTION_UPDATE)
    hold = threading.Event()
    updater = FakeUpdater(hold=hold)

    async def scenario() -> None:
        async with InProcessService(address, updater) as service:
            job = ok(await service.call("Update", "sa{sv}", ["2.0", {}]))[0]
            readers = [await service.connect_client() for _ in range(20)]
            try:
                replies = await asyncio.gather(*(service.call("GetSlots", bus=bus) for bus in readers))
            finally:
                for bus in readers:
                    bus.disconnect()
            assert all(r.message_type == MessageType.METHOD_RETURN for r in replies)
            hold.set()
            assert (await service.wait_completed(job)).body[1] is True

    run(scenario())


def test_shutdown_cancels_the_running_job(address: str, polkit: DbusmockPolkit) -> None:
    allow(polkit, ACTION_UPDATE)
    updater = FakeUpdater(hold=threading.Event())

    async def scenario() -> None:
        async with InProcessService(address, updater) as service:
            job = ok(await service.call("Update", "sa{sv}", ["2.0", {}]))[0]
            await service.interface.shutdown(10.0)
            completed = await service.wait_completed(job)
            assert completed.body[1:3] == [False, ERR + "Cancelled"]
            assert updater.slots["b"].state == "incomplete"

    run(scenario())


# ---------------------------------------------------------------------------------------------------------------------
# UpdateFromFd


def _feed(fd: int, data: bytes, *, stop_after: int | None = None) -> threading.Thread:
    def write() -> None:
        try:
            view = memoryview(data)[: stop_after if stop_after is not None else len(data)]
            while view:
                written = os.write(fd, view[: 65536])
                view = view[written:]
        finally:
            os.close(fd)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def test_update_from_a_pipe_streams_it(address: str, polkit: DbusmockPolkit) -> None:
    allow(polkit, ACTION_UPDATE, ACTION_UPDATE_FROM_SOURCE)
    updater = FakeUpdater()
    data = os.urandom(3 * MIB + 123)
    baseline = open_fd_count()

    async def scenario() -> Any:
        async with InProcessService(address, updater) as service:
            read_end, write_end = os.pipe()
            try:
                reply = await service.call("UpdateFromFd", "ha{sv}",
                                           [0, {"version": Variant("s", "3.0"), "size": Variant("t", len(data))}],
                                           fds=[read_end])
            finally:
                os.close(read_end)
            job = ok(reply)[0]
            writer = _feed(write_end, data)
            completed = await service.wait_completed(job)
            writer.join(10)
            return completed.body, _progress_of(service, job)

    body, progress = run(scenario())
    assert body[1] is True, body
    import hashlib

    assert updater.slots["b"].installed["sha256"] == hashlib.sha256(data).hexdigest()
    assert updater.slots["b"].version == "3.0"
    assert [p for p in progress if p[0] == "writing"][-1] == ("writing", 100, len(data), len(data))
    assert open_fd_count() == baseline, "an fd leaked"


def test_a_pipe_that_breaks_mid_stream_fails_the_job_cleanly(address: str, polkit: DbusmockPolkit) -> None:
    allow(polkit, ACTION_UPDATE, ACTION_UPDATE_FROM_SOURCE)
    updater = FakeUpdater()
    data = os.urandom(2 * MIB)
    baseline = open_fd_count()

    async def scenario() -> Any:
        async with InProcessService(address, updater) as service:
            read_end, write_end = os.pipe()
            reply = await service.call("UpdateFromFd", "ha{sv}", [0, {"size": Variant("t", len(data))}],
                                       fds=[read_end])
            os.close(read_end)
            job = ok(reply)[0]
            _feed(write_end, data, stop_after=MIB).join(10)
            completed = await service.wait_completed(job)
            state = ok(await service.call("GetAll", "s", [INTERFACE], interface="org.freedesktop.DBus.Properties"))
            return completed.body, state[0]

    body, props = run(scenario())
    assert body[1:3] == [False, ERR + "BadImage"]
    assert "truncated" in body[3]
    assert props["State"].value == "failed"
    assert "truncated" in props["LastError"].value
    assert updater.slots["b"].state == "incomplete"
    assert open_fd_count() == baseline


def test_update_from_fd_refuses_what_is_not_a_readable_file_or_pipe(
    address: str, polkit: DbusmockPolkit, tmp_path: Path
) -> None:
    allow(polkit, ACTION_UPDATE, ACTION_UPDATE_FROM_SOURCE)
    image = tmp_path / "image"
    image.write_bytes(b"x" * 4096)
    baseline = open_fd_count()

    async def scenario() -> list[tuple[str, str]]:
        async with InProcessService(address, FakeUpdater()) as service:
            results = []
            for opener in (lambda: os.open(tmp_path, os.O_RDONLY), lambda: os.open(image, os.O_WRONLY),
                           lambda: os.open("/dev/null", os.O_RDONLY)):
                fd = opener()
                try:
                    results.append(error_of(await service.call("UpdateFromFd", "ha{sv}", [0, {}], fds=[fd])))
                finally:
                    os.close(fd)
            return results

    results = run(scenario())
    assert [name for name, _ in results] == [ERR + "InvalidArgument"] * 3
    assert "not a directory" in results[0][1]
    assert "for writing only" in results[1][1]
    assert "not a device" in results[2][1]
    assert open_fd_count() == baseline


def test_update_from_a_regular_file_gets_its_size_from_the_fd(
    address: str, polkit: DbusmockPolkit, tmp_path: Path
) -> None:
    allow(polkit, ACTION_UPDATE, ACTION_UPDATE_FROM_SOURCE)
    updater = FakeUpdater()
    image = tmp_path / "image"
    image.write_bytes(os.urandom(MIB))

    async def scenario() -> Any:
        async with InProcessService(address, updater) as service:
            fd = os.open(image, os.O_RDONLY)
            try:
                job = ok(await service.call("UpdateFromFd", "ha{sv}", [0, {}], fds=[fd]))[0]
            finally:
                os.close(fd)
            return (await service.wait_completed(job)).body

    assert run(scenario())[1] is True
    run_request = next(arg for call, arg in updater.calls if call == "run").request
    assert run_request.size == MIB


def test_fds_attached_to_other_calls_are_closed(address: str, polkit: DbusmockPolkit) -> None:
    baseline = open_fd_count()

    async def scenario() -> None:
        async with InProcessService(address, FakeUpdater()) as service:
            for _ in range(5):
                read_end, write_end = os.pipe()
                try:
                    ok(await service.call("GetSlots", fds=[read_end, write_end]))
                    error_of(await service.call("Update", "sa{sv}", ["2.0", {}], fds=[read_end]))
                finally:
                    os.close(read_end)
                    os.close(write_end)

    run(scenario())
    assert open_fd_count() == baseline


# ---------------------------------------------------------------------------------------------------------------------
# Progress throttling on its own


def test_the_throttle_delivers_few_reports_and_the_last_of_each_stage() -> None:
    async def scenario() -> tuple[list[Progress], float]:
        loop = asyncio.get_running_loop()
        delivered: list[Progress] = []
        throttle = ProgressThrottle(loop, delivered.append, interval=0.1)
        finished = asyncio.Event()

        def engine() -> None:
            for stage, count in (("writing", 20000), ("verifying", 5000)):
                for i in range(1, count + 1):
                    throttle.report(Progress(stage, i, count, i))
                    if i % 1000 == 0:
                        time.sleep(0.01)
            loop.call_soon_threadsafe(finished.set)

        started = time.monotonic()
        threading.Thread(target=engine, daemon=True).start()
        await finished.wait()
        throttle.flush()
        throttle.report(Progress("late", 1, 1, 1))  # after flush: ignored
        await asyncio.sleep(0)
        return delivered, time.monotonic() - started

    delivered, elapsed = run(scenario())
    assert len(delivered) <= elapsed * 10 + 4
    assert [p for p in delivered if p.stage == "writing"][-1].done == 20000
    assert delivered[-1] == Progress("verifying", 5000, 5000, 5000)
    assert "late" not in {p.stage for p in delivered}


def test_the_throttle_never_lets_bytes_go_backwards_within_a_stage() -> None:
    async def scenario() -> list[Progress]:
        delivered: list[Progress] = []
        throttle = ProgressThrottle(asyncio.get_running_loop(), delivered.append, interval=0.0)
        for done in (10, 30, 20, 40):
            throttle.report(Progress("writing", done, 100, done))
            await asyncio.sleep(0.01)
        throttle.flush()
        return delivered

    assert [p.done for p in run(scenario())] == [10, 30, 40]


def test_error_names_in_the_engine_hierarchy_are_valid_dbus_names() -> None:
    from dbus_next.validators import is_interface_name_valid

    for cls in errors.ALL_ERRORS:
        assert is_interface_name_valid(cls.dbus_error_name()), cls


def test_stages_without_a_count_report_the_bytes_written_so_far() -> None:
    assert progress_tuple(Progress("preparing", 0, None, 0)) == ["preparing", 0, 0, 0]
    assert progress_tuple(Progress("writing", 50, 200, 120)) == ["writing", 25, 50, 200]
    assert progress_tuple(Progress("configuring", 0, None, 4096)) == ["configuring", 100, 4096, 4096]


def test_a_refused_request_leaves_state_and_progress_as_they_were(address: str, polkit: DbusmockPolkit) -> None:
    allow(polkit, ACTION_UPDATE)

    async def scenario() -> list[Any]:
        async with InProcessService(address, FakeUpdater()) as service:
            error_of(await service.call("Update", "sa{sv}", ["1.0", {}]))
            props = ok(await service.call("GetAll", "s", [INTERFACE], interface="org.freedesktop.DBus.Properties"))
            return [props[0]["State"].value, props[0]["Progress"].value]

    assert run(scenario()) == ["idle", ["", 0, 0, 0]]


class _TransferringUpdater(FakeUpdater):
    """Reports bytes received as a delta update does: half of the bytes it builds."""

    def run(self, prepared: Any, progress: Any, cancel: Any) -> Any:
        return super().run(prepared, lambda p: progress(dataclasses.replace(p, downloaded=p.done // 2)), cancel)


def test_the_transferred_property_reports_bytes_downloaded_and_written(address: str, polkit: DbusmockPolkit) -> None:
    allow(polkit, ACTION_UPDATE)
    updater = _TransferringUpdater(image_size=MIB, chunk=64 * 1024)

    async def scenario() -> tuple[list[Any], list[Any]]:
        async with InProcessService(address, updater) as service:
            for _ in range(2):
                job = ok(await service.call("Update", "sa{sv}", ["2.0", {}]))[0]
                await service.wait_completed(job)
            props = ok(await service.call("GetAll", "s", [INTERFACE], interface="org.freedesktop.DBus.Properties"))[0]
            changes = [m.body[1]["Transferred"].value
                       for m in service.of("PropertiesChanged", "org.freedesktop.DBus.Properties")
                       if "Transferred" in m.body[1]]
            return props["Transferred"].value, changes

    final, changes = run(scenario())
    assert final == [MIB // 2, MIB], "the last report: half downloaded, all written"
    assert changes[-1] == final
    restart = changes.index([0, 0])
    assert changes[restart - 1] == final, "the second job starts from zero"
    for job in (changes[:restart], changes[restart:]):
        assert all(a[0] <= b[0] for a, b in itertools.pairwise(job)), "downloaded only grows within a job"
