"""The command-line side of signed updates without root: the publisher (key file and ssh agent), a bundle given to
`ab-flasher write`, and `abflasherctl info`."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from abflasher import errors
from abflasher.trust.commands import inspect_bundle
from abflasher.trust.manifest import parse_manifest
from abflasher.trust.publish import Release, publish
from tests.support.bus import wait_until
from tests.support.signing import Key, make_key, write_allowed_signers

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> Key:
    return make_key(tmp_path_factory.mktemp("keys"), "owner")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A small raw image that detects as a disk (an MBR signature)."""
    data = bytearray(os.urandom(3 << 20))
    data[510:512] = b"\x55\xaa"
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(data))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "abflasher.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120, check=False)


def test_the_publisher_writes_a_channel_and_a_bundle(owner: Key, image: Path, tmp_path: Path) -> None:
    boot = tmp_path / "boot.tar"
    boot.write_bytes(b"boot files")
    done = run_cli("bundle", str(image), "--version", "2.0.0", "--compatible", "acme-pi4", "--key",
                   str(owner.private), "-o", str(tmp_path / "out"), "--boot-artifact", str(boot),
                   "--compression", "gzip", "--expires-in-days", "30", "--json")
    assert done.returncode == 0, done.stderr
    written = json.loads(done.stdout)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "boot-2.0.0.tar", "manifest.json", "manifest.json.sig", "update-2.0.0.bundle.tar", "update-2.0.0.img.gz"]
    manifest = parse_manifest((out / "manifest.json").read_bytes())
    image_artifact = manifest.image()
    assert (image_artifact.format, image_artifact.size) == ("gzip", image.stat().st_size)
    assert gzip.decompress((out / image_artifact.url).read_bytes()) == image.read_bytes()
    assert manifest.expires == manifest.created + 30 * 86400
    assert written["bundle"] == str(out / "update-2.0.0.bundle.tar")
    listing = subprocess.run(["tar", "tvf", written["bundle"]], capture_output=True, text=True, check=True)
    assert [line.split()[-1] for line in listing.stdout.splitlines()] == [
        "manifest.json", "manifest.json.sig", "update-2.0.0.img.gz", "boot-2.0.0.tar"]


@pytest.fixture
def agent(tmp_path: Path, owner: Key) -> Iterator[dict[str, str]]:
    socket = tmp_path / "agent.sock"
    process = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        env = dict(os.environ, SSH_AUTH_SOCK=str(socket))
        wait_until(socket.exists, timeout=30, what="the ssh agent's socket")
        subprocess.run(["ssh-add", str(owner.private)], env=env, check=True, capture_output=True, timeout=30)
        yield env
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_publisher_signs_with_the_ssh_agent(owner: Key, image: Path, tmp_path: Path, agent: dict[str, str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    hidden = tmp_path / "only-public.pub"
    hidden.write_text(owner.public.read_text())  # no private key next to it: only the agent can sign
    monkeypatch.setenv("SSH_AUTH_SOCK", agent["SSH_AUTH_SOCK"])
    published = publish(Release(image=image, version="2.0.0", compatible="acme-pi4", output_dir=tmp_path / "out",
                                key=str(hidden), agent=True, compression="none"))
    allowed = write_allowed_signers(tmp_path / "allowed", owner.allowed_line())
    info = inspect_bundle(str(published.bundle), str(allowed))
    assert info["signature"] == "valid"
    assert info["signer"].startswith("owner ")


def test_ab_flasher_write_takes_a_bundle(owner: Key, image: Path, tmp_path: Path) -> None:
    published = publish(Release(image=image, version="2.0.0", compatible="acme-pi4", output_dir=tmp_path / "out",
                                key=str(owner.private), compression="gzip"))
    allowed = write_allowed_signers(tmp_path / "allowed", owner.allowed_line())
    config = tmp_path / "ab-flasher.conf"
    config.write_text(f"[ab-flasher]\ntrusted_keys = {allowed}\n")
    target = tmp_path / "target.img"
    done = run_cli("write", str(published.bundle), str(target), "--create", "-q", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert "signed by owner" in done.stderr
    assert target.read_bytes() == image.read_bytes()

    refused = run_cli("write", str(published.artifacts[0]), str(tmp_path / "other.img"), "--create", "-q",
                      "--config", str(config))
    assert refused.returncode == errors.Signature.exit_code, refused.stderr
    assert "not a signed bundle" in refused.stderr
    assert not (tmp_path / "other.img").exists()


def test_info_says_whether_the_signature_is_trusted(owner: Key, image: Path, tmp_path: Path) -> None:
    published = publish(Release(image=image, version="2.0.0", compatible="acme-pi4", output_dir=tmp_path / "out",
                                key=str(owner.private), compression="none", release_notes="notes\n"))
    stranger = make_key(tmp_path / "k", "stranger")
    untrusted = write_allowed_signers(tmp_path / "allowed", stranger.allowed_line())
    done = subprocess.run([sys.executable, "-m", "abflasher.ctl", "info", str(published.bundle), "--keys",
                           str(untrusted)], capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "version:    2.0.0" in done.stdout
    assert "compatible: acme-pi4" in done.stdout
    assert "NOT TRUSTED: the update is signed by an untrusted key" in done.stdout
    assert "release notes:\n  notes" in done.stdout
