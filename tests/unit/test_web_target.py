"""The slot the upload page shows as the target (and caps the upload's size by) is the slot the engine writes, in
every layout: A/B, A/B + recovery and main + recovery, from every slot that can run."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from abflasher import decisions, errors
from abflasher.state import State
from abflasher.web.app import status_json, target_slot

LAYOUTS = {
    "ab": [("a", "system"), ("b", "system")],
    "ab+recovery": [("a", "system"), ("b", "system"), ("recovery", "recovery")],
    "main+recovery": [("main", "system"), ("recovery", "recovery")],
}
CASES = [(layout, booted, primary) for layout, slots in LAYOUTS.items()
         for booted, _ in slots for primary, _ in slots]


def reported_slots(layout: str, booted: str, primary: str) -> list[dict[str, Any]]:
    """GetSlots as the service reports them (the fields the page reads)."""
    return [{"name": name, "role": role, "booted": name == booted, "primary": name == primary, "version": "1.0.0",
             "state": "good", "size": 32 << 20 if role == "system" else 16 << 20, "device": f"/dev/x{index}"}
            for index, (name, role) in enumerate(LAYOUTS[layout], start=1)]


def engine_target(layout: str, booted: str, primary: str) -> str | None:
    snap = decisions.Snapshot(tuple(decisions.SlotView(name, role) for name, role in LAYOUTS[layout]),
                              booted, primary, tryboot_flag=False, boot_id="boot")
    try:
        return decisions.update_target(snap, State())
    except errors.Busy:
        return None


@pytest.mark.parametrize(("layout", "booted", "primary"), CASES, ids=["-".join(case) for case in CASES])
def test_the_page_shows_the_slot_the_engine_writes(layout: str, booted: str, primary: str) -> None:
    shown = target_slot(reported_slots(layout, booted, primary))
    assert (shown["name"] if shown else None) == engine_target(layout, booted, primary)


def test_the_known_cases() -> None:
    def shown(layout: str, booted: str, primary: str) -> str | None:
        slot = target_slot(reported_slots(layout, booted, primary))
        return str(slot["name"]) if slot else None

    assert shown("ab", "a", "a") == "b"
    assert shown("ab+recovery", "recovery", "a") == "b"
    assert shown("main+recovery", "recovery", "main") == "main"  # recovery is promoted first, then main written
    assert shown("main+recovery", "recovery", "recovery") == "main"
    assert shown("main+recovery", "main", "main") is None
    # Slot b committed while a still runs: the engine refuses until the reboot; the page showed b as the target.
    assert shown("ab", "a", "b") is None


class FakeLink:
    def __init__(self, slots: list[dict[str, Any]]) -> None:
        self.slots = slots

    async def status(self) -> dict[str, Any]:
        return {"properties": {"State": "idle"}, "slots": self.slots}


class NoUploads:
    current = None


def test_the_status_says_why_there_is_no_target() -> None:
    status = asyncio.run(status_json(FakeLink(reported_slots("main+recovery", "main", "main")),  # type: ignore[arg-type]
                                     NoUploads()))  # type: ignore[arg-type]
    assert status["target"] is None
    assert "Reboot into update mode" in status["target_refusal"]
    status = asyncio.run(status_json(FakeLink(reported_slots("main+recovery", "recovery", "main")),  # type: ignore[arg-type]
                                     NoUploads()))  # type: ignore[arg-type]
    assert status["target"] == {"slot": "main", "size": 32 << 20}
    assert status["target_refusal"] == ""
