"""The service's API under hostile or careless callers, in-process on a private bus with python-dbusmock's polkitd
template: property writes, arguments sent without the right to act on them, the choice of image source, a job that
does not stop, a flood of Check() calls. tests/integration/test_service_hostile.py shows the same against the real
polkitd and engine."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from dbus_next.signature import Variant

from abflasher import errors
from abflasher.api import CheckResult, PreparedUpdate, UpdateOutcome
from abflasher.image.pipeline import Progress
from abflasher.service.contract import ACTION_UPDATE, ACTION_UPDATE_FROM_SOURCE, ERROR_PREFIX, PROPERTIES_INTERFACE
from abflasher.service.dbus_adapter import method_guards
from abflasher.service.interface import METHOD_ACTIONS, READ_ONLY_METHODS, UpdaterInterface
from tests.support.bus import INTERFACE
from tests.support.fakeupdater import FakeUpdater
from tests.support.inprocess import InProcessService, error_of, ok
from tests.support.polkit import DbusmockPolkit

pytestmark = pytest.mark.timeout(60)

ERR = ERROR_PREFIX
PROPERTIES = PROPERTIES_INTERFACE


def run(coro: Coroutine[Any, Any, Any], timeout: float = 45.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_every_method_declares_its_guard_and_the_tables_are_derived_from_them() -> None:
    guards = method_guards(UpdaterInterface)
    assert None not in guards.values(), [name for name, guard in guards.items() if guard is None]
    assert set(guards) == set(METHOD_ACTIONS) | READ_ONLY_METHODS
    assert {"GetSlots", "Check"} == READ_ONLY_METHODS
    update = guards["Update"]
    assert update is not None
    assert update.action_for(("1.0", {})) == ACTION_UPDATE
    assert update.action_for(("1.0", {"url": Variant("s", "http://x/y")})) == ACTION_UPDATE_FROM_SOURCE


def test_property_writes_and_bad_property_calls_get_clean_errors_and_no_traceback(
    address: str, polkit: DbusmockPolkit, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[tuple[str, str, list[Any]]] = [
        ("Set", "ssv", [INTERFACE, "State", Variant("s", "idle")]),
        ("Set", "ssv", [INTERFACE, "LastError", Variant("s", "forged")]),
        ("Set", "ssv", [INTERFACE, "NoSuchProperty", Variant("s", "x")]),
        ("Set", "ssv", ["org.example.Other", "State", Variant("s", "x")]),
        ("Get", "ss", [INTERFACE, "NoSuchProperty"]),
        ("Get", "ss", ["org.example.Other", "State"]),
        ("GetAll", "s", ["org.example.Other"]),
        ("Get", "s", [INTERFACE]),
    ]

    async def scenario() -> tuple[list[tuple[str, str]], str, dict[str, Variant]]:
        async with InProcessService(address, FakeUpdater()) as service:
            answers = [error_of(await service.call(member, signature, body, interface=PROPERTIES))
                       for member, signature, body in calls]
            state = ok(await service.call("Get", "ss", [INTERFACE, "State"], interface=PROPERTIES))[0].value
            everything = ok(await service.call("GetAll", "s", [INTERFACE], interface=PROPERTIES))[0]
            return answers, state, everything

    with caplog.at_level(logging.DEBUG):
        answers, state, everything = run(scenario())
    assert [name for name, _ in answers[:2]] == ["org.freedesktop.DBus.Error.PropertyReadOnly"] * 2
    assert all(name.startswith("org.freedesktop.DBus.Error.") for name, _ in answers)
    assert "Traceback" not in caplog.text
    assert state == "idle"
    assert everything["LastError"].value == ""


def test_update_asks_polkit_before_it_looks_at_the_arguments(
    address: str, polkit: DbusmockPolkit, tmp_path: Path
) -> None:
    """A caller without the right learns nothing about its arguments: NotAuthorized comes first."""
    updater = FakeUpdater()

    async def scenario() -> list[str]:
        async with InProcessService(address, updater) as service:
            names = [
                error_of(await service.call("Update", "sa{sv}", ["2.0", {"bogus": Variant("s", "x")}]))[0],
                error_of(await service.call("Update", "sa{sv}", ["2.0", {"reboot": Variant("s", "yes")}]))[0],
                error_of(await service.call("Update", "sa{sv}", ["", {}]))[0],
            ]
            directory = os.open(tmp_path, os.O_RDONLY)
            try:
                for options in ({}, {"bogus": Variant("s", "x")}):
                    reply = await service.call("UpdateFromFd", "ha{sv}", [0, options], fds=[directory])
                    names.append(error_of(reply)[0])
            finally:
                os.close(directory)
            return names

    assert run(scenario()) == [ERR + "NotAuthorized"] * 5
    assert not [call for call, _ in updater.calls if call == "prepare"]


def test_an_image_of_the_callers_choosing_needs_its_own_action(address: str, polkit: DbusmockPolkit) -> None:
    """Channel updates (ACTION_UPDATE) do not let a caller name a URL or hand over a file."""
    run(polkit.set_allowed([ACTION_UPDATE]))

    async def scenario() -> list[tuple[str, str]]:
        async with InProcessService(address, FakeUpdater()) as service:
            from_url = error_of(await service.call(
                "Update", "sa{sv}", ["2.0", {"url": Variant("s", "http://127.0.0.1:1/x.img")}]
            ))
            read_end, write_end = os.pipe()
            try:
                from_fd = error_of(await service.call("UpdateFromFd", "ha{sv}", [0, {}], fds=[read_end]))
            finally:
                os.close(read_end)
                os.close(write_end)
            job = ok(await service.call("Update", "sa{sv}", ["2.0", {}]))[0]
            completed = await service.wait_completed(job)
            return [from_url, from_fd, ("ok" if completed.body[1] else completed.body[2], "")]

    from_url, from_fd, channel = run(scenario())
    assert from_url[0] == from_fd[0] == ERR + "NotAuthorized"
    assert "from a URL or a file" in from_url[1]
    assert channel[0] == "ok"


class StuckUpdater(FakeUpdater):
    """An engine whose job ignores the cancel event until the test lets it go."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def run(self, prepared: PreparedUpdate, progress: Any, cancel: threading.Event) -> UpdateOutcome:
        progress(Progress("writing", 0, None, 0))
        self.release.wait(30)
        raise errors.Cancelled("the install was cancelled")


def test_a_cancel_of_a_job_that_does_not_stop_is_not_reported_as_success(
    address: str, polkit: DbusmockPolkit
) -> None:
    run(polkit.set_allowed([ACTION_UPDATE]))
    updater = StuckUpdater()

    async def scenario() -> tuple[tuple[str, str], str, str, list[Any]]:
        async with InProcessService(address, updater, cancel_timeout=0.5) as service:
            job = ok(await service.call("Update", "sa{sv}", ["2.0", {}]))[0]
            cancel = error_of(await service.call("Cancel", "s", [job]))
            still = error_of(await service.call("Update", "sa{sv}", ["2.0", {}]))[0]
            state = ok(await service.call("Get", "ss", [INTERFACE, "State"], interface=PROPERTIES))[0].value
            updater.release.set()
            completed = await service.wait_completed(job)
            return cancel, still, state, completed.body

    cancel, still, state, completed = run(scenario())
    assert cancel[0] == ERR + "Busy"
    assert "still stopping" in cancel[1]
    assert still == ERR + "Busy"
    assert state == "writing"
    assert completed[1:3] == [False, ERR + "Cancelled"]


class SlowChannelUpdater(FakeUpdater):
    """An engine whose channel check takes until the test lets it go, counting the checks and their threads."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.checks = 0
        self.running = 0
        self.most_running = 0
        self._count = threading.Lock()

    def check(self) -> CheckResult:
        with self._count:
            self.checks += 1
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            self.release.wait(30)
            return CheckResult(current="1.0", available="2.0", update_available=True)
        finally:
            with self._count:
                self.running -= 1


def test_a_flood_of_checks_shares_one_engine_call_and_is_rate_limited(address: str, polkit: DbusmockPolkit) -> None:
    updater = SlowChannelUpdater()
    callers = 40

    async def scenario() -> tuple[int, int, list[Any], Any]:
        async with InProcessService(address, updater, cancel_timeout=1.0) as service:
            baseline = threading.active_count()
            clients = [await service.connect_client() for _ in range(callers)]
            try:
                pending = [asyncio.ensure_future(service.call("Check", bus=client)) for client in clients]
                while updater.checks == 0:
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.3)  # let every call arrive while the first check is running
                threads_while_flooded = threading.active_count() - baseline
                updater.release.set()
                replies = [ok(reply)[0] for reply in await asyncio.gather(*pending)]
                # Right after it, the answer is reused rather than asked again.
                again = ok(await service.call("Check"))[0]
            finally:
                for client in clients:
                    client.disconnect()
            return threads_while_flooded, updater.checks, replies, again

    threads, checks, replies, again = run(scenario())
    assert checks == 1
    assert updater.most_running == 1
    assert threads <= 2
    assert all(reply["available"].value == "2.0" for reply in replies)
    assert again["available"].value == "2.0"
