"""The QEMU guest is debootstrapped with tests/slow/guest.py's GUEST_PACKAGES so that installing the .deb in it needs
no network: that list must cover every package the ab-flasher binary package Depends on (debian/control). Checked
here, from the two files, so that a new dependency fails in seconds rather than deep in the slow tier."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import apt_pkg

from tests.slow.guest import GUEST_PACKAGES

CONTROL = Path(__file__).resolve().parents[2] / "debian" / "control"
#: Virtual packages in Depends and the real package that provides them in bookworm: debootstrap --include takes only
#: real packages, so GUEST_PACKAGES names the provider.
PROVIDERS = {"default-dbus-system-bus": "dbus", "dbus-system-bus": "dbus"}


def binary_depends(control: Path, package: str) -> list[list[str]]:
    """The Depends of binary ``package`` in ``control`` as or-groups of package names (version constraints and
    multiarch qualifiers dropped); substvars such as ``${misc:Depends}`` are left out: the build fills them in."""
    with apt_pkg.TagFile(str(control)) as paragraphs:
        for paragraph in paragraphs:
            if paragraph.get("Package") == package:
                groups = apt_pkg.parse_depends(paragraph.get("Depends", ""))
                return [
                    [name for name, _version, _op in group]
                    for group in groups
                    if not any(name.startswith("${") for name, _version, _op in group)
                ]
    raise AssertionError(f"{control} has no binary package {package!r}")


def uncovered(groups: Iterable[list[str]], listed: Iterable[str]) -> list[str]:
    """The or-groups (written ``a | b``) of which no package, or its provider, is in ``listed``."""
    names = set(listed)
    covered = names | {virtual for virtual, provider in PROVIDERS.items() if provider in names}
    return [" | ".join(group) for group in groups if not covered.intersection(group)]


def test_guest_packages_cover_the_packages_depends() -> None:
    groups = binary_depends(CONTROL, "ab-flasher")
    assert ["polkitd"] in groups, "debian/control's Depends were not read"
    missing = uncovered(groups, GUEST_PACKAGES)
    assert not missing, (
        f"tests/slow/guest.py GUEST_PACKAGES lacks what debian/control's ab-flasher Depends on: {', '.join(missing)} "
        "(add it there; a virtual package's provider to PROVIDERS in this test)"
    )


def test_substvars_alternatives_versions_and_virtual_packages(tmp_path: Path) -> None:
    control = tmp_path / "control"
    control.write_text(
        "Source: x\n\n"
        "Package: other\nDepends: not-ours\n\n"
        "Package: ab-flasher\n"
        "Depends: ${misc:Depends},\n ${python3:Depends},\n a (>= 1.2),\n b | c,\n d:any,\n dbus-system-bus\n"
    )
    groups = binary_depends(control, "ab-flasher")
    assert groups == [["a"], ["b", "c"], ["d"], ["dbus-system-bus"]]
    assert uncovered(groups, ["a", "c", "d", "dbus"]) == []
    assert uncovered(groups, ["a", "b"]) == ["d", "dbus-system-bus"]
    assert uncovered(groups, ["d", "dbus"]) == ["a", "b | c"]
