"""Signed updates on a simulated Pi (real loop disk, the firmware model, real ssh-keygen keys): bundles made by the
publisher or by hand install end to end from an fd and a channel over HTTP; every refusal has its own error and leaves
nothing armed and nothing written outside the target slot."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from abflasher import errors
from abflasher.api import UpdateRequest
from abflasher.trust.publish import Published, Release, publish
from tests.integration.test_ab_cycle import boot_artifact
from tests.support.httpserver import FaultServer
from tests.support.pidisk import build_root_image
from tests.support.signing import Key, bundle_of, make_key, tar_members, write_allowed_signers
from tests.support.simpi import SimulatedPi

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

COMPATIBLE = "acme-pi4"
DAY = 86400


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Key]:
    directory = tmp_path_factory.mktemp("keys")
    return {name: make_key(directory, name) for name in ("owner", "stranger")}


@pytest.fixture(scope="module")
def raw_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("images")
    images = {}
    for version in ("0.9.0", "1.1.0", "1.2.0"):
        images[version] = directory / f"root-{version}.img"
        build_root_image(images[version], version, size_mb=24, extra_files={"etc/hostname": "pi\n"})
    return images


@dataclasses.dataclass
class Device:
    pi: SimulatedPi
    server: FaultServer
    allowed: Path
    keys: dict[str, Key]
    images: dict[str, Path]
    workdir: Path

    def release(self, version: str, *, name: str = "", key: str = "owner", **options: object) -> Published:
        out = self.workdir / (name or f"release-{version}-{len(list(self.workdir.iterdir()))}")
        settings: dict[str, object] = {"compression": "gzip", **options}
        return publish(Release(image=self.images[version], version=version, compatible=COMPATIBLE, output_dir=out,
                               key=str(self.keys[key].private), **settings))  # type: ignore[arg-type]

    def serve_channel(self, published: Published, prefix: str = "/channel") -> str:
        for path in (published.manifest, published.signature, *published.artifacts):
            self.server.add(f"{prefix}/{path.name}", path.read_bytes())
        return self.server.url(f"{prefix}/manifest.json")

    def install_fd(self, data: bytes | Path, **options: object) -> None:
        path = data if isinstance(data, Path) else self.workdir / "upload.bin"
        if not isinstance(data, Path):
            path.write_bytes(data)
        updater = self.pi.updater()
        fd = os.open(path, os.O_RDONLY)
        request = UpdateRequest(fd=fd, size=path.stat().st_size, **options)  # type: ignore[arg-type]
        try:
            prepared = updater.prepare(request)
        except BaseException:
            os.close(fd)
            raise
        updater.run(prepared, lambda p: None, threading.Event())

    def install_channel(self, **options: object) -> None:
        updater = self.pi.updater()
        updater.run(updater.prepare(UpdateRequest(**options)), lambda p: None, threading.Event())  # type: ignore[arg-type]


@pytest.fixture
def device(tmp_path: Path, keys: dict[str, Key], raw_images: dict[str, Path]) -> Iterator[Device]:
    allowed = write_allowed_signers(tmp_path / "allowed_signers", keys["owner"].allowed_line())
    work = tmp_path / "work"
    work.mkdir()
    with FaultServer() as server:
        (tmp_path / "pi").mkdir()
        config: dict[str, object] = {"trusted_keys": str(allowed), "compatible": COMPATIBLE,
                  "channel_url": server.url("/channel/manifest.json")}
        with SimulatedPi(tmp_path / "pi", "prefix", config=config) as pi:
            yield Device(pi, server, allowed, keys, raw_images, work)


def tryboot_slot(pi: SimulatedPi) -> str:
    return pi.slot_for(pi.firmware(tryboot=True))


def boot_and_commit(pi: SimulatedPi, expected_version: str) -> None:
    assert pi.boot(tryboot=True) == "b"
    result = pi.updater().boot_check()
    assert (result.trial, result.committed) == (True, True), result.message
    status = pi.updater().status()
    assert (status.booted_slot, status.primary_slot, status.booted_version) == ("b", "b", expected_version)


# --- installs ------------------------------------------------------------------------------------------------------


def test_a_published_bundle_installs_from_an_fd(device: Device) -> None:
    published = device.release("1.1.0")
    listing = subprocess.run(["tar", "tf", str(published.bundle)], capture_output=True, text=True, check=True)
    assert listing.stdout.split() == ["manifest.json", "manifest.json.sig", "update-1.1.0.img.gz"]
    device.install_fd(published.bundle)
    assert tryboot_slot(device.pi) == "b"
    assert device.pi.slot_for(device.pi.firmware(tryboot=False)) == "a"
    boot_and_commit(device.pi, "1.1.0")


def test_a_published_channel_installs_over_http_with_no_version(device: Device, tmp_path: Path) -> None:
    artifact = tmp_path / "boot.tar.gz"
    artifact.write_bytes(boot_artifact(tmp_path, "prefix"))
    device.serve_channel(device.release("1.1.0", boot_artifact=artifact, release_notes="Fixes the widget.\n"))
    offer = device.pi.updater().check()
    assert (offer.current, offer.available, offer.update_available) == ("1.0.0", "1.1.0", True)
    assert offer.signer.startswith("owner (ssh-ed25519 SHA256:")
    assert offer.compatible == COMPATIBLE
    assert offer.release_notes == "Fixes the widget.\n"
    assert offer.size == 24 << 20

    device.install_channel()
    assert tryboot_slot(device.pi) == "b"
    assert device.pi.fat_file(1, "b/ARTIFACT") == b"1.1.0\n", "the boot files came from the signed artifact"
    boot_and_commit(device.pi, "1.1.0")
    assert device.pi.updater().check().update_available is False


def test_a_bundle_signed_with_ssh_keygen_and_packed_with_tar_installs(device: Device) -> None:
    """No ab-flasher tool on the publishing side: a manifest written by hand, ssh-keygen -Y sign, GNU tar."""
    work = device.workdir / "by-hand"
    work.mkdir()
    image = device.images["1.1.0"].read_bytes()
    manifest = {
        "format_version": 1, "compatible": COMPATIBLE, "version": "1.1.0", "created": "2026-01-01T00:00:00Z",
        "artifacts": [{"name": "rootfs", "url": "root.img", "format": "raw", "compressed_size": len(image),
                       "size": len(image), "sha256": hashlib.sha256(image).hexdigest()}],
    }
    (work / "manifest.json").write_text(json.dumps(manifest))
    subprocess.run(["ssh-keygen", "-Y", "sign", "-n", "ab-flasher", "-f", str(device.keys["owner"].private),
                    str(work / "manifest.json")], check=True, capture_output=True, timeout=60)
    (work / "root.img").write_bytes(image)
    bundle = device.workdir / "by-hand.tar"
    subprocess.run(["tar", "cf", str(bundle), "-C", str(work), "manifest.json", "manifest.json.sig", "root.img"],
                   check=True, timeout=60)
    device.install_fd(bundle)
    assert tryboot_slot(device.pi) == "b"


# --- refusals --------------------------------------------------------------------------------------------------------


def members(published: Published) -> tuple[bytes, bytes, tuple[str, bytes]]:
    image = published.artifacts[0]
    return published.manifest.read_bytes(), published.signature.read_bytes(), (image.name, image.read_bytes())


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def unsigned(d: Device) -> bytes:
    m, _, image = members(d.release("1.1.0"))
    return bundle_of(m, b"", image)


def bare_image(d: Device) -> bytes:
    return d.release("1.1.0").artifacts[0].read_bytes()


def unknown_key(d: Device) -> bytes:
    return d.release("1.1.0", key="stranger").bundle.read_bytes()


def outside_valid_before(d: Device) -> bytes:
    write_allowed_signers(d.allowed, d.keys["owner"].allowed_line('valid-before="20200101"'))
    return d.release("1.1.0").bundle.read_bytes()


def manifest_changed(d: Device) -> bytes:
    m, sig, image = members(d.release("1.1.0"))
    return bundle_of(m.replace(b'"version": "1.1.0"', b'"version": "1.1.1"'), sig, image)


def image_changed(where: str) -> Callable[[Device], bytes]:
    def make(d: Device) -> bytes:
        m, sig, (name, image) = members(d.release("1.1.0", compression="none"))
        at = len(image) // 2 if where == "middle" else len(image) - 100
        return bundle_of(m, sig, (name, flip(image, at)))
    return make


def other_compatible(d: Device) -> bytes:
    published = publish(Release(image=d.images["1.1.0"], version="1.1.0", compatible="other-board",
                                output_dir=d.workdir / "other", key=str(d.keys["owner"].private), compression="gzip"))
    return published.bundle.read_bytes()


def older_version(d: Device) -> bytes:
    return d.release("0.9.0").bundle.read_bytes()


def expired(d: Device) -> bytes:
    now = int(time.time())
    return d.release("1.1.0", created=now - 10 * DAY, expires=now - DAY).bundle.read_bytes()


def out_of_order(d: Device) -> bytes:
    m, sig, image = members(d.release("1.1.0"))
    return tar_members([("manifest.json.sig", sig), ("manifest.json", m), image])


def extra_member(d: Device) -> bytes:
    m, sig, image = members(d.release("1.1.0"))
    return bundle_of(m, sig, image, ("payload.sh", b"#!/bin/sh\nrm -rf /\n"))


def truncated(d: Device) -> bytes:
    data = d.release("1.1.0").bundle.read_bytes()
    return data[: len(data) * 2 // 3]


def oversized_manifest(d: Device) -> bytes:
    m, sig, image = members(d.release("1.1.0"))
    return bundle_of(m + b" " * (70 << 10), sig, image)


REFUSALS: dict[str, tuple[Callable[[Device], bytes], type[errors.AbFlasherError], str]] = {
    "unsigned": (unsigned, errors.Unsigned, "not signed"),
    "a bare image": (bare_image, errors.Unsigned, "not a signed bundle"),
    "signed by an unknown key": (unknown_key, errors.UntrustedKey, "untrusted key"),
    "signed by a key outside its valid-before": (outside_valid_before, errors.KeyNotValid, "valid-before"),
    "manifest changed by one byte": (manifest_changed, errors.BadSignature, "does not match"),
    "image changed in the middle": (image_changed("middle"), errors.ChecksumMismatch, "sha256"),
    "image changed in the last block": (image_changed("last"), errors.ChecksumMismatch, "sha256"),
    "other compatible": (other_compatible, errors.Incompatible, "other-board"),
    "older version without downgrade rights": (older_version, errors.Downgrade, "older than the running"),
    "expired manifest": (expired, errors.Expired, "expired"),
    "members out of order": (out_of_order, errors.BadBundle, "where manifest.json belongs"),
    "an extra member": (extra_member, errors.BadBundle, "unexpected member"),
    "truncated": (truncated, errors.TruncatedBundle, "ends"),
    "oversized manifest": (oversized_manifest, errors.ManifestTooLarge, "refused unread"),
}


def untouched(pi: SimulatedPi) -> dict[str, object]:
    """What a refused update must leave as it was: what boots, the running slot, the data, the boot partition."""
    return {
        "tryboot": tryboot_slot(pi),
        "boot files": pi.boot_config_files(),
        "booted root": pi.partition_sha(pi.image.root("a").number),
        "data": pi.partition_sha(pi.data_partition()),
    }


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused(device: Device, case: str) -> None:
    make, error, message = REFUSALS[case]
    data = make(device)
    before = untouched(device.pi)
    with pytest.raises(error, match=message) as raised:
        device.install_fd(data)
    assert type(raised.value) is error, f"{type(raised.value).__name__}: {raised.value}"
    assert untouched(device.pi) == before
    assert before["tryboot"] == "a", "nothing is armed"
    assert all(s.state != "trial" for s in device.pi.updater().status().slots)


def test_a_replayed_older_manifest_is_refused(device: Device) -> None:
    now = int(time.time())
    older = device.release("1.1.0", created=now - DAY)
    newer = device.release("1.2.0", created=now)
    device.install_fd(newer.bundle)
    assert tryboot_slot(device.pi) == "b"
    trust = json.loads((Path(device.pi.config.state_dir) / "state.json").read_text())["trust"]
    assert trust == {"time_floor": now, "accepted_created": now, "accepted_version": "1.2.0"}
    before = untouched(device.pi)
    with pytest.raises(errors.Replay, match="already accepted"):
        device.install_fd(older.bundle)
    assert untouched(device.pi) == before, "the armed 1.2.0 trial stays as it was"
    # An authorized downgrade may install it.
    device.install_fd(older.bundle, allow_downgrade=True)
    assert device.pi.slot_file("b", "/.ab_version") == b"1.1.0\n"


def test_key_rotation_on_the_device(device: Device) -> None:
    device.keys["new"] = make_key(device.workdir / "keys", "newowner")
    write_allowed_signers(device.allowed, device.keys["owner"].allowed_line(), device.keys["new"].allowed_line())
    now = int(time.time())
    device.install_fd(device.release("1.1.0", key="owner", created=now - 60).bundle)
    device.install_fd(device.release("1.2.0", key="new", created=now - 30).bundle)
    write_allowed_signers(device.allowed, device.keys["new"].allowed_line())
    with pytest.raises(errors.UntrustedKey):
        device.install_fd(device.release("1.2.0", key="owner", created=now).bundle)
    device.install_fd(device.release("1.2.0", key="new", created=now).bundle)
    assert device.pi.slot_file("b", "/.ab_version") == b"1.2.0\n"


def test_without_trusted_keys_the_simple_mode_still_works(device: Device) -> None:
    device.allowed.write_text("# no keys\n")
    image = device.release("1.1.0").artifacts[0]
    device.server.add("/root-1.1.0.img.gz", image.read_bytes())
    device.server.add("/root-1.1.0.img.gz.sha256",
                      f"{hashlib.sha256(image.read_bytes()).hexdigest()}  root-1.1.0.img.gz\n".encode())
    device.pi.config = dataclasses.replace(device.pi.config, image_url=device.server.url("/root-{version}.img.gz"),
                                           require_checksum=True)
    device.install_channel(version="1.1.0")
    assert tryboot_slot(device.pi) == "b"


# --- the timer's service ---------------------------------------------------------------------------------------------


def test_the_timer_checks_installs_waits_for_the_window_reboots_and_the_trial_commits(device: Device) -> None:
    from abflasher.autoupdate import run_auto_update

    device.serve_channel(device.release("1.1.0"))
    device.pi.config = dataclasses.replace(device.pi.config, auto_update="install-and-reboot",
                                           maintenance_window="03:00-04:00")
    clock = [datetime.datetime(2026, 12, 1, 1, 30)]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        # While it waits for the window: installed and armed, not rebooted.
        assert device.pi.reboots() == []
        assert tryboot_slot(device.pi) == "b"
        assert "maintenance window 03:00-04:00" in device.pi.updater().status().auto_update
        slept.append(seconds)
        clock[0] += datetime.timedelta(seconds=seconds)

    outcome = run_auto_update(device.pi.updater(), now=lambda: clock[0], sleep=sleep)
    assert slept == [90 * 60]
    assert outcome.result == "rebooting"
    assert [line.split()[-1] for line in device.pi.reboots()] == ["tryboot"]
    assert "rebooting into version 1.1.0" in device.pi.updater().status().auto_update

    boot_and_commit(device.pi, "1.1.0")
    again = run_auto_update(device.pi.updater(), now=lambda: clock[0], sleep=sleep)
    assert again.result == "up-to-date"
    assert len(device.pi.reboots()) == 1


@pytest.mark.parametrize("level", ["off", "check", "download-and-install"])
def test_the_timer_goes_only_as_far_as_configured(device: Device, level: str) -> None:
    from abflasher.autoupdate import run_auto_update

    device.serve_channel(device.release("1.1.0"))
    device.pi.config = dataclasses.replace(device.pi.config, auto_update=level)
    outcome = run_auto_update(device.pi.updater(), sleep=lambda seconds: pytest.fail("must not wait"))
    expected = {"off": ("off", "a"), "check": ("available", "a"), "download-and-install": ("installed", "b")}[level]
    assert (outcome.result, tryboot_slot(device.pi)) == expected
    assert device.pi.reboots() == []


def test_signed_mode_on_the_url_path(device: Device) -> None:
    """Update with a url: a bundle or a signed manifest there installs; an image, or a manifest without its
    signature, is refused as unsigned."""
    published = device.release("1.1.0")
    device.server.add("/plain.img.gz", published.artifacts[0].read_bytes())
    device.server.add("/unsigned/manifest.json", published.manifest.read_bytes())
    device.server.add("/bundle.tar", published.bundle.read_bytes())
    before = untouched(device.pi)
    with pytest.raises(errors.Unsigned, match="not a signed bundle"):
        device.install_channel(url=device.server.url("/plain.img.gz"))
    with pytest.raises(errors.Unsigned, match="has no signature"):
        device.install_channel(url=device.server.url("/unsigned/manifest.json"))
    with pytest.raises(errors.Network, match="not found"):
        device.install_channel()  # the configured channel serves nothing yet
    device.server.add("/channel/manifest.json", published.manifest.read_bytes())
    with pytest.raises(errors.Unsigned, match="has no signature"):
        device.install_channel()  # the channel's manifest without its signature
    assert untouched(device.pi) == before
    device.install_channel(url=device.server.url("/bundle.tar"))
    assert tryboot_slot(device.pi) == "b"
    device.serve_channel(published, prefix="/other")
    device.install_channel(url=device.server.url("/other/manifest.json"))
    assert tryboot_slot(device.pi) == "b"


def test_without_trusted_keys_a_bundle_is_still_checked_against_its_manifest(device: Device) -> None:
    device.allowed.write_text("# no keys\n")
    device.pi.config = dataclasses.replace(device.pi.config, compatible="")
    m, sig, (name, image) = members(device.release("1.1.0", compression="none"))
    before = untouched(device.pi)
    with pytest.raises(errors.ChecksumMismatch):
        device.install_fd(bundle_of(m, sig, (name, flip(image, len(image) // 2))))
    assert untouched(device.pi) == before
    device.install_fd(bundle_of(m, b"", (name, image)))  # unsigned: nobody to check it against
    assert tryboot_slot(device.pi) == "b"
    state = json.loads((Path(device.pi.config.state_dir) / "state.json").read_text())
    assert "trust" not in state, "an unverified manifest proves no time and sets no replay mark"
