"""Delta updates through a signed channel: a manifest's ``{"format": "caibx", "url", "store", "size", "sha256"}``
rootfs artifact installed chunk by chunk.

The index and the store are named relative to the manifest; the image's size and sha256 come from the signed
manifest, so the index is checked against the signed size before anything is written and the whole slot is read back
against the signed sha256 before anything is armed (a chunk is checked against its id in the index; an index or a
store that does not yield the signed image fails the read-back: nothing is armed).

Which form is installed when the manifest offers both (`choose`): the delta when the device has a seed for it (a
kept index of what the booted slot or the target holds, or the published index of the booted release, found next to
the new one by putting the booted version in its file name), the full image otherwise; a manifest offering only the
delta is installed by delta whatever the device holds (every chunk then comes from the store).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from abflasher import errors
from abflasher.delta import kept
from abflasher.delta.update import SlotsOnDevice, install_from_index, published_index, store_options

if TYPE_CHECKING:
    from abflasher.config import Config
    from abflasher.delta.index import ChunkIndex
    from abflasher.delta.install import DeltaResult, ProgressCallback
    from abflasher.device import DeviceReading
    from abflasher.disk.slots import Slot
    from abflasher.state import State
    from abflasher.trust.manifest import Artifact
    from abflasher.trust.updates import SignedUpdate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SignedDelta:
    """The delta form of a signed manifest's image, its URLs resolved, and what the device holds to seed it."""

    artifact: Artifact
    index_url: str
    store_url: str
    slots: SlotsOnDevice
    why: str


def _held(state: State, slot: str) -> str | None:
    record = state.slots.get(slot)
    return record.installed.sha256 if record is not None and record.installed.sha256 else None


def _booted_index_url(index_url: str, new_version: str, booted_version: str) -> str | None:
    """The booted release's index, when the new one's file name carries its version (``update-1.2.0.caibx``): the
    publisher (``ab-flasher bundle --delta``) names them so, in one directory."""
    head, _, name = index_url.rpartition("/")
    if not booted_version or booted_version == new_version or new_version not in name:
        return None
    return f"{head}/{name.replace(new_version, booted_version)}"


def choose(
    config: Config, update: SignedUpdate, *, device: DeviceReading, target: Slot, state: State,
    cancel: threading.Event,
) -> SignedDelta | None:
    """The delta to install for ``update``, or None to install its full image (see the module docstring)."""
    delta = update.delta_artifact()
    if delta is None:
        return None
    index_url, store_url = update.delta_urls(delta)
    full = update.manifest.full_image()
    booted_sha256 = _held(state, device.booted.name)
    target_sha256 = _held(state, target.name)
    booted_index: ChunkIndex | None = None
    why = ""
    if kept.kept_index(config.state_dir, booted_sha256) is not None:
        why = "the booted slot's index is kept"
    elif kept.kept_index(config.state_dir, target_sha256) is not None:
        why = "the target slot's old index is kept"
    else:
        try:
            booted_version = device.version(device.booted, config.root_path)
        except errors.AbFlasherError:
            booted_version = ""
        hint = _booted_index_url(index_url, update.manifest.version, booted_version)
        if hint is not None:
            booted_index = published_index(hint, store_options(config), cancel, kept.scratch_dir(config.state_dir))
            if booted_index is not None:
                why = f"the booted release's index is published ({booted_version})"
    if not why and full is not None:
        log.info("installing the full image: this device holds no seed for the delta %s", delta.url)
        return None
    slots = SlotsOnDevice(
        state_dir=config.state_dir,
        target_slot=target.name,
        target_sha256=target_sha256,
        booted_device=device.booted.root_device,
        booted_sha256=booted_sha256,
        booted_index=booted_index,
    )
    return SignedDelta(delta, index_url, store_url, slots, why or "the manifest offers only the delta")


def install(
    config: Config, delta: SignedDelta, *, target: Slot, progress: ProgressCallback, cancel: threading.Event,
) -> DeltaResult:
    """Install ``delta`` into ``target``: its size and sha256 are the signed manifest's."""
    log.info("delta update from %s (%s)", delta.artifact.url, delta.why)
    return install_from_index(
        delta.index_url,
        delta.store_url,
        target.root_device,
        expected_size=delta.artifact.size,
        expected_sha256=delta.artifact.sha256,
        options=store_options(config),
        slots=delta.slots,
        progress=progress,
        cancel=cancel,
    )
