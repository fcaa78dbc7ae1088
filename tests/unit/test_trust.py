"""Signed updates without root: OpenSSH signatures through the real ssh-keygen (both ways), the manifest schema, the
bundle stream reader and the acceptance policy (rollback, replay, expiry against the RTC-less time floor)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from abflasher import errors
from abflasher.trust import signature
from abflasher.trust.bundle import BundleReader
from abflasher.trust.manifest import Artifact, Manifest, parse_manifest
from abflasher.trust.policy import TrustRecord, check_manifest
from tests.support.images import BytesSource
from tests.support.signing import Key, bundle_of, make_key, tar_members, write_allowed_signers

pytestmark = pytest.mark.timeout(60)

NOW = 1_800_000_000
DAY = 86400
IMAGE = bytes(range(256)) * 64


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Key]:
    directory = tmp_path_factory.mktemp("keys")
    return {name: make_key(directory, name) for name in ("owner", "newowner", "stranger")}


def manifest(version: str = "1.2.0", *, created: int = NOW, expires: int | None = None, **fields: object) -> Manifest:
    image = Artifact("rootfs", "root.img", "raw", len(IMAGE), hashlib.sha256(IMAGE).hexdigest(), len(IMAGE))
    return Manifest(compatible="acme-pi4", version=version, created=created, artifacts=(image,), expires=expires,
                    **fields)  # type: ignore[arg-type]


# --- signatures ---------------------------------------------------------------------------------------------------


def test_a_signature_made_by_ssh_keygen_verifies(keys: dict[str, Key], tmp_path: Path) -> None:
    allowed = write_allowed_signers(tmp_path / "allowed", keys["owner"].allowed_line())
    data = manifest().dump()
    signer = signature.verify(data, keys["owner"].sign(data, tmp_path), allowed, at=NOW)
    assert signer.principals == ("owner",)
    assert signer.fingerprint.startswith("SHA256:")
    fingerprint = subprocess.run(["ssh-keygen", "-lf", str(keys["owner"].public)], capture_output=True, check=True,
                                 text=True).stdout.split()[1]
    assert signer.fingerprint == fingerprint


def test_our_signature_verifies_with_ssh_keygen(keys: dict[str, Key], tmp_path: Path) -> None:
    allowed = write_allowed_signers(tmp_path / "allowed", keys["owner"].allowed_line())
    path = tmp_path / "manifest.json"
    path.write_bytes(manifest().dump())
    signature.sign_file(path, keys["owner"].private)
    done = subprocess.run(
        ["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", "owner", "-n", "ab-flasher", "-s", f"{path}.sig"],
        input=path.read_bytes(), capture_output=True, check=False,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("unsigned", errors.Unsigned),
        ("unknown key", errors.UntrustedKey),
        ("key past its valid-before", errors.KeyNotValid),
        ("key before its valid-after", errors.KeyNotValid),
        ("manifest changed by one byte", errors.BadSignature),
        ("another namespace", errors.BadSignature),
        ("not a signature", errors.BadSignature),
        ("key trusted for another namespace", errors.UntrustedKey),
    ],
)
def test_refused_signatures(keys: dict[str, Key], tmp_path: Path, case: str, error: type[Exception]) -> None:
    owner = keys["owner"]
    options = {"key past its valid-before": 'valid-before="20200101"',
               "key before its valid-after": 'valid-after="21000101"',
               "key trusted for another namespace": 'namespaces="file"'}.get(case, "")
    allowed = write_allowed_signers(tmp_path / "allowed", owner.allowed_line(options))
    data = manifest().dump()
    signers: dict[str, Callable[[], bytes]] = {
        "unsigned": lambda: b"",
        "unknown key": lambda: keys["stranger"].sign(data, tmp_path),
        "another namespace": lambda: owner.sign(data, tmp_path, namespace="file"),
        "not a signature": lambda: b"-----BEGIN PGP SIGNATURE-----\nabc\n-----END PGP SIGNATURE-----\n",
    }
    sig = signers.get(case, lambda: owner.sign(data, tmp_path))()
    if case == "manifest changed by one byte":
        data = data.replace(b"1.2.0", b"1.2.1")
    with pytest.raises(error) as raised:
        signature.verify(data, sig, allowed, at=NOW)
    assert isinstance(raised.value, errors.Signature)
    if case == "key past its valid-before":
        assert "valid-before=20200101" in str(raised.value)


def test_key_rotation(keys: dict[str, Key], tmp_path: Path) -> None:
    old, new = keys["owner"], keys["newowner"]
    data = manifest().dump()
    by_old, by_new = old.sign(data, tmp_path), new.sign(data, tmp_path)
    both = write_allowed_signers(tmp_path / "both", old.allowed_line(), new.allowed_line())
    assert signature.verify(data, by_old, both, at=NOW).principals == ("owner",)
    assert signature.verify(data, by_new, both, at=NOW).principals == ("newowner",)
    only_new = write_allowed_signers(tmp_path / "new", new.allowed_line())
    assert signature.verify(data, by_new, only_new, at=NOW).principals == ("newowner",)
    with pytest.raises(errors.UntrustedKey):
        signature.verify(data, by_old, only_new, at=NOW)


def test_validity_is_judged_at_the_time_given_not_the_clock(keys: dict[str, Key], tmp_path: Path) -> None:
    allowed = write_allowed_signers(tmp_path / "allowed", keys["owner"].allowed_line('valid-before="20300101"'))
    data = manifest().dump()
    sig = keys["owner"].sign(data, tmp_path)
    signature.verify(data, sig, allowed, at=time.time())
    with pytest.raises(errors.KeyNotValid):
        signature.verify(data, sig, allowed, at=1_950_000_000)  # 2031


# --- the manifest ---------------------------------------------------------------------------------------------------


def test_manifest_round_trip_and_delta_artifacts() -> None:
    m = manifest(expires=NOW + DAY, min_version="1.0.0", release_notes="fixes")
    assert parse_manifest(m.dump()) == m
    data = json.loads(m.dump())
    data["artifacts"].append({"name": "rootfs", "url": "root.caibx", "format": "caibx", "store": "store.castr/",
                              "size": 5, "sha256": "a" * 64})
    parsed = parse_manifest(json.dumps(data).encode())
    assert parsed.image().format == "raw", "the full image is preferred"
    delta = next(a for a in parsed.artifacts if a.is_delta)
    assert (delta.url, delta.store) == ("root.caibx", "store.castr/")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format_version=2), "format_version"),
        (lambda d: d.update(surprise=1), "unknown keys"),
        (lambda d: d.update(created="yesterday"), "RFC 3339"),
        (lambda d: d["artifacts"][0].update(sha256="ABC"), "sha256"),
        (lambda d: d["artifacts"][0].update(url="../etc/passwd"), "relative"),
        (lambda d: d["artifacts"][0].update(url="http://evil/x"), "relative"),
        (lambda d: d["artifacts"][0].update(format="zip"), "format"),
        (lambda d: d["artifacts"][0].update(size=-1), "size"),
        (lambda d: d.update(artifacts=[]), "artifacts"),
        (lambda d: d.update(version="not a version!"), "version"),
        (lambda d: d["artifacts"].append(dict(d["artifacts"][0], name="boot", url="boot.tgz", format="gzip")),
         "boot artifact is installed as it is"),
        (lambda d: d["artifacts"].append(dict(d["artifacts"][0], url="again.img")), "listed twice"),
        (lambda d: d["artifacts"].append({"name": "rootfs", "url": "r.caibx", "format": "caibx", "size": 1,
                                          "sha256": "a" * 64}), "store"),
    ],
)
def test_bad_manifests(change: object, message: str) -> None:
    data = json.loads(manifest().dump())
    change(data)  # type: ignore[operator]
    with pytest.raises(errors.BadManifest, match=message):
        parse_manifest(json.dumps(data).encode())


def test_an_oversized_manifest_is_refused_unread() -> None:
    with pytest.raises(errors.ManifestTooLarge):
        parse_manifest(b" " * (65 << 10))


# --- the bundle stream ------------------------------------------------------------------------------------------------


def read_bundle(data: bytes) -> bytes:
    """Everything a reader does with a bundle: manifest, image, end."""
    reader = BundleReader(BytesSource(data, piece=1000))
    raw, _ = reader.read_manifest()
    m = parse_manifest(raw)
    image = reader.artifact(m.image())
    out = b""
    while chunk := image.read(4096):
        out += chunk
    reader.finish()
    return out


def test_a_bundle_reads_in_order() -> None:
    raw = manifest().dump()
    assert read_bundle(bundle_of(raw, b"sig", ("root.img", IMAGE))) == IMAGE


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("members out of order", errors.BadBundle, "where manifest.json belongs"),
        ("an extra member", errors.BadBundle, "unexpected member"),
        ("an unknown member", errors.BadBundle, "where root.img belongs"),
        ("a duplicated member", errors.BadBundle, "twice"),
        ("truncated", errors.TruncatedBundle, "ends"),
        ("oversized manifest", errors.ManifestTooLarge, "refused unread"),
        ("image of the wrong size", errors.BadBundle, "its manifest says"),
        ("image missing", errors.TruncatedBundle, "ends before"),
    ],
)
def test_refused_bundles(case: str, error: type[Exception], message: str) -> None:
    raw = manifest().dump()
    data = {
        "members out of order": lambda: tar_members([("manifest.json.sig", b"s"), ("manifest.json", raw)]),
        "an extra member": lambda: bundle_of(raw, b"s", ("root.img", IMAGE), ("evil.sh", b"#!/bin/sh\n")),
        "an unknown member": lambda: bundle_of(raw, b"s", ("evil.img", IMAGE)),
        "a duplicated member": lambda: tar_members([("manifest.json", raw), ("manifest.json", raw)]),
        "truncated": lambda: bundle_of(raw, b"s", ("root.img", IMAGE))[:2048 + len(IMAGE) // 2],
        "oversized manifest": lambda: bundle_of(b" " * (65 << 10), b"s", ("root.img", IMAGE)),
        "image of the wrong size": lambda: bundle_of(raw, b"s", ("root.img", IMAGE + b"x")),
        "image missing": lambda: bundle_of(raw, b"s"),
    }[case]()
    with pytest.raises(error, match=message):
        read_bundle(data)


# --- acceptance -------------------------------------------------------------------------------------------------


def check(m: Manifest, *, booted: str = "1.0.0", record: TrustRecord | None = None, now: float = NOW,
          allow_downgrade: bool = False, compatible: str = "acme-pi4") -> None:
    check_manifest(m, compatibles=(compatible,), booted_version=booted, requested_version="",
                   allow_downgrade=allow_downgrade, record=record or TrustRecord(), now=now)


def test_acceptance_policy() -> None:
    check(manifest())
    with pytest.raises(errors.Incompatible, match="acme-pi4"):
        check(manifest(), compatible="other-board")
    with pytest.raises(errors.Downgrade) as downgrade:
        check(manifest("0.9.0"))
    assert not isinstance(downgrade.value, errors.Replay)
    check(manifest("0.9.0"), allow_downgrade=True)
    with pytest.raises(errors.UpToDate):
        check(manifest("1.0.0"))
    with pytest.raises(errors.Incompatible, match="only be installed over 1.1.0"):
        check(manifest(min_version="1.1.0"))


def test_a_device_without_a_compatible_string() -> None:
    def without(require: bool) -> None:
        check_manifest(manifest(), compatibles=(), booted_version="1.0.0", requested_version="",
                       allow_downgrade=False, record=TrustRecord(), now=NOW, require_compatible=require)

    with pytest.raises(errors.Incompatible, match="set compatible="):
        without(True)
    without(False)  # a bundle in the simple mode: compatible= empty means not checked


def test_replay_of_an_older_manifest_is_refused() -> None:
    accepted = TrustRecord().accepted(manifest("1.3.0", created=NOW + DAY))
    with pytest.raises(errors.Replay, match="1.3.0"):
        check(manifest("1.2.0", created=NOW), record=accepted)
    check(manifest("1.2.0", created=NOW), record=accepted, allow_downgrade=True)
    check(manifest("1.4.0", created=NOW + 2 * DAY), record=accepted)


def test_expiry_is_judged_against_the_time_floor_on_a_device_without_a_clock() -> None:
    m = manifest(created=NOW, expires=NOW + DAY)
    check(m, now=NOW + 60)
    with pytest.raises(errors.Expired):
        check(m, now=NOW + 2 * DAY)
    # The clock says 1970 (no RTC), but the device has seen a manifest created three days later: expired.
    seen = TrustRecord().seen(manifest("1.1.0", created=NOW + 3 * DAY))
    with pytest.raises(errors.Expired):
        check(m, now=0, record=seen)
    check(m, now=0)  # never having seen a newer time, the device cannot tell
