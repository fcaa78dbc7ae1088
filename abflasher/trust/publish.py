"""The publisher (``ab-flasher bundle``): from an image and an optional boot artifact, write what a release needs.

Into one output directory: the compressed image, the boot artifact, ``manifest.json`` and its signature
``manifest.json.sig`` (together: a channel, to be copied as they are to any static web server), and the bundle
``<name>-<version>.bundle.tar`` carrying the same manifest, signature and artifacts (for a USB stick or the upload
page). Signing is ``ssh-keygen -Y sign -n ab-flasher`` with a key file or the ssh agent (docs/publishing.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from abflasher import errors
from abflasher.image.formats import DETECT_BYTES, ImageFormat, detect_format, open_decoder
from abflasher.trust.bundle import write_bundle
from abflasher.trust.manifest import BOOT_ARTIFACT, DELTA_FORMAT, IMAGE_ARTIFACT, Artifact, Manifest, parse_manifest
from abflasher.trust.signature import sign_file
from abflasher.version import parse_version

CHUNK = 1 << 20
#: How each compression is made (Debian's xz-utils, gzip and zstd) and the file name suffix it gets.
COMPRESSORS: dict[str, tuple[list[str], str]] = {
    "xz": (["xz", "-T0", "-6", "-c"], ".xz"),
    "zstd": (["zstd", "-T0", "-q", "-c"], ".zst"),
    "gzip": (["gzip", "-6", "-n", "-c"], ".gz"),
}
_SUFFIX = {ImageFormat.XZ: ".xz", ImageFormat.ZSTD: ".zst", ImageFormat.GZIP: ".gz", ImageFormat.BZIP2: ".bz2",
           ImageFormat.RAW: ""}


@dataclass(frozen=True)
class Release:
    image: Path
    version: str
    compatible: str
    output_dir: Path
    key: str
    agent: bool = False
    boot_artifact: Path | None = None
    #: xz | zstd | gzip | none; an image that is already compressed is published as it is.
    compression: str = "xz"
    name: str = "update"
    created: int | None = None
    expires: int | None = None
    min_version: str = ""
    release_notes: str = ""
    #: Also publish the chunked form (casync index NAME-VERSION.caibx, chunks added to OUTDIR/default.castr, shared
    #: by every release published into OUTDIR) and list it in the channel's manifest (docs/publishing.md).
    delta: bool = False


@dataclass(frozen=True)
class Published:
    manifest: Path
    signature: Path
    bundle: Path
    artifacts: tuple[Path, ...]  # the bundle's artifacts (full image, boot artifact)
    delta_index: Path | None = None  # with Release.delta: the index and the store the channel also serves
    delta_store: Path | None = None


def _measure(path: Path) -> tuple[ImageFormat, int, str]:
    """The format of the file at ``path``, and the size and sha256 of its uncompressed content."""
    with open(path, "rb") as handle:
        head = handle.read(DETECT_BYTES)
        fmt = detect_format(head)
        decoder = open_decoder(fmt, lambda: handle.read(CHUNK), head)
        digest = hashlib.sha256()
        size = 0
        while data := decoder.read(CHUNK):
            digest.update(data)
            size += len(data)
    return fmt, size, digest.hexdigest()


def _compress(source: Path, compression: str, destination: Path) -> None:
    command, _ = COMPRESSORS[compression]
    tmp = destination.with_name(f".{destination.name}.tmp")
    try:
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            done = subprocess.run([*command], stdin=src, stdout=dst, stderr=subprocess.PIPE, check=False)
        if done.returncode != 0:
            raise errors.Internal(f"{command[0]} failed: {done.stderr.decode('utf-8', 'replace').strip()}")
        os.replace(tmp, destination)
    except FileNotFoundError as exc:
        raise errors.InvalidArgument(f"{command[0]} is not installed; install it or choose another --compression") \
            from exc
    finally:
        tmp.unlink(missing_ok=True)


def _image_artifact(release: Release) -> tuple[Artifact, Path]:
    fmt, size, sha256 = _measure(release.image)
    base = f"{release.name}-{release.version}.img"
    if fmt is not ImageFormat.RAW or release.compression == "none":
        published = release.output_dir / (base + _SUFFIX[fmt])
        if published.resolve() != release.image.resolve():
            shutil.copyfile(release.image, published)
    else:
        if release.compression not in COMPRESSORS:
            raise errors.InvalidArgument(
                f"unknown compression {release.compression!r}: use {', '.join(COMPRESSORS)} or none"
            )
        _, suffix = COMPRESSORS[release.compression]
        published = release.output_dir / (base + suffix)
        _compress(release.image, release.compression, published)
        fmt = ImageFormat(release.compression)
    artifact = Artifact(IMAGE_ARTIFACT, published.name, fmt.value, size, sha256, published.stat().st_size)
    return artifact, published


def _boot_artifact(release: Release) -> tuple[Artifact, Path] | None:
    if release.boot_artifact is None:
        return None
    suffix = "".join(release.boot_artifact.suffixes[-2:]) or ".bin"
    published = release.output_dir / f"boot-{release.version}{suffix}"
    if published.resolve() != release.boot_artifact.resolve():
        shutil.copyfile(release.boot_artifact, published)
    digest = hashlib.sha256()
    with open(published, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    size = published.stat().st_size
    return Artifact(BOOT_ARTIFACT, published.name, ImageFormat.RAW.value, size, digest.hexdigest(), size), published


def publish(release: Release) -> Published:
    """Write the release's channel files and bundle into ``release.output_dir``, signed."""
    parse_version(release.version)
    release.output_dir.mkdir(parents=True, exist_ok=True)
    image, image_path = _image_artifact(release)
    artifacts = [(image, image_path)]
    boot = _boot_artifact(release)
    if boot is not None:
        artifacts.append(boot)
    created = release.created if release.created is not None else int(time.time())
    manifest = Manifest(
        compatible=release.compatible, version=release.version, created=created,
        artifacts=tuple(a for a, _ in artifacts), expires=release.expires, min_version=release.min_version,
        release_notes=release.release_notes,
    )
    raw = manifest.dump()
    parse_manifest(raw)  # what we publish, the device must read
    bundle = release.output_dir / f"{release.name}-{release.version}.bundle.tar"
    manifest_path = release.output_dir / "manifest.json"
    delta = None
    if release.delta:
        from abflasher.delta.publish import make_delta

        # Made first: a missing casync is said before anything is signed.
        delta = make_delta(release.image, release.output_dir, name=f"{release.name}-{release.version}")
        # A bundle carries full images only; the channel's manifest lists the chunked form next to the full image,
        # so it is signed on its own (a hardware key asks for a second touch).
        with tempfile.TemporaryDirectory(prefix=".bundle-", dir=release.output_dir) as tmp:
            bundle_manifest = Path(tmp) / "manifest.json"
            bundle_manifest.write_bytes(raw)
            bundle_signature = sign_file(bundle_manifest, release.key, agent=release.agent)
            write_bundle(bundle, raw, bundle_signature, [(a.url, path) for a, path in artifacts], mtime=created)
        chunked = Artifact(IMAGE_ARTIFACT, delta.index.name, DELTA_FORMAT, delta.image_size, delta.image_sha256,
                           store=delta.store.name)
        if (chunked.size, chunked.sha256) != (image.size, image.sha256):
            raise errors.Internal("the chunked image is not the published image")
        raw = dataclasses.replace(manifest, artifacts=(*manifest.artifacts, chunked)).dump()
        parse_manifest(raw)
    manifest_path.write_bytes(raw)
    signature = sign_file(manifest_path, release.key, agent=release.agent)
    if delta is None:
        write_bundle(bundle, raw, signature, [(a.url, path) for a, path in artifacts], mtime=created)
    return Published(manifest_path, Path(f"{manifest_path}.sig"), bundle, tuple(path for _, path in artifacts),
                     delta.index if delta else None, delta.store if delta else None)
