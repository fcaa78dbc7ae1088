"""A bundle: one plain POSIX tar file (``tar tvf`` lists it) carrying a signed release, read as a stream.

Its members, in this order and nothing else::

    manifest.json         the manifest (abflasher/trust/manifest.py), at most MAX_MANIFEST_SIZE bytes
    manifest.json.sig     its OpenSSH signature (ssh-keygen -Y sign -n ab-flasher)
    <rootfs url>          the image, named as the manifest's full rootfs artifact's url
    <boot url>            optional: the boot artifact, when the manifest lists one

The reader never seeks and never buffers a member it has not been asked for: the manifest and signature come first
so they are verified before a single image byte is read, the image streams straight into the pipeline, and each
member's size must be what the manifest says before its data is read. A member out of order, unknown, duplicated,
not a regular file or of the wrong size is refused (BadBundle); a bundle that ends early is TruncatedBundle.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import IO, cast

from abflasher import errors
from abflasher.image.sources import ImageSource, PrefixedSource
from abflasher.trust.manifest import MAX_MANIFEST_SIZE, Artifact, Manifest
from abflasher.trust.signature import MAX_SIGNATURE_SIZE

MANIFEST_MEMBER = "manifest.json"
SIGNATURE_MEMBER = "manifest.json.sig"
_TAR_MAGIC_OFFSET = 257
COPY_CHUNK = 1 << 20


def is_bundle(head: bytes) -> bool:
    """Do these first bytes (at least 262) start a tar archive (POSIX ustar, or GNU tar's variant of it)?"""
    return head[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] == b"ustar"


def bundle_members(manifest: Manifest) -> list[Artifact]:
    """The artifacts a bundle of ``manifest`` carries after the manifest and its signature, in order."""
    image = manifest.full_image()
    delta = next((a for a in manifest.artifacts if a.is_delta), None)
    if image is None or delta is not None:
        # A bundle is one file: it cannot carry a chunk store, and what it signs must be what it holds.
        raise errors.BadBundle(
            f"a bundle carries full images only: its manifest lists a delta ({delta.format if delta else 'caibx'} "
            f"index {delta.url if delta else ''}), which only a channel can serve"
        )
    boot = manifest.boot()
    members = [image] if boot is None else [image, boot]
    for artifact in members:
        if "/" in artifact.url:
            raise errors.BadBundle(
                f"artifact {artifact.name}: in a bundle its url must be a plain file name, not {artifact.url!r}"
            )
    return members


class _MemberSource:
    """One member's data as an ImageSource."""

    def __init__(self, member: IO[bytes], size: int, description: str) -> None:
        self._member = member
        self.size: int | None = size
        self.description = description

    def read(self, n: int) -> bytes:
        try:
            return self._member.read(n)
        except tarfile.TarError as exc:
            raise errors.TruncatedBundle(f"the bundle ends in the middle of {self.description}") from exc

    def close(self) -> None:
        pass


class BundleReader:
    """Reads a bundle from ``source`` (``head``: bytes already read from it for format detection)."""

    def __init__(self, source: ImageSource, head: bytes = b"", description: str = "the bundle") -> None:
        self.description = description
        self._seen: list[str] = []
        try:
            # Closed with the source it reads (the caller's); a stream-mode TarFile holds nothing else.
            # tarfile's stream mode only calls read(n) with n > 0 and copes with short reads: a source will do.
            self._tar = tarfile.open(fileobj=cast(IO[bytes], PrefixedSource(source, head)), mode="r|")  # noqa: SIM115
        except tarfile.TarError as exc:
            raise errors.BadBundle(f"{description} is not a readable tar archive: {exc}") from exc

    def _next(self, expected: str) -> tarfile.TarInfo:
        try:
            member = self._tar.next()
        except tarfile.TarError as exc:
            raise errors.TruncatedBundle(f"{self.description} is damaged or ends early (before {expected}): {exc}") \
                from exc
        if member is None:
            raise errors.TruncatedBundle(f"{self.description} ends before its member {expected}")
        name = member.name.removeprefix("./")
        if name in self._seen:
            raise errors.BadBundle(f"{self.description} has the member {name} twice")
        self._seen.append(name)
        if name != expected:
            raise errors.BadBundle(
                f"{self.description} has the member {name!r} where {expected} belongs (members must be, in order: "
                f"{MANIFEST_MEMBER}, {SIGNATURE_MEMBER}, the image, the optional boot artifact)"
            )
        if not member.isreg():
            raise errors.BadBundle(f"{self.description}: member {name} is not a regular file")
        return member

    def _read_small(self, member: tarfile.TarInfo, limit: int) -> bytes:
        if member.size > limit:
            raise errors.ManifestTooLarge(
                f"{self.description}: member {member.name} is {member.size} bytes, more than the {limit} such a "
                "file can be; refused unread"
            )
        handle = self._tar.extractfile(member)
        assert handle is not None
        try:
            return handle.read(member.size)
        except tarfile.TarError as exc:
            raise errors.TruncatedBundle(f"{self.description} ends in the middle of {member.name}") from exc

    def read_manifest(self) -> tuple[bytes, bytes]:
        """The manifest's exact bytes and its signature: the first two members."""
        manifest = self._read_small(self._next(MANIFEST_MEMBER), MAX_MANIFEST_SIZE)
        signature = self._read_small(self._next(SIGNATURE_MEMBER), MAX_SIGNATURE_SIZE)
        return manifest, signature

    def artifact(self, artifact: Artifact) -> ImageSource:
        """The next member, which must be ``artifact`` with its compressed size, as a stream."""
        member = self._next(artifact.url)
        if member.size != artifact.compressed_size:
            raise errors.BadBundle(
                f"{self.description}: member {artifact.url} is {member.size} bytes, its manifest says "
                f"{artifact.compressed_size}"
            )
        handle = self._tar.extractfile(member)
        assert handle is not None
        return _MemberSource(handle, member.size, f"{artifact.url} in {self.description}")

    def finish(self) -> None:
        """After the last artifact: the archive must end here."""
        try:
            member = self._tar.next()
        except tarfile.TarError as exc:
            raise errors.BadBundle(f"{self.description} has damaged data after its last artifact: {exc}") from exc
        if member is not None:
            raise errors.BadBundle(
                f"{self.description} has an unexpected member {member.name!r} after its last artifact"
            )


def copy_checked(source: ImageSource, artifact: Artifact, path: Path, cancel: threading.Event | None = None) -> None:
    """Copy an artifact served as is (format raw) into ``path``, checking its size and sha256 against the manifest."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "wb") as handle:
        while chunk := source.read(COPY_CHUNK):
            if cancel is not None and cancel.is_set():
                raise errors.Cancelled("the update was cancelled")
            size += len(chunk)
            if size > artifact.size:
                raise errors.TooLarge(f"artifact {artifact.url} is larger than the {artifact.size} bytes its "
                                      "manifest says")
            digest.update(chunk)
            handle.write(chunk)
    if size != artifact.size:
        raise errors.BadImage(f"artifact {artifact.url} is {size} bytes, its manifest says {artifact.size}")
    if digest.hexdigest() != artifact.sha256:
        raise errors.ChecksumMismatch(
            f"artifact {artifact.url}: sha256 {digest.hexdigest()}, its signed manifest says {artifact.sha256}"
        )


def write_bundle(path: Path, manifest: bytes, signature: bytes, artifacts: Iterable[tuple[str, Path]],
                 *, mtime: int) -> None:
    """Write a bundle: the manifest, its signature, then each (member name, file) in order. POSIX pax format, which
    is plain ustar unless a member needs more (an image over 8 GiB)."""
    def info(name: str, size: int) -> tarfile.TarInfo:
        member = tarfile.TarInfo(name)
        member.size = size
        member.mode = 0o644
        member.mtime = mtime
        member.uname = member.gname = "root"
        return member

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(info(MANIFEST_MEMBER, len(manifest)), io.BytesIO(manifest))
            tar.addfile(info(SIGNATURE_MEMBER, len(signature)), io.BytesIO(signature))
            for name, file in artifacts:
                with open(file, "rb") as handle:
                    tar.addfile(info(name, os.fstat(handle.fileno()).st_size), handle)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
