"""``ab-flasher provision``: the command line of abflasher/provision.py."""

from __future__ import annotations

import argparse
import json
from typing import Any

from abflasher.disk.slots import VARIANTS


def _mib(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: give a size in MiB greater than 0")
    return value


def _signature(text: str) -> int:
    value = int(text, 16)
    if not 0 < value <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"{text}: give 1 to 8 hex digits, not all zero")
    return value


def add_parser(commands: Any) -> None:
    provision = commands.add_parser(
        "provision",
        help="lay out a new card or disk image in an ab-flasher layout, as a factory would",
        description="Partition TARGET (a block device, or an image file that is created or grown) in the chosen "
        "layout, write the system image into the first system slot and the recovery image into the recovery slot "
        "(read back and verified), format the boot and data partitions, and point every root's /etc/fstab and "
        "cmdline.txt at its own partitions. Everything on TARGET is lost. Layouts: docs/layouts.md.",
    )
    provision.add_argument("target", metavar="TARGET", help="block device (a whole disk) or image file")
    provision.add_argument("--scheme", choices=["prefix", "autoboot"], default="prefix",
                           help="boot scheme: prefix (every Pi; os_prefix folders on p1) or autoboot (Pi 4/5, or "
                           "a Pi 3 with bootcode.bin)")
    provision.add_argument("--layout", choices=list(VARIANTS), default="ab",
                           help="ab (two system slots), ab+recovery, or main+recovery (one system slot and a "
                           "recovery slot, for small cards)")
    provision.add_argument("--system", required=True, metavar="IMAGE",
                           help="system root file system image (ext4 with /.ab_version; raw or compressed)")
    provision.add_argument("--recovery", metavar="IMAGE", help="recovery root file system image")
    provision.add_argument("--boot", metavar="FILES", help="the system's boot files: a tarball or folder "
                           "(default: the image's /boot/firmware)")
    provision.add_argument("--recovery-boot", metavar="FILES", help="the recovery system's boot files")
    provision.add_argument("--slot-size", type=_mib, metavar="MIB",
                           help="size of each system slot (default: the image's size; needed for compressed images)")
    provision.add_argument("--recovery-size", type=_mib, metavar="MIB", help="size of the recovery slot")
    provision.add_argument("--boot-size", type=_mib, default=256, metavar="MIB",
                           help="boot partition size (prefix: p1, which holds every slot's folder; autoboot: each "
                           "slot's own); default 256")
    provision.add_argument("--data-size", type=_mib, metavar="MIB",
                           help="data partition size (default: the rest of a disk; 64 in an image file)")
    provision.add_argument("--data-mount", default="/data", metavar="PATH",
                           help="where each root mounts the data partition (default /data)")
    provision.add_argument("--disk-id", type=_signature, metavar="HEX",
                           help="MBR disk signature, the base of every PARTUUID (default: random)")
    provision.add_argument("--json", action="store_true", help="print the resulting slots as one JSON object")


def run(args: argparse.Namespace) -> int:
    from abflasher.provision import ProvisionRequest, provision

    layout = provision(ProvisionRequest(
        target=args.target, kind=args.scheme, variant=args.layout, system_image=args.system,
        recovery_image=args.recovery, boot_files=args.boot, recovery_boot_files=args.recovery_boot,
        slot_mb=args.slot_size, recovery_mb=args.recovery_size, boot_mb=args.boot_size, data_mb=args.data_size,
        signature=args.disk_id, data_mount=args.data_mount,
    ))
    slots = [{"name": s.name, "role": s.role, "partition": s.root_partition, "partuuid": s.root_partuuid,
              "size": s.size} for s in layout.slots]
    if args.json:
        print(json.dumps({"success": True, "scheme": layout.kind, "layout": layout.variant,
                          "disk_id": layout.table.ptuuid, "slots": slots, "data_partition": layout.data_partition}))
        return 0
    print(f"{args.target}: {layout.kind} scheme, {layout.variant} layout, disk id {layout.table.ptuuid}")
    for slot in slots:
        print(f"  slot {slot['name']} ({slot['role']}): partition {slot['partition']}, PARTUUID {slot['partuuid']}")
    if layout.data_partition is not None:
        print(f"  data: partition {layout.data_partition}")
    return 0
