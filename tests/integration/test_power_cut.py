"""A power cut at any moment leaves a Pi that boots a good slot: proven write by write, sector by sector.

Every write the product makes to the FAT partitions the firmware reads is recorded with strace while it disarms,
installs and arms, commits, rejects and rolls back (tests/support/writerecorder.py). The recording is proven
complete (the partitions before, plus the writes, are the partitions after); then for every prefix of the write
sequence, and every sector boundary inside each write, the partitions a power cut there would leave are rebuilt
and the firmware model (tests/pifirmware.py) is asked what boots, with and without the one-shot tryboot flag.

A state passes when the firmware boots, with a kernel that exists, one of the slots that are good at that moment,
exactly as it boots that slot from a complete state (the partitions before or after the step): the same boot
partition, config file, os_prefix, kernel and cmdline. Good at that moment: without the flag, the committed slot
before or after the step; with the flag also the slot armed before the step (until its root is first written) and
the slot the step arms (once its root is completely written). A second test kills a real update at random moments
with SIGKILL and asks the same question of what it leaves.
"""

from __future__ import annotations

import gzip
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from abflasher.api import UpdateRequest
from tests import pifirmware
from tests.integration.test_ab_cycle import root_image
from tests.support.pidisk import build_root_image
from tests.support.simpi import SimulatedPi
from tests.support.update_driver import save_config
from tests.support.writerecorder import (
    RecordedWrite,
    RecordedZeroing,
    WriteRecorder,
    check_replay,
    crash_states,
)

pytestmark = [pytest.mark.root]

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20

BootKey = tuple[int, str, str, str, str]  # partition, os_prefix, kernel, cmdline file, cmdline


@dataclass
class Verdict:
    slot: str | None
    key: BootKey | None
    problem: str = ""


def boot_verdict(pi: SimulatedPi, disk: pifirmware.BootDisk, *, tryboot: bool) -> Verdict:
    try:
        decision = pifirmware.decide_boot(disk, tryboot=tryboot)
        slot = pi.slot_for(decision)
    except (pifirmware.FirmwareModelError, KeyError) as exc:
        return Verdict(None, None, f"{type(exc).__name__}: {exc}")
    key = (decision.partition, decision.os_prefix, decision.kernel, decision.cmdline_file, decision.cmdline)
    return Verdict(slot, key)


@dataclass
class StepReport:
    name: str
    writes: int
    states: int


class PowerCutProof:
    """Records one step of the product at a time and checks every crash state it could leave."""

    def __init__(self, pi: SimulatedPi, workdir: Path) -> None:
        self.pi = pi
        self.workdir = workdir
        self.fat_partitions = sorted(part.number for part in pi.image.partitions
                                     if part.role in ("boot", "autoboot") or part.role.startswith("boot_"))
        self.roots = pi.roots()
        self.reports: list[StepReport] = []

    def node(self, number: int) -> str:
        return f"{self.pi.loop.device}p{number}"

    def snapshot(self, tag: str) -> dict[str, Path]:
        self.pi.flush()
        images: dict[str, Path] = {}
        for number in self.fat_partitions:
            target = self.workdir / f"{tag}-p{number}.img"
            with open(self.node(number), "rb") as source, target.open("wb") as out:
                while chunk := source.read(4 * MIB):
                    out.write(chunk)
            images[f"p{number}"] = target
        return images

    def boots(self, images: dict[str, Path]) -> dict[bool, Verdict]:
        fat_images = {int(name[1:]): path for name, path in images.items()}
        disk = pifirmware.PartitionImagesDisk(self.pi.image.path, fat_images)
        return {flag: boot_verdict(self.pi, disk, tryboot=flag) for flag in (False, True)}

    def step(self, name: str, action: Callable[[], object], *, committed: tuple[str, str],
             armed: tuple[str | None, str | None]) -> None:
        """Run ``action`` recorded; ``committed``/``armed``: the committed and armed slot before and after it."""
        pre = self.snapshot(f"{name}-pre")
        with WriteRecorder(self.workdir / f"{name}-trace") as recorder:
            action()
        post = self.snapshot(f"{name}-post")
        paths = {self.node(number): f"p{number}" for number in self.fat_partitions}
        events = recorder.events()
        touched = {event.path for event in events}
        data_node = self.node(self.pi.data_partition())
        assert data_node not in touched, f"{name}: the data partition was written"
        assert self.pi.loop.device not in touched, f"{name}: the whole disk was written past the partitions"
        writes = [RecordedWrite(e.time, e.pid, paths[e.path], e.offset, e.data)
                  for e in events if isinstance(e, RecordedWrite) and e.path in paths]
        check_replay(pre, post, writes, self.workdir)

        # For each FAT write: the root partitions written before it, and which slots are written at all.
        root_events = [(e.time, self.roots[int(e.path.rsplit("p", 1)[1])]) for e in events
                       if isinstance(e, (RecordedWrite, RecordedZeroing)) and e.path.startswith(self.pi.loop.device)
                       and e.path.rsplit("p", 1)[-1].isdigit() and int(e.path.rsplit("p", 1)[1]) in self.roots]
        written = {slot for _, slot in root_events}
        last_root_write = {slot: max(t for t, s in root_events if s == slot) for slot in written}
        first_root_write = {slot: min(t for t, s in root_events if s == slot) for slot in written}

        references: dict[str, set[BootKey]] = {}
        for images in (pre, post):
            for verdict in self.boots(images).values():
                if verdict.slot is not None and verdict.key is not None:
                    references.setdefault(verdict.slot, set()).add(verdict.key)

        working = {key: self.workdir / f"{name}-working-{key}.img" for key in pre}
        for key, path in pre.items():
            working[key].write_bytes(path.read_bytes())
        count = 0
        for state in crash_states(working, writes):
            count += 1
            # The moment of this state: just after the last write it contains (before the first, at the start).
            moment = writes[state.index - 1].time if state.index else float("-inf")
            if state.sectors:
                moment = writes[state.index].time
            normal_ok = {committed[0], committed[1]}
            # A committed slot that this step overwrites (main, written from recovery) is good only until its root
            # is first written, and again only once it is committed after the step.
            for slot in written & normal_ok:
                if moment >= first_root_write[slot] and not (slot == committed[1] and moment > last_root_write[slot]):
                    normal_ok.discard(slot)
            flagged_ok = set(normal_ok)
            before, after = armed
            if before is not None and (before not in written or moment < first_root_write[before]):
                flagged_ok.add(before)
            if after is not None and (after not in written or moment > last_root_write[after]):
                flagged_ok.add(after)
            for flag, verdict in self.boots(working).items():
                allowed = flagged_ok if flag else normal_ok
                where = f"{name}, {state.label}, tryboot flag {'set' if flag else 'clear'}"
                assert verdict.slot in allowed, f"{where}: boots {verdict.slot} ({verdict.problem}); " \
                                                f"good slots then: {sorted(allowed)}"
                assert verdict.key in references.get(verdict.slot, set()), \
                    f"{where}: boots slot {verdict.slot} as no complete state does: {verdict.key}"
        self.reports.append(StepReport(name, len(writes), count))


def install_step(pi: SimulatedPi, image: Path, version: str) -> Callable[[], object]:
    def run() -> object:
        updater = pi.updater()
        fd = os.open(image, os.O_RDONLY)
        prepared = updater.prepare(UpdateRequest(version=version, fd=fd, size=image.stat().st_size))
        return updater.run(prepared, lambda progress: None, threading.Event())
    return run


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("layout", ["prefix", "autoboot"])
def test_every_power_cut_while_switching_slots_boots_a_good_slot(tmp_path: Path, layout: str) -> None:
    with SimulatedPi(tmp_path, layout, switch_files="legacy") as pi:  # type: ignore[arg-type]
        if layout == "prefix":
            # tryboot.txt as ab-flasher 0.x wrote it: a full copy of config.txt. The boot check makes it include
            # config.txt instead, sector by sector.
            copy = tmp_path / "tryboot-copy.txt"
            copy.write_bytes((pi.fat_file(1, "config.txt") or b"") + b"# a comment from the image\n" * 40)
            subprocess.run(["mcopy", "-o", "-i", f"{pi.loop.device}p1", str(copy), "::/tryboot.txt"], check=True,
                           capture_output=True, timeout=60, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
        proof = PowerCutProof(pi, tmp_path / "proof")
        proof.workdir.mkdir()
        proof.step("boot-check (normal boot, old switch files)", pi.updater().boot_check,
                   committed=("a", "a"), armed=("b" if layout == "autoboot" else None, None))
        proof.step("update 1.1.0 (disarm, write b, arm b)", install_step(pi, root_image(tmp_path, "1.1.0"), "1.1.0"),
                   committed=("a", "a"), armed=(None, "b"))
        proof.step("update 1.1.1 over the armed b", install_step(pi, root_image(tmp_path, "1.1.1"), "1.1.1"),
                   committed=("a", "a"), armed=("b", "b"))
        assert pi.boot(tryboot=True) == "b"
        proof.step("boot-check on the trial of b (commit)", pi.updater().boot_check,
                   committed=("a", "b"), armed=("b", None))
        proof.step("update 1.2.0 into a", install_step(pi, root_image(tmp_path, "1.2.0"), "1.2.0"),
                   committed=("b", "b"), armed=(None, "a"))
        pi.set_health(False)
        assert pi.boot(tryboot=True) == "a"
        proof.step("boot-check on the trial of a (health fails: reject)", pi.updater().boot_check,
                   committed=("b", "b"), armed=("a", None))
        pi.set_health(True)
        assert pi.boot(tryboot=False) == "b"
        proof.step("update 1.2.1 into a", install_step(pi, root_image(tmp_path, "1.2.1"), "1.2.1"),
                   committed=("b", "b"), armed=(None, "a"))
        assert pi.boot(tryboot=True) == "a"
        proof.step("mark-good of a", pi.updater().mark_good, committed=("b", "a"), armed=("a", None))
        proof.step("rollback to b", pi.updater().rollback, committed=("a", "b"), armed=(None, None))
        assert pi.slot_for(pi.firmware(tryboot=False)) == "b"

    total = sum(report.states for report in proof.reports)
    print(f"\n{layout}: {total} crash states, {sum(r.writes for r in proof.reports)} recorded writes")
    for report in proof.reports:
        print(f"  {report.name}: {report.writes} writes, {report.states} states")
    assert total >= 100


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("layout", ["prefix", "autoboot"])
def test_every_power_cut_in_main_and_recovery_boots_a_good_slot(tmp_path: Path, layout: str) -> None:
    """Update mode in main + recovery: recovery armed once, committed before main is written, main tried and
    committed; and a main that fails its health check, with recovery then the committed slot."""
    (tmp_path / "device").mkdir()
    with SimulatedPi(tmp_path / "device", layout, variant="main+recovery") as pi:  # type: ignore[arg-type]
        proof = PowerCutProof(pi, tmp_path / "proof")
        proof.workdir.mkdir()
        proof.step("boot-check (main, provisioned)", pi.updater().boot_check, committed=("main", "main"),
                   armed=(None, None))
        proof.step("reboot recovery (arm recovery once)", lambda: pi.updater().reboot("recovery"),
                   committed=("main", "main"), armed=(None, "recovery"))
        assert pi.boot(tryboot=True) == "recovery"
        proof.step("boot-check in recovery (disarm)", pi.updater().boot_check, committed=("main", "main"),
                   armed=("recovery", None))
        proof.step("update 1.1.0 from recovery (commit recovery, write main, arm main)",
                   install_step(pi, root_image(tmp_path, "1.1.0"), "1.1.0"),
                   committed=("main", "recovery"), armed=(None, "main"))
        assert pi.boot(tryboot=True) == "main"
        pi.set_health(False)
        proof.step("boot-check on the trial of main (health fails: reject)", pi.updater().boot_check,
                   committed=("recovery", "recovery"), armed=("main", None))
        pi.set_health(True)
        assert pi.boot(tryboot=False) == "recovery"
        proof.step("update 1.2.0 from recovery (recovery committed already)",
                   install_step(pi, root_image(tmp_path, "1.2.0"), "1.2.0"),
                   committed=("recovery", "recovery"), armed=(None, "main"))
        assert pi.boot(tryboot=True) == "main"
        proof.step("boot-check on the trial of main (commit)", pi.updater().boot_check,
                   committed=("recovery", "main"), armed=("main", None))
        assert pi.slot_for(pi.firmware(tryboot=False)) == "main"
    total = sum(report.states for report in proof.reports)
    print(f"\n{layout} main+recovery: {total} crash states, {sum(r.writes for r in proof.reports)} recorded writes")
    for report in proof.reports:
        print(f"  {report.name}: {report.writes} writes, {report.states} states")
    assert total >= 20


def _stages_of(process: subprocess.Popen[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.strip())
        lines.put("")

    threading.Thread(target=read, daemon=True).start()
    return lines




@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", ["prefix", "autoboot"])
def test_an_update_killed_at_random_moments_leaves_a_good_slot(tmp_path: Path, layout: str) -> None:
    rng = random.Random(f"sigkill-{layout}")  # seeded: a failure names a moment that can be replayed
    image = tmp_path / "root-1.1.0.img.gz"
    raw = tmp_path / "root-1.1.0.img"
    # Incompressible content, so writing and verifying take long enough to be cut at random points.
    build_root_image(raw, "1.1.0", size_mb=64, extra_files={"opt/blob": rng.randbytes(40 * MIB)})
    with raw.open("rb") as source, gzip.open(image, "wb", compresslevel=1) as packed:
        shutil.copyfileobj(source, packed)
    raw.unlink()
    (tmp_path / "device").mkdir()
    with SimulatedPi(tmp_path / "device", layout, root_mb=72) as pi:  # type: ignore[arg-type]
        config = tmp_path / "config.json"
        save_config(pi.config, config)
        outcomes: list[str] = []
        for stage in ("writing", "verifying", "configuring") * 3:
            delay = rng.uniform(0.0, 0.1)
            process = subprocess.Popen([sys.executable, "-m", "tests.support.update_driver", str(config), str(image),
                                        "1.1.0"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                       text=True)
            lines = _stages_of(process)
            finished = False
            try:
                deadline = time.monotonic() + 120
                while lines.get(timeout=max(0.1, deadline - time.monotonic())) not in (stage, "", "done"):
                    pass
                time.sleep(delay)
                finished = process.poll() is not None
                process.send_signal(signal.SIGKILL)
            finally:
                process.kill()
                process.wait(timeout=60)
            outcomes.append(f"{stage}+{delay:.3f}s: {'finished first' if finished else 'killed'}")
            pi.flush()
            outcomes[-1] += f", a tryboot starts {pi.slot_for(pi.firmware(tryboot=True))}"

            pi.flush()
            assert pi.slot_for(pi.firmware(tryboot=False)) == "a", f"{outcomes[-1]}: without the flag"
            try:
                flagged = pi.slot_for(pi.firmware(tryboot=True))
            except pifirmware.FirmwareModelError as exc:
                raise AssertionError(f"{outcomes[-1]}: with the flag nothing boots ({exc})") from exc
            if flagged == "b":
                # Armed only after the read-back verify and the fix-up: the new root is whole and knows itself.
                assert pi.slot_file("b", "/.ab_version") == b"1.1.0\n", outcomes[-1]
                fstab = (pi.slot_file("b", "/etc/fstab") or b"").decode()
                assert f"PARTUUID={pi.image.partuuid(pi.image.root('b').number)}" in fstab, outcomes[-1]
            else:
                assert flagged == "a", f"{outcomes[-1]}: with the flag it boots {flagged}"
            # A service killed and restarted (not a power cut): a root it had mounted is still mounted.
            pi.boot(tryboot=False)
            pi.updater().boot_check()
            assert pi.slot_for(pi.firmware(tryboot=True)) == "a", "after the boot check nothing is armed"

        # The device is not left stuck: the next update goes through, and its trial commits.
        install_step(pi, image, "1.1.0")()
        assert pi.boot(tryboot=True) == "b"
        assert pi.updater().boot_check().committed
        assert pi.slot_for(pi.firmware(tryboot=False)) == "b"
    print(f"\n{layout}: " + "; ".join(outcomes))
