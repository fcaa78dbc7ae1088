"""polkit for service tests: the real ``polkitd`` on a private bus, python-dbusmock's polkitd template, and the
project's policy and rules installed where polkitd reads them.

- :class:`PolkitDaemon` — the real ``polkitd``, started as root against a private bus (it drops to its own user).
- :class:`DbusmockPolkit` — python-dbusmock's polkitd template (unit tests): every action denied until allowed.
- :func:`installed_polkit_files` — the project's policy and rules in the directories polkitd reads, removed after.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from dbus_next.constants import MessageType

from tests.support.bus import REPO, DBusDaemon, bus_call, stop_process, wait_for_name

POLKITD = Path("/usr/lib/polkit-1/polkitd")
POLKIT_ACTIONS_DIR = Path("/usr/share/polkit-1/actions")
POLKIT_RULES_DIR = Path("/etc/polkit-1/rules.d")
POLICY_FILE = "org.abflasher.Updater.policy"
RULES_FILE = "org.abflasher.Updater.rules"


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
