"""Who may ask the service for what: polkit, asked about the caller's bus name (docs/dbus-api.md).

dbus-next does not hand the sender of a call to a ``@method``. A bus message handler (:func:`record_caller`) runs for
every incoming message before the method is dispatched, in the same synchronous step in which dbus-next creates the
method's task; asyncio copies the current context into that task, so what the handler stores in
:data:`CURRENT_CALLER` is exactly the caller of the call being served.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import MessageFlag, MessageType
from dbus_next.message import Message
from dbus_next.signature import Variant

from abflasher import errors
from abflasher.service.contract import (
    ACTION_DOWNGRADE,
    ACTION_MANAGE_BOOT,
    ACTION_UPDATE,
    ACTION_UPDATE_FROM_SOURCE,
    GROUP,
)

log = logging.getLogger(__name__)

POLKIT_BUS_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_INTERFACE = "org.freedesktop.PolicyKit1.Authority"
#: CheckAuthorization flag: polkit may ask the user (through their authentication agent) for a password.
POLKIT_ALLOW_USER_INTERACTION = 0x1

_NO_POLKIT_ERRORS = frozenset(
    {"org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner",
     "org.freedesktop.DBus.Error.NoReply", "org.freedesktop.DBus.Error.Spawn.ServiceNotFound"}
)

_ACTION_WORDS = {
    ACTION_UPDATE: "install or cancel updates",
    ACTION_UPDATE_FROM_SOURCE: "install an image of your choosing (from a URL or a file)",
    ACTION_DOWNGRADE: "install an older version",
    ACTION_MANAGE_BOOT: "reboot or change which slot boots",
}


@dataclass(frozen=True)
class Caller:
    """The sender of the method call being served, as the bus daemon stamped it (it cannot be forged)."""

    bus_name: str
    #: The caller set ALLOW_INTERACTIVE_AUTHORIZATION on its message: it runs an agent that can ask for a password.
    interactive: bool = False


CURRENT_CALLER: ContextVar[Caller | None] = ContextVar("abflasher_current_caller", default=None)


def record_caller(message: Message) -> None:
    """Bus message handler: remember who sent the method call about to be dispatched. Never handles the message."""
    if message.message_type == MessageType.METHOD_CALL:
        interactive = bool(message.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)
        CURRENT_CALLER.set(Caller(message.sender or "", interactive))


def current_caller() -> Caller:
    """The caller of the method call being served (an empty bus name when unknown, which no check grants)."""
    return CURRENT_CALLER.get() or Caller("")


def not_authorized_message(action: str, *, challenge: bool, interactive: bool = False) -> str:
    """One line that says what was refused and what to do about it."""
    what = _ACTION_WORDS.get(action, action)
    group_hint = f"add yourself to the {GROUP} group (sudo adduser $USER {GROUP}) and log in again"
    if action == ACTION_DOWNGRADE:
        return f"not allowed to {what}: downgrades need an administrator's password (run the command in a terminal)"
    if action == ACTION_UPDATE_FROM_SOURCE and not (challenge and interactive):
        return (
            f"not allowed to {what}: that needs an administrator's password (run the command in a terminal), or a "
            f"polkit rule granting {ACTION_UPDATE_FROM_SOURCE}; members of the {GROUP} group may install the "
            "configured channel's versions"
        )
    if challenge and interactive:
        return f"not allowed to {what}: authentication failed or was cancelled (to skip it, {group_hint})"
    if challenge:
        return f"not allowed to {what}: {group_hint}, or run the command in a terminal to authenticate"
    return f"not allowed to {what}: {group_hint}"


class Authorizer(Protocol):
    async def authorize(self, caller: Caller, action: str, *, interactive: bool = False) -> None:
        """Return when ``caller`` may perform ``action``; raise errors.NotAuthorized otherwise.

        ``interactive``: the caller asked (with an option) for a password prompt; the message flag counts too.
        """
        ...


class PolkitAuthorizer:
    """Asks polkitd (``CheckAuthorization``) on the system bus the service itself is connected to."""

    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus

    async def authorize(self, caller: Caller, action: str, *, interactive: bool = False) -> None:
        if not caller.bus_name:
            raise errors.NotAuthorized(not_authorized_message(action, challenge=False))
        allow_interaction = interactive or caller.interactive
        subject = ["system-bus-name", {"name": Variant("s", caller.bus_name)}]
        flags = POLKIT_ALLOW_USER_INTERACTION if allow_interaction else 0
        reply = await self._bus.call(
            Message(
                destination=POLKIT_BUS_NAME,
                path=POLKIT_PATH,
                interface=POLKIT_INTERFACE,
                member="CheckAuthorization",
                signature="(sa{sv})sa{ss}us",
                body=[subject, action, {}, flags, ""],
            )
        )
        if reply is None or reply.message_type != MessageType.METHOD_RETURN:
            # Fail closed: without an answer from polkit nobody but the bus itself vouches for the caller.
            detail = str(reply.body[0]) if reply is not None and reply.body else "no reply"
            error_name = (reply.error_name or "") if reply is not None else ""
            log.error("polkit CheckAuthorization(%s) for %s failed: %s %s", action, caller.bus_name, error_name, detail)
            if error_name in _NO_POLKIT_ERRORS or reply is None:
                raise errors.NotAuthorized(
                    "cannot check authorization: polkit is not available (is polkitd installed and running?)"
                )
            raise errors.NotAuthorized(f"polkit could not check {action}: {detail} (is ab-flasher's policy installed?)")
        is_authorized, is_challenge, _details = reply.body[0]
        if is_authorized:
            log.info("polkit: %s authorized for %s", action, caller.bus_name)
            return
        log.info("polkit: %s denied for %s (challenge: %s)", action, caller.bus_name, is_challenge)
        raise errors.NotAuthorized(
            not_authorized_message(action, challenge=bool(is_challenge), interactive=allow_interaction)
        )
