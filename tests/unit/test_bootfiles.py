"""The pure boot-file editors (abflasher/boot/bootfiles.py): golden before/after files, re-parsing of every edit,
the cases real files throw at them, and agreement with the firmware model (tests/pifirmware.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from abflasher import errors
from abflasher.boot.bootfiles import (
    AutobootConfig,
    BootFileError,
    cmdline_root,
    conditional_os_prefixes,
    config_os_prefix,
    fstab_mounts,
    parse_autoboot,
    render_autoboot,
    set_cmdline_root,
    set_config_os_prefix,
    set_fstab_mounts,
)
from tests import pifirmware
from tests.support.pidisk import autoboot_text, cmdline_text, fstab_text

DATA = Path(__file__).parent / "data" / "boot"
MODELS = ("pi3", "pi4", "cm4", "pi400", "pi5", "cm5")

pytestmark = pytest.mark.timeout(60)


def golden(name: str) -> str:
    # newline="" keeps the files' bytes exactly as they are (the editors must not touch line endings).
    with (DATA / name).open(newline="") as fh:
        return fh.read()


def firmware_os_prefix(text: str, model: str, *, tryboot: bool = False) -> str | None:
    """The os_prefix the firmware model sees in a config.txt on ``model``."""
    lines = pifirmware.parse_config(text, pifirmware.FilterContext(tryboot=tryboot, model=model, boot_partition=2))
    return pifirmware.last_value(lines, "os_prefix")


def test_boot_file_error_is_an_invalid_argument() -> None:
    assert issubclass(BootFileError, errors.InvalidArgument)
    assert BootFileError("x").dbus_name == "org.abflasher.Updater1.Error.InvalidArgument"


# --------------------------------------------------------------------------------------------------- config.txt


@pytest.mark.parametrize(
    ("before", "prefix", "after"),
    [
        ("config-rpios.txt", "b/", "config-rpios.os_prefix-b.txt"),
        ("config-stock.txt", "a/", "config-stock.os_prefix-a.txt"),
        ("config-ends-conditional.txt", "b/", "config-ends-conditional.os_prefix-b.txt"),
    ],
)
def test_set_config_os_prefix_golden(before: str, prefix: str, after: str) -> None:
    edited = set_config_os_prefix(golden(before), prefix)
    assert edited == golden(after)
    assert config_os_prefix(edited) == prefix
    for model in MODELS:
        assert firmware_os_prefix(edited, model) == prefix, model
    # Editing again to the same value changes nothing.
    assert set_config_os_prefix(edited, prefix) == edited


def test_config_os_prefix_of_golden_files() -> None:
    assert config_os_prefix(golden("config-rpios.txt")) == "a/"
    assert config_os_prefix(golden("config-stock.txt")) is None
    # Only a [pi4] section sets it there: that is not the unconditional value.
    assert config_os_prefix(golden("config-ends-conditional.txt")) is None
    assert conditional_os_prefixes(golden("config-ends-conditional.txt")) == [("[pi4]", "pi4/")]
    assert conditional_os_prefixes(golden("config-rpios.txt")) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("os_prefix=a/\nos_prefix=b/\n", "b/"),
        ("os_prefix=a/\n[pi4]\nos_prefix=x/\n", "a/"),
        ("[cm4]\nos_prefix=x/\n[all]\nos_prefix=b/\n", "b/"),
        ("[none]\nos_prefix=x/\n[all]\n", None),
        ("[tryboot]\nos_prefix=x/\n", None),
        ("#os_prefix=x/\n", None),
        ("  os_prefix = a/  \r\n", "a/"),
        ("os_prefix=\n", ""),
        ("[ALL]\nos_prefix=c/", "c/"),
        ("", None),
    ],
)
def test_config_os_prefix_cases(text: str, expected: str | None) -> None:
    assert config_os_prefix(text) == expected


def test_set_config_os_prefix_rewrites_only_the_effective_line() -> None:
    text = "os_prefix=a/\narm_64bit=1\nos_prefix=a/\n[pi4]\nos_prefix=x/\n[all]\ndtoverlay=foo\n"
    assert set_config_os_prefix(text, "b/") == (
        "os_prefix=a/\narm_64bit=1\nos_prefix=b/\n[pi4]\nos_prefix=x/\n[all]\ndtoverlay=foo\n")


def test_set_config_os_prefix_after_a_conditional_section_lands_in_all() -> None:
    text = "arm_64bit=1\n[pi4]\nos_prefix=x/\n"
    edited = set_config_os_prefix(text, "a/")
    assert edited == "arm_64bit=1\n[pi4]\nos_prefix=x/\n[all]\nos_prefix=a/\n"
    assert firmware_os_prefix(edited, "pi4") == "a/"


def test_set_config_os_prefix_keeps_indentation_and_key_spelling() -> None:
    assert set_config_os_prefix("  os_prefix = a/\n", "b/") == "  os_prefix =b/\n"


def test_set_config_os_prefix_keeps_crlf_and_missing_final_newline() -> None:
    assert set_config_os_prefix("a=1\r\nos_prefix=a/\r\nb=2", "b/") == "a=1\r\nos_prefix=b/\r\nb=2"
    assert set_config_os_prefix("a=1\r\nb=2\r\n", "b/") == "a=1\r\nb=2\r\nos_prefix=b/\r\n"
    assert set_config_os_prefix("a=1\r\nb=2", "b/") == "a=1\r\nb=2\r\nos_prefix=b/"
    assert set_config_os_prefix("", "b/") == "os_prefix=b/\n"


def test_set_config_os_prefix_adds_before_trailing_blank_lines() -> None:
    assert set_config_os_prefix("a=1\n\n\n", "b/") == "a=1\nos_prefix=b/\n\n\n"
    assert set_config_os_prefix("[cm4]\notg_mode=1\n\n", "b/") == "[cm4]\notg_mode=1\n[all]\nos_prefix=b/\n\n"


@pytest.mark.parametrize("prefix", ["a b/", "a/\n", "a/\x00", 'a"/', "\t"])
def test_set_config_os_prefix_refuses_bad_values(prefix: str) -> None:
    with pytest.raises(BootFileError, match="os_prefix"):
        set_config_os_prefix("os_prefix=a/\n", prefix)


_CONFIG_LINES = st.sampled_from([
    "os_prefix=a/", "os_prefix=b/", " os_prefix = c/ ", "arm_64bit=1", "dtoverlay=vc4-kms-v3d", "# comment",
    "#os_prefix=z/", "", "   ", "[all]", "[pi4]", "[cm4]", "[none]", "[tryboot]", "[pi5]", "include extra.txt",
])
_ENDINGS = st.sampled_from(["\n", "\r\n"])


@st.composite
def config_texts(draw: st.DrawFn) -> str:
    lines = draw(st.lists(st.tuples(_CONFIG_LINES, _ENDINGS), max_size=12))
    text = "".join(content + ending for content, ending in lines)
    if text and draw(st.booleans()):
        text = text.rstrip("\r\n")
    return text


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(text=config_texts(), prefix=st.sampled_from(["a/", "b/", "", "slot_b/"]))
def test_set_config_os_prefix_property(text: str, prefix: str) -> None:
    edited = set_config_os_prefix(text, prefix)
    assert config_os_prefix(edited) == prefix
    # On a board none of the sampled conditional sections applies to, the firmware sees the same value.
    assert firmware_os_prefix(edited, "pi3") == prefix
    before, after = text.splitlines(), edited.splitlines()
    if config_os_prefix(text) is not None:
        assert len(before) == len(after)
        assert sum(1 for old, new in zip(before, after, strict=True) if old != new) <= 1
    else:
        assert 1 <= len(after) - len(before) <= 2
        remaining = list(after)
        for line in (f"os_prefix={prefix}", "[all]"):
            if len(remaining) > len(before) and line in remaining:
                # Drop the last occurrence: what was added goes after everything it must follow.
                del remaining[len(remaining) - 1 - remaining[::-1].index(line)]
        assert remaining == before
    assert edited.endswith("\n") == (text.endswith("\n") or not text)


# --------------------------------------------------------------------------------------------------- autoboot.txt


def test_render_autoboot_is_the_canonical_file() -> None:
    assert render_autoboot(2, 3) == golden("autoboot-2-3.txt") == autoboot_text(2, 3)
    assert render_autoboot(3, 2) == "[all]\ntryboot_a_b=1\nboot_partition=3\n[tryboot]\nboot_partition=2\n"


@pytest.mark.parametrize(("primary", "trial"), [(2, 3), (3, 2), (2, 2), (5, 6), (1, 62)])
def test_render_then_parse(primary: int, trial: int) -> None:
    text = render_autoboot(primary, trial)
    assert parse_autoboot(text) == AutobootConfig(tryboot_a_b=True, boot_partition=primary, tryboot_partition=trial)
    assert parse_autoboot(text.encode()) == parse_autoboot(text)
    for flag, expected in ((False, primary), (True, trial)):
        model = pifirmware.parse_autoboot(text.encode(), tryboot=flag)
        assert model.boot_partition == expected
        assert model.tryboot_a_b


def test_parse_handwritten_autoboot() -> None:
    # [none] never applies, [tryboot] only with the flag, and the last value that applies wins.
    assert parse_autoboot(golden("autoboot-handwritten.txt")) == AutobootConfig(
        tryboot_a_b=True, boot_partition=3, tryboot_partition=2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("boot_partition=2\n", AutobootConfig(False, 2, 2)),
        ("[tryboot]\nboot_partition=3\n", AutobootConfig(False, None, 3)),
        ("[all]\ntryboot_a_b=0\nboot_partition=2\n", AutobootConfig(False, 2, 2)),
        ("[all]\ntryboot_a_b=2\nboot_partition=2\n", AutobootConfig(False, 2, 2)),
        ("[pi4]\nboot_partition=9\n[all]\nboot_partition=2\n", AutobootConfig(False, 2, 2)),
        ("boot_partition=2\nboot_partition=abc\n", AutobootConfig(False, 2, 2)),
        ("[tryboot]\ntryboot_a_b=1\n[all]\nboot_partition=2\n", AutobootConfig(True, 2, 2)),
        ("\r\n# comment\r\nboot_partition = 3 \r\n", AutobootConfig(False, 3, 3)),
    ],
)
def test_parse_autoboot_cases(text: str, expected: AutobootConfig) -> None:
    assert parse_autoboot(text) == expected


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"boot_partition=2\n" + b"#" * 600 + b"\n", "over 512 bytes"),
        (b"\x7fELF\x02\x01\x01\x00\x00", "not a text file|not text"),
        (b"boot_partition=2\n\x00\x00", "not a text file"),
        (b"\xff\xfeb\x00o\x00", "not text"),
        (b"", "no boot_partition"),
        (b"[none]\nboot_partition=2\n", "no boot_partition"),
        (b"tryboot_a_b=1\n", "no boot_partition"),
        (b"boot_partition=two\n", "no boot_partition"),
    ],
)
def test_parse_autoboot_refuses(content: bytes, message: str) -> None:
    with pytest.raises(BootFileError, match=message):
        parse_autoboot(content)


def test_parse_autoboot_accepts_exactly_512_bytes() -> None:
    text = "boot_partition=2\n"
    text += "#" * (512 - len(text) - 1) + "\n"
    assert len(text.encode()) == 512
    assert parse_autoboot(text).boot_partition == 2


@pytest.mark.parametrize(("primary", "trial"), [(0, 3), (2, 63), (True, 3), (2, "3"), (-1, 2)])
def test_render_autoboot_refuses_bad_partitions(primary: object, trial: object) -> None:
    with pytest.raises(BootFileError, match="partition number"):
        render_autoboot(primary, trial)  # type: ignore[arg-type]


_AUTOBOOT_LINES = st.sampled_from([
    "[all]", "[tryboot]", "[none]", "[pi4]", "[boot_partition=2]", "tryboot_a_b=1", "tryboot_a_b=0",
    "boot_partition=2", "boot_partition=3", "boot_partition = 5", "boot_partition=x", "# boot_partition=7", "",
])


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(_AUTOBOOT_LINES, max_size=12))
def test_parse_autoboot_agrees_with_the_firmware_model(lines: list[str]) -> None:
    text = "\n".join(lines) + "\n"
    normal = pifirmware.parse_autoboot(text.encode(), tryboot=False)
    trial = pifirmware.parse_autoboot(text.encode(), tryboot=True)
    if normal.boot_partition is None and trial.boot_partition is None:
        with pytest.raises(BootFileError):
            parse_autoboot(text)
        return
    assert parse_autoboot(text) == AutobootConfig(
        tryboot_a_b=trial.tryboot_a_b, boot_partition=normal.boot_partition, tryboot_partition=trial.boot_partition)


# --------------------------------------------------------------------------------------------------- cmdline.txt


@pytest.mark.parametrize(
    ("before", "root", "after"),
    [
        ("cmdline-rpios.txt", "PARTUUID=1234abcd-03", "cmdline-rpios.root-1234abcd-03.txt"),
        ("cmdline-noroot.txt", "PARTUUID=1234abcd-02", "cmdline-noroot.root-1234abcd-02.txt"),
    ],
)
def test_set_cmdline_root_golden(before: str, root: str, after: str) -> None:
    edited = set_cmdline_root(golden(before), root)
    assert edited == golden(after)
    assert cmdline_root(edited) == root
    assert set_cmdline_root(edited, root) == edited


def test_cmdline_root_of_golden_files() -> None:
    assert cmdline_root(golden("cmdline-rpios.txt")) == "PARTUUID=deadbeef-02"
    assert cmdline_root(golden("cmdline-noroot.txt")) is None
    assert cmdline_root(cmdline_text(0x1234ABCD, 5)) == "PARTUUID=1234abcd-05"


@pytest.mark.parametrize(
    ("text", "root", "expected"),
    [
        # Every kernel root= is rewritten, so whichever the kernel keeps is ours.
        ("root=/dev/sda1 quiet root=PARTUUID=x-02\n", "PARTUUID=y-03", "root=PARTUUID=y-03 quiet root=PARTUUID=y-03\n"),
        # A root= inside another argument's quotes, or after `--` (init's arguments), is not the kernel's.
        ('dyndbg="a root=x" rootwait\n', "/dev/sdb2", 'dyndbg="a root=x" rootwait root=/dev/sdb2\n'),
        ("console=tty1 -- root=init single\n", "/dev/sdb2", "console=tty1 root=/dev/sdb2 -- root=init single\n"),
        # Blanks between arguments are kept as they are; so is whatever trails the last argument.
        ("a  b\troot=x   c  \n", "y", "a  b\troot=y   c  \n"),
        ("a  b  \n", "y", "a  b root=y  \n"),
        ("console=tty1 root=x", "y", "console=tty1 root=y"),
        ("console=tty1 root=x\r\n", "y", "console=tty1 root=y\r\n"),
        # Only the first line is the kernel's command line.
        ("console=tty1\nroot=other\n", "y", "console=tty1 root=y\nroot=other\n"),
        ("", "y", "root=y\n"),
        ("\n", "y", "root=y\n"),
        ("rootwait rootfstype=ext4\n", "y", "rootwait rootfstype=ext4 root=y\n"),
    ],
)
def test_set_cmdline_root_cases(text: str, root: str, expected: str) -> None:
    edited = set_cmdline_root(text, root)
    assert edited == expected
    assert cmdline_root(edited) == root


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("root=a root=b\n", "b"),
        ('"root=a b" quiet\n', "a b"),
        ("quiet -- root=init\n", None),
        ("rootwait rootfstype=ext4\n", None),
        ("root=\n", ""),
        ("\nroot=x\n", None),
    ],
)
def test_cmdline_root_cases(text: str, expected: str | None) -> None:
    assert cmdline_root(text) == expected


@pytest.mark.parametrize("root", ["", "PARTUUID=a b", "x\n", 'a"b', "x\x00"])
def test_set_cmdline_root_refuses_bad_values(root: str) -> None:
    with pytest.raises(BootFileError, match="root="):
        set_cmdline_root("quiet\n", root)


_CMDLINE_ARGS = st.sampled_from([
    "console=serial0,115200", "console=tty1", "root=PARTUUID=deadbeef-02", "root=/dev/mmcblk0p2", "rootwait",
    "rootfstype=ext4", "quiet", 'dyndbg="file x +p root=q"', "--", "init=/bin/sh", "fsck.repair=yes",
])


@settings(max_examples=300, deadline=None)
@given(args=st.lists(_CMDLINE_ARGS, max_size=10), gaps=st.lists(st.sampled_from([" ", "  ", "\t"]), min_size=10,
                                                                  max_size=10), newline=st.booleans())
def test_set_cmdline_root_property(args: list[str], gaps: list[str], newline: bool) -> None:
    line = "".join(arg + gap for arg, gap in zip(args, gaps, strict=False)).rstrip()
    text = line + ("\n" if newline else "")
    edited = set_cmdline_root(text, "PARTUUID=1234abcd-03")
    assert cmdline_root(edited) == "PARTUUID=1234abcd-03"
    assert edited.endswith("\n") == (newline or not text)
    # The kernel sees the same arguments in the same order, root= aside.
    kernel_args = [arg for arg in edited.split() if not arg.startswith("root=")]
    assert kernel_args == [arg for arg in text.split() if not arg.startswith("root=")]
    if "--" not in args and not any('"' in arg for arg in args):
        # The firmware model (which knows neither quotes nor `--`) reads the same root= from it.
        model_roots = [arg for arg in edited.splitlines()[0].split() if arg.startswith("root=")]
        assert model_roots[-1] == "root=PARTUUID=1234abcd-03"


# --------------------------------------------------------------------------------------------------- fstab


@pytest.mark.parametrize(
    ("before", "root", "boot", "after"),
    [
        ("fstab-rpios.txt", "PARTUUID=1234abcd-03", "PARTUUID=1234abcd-01", "fstab-rpios.slot-b.txt"),
        ("fstab-legacy.txt", "PARTUUID=1234abcd-05", "PARTUUID=1234abcd-02", "fstab-legacy.slot-a.txt"),
    ],
)
def test_set_fstab_mounts_golden(before: str, root: str, boot: str, after: str) -> None:
    original = golden(before)
    edited = set_fstab_mounts(original, root=root, boot=boot)
    assert edited == golden(after)
    mounts = fstab_mounts(edited)
    assert mounts["/"] == root
    boot_mountpoint = "/boot/firmware" if "/boot/firmware" in mounts else "/boot"
    assert mounts[boot_mountpoint] == boot
    assert mounts["/data"] == fstab_mounts(original)["/data"]
    assert set_fstab_mounts(edited, root=root, boot=boot) == edited


def test_set_fstab_mounts_on_the_test_disk_fstab() -> None:
    original = fstab_text(0xDEADBEEF, root=2, boot=1, data=4)
    edited = set_fstab_mounts(original, root="PARTUUID=1234abcd-06", boot="PARTUUID=1234abcd-03")
    assert fstab_mounts(edited) == {
        "/proc": "proc",
        "/boot/firmware": "PARTUUID=1234abcd-03",
        "/": "PARTUUID=1234abcd-06",
        "/data": "PARTUUID=deadbeef-04",
    }
    assert edited.splitlines()[0] == original.splitlines()[0]


def test_set_fstab_mounts_keeps_later_columns_in_place() -> None:
    text = ("UUID=ab   /boot/firmware  vfat  defaults  0  2\n"
            "/dev/mmcblk0p2   /               ext4    defaults,noatime  0       1\n")
    edited = set_fstab_mounts(text, root="PARTUUID=1234abcd-03", boot="PARTUUID=1234abcd-01")
    first, second = edited.splitlines()
    # Too long for its column: what follows moves right, the gaps stay readable.
    assert first == "PARTUUID=1234abcd-01  /boot/firmware  vfat  defaults  0  2"
    # The wide gap after "/" absorbs the longer spec: the type column stays where it was.
    assert second == "PARTUUID=1234abcd-03  /          ext4    defaults,noatime  0       1"
    assert second.index("ext4") == text.splitlines()[1].index("ext4")
    shorter = set_fstab_mounts(edited, root="/dev/sda2", boot=None).splitlines()[1]
    assert shorter == "/dev/sda2" + " " * 13 + "/          ext4    defaults,noatime  0       1"
    assert shorter.index("/ ") == second.index("/ ")


def test_set_fstab_mounts_boot_none_leaves_boot_alone() -> None:
    text = golden("fstab-rpios.txt")
    edited = set_fstab_mounts(text, root="PARTUUID=1234abcd-03", boot=None)
    assert fstab_mounts(edited)["/boot/firmware"] == "PARTUUID=deadbeef-01"
    assert fstab_mounts(edited)["/"] == "PARTUUID=1234abcd-03"


def test_set_fstab_mounts_prefers_the_boot_mountpoint_over_legacy_boot() -> None:
    text = "LABEL=a /boot ext4 defaults 0 2\nLABEL=b /boot/firmware/ vfat defaults 0 2\nLABEL=c / ext4 defaults 0 1\n"
    edited = set_fstab_mounts(text, root="R", boot="B")
    assert edited == "LABEL=a /boot ext4 defaults 0 2\nB /boot/firmware/ vfat defaults 0 2\nR / ext4 defaults 0 1\n"
    other = set_fstab_mounts(text, root="R", boot="B", boot_mountpoint="/boot")
    assert fstab_mounts(other)["/boot"] == "B"
    assert fstab_mounts(other)["/boot/firmware"] == "LABEL=b"


def test_set_fstab_mounts_without_a_boot_entry_adds_none() -> None:
    text = "PARTUUID=x-02 / ext4 defaults 0 1\n"
    assert set_fstab_mounts(text, root="PARTUUID=y-03", boot="PARTUUID=y-01") == "PARTUUID=y-03 / ext4 defaults 0 1\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "R / ext4 defaults,noatime 0 1\n"),
        ("# only a comment", "# only a comment\nR / ext4 defaults,noatime 0 1"),
        ("# header\r\nproc /proc proc defaults 0 0\r\n",
         "# header\r\nR / ext4 defaults,noatime 0 1\r\nproc /proc proc defaults 0 0\r\n"),
    ],
)
def test_set_fstab_mounts_adds_a_missing_root_line(text: str, expected: str) -> None:
    edited = set_fstab_mounts(text, root="R", boot=None)
    assert edited == expected
    assert fstab_mounts(edited)["/"] == "R"


def test_set_fstab_mounts_leaves_comments_and_escaped_mount_points_alone() -> None:
    text = ("# PARTUUID=old-02 / ext4 defaults 0 1\n"
            "LABEL=x /mnt/my\\040disk ext4 defaults 0 2\n"
            "\tPARTUUID=old-02\t/\text4\tdefaults\t0\t1\n")
    edited = set_fstab_mounts(text, root="PARTUUID=new-03", boot=None)
    assert edited == ("# PARTUUID=old-02 / ext4 defaults 0 1\n"
                      "LABEL=x /mnt/my\\040disk ext4 defaults 0 2\n"
                      "\tPARTUUID=new-03\t/\text4\tdefaults\t0\t1\n")
    assert fstab_mounts(edited)["/mnt/my disk"] == "LABEL=x"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"root": "", "boot": None}, "root fs_spec"),
        ({"root": "PARTUUID=a b", "boot": None}, "root fs_spec"),
        ({"root": "R", "boot": "B\n"}, "boot fs_spec"),
        ({"root": "R", "boot": "B", "boot_mountpoint": "boot"}, "absolute"),
    ],
)
def test_set_fstab_mounts_refuses_bad_values(kwargs: dict[str, str | None], message: str) -> None:
    with pytest.raises(BootFileError, match=message):
        set_fstab_mounts("R / ext4 defaults 0 1\n", **kwargs)  # type: ignore[arg-type]
