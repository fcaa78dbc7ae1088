"""Authorization plumbing: who the caller is (the ContextVar a message handler fills), what polkit is asked, and the
shipped policy and rules files."""

from __future__ import annotations

import asyncio
import re
import xml.etree.ElementTree as ET
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_next.constants import MessageFlag, MessageType
from dbus_next.message import Message
from dbus_next.signature import Variant

from abflasher import errors
from abflasher.service.auth import POLKIT_ALLOW_USER_INTERACTION, Caller, PolkitAuthorizer
from abflasher.service.contract import (
    ACTION_DOWNGRADE,
    ACTION_MANAGE_BOOT,
    ACTION_UPDATE,
    ACTION_UPDATE_FROM_SOURCE,
)
from abflasher.service.interface import METHOD_ACTIONS
from tests.support.bus import DBusDaemon
from tests.support.fakeupdater import FakeUpdater
from tests.support.inprocess import InProcessService, error_of, ok

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]


def run(coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


class RecordingAuthorizer:
    """Grants or refuses everything, remembering who asked for what; slow enough for calls to interleave."""

    def __init__(self, allow: bool = True) -> None:
        self.allow = allow
        self.calls: list[tuple[Caller, str, bool]] = []

    async def authorize(self, caller: Caller, action: str, *, interactive: bool = False) -> None:
        await asyncio.sleep(0.02)
        self.calls.append((caller, action, interactive))
        if not self.allow:
            raise errors.NotAuthorized("no")


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with DBusDaemon.permissive(tmp_path_factory.mktemp("bus")) as bus:
        yield bus.address


def test_each_call_is_authorized_for_its_own_sender_even_when_calls_interleave(address: str) -> None:
    authorizer = RecordingAuthorizer(allow=False)

    async def scenario() -> dict[str, str]:
        async with InProcessService(address, FakeUpdater(), authorizer=authorizer) as service:
            clients = [await service.connect_client() for _ in range(8)]
            try:
                methods = ["MarkGood", "MarkBad", "Rollback", "Cancel"] * 2
                replies = await asyncio.gather(*(
                    service.call(member, "s" if member == "Cancel" else "", [""] if member == "Cancel" else [],
                                 bus=bus)
                    for member, bus in zip(methods, clients, strict=True)
                ))
                for reply in replies:
                    assert error_of(reply)[0].endswith("NotAuthorized")
                return {bus.unique_name: member for bus, member in zip(clients, methods, strict=True)}
            finally:
                for bus in clients:
                    bus.disconnect()

    expected = run(scenario())
    seen = {caller.bus_name: action for caller, action, _ in authorizer.calls}
    assert set(seen) == set(expected), "an authorization check named the wrong caller"
    for bus_name, member in expected.items():
        assert seen[bus_name] == METHOD_ACTIONS[member]


def test_the_interactive_message_flag_and_option_reach_the_authorizer(address: str) -> None:
    authorizer = RecordingAuthorizer(allow=False)

    async def scenario() -> None:
        async with InProcessService(address, FakeUpdater(), authorizer=authorizer) as service:
            await service.call("MarkGood")
            await service.call("MarkGood", flags=MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)
            await service.call("Update", "sa{sv}", ["2.0", {"interactive": Variant("b", True)}])

    run(scenario())
    flags = [(caller.interactive, interactive) for caller, _action, interactive in authorizer.calls]
    assert flags == [(False, False), (True, False), (False, True)]


def test_a_downgrade_is_authorized_for_both_actions(address: str) -> None:
    authorizer = RecordingAuthorizer(allow=True)

    async def scenario() -> None:
        async with InProcessService(address, FakeUpdater(), authorizer=authorizer) as service:
            job = ok(await service.call("Update", "sa{sv}", ["0.5", {"allow-downgrade": Variant("b", True)}]))[0]
            await service.wait_completed(job)

    run(scenario())
    assert [action for _caller, action, _ in authorizer.calls] == [ACTION_UPDATE, ACTION_DOWNGRADE]


def test_a_chunk_store_of_the_callers_choosing_needs_the_update_from_source_action(address: str) -> None:
    authorizer = RecordingAuthorizer(allow=False)

    async def scenario() -> str:
        async with InProcessService(address, FakeUpdater(), authorizer=authorizer) as service:
            reply = await service.call("Update", "sa{sv}", ["2.0", {"store": Variant("s", "https://x/s.castr")}])
            return error_of(reply)[0]

    assert run(scenario()).endswith("NotAuthorized")
    assert [action for _caller, action, _ in authorizer.calls] == [ACTION_UPDATE_FROM_SOURCE]


# ---------------------------------------------------------------------------------------------------------------------
# What PolkitAuthorizer sends


class FakePolkitBus:
    """Stands in for the service's bus connection: records the CheckAuthorization call and answers it."""

    def __init__(self, answer: Message) -> None:
        self.answer = answer
        self.sent: list[Message] = []

    async def call(self, message: Message) -> Message:
        self.sent.append(message)
        return self.answer


def _result(authorized: bool, challenge: bool) -> Message:
    return Message(message_type=MessageType.METHOD_RETURN, reply_serial=1, signature="(bba{ss})",
                   body=[[authorized, challenge, {}]])


def test_polkit_is_asked_about_the_callers_bus_name() -> None:
    bus = FakePolkitBus(_result(True, False))
    run(PolkitAuthorizer(bus).authorize(Caller(":1.42"), ACTION_UPDATE))  # type: ignore[arg-type]
    (message,) = bus.sent
    assert (message.destination, message.path, message.interface, message.member) == (
        "org.freedesktop.PolicyKit1", "/org/freedesktop/PolicyKit1/Authority",
        "org.freedesktop.PolicyKit1.Authority", "CheckAuthorization",
    )
    assert message.signature == "(sa{sv})sa{ss}us"
    subject, action, details, flags, cancellation = message.body
    assert subject[0] == "system-bus-name"
    assert subject[1] == {"name": Variant("s", ":1.42")}
    assert (action, details, flags, cancellation) == (ACTION_UPDATE, {}, 0, "")


def test_polkit_may_interact_only_when_the_caller_asked() -> None:
    for caller, option, expected in ((Caller(":1.5", interactive=True), False, POLKIT_ALLOW_USER_INTERACTION),
                                     (Caller(":1.5"), True, POLKIT_ALLOW_USER_INTERACTION),
                                     (Caller(":1.5"), False, 0)):
        bus = FakePolkitBus(_result(True, False))
        run(PolkitAuthorizer(bus).authorize(caller, ACTION_MANAGE_BOOT, interactive=option))  # type: ignore[arg-type]
        assert bus.sent[0].body[3] == expected


@pytest.mark.parametrize(
    ("answer", "caller", "action", "expected"),
    [
        (_result(False, False), Caller(":1.5"), ACTION_UPDATE, "add yourself to the abflasher group"),
        (_result(False, True), Caller(":1.5"), ACTION_MANAGE_BOOT, "run the command in a terminal to authenticate"),
        (_result(False, True), Caller(":1.5", True), ACTION_UPDATE, "authentication failed or was cancelled"),
        (_result(False, True), Caller(":1.5"), ACTION_DOWNGRADE, "downgrades need an administrator"),
        (Message(message_type=MessageType.ERROR, reply_serial=1, error_name="org.freedesktop.DBus.Error.ServiceUnknown",
                 signature="s", body=["no polkit"]), Caller(":1.5"), ACTION_UPDATE, "polkit is not available"),
        (Message(message_type=MessageType.ERROR, reply_serial=1, error_name="org.freedesktop.PolicyKit1.Error.Failed",
                 signature="s", body=["Action org.abflasher.update is not registered"]), Caller(":1.5"),
         ACTION_UPDATE, "is ab-flasher's policy installed?"),
        (_result(True, False), Caller(""), ACTION_UPDATE, "add yourself to the abflasher group"),
    ],
)
def test_refusals_fail_closed_with_a_message_that_says_what_to_do(
    answer: Message, caller: Caller, action: str, expected: str
) -> None:
    bus = FakePolkitBus(answer)
    with pytest.raises(errors.NotAuthorized, match=re.escape(expected)) as raised:
        run(PolkitAuthorizer(bus).authorize(caller, action))  # type: ignore[arg-type]
    assert "\n" not in str(raised.value)


# ---------------------------------------------------------------------------------------------------------------------
# The shipped files


def test_the_policy_declares_exactly_the_actions_the_service_checks() -> None:
    root = ET.parse(REPO / "polkit" / "org.abflasher.Updater.policy").getroot()
    actions = {a.get("id"): a for a in root.iter("action")}
    assert set(actions) == {ACTION_UPDATE, ACTION_UPDATE_FROM_SOURCE, ACTION_DOWNGRADE, ACTION_MANAGE_BOOT}
    assert set(METHOD_ACTIONS.values()) <= set(actions)
    for action in actions.values():
        defaults = action.find("defaults")
        assert defaults is not None
        assert {d.tag: d.text for d in defaults} == {
            "allow_any": "auth_admin_keep", "allow_inactive": "auth_admin_keep", "allow_active": "auth_admin_keep",
        }
        assert action.findtext("message")


def test_the_rules_grant_the_group_channel_updates_and_manage_boot_but_not_sources_or_downgrade() -> None:
    text = (REPO / "polkit" / "org.abflasher.Updater.rules").read_text()
    rules = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//"))
    granted = set(re.findall(r'action\.id == "([^"]+)"', rules))
    assert granted == {ACTION_UPDATE, ACTION_MANAGE_BOOT}
    assert 'subject.isInGroup("abflasher")' in rules
    assert ACTION_DOWNGRADE not in rules
    assert ACTION_UPDATE_FROM_SOURCE not in rules


def test_the_bus_policy_lets_only_root_own_the_name_and_anyone_call() -> None:
    root = ET.parse(REPO / "dbus" / "org.abflasher.Updater.conf").getroot()
    owners = [(p.get("user"), a.get("own")) for p in root.iter("policy") for a in p.iter("allow") if a.get("own")]
    assert owners == [("root", "org.abflasher.Updater")]
    default = [p for p in root.iter("policy") if p.get("context") == "default"]
    assert len(default) == 1
    callable_interfaces = {a.get("send_interface") for a in default[0].iter("allow")
                           if a.get("send_destination") == "org.abflasher.Updater"}
    assert {"org.abflasher.Updater1", "org.freedesktop.DBus.Properties",
            "org.freedesktop.DBus.Introspectable"} <= callable_interfaces
    assert not list(root.iter("deny")), "deny rules here would also apply to other services' policies"


def test_the_activation_file_names_the_service_and_its_systemd_unit() -> None:
    entries = dict(
        line.split("=", 1)
        for line in (REPO / "dbus" / "org.abflasher.Updater.service").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert entries["Name"] == "org.abflasher.Updater"
    assert entries["User"] == "root"
    assert entries["SystemdService"] == "ab-flasher.service"
    assert entries["Exec"].split()[0] == "/usr/bin/ab-flasherd"
