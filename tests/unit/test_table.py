"""Partition tables via `sfdisk --json`: golden outputs, real images made with sfdisk, and (as root) loop devices."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from abflasher.disk.table import (
    Partition,
    PartitionTable,
    disk_signature,
    parse_sfdisk_json,
    partition_node,
    read_table,
    split_partition_node,
)
from abflasher.errors import DeviceError, InvalidArgument

DATA = Path(__file__).parent / "data" / "sfdisk"
SFDISK = shutil.which("sfdisk") or shutil.which("sfdisk", path="/usr/sbin:/sbin")
BLKID = shutil.which("blkid") or shutil.which("blkid", path="/usr/sbin:/sbin")
needs_sfdisk = pytest.mark.skipif(SFDISK is None, reason="sfdisk (util-linux) is not installed")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root")

# The sfdisk scripts the golden files were captured from (see data/sfdisk/README.md).
AUTOBOOT_LAYOUT = """\
label: dos
label-id: 0x1234abcd
unit: sectors

start=2048, size=16384, type=c, bootable
size=32768, type=c
size=32768, type=c
type=5
size=8192, type=83
size=8192, type=83
type=83
"""
PREFIX_LAYOUT = """\
label: dos
label-id: 0xdeadbeef

start=8192, size=32768, type=c, bootable
size=16384, type=83
size=16384, type=83
type=83
"""
GPT_LAYOUT = """\
label: gpt
label-id: 0C2E1F3A-5B6D-4E7F-8091-A2B3C4D5E6F7

size=8M, type=uefi, name="boot a", uuid=11111111-2222-4333-8444-555555555555, attrs="LegacyBIOSBootable"
size=8M, type=linux, name=rootA, uuid=B3FCFCCE-7BA1-6D42-9A9D-A8C77660C3FB
type=linux, uuid=FFFE4461-2A95-A345-9C60-655E4EC3760D
"""
TEN_PARTITIONS_LAYOUT = """\
label: dos
label-id: 0x0a0b0c0d

size=2M, type=c
size=2M, type=83
size=2M, type=83
type=f
size=2M
size=2M
size=2M
size=2M
size=2M
type=83
"""

# (golden file, layout script, image size in MiB)
GOLDEN_IMAGES = [
    ("autoboot-mbr.json", AUTOBOOT_LAYOUT, 64),
    ("prefix-mbr.json", PREFIX_LAYOUT, 64),
    ("gpt.json", GPT_LAYOUT, 32),
]


def golden(name: str, device: str) -> PartitionTable:
    return parse_sfdisk_json((DATA / name).read_text(), device)


def make_image(directory: Path, layout: str, size_mib: int, name: str = "disk.img") -> Path:
    assert SFDISK is not None
    image = directory / name
    with image.open("wb") as file:
        file.truncate(size_mib * 1024 * 1024)
    subprocess.run([SFDISK, "--quiet", str(image)], input=layout, text=True, check=True, timeout=60)
    return image


# --- the parser on captured output ---------------------------------------------------------------------------------


def test_autoboot_layout_golden() -> None:
    table = golden("autoboot-mbr.json", "disk.img")
    assert (table.label, table.id, table.device, table.sector_size) == ("dos", "0x1234abcd", "disk.img", 512)
    assert table.ptuuid == "1234abcd"
    assert [partition.number for partition in table.partitions] == [1, 2, 3, 4, 5, 6, 7]
    assert [partition.partuuid for partition in table.partitions] == [f"1234abcd-0{n}" for n in range(1, 8)]
    assert [partition.type for partition in table.partitions] == ["c", "c", "c", "5", "83", "83", "83"]
    assert [partition.bootable for partition in table.partitions] == [True] + [False] * 6
    assert [table.is_extended(n) for n in range(1, 8)] == [False, False, False, True, False, False, False]
    assert table.partition(5) == Partition(
        number=5, start=86016, size=8192, type="83", partuuid="1234abcd-05", node=None, bootable=False, name=None
    )
    assert table.offset_bytes(5) == 86016 * 512
    assert table.size_bytes(5) == 8192 * 512
    # The extended partition spans its logical partitions.
    extended = table.partition(4)
    for logical in table.partitions[4:]:
        assert extended.start < logical.start
        assert logical.start + logical.size <= extended.start + extended.size


def test_prefix_layout_golden() -> None:
    table = golden("prefix-mbr.json", "prefix.img")
    assert table.label == "dos"
    assert [partition.partuuid for partition in table.partitions] == [
        "deadbeef-01",
        "deadbeef-02",
        "deadbeef-03",
        "deadbeef-04",
    ]
    assert table.by_partuuid("deadbeef-02").number == 2
    assert table.by_partuuid(" DEADBEEF-03\n").number == 3
    assert table.offset_bytes(1) == 8192 * 512
    assert not any(partition.is_extended for partition in table.partitions)


def test_gpt_golden() -> None:
    table = golden("gpt.json", "gpt.img")
    assert table.label == "gpt"
    assert table.id == "0C2E1F3A-5B6D-4E7F-8091-A2B3C4D5E6F7"  # as sfdisk prints it
    assert table.ptuuid == "0c2e1f3a-5b6d-4e7f-8091-a2b3c4d5e6f7"  # as blkid prints it
    first, second, third = table.partitions
    assert first == Partition(
        number=1,
        start=2048,
        size=16384,
        type="c12a7328-f81f-11d2-ba4b-00a0c93ec93b",
        partuuid="11111111-2222-4333-8444-555555555555",
        node=None,
        bootable=True,
        name="boot a",
    )
    assert second.partuuid == "b3fcfcce-7ba1-6d42-9a9d-a8c77660c3fb"
    assert (second.name, second.bootable) == ("rootA", False)
    assert third.name is None
    assert table.by_partuuid("FFFE4461-2A95-A345-9C60-655E4EC3760D") is third
    assert not table.is_extended(1)


def test_ten_partitions_on_a_loop_device_golden() -> None:
    table = golden("loop-10-partitions-mbr.json", "/dev/loop0")
    assert [partition.number for partition in table.partitions] == list(range(1, 11))
    tenth = table.partition(10)
    assert tenth.partuuid == "0a0b0c0d-0a"
    assert tenth.node == "/dev/loop0p10"
    assert table.by_partuuid("0a0b0c0d-0a") is tenth
    assert table.partition(4).is_extended  # type f
    assert [partition.node for partition in table.partitions] == [partition_node("/dev/loop0", n) for n in range(1, 11)]


def test_missing_partition_names_what_exists() -> None:
    table = golden("prefix-mbr.json", "/dev/mmcblk0")
    with pytest.raises(DeviceError, match=r"/dev/mmcblk0 has no partition 7 \(its partitions: 1, 2, 3, 4\)"):
        table.partition(7)
    with pytest.raises(DeviceError, match="no partition with PARTUUID 'deadbeef-07'"):
        table.by_partuuid("deadbeef-07")
    with pytest.raises(DeviceError):
        table.offset_bytes(7)


def test_empty_table() -> None:
    text = (
        '{"partitiontable": {"label": "dos", "id": "0x02705842", "device": "e.img", "unit": "sectors",'
        ' "sectorsize": 512}}'
    )
    table = parse_sfdisk_json(text, "e.img")
    assert table.partitions == ()
    with pytest.raises(DeviceError, match="its partitions: none"):
        table.partition(1)


def test_small_signature_is_zero_padded() -> None:
    text = (
        '{"partitiontable": {"label": "dos", "id": "0xab", "device": "/dev/sda", "unit": "sectors",'
        ' "partitions": [{"node": "/dev/sda1", "start": 2048, "size": 10, "type": "83"}]}}'
    )
    table = parse_sfdisk_json(text, "/dev/sda")
    assert table.partitions[0].partuuid == "000000ab-01"
    assert table.ptuuid == "000000ab"
    assert table.sector_size == 512  # util-linux before 2.36 did not print it
    assert table.partitions[0].node == "/dev/sda1"


def _table_text(partitions: str = "", **fields: str) -> str:
    header = {"label": '"dos"', "id": '"0x1234abcd"', "device": '"d"', "unit": '"sectors"', "sectorsize": "512"}
    header.update(fields)
    body = ", ".join(f'"{key}": {value}' for key, value in header.items())
    return '{"partitiontable": {' + body + (f', "partitions": [{partitions}]' if partitions else "") + "}}"


GOOD_ENTRY = '{"node": "d1", "start": 2048, "size": 10, "type": "83"}'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not JSON"),
        ("sfdisk: oops", "not JSON"),
        ("[]", "no 'partitiontable'"),
        ('{"partitiontable": 3}', "no 'partitiontable'"),
        (_table_text(id='"1234"'), "MBR disk id '1234'"),
        (_table_text(id='"0x123456789"'), "MBR disk id"),
        (_table_text(label='"gpt"'), "GPT disk id '0x1234abcd' is not a GUID"),
        (_table_text(unit='"cylinders"'), "unit is 'cylinders'"),
        (_table_text(sectorsize="0"), "sector size 0"),
        (_table_text(sectorsize="true"), "'sectorsize' is missing or not a int"),
        (_table_text(partitions="3"), "partition entry 1 is not an object"),
        (_table_text(partitions='{"node": "d", "start": 1, "size": 1, "type": "83"}'), "does not end in a partition"),
        (_table_text(partitions='{"node": "d1", "size": 1, "type": "83"}'), "'start' is missing"),
        (_table_text(partitions='{"node": "d1", "start": 1, "size": true, "type": "83"}'), "'size' is missing"),
        (_table_text(partitions='{"node": "d1", "start": -1, "size": 1, "type": "83"}'), "negative"),
        (_table_text(partitions='{"node": "d1", "start": 1, "size": 1}'), "'type' is missing"),
        (_table_text(partitions=f"{GOOD_ENTRY}, {GOOD_ENTRY}"), "lists partition 1 twice"),
        (
            _table_text(
                label='"gpt"',
                id='"0C2E1F3A-5B6D-4E7F-8091-A2B3C4D5E6F7"',
                partitions='{"node": "d1", "start": 1, "size": 1, "type": "x"}',
            ),
            "'uuid' is missing",
        ),
        (
            _table_text(
                label='"gpt"',
                id='"0C2E1F3A-5B6D-4E7F-8091-A2B3C4D5E6F7"',
                partitions='{"node": "d1", "start": 1, "size": 1, "type": "x", "uuid": "nope"}',
            ),
            "'nope' is not a GUID",
        ),
    ],
)
def test_malformed_output_is_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match="sfdisk output for d") as caught:
        parse_sfdisk_json(text, "d")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_unsupported_label_is_a_device_error() -> None:
    with pytest.raises(DeviceError, match="'sun' partition table; only MBR"):
        parse_sfdisk_json(_table_text(label='"sun"'), "d")


# --- device names --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("disk", "number", "node"),
    [
        ("/dev/mmcblk0", 5, "/dev/mmcblk0p5"),
        ("/dev/nvme0n1", 5, "/dev/nvme0n1p5"),
        ("/dev/loop3", 5, "/dev/loop3p5"),
        ("/dev/sda", 5, "/dev/sda5"),
        ("/dev/sda", 10, "/dev/sda10"),
        ("/dev/vdb", 1, "/dev/vdb1"),
        ("/dev/mmcblk1", 12, "/dev/mmcblk1p12"),
    ],
)
def test_partition_node_and_back(disk: str, number: int, node: str) -> None:
    assert partition_node(disk, number) == node
    assert split_partition_node(node) == (disk, number)


@pytest.mark.parametrize("number", [0, -1])
def test_partition_node_refuses_bad_numbers(number: int) -> None:
    with pytest.raises(InvalidArgument, match=f"partition number {number}"):
        partition_node("/dev/sda", number)


@pytest.mark.parametrize("disk", ["", "/dev/"])
def test_partition_node_refuses_bad_disks(disk: str) -> None:
    with pytest.raises(InvalidArgument, match="not a device path"):
        partition_node(disk, 1)


@pytest.mark.parametrize(
    "node",
    ["/dev/mmcblk0", "/dev/mmcblk1", "/dev/nvme0n1", "/dev/loop3", "/dev/loop10", "/dev/md0", "/dev/mmcblk0boot1"],
)
def test_split_refuses_whole_disks(node: str) -> None:
    with pytest.raises(InvalidArgument, match="whole disk"):
        split_partition_node(node)


@pytest.mark.parametrize("node", ["/dev/sda", "/dev/sda0", "/dev/mmcblk0p0", "", "/dev/", "5"])
def test_split_refuses_non_partitions(node: str) -> None:
    with pytest.raises(InvalidArgument, match="not a partition device name"):
        split_partition_node(node)


disk_names = st.one_of(
    st.from_regex(r"/dev/(sd|vd|hd|xvd)[a-z]{1,2}", fullmatch=True),
    st.from_regex(r"/dev/(mmcblk[0-9]{1,2}|nvme[0-9]n[0-9]{1,2}|loop[0-9]{1,3}|nbd[0-9]{1,2})", fullmatch=True),
)


@settings(max_examples=300, deadline=None)
@given(disk_names, st.integers(min_value=1, max_value=256))
def test_split_reverses_partition_node(disk: str, number: int) -> None:
    node = partition_node(disk, number)
    assert split_partition_node(node) == (disk, number)
    not_a_partition = disk if disk[-1].isdigit() else disk + "0"
    with pytest.raises(InvalidArgument):
        split_partition_node(not_a_partition)


# --- real images ---------------------------------------------------------------------------------------------------


@needs_sfdisk
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("golden_name", "layout", "size_mib"), GOLDEN_IMAGES)
def test_read_table_of_a_real_image_matches_the_golden(
    tmp_path: Path, golden_name: str, layout: str, size_mib: int
) -> None:
    image = make_image(tmp_path, layout, size_mib)
    table = read_table(str(image))
    expected = golden(golden_name, str(image))
    assert table == expected
    assert all(partition.node is None for partition in table.partitions)


@needs_sfdisk
@pytest.mark.timeout(60)
def test_ten_partitions_image_file(tmp_path: Path) -> None:
    image = make_image(tmp_path, TEN_PARTITIONS_LAYOUT, 32)
    table = read_table(str(image))
    assert table.partition(10).partuuid == "0a0b0c0d-0a"
    assert table.partitions == golden("loop-10-partitions-mbr.json", str(image)).partitions


@needs_sfdisk
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("layout", "size_mib"), [(AUTOBOOT_LAYOUT, 64), (PREFIX_LAYOUT, 64)])
def test_disk_signature_matches_the_table(tmp_path: Path, layout: str, size_mib: int) -> None:
    image = make_image(tmp_path, layout, size_mib)
    table = read_table(str(image))
    signature = disk_signature(str(image))
    assert signature == int(table.id, 16)
    assert all(partition.partuuid.startswith(f"{signature:08x}-") for partition in table.partitions)


@needs_sfdisk
@pytest.mark.skipif(BLKID is None, reason="blkid is not installed")
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("layout", "size_mib"), [(AUTOBOOT_LAYOUT, 64), (GPT_LAYOUT, 32)])
def test_ptuuid_matches_blkid(tmp_path: Path, layout: str, size_mib: int) -> None:
    assert BLKID is not None
    image = make_image(tmp_path, layout, size_mib)
    reported = subprocess.run(
        [BLKID, "-p", "-o", "value", "-s", "PTUUID", str(image)], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    assert read_table(str(image)).ptuuid == reported


@needs_sfdisk
@pytest.mark.timeout(60)
def test_read_table_of_an_image_without_a_table(tmp_path: Path) -> None:
    image = tmp_path / "blank.img"
    image.write_bytes(bytes(1024 * 1024))
    with pytest.raises(DeviceError, match=r"blank\.img has no partition table \(neither MBR nor GPT\)"):
        read_table(str(image))


@needs_sfdisk
def test_read_table_of_a_missing_disk(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="does not exist"):
        read_table(str(tmp_path / "nope.img"))


@needs_sfdisk
@pytest.mark.timeout(60)
def test_read_table_of_a_directory(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="sfdisk could not read the partition table of .*Is a directory"):
        read_table(str(tmp_path))


@pytest.mark.parametrize("sfdisk", ["/nonexistent/sfdisk", "no-such-sfdisk-for-ab-flasher"])
def test_missing_sfdisk(tmp_path: Path, sfdisk: str) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    with pytest.raises(DeviceError, match=r"was not found; install util-linux's sfdisk \(Debian package 'fdisk'\)"):
        read_table(str(image), sfdisk=sfdisk)


def _fake_sfdisk(directory: Path, script: str) -> str:
    program = directory / "fake-sfdisk"
    program.write_text("#!/bin/sh\n" + script)
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    return str(program)


@pytest.mark.timeout(60)
def test_garbage_from_sfdisk_is_a_device_error(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    with pytest.raises(DeviceError, match="sfdisk output for .* is not JSON"):
        read_table(str(image), sfdisk=_fake_sfdisk(tmp_path, "echo 'Disk: something'\n"))


@pytest.mark.timeout(60)
def test_sfdisk_failure_message_is_passed_on_in_one_line(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    fake = _fake_sfdisk(tmp_path, "echo 'sfdisk: cannot open it:' >&2\necho 'Permission denied' >&2\nexit 1\n")
    with pytest.raises(DeviceError, match="cannot open it: Permission denied$"):
        read_table(str(image), sfdisk=fake)


@pytest.mark.timeout(60)
def test_read_table_passes_the_disk_after_double_dash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A disk path starting with '-' must not be taken for an option.
    record = tmp_path / "argv"
    fake = _fake_sfdisk(tmp_path, f'printf "%s\\n" "$@" > {record}\ncat {DATA / "prefix-mbr.json"}\n')
    image = tmp_path / "-disk.img"
    image.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    table = read_table("-disk.img", sfdisk=fake)
    assert record.read_text().split("\n")[:3] == ["--json", "--", "-disk.img"]
    assert table.device == "-disk.img"


def test_disk_signature_errors(tmp_path: Path) -> None:
    short = tmp_path / "short.img"
    short.write_bytes(bytes(100))
    with pytest.raises(DeviceError, match="smaller than one 512-byte sector"):
        disk_signature(str(short))
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(4096))
    with pytest.raises(DeviceError, match="boot signature 55 AA"):
        disk_signature(str(blank))
    with pytest.raises(DeviceError, match="cannot read the MBR of"):
        disk_signature(str(tmp_path / "missing.img"))


def test_disk_signature_is_little_endian(tmp_path: Path) -> None:
    sector = bytearray(512)
    sector[440:444] = bytes.fromhex("efbeadde")
    sector[510:512] = b"\x55\xaa"
    image = tmp_path / "mbr.img"
    image.write_bytes(bytes(sector))
    assert disk_signature(str(image)) == 0xDEADBEEF


# --- loop devices, compared with what the kernel and blkid say (root) -----------------------------------------------


@pytest.fixture
def loop_device_factory() -> Iterator[Callable[[Path], str]]:
    """Attaches images to loop devices with their partitions added (partx); detaches every one afterwards."""
    attached: list[str] = []

    def attach(image: Path) -> str:
        device = subprocess.run(
            ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
        attached.append(device)
        # This kernel does not scan partition tables by itself.
        subprocess.run(["partx", "--add", device], check=True, timeout=30)
        return device

    yield attach
    for device in attached:
        subprocess.run(["partx", "--delete", device], check=False, timeout=30)
        subprocess.run(["losetup", "--detach", device], check=False, timeout=30)


@pytest.mark.root
@needs_root
@needs_sfdisk
@pytest.mark.skipif(BLKID is None, reason="blkid is not installed")
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("layout", "size_mib"), [(AUTOBOOT_LAYOUT, 64), (PREFIX_LAYOUT, 64), (GPT_LAYOUT, 32), (TEN_PARTITIONS_LAYOUT, 32)]
)
def test_partuuids_match_blkid_on_loop_partitions(
    tmp_path: Path, loop_device_factory: Callable[[Path], str], layout: str, size_mib: int
) -> None:
    assert BLKID is not None
    device = loop_device_factory(make_image(tmp_path, layout, size_mib))
    table = read_table(device)
    assert table.device == device
    assert table.partitions
    for partition in table.partitions:
        assert partition.node == partition_node(device, partition.number)
        assert split_partition_node(partition.node) == (device, partition.number)
        reported = subprocess.run(
            [BLKID, "-p", "-o", "value", "-s", "PART_ENTRY_UUID", partition.node],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        assert partition.partuuid == reported, partition
    if table.label == "dos":
        assert disk_signature(device) == int(table.id, 16)
