"""The update manifest: one JSON object, signed as it is (its exact bytes), describing one release.

Its schema (docs/trust.md)::

    {
      "format_version": 1,
      "compatible": "acme-gateway-pi4",           # must match the device's compatible string
      "version": "1.2.0",
      "created": "2026-11-30T12:00:00Z",          # RFC 3339, UTC
      "expires": "2027-02-28T12:00:00Z",          # optional
      "min_version": "1.0.0",                     # optional: the oldest version it may be installed over
      "release_notes": "...",                     # optional
      "artifacts": [
        {"name": "rootfs", "url": "root-1.2.0.img.xz", "format": "xz",
         "compressed_size": 123, "size": 456, "sha256": "..."},
        {"name": "boot", "url": "boot-1.2.0.tar", "format": "raw", "compressed_size": 7, "size": 7, "sha256": "..."},
        {"name": "rootfs", "url": "root-1.2.0.caibx", "format": "caibx", "store": "store.castr/",
         "size": 456, "sha256": "..."}
      ]
    }

``url`` and ``store`` are relative to the manifest (a channel serves them next to it; a bundle carries each artifact
as the member named by its ``url``). ``size`` and ``sha256`` are those of the uncompressed data; ``compressed_size``
is the size of the file at ``url`` (not given for a ``caibx`` index, whose chunks come from ``store``).
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass
from typing import Any

from abflasher import errors
from abflasher.image.formats import ImageFormat
from abflasher.version import parse_version

FORMAT_VERSION = 1
#: A manifest is a few hundred bytes of JSON (release notes included); anything larger is refused unread.
MAX_MANIFEST_SIZE = 64 << 10
IMAGE_ARTIFACT = "rootfs"
BOOT_ARTIFACT = "boot"
ARTIFACT_NAMES = (IMAGE_ARTIFACT, BOOT_ARTIFACT)
DELTA_FORMAT = "caibx"
ARTIFACT_FORMATS = frozenset({*(f.value for f in ImageFormat), DELTA_FORMAT})
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_KEYS = frozenset({"format_version", "compatible", "version", "created", "expires", "min_version", "release_notes",
                   "artifacts"})
_ARTIFACT_KEYS = frozenset({"name", "url", "format", "compressed_size", "size", "sha256", "store"})
_COMPATIBLE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._,+:@/-]{0,127}$")


@dataclass(frozen=True)
class Artifact:
    name: str
    url: str
    format: str
    size: int
    sha256: str
    compressed_size: int | None = None
    store: str = ""

    @property
    def is_delta(self) -> bool:
        return self.format == DELTA_FORMAT

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "url": self.url, "format": self.format}
        if self.compressed_size is not None:
            data["compressed_size"] = self.compressed_size
        data.update(size=self.size, sha256=self.sha256)
        if self.store:
            data["store"] = self.store
        return data


@dataclass(frozen=True)
class Manifest:
    compatible: str
    version: str
    created: int  # unix seconds
    artifacts: tuple[Artifact, ...]
    expires: int | None = None
    min_version: str = ""
    release_notes: str = ""
    format_version: int = FORMAT_VERSION

    def image(self) -> Artifact:
        """The root file system image to install: the full image when the manifest has one, else the delta index."""
        images = [a for a in self.artifacts if a.name == IMAGE_ARTIFACT]
        return next((a for a in images if not a.is_delta), images[0])

    def full_image(self) -> Artifact | None:
        return next((a for a in self.artifacts if a.name == IMAGE_ARTIFACT and not a.is_delta), None)

    def boot(self) -> Artifact | None:
        return next((a for a in self.artifacts if a.name == BOOT_ARTIFACT), None)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format_version": self.format_version,
            "compatible": self.compatible,
            "version": self.version,
            "created": format_time(self.created),
        }
        if self.expires is not None:
            data["expires"] = format_time(self.expires)
        if self.min_version:
            data["min_version"] = self.min_version
        if self.release_notes:
            data["release_notes"] = self.release_notes
        data["artifacts"] = [a.to_json() for a in self.artifacts]
        return data

    def dump(self) -> bytes:
        return (json.dumps(self.to_json(), indent=2) + "\n").encode()


def format_time(timestamp: int) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: object, key: str) -> int:
    if not isinstance(value, str):
        raise errors.BadManifest(f"manifest: {key} must be an RFC 3339 time like 2026-11-30T12:00:00Z")
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise errors.BadManifest(f"manifest: {key} {value!r} is not an RFC 3339 time like 2026-11-30T12:00:00Z") \
            from None
    if parsed.tzinfo is None:
        raise errors.BadManifest(f"manifest: {key} {value!r} has no time zone (end it with Z for UTC)")
    return int(parsed.timestamp())


def check_relative_url(url: object, key: str) -> str:
    """A URL relative to the manifest: a path below it, no scheme, host, query or '..'."""
    if not isinstance(url, str) or not url or len(url) > 1024:
        raise errors.BadManifest(f"manifest: artifact {key} must be a non-empty relative URL")
    parts = url.split("/")
    if (
        "://" in url or url.startswith("/") or "\\" in url or any(c in url for c in "?#")
        or any(p in ("..", ".") for p in parts) or any(ord(c) < 0x21 for c in url)
    ):
        raise errors.BadManifest(
            f"manifest: artifact {key} {url!r} must be a path relative to the manifest (no scheme, no '..', no query)"
        )
    return url


def _size(value: object, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise errors.BadManifest(f"manifest: artifact {key} must be a non-negative integer")
    return value


def _artifact(data: object, index: int) -> Artifact:
    if not isinstance(data, dict):
        raise errors.BadManifest(f"manifest: artifact {index} is not a JSON object")
    unknown = set(data) - _ARTIFACT_KEYS
    if unknown:
        raise errors.BadManifest(f"manifest: artifact {index} has unknown keys: {', '.join(sorted(unknown))}")
    name = data.get("name")
    if name not in ARTIFACT_NAMES:
        raise errors.BadManifest(f"manifest: artifact {index} name {name!r}: use {' or '.join(ARTIFACT_NAMES)}")
    fmt = data.get("format")
    if fmt not in ARTIFACT_FORMATS:
        raise errors.BadManifest(
            f"manifest: artifact {name} format {fmt!r}: use one of {', '.join(sorted(ARTIFACT_FORMATS))}"
        )
    if name == BOOT_ARTIFACT and fmt != ImageFormat.RAW.value:
        raise errors.BadManifest(
            "manifest: the boot artifact is installed as it is (a tar, tar.gz or FAT image): its format must be raw"
        )
    sha256 = data.get("sha256")
    if not isinstance(sha256, str) or not _SHA256_RE.match(sha256):
        raise errors.BadManifest(f"manifest: artifact {name} sha256 must be 64 lowercase hex digits")
    store = data.get("store", "")
    if fmt == DELTA_FORMAT:
        if name != IMAGE_ARTIFACT:
            raise errors.BadManifest(f"manifest: a {DELTA_FORMAT} artifact must be the {IMAGE_ARTIFACT}")
        store = check_relative_url(store, f"{name} store")
        compressed = data.get("compressed_size")
        compressed_size = _size(compressed, f"{name} compressed_size") if compressed is not None else None
    else:
        if store:
            raise errors.BadManifest(f"manifest: artifact {name}: only a {DELTA_FORMAT} artifact has a store")
        compressed_size = _size(data.get("compressed_size"), f"{name} compressed_size")
    size = _size(data.get("size"), f"{name} size")
    if fmt == "raw" and compressed_size != size:
        raise errors.BadManifest(f"manifest: artifact {name} is raw but its compressed_size differs from its size")
    return Artifact(name, check_relative_url(data.get("url"), f"{name} url"), fmt, size, sha256, compressed_size,
                    str(store))


def _text(data: dict[str, Any], key: str, *, required: bool) -> str:
    value = data.get(key, "")
    if not isinstance(value, str) or (required and not value.strip()):
        raise errors.BadManifest(f"manifest: {key} must be {'a non-empty' if required else 'a'} string")
    return value


def parse_manifest(raw: bytes) -> Manifest:
    """The manifest in ``raw``; BadManifest (or ManifestTooLarge) saying what is wrong."""
    if len(raw) > MAX_MANIFEST_SIZE:
        raise errors.ManifestTooLarge(f"the manifest is {len(raw)} bytes; the limit is {MAX_MANIFEST_SIZE}")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise errors.BadManifest(f"the manifest is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise errors.BadManifest("the manifest is not a JSON object")
    if data.get("format_version") != FORMAT_VERSION:
        raise errors.BadManifest(
            f"manifest format_version {data.get('format_version')!r} is not supported (this version reads "
            f"{FORMAT_VERSION})"
        )
    unknown = set(data) - _KEYS
    if unknown:
        raise errors.BadManifest(f"the manifest has unknown keys: {', '.join(sorted(unknown))}")
    compatible = _text(data, "compatible", required=True)
    if not _COMPATIBLE_RE.match(compatible):
        raise errors.BadManifest(f"manifest: compatible {compatible!r} has characters a compatible string cannot")
    version = _text(data, "version", required=True)
    try:
        parse_version(version)
        min_version = _text(data, "min_version", required=False)
        if min_version:
            parse_version(min_version)
    except errors.InvalidArgument as exc:
        raise errors.BadManifest(f"manifest: {exc}") from None
    created = parse_time(data.get("created"), "created")
    expires = parse_time(data["expires"], "expires") if data.get("expires") is not None else None
    if expires is not None and expires <= created:
        raise errors.BadManifest("manifest: it expires before it was created")
    items = data.get("artifacts")
    if not isinstance(items, list) or not items:
        raise errors.BadManifest("manifest: artifacts must be a non-empty list")
    artifacts = tuple(_artifact(item, index) for index, item in enumerate(items))
    seen: set[tuple[str, bool]] = set()
    urls: set[str] = set()
    for artifact in artifacts:
        kind = (artifact.name, artifact.is_delta)
        if kind in seen or artifact.url in urls:
            raise errors.BadManifest(f"manifest: artifact {artifact.name} ({artifact.url}) is listed twice")
        seen.add(kind)
        urls.add(artifact.url)
    if not any(a.name == IMAGE_ARTIFACT for a in artifacts):
        raise errors.BadManifest(f"manifest: no {IMAGE_ARTIFACT} artifact")
    return Manifest(
        compatible=compatible, version=version, created=created, artifacts=artifacts, expires=expires,
        min_version=min_version, release_notes=_text(data, "release_notes", required=False),
    )
