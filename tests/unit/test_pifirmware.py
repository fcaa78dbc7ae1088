"""The firmware model itself (tests/pifirmware.py), rule by rule of its docstring, on directory fixtures."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.pifirmware import (
    AUTOBOOT_MAX_BYTES,
    BootDecision,
    DirectoryDisk,
    DiskTable,
    KernelNotFound,
    NoBootablePartition,
    NoBootableSystem,
    PiDevice,
    Stranded,
    TablePartition,
    UnresolvableRoot,
    booted_root_partition,
    decide_boot,
    mbr_partuuid,
    parse_reboot_argument,
    simulate_reboot,
)

pytestmark = pytest.mark.timeout(30)

SIG = "1234abcd"
FIRMWARE = {"start4.elf": "elf", "fixup4.dat": "dat"}


def cmdline(root: int) -> str:
    return f"console=tty1 root=PARTUUID={SIG}-{root:02x} rootwait\n"


def make_partition(base: Path, name: str, files: Mapping[str, str | bytes]) -> Path:
    root = base / name
    root.mkdir()
    for rel, content in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
    return root


def slot_files(prefix: str, root: int, kernel: str = "kernel8.img") -> dict[str, str | bytes]:
    return {f"{prefix}{kernel}": "kernel", f"{prefix}cmdline.txt": cmdline(root), f"{prefix}overlays/README": "x"}


def prefix_disk(tmp_path: Path, *, config: str = "os_prefix=a/\n", tryboot: str | None = None,
                extra: Mapping[str, str | bytes] | None = None) -> dict[int, Path | None]:
    files: dict[str, str | bytes] = {**FIRMWARE, "config.txt": config, **slot_files("a/", 2), **slot_files("b/", 3)}
    if tryboot is not None:
        files["tryboot.txt"] = tryboot
    files.update(extra or {})
    return {1: make_partition(tmp_path, "p1", files), 2: None, 3: None, 4: None}


def autoboot_disk(tmp_path: Path, autoboot: str | bytes, *, boot_b: Mapping[str, str | bytes] | None = None,
                  p1_extra: Mapping[str, str | bytes] | None = None) -> dict[int, Path | None]:
    p1 = make_partition(tmp_path, "p1", {"autoboot.txt": autoboot, **(p1_extra or {})})
    p2 = make_partition(tmp_path, "p2", {**FIRMWARE, "config.txt": "arm_64bit=1\n", **slot_files("", 5)})
    files_b = boot_b if boot_b is not None else {**FIRMWARE, "config.txt": "arm_64bit=1\n", **slot_files("", 6)}
    p3 = make_partition(tmp_path, "p3", files_b)
    return {1: p1, 2: p2, 3: p3, 4: None, 5: None, 6: None, 7: None}


CANONICAL_AUTOBOOT = "[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n"


def root_of(decision: BootDecision, disk: Mapping[int, Path | None]) -> int:
    return booted_root_partition(decision, DirectoryDisk(disk).table())


# ------------------------------------------------------------------------------------------ prefix layout


def test_prefix_layout_boots_p1_with_prefix_a_and_root_p2(tmp_path: Path) -> None:
    disk = prefix_disk(tmp_path)
    decision = decide_boot(disk)
    assert decision == BootDecision(
        partition=1, config_file="config.txt", os_prefix="a/", kernel="a/kernel8.img",
        cmdline_file="a/cmdline.txt", cmdline=f"console=tty1 root=PARTUUID={SIG}-02 rootwait",
        root=f"PARTUUID={SIG}-02", tryboot=False, requested_partition=0, model="pi4", notes=(),
    )
    assert root_of(decision, disk) == 2


def test_tryboot_flag_reads_tryboot_txt(tmp_path: Path) -> None:
    disk = prefix_disk(tmp_path, tryboot="os_prefix=b/\n")
    decision = decide_boot(disk, tryboot=True)
    assert (decision.config_file, decision.kernel, decision.tryboot) == ("tryboot.txt", "b/kernel8.img", True)
    assert root_of(decision, disk) == 3


def test_tryboot_txt_replaces_config_txt_instead_of_adding_to_it(tmp_path: Path) -> None:
    disk = prefix_disk(tmp_path, config="os_prefix=a/\ncmdline=other.txt\n", tryboot="os_prefix=b/\n",
                       extra={"a/other.txt": cmdline(9)})
    decision = decide_boot(disk, tryboot=True)
    assert decision.cmdline_file == "b/cmdline.txt"


def test_missing_tryboot_txt_means_defaults_and_the_default_kernel_is_missing(tmp_path: Path) -> None:
    disk = prefix_disk(tmp_path)
    with pytest.raises(KernelNotFound, match=r"kernel8\.img") as caught:
        decide_boot(disk, tryboot=True)
    assert caught.value.tryboot is True
    assert isinstance(caught.value, NoBootableSystem)


def test_missing_config_txt_boots_defaults(tmp_path: Path) -> None:
    p1 = make_partition(tmp_path, "p1", {**FIRMWARE, **slot_files("", 2)})
    decision = decide_boot({1: p1, 2: None})
    assert (decision.kernel, decision.os_prefix, decision.root) == ("kernel8.img", "", f"PARTUUID={SIG}-02")
    assert any("config.txt missing" in note for note in decision.notes)


# ------------------------------------------------------------------------------------------ os_prefix


def test_os_prefix_is_ignored_when_prefix_plus_kernel_is_missing(tmp_path: Path) -> None:
    disk = prefix_disk(tmp_path, config="os_prefix=c/\n", extra=slot_files("", 4))
    decision = decide_boot(disk)
    assert (decision.os_prefix, decision.kernel, decision.cmdline_file) == ("", "kernel8.img", "cmdline.txt")
    assert root_of(decision, disk) == 4
    assert any("dropped" in note for note in decision.notes)


def test_os_prefix_can_be_a_file_name_prefix(tmp_path: Path) -> None:
    disk = prefix_disk(tmp_path, config="os_prefix=test-\n",
                       extra={"test-kernel8.img": "k", "test-cmdline.txt": cmdline(3)})
    decision = decide_boot(disk)
    assert (decision.kernel, decision.cmdline_file) == ("test-kernel8.img", "test-cmdline.txt")


def test_leading_slash_on_cmdline_bypasses_the_prefix(tmp_path: Path) -> None:
    disk = prefix_disk(tmp_path, config="os_prefix=a/\ncmdline=/cmdline-top.txt\n",
                       extra={"cmdline-top.txt": cmdline(4)})
    decision = decide_boot(disk)
    assert (decision.kernel, decision.cmdline_file, decision.os_prefix) == ("a/kernel8.img", "cmdline-top.txt", "a/")
    assert root_of(decision, disk) == 4


def test_leading_slash_on_kernel_bypasses_the_prefix_which_still_applies_to_cmdline(tmp_path: Path) -> None:
    disk = prefix_disk(tmp_path, config="os_prefix=b/\nkernel=/vmlinuz\n", extra={"vmlinuz": "k"})
    decision = decide_boot(disk)
    assert (decision.kernel, decision.cmdline_file) == ("vmlinuz", "b/cmdline.txt")


def test_cmdline_option_names_the_file_under_the_prefix(tmp_path: Path) -> None:
    disk = prefix_disk(tmp_path, config="os_prefix=a/\ncmdline=cmdline-alt.txt\n",
                       extra={"a/cmdline-alt.txt": cmdline(4)})
    decision = decide_boot(disk)
    assert decision.cmdline_file == "a/cmdline-alt.txt"
    assert root_of(decision, disk) == 4


def test_kernel_option_wins_over_the_default(tmp_path: Path) -> None:
    disk = prefix_disk(tmp_path, config="os_prefix=a/\nkernel=vmlinuz-6.6\n", extra={"a/vmlinuz-6.6": "k"})
    assert decide_boot(disk).kernel == "a/vmlinuz-6.6"


def test_missing_kernel_named_by_kernel_option_is_a_hang(tmp_path: Path) -> None:
    disk = prefix_disk(tmp_path, config="kernel=nothere.img\n")
    with pytest.raises(KernelNotFound, match=r"nothere\.img"):
        decide_boot(disk)


@pytest.mark.parametrize(
    ("model", "config", "files", "expected"),
    [
        ("pi4", "", ["kernel8.img", "kernel7l.img"], "kernel8.img"),
        ("pi4", "arm_64bit=0\n", ["kernel8.img", "kernel7l.img"], "kernel7l.img"),
        ("pi3", "arm_64bit=0\n", ["kernel7.img"], "kernel7.img"),
        ("pi5", "", ["kernel8.img", "kernel_2712.img"], "kernel_2712.img"),
        ("pi5", "", ["kernel8.img"], "kernel8.img"),
    ],
)
def test_default_kernel_per_model(tmp_path: Path, model: str, config: str, files: list[str], expected: str) -> None:
    p1 = make_partition(tmp_path, "p1", {**FIRMWARE, "config.txt": config, "cmdline.txt": cmdline(2),
                                         **dict.fromkeys(files, "k")})
    assert decide_boot({1: p1, 2: None}, model=model).kernel == expected


def test_cmdline_is_its_first_line_and_the_last_root_wins(tmp_path: Path) -> None:
    disk = prefix_disk(tmp_path, config="", extra={
        "kernel8.img": "k", "cmdline.txt": f"root=/dev/mmcblk0p2 quiet root=PARTUUID={SIG}-03\nroot=ignored\n"})
    decision = decide_boot(disk)
    assert decision.cmdline == f"root=/dev/mmcblk0p2 quiet root=PARTUUID={SIG}-03"
    assert decision.root == f"PARTUUID={SIG}-03"


def test_missing_cmdline_gives_empty_cmdline_and_no_root(tmp_path: Path) -> None:
    p1 = make_partition(tmp_path, "p1", {**FIRMWARE, "kernel8.img": "k"})
    decision = decide_boot({1: p1})
    assert (decision.cmdline, decision.root) == ("", None)
    with pytest.raises(UnresolvableRoot, match="no root="):
        root_of(decision, {1: p1})


def test_file_names_are_case_insensitive_as_on_fat(tmp_path: Path) -> None:
    p1 = make_partition(tmp_path, "p1", {"START4.ELF": "e", "Config.TXT": "os_prefix=a/\n", "A/KERNEL8.IMG": "k",
                                         "A/CmdLine.txt": cmdline(2)})
    decision = decide_boot({1: p1, 2: None})
    assert (decision.kernel, decision.root) == ("a/kernel8.img", f"PARTUUID={SIG}-02")


# ------------------------------------------------------------------------------------------ config filters


def test_config_later_values_win(tmp_path: Path) -> None:
    disk = prefix_disk(tmp_path, config="os_prefix=b/\nos_prefix=a/\n")
    assert decide_boot(disk).os_prefix == "a/"


def test_config_tryboot_filter(tmp_path: Path) -> None:
    config = "os_prefix=a/\n[tryboot]\nos_prefix=b/\n[all]\narm_64bit=1\n"
    p2 = make_partition(tmp_path, "p2", {**FIRMWARE, "config.txt": config, **slot_files("a/", 5),
                                         **slot_files("b/", 6)})
    p1 = make_partition(tmp_path, "p1", {"autoboot.txt": "tryboot_a_b=1\nboot_partition=2\n"})
    disk: dict[int, Path | None] = {1: p1, 2: p2, 5: None, 6: None}
    assert decide_boot(disk).kernel == "a/kernel8.img"
    # tryboot_a_b: config.txt is read in tryboot mode, and its [tryboot] section is true.
    decision = decide_boot(disk, tryboot=True)
    assert (decision.config_file, decision.kernel) == ("config.txt", "b/kernel8.img")


def test_config_all_resets_filters_and_none_is_never_true(tmp_path: Path) -> None:
    config = "os_prefix=a/\n[none]\nos_prefix=b/\n[pi4]\nos_prefix=b/\n[all]\ncmdline=alt.txt\n"
    disk = prefix_disk(tmp_path, config=config, extra={"a/alt.txt": cmdline(4)})
    decision = decide_boot(disk, model="pi4")
    # [pi4] after [none] is still false (filters of different kinds must all hold); [all] reopens.
    assert (decision.os_prefix, decision.cmdline_file) == ("a/", "a/alt.txt")


def test_config_none_blocks_tryboot_section_in_config_txt(tmp_path: Path) -> None:
    config = "os_prefix=a/\n[none]\n[tryboot]\nos_prefix=b/\n"
    p2 = make_partition(tmp_path, "p2", {**FIRMWARE, "config.txt": config, **slot_files("a/", 5),
                                         **slot_files("b/", 6)})
    p1 = make_partition(tmp_path, "p1", {"autoboot.txt": "tryboot_a_b=1\nboot_partition=2\n"})
    assert decide_boot({1: p1, 2: p2}, tryboot=True).os_prefix == "a/"


@pytest.mark.parametrize(
    ("model", "expected"),
    [("pi4", "a/"), ("pi400", "a/"), ("cm4", "c/"), ("pi5", "b/"), ("cm5", "b/"), ("pi3", "")],
)
def test_config_model_filters(tmp_path: Path, model: str, expected: str) -> None:
    config = "[pi4]\nos_prefix=a/\n[cm4]\nos_prefix=c/\n[pi5]\nos_prefix=b/\n[all]\n"
    files: dict[str, str | bytes] = {**FIRMWARE, "config.txt": config, "kernel8.img": "k", "kernel_2712.img": "k",
                                     "cmdline.txt": cmdline(2)}
    for prefix in ("a/", "b/", "c/"):
        files.update(slot_files(prefix, 2, "kernel8.img"))
        files[f"{prefix}kernel_2712.img"] = "k"
    p1 = make_partition(tmp_path, "p1", files)
    assert decide_boot({1: p1, 2: None}, model=model).os_prefix == expected


def test_config_filters_of_different_kinds_must_all_hold(tmp_path: Path) -> None:
    config = "os_prefix=a/\n[pi4]\n[tryboot]\nos_prefix=b/\n"
    disk = prefix_disk(tmp_path, config=config, tryboot=config)
    assert decide_boot(disk, tryboot=True, model="pi4").os_prefix == "b/"
    assert decide_boot(disk, tryboot=True, model="pi5").os_prefix == "a/"


def test_config_boot_partition_filter(tmp_path: Path) -> None:
    config = "[boot_partition=2]\nkernel=k2.img\n[boot_partition=3]\nkernel=k3.img\n[all]\n"
    files: dict[str, str | bytes] = {**FIRMWARE, "config.txt": config, "k2.img": "k", "k3.img": "k",
                                     "cmdline.txt": cmdline(5)}
    p1 = make_partition(tmp_path, "p1", {"autoboot.txt": "boot_partition=3\n"})
    p2 = make_partition(tmp_path, "p2", files)
    p3 = make_partition(tmp_path, "p3", files)
    decision = decide_boot({1: p1, 2: p2, 3: p3})
    assert (decision.partition, decision.kernel) == (3, "k3.img")


def test_config_unknown_filters_never_match(tmp_path: Path) -> None:
    disk = prefix_disk(tmp_path, config="os_prefix=a/\n[EDID=VSC-TD2220]\nos_prefix=b/\n[gpio4=1]\nos_prefix=b/\n")
    assert decide_boot(disk).os_prefix == "a/"


def test_config_include(tmp_path: Path) -> None:
    disk = prefix_disk(tmp_path, config="os_prefix=a/\ninclude slot.txt\n", extra={"slot.txt": "os_prefix=b/\n"})
    assert decide_boot(disk).os_prefix == "b/"


def test_config_comment_lines_are_ignored(tmp_path: Path) -> None:
    disk = prefix_disk(tmp_path, config="# os_prefix=b/\n   # os_prefix=b/\nos_prefix=a/\n")
    assert decide_boot(disk).os_prefix == "a/"


# ------------------------------------------------------------------------------------------ autoboot.txt


def test_autoboot_without_flag_boots_primary(tmp_path: Path) -> None:
    disk = autoboot_disk(tmp_path, CANONICAL_AUTOBOOT)
    decision = decide_boot(disk)
    assert (decision.partition, decision.config_file, decision.requested_partition) == (2, "config.txt", 2)
    assert root_of(decision, disk) == 5


def test_autoboot_with_flag_boots_trial_partition_and_its_config_txt(tmp_path: Path) -> None:
    trial_files = {**FIRMWARE, "config.txt": "arm_64bit=1\n", "tryboot.txt": "kernel=nothere.img\n",
                   **slot_files("", 6)}
    disk = autoboot_disk(tmp_path, CANONICAL_AUTOBOOT, boot_b=trial_files)
    decision = decide_boot(disk, tryboot=True)
    assert (decision.partition, decision.config_file, decision.kernel) == (3, "config.txt", "kernel8.img")
    assert root_of(decision, disk) == 6


def test_autoboot_without_tryboot_a_b_reads_tryboot_txt(tmp_path: Path) -> None:
    trial_files = {**FIRMWARE, "tryboot.txt": "kernel=trial.img\n", "trial.img": "k", **slot_files("", 6)}
    disk = autoboot_disk(tmp_path, "boot_partition=2\n[tryboot]\nboot_partition=3\n", boot_b=trial_files)
    decision = decide_boot(disk, tryboot=True)
    assert (decision.partition, decision.config_file, decision.kernel) == (3, "tryboot.txt", "trial.img")


def test_autoboot_tryboot_a_b_later_value_wins(tmp_path: Path) -> None:
    trial_files = {**FIRMWARE, "tryboot.txt": "kernel=trial.img\n", "trial.img": "k", **slot_files("", 6)}
    disk = autoboot_disk(tmp_path, "tryboot_a_b=1\ntryboot_a_b=0\n[tryboot]\nboot_partition=3\n", boot_b=trial_files)
    assert decide_boot(disk, tryboot=True).config_file == "tryboot.txt"


def test_autoboot_last_value_wins(tmp_path: Path) -> None:
    disk = autoboot_disk(tmp_path, "[all]\nboot_partition=2\nboot_partition=3\n")
    assert decide_boot(disk).partition == 3


def test_autoboot_none_section_is_never_true(tmp_path: Path) -> None:
    disk = autoboot_disk(tmp_path, "[all]\nboot_partition=2\n[none]\nboot_partition=3\n[tryboot]\nboot_partition=3\n")
    assert decide_boot(disk).partition == 2
    # [tryboot] after [none] does not reopen it: only [all] does.
    assert decide_boot(disk, tryboot=True).partition == 2


def test_autoboot_all_after_none_applies_again(tmp_path: Path) -> None:
    disk = autoboot_disk(tmp_path, "[none]\nboot_partition=2\n[all]\nboot_partition=3\n")
    assert decide_boot(disk).partition == 3


def test_autoboot_model_sections_are_not_supported(tmp_path: Path) -> None:
    disk = autoboot_disk(tmp_path, "boot_partition=2\n[pi4]\nboot_partition=3\n")
    assert decide_boot(disk, model="pi4").partition == 2


def test_autoboot_at_the_512_byte_limit_is_read(tmp_path: Path) -> None:
    text = CANONICAL_AUTOBOOT.replace("boot_partition=2", "boot_partition=3", 1)
    padded = ("#" * (AUTOBOOT_MAX_BYTES - len(text) - 1) + "\n" + text).encode()
    assert len(padded) == AUTOBOOT_MAX_BYTES
    assert decide_boot(autoboot_disk(tmp_path, padded)).partition == 3


def test_autoboot_over_512_bytes_is_ignored(tmp_path: Path) -> None:
    text = CANONICAL_AUTOBOOT.replace("boot_partition=2", "boot_partition=3", 1)
    padded = ("#" * (AUTOBOOT_MAX_BYTES - len(text)) + "\n" + text).encode()
    assert len(padded) == AUTOBOOT_MAX_BYTES + 1
    decision = decide_boot(autoboot_disk(tmp_path, padded))
    # Ignored: partition 0, so the first bootable one (p1 holds only autoboot.txt).
    assert (decision.partition, decision.requested_partition) == (2, 0)
    assert any("512" in note for note in decision.notes)


def test_autoboot_is_read_only_from_partition_1(tmp_path: Path) -> None:
    p1 = make_partition(tmp_path, "p1", {**FIRMWARE, **slot_files("", 2)})
    p2 = make_partition(tmp_path, "p2", {**FIRMWARE, "autoboot.txt": "boot_partition=3\n", **slot_files("", 3)})
    assert decide_boot({1: p1, 2: p2, 3: None}).partition == 1


def test_autoboot_unparsable_number_is_ignored(tmp_path: Path) -> None:
    disk = autoboot_disk(tmp_path, "boot_partition=3\nboot_partition=two\n")
    assert decide_boot(disk).partition == 3


# ------------------------------------------------------------------------------------------ partition choice


def test_partition_0_picks_first_bootable_fat_partition_in_table_order(tmp_path: Path) -> None:
    not_bootable = make_partition(tmp_path, "p2", {"config.txt": "", "kernel8.img": "k"})
    bootable = make_partition(tmp_path, "p3", {**FIRMWARE, **slot_files("", 5)})
    also_bootable = make_partition(tmp_path, "p4", {**FIRMWARE, **slot_files("", 6)})
    disk: dict[int, Path | None] = {1: None, 2: not_bootable, 3: bootable, 4: also_bootable, 5: None}
    decision = decide_boot(disk)
    assert decision.partition == 3


def test_any_start_elf_makes_a_partition_bootable(tmp_path: Path) -> None:
    p1 = make_partition(tmp_path, "p1", {"start.elf": "e", **slot_files("", 2)})
    assert decide_boot({1: p1}).partition == 1


def test_a_folder_named_start4_elf_does_not_count(tmp_path: Path) -> None:
    p1 = make_partition(tmp_path, "p1", {"start4.elf/x": "e", **slot_files("", 2)})
    with pytest.raises(NoBootablePartition):
        decide_boot({1: p1})


def test_pi5_boots_a_partition_with_config_txt_and_no_start_elf(tmp_path: Path) -> None:
    p1 = make_partition(tmp_path, "p1", {"config.txt": "", **slot_files("", 2), "kernel_2712.img": "k"})
    assert decide_boot({1: p1, 2: None}, model="pi5").partition == 1
    with pytest.raises(NoBootablePartition, match="start"):
        decide_boot({1: p1, 2: None}, model="pi4")


def test_requested_partition_not_bootable_falls_back_to_partition_1(tmp_path: Path) -> None:
    p1 = make_partition(tmp_path, "p1", {**FIRMWARE, "autoboot.txt": "boot_partition=3\n", **slot_files("", 2)})
    p3 = make_partition(tmp_path, "p3", {"config.txt": ""})
    decision = decide_boot({1: p1, 2: None, 3: p3})
    assert (decision.partition, decision.requested_partition) == (1, 3)
    assert "fell back to partition 1" in decision.notes


def test_requested_partition_that_does_not_exist_falls_back_to_partition_1(tmp_path: Path) -> None:
    p1 = make_partition(tmp_path, "p1", {**FIRMWARE, **slot_files("", 2)})
    assert decide_boot({1: p1, 2: None}, reboot_arg=9).partition == 1


def test_requested_not_bootable_and_p1_not_bootable_is_a_brick(tmp_path: Path) -> None:
    disk = autoboot_disk(tmp_path, CANONICAL_AUTOBOOT, boot_b={})  # the trial boot partition is empty
    with pytest.raises(NoBootablePartition, match="requested partition 3"):
        decide_boot(disk, tryboot=True)
    # Newer firmware walks on to the next bootable partition.
    decision = decide_boot(disk, tryboot=True, fallback_scan=True)
    assert decision.partition == 2


def test_nothing_bootable_raises_no_bootable_system(tmp_path: Path) -> None:
    p1 = make_partition(tmp_path, "p1", {"config.txt": "", "kernel8.img": "k"})
    with pytest.raises(NoBootableSystem) as caught:
        decide_boot({1: p1, 2: None})
    assert caught.value.tryboot is False


def test_reboot_argument_overrides_autoboot(tmp_path: Path) -> None:
    disk = autoboot_disk(tmp_path, CANONICAL_AUTOBOOT)
    assert decide_boot(disk, reboot_arg=3).partition == 3
    # `reboot 0` gives no partition: autoboot.txt decides.
    assert decide_boot(disk, reboot_arg=0).partition == 2
    assert decide_boot(disk, reboot_arg=0, tryboot=True).partition == 3


def test_unknown_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown Pi model"):
        decide_boot(prefix_disk(tmp_path), model="pi9")


# ------------------------------------------------------------------------------------------ PARTUUIDs


def test_partuuid_number_is_two_hex_digits() -> None:
    assert mbr_partuuid(0x1234ABCD, 10) == "1234abcd-0a"
    assert mbr_partuuid(0x00000001, 2) == "00000001-02"


def test_booted_root_partition_resolves_hex_partuuid(tmp_path: Path) -> None:
    p1 = make_partition(tmp_path, "p1", {**FIRMWARE, "kernel8.img": "k", "cmdline.txt": cmdline(10)})
    disk: dict[int, Path | None] = {1: p1, **{number: None for number in range(2, 11)}}
    decision = decide_boot(disk)
    assert decision.root == "PARTUUID=1234abcd-0a"
    assert root_of(decision, disk) == 10


def test_booted_root_partition_refuses_other_disk_signature() -> None:
    decision = BootDecision(1, "config.txt", "", "kernel8.img", "cmdline.txt", "root=PARTUUID=deadbeef-02",
                            "PARTUUID=deadbeef-02", False)
    table = DiskTable(0x1234ABCD, (TablePartition(1, 0x0C), TablePartition(2, 0x83)))
    with pytest.raises(UnresolvableRoot, match="deadbeef-02"):
        booted_root_partition(decision, table)


def test_booted_root_partition_refuses_missing_partition() -> None:
    decision = BootDecision(1, "config.txt", "", "kernel8.img", "cmdline.txt", "", "PARTUUID=1234abcd-03", False)
    table = DiskTable(0x1234ABCD, (TablePartition(1, 0x0C), TablePartition(2, 0x83)))
    with pytest.raises(UnresolvableRoot):
        booted_root_partition(decision, table)


def test_booted_root_partition_accepts_device_names() -> None:
    decision = BootDecision(1, "config.txt", "", "kernel8.img", "cmdline.txt", "", "/dev/mmcblk0p2", False)
    table = DiskTable(0x1234ABCD, (TablePartition(1, 0x0C), TablePartition(2, 0x83)))
    assert booted_root_partition(decision, table) == 2


# ------------------------------------------------------------------------------------------ reboots


@pytest.mark.parametrize(
    ("argument", "expected"),
    [("0 tryboot", (0, True)), ("2", (2, False)), ("", (0, False)), ("tryboot", (0, True)), ("3 tryboot", (3, True))],
)
def test_parse_reboot_argument(argument: str, expected: tuple[int, bool]) -> None:
    assert parse_reboot_argument(argument) == expected


def test_parse_reboot_argument_refuses_halt_partition() -> None:
    with pytest.raises(ValueError, match="out of range"):
        parse_reboot_argument("63")


def test_simulate_reboot_is_decide_boot(tmp_path: Path) -> None:
    disk = autoboot_disk(tmp_path, CANONICAL_AUTOBOOT)
    assert simulate_reboot(disk, tryboot_flag=True) == decide_boot(disk, tryboot=True)


def test_device_tryboot_flag_lasts_one_boot(tmp_path: Path) -> None:
    device = PiDevice(autoboot_disk(tmp_path, CANONICAL_AUTOBOOT))
    assert device.power_cycle().partition == 2
    trial = device.reboot_with_argument("0 tryboot")
    assert (trial.partition, trial.tryboot, device.root_partition()) == (3, True, 6)
    # A hang in the trial ends in a watchdog reset, which boots the primary again.
    assert device.watchdog_reset().partition == 2
    assert device.reboot().partition == 2
    assert [d.partition for d in device.history] == [2, 3, 2, 2]


def test_device_flag_is_consumed_even_when_the_trial_boot_fails(tmp_path: Path) -> None:
    device = PiDevice(prefix_disk(tmp_path, tryboot="os_prefix=a/\nkernel=missing.img\n"))
    with pytest.raises(KernelNotFound):
        device.reboot(tryboot=True)
    decision = device.power_cycle()
    assert (decision.tryboot, decision.kernel) == (False, "a/kernel8.img")
    assert device.root_partition() == 2


def test_device_reboot_partition_lasts_one_boot(tmp_path: Path) -> None:
    device = PiDevice(autoboot_disk(tmp_path, CANONICAL_AUTOBOOT))
    assert device.reboot(partition=3).partition == 3
    assert device.reboot().partition == 2


# ------------------------------------------------------------------------------------------ the watchdog (rule 6)

ARMED = "dtparam=watchdog=on\nkernel_watchdog_timeout=60\n"


def test_a_trial_armed_in_tryboot_txt_is_reset_into_the_committed_slot(tmp_path: Path) -> None:
    disk = prefix_disk(tmp_path, tryboot="os_prefix=b/\n[all]\n" + ARMED)
    pi = PiDevice(disk)
    assert not pi.boot().watchdog_armed, "the committed configuration arms nothing"
    trial = pi.reboot(tryboot=True)
    assert (trial.os_prefix, trial.watchdog_timeout) == ("b/", 60)
    assert trial.kernel_cmdline.endswith(" watchdog.open_timeout=60")
    back = pi.hang()
    assert (back.tryboot, back.os_prefix, back.watchdog_armed) == (False, "a/", False)


def test_a_hang_without_a_watchdog_strands_the_device(tmp_path: Path) -> None:
    pi = PiDevice(prefix_disk(tmp_path, tryboot="os_prefix=b/\n"))
    pi.reboot(tryboot=True)
    with pytest.raises(Stranded):
        pi.hang()


@pytest.mark.parametrize(("config", "timeout"), [
    ("kernel_watchdog_timeout=60\n", 0),  # newer firmware also needs dtparam=watchdog=on: the model asks for it
    ("dtparam=watchdog=on\n", 0),
    ("dtparam=audio=on,watchdog\nkernel_watchdog_timeout=30\n", 30),
    (ARMED + "dtparam=watchdog=off\n", 0),
    ("dtparam=watchdog=on\nkernel_watchdog_timeout=0\n", 0),
    ("dtparam=watchdog=on\nkernel_watchdog_timeout=soon\n", 0),
    ("[pi5]\n" + ARMED, 0),  # a filter that is false on this board
])
def test_which_lines_arm_the_watchdog(tmp_path: Path, config: str, timeout: int) -> None:
    disk = prefix_disk(tmp_path, config="os_prefix=a/\n" + config)
    assert decide_boot(disk).watchdog_timeout == timeout


def test_a_tryboot_section_arms_only_the_trial_boot(tmp_path: Path) -> None:
    # The autoboot layout: the new slot's own config.txt, read on both kinds of boot.
    slot_config = "arm_64bit=1\n[tryboot]\n" + ARMED + "[all]\n"
    disk = autoboot_disk(tmp_path, CANONICAL_AUTOBOOT,
                         boot_b={**FIRMWARE, "config.txt": slot_config, **slot_files("", 6)})
    trial = decide_boot(disk, tryboot=True)
    assert (trial.partition, trial.watchdog_timeout) == (3, 60)
    committed_b = decide_boot(disk, reboot_arg=3)
    assert (committed_b.partition, committed_b.watchdog_armed) == (3, False)
