"""The private D-Bus for service tests: a ``dbus-daemon`` of our own, and the helpers every rig shares.

- :class:`DBusDaemon` — a private ``dbus-daemon``: either a copy of the stock *system* configuration (its default-deny
  policy, the distribution's ``system.d`` policies for polkitd, plus the project's own ``dbus/`` directory and a
  private service directory for bus activation), or a permissive one for unit tests.
- :func:`bus_call`, :func:`name_has_owner`, :func:`wait_for_name` — one call on a bus, for test code.
- :func:`stop_process`, :func:`wait_until`, :func:`world_readable_tempdir` — what the other rigs
  (``tests/support/polkit.py``, ``users.py``, ``clientvenv.py``, ``serviceprocess.py``, ``fakeupdater.py``,
  ``inprocess.py``, ``signals.py``) build on.

Every process started here is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import MessageType
from dbus_next.message import Message

from abflasher.service import contract

REPO = Path(__file__).resolve().parents[2]
STOCK_SYSTEM_CONF = Path("/usr/share/dbus-1/system.conf")
BUS_NAME = contract.BUS_NAME
OBJECT_PATH = contract.OBJECT_PATH
INTERFACE = contract.INTERFACE_NAME
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
MIB = 1 << 20

#: Elements of the stock system.conf a private bus must not have: running as messagebus, forking, pid file, syslog,
#: the setuid activation helper (it only reads the standard service dirs), the real socket, and the <include>s of
#: local files (relative paths, SELinux contexts).
_DROPPED_SYSTEM_CONF_ELEMENTS = frozenset(
    {"user", "fork", "pidfile", "syslog", "servicehelper", "standard_system_servicedirs", "listen", "include"}
)

_DOCTYPE = (
    '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"\n'
    ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n'
)


# ---------------------------------------------------------------------------------------------------------------------
# Processes


def stop_process(process: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; by PID, only this process."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(timeout)


def world_readable_tempdir(prefix: str) -> Path:
    """A temp dir under /tmp that other users may traverse (not under /root, whatever TMPDIR says)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Bus helpers (synchronous wrappers for test code)


async def bus_call(
    address: str,
    member: str,
    signature: str = "",
    body: Sequence[Any] = (),
    *,
    destination: str = "org.freedesktop.DBus",
    path: str = "/org/freedesktop/DBus",
    interface: str = "org.freedesktop.DBus",
    timeout: float = 10.0,
) -> Message:
    bus = await MessageBus(bus_address=address).connect()
    try:
        message = Message(
            destination=destination, path=path, interface=interface, member=member, signature=signature,
            body=list(body),
        )
        reply = await asyncio.wait_for(bus.call(message), timeout)
        assert reply is not None
        return reply
    finally:
        bus.disconnect()


def name_has_owner(address: str, name: str) -> bool:
    reply = asyncio.run(bus_call(address, "NameHasOwner", "s", [name]))
    return reply.message_type == MessageType.METHOD_RETURN and bool(reply.body[0])


def wait_for_name(
    address: str, name: str, *, timeout: float = START_TIMEOUT, process: subprocess.Popen[Any] | None = None,
    log: Path | None = None,
) -> None:
    """Poll until ``name`` has an owner; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not name_has_owner(address, name):
        if process is not None and process.poll() is not None:
            detail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            raise RuntimeError(f"process for {name} exited with {process.returncode} before owning it:\n{detail}")
        if time.monotonic() > deadline:
            detail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            raise TimeoutError(f"{name} did not appear on {address} within {timeout} s\n{detail}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def wait_until(predicate: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------------------------------
# dbus-daemon


def system_bus_config(
    socket: Path, *, policy_dirs: Sequence[Path], service_dir: Path | None, stock: Path = STOCK_SYSTEM_CONF
) -> str:
    """The stock system.conf with its own socket, no <user>/<fork>/<pidfile>/<syslog>, no launch helper (activated
    services are started by the daemon itself, as root), absolute <includedir>s and the given policy dirs."""
    tree = ET.parse(stock)
    root = tree.getroot()
    for child in list(root):
        tag = child.tag
        if tag in _DROPPED_SYSTEM_CONF_ELEMENTS:
            root.remove(child)
        elif tag == "includedir" and child.text and not child.text.startswith("/"):
            child.text = str(stock.parent / child.text)
    listen = ET.Element("listen")
    listen.text = f"unix:path={socket}"
    root.insert(1, listen)
    if service_dir is not None:
        servicedir = ET.Element("servicedir")
        servicedir.text = str(service_dir)
        root.insert(2, servicedir)
    for directory in policy_dirs:
        include = ET.SubElement(root, "includedir")
        include.text = str(directory)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + _DOCTYPE + ET.tostring(root, encoding="unicode") + "\n"


def permissive_bus_config(socket: Path, *, service_dir: Path | None = None) -> str:
    servicedir = f"<servicedir>{service_dir}</servicedir>" if service_dir else ""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n{_DOCTYPE}<busconfig>\n'
        f"  <type>session</type>\n  <listen>unix:path={socket}</listen>\n  {servicedir}\n"
        '  <policy context="default">\n    <allow send_destination="*" eavesdrop="true"/>\n'
        '    <allow eavesdrop="true"/>\n    <allow own="*"/>\n  </policy>\n</busconfig>\n'
    )


class DBusDaemon:
    """A private dbus-daemon in ``workdir`` (which must be traversable by every user that connects)."""

    def __init__(self, workdir: Path, config_text: str) -> None:
        self.workdir = workdir
        self.config = workdir / "bus.conf"
        self.config.write_text(config_text)
        self.log = workdir / "dbus-daemon.log"
        read_end, write_end = os.pipe()
        try:
            with open(self.log, "ab") as log:
                self.process = subprocess.Popen(
                    ["dbus-daemon", f"--config-file={self.config}", "--nofork", f"--print-address={write_end}"],
                    pass_fds=(write_end,),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            os.close(write_end)
            write_end = -1
            self.address = self._read_address(read_end)
        except BaseException:
            if write_end >= 0:
                os.close(write_end)
            if hasattr(self, "process"):
                stop_process(self.process)
            raise
        finally:
            os.close(read_end)

    def _read_address(self, fd: int) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        data = b""
        while not data.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, remaining))
            if not ready:
                raise TimeoutError(f"dbus-daemon printed no address: {self.log.read_text(errors='replace')}")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"dbus-daemon failed: {self.log.read_text(errors='replace')}")
            data += chunk
        return data.decode().strip()

    @classmethod
    def system(cls, workdir: Path, *, policy_dirs: Sequence[Path], service_dir: Path | None = None) -> DBusDaemon:
        return cls(workdir, system_bus_config(workdir / "system_bus_socket", policy_dirs=policy_dirs,
                                              service_dir=service_dir))

    @classmethod
    def permissive(cls, workdir: Path, *, service_dir: Path | None = None) -> DBusDaemon:
        return cls(workdir, permissive_bus_config(workdir / "bus_socket", service_dir=service_dir))

    @property
    def pid(self) -> int:
        return self.process.pid

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["DBUS_SYSTEM_BUS_ADDRESS"] = self.address
        return env

    def close(self) -> None:
        stop_process(self.process)

    def __enter__(self) -> DBusDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
