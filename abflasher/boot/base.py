"""What the updater needs from whatever chooses the slot to boot."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from abflasher.disk.slots import Slot


class Bootloader(Protocol):
    kind: str

    def primary(self) -> str:
        """The committed slot: what boots after a normal reset."""
        ...

    def trial_slot(self) -> str | None:
        """What a one-shot trial (tryboot) boot would start, if one is configured."""
        ...

    def set_trial(self, slot: str) -> None:
        """Make the next trial boot start ``slot``; the committed configuration stays as it is."""
        ...

    def commit(self, slot: str) -> None:
        """Make ``slot`` the primary."""
        ...

    def disarm(self) -> None:
        """Point a pending trial back at the primary, so a tryboot cannot start a slot about to be overwritten."""
        ...

    def install_boot_files(self, target: Slot, running: Slot, artifact: Path | None) -> None:
        """Give ``target`` its boot files (from ``artifact``, or copied from slot ``running``: the running system
        slot, or from recovery the committed system slot) pointing at its own root."""
        ...

    def repair(self, primary_hint: str | None) -> list[str]:
        """Undo what an interrupted edit left behind; returns what was repaired, for the log."""
        ...
