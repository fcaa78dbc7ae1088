"""Delta updates through a signed channel, on a simulated Pi (real loop disk, the firmware model, real ssh-keygen
keys, Debian's casync): the publisher's ``--delta`` output installs by delta through the real Updater when the device
holds a seed and in full when it does not; a changed chunk or a foreign index under a signed manifest is refused with
nothing armed; a bundle never carries a delta."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from abflasher import errors
from abflasher.api import UpdateRequest
from abflasher.delta.index import parse_index
from abflasher.delta.install import HOLD_BYTES
from abflasher.image.pipeline import Progress
from abflasher.trust.publish import Published, Release, publish
from tests.integration.test_delta import blobs
from tests.support.httpserver import FaultServer
from tests.support.pidisk import build_root_image
from tests.support.signing import Key, bundle_of, make_key, write_allowed_signers
from tests.support.simpi import SimulatedPi

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

COMPATIBLE = "acme-pi4"
IMAGE_MB = 20


@dataclasses.dataclass(frozen=True)
class Channel:
    """Releases published with ``--delta`` into one directory (one shared store); each release's manifest and
    signature as they were right after it was published (the next release replaces them)."""

    root: Path
    key: Key
    releases: dict[str, Published]
    manifests: dict[str, tuple[bytes, bytes]]
    raw: dict[str, Path]

    def serve(self, server: FaultServer, version: str) -> None:
        for path in self.root.rglob("*"):
            if path.is_file() and path.name not in ("manifest.json", "manifest.json.sig"):
                server.add(f"/channel/{path.relative_to(self.root)}", path.read_bytes())
        manifest, signature = self.manifests[version]
        server.add("/channel/manifest.json", manifest)
        server.add("/channel/manifest.json.sig", signature)

    def full_image(self, version: str) -> Path:
        return self.releases[version].artifacts[0]


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Channel:
    work = tmp_path_factory.mktemp("signed-delta")
    key = make_key(work / "keys", "owner")
    out = work / "channel"
    releases, manifests, raw = {}, {}, {}
    for version, generation in (("1.1.0", 1), ("1.2.0", 2)):
        raw[version] = work / f"root-{version}.img"
        build_root_image(raw[version], version, size_mb=IMAGE_MB, extra_files=blobs(generation))
        releases[version] = publish(Release(image=raw[version], version=version, compatible=COMPATIBLE,
                                            output_dir=out, key=str(key.private), compression="gzip", delta=True))
        manifests[version] = (releases[version].manifest.read_bytes(), releases[version].signature.read_bytes())
    return Channel(out, key, releases, manifests, raw)


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as running:
        yield running


@pytest.fixture
def pi(tmp_path: Path, channel: Channel, server: FaultServer) -> Iterator[SimulatedPi]:
    allowed = write_allowed_signers(tmp_path / "allowed_signers", channel.key.allowed_line())
    config: dict[str, object] = {"trusted_keys": str(allowed), "compatible": COMPATIBLE, "http_retries": 2,
                                 "channel_url": server.url("/channel/manifest.json")}
    (tmp_path / "pi").mkdir()
    with SimulatedPi(tmp_path / "pi", "prefix", config=config) as device:
        yield device


def served_bytes(server: FaultServer, channel: Channel, suffix: str) -> int:
    """Bytes of the files whose path ends in ``suffix`` that the server was asked for (whole files)."""
    with server.lock:
        paths = [r.path for r in server.requests if r.path.endswith(suffix)]
    return sum((channel.root / p.removeprefix("/channel/")).stat().st_size for p in paths)


def install(pi: SimulatedPi) -> list[Progress]:
    seen: list[Progress] = []
    updater = pi.updater()
    updater.run(updater.prepare(UpdateRequest()), seen.append, threading.Event())
    return seen


def commit(pi: SimulatedPi, slot: str) -> None:
    assert pi.boot(tryboot=True) == slot
    assert pi.updater().boot_check().committed


def test_the_manifest_lists_the_chunked_form_and_the_bundle_does_not(channel: Channel) -> None:
    manifest = json.loads(channel.manifests["1.2.0"][0])
    forms = [(a["name"], a["format"]) for a in manifest["artifacts"]]
    assert forms == [("rootfs", "gzip"), ("rootfs", "caibx")]
    delta = manifest["artifacts"][1]
    assert (delta["url"], delta["store"]) == ("update-1.2.0.caibx", "default.castr")
    assert delta["sha256"] == hashlib.sha256(channel.raw["1.2.0"].read_bytes()).hexdigest()
    assert (channel.root / "update-1.1.0.caibx").is_file(), "earlier indexes stay: they seed the next update"
    import tarfile

    with tarfile.open(channel.releases["1.2.0"].bundle) as bundle:
        carried = json.loads(bundle.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert [a["format"] for a in carried["artifacts"]] == ["gzip"]


def test_a_signed_channel_installs_in_full_without_a_seed_then_by_delta(
    pi: SimulatedPi, server: FaultServer, channel: Channel
) -> None:
    # The device runs 1.0.0, for which no index is published: no seed, so the full image.
    channel.serve(server, "1.1.0")
    install(pi)
    assert served_bytes(server, channel, ".cacnk") == 0
    assert served_bytes(server, channel, "update-1.1.0.img.gz") > 0
    commit(pi, "b")

    # 1.1.0 runs, and its index is published next to 1.2.0's: the delta, seeded by the booted slot.
    channel.serve(server, "1.2.0")
    progress = install(pi)
    full = channel.full_image("1.2.0").stat().st_size
    downloaded = served_bytes(server, channel, ".cacnk")
    assert served_bytes(server, channel, "update-1.2.0.img.gz") == 0, "the full image is not downloaded"
    assert 0 < downloaded < full / 2, (downloaded, full)
    writing = [p for p in progress if p.stage == "writing"]
    assert 0 < max(p.downloaded for p in writing) <= downloaded, "progress counts the bytes downloaded"
    assert max(p.written for p in writing) > 0
    commit(pi, "a")
    assert pi.slot_file("a", "/.ab_version") == b"1.2.0\n"


@pytest.fixture
def only_delta(channel: Channel, server: FaultServer, tmp_path: Path) -> bytes:
    """A signed manifest offering 1.2.0 only as a delta (every chunk from the store: no seed needed)."""
    manifest = json.loads(channel.manifests["1.2.0"][0])
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["format"] == "caibx"]
    raw = json.dumps(manifest).encode()
    channel.serve(server, "1.2.0")
    server.add("/channel/manifest.json", raw)
    server.add("/channel/manifest.json.sig", channel.key.sign(raw, tmp_path))
    return raw


def test_a_manifest_offering_only_the_delta_installs_it(
    pi: SimulatedPi, server: FaultServer, channel: Channel, only_delta: bytes
) -> None:
    install(pi)
    assert served_bytes(server, channel, ".cacnk") > 0
    commit(pi, "b")
    assert pi.slot_file("b", "/.ab_version") == b"1.2.0\n"


def nothing_armed(pi: SimulatedPi) -> None:
    assert pi.slot_for(pi.firmware(tryboot=True)) == "a", "nothing armed: a tryboot still starts the old slot"
    assert pi.slot_file("a", "/.ab_version") == b"1.0.0\n"


def test_a_changed_chunk_under_a_signed_manifest_is_refused(
    pi: SimulatedPi, server: FaultServer, channel: Channel, only_delta: bytes
) -> None:
    index = parse_index((channel.root / "update-1.2.0.caibx").read_bytes())
    chunk = next(c for c in index if c.offset > HOLD_BYTES and c.id != index.digest(bytes(c.size)))
    path = f"/channel/default.castr/{chunk.hex[:4]}/{chunk.hex}.cacnk"
    server.add(path, zstandard.compress(bytes(chunk.size)))
    with pytest.raises(errors.ChecksumMismatch, match=f"chunk {chunk.hex}"):
        install(pi)
    nothing_armed(pi)


def test_an_index_that_is_not_the_signed_image_is_refused(
    pi: SimulatedPi, server: FaultServer, channel: Channel, only_delta: bytes
) -> None:
    # The index and store serve 1.1.0 (a whole, consistent image) where the signed manifest names 1.2.0.
    server.add("/channel/update-1.2.0.caibx", (channel.root / "update-1.1.0.caibx").read_bytes())
    with pytest.raises(errors.ChecksumMismatch):
        install(pi)
    nothing_armed(pi)


def test_a_bundle_carrying_a_delta_is_refused(pi: SimulatedPi, channel: Channel, tmp_path: Path) -> None:
    manifest, _ = channel.manifests["1.2.0"]
    signature = channel.key.sign(manifest, tmp_path)
    image = channel.full_image("1.2.0")
    bundle = tmp_path / "delta.bundle.tar"
    bundle.write_bytes(bundle_of(manifest, signature, (image.name, image.read_bytes())))
    import os

    fd = os.open(bundle, os.O_RDONLY)
    updater = pi.updater()
    try:
        prepared = updater.prepare(UpdateRequest(fd=fd, size=bundle.stat().st_size))
    except BaseException:
        os.close(fd)
        raise
    with pytest.raises(errors.BadBundle, match="full images only"):
        updater.run(prepared, lambda p: None, threading.Event())
    nothing_armed(pi)


def test_without_casync_the_publisher_says_so(
    channel: Channel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert shutil.which("casync") is None
    with pytest.raises(errors.InvalidArgument, match="casync is not installed"):
        publish(Release(image=channel.raw["1.1.0"], version="1.1.0", compatible=COMPATIBLE, output_dir=tmp_path / "o",
                        key=str(channel.key.private), compression="none", delta=True))
