"""Test rig for the D-Bus service: private buses, polkitd, real users, a fake engine.

- :class:`DBusDaemon` — a private ``dbus-daemon``: either a copy of the stock *system* configuration (its default-deny
  policy, the distribution's ``system.d`` policies for polkitd, plus the project's own ``dbus/`` directory and a
  private service directory for bus activation), or a permissive one for unit tests.
- :class:`PolkitDaemon` — the real ``polkitd``, started as root against such a bus (it drops to its own user).
- :func:`installed_polkit_files` — the project's policy and rules in the directories polkitd reads, removed after.
- :class:`TestUsers` — real unprivileged users, one in the ``abflasher`` group and one not.
- :class:`ClientVenv` — a venv made with /usr/bin/python3 in a world-readable directory (not under /root), with a copy
  of the source and ``abflasherctl``/``ab-flasherd`` scripts, so the test users can run the client.
- :class:`FakeUpdater` — the engine's API, simulated: progress by chunks with a cancel event, reading a real fd.
  ``python -m tests.support.bus serve-fake`` runs the real service with it (integration tests before the engine
  lands, and for cases the engine cannot be made to show quickly).

Every process started here is stopped by its PID; every file and user made here is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import hashlib
import os
import pwd
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import MessageType
from dbus_next.message import Message

from abflasher import errors
from abflasher.image.pipeline import Progress
from abflasher.service.contract import BUS_NAME, GROUP, INTERFACE_NAME, OBJECT_PATH
from abflasher.updater import (
    BootCheckResult,
    CheckResult,
    PreparedUpdate,
    SlotStatus,
    SystemStatus,
    UpdateOutcome,
    UpdateRequest,
)

REPO = Path(__file__).resolve().parents[2]
STOCK_SYSTEM_CONF = Path("/usr/share/dbus-1/system.conf")
POLKITD = Path("/usr/lib/polkit-1/polkitd")
POLKIT_ACTIONS_DIR = Path("/usr/share/polkit-1/actions")
POLKIT_RULES_DIR = Path("/etc/polkit-1/rules.d")
POLICY_FILE = "org.abflasher.Updater.policy"
RULES_FILE = "org.abflasher.Updater.rules"
INTERFACE = INTERFACE_NAME
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


# ---------------------------------------------------------------------------------------------------------------------
# polkit


class PolkitDaemon:
    """The real polkitd on ``bus`` (started as root; it drops to the polkitd user itself)."""

    def __init__(self, bus: DBusDaemon) -> None:
        self.log = bus.workdir / "polkitd.log"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [str(POLKITD), "--no-debug"], env=bus.env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        try:
            wait_for_name(bus.address, "org.freedesktop.PolicyKit1", process=self.process, log=self.log)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        stop_process(self.process)


class DbusmockPolkit:
    """python-dbusmock's polkitd template on ``address`` (unit tests): every action denied until allowed."""

    def __init__(self, address: str, workdir: Path) -> None:
        self.address = address
        self.log = workdir / "dbusmock-polkitd.log"
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dbusmock", "--system", "--template", "polkitd"],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        try:
            wait_for_name(address, "org.freedesktop.PolicyKit1", process=self.process, log=self.log)
        except BaseException:
            self.close()
            raise

    async def set_allowed(self, actions: Sequence[str]) -> None:
        reply = await bus_call(
            self.address, "SetAllowed", "as", [list(actions)], destination="org.freedesktop.PolicyKit1",
            path="/org/freedesktop/PolicyKit1/Authority", interface="org.freedesktop.DBus.Mock",
        )
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body

    def close(self) -> None:
        stop_process(self.process)


@contextlib.contextmanager
def installed_polkit_files(source_dir: Path = REPO / "polkit") -> Iterator[None]:
    """The project's polkit policy and rules where polkitd reads them, for the duration; whatever was there before
    (an installed package) is put back afterwards."""
    placed = [
        (source_dir / POLICY_FILE, POLKIT_ACTIONS_DIR / POLICY_FILE),
        (source_dir / RULES_FILE, POLKIT_RULES_DIR / RULES_FILE),
    ]
    saved: list[tuple[Path, bytes | None]] = []
    try:
        for source, target in placed:
            saved.append((target, target.read_bytes() if target.exists() else None))
            shutil.copyfile(source, target)
            target.chmod(0o644)
        yield
    finally:
        for target, before in saved:
            if before is None:
                target.unlink(missing_ok=True)
            else:
                target.write_bytes(before)


# ---------------------------------------------------------------------------------------------------------------------
# Users


class TestUsers:
    """Two real unprivileged users: ``member`` (in the abflasher group) and ``outsider`` (not)."""

    __test__ = False

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.member = f"abft-m-{tag}"
        self.outsider = f"abft-o-{tag}"
        self._created_users: list[str] = []
        self._created_group = False
        try:
            try:
                grp.getgrnam(GROUP)
            except KeyError:
                subprocess.run(["groupadd", "--system", GROUP], check=True, capture_output=True, timeout=30)
                self._created_group = True
            for name, groups in ((self.member, [GROUP]), (self.outsider, [])):
                cmd = ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                       "--shell", "/usr/sbin/nologin"]
                if groups:
                    cmd += ["--groups", ",".join(groups)]
                subprocess.run([*cmd, name], check=True, capture_output=True, timeout=30)
                self._created_users.append(name)
        except BaseException:
            self.close()
            raise

    def uid(self, name: str) -> int:
        return pwd.getpwnam(name).pw_uid

    def close(self) -> None:
        uids = set()
        for name in self._created_users:
            with contextlib.suppress(KeyError):
                uids.add(pwd.getpwnam(name).pw_uid)
        _kill_processes_of(uids)
        for name in self._created_users:
            subprocess.run(["userdel", name], capture_output=True, timeout=30, check=False)
        self._created_users.clear()
        if self._created_group:
            subprocess.run(["groupdel", GROUP], capture_output=True, timeout=30, check=False)
            self._created_group = False


def _pids_of(uids: set[int]) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid in uids:
                    pids.append(int(entry))
    return pids


def _kill_processes_of(uids: set[int]) -> None:
    """Whatever still runs as the test users (a process left behind by a failed test; runuser forks, so a test
    stopping runuser with SIGKILL would leave its child): killed by PID, so the users can be deleted."""
    if not uids:
        return
    for pid in _pids_of(uids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not _pids_of(uids), timeout=10, what="the test users' processes to exit")


# ---------------------------------------------------------------------------------------------------------------------
# The client's Python for unprivileged users


_SCRIPT = """#!{python}
import sys
from {module} import main
sys.exit(main())
"""


class ClientVenv:
    """``/usr/bin/python3 -m venv --system-site-packages`` in ``workdir`` with a world-readable copy of the source
    (abflasher/ and tests/) on its path and ``abflasherctl``/``ab-flasherd`` scripts in its bin/."""

    def __init__(self, workdir: Path, repo: Path = REPO) -> None:
        self.root = workdir / "venv"
        self.src = workdir / "src"
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".cache", "data")
        for package in ("abflasher", "tests"):
            shutil.copytree(repo / package, self.src / package, ignore=ignore)
        for extra in ("dbus", "polkit"):
            shutil.copytree(repo / extra, self.src / extra)
        subprocess.run(
            ["/usr/bin/python3", "-m", "venv", "--system-site-packages", "--without-pip", str(self.root)],
            check=True, capture_output=True, timeout=120,
        )
        self.python = self.root / "bin" / "python"
        site = subprocess.run(
            [str(self.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout.strip()
        Path(site, "ab-flasher-src.pth").write_text(f"{self.src}\n")
        for name, module in (("abflasherctl", "abflasher.ctl"), ("ab-flasherd", "abflasher.service.daemon")):
            script = self.root / "bin" / name
            script.write_text(_SCRIPT.format(python=self.python, module=module))
            script.chmod(0o755)
        subprocess.run(["chmod", "-R", "a+rX", str(workdir)], check=True, timeout=60)
        # Compile as root now, so the users' runs do not each recompile what they cannot cache.
        subprocess.run([str(self.python), "-m", "compileall", "-q", str(self.src)], check=False, timeout=300,
                       capture_output=True)

    @property
    def ctl(self) -> Path:
        return self.root / "bin" / "abflasherctl"

    @property
    def daemon(self) -> Path:
        return self.root / "bin" / "ab-flasherd"


def _as_user(
    user: str, argv: Sequence[str | os.PathLike[str]], bus: DBusDaemon, extra_env: dict[str, str] | None
) -> list[str]:
    """``argv`` as ``user`` (runuser) with a clean environment pointing at the private system bus."""
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/tmp",
        "LANG": "C.UTF-8",
        "DBUS_SYSTEM_BUS_ADDRESS": bus.address,
        **(extra_env or {}),
    }
    return ["runuser", "-u", user, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()), *map(str, argv)]


def run_as(
    user: str, argv: Sequence[str | os.PathLike[str]], *, bus: DBusDaemon, timeout: float = 60.0,
    input_bytes: bytes | None = None, extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        _as_user(user, argv, bus, extra_env), input=input_bytes, capture_output=True, timeout=timeout, check=False
    )


def popen_as(
    user: str, argv: Sequence[str | os.PathLike[str]], *, bus: DBusDaemon, extra_env: dict[str, str] | None = None,
    **kwargs: Any,
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(_as_user(user, argv, bus, extra_env), **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# The service process


class ServiceProcess:
    """The service started as root: ``argv`` run with the bus's address; ready once it owns the name."""

    def __init__(self, argv: Sequence[str | os.PathLike[str]], bus: DBusDaemon, *, cwd: Path | None = None,
                 log_name: str = "service.log") -> None:
        self.log = bus.workdir / log_name
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                list(map(str, argv)), env=bus.env(), cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        try:
            wait_for_name(bus.address, BUS_NAME, process=self.process, log=self.log)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        stop_process(self.process)

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def config_file_text(config: Any) -> str:
    """An ab-flasher.conf that load_config() turns back into ``config`` (an abflasher.config.Config)."""
    import dataclasses
    import shlex

    lines = ["[ab-flasher]"]
    for item in dataclasses.fields(config):
        if item.name == "extra":
            continue
        value = getattr(config, item.name)
        if isinstance(value, bool):
            text = "yes" if value else "no"
        elif isinstance(value, tuple):
            text = shlex.join(value)
        else:
            text = str(value)
        lines.append(f"{item.name} = {text}")
    return "\n".join(lines) + "\n"


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


# ---------------------------------------------------------------------------------------------------------------------
# A fake engine


@dataclass
class FakeSlot:
    name: str
    version: str
    state: str
    role: str = "system"
    installed: dict[str, Any] = field(default_factory=dict)


class FakeUpdater:
    """Implements the engine API the service uses, without a disk.

    ``run`` "writes" ``image_size`` bytes in ``chunk``-sized steps (or reads the request's fd to its end), sleeping
    ``chunk_delay`` per step, reporting ``writing`` then ``verifying`` progress; it honours the cancel event, leaves
    the target ``incomplete`` on any failure, and a fd that ends before the announced size is a truncated image.
    ``hold`` (when given) blocks ``run`` until it is set, so tests can look at a job while it runs.
    """

    def __init__(
        self, *, image_size: int = 4 * MIB, chunk: int = 256 * 1024, chunk_delay: float = 0.0,
        booted_version: str = "1.0", hold: threading.Event | None = None,
    ) -> None:
        self.image_size = image_size
        self.chunk = chunk
        self.chunk_delay = chunk_delay
        self.hold = hold
        self.lock = threading.Lock()
        self.slots = {"a": FakeSlot("a", booted_version, "good"), "b": FakeSlot("b", "", "unknown")}
        self.booted = "a"
        self.primary = "a"
        self.trial = False
        self.calls: list[tuple[str, Any]] = []
        self.fds_closed: list[int] = []

    def _record(self, name: str, arg: Any = None) -> None:
        with self.lock:
            self.calls.append((name, arg))

    def status(self) -> SystemStatus:
        self._record("status")
        with self.lock:
            slots = tuple(
                SlotStatus(
                    name=slot.name, role=slot.role, device=f"/dev/fake{index + 2}", partuuid=f"1234abcd-0{index + 2}",
                    size=64 * MIB, version=slot.version, booted=slot.name == self.booted,
                    primary=slot.name == self.primary, state=slot.state, installed=dict(slot.installed),
                )
                for index, slot in enumerate(self.slots.values())
            )
            booted = self.slots[self.booted]
            return SystemStatus(
                layout="prefix", booted_slot=self.booted, primary_slot=self.primary, booted_version=booted.version,
                trial_active=self.trial, slots=slots,
            )

    def prepare(self, request: UpdateRequest) -> PreparedUpdate:
        self._record("prepare", request)
        if request.version == "explode":
            raise RuntimeError("secret internals: /etc/shadow line 3")
        if request.fd is None and not request.version:
            raise errors.InvalidArgument("give a version")
        booted = self.slots[self.booted].version
        if request.version and request.version == booted:
            raise errors.UpToDate(f"version {booted} is already running")
        if request.version and request.version < booted and not request.allow_downgrade:
            raise errors.Downgrade(f"{request.version} is older than the running {booted}; allow a downgrade")
        target = "b" if self.booted == "a" else "a"
        source = f"fd {request.fd}" if request.fd is not None else f"https://example.invalid/{request.version}.img.gz"
        return PreparedUpdate(request=request, target_slot=target, image_url=source,
                              description=f"install {request.version or 'image'} from {source} into slot {target}")

    def run(self, prepared: PreparedUpdate, progress: Callable[[Progress], None],
            cancel: threading.Event) -> UpdateOutcome:
        self._record("run", prepared)
        request = prepared.request
        target = self.slots[prepared.target_slot]
        with self.lock:
            target.state = "incomplete"
            target.version = ""
        digest = hashlib.sha256()
        try:
            if self.hold is not None:
                while not self.hold.wait(0.05):
                    if cancel.is_set():
                        raise errors.Cancelled("the install was cancelled")
            total = request.size if request.size else (None if request.fd is not None else self.image_size)
            done = 0
            while True:
                if cancel.is_set():
                    raise errors.Cancelled("the install was cancelled")
                if request.fd is not None:
                    try:
                        data = os.read(request.fd, self.chunk)
                    except OSError as exc:
                        raise errors.BadImage(f"reading the image failed: {exc.strerror}") from exc
                    if not data:
                        break
                    digest.update(data)
                    done += len(data)
                else:
                    if done >= self.image_size:
                        break
                    step = min(self.chunk, self.image_size - done)
                    digest.update(bytes(step))
                    done += step
                progress(Progress("writing", done, total, done))
                if self.chunk_delay:
                    time.sleep(self.chunk_delay)
            if total is not None and done < total:
                raise errors.BadImage(f"the image ended after {done} of {total} bytes (truncated)")
            verified = 0
            while verified < done:
                if cancel.is_set():
                    raise errors.Cancelled("the install was cancelled")
                verified = min(done, verified + 4 * self.chunk)
                progress(Progress("verifying", verified, done, done))
            version = request.version or "from-fd"
            with self.lock:
                target.version = version
                target.state = "trial"
                target.installed = {"version": version, "sha256": digest.hexdigest(), "time": int(time.time()),
                                    "result": "ok"}
            return UpdateOutcome(slot=target.name, version=version, sha256=digest.hexdigest(), rebooting=False,
                                 message=f"installed {version} into slot {target.name}; reboot to try it")
        finally:
            if request.fd is not None:
                os.close(request.fd)
                self.fds_closed.append(request.fd)

    def check(self) -> CheckResult:
        self._record("check")
        return CheckResult(current=self.slots[self.booted].version, available="9.9", update_available=True)

    def mark_good(self) -> None:
        self._record("mark_good")
        if not self.trial:
            raise errors.NoTrial("this boot is not a trial boot; nothing to mark")
        self.trial = False
        self.primary = self.booted

    def mark_bad(self) -> None:
        self._record("mark_bad")
        if not self.trial:
            raise errors.NoTrial("this boot is not a trial boot; nothing to mark")

    def rollback(self) -> None:
        self._record("rollback")
        self.primary = "b" if self.primary == "a" else "a"

    def reboot(self, mode: str) -> None:
        self._record("reboot", mode)

    def boot_check(self) -> BootCheckResult:
        return BootCheckResult(trial=False, committed=False, message="not a trial boot")


def _serve_fake(argv: Sequence[str]) -> int:
    """``python -m tests.support.bus serve-fake``: the real service process, with FakeUpdater as its engine."""
    import logging

    from abflasher.service.daemon import serve

    parser = argparse.ArgumentParser(prog="serve-fake")
    parser.add_argument("--image-size", type=int, default=4 * MIB)
    parser.add_argument("--chunk", type=int, default=256 * 1024)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    parser.add_argument("--idle-timeout", type=float, default=0.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    updater = FakeUpdater(image_size=args.image_size, chunk=args.chunk, chunk_delay=args.chunk_delay)
    return asyncio.run(serve(updater, idle_timeout=args.idle_timeout))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve-fake":
        sys.exit(_serve_fake(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} serve-fake [options]")


# ---------------------------------------------------------------------------------------------------------------------
# The service in the test's own event loop (unit tests)


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


# ---------------------------------------------------------------------------------------------------------------------
# Observing the service from a test whose main thread waits on processes


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
