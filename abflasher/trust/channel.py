"""A channel: what any static web server or CDN can serve, with no server logic.

A directory with ``manifest.json``, ``manifest.json.sig`` and the artifacts the manifest names by URLs relative to
it (``ab-flasher bundle`` writes exactly that). The device fetches the manifest and its signature (``<manifest
URL>.sig``), verifies them, and downloads each artifact from ``urljoin(manifest URL, artifact url)``, bounded by the
size the signed manifest gives.
"""

from __future__ import annotations

import threading
import urllib.parse

from abflasher import errors
from abflasher.config import Config
from abflasher.image.http import HttpStatusError, open_http
from abflasher.image.locations import redact_url
from abflasher.image.sources import ImageSource
from abflasher.trust.manifest import MAX_MANIFEST_SIZE, Artifact
from abflasher.trust.signature import MAX_SIGNATURE_SIZE


def signature_url(manifest_url: str) -> str:
    parts = urllib.parse.urlsplit(manifest_url)
    return urllib.parse.urlunsplit(parts._replace(path=parts.path + ".sig"))


def artifact_url(manifest_url: str, relative: str) -> str:
    return urllib.parse.urljoin(manifest_url, relative)


def read_limited(source: ImageSource, limit: int, what: str) -> bytes:
    """All of ``source``, refused (ManifestTooLarge) as soon as it passes ``limit`` bytes."""
    if source.size is not None and source.size > limit:
        raise errors.ManifestTooLarge(f"{what} is {source.size} bytes, more than such a file can be ({limit})")
    data = b""
    while chunk := source.read(limit + 1 - len(data)):
        data += chunk
        if len(data) > limit:
            raise errors.ManifestTooLarge(f"{what} is more than {limit} bytes, more than such a file can be")
    return data


def fetch_small(config: Config, url: str, limit: int, what: str, cancel: threading.Event | None) -> bytes:
    source = open_http(config, url, label=what, cancel=cancel)
    try:
        return read_limited(source, limit, what)
    finally:
        source.close()


def fetch_signature(config: Config, manifest_url: str, cancel: threading.Event | None) -> bytes:
    """The signature next to a manifest (``<manifest URL>.sig``); Unsigned when there is none."""
    try:
        return fetch_small(config, signature_url(manifest_url), MAX_SIGNATURE_SIZE, "the manifest's signature",
                           cancel)
    except HttpStatusError as exc:
        if exc.status in (404, 410):
            raise errors.Unsigned(
                f"the manifest {redact_url(manifest_url)} has no signature ({redact_url(signature_url(manifest_url))} "
                "is missing): trusted keys are configured, so only signed updates are installed"
            ) from exc
        raise


def fetch_signed_manifest(config: Config, manifest_url: str, cancel: threading.Event | None) -> tuple[bytes, bytes]:
    """The channel's manifest and its signature, as served (not yet verified)."""
    manifest = fetch_small(config, manifest_url, MAX_MANIFEST_SIZE, "the channel's manifest", cancel)
    return manifest, fetch_signature(config, manifest_url, cancel)


class SizedSource:
    """A download that must be exactly ``artifact.compressed_size`` bytes: more is TooLarge at the first byte too
    many, fewer is BadImage at the end."""

    def __init__(self, source: ImageSource, artifact: Artifact) -> None:
        self._source = source
        self._expected = artifact.compressed_size if artifact.compressed_size is not None else artifact.size
        self._url = artifact.url
        self._count = 0
        self.size: int | None = self._expected
        self.description = source.description

    def read(self, n: int) -> bytes:
        data = self._source.read(n)
        self._count += len(data)
        if self._count > self._expected:
            raise errors.TooLarge(f"{self._url} is larger than the {self._expected} bytes its signed manifest says")
        if not data and self._count < self._expected:
            raise errors.BadImage(
                f"{self._url} ended after {self._count} bytes; its signed manifest says {self._expected}"
            )
        return data

    def close(self) -> None:
        self._source.close()
