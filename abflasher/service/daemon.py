"""``ab-flasherd``: the root D-Bus service (docs/dbus-api.md).

``ab-flasherd [--config PATH] [--session] [--idle-timeout SECONDS]``. Logs to stderr (the journal under systemd).
SIGTERM/SIGINT cancel a running job (its target stays marked incomplete), wait for the engine to stop, and exit.
With ``--idle-timeout`` it releases its name and exits after that long without calls or jobs; the bus starts it
again on the next call (bus activation).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import BusType, NameFlag, RequestNameReply
from dbus_next.errors import DBusError
from dbus_next.message import Message

from abflasher import __version__, errors
from abflasher.config import DEFAULT_PATH, load_config
from abflasher.service.auth import Authorizer, PolkitAuthorizer
from abflasher.service.contract import BUS_NAME
from abflasher.service.dbus_adapter import quiet_sent_dbus_errors
from abflasher.service.interface import UpdaterEngine, UpdaterInterface
from abflasher.updater import Updater

log = logging.getLogger("abflasher.service")

#: How long SIGTERM waits for the engine to stop a running job (systemd's default stop timeout is 90 s).
STOP_TIMEOUT = 60.0
#: How long start-up waits for the first slot status before answering calls anyway.
STARTUP_STATUS_TIMEOUT = 10.0


async def serve(
    updater: UpdaterEngine,
    *,
    bus_type: BusType = BusType.SYSTEM,
    bus_address: str | None = None,
    idle_timeout: float = 0.0,
    stop_timeout: float = STOP_TIMEOUT,
    authorizer_factory: Callable[[MessageBus], Authorizer] = PolkitAuthorizer,
) -> int:
    """Own the bus name and serve ``updater`` until SIGTERM/SIGINT, the bus going away, or the idle timeout.
    Returns the process exit status."""
    quiet_sent_dbus_errors(asyncio.get_running_loop())
    try:
        if bus_address:
            bus = await MessageBus(bus_address=bus_address, negotiate_unix_fd=True).connect()
        else:
            bus = await MessageBus(bus_type=bus_type, negotiate_unix_fd=True).connect()
    except (OSError, DBusError) as exc:
        log.error("cannot connect to the %s bus: %s", "session" if bus_type == BusType.SESSION else "system", exc)
        return 1
    interface = UpdaterInterface(updater, authorizer_factory(bus))
    interface.attach(bus)
    try:
        await asyncio.wait_for(interface.refresh_status(), STARTUP_STATUS_TIMEOUT)
    except TimeoutError:
        log.warning("the slot status took longer than %.0f s; serving without it", STARTUP_STATUS_TIMEOUT)

    try:
        reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
    except DBusError as exc:
        log.error(
            "not allowed to own %s (%s): the service must run as root, and the D-Bus policy "
            "org.abflasher.Updater.conf must be installed",
            BUS_NAME,
            exc.text,
        )
        bus.disconnect()  # type: ignore[no-untyped-call]
        return 1
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        log.error("%s is already owned by another process; is ab-flasherd already running?", BUS_NAME)
        bus.disconnect()  # type: ignore[no-untyped-call]
        return 1
    log.info("ab-flasherd %s serving %s", __version__, BUS_NAME)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    disconnected = bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(disconnected)]
    if idle_timeout > 0:
        waiters.append(asyncio.ensure_future(_wait_until_idle(interface, idle_timeout)))
    try:
        done, _pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        for waiter in waiters:
            waiter.cancel()
    if waiters[1] in done:
        log.error("lost the connection to the bus; exiting")
        await interface.shutdown(stop_timeout)
        return 1
    if stop.is_set():
        log.info("stopping on signal")
        await interface.shutdown(stop_timeout)
        await _answer_calls_in_progress(bus, interface, stop_timeout)
    else:
        log.info("idle for %.0f s; exiting (the bus starts the service again when needed)", idle_timeout)
        await _release_name_and_drain(bus, interface, stop_timeout)
    bus.disconnect()  # type: ignore[no-untyped-call]
    return 0


async def _answer_calls_in_progress(bus: MessageBus, interface: UpdaterInterface, timeout: float) -> None:
    """Let the calls already being served reply before the bus connection closes: a ``Reboot`` whose command makes
    systemd stop this service has done what it was asked, and its caller must hear so, not that the service went
    away."""
    deadline = time.monotonic() + timeout
    while interface.calls_in_progress and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    # The replies are queued on the connection in order: once the bus daemon answers a Ping sent after them, they
    # have been written (closing the socket earlier would drop them).
    ping = Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                   interface="org.freedesktop.DBus.Peer", member="Ping")
    with contextlib.suppress(DBusError, OSError, EOFError, TimeoutError):
        await asyncio.wait_for(bus.call(ping), max(1.0, deadline - time.monotonic()))


async def _wait_until_idle(interface: UpdaterInterface, idle_timeout: float) -> None:
    while True:
        idle = interface.idle_seconds()
        if idle >= idle_timeout:
            return
        await asyncio.sleep(max(0.05, idle_timeout - idle))


async def _release_name_and_drain(bus: MessageBus, interface: UpdaterInterface, timeout: float) -> None:
    """Give the name back first, so new calls start a fresh instance, then finish the calls already routed here."""
    try:
        await bus.release_name(BUS_NAME)
    except DBusError as exc:
        log.warning("cannot release %s: %s", BUS_NAME, exc.text)
    deadline = time.monotonic() + timeout
    while interface.idle_seconds() == 0.0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await interface.shutdown(max(0.0, deadline - time.monotonic()))


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ab-flasherd", description="The ab-flasher D-Bus system service (root).")
    parser.add_argument("--version", action="version", version=f"ab-flasherd {__version__}")
    parser.add_argument("--config", default=DEFAULT_PATH, metavar="PATH", help=f"configuration file ({DEFAULT_PATH})")
    parser.add_argument("--session", action="store_true", help="use the session bus (development only)")
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="exit after this long without calls or jobs (for bus activation; 0: never)",
    )
    parser.add_argument("--debug", action="store_true", help="log debug messages")
    return parser


def _setup_logging(debug: bool) -> None:
    # Under systemd stderr is the journal, which stamps the time itself.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if "JOURNAL_STREAM" not in os.environ:
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format=fmt, stream=sys.stderr)
    # urllib3 logs every request line, query string (a token) included, at DEBUG: never into the journal.
    logging.getLogger("urllib3").setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    _setup_logging(args.debug)
    try:
        config = load_config(args.config)
    except errors.AbFlasherError as exc:
        log.error("%s", exc)
        return exc.exit_code
    updater = Updater(config)
    bus_type = BusType.SESSION if args.session else BusType.SYSTEM
    return asyncio.run(
        serve(updater, bus_type=bus_type, bus_address=starter_bus_address(bus_type), idle_timeout=args.idle_timeout)
    )


def starter_bus_address(bus_type: BusType) -> str | None:
    """The bus that started us by activation, when it is the kind of bus we serve on (the bus passes its address
    in DBUS_STARTER_ADDRESS; under systemd there is none and the standard address applies)."""
    wanted = "session" if bus_type == BusType.SESSION else "system"
    if os.environ.get("DBUS_STARTER_BUS_TYPE") == wanted:
        return os.environ.get("DBUS_STARTER_ADDRESS") or None
    return None


if __name__ == "__main__":
    sys.exit(main())
