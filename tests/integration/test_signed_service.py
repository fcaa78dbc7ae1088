"""Signed updates through the real service (private system bus, real polkitd, real users running abflasherctl):
a signed channel installs with `abflasherctl update` and no version (Update), a bundle with `abflasherctl update
--file` (UpdateFromFd), an unsigned upload is refused with nothing armed, and `abflasherctl info` inspects a
bundle as an ordinary user."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from abflasher.autoupdate import Outcome, record_outcome
from abflasher.trust.publish import Published, Release, publish
from tests.support.service_rig import Device, Rig, json_lines, simulated_device, slot_of, status_of
from tests.support.serviceprocess import ServiceProcess, config_file_text
from tests.support.signing import Key, make_key, write_allowed_signers

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

COMPATIBLE = "acme-pi4"


@pytest.fixture(scope="module")
def owner(rig: Rig) -> Key:
    return make_key(rig.workdir / "keys", "owner")


@pytest.fixture(scope="module")
def release(rig: Rig, owner: Key) -> Published:
    out = rig.workdir / "release-1.1.0"
    published = publish(Release(image=rig.images["1.1.0"], version="1.1.0", compatible=COMPATIBLE, output_dir=out,
                                key=str(owner.private), compression="gzip", release_notes="Signed.\n"))
    for path in (out, *out.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return published


@pytest.fixture
def device(rig: Rig, tmp_path: Path, owner: Key, release: Published) -> Iterator[Device]:
    for device in simulated_device(rig, tmp_path):
        allowed = write_allowed_signers(rig.workdir / "allowed_signers", owner.allowed_line())
        allowed.chmod(0o644)
        for path in (release.manifest, release.signature, *release.artifacts):
            device.server.add(f"/channel/{path.name}", path.read_bytes())
        device.pi.config = dataclasses.replace(device.pi.config, trusted_keys=str(allowed), compatible=COMPATIBLE,
                                               channel_url=device.url("/channel/manifest.json"))
        device.config_path.write_text(config_file_text(device.pi.config))
        yield device


@pytest.fixture
def service(rig: Rig, device: Device) -> Iterator[ServiceProcess]:
    with ServiceProcess([rig.venv.daemon, "--config", device.config_path], rig.bus) as process:
        yield process


def test_a_signed_channel_installs_with_update_and_no_version(
    rig: Rig, device: Device, service: ServiceProcess
) -> None:
    member = rig.users.member
    check = rig.ctl(member, "--json", "check")
    assert check.returncode == 0, check.stderr.decode()
    offer = json.loads(check.stdout)
    assert (offer["available"], offer["update_available"], offer["compatible"]) == ("1.1.0", True, COMPATIBLE)
    assert offer["signer"].startswith("owner (ssh-ed25519 SHA256:")
    assert offer["release_notes"] == "Signed.\n"

    done = rig.ctl(member, "--json", "update")
    assert done.returncode == 0, done.stderr.decode()
    assert json_lines(done.stdout)[-1]["success"] is True
    status = status_of(rig, member)
    assert (slot_of(status, "b")["version"], slot_of(status, "b")["state"]) == ("1.1.0", "trial")
    assert slot_of(status, "b")["installed"]["source"] == device.url("/channel/manifest.json")


def test_a_bundle_installs_with_update_from_fd(rig: Rig, device: Device, service: ServiceProcess,
                                               release: Published) -> None:
    member = rig.users.member
    done = rig.ctl(member, "--json", "update", "--file", str(release.bundle))
    assert done.returncode == 0, done.stderr.decode()
    status = status_of(rig, member)
    assert (slot_of(status, "b")["version"], slot_of(status, "b")["state"]) == ("1.1.0", "trial")


def test_an_unsigned_upload_is_refused_and_nothing_is_armed(rig: Rig, device: Device, service: ServiceProcess,
                                                             release: Published) -> None:
    member = rig.users.member
    before = device.pi.boot_config_files()
    done = rig.ctl(member, "--json", "update", "--file", str(release.artifacts[0]))
    assert done.returncode == 12, done.stderr.decode()  # Signature
    assert "not a signed bundle" in done.stderr.decode()
    assert json_lines(done.stdout)[-1]["error"] == "Signature"
    assert device.pi.boot_config_files() == before
    assert slot_of(status_of(rig, member), "b")["state"] != "trial"


def test_info_and_the_timer_outcome_in_status(rig: Rig, device: Device, release: Published) -> None:
    member = rig.users.member
    info = rig.ctl(member, "--json", "info", str(release.bundle), "--keys", str(rig.workdir / "allowed_signers"))
    assert info.returncode == 0, info.stderr.decode()
    shown = json.loads(info.stdout)
    assert (shown["version"], shown["compatible"], shown["signature"]) == ("1.1.0", COMPATIBLE, "valid")
    assert shown["signer"].startswith("owner (ssh-ed25519")
    untrusted = rig.ctl(member, "info", str(release.bundle), "--keys", "/nonexistent")
    assert "not checked" in untrusted.stdout.decode()

    record_outcome(device.pi.config, Outcome("available", "version 1.1.0 is available (running 1.0.0)", "1.1.0",
                                             1_800_000_000))
    with ServiceProcess([rig.venv.daemon, "--config", device.config_path], rig.bus):
        status = rig.ctl(member, "status")
    assert "auto-update: " in status.stdout.decode()
    assert "version 1.1.0 is available" in status.stdout.decode()
