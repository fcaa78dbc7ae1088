"""Observing the service from a test whose main thread waits on processes: :class:`SignalRecorder` records every
signal from a thread of its own; :func:`get_slots_concurrently` calls GetSlots from many connections at once."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import MessageType
from dbus_next.message import Message

from tests.support.bus import BUS_NAME, INTERFACE, OBJECT_PATH, START_TIMEOUT, STOP_TIMEOUT, wait_until
from tests.support.inprocess import InProcessService


class SignalRecorder:
    """Records every signal of the service on ``address`` from a thread of its own."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._lock = threading.Lock()
        self._messages: list[Message] = []
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="signal-recorder", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise TimeoutError("the signal recorder did not connect")
        if self._failure is not None:
            raise self._failure

    def _main(self) -> None:
        asyncio.run(self._record())

    async def _record(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            bus = await MessageBus(bus_address=self.address).connect()
            bus.add_message_handler(self._on_message)
            await InProcessService.add_match(bus, f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}'")
        except BaseException as exc:
            self._failure = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        bus.disconnect()

    def _on_message(self, message: Message) -> None:
        if message.message_type == MessageType.SIGNAL:
            with self._lock:
                self._messages.append(message)

    def messages(self, member: str | None = None) -> list[Message]:
        with self._lock:
            return [m for m in self._messages if member is None or m.member == member]

    def wait_for(self, predicate: Callable[[Message], bool], timeout: float, what: str) -> Message:
        found: list[Message] = []

        def check() -> bool:
            found[:] = [m for m in self.messages() if predicate(m)]
            return bool(found)

        wait_until(check, timeout=timeout, what=what)
        return found[0]

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(STOP_TIMEOUT)

    def __enter__(self) -> SignalRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def get_slots_concurrently(address: str, readers: int, timeout: float = 30.0) -> list[Message]:
    """``readers`` separate connections calling GetSlots at the same time."""
    buses = [await MessageBus(bus_address=address).connect() for _ in range(readers)]
    try:
        calls = [
            bus.call(Message(destination=BUS_NAME, path=OBJECT_PATH, interface=INTERFACE, member="GetSlots"))
            for bus in buses
        ]
        replies = await asyncio.wait_for(asyncio.gather(*calls), timeout)
        return [reply for reply in replies if reply is not None]
    finally:
        for bus in buses:
            bus.disconnect()
