"""The engine's entry point for a delta update: an index URL and a store URL in, a verified slot out.

`install_from_index` is what `Updater` calls for an Update whose image URL names a ``.caibx`` (the channel's
``image_url`` template, or the request's ``url``, with the request's ``store`` or ``delta_store_url`` or casync's
default store), and what a signed manifest's ``{"format": "caibx", "url", "store", "size", "sha256"}`` artifact is
installed through. It fetches and checks the index, finds the slots' kept indexes (`delta/kept.py`), builds the
target (`delta/install.py`) and keeps the new index for the next update.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from abflasher import errors
from abflasher.delta import kept
from abflasher.delta.index import ChunkIndex, open_index
from abflasher.image.locations import check_http_url, redact_url

if TYPE_CHECKING:
    from abflasher.api import PreparedUpdate
    from abflasher.config import Config
    from abflasher.delta.install import DeltaResult, ProgressCallback, Seed
    from abflasher.delta.store import StoreOptions
    from abflasher.device import DeviceReading
    from abflasher.disk.slots import Slot
    from abflasher.state import State

log = logging.getLogger(__name__)

#: An index larger than this describes more than any slot holds (40 bytes a chunk).
MAX_INDEX_BYTES = 64 << 20
INDEX_SUFFIX = ".caibx"


def is_index_url(url: str) -> bool:
    """Whether ``url`` names a casync blob index (its path ends in .caibx), i.e. asks for a delta update."""
    return urllib.parse.urlsplit(url).path.endswith(INDEX_SUFFIX)


@dataclass(frozen=True)
class SlotsOnDevice:
    """What the device offers a delta update besides the store: the target's old content and the booted slot, each
    with the sha256 of the image the state says it holds (the key of its kept index)."""

    state_dir: str
    target_slot: str
    target_sha256: str | None = None
    booted_device: str | None = None
    booted_sha256: str | None = None
    #: Where the index of the booted slot's release is published, for a booted slot whose image has no kept index
    #: (installed in full): it is only a hint, as every chunk read from the slot is checked against its id.
    booted_index_url: str | None = None
    #: The booted release's index, already fetched (a signed channel's delta: `delta/signed.py`).
    booted_index: ChunkIndex | None = None


def store_options(config: Config) -> StoreOptions:
    """The configuration's HTTP timeouts and retries, and its delta_connections, for a chunk store."""
    from abflasher.delta.store import StoreOptions

    return StoreOptions(
        connect_timeout=config.http_connect_timeout,
        read_timeout=config.http_read_timeout,
        retries=config.http_retries,
        connections=config.delta_connections,
    )


def fetch_index(index_url: str, options: StoreOptions, cancel: threading.Event | None = None,
                scratch_dir: str | None = None) -> tuple[ChunkIndex, str]:
    """The index at ``index_url`` (http(s) or a local path), at most MAX_INDEX_BYTES, and the sha256 of its file.

    The index is read from its file as it is used (its memory stays flat whatever the image's size): a local one
    where it is, a downloaded one from an unlinked temporary file in ``scratch_dir`` (None: the system's temporary
    directory) that disappears when the index is closed."""
    shown = redact_url(index_url)
    digest = hashlib.sha256()
    if not index_url.startswith(("http://", "https://")):
        try:
            handle: IO[bytes] = open(index_url, "rb", buffering=0)  # noqa: SIM115 (the index owns it)
        except OSError as exc:
            raise errors.InvalidArgument(f"cannot read index {index_url}: {exc.strerror}") from exc
        try:
            while piece := handle.read(1 << 20):
                digest.update(piece)
                if handle.tell() > MAX_INDEX_BYTES:
                    break
        except OSError as exc:
            handle.close()
            raise errors.InvalidArgument(f"cannot read index {index_url}: {exc.strerror}") from exc
    else:
        from abflasher.image.http import HttpSource

        handle = tempfile.TemporaryFile(dir=scratch_dir)  # noqa: SIM115 (the index owns it)
        try:
            source = HttpSource(index_url, connect_timeout=options.connect_timeout,
                                read_timeout=options.read_timeout, retries=options.retries, label="index",
                                cancel=cancel)
            try:
                while handle.tell() <= MAX_INDEX_BYTES and (piece := source.read(1 << 20)):
                    digest.update(piece)
                    handle.write(piece)
            finally:
                source.close()
            handle.flush()
        except BaseException:
            handle.close()
            raise
    if handle.tell() > MAX_INDEX_BYTES:
        handle.close()
        raise errors.BadImage(f"index {shown} is larger than {MAX_INDEX_BYTES} bytes: refusing it")
    return open_index(handle, f"index {shown}"), digest.hexdigest()


def published_index(url: str, options: StoreOptions, cancel: threading.Event,
                    scratch_dir: str | None = None) -> ChunkIndex | None:
    """The index at ``url``, or None when it cannot be had (a seed is an offer, not a requirement)."""
    try:
        return fetch_index(url, options, cancel, scratch_dir)[0]
    except errors.Cancelled:
        raise
    except errors.AbFlasherError as exc:
        log.info("no index of the booted slot's release: %s", exc)
        return None


def install_from_index(
    index_url: str,
    store_url: str,
    target: str | os.PathLike[str],
    *,
    expected_size: int | None,
    expected_sha256: str | None,
    options: StoreOptions,
    slots: SlotsOnDevice | None = None,
    seeds: Sequence[Seed] = (),
    target_index: ChunkIndex | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    mountinfo: str = "/proc/self/mountinfo",
    sys_root: str = "/sys",
) -> DeltaResult:
    """Install the image ``index_url`` describes into ``target``, its chunks from ``store_url`` ("" for casync's
    default, ``default.castr`` next to the index) where the device does not hold them already; the whole target is
    read back and verified as a full install is.

    ``expected_sha256`` is the sha256 of the image (compared before the image's first chunks are written, and with the
    read-back) or of the index file itself (which makes every chunk id, and so the image, trusted);
    ``expected_size`` the image's size, checked against the index before anything is written. ``slots`` says what
    the device holds (None: a plain target, nothing kept); ``seeds`` and ``target_index`` (what the target holds) are
    given by hand (``ab-flasher write-delta``). Raises what `install_delta` raises.
    """
    # Imported here: reading an index URL is all the service needs at start.
    from abflasher.delta.install import Seed, install_delta
    from abflasher.delta.store import ChunkStore, default_store_url

    cancel = cancel or threading.Event()
    # The index downloaded and the lookup tables go next to the kept indexes (or to the system's temporary
    # directory for a plain target): on disk, not in memory, and never on the data partition.
    scratch = kept.scratch_dir(slots.state_dir) if slots is not None else None
    with contextlib.ExitStack() as stack:
        index, index_sha256 = fetch_index(index_url, options, cancel, scratch)
        stack.callback(index.close)
        expected_image = expected_sha256.lower() if expected_sha256 else None
        if expected_image is not None and expected_image == index_sha256:
            expected_image = None  # the index itself is what the checksum vouches for, and it names every chunk
        store = ChunkStore(store_url or default_store_url(index_url), index.digest_name, options, cancel)
        seeds = list(seeds)
        if slots is not None:
            booted_index = kept.kept_index(slots.state_dir, slots.booted_sha256)
            if booted_index is not None:
                stack.callback(booted_index.close)
            booted_index = booted_index or slots.booted_index
            if booted_index is None and slots.booted_index_url:
                booted_index = published_index(slots.booted_index_url, options, cancel, scratch)
                if booted_index is not None:
                    stack.callback(booted_index.close)
            if slots.booted_device and booted_index is not None:
                seeds.append(Seed(slots.booted_device, booted_index, "the booted slot"))
            if target_index is None:
                target_index = kept.kept_index(slots.state_dir, slots.target_sha256)
                if target_index is not None:
                    stack.callback(target_index.close)
            if expected_image is not None and kept.building(slots.state_dir, slots.target_slot) == expected_image:
                target_index = index  # an earlier install of this very image stopped halfway: what it wrote is in place
            if expected_image is not None:
                kept.set_building(slots.state_dir, slots.target_slot, expected_image)
        result = install_delta(
            index, store, target,
            expected_size=expected_size,
            expected_sha256=expected_image,
            seeds=seeds,
            target_index=target_index,
            progress=progress,
            cancel=cancel,
            mountinfo=mountinfo,
            sys_root=sys_root,
            scratch_dir=scratch,
        )
        if slots is not None:
            kept.keep_index(slots.state_dir, result.image_sha256, index, still_used=(slots.booted_sha256,))
            kept.set_building(slots.state_dir, slots.target_slot, None)
    return result


def store_url_for(config: Config, prepared: PreparedUpdate) -> str:
    """The chunk store of an update's index: the request's, the configured template's, or "" for casync's default."""
    request = prepared.request
    store = request.store or config.delta_store_url_for(request.version, prepared.image_url)
    if store:
        check_http_url(store, "chunk store")
    return store


def check_request(config: Config, prepared: PreparedUpdate) -> None:
    """Refuse a ``store`` for an update that is no delta update, and a store URL that is not http(s)."""
    if prepared.request.store and not is_index_url(prepared.image_url):
        raise errors.InvalidArgument(
            "a chunk store is only used with a delta update: the image URL must name a casync index (.caibx)"
        )
    store_url_for(config, prepared)


def install_for_update(
    config: Config,
    prepared: PreparedUpdate,
    *,
    device: DeviceReading,
    target: Slot,
    state: State,
    expected_sha256: str | None,
    progress: ProgressCallback,
    cancel: threading.Event,
) -> DeltaResult:
    """`Updater`'s delta install: the booted slot and the target's old content as seeds, per ``state`` (the state as
    it was before this update marked the target incomplete)."""

    def held(slot: str) -> str | None:
        record = state.slots.get(slot)
        return record.installed.sha256 if record is not None else None

    slots = SlotsOnDevice(
        state_dir=config.state_dir,
        target_slot=target.name,
        target_sha256=held(target.name),
        booted_device=device.booted.root_device,
        booted_sha256=held(device.booted.name),
        booted_index_url=_booted_index_url(config, device),
    )
    return install_from_index(
        prepared.image_url,
        store_url_for(config, prepared),
        target.root_device,
        expected_size=None,
        expected_sha256=expected_sha256,
        options=store_options(config),
        slots=slots,
        progress=progress,
        cancel=cancel,
    )


def _booted_index_url(config: Config, device: DeviceReading) -> str | None:
    """The channel's index of the release the booted slot runs, when the channel publishes indexes."""
    if not is_index_url(config.image_url) or "{version}" not in config.image_url:
        return None
    try:
        version = device.version(device.booted, config.root_path)
    except errors.AbFlasherError:
        return None
    return config.image_url_for(version) if version else None
