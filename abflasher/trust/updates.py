"""Where a signed update comes from, as the updater sees it: a bundle stream (an uploaded fd, a file, a URL) or a
channel, each giving a verified manifest first and then the artifacts it describes, checked against it.

Which path applies (``open_update``):

- trusted keys configured (``trusted_keys`` lists a key): everything must be signed. An fd or a URL must hold a
  bundle (tar) or, for a URL, a manifest with its ``.sig`` next to it; no URL means the configured channel
  (``channel_url``). Anything else is Unsigned.
- no trusted keys (the simple mode): an fd holding a bundle is installed with its manifest's sizes and checksums
  (its signature cannot be checked and is reported as such); anything else goes the simple way (image_url and its
  checksum file, or the uploaded image as it is).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from abflasher import errors
from abflasher.api import PreparedUpdate
from abflasher.config import Config
from abflasher.image.locations import redact_url
from abflasher.image.pipeline import read_head
from abflasher.image.sources import FdSource, ImageSource, PrefixedSource
from abflasher.trust.bundle import BundleReader, bundle_members, copy_checked, is_bundle
from abflasher.trust.manifest import IMAGE_ARTIFACT, MAX_MANIFEST_SIZE, Artifact, Manifest, parse_manifest
from abflasher.trust.signature import Signer, read_allowed_signers, verify


def trusted_keys(config: Config) -> str | None:
    """The allowed_signers file when it lists at least one key (updates must then be signed), else None."""
    if not config.trusted_keys:
        return None
    return config.trusted_keys if read_allowed_signers(config.trusted_keys) else None


@dataclass(frozen=True)
class VerifiedManifest:
    manifest: Manifest
    signer: Signer | None  # None: a bundle installed in the simple mode, whose signature nobody checked


def verify_manifest(config: Config, raw: bytes, signature: bytes, *, at: float) -> VerifiedManifest:
    """The manifest, once its signature checked out against the trusted keys (at time ``at``); without trusted keys
    only parsed."""
    keys = trusted_keys(config)
    if keys is None:
        return VerifiedManifest(parse_manifest(raw), None)
    # Verified before it is parsed: nothing an untrusted party wrote goes further than ssh-keygen.
    signer = verify(raw, signature, keys, at=at, workdir=_workdir(config))
    return VerifiedManifest(parse_manifest(raw), signer)


def _workdir(config: Config) -> str | None:
    return config.run_dir if os.path.isdir(config.run_dir) else None


class SignedUpdate:
    """A verified manifest and the way to its artifacts; ``image`` once, then ``boot_artifact``, then ``finish``."""

    verified: VerifiedManifest
    description: str

    @property
    def manifest(self) -> Manifest:
        return self.verified.manifest

    def image_artifact(self) -> Artifact:
        """The image the manifest offers: its full image, or its delta index when it offers only that."""
        return self.manifest.image()

    def delta_artifact(self) -> Artifact | None:
        """The manifest's delta (caibx) form of the image, or None."""
        return next((a for a in self.manifest.artifacts if a.name == IMAGE_ARTIFACT and a.is_delta), None)

    def delta_urls(self, artifact: Artifact) -> tuple[str, str]:
        """The index and store URLs of a delta artifact."""
        raise errors.BadBundle("a bundle carries full images only: a delta (caibx) artifact needs a channel")

    def image(self, cancel: threading.Event) -> ImageSource:
        raise NotImplementedError

    def boot_artifact(self, workdir: Path, cancel: threading.Event) -> Path | None:
        raise NotImplementedError

    def finish(self) -> None:
        """After every artifact was read: nothing may follow."""

    def close(self) -> None:
        raise NotImplementedError


class BundleUpdate(SignedUpdate):
    def __init__(self, config: Config, source: ImageSource, head: bytes, *, at: float) -> None:
        self._source = source
        self.description = source.description
        self._reader = BundleReader(source, head, f"the bundle ({source.description})")
        raw, signature = self._reader.read_manifest()
        self.verified = verify_manifest(config, raw, signature, at=at)
        self._members = bundle_members(self.manifest)

    def image(self, cancel: threading.Event) -> ImageSource:
        return self._reader.artifact(self.image_artifact())

    def boot_artifact(self, workdir: Path, cancel: threading.Event) -> Path | None:
        boot = self.manifest.boot()
        if boot is None:
            return None
        path = workdir / boot.url
        copy_checked(self._reader.artifact(boot), boot, path, cancel)
        return path

    def finish(self) -> None:
        self._reader.finish()

    def close(self) -> None:
        self._source.close()


class ChannelUpdate(SignedUpdate):
    def __init__(self, config: Config, manifest_url: str, raw: bytes, signature: bytes, *, at: float) -> None:
        self._config = config
        self._url = manifest_url
        self.description = redact_url(manifest_url)
        self.verified = verify_manifest(config, raw, signature, at=at)

    def _download(self, artifact: Artifact, cancel: threading.Event) -> ImageSource:
        from abflasher.image.http import open_http
        from abflasher.trust import channel

        url = channel.artifact_url(self._url, artifact.url)
        return channel.SizedSource(open_http(self._config, url, label=artifact.name, cancel=cancel), artifact)

    def image(self, cancel: threading.Event) -> ImageSource:
        artifact = self.manifest.full_image()
        if artifact is None:
            raise errors.UnsupportedArtifact(f"version {self.manifest.version} is offered only as a delta")
        return self._download(artifact, cancel)

    def delta_urls(self, artifact: Artifact) -> tuple[str, str]:
        from abflasher.trust import channel

        store = channel.artifact_url(self._url, artifact.store) if artifact.store else ""
        return channel.artifact_url(self._url, artifact.url), store

    def boot_artifact(self, workdir: Path, cancel: threading.Event) -> Path | None:
        boot = self.manifest.boot()
        if boot is None:
            return None
        path = workdir / os.path.basename(boot.url)
        source = self._download(boot, cancel)
        try:
            copy_checked(source, boot, path, cancel)
        finally:
            source.close()
        return path

    def close(self) -> None:
        pass


def channel_manifest_url(config: Config) -> str:
    if not config.channel_url:
        raise errors.InvalidArgument(
            "no update channel configured: set channel_url (the URL of the channel's manifest.json) in "
            "/etc/ab-flasher/ab-flasher.conf"
        )
    return config.channel_url


def open_channel(config: Config, manifest_url: str, cancel: threading.Event | None, *, at: float) -> ChannelUpdate:
    from abflasher.trust import channel

    raw, signature = channel.fetch_signed_manifest(config, manifest_url, cancel)
    return ChannelUpdate(config, manifest_url, raw, signature, at=at)


def _unsigned(what: str) -> errors.Unsigned:
    return errors.Unsigned(
        f"{what} is not a signed bundle: trusted keys are configured, so only updates signed by them are installed "
        "(make one with `ab-flasher bundle`)"
    )


def open_update(
    config: Config, prepared: PreparedUpdate, cancel: threading.Event, *, at: float
) -> SignedUpdate | ImageSource | None:
    """The update ``prepared`` asks for: a SignedUpdate whose manifest is verified; a plain image source (an upload
    in the simple mode); or None (the simple mode's download, which the caller opens)."""
    request = prepared.request
    signed = trusted_keys(config) is not None
    if request.fd is None and not signed:
        return None
    if request.fd is None and not request.url:
        return open_channel(config, channel_manifest_url(config), cancel, at=at)
    source: ImageSource
    if request.fd is not None:
        source = FdSource(os.dup(request.fd), prepared.description, cancel=cancel,
                          idle_timeout=config.upload_idle_timeout)
    else:
        # The HTTP stack (requests) is loaded only by updates that download: see abflasher/image/locations.py.
        from abflasher.image.http import open_http

        source = open_http(config, request.url, cancel=cancel)
    try:
        head = read_head(source)
        if is_bundle(head):
            return BundleUpdate(config, source, head, at=at)
        if request.fd is None and head.lstrip()[:1] == b"{":
            from abflasher.trust import channel

            raw = head + channel.read_limited(source, MAX_MANIFEST_SIZE - len(head), "the manifest")
            source.close()
            signature = channel.fetch_signature(config, request.url, cancel)
            return ChannelUpdate(config, request.url, raw, signature, at=at)
        if signed:
            raise _unsigned("the uploaded image" if request.fd is not None else redact_url(request.url))
        return PrefixedSource(source, head)
    except BaseException:
        source.close()
        raise
