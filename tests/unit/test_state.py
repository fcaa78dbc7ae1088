"""The typed state file (abflasher/state.py): the JSON format of earlier versions loads and saves unchanged."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from abflasher.state import STATE_FILE_MODE, ArmedTrial, InstalledImage, SlotRecord, SlotState, State, StateFile

#: A state.json as the dict-based StateFile of earlier versions wrote it after an install armed a trial of slot b
#: (keys sorted, two-space indent), plus a key a newer version might add.
WRITTEN_BY_EARLIER_VERSIONS = """{
  "device": "1234abcd",
  "format": 1,
  "generation": 7,
  "primary": "a",
  "rollback_boot_id": "0f0e",
  "slots": {
    "a": {
      "installed": {
        "result": "committed"
      },
      "state": "good"
    },
    "b": {
      "installed": {
        "result": "installed",
        "sha256": "ab12",
        "size": 25165824,
        "source": "https://example.com/os-1.1.0.img.gz",
        "time": 1767225600,
        "version": "1.1.0"
      },
      "state": "trial"
    }
  },
  "trial": {
    "armed_boot_id": "5c1d",
    "slot": "b"
  },
  "written_by_a_newer_version": [1, 2]
}
"""


def test_a_state_file_of_earlier_versions_loads_typed_and_saves_byte_identical() -> None:
    state = State.parse(WRITTEN_BY_EARLIER_VERSIONS)
    assert state.primary == "a"
    assert state.generation == 7
    assert state.device == "1234abcd"
    assert state.trial == ArmedTrial(slot="b", armed_boot_id="5c1d")
    assert state.rollback_boot_id == "0f0e"
    assert state.slots["a"] == SlotRecord(SlotState.GOOD, InstalledImage(result="committed"))
    assert state.slots["b"].state is SlotState.TRIAL
    assert state.slots["b"].installed.version == "1.1.0"
    assert state.slots["b"].installed.size == 25165824
    expected = json.dumps(json.loads(WRITTEN_BY_EARLIER_VERSIONS), indent=2, sort_keys=True) + "\n"
    assert state.dump() == expected


def test_a_minimal_or_odd_state_loads_with_defaults() -> None:
    state = State.parse('{"slots": {"a": {"state": "sideways"}, "b": 3}, "trial": {"armed_boot_id": "x"}}')
    assert state.slots["a"].state is SlotState.UNKNOWN
    assert state.slots["b"] == SlotRecord()
    assert state.trial is None
    assert state.primary is None
    assert state.generation == 0
    assert json.loads(State().dump()) == {"format": 1, "generation": 0, "slots": {}}


def test_save_stamps_the_generation_and_device_and_keeps_the_file_private(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    file = StateFile(path)
    file.save(State.parse(WRITTEN_BY_EARLIER_VERSIONS), "feedbeef")
    assert stat.S_IMODE(path.stat().st_mode) == STATE_FILE_MODE
    saved = json.loads(path.read_text())
    assert (saved["generation"], saved["device"]) == (8, "feedbeef")
    assert file.update(lambda s: s, None, "feedbeef").generation == 9


def test_load_keeps_the_newer_copy_of_this_device_only(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"generation": 3, "primary": "a", "device": "d1"}')
    newer = b'{"generation": 5, "primary": "b", "device": "d1"}'
    file = StateFile(path)
    assert file.load(newer, "d1").primary == "b"
    assert file.load(newer, "d2").primary == "a", "a copy from another device (shipped in an image) is ignored"
    assert file.load(newer, None).primary == "a"
    assert file.load(b'{"generation": 2, "primary": "b", "device": "d1"}', "d1").primary == "a"
    assert file.load(b"half-written", "d1").primary == "a"
    assert file.load(b"[1]", "d1").primary == "a"


def test_an_unreadable_state_file_is_kept_aside_and_the_state_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("{not json")
    assert StateFile(path).load() == State()
    assert (tmp_path / "state.json.corrupt").read_text() == "{not json"
    assert StateFile(tmp_path / "absent.json").load() == State()
