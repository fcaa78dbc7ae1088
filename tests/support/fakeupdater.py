"""A fake engine: the engine's API, simulated, for service tests that need no disk.

:class:`FakeUpdater` reports progress by chunks, honours a cancel event and reads a real fd.
``python -m tests.support.fakeupdater serve-fake`` runs the real service process with it as its engine (for cases
the real engine cannot be made to show quickly).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import os
import select
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from abflasher import errors
from abflasher.api import (
    BootCheckResult,
    CheckResult,
    PreparedUpdate,
    SlotStatus,
    SystemStatus,
    UpdateOutcome,
    UpdateRequest,
)
from abflasher.image.pipeline import Progress
from tests.support.bus import MIB


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
        booted_version: str = "1.0", hold: threading.Event | None = None, recovery: str = "none",
    ) -> None:
        """``recovery``: none | present (a recovery slot besides a and b) | booted (and it is the running one)."""
        self.image_size = image_size
        self.chunk = chunk
        self.chunk_delay = chunk_delay
        self.hold = hold
        self.lock = threading.Lock()
        self.slots = {"a": FakeSlot("a", booted_version, "good"), "b": FakeSlot("b", "", "unknown")}
        self.booted = "a"
        self.primary = "a"
        if recovery != "none":
            self.slots["recovery"] = FakeSlot("recovery", "1.0-recovery", "good", role="recovery")
        if recovery == "booted":
            self.booted = self.primary = "recovery"
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
            # As the engine does: no version is the channel's newest.
            request = dataclasses.replace(request, version=self.check().available)
        booted = self.slots[self.booted].version
        if request.version and request.version == booted:
            raise errors.UpToDate(f"version {booted} is already running")
        if request.version and request.version < booted and not request.allow_downgrade:
            raise errors.Downgrade(f"{request.version} is older than the running {booted}; allow a downgrade")
        target = "b" if self.booted == "a" else "a"  # from recovery: slot a (main)
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
                    # As the engine's FdSource: wait for data while looking at the cancel event, so a silent
                    # uploader cannot hold the job.
                    if not select.select([request.fd], [], [], 0.05)[0]:
                        continue
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
    """``python -m tests.support.fakeupdater serve-fake``: the real service process, with FakeUpdater as its engine."""
    import logging

    from abflasher.service.daemon import serve

    parser = argparse.ArgumentParser(prog="serve-fake")
    parser.add_argument("--image-size", type=int, default=4 * MIB)
    parser.add_argument("--chunk", type=int, default=256 * 1024)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    parser.add_argument("--idle-timeout", type=float, default=0.0)
    parser.add_argument("--recovery", choices=("none", "present", "booted"), default="none")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    updater = FakeUpdater(image_size=args.image_size, chunk=args.chunk, chunk_delay=args.chunk_delay,
                          recovery=args.recovery)
    return asyncio.run(serve(updater, idle_timeout=args.idle_timeout))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve-fake":
        sys.exit(_serve_fake(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} serve-fake [options]")
