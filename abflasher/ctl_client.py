"""The bus side of ``abflasherctl``: calls to ``org.abflasher.Updater`` and their errors, signals as events, and a
polkit text agent for password prompts. `abflasher.ctl` is the commands and what they print."""

from __future__ import annotations

import asyncio
import os
import re
import select
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import BusType, MessageFlag, MessageType
from dbus_next.message import Message
from dbus_next.signature import Variant

from abflasher import errors
from abflasher.service.contract import (
    BUS_NAME,
    ERROR_PREFIX,
    INTERFACE_NAME,
    OBJECT_PATH,
    PROPERTIES_INTERFACE,
)

EXIT_UNAVAILABLE = 69  # sysexits EX_UNAVAILABLE
EXIT_INTERRUPTED = 130
#: How long a call may take; Cancel waits for the engine to stop, and a password prompt waits for a human.
CALL_TIMEOUT = 90.0
INTERACTIVE_CALL_TIMEOUT = 600.0
AGENT_START_TIMEOUT = 5.0


class ServiceUnavailable(errors.AbFlasherError):
    """The bus or the service cannot be reached (client side only)."""

    name = "Unavailable"
    exit_code = EXIT_UNAVAILABLE


class Interrupted(errors.AbFlasherError):
    name = "Interrupted"
    exit_code = EXIT_INTERRUPTED


# ---------------------------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------------------------
# Values


def unwrap(value: Any) -> Any:
    """Plain Python values from what dbus-next hands out (Variants inside dicts and lists)."""
    if isinstance(value, Variant):
        return unwrap(value.value)
    if isinstance(value, dict):
        return {str(key): unwrap(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [unwrap(item) for item in value]
    return value


def status_summary(props: dict[str, Any], slots: list[dict[str, Any]]) -> dict[str, Any]:
    """The service's properties and slots as one plain dict (``abflasherctl status --json``, the upload page)."""
    stage, percent, done, total = [*(props.get("Progress") or []), "", 0, 0, 0][:4]
    return {
        "state": props.get("State", ""),
        "progress": {"stage": stage, "percent": percent, "done": done, "total": total},
        "last_error": props.get("LastError", ""),
        "booted_slot": props.get("BootedSlot", ""),
        "primary_slot": props.get("PrimarySlot", ""),
        "booted_version": props.get("BootedVersion", ""),
        "trial_active": bool(props.get("TrialActive", False)),
        "auto_update": props.get("AutoUpdate", ""),
        "slots": slots,
    }


def human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{count} B"


# ---------------------------------------------------------------------------------------------------------------------
# The bus


@dataclass(frozen=True)
class Event:
    kind: str  # progress | completed | vanished
    args: tuple[Any, ...]


_UNAVAILABLE_ERRORS = {
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.Spawn.ServiceNotFound",
    "org.freedesktop.DBus.Error.Spawn.ChildExited",
    "org.freedesktop.DBus.Error.Spawn.ExecFailed",
    "org.freedesktop.DBus.Error.Spawn.Failed",
}


def error_from_reply(reply: Message) -> errors.AbFlasherError:
    name = reply.error_name or ""
    text = str(reply.body[0]) if reply.body else name
    if name.startswith(ERROR_PREFIX):
        return errors.from_dbus_name(name, text)
    if name in _UNAVAILABLE_ERRORS:
        return ServiceUnavailable(
            "the ab-flasher service is not running and could not be started; "
            "check `systemctl status ab-flasher` (is the ab-flasher package installed?)"
        )
    if name == "org.freedesktop.DBus.Error.AccessDenied":
        return ServiceUnavailable(f"the system bus refused the call ({text}); is ab-flasher's D-Bus policy installed?")
    if name in ("org.freedesktop.DBus.Error.NoReply", "org.freedesktop.DBus.Error.Timeout"):
        return ServiceUnavailable("the ab-flasher service did not answer; see `journalctl -u ab-flasher`")
    if name in ("org.freedesktop.DBus.Error.UnknownMethod", "org.freedesktop.DBus.Error.UnknownInterface"):
        return errors.Internal(f"the ab-flasher service does not support this request ({text}); is it up to date?")
    return errors.Internal(f"unexpected D-Bus error {name}: {text}")


class ServiceClient:
    """Calls to org.abflasher.Updater1 and its signals, over one bus connection."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        #: A polkit agent runs for this process: mutating calls may ask for a password.
        self.interactive = False
        self._events: asyncio.Queue[Event] | None = None

    @classmethod
    async def connect(cls, *, session: bool = False) -> ServiceClient:
        try:
            bus = await MessageBus(
                bus_type=BusType.SESSION if session else BusType.SYSTEM, negotiate_unix_fd=True
            ).connect()
        except Exception as exc:
            raise ServiceUnavailable(
                f"cannot connect to the {'session' if session else 'system'} bus ({exc}); is D-Bus running?"
            ) from exc
        return cls(bus)

    def close(self) -> None:
        self.bus.disconnect()  # type: ignore[no-untyped-call]

    async def call(
        self,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        *,
        interface: str = INTERFACE_NAME,
        fds: Sequence[int] = (),
        mutating: bool = False,
    ) -> list[Any]:
        interactive = mutating and self.interactive
        message = Message(
            destination=BUS_NAME,
            path=OBJECT_PATH,
            interface=interface,
            member=member,
            signature=signature,
            body=list(body),
            flags=MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if interactive else MessageFlag.NONE,
            unix_fds=list(fds),
        )
        timeout = INTERACTIVE_CALL_TIMEOUT if interactive else CALL_TIMEOUT
        try:
            reply = await asyncio.wait_for(self.bus.call(message), timeout)
        except TimeoutError as exc:
            raise ServiceUnavailable(
                f"the ab-flasher service did not answer within {timeout:.0f} s; see `journalctl -u ab-flasher`"
            ) from exc
        except (OSError, EOFError) as exc:
            raise ServiceUnavailable(f"lost the connection to the bus: {exc}") from exc
        if reply is None:
            raise ServiceUnavailable("lost the connection to the bus")
        if reply.message_type == MessageType.ERROR:
            raise error_from_reply(reply)
        return list(reply.body)

    async def properties(self) -> dict[str, Any]:
        (values,) = await self.call("GetAll", "s", [INTERFACE_NAME], interface=PROPERTIES_INTERFACE)
        result: dict[str, Any] = unwrap(values)
        return result

    async def subscribe(self) -> asyncio.Queue[Event]:
        """Start receiving the service's Progress/Completed signals, and notice when the service goes away. Call it
        before the request whose signals you want, so none can be missed."""
        if self._events is not None:
            return self._events
        events: asyncio.Queue[Event] = asyncio.Queue()
        self._events = events

        def on_message(message: Message) -> None:
            if message.message_type != MessageType.SIGNAL:
                return
            if message.interface == INTERFACE_NAME and message.path == OBJECT_PATH:
                if message.member == "Progress" and message.signature == "ssutt":
                    events.put_nowait(Event("progress", tuple(message.body)))
                elif message.member == "Completed" and message.signature == "sbss":
                    events.put_nowait(Event("completed", tuple(message.body)))
            elif message.member == "NameOwnerChanged" and message.body[:1] == [BUS_NAME] and not message.body[2]:
                events.put_nowait(Event("vanished", ()))  # the name lost its owner

        self.bus.add_message_handler(on_message)
        rules = [
            f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}',interface='{INTERFACE_NAME}'",
            f"type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',arg0='{BUS_NAME}'",
        ]
        for rule in rules:
            reply = await self.bus.call(
                Message(
                    destination="org.freedesktop.DBus",
                    path="/org/freedesktop/DBus",
                    interface="org.freedesktop.DBus",
                    member="AddMatch",
                    signature="s",
                    body=[rule],
                )
            )
            if reply is None or reply.message_type == MessageType.ERROR:
                raise ServiceUnavailable("the system bus refused to deliver the service's signals")
        return events


# ---------------------------------------------------------------------------------------------------------------------
# polkit agent


def _in_logind_session() -> bool:
    """Does this process belong to a logind session (what polkit asks libsystemd: a session-N.scope cgroup)?"""
    try:
        cgroups = Path("/proc/self/cgroup").read_text()
    except OSError:
        return False
    return re.search(r"/session-[^/]+\.scope(/|$)", cgroups, re.MULTILINE) is not None


class PolkitAgent:
    """``pkttyagent`` for this process, as fwupdmgr does: polkit can then ask for a password on the terminal."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> bool:
        argv = ["pkttyagent", "--process", str(os.getpid())]
        # --fallback lets a desktop's agent win when there is one; polkit looks fallback agents up through the
        # caller's logind session, so outside a session (containers, minimal images) it would never be used at all.
        if _in_logind_session():
            argv.append("--fallback")
        read_end, write_end = os.pipe()
        try:
            try:
                self.process = subprocess.Popen(
                    [*argv, "--notify-fd", str(write_end)],
                    pass_fds=(write_end,),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            except OSError:
                return False
            os.close(write_end)
            write_end = -1
            # pkttyagent closes the notify fd once it is registered with polkit (EOF here); it exits on failure.
            ready, _, _ = select.select([read_end], [], [], AGENT_START_TIMEOUT)
            registered = bool(ready) and os.read(read_end, 1) == b"" and self.process.poll() is None
            if not registered:
                self.stop()
            return registered
        finally:
            if write_end >= 0:
                os.close(write_end)
            os.close(read_end)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


