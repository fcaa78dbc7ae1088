"""The service in the test's own event loop (unit tests): :class:`InProcessService`, and helpers to read replies
and count the fds the test process holds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import MessageType
from dbus_next.message import Message

from tests.support.bus import BUS_NAME, INTERFACE, OBJECT_PATH


class InProcessService:
    """``UpdaterInterface`` on ``address`` in the running event loop, plus a client connection that records the
    service's signals. ``async with InProcessService(address, updater) as service: ...``"""

    def __init__(
        self, address: str, updater: Any, *, authorizer: Any = None, progress_interval: float = 0.1,
        cancel_timeout: float = 10.0,
    ) -> None:
        self.address = address
        self.updater = updater
        self._authorizer = authorizer
        self._progress_interval = progress_interval
        self._cancel_timeout = cancel_timeout
        self.signals: list[Message] = []
        self._signal_arrived = asyncio.Event()

    async def __aenter__(self) -> InProcessService:
        from abflasher.service.auth import PolkitAuthorizer
        from abflasher.service.dbus_adapter import quiet_sent_dbus_errors
        from abflasher.service.interface import UpdaterInterface

        quiet_sent_dbus_errors(asyncio.get_running_loop())
        self.service_bus = await MessageBus(bus_address=self.address, negotiate_unix_fd=True).connect()
        authorizer = self._authorizer if self._authorizer is not None else PolkitAuthorizer(self.service_bus)
        self.interface = UpdaterInterface(
            self.updater, authorizer, progress_interval=self._progress_interval, cancel_timeout=self._cancel_timeout
        )
        self.interface.attach(self.service_bus)
        await self.interface.refresh_status()
        await self.service_bus.request_name(BUS_NAME)
        self.client = await self.connect_client()
        self.client.add_message_handler(self._on_message)
        await self.add_match(self.client, f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}'")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.interface.shutdown(10.0)
        self.client.disconnect()
        self.service_bus.disconnect()

    async def connect_client(self) -> MessageBus:
        return await MessageBus(bus_address=self.address, negotiate_unix_fd=True).connect()

    @staticmethod
    async def add_match(bus: MessageBus, rule: str) -> None:
        reply = await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                       interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                                       body=[rule]))
        assert reply is not None
        assert reply.message_type == MessageType.METHOD_RETURN

    def _on_message(self, message: Message) -> None:
        if message.message_type == MessageType.SIGNAL and message.path == OBJECT_PATH:
            self.signals.append(message)
            self._signal_arrived.set()

    async def call(
        self, member: str, signature: str = "", body: Sequence[Any] = (), *, fds: Sequence[int] = (),
        flags: Any = None, interface: str = INTERFACE, bus: MessageBus | None = None,
    ) -> Message:
        from dbus_next.constants import MessageFlag

        message = Message(destination=BUS_NAME, path=OBJECT_PATH, interface=interface, member=member,
                          signature=signature, body=list(body), unix_fds=list(fds),
                          flags=flags if flags is not None else MessageFlag.NONE)
        reply = await asyncio.wait_for((bus or self.client).call(message), 20)
        assert reply is not None
        return reply

    def of(self, member: str, interface: str = INTERFACE) -> list[Message]:
        return [m for m in self.signals if m.member == member and m.interface == interface]

    async def wait_for_signal(self, predicate: Callable[[Message], bool], timeout: float = 20.0) -> Message:
        deadline = time.monotonic() + timeout
        while True:
            for message in self.signals:
                if predicate(message):
                    return message
            self._signal_arrived.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the expected signal did not arrive")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._signal_arrived.wait(), remaining)

    async def wait_completed(self, job: str, timeout: float = 20.0) -> Message:
        return await self.wait_for_signal(lambda m: m.member == "Completed" and m.body[0] == job, timeout)


def ok(reply: Message) -> list[Any]:
    """The body of a method return; fail with the error otherwise."""
    assert reply.message_type == MessageType.METHOD_RETURN, (reply.error_name, reply.body)
    return list(reply.body)


def error_of(reply: Message) -> tuple[str, str]:
    assert reply.message_type == MessageType.ERROR, reply.body
    return reply.error_name or "", str(reply.body[0]) if reply.body else ""


def open_fd_count() -> int:
    """Open fds of this process that are not sockets or event fds (dbus-next leaves closing its sockets to the
    garbage collector, so bus connections would make the count noisy)."""
    return sum(1 for target in open_fds().values() if not target.startswith(("socket:", "anon_inode:")))


def open_fds() -> dict[int, str]:
    result = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            result[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return result
