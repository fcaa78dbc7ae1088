"""Simulated Pi disks in the recovery layouts, laid out by the product's own ``ab-flasher provision``
(abflasher/provision.py) from root images and boot files made here; root is needed (it attaches a loop device)."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

from tests.support.pidisk import (
    _FIRMWARE_FILES,
    DEFAULT_SIGNATURE,
    IMAGE_BUILD_SIGNATURE,
    Layout,
    PiDisk,
    PiPartition,
    Variant,
    _slot_boot_files,
    _write_tree,
    build_root_image,
    cmdline_text,
    read_partitions,
)


def slot_boot_tree(path: Path, layout: Layout, slot: str, version: str) -> Path:
    """A folder of a slot's boot files as a factory gets them (firmware, config.txt, kernel, dtbs, cmdline.txt)."""
    files: dict[str, bytes | str] = dict(_FIRMWARE_FILES)
    files["config.txt"] = f"# ab-flasher test disk, {layout} layout\n[all]\narm_64bit=1\nenable_uart=1\n"
    # root= names the partition of the machine that built the files: provisioning points it at the slot's own.
    files.update(_slot_boot_files(slot, version, cmdline_text(IMAGE_BUILD_SIGNATURE, 2)))
    _write_tree(path, files)
    return path


def build_provisioned_disk(
    path: Path,
    layout: Layout,
    variant: Variant,
    *,
    version: str = "1.0.0",
    recovery_version: str = "0.9.0-recovery",
    root_mb: int = 32,
    recovery_mb: int = 16,
    data_mb: int = 8,
    signature: int = DEFAULT_SIGNATURE,
    root_extra_files: Mapping[str, bytes | str] | None = None,
) -> PiDisk:
    """A disk laid out by the product's own ``ab-flasher provision`` (root: it attaches a loop device), from a
    system root image, a recovery root image (recovery variants) and generated boot files; the first system slot
    (a, or main) holds ``version`` and is committed."""
    from abflasher.disk.slots import layout_shape
    from abflasher.provision import ProvisionRequest, provision

    shape = layout_shape(layout, variant)
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="pidisk-") as tmp:
        work = Path(tmp)
        system = work / "system.img"
        build_root_image(system, version, size_mb=root_mb, extra_files=root_extra_files)
        recovery = None
        boot = slot_boot_tree(work / "boot-system", layout, shape.slots[0][0], version)
        recovery_boot = None
        if variant != "ab":
            recovery = work / "recovery.img"
            build_root_image(recovery, recovery_version, size_mb=recovery_mb)
            recovery_boot = slot_boot_tree(work / "boot-recovery", layout, "recovery", recovery_version)
        provision(ProvisionRequest(
            target=str(path), kind=layout, variant=variant, system_image=str(system),
            recovery_image=str(recovery) if recovery else None, boot_files=str(boot),
            recovery_boot_files=str(recovery_boot) if recovery_boot else None, slot_mb=root_mb,
            recovery_mb=recovery_mb if recovery else None, boot_mb=16, data_mb=data_mb, signature=signature,
        ))
    return describe_provisioned(path, layout, variant, signature)


def describe_provisioned(path: Path, layout: Layout, variant: Variant, signature: int) -> PiDisk:
    """The `PiDisk` of a disk image `ab-flasher provision` laid out (roles from the layout's shape)."""
    from abflasher.disk.slots import layout_shape

    shape = layout_shape(layout, variant)
    roles: dict[int, str] = {1: "boot" if layout == "prefix" else "autoboot", shape.data: "data"}
    if shape.extended is not None:
        roles[shape.extended] = "extended"
    for name, _role, root, boot_number in shape.slots:
        roles[root] = f"root_{name}"
        if boot_number is not None:
            roles[boot_number] = f"boot_{name}"
    found = read_partitions(path)
    return PiDisk(path=path, layout=layout, signature=signature, variant=variant,
                  partitions=tuple(PiPartition(number, start, size, type_id, roles[number])
                                   for number, start, size, type_id in found))
