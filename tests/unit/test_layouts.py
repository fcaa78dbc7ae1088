"""Which layout a partition table has (abflasher/disk/slots.py: detect_layout), for every layout of docs/layouts.md."""

from __future__ import annotations

import pytest

from abflasher import errors
from abflasher.disk.slots import SHAPES, detect_layout
from abflasher.disk.table import Partition, PartitionTable

FAT, LINUX, EXTENDED = "c", "83", "5"


def table(types: dict[int, str]) -> PartitionTable:
    partitions = tuple(Partition(number=n, start=2048 * n, size=2048, type=t, partuuid=f"1234abcd-{n:02x}",
                                 node=f"/dev/mmcblk0p{n}", bootable=n == 1, name=None) for n, t in types.items())
    return PartitionTable(label="dos", id="0x1234abcd", device="/dev/mmcblk0", sector_size=512, partitions=partitions)


TABLES = {
    ("prefix", "ab"): {1: FAT, 2: LINUX, 3: LINUX, 4: LINUX},
    ("prefix", "ab+recovery"): {1: FAT, 2: LINUX, 3: LINUX, 4: EXTENDED, 5: LINUX, 6: LINUX},
    ("prefix", "main+recovery"): {1: FAT, 2: LINUX, 3: EXTENDED, 5: LINUX, 6: LINUX},
    ("autoboot", "ab"): {1: FAT, 2: FAT, 3: FAT, 4: EXTENDED, 5: LINUX, 6: LINUX, 7: LINUX},
    ("autoboot", "ab+recovery"): {1: FAT, 2: FAT, 3: FAT, 4: EXTENDED, 5: LINUX, 6: LINUX, 7: LINUX, 8: FAT,
                                  9: LINUX},
    ("autoboot", "main+recovery"): {1: FAT, 2: FAT, 3: LINUX, 4: EXTENDED, 5: FAT, 6: LINUX, 7: LINUX},
}


@pytest.mark.parametrize("kind_variant", list(TABLES), ids=[f"{k}-{v}" for k, v in TABLES])
def test_every_layout_is_told_by_its_table(kind_variant: tuple[str, str]) -> None:
    kind, variant = kind_variant
    layout = detect_layout(table(TABLES[kind_variant]), "/dev/mmcblk0")
    assert (layout.kind, layout.variant) == (kind, variant)
    shape = next(s for s in SHAPES if (s.kind, s.variant) == kind_variant)
    assert [(s.name, s.role, s.root_partition, s.boot_partition) for s in layout.slots] == list(shape.slots)
    assert layout.data_partition == shape.data
    recovery = layout.recovery
    assert (recovery is not None) == (variant != "ab")
    if kind == "prefix":
        assert {s.boot_prefix for s in layout.slots} == {f"{s.name[0]}/" for s in layout.slots}
        assert len({len(s.boot_prefix or "") for s in layout.slots}) == 1, "one length: a one-byte switch"
    else:
        assert all(s.boot_partition is not None and s.boot_partition < 10 for s in layout.slots), "one digit"


def test_the_other_system_slot() -> None:
    main_recovery = detect_layout(table(TABLES[("prefix", "main+recovery")]), "/dev/mmcblk0")
    assert main_recovery.other("main") is None
    other = main_recovery.other("recovery")
    assert other is not None
    assert other.name == "main"
    ab_recovery = detect_layout(table(TABLES[("autoboot", "ab+recovery")]), "/dev/mmcblk0")
    assert [ab_recovery.other(n).name for n in ("a", "b")] == ["b", "a"]  # type: ignore[union-attr]


def test_forcing_a_scheme_still_checks_the_table() -> None:
    with pytest.raises(errors.Incompatible, match="does not have the autoboot layout"):
        detect_layout(table(TABLES[("prefix", "main+recovery")]), "/dev/mmcblk0", "autoboot")
    with pytest.raises(errors.Incompatible, match="neither A/B layout"):
        detect_layout(table({1: FAT, 2: LINUX}), "/dev/mmcblk0")
