"""Where an update's bytes come from: the image (a URL or an uploaded fd), its expected sha256, the boot artifact
published next to it, and the version the update channel announces. Every download is built by ``open_http`` /
``http_options`` (abflasher/image/http.py) from the configuration."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from abflasher import errors
from abflasher.api import PreparedUpdate
from abflasher.config import Config
from abflasher.image.locations import check_http_url, redact_url
from abflasher.image.sources import ImageSource
from abflasher.version import parse_version


def _file_name(url: str) -> str:
    return os.path.basename(url.split("?", 1)[0])


def image_url(config: Config, url: str, version: str) -> str:
    """The image URL of a request (its own, or the configured template's for ``version``), checked."""
    resolved = url or config.image_url_for(version)
    check_http_url(resolved)
    return resolved


def expected_sha256(config: Config, prepared: PreparedUpdate, cancel: threading.Event | None = None) -> str | None:
    """The sha256 the image must have: the request's own, or its line of the configured checksum file; None for an
    upload without one, or when no checksum is configured nor required."""
    from abflasher.image.checksums import fetch_checksum, normalize_sha256
    from abflasher.image.http import http_options

    request = prepared.request
    if request.sha256:
        return normalize_sha256(request.sha256)
    if request.fd is not None:
        return None
    checksum_url = config.checksum_url_for(request.version, prepared.image_url)
    if not checksum_url:
        if config.require_checksum:
            raise errors.InvalidArgument("no checksum for the image: configure checksum_url or pass a sha256")
        return None
    return fetch_checksum(checksum_url, _file_name(prepared.image_url), **http_options(config, cancel))


def open_image(config: Config, prepared: PreparedUpdate, cancel: threading.Event) -> ImageSource:
    """The image's bytes: a duplicate of the uploaded fd (the request keeps its own, closed by the updater), or
    the download."""
    from abflasher.image.http import open_http
    from abflasher.image.sources import FdSource

    request = prepared.request
    if request.fd is not None:
        return FdSource(
            os.dup(request.fd), prepared.description, cancel=cancel, idle_timeout=config.upload_idle_timeout
        )
    return open_http(config, prepared.image_url, cancel=cancel)


def fetch_boot_artifact(
    config: Config, prepared: PreparedUpdate, workdir: Path, cancel: threading.Event
) -> Path | None:
    """The new slot's boot files as published next to the image (boot_artifact_url), checked against their
    sha256; None when none is configured (then the running slot's boot files are copied)."""
    from abflasher.image.checksums import fetch_checksum
    from abflasher.image.http import http_options, open_http

    request = prepared.request
    if not config.boot_artifact_url or not request.version:
        return None
    url = config.boot_artifact_url.replace("{version}", request.version)
    check_http_url(url, "boot artifact")
    name = _file_name(url) or "boot-artifact"
    expected: str | None = None
    checksum_url = config.checksum_url_for(request.version, url)
    if checksum_url:
        expected = fetch_checksum(checksum_url, name, **http_options(config, cancel))
    elif config.require_checksum:
        raise errors.InvalidArgument("no checksum for the boot artifact: configure checksum_url")
    path = workdir / name
    digest = hashlib.sha256()
    source = open_http(config, url, label="boot artifact", cancel=cancel)
    try:
        with open(path, "wb") as handle:
            while chunk := source.read(1 << 20):
                if cancel.is_set():
                    raise errors.Cancelled("the update was cancelled")
                digest.update(chunk)
                handle.write(chunk)
    finally:
        source.close()
    if expected is not None and digest.hexdigest() != expected:
        raise errors.ChecksumMismatch(
            f"boot artifact {name}: sha256 {digest.hexdigest()}, its checksum file says {expected}"
        )
    return path


def available_version(config: Config) -> str:
    """The version the update channel (channel_url) names on its first line."""
    from abflasher.image.http import open_http

    if not config.channel_url:
        raise errors.InvalidArgument("no update channel configured (channel_url in /etc/ab-flasher/ab-flasher.conf)")
    source = open_http(config, config.channel_url, label="update channel")
    try:
        text = source.read(4096).decode("utf-8", "replace")
    finally:
        source.close()
    available = text.strip().splitlines()[0].strip() if text.strip() else ""
    try:
        parse_version(available)
    except errors.InvalidArgument:
        # Not quoted: what a server sent is not the service's to repeat to its callers.
        raise errors.Network(
            f"the update channel {redact_url(config.channel_url)} does not name a version on its first "
            "line (expected one like 1.4.0)"
        ) from None
    return available
