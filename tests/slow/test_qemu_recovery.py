"""End-to-end update mode (the slow tier, docs/slow-tier.md): a main + recovery disk laid out by
``ab-flasher provision``, the `.deb` in both systems, the host uploading through the recovery system's page.

1. main (1.0.0) is asked for update mode: ``abflasherctl reboot recovery`` (D-Bus ``Reboot('recovery')``) reboots
   with ``0 tryboot``;
2. the firmware model boots the recovery folder ``r/`` once; recovery runs read-only, ab-flasher-web serves
   (enabled = auto: the booted slot's role is recovery); the host uploads the image with curl over QEMU's user
   network (hostfwd) to ``PUT /api/upload``, then asks the page to reboot into the trial;
3. main (1.1.0) boots on trial and its boot-check commits it;
4. a plain boot starts main 1.1.0.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.slow.guest import (
    CACHE_DIR,
    BaseRoot,
    Timings,
    build_deb,
    ensure_base_root,
    make_guest_tree,
    make_update_image,
)
from tests.slow.qemu import GuestBoot, QemuPi
from tests.slow.recovery_guest import RECOVERY_VERSION, WEB_PASSWORD, build_recovery_disk

pytestmark = [pytest.mark.slow, pytest.mark.root]

LOG_DIR = CACHE_DIR / "logs"
TIMINGS_FILE = CACHE_DIR / "timings-recovery.txt"
#: A boot in update mode lasts the whole upload: writing and verifying a few hundred MiB in a TCG guest.
UPDATE_MODE_BOOT_TIMEOUT = 2400.0


@dataclass(frozen=True)
class RecoveryBuild:
    base: BaseRoot
    tree: Path
    image: Path
    sha256: str
    timings: Timings


@pytest.fixture(scope="module")
def recovery_build(tmp_path_factory: pytest.TempPathFactory,
                   request: pytest.FixtureRequest) -> Iterator[RecoveryBuild]:
    work = tmp_path_factory.mktemp("recovery-guest")
    timings = Timings()
    with timings.phase("base root (debootstrap, or the cache)"):
        base = ensure_base_root()
    with timings.phase("make deb"):
        deb = build_deb(work / "deb")
    with timings.phase("guest tree (copy of the base + dpkg -i)"):
        tree = make_guest_tree(base, deb, work / "tree")
    with timings.phase("update image 1.1.0 (mkfs.ext4 -d + gzip -1)"):
        image = work / "root-1.1.0.img.gz"
        sha = make_update_image(tree, image, "1.1.0")
    yield RecoveryBuild(base, tree, image, sha, timings)
    timings.save(TIMINGS_FILE, request.config)
    shutil.rmtree(work)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _curl(*args: str, timeout: float) -> tuple[int, dict[str, object]]:
    done = subprocess.run(["curl", "-sS", "--max-time", str(int(timeout)), "-u", f":{WEB_PASSWORD}", *args,
                           "-w", "\n%{http_code}"], capture_output=True, text=True, timeout=timeout + 30, check=False)
    body, _, code = done.stdout.rpartition("\n")
    assert done.returncode == 0, f"curl {args}: {done.stderr}"
    return int(code), json.loads(body) if body.strip() else {}


def _describe(boot: GuestBoot) -> str:
    return (f"boot {boot.number} (partition {boot.decision.partition}, {boot.decision.kernel}, root partition "
            f"{boot.root_partition}, ended by {boot.ended}); console tail:\n{boot.tail()}")


@pytest.mark.timeout(5400)
def test_update_mode_upload_through_the_page_then_main_is_tried_and_committed(
        recovery_build: RecoveryBuild, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    timings = recovery_build.timings
    with timings.phase("disk image (ab-flasher provision, main + recovery)"):
        disk = build_recovery_disk(tmp_path / "disk.img", recovery_build.tree, recovery_build.base, tmp_path)
    boots_dir = tmp_path / "boots"
    boots_dir.mkdir()
    pi = QemuPi(disk, boots_dir, boot_timeout=UPDATE_MODE_BOOT_TIMEOUT, timings=timings)
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    results: dict[str, object] = {}

    def upload() -> None:
        """The laptop on the tether: what the page says, the upload with curl, then the reboot into the trial."""
        results["status"] = _curl(f"{base_url}/api/status", timeout=120)
        results["upload"] = _curl("-T", str(recovery_build.image),
                                  f"{base_url}/api/upload?sha256={recovery_build.sha256}",
                                  timeout=UPDATE_MODE_BOOT_TIMEOUT - 300)
        code, body = results["upload"]  # type: ignore[misc]
        assert code == 200, body
        results["reboot"] = _curl("-X", "POST", "-H", "Content-Type: application/json", "-d", '{"mode": "trial"}',
                                  f"{base_url}/api/reboot", timeout=120)

    try:
        pi.write_data_file("/abtest/request-recovery", "update mode\n")
        main = pi.boot()
        assert main.root_partition == 2, _describe(main)
        assert main.value("version") == "1.0.0", _describe(main)
        assert "reboot-recovery" in main.seen, _describe(main)
        assert main.ended == "reboot", _describe(main)
        assert pi.decide(tryboot=False).os_prefix == "m/", "update mode is one boot: main stays committed"

        recovery = pi.boot(forward_port=port, on_marker=("recovery-ready", upload))
        assert recovery.decision.tryboot, _describe(recovery)
        assert recovery.decision.os_prefix == "r/", _describe(recovery)
        assert recovery.root_partition == 5, _describe(recovery)
        assert recovery.value("version") == RECOVERY_VERSION, _describe(recovery)
        assert "ro" in recovery.value("root-options").split(","), "recovery runs from a read-only root"
        assert recovery.value("web") == "active", _describe(recovery)
        code, status = results["status"]  # type: ignore[misc]
        assert code == 200, status
        code, uploaded = results["upload"]  # type: ignore[misc]
        assert (code, uploaded.get("success")) == (200, True), uploaded
        assert "version 1.1.0 installed in slot main" in str(uploaded.get("message")), uploaded
        code, rebooting = results["reboot"]  # type: ignore[misc]
        # The reboot stops the service and the page; both answer the request first (docs/web-api.md, Reboots).
        assert (code, rebooting) == (200, {"rebooting": "trial"}), rebooting
        assert recovery.ended == "reboot", _describe(recovery)
        # Recovery was made the committed slot before main was written.
        assert pi.decide(tryboot=False).os_prefix == "r/"

        trial = pi.boot()
        assert trial.decision.tryboot, _describe(trial)
        assert trial.decision.os_prefix == "m/", _describe(trial)
        assert trial.root_partition == 2, _describe(trial)
        assert trial.value("version") == "1.1.0", _describe(trial)
        verdict = trial.boot_check_verdict()
        assert any(" committed" in line for line in verdict), f"{verdict}\n{_describe(trial)}"
        assert trial.ended == "poweroff", _describe(trial)
        assert pi.decide(tryboot=False).os_prefix == "m/", "main is committed again"

        after = pi.boot()
        assert not after.decision.tryboot
        assert after.root_partition == 2, _describe(after)
        assert after.value("version") == "1.1.0", _describe(after)
        assert after.ended == "poweroff", _describe(after)
        slots = {s["name"]: (s["state"], s["primary"]) for s in json.loads(after.value("ctl-status"))["slots"]}
        assert slots == {"main": ("good", True), "recovery": ("good", False)}, slots
        wall = pi.boots[-1].started + pi.boots[-1].seconds - pi.boots[0].started
        line = (f"update mode: {len(pi.boots)} boots ({', '.join(b.ended for b in pi.boots)}), wall {wall:.0f} s, "
                f"upload to reboot {recovery.started + recovery.seconds - recovery.seen['recovery-ready']:.0f} s")
        timings.phases.append((line, wall))
        print(line)
    finally:
        logs = LOG_DIR / request.node.name
        shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir(parents=True)
        for boot in pi.boots:
            (logs / f"boot{boot.number}.log").write_text(boot.console)
        disk.path.unlink(missing_ok=True)
