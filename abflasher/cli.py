"""``ab-flasher``: the root command that runs the engine directly, without the service.

For provisioning and factory flashing (what people use bmaptool for): ``ab-flasher write SOURCE TARGET``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

from abflasher import __version__, errors, provision_cli
from abflasher.config import DEFAULT_PATH, load_config
from abflasher.delta import cli as delta_cli
from abflasher.image.formats import GZIP_INFLATERS, ImageFormat
from abflasher.image.pipeline import Progress
from abflasher.install import InstallResult, install_image

if TYPE_CHECKING:
    from abflasher.api import SystemStatus


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ab-flasher",
        description="Write OS images with on-the-fly decompression and read-back verification.",
    )
    parser.add_argument("--version", action="version", version=f"ab-flasher {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    write = commands.add_parser(
        "write",
        help="write an image into a block device or file and verify it by reading it back",
        description="Decompress SOURCE (gzip, xz, zstd, bzip2 or raw, detected from its content) into TARGET, then "
        "read TARGET back and compare sha256. Exit 0 only when the read-back matched.",
    )
    write.add_argument("source", metavar="SOURCE", help="image path, '-' for standard input, or an http(s) URL")
    write.add_argument("target", metavar="TARGET", help="block device (partition or disk) or regular file")
    checksum = write.add_mutually_exclusive_group()
    checksum.add_argument("--sha256", metavar="HEX", help="expected sha256 of the image or of the compressed file")
    checksum.add_argument("--sha256-url", metavar="URL", help="sha256sum-format checksum file to fetch")
    checksum.add_argument("--sha256-file", metavar="PATH", help="local sha256sum-format checksum file")
    write.add_argument(
        "--format",
        choices=["auto", *[f.value for f in ImageFormat]],
        default="auto",
        help="override format detection ('raw' writes any bytes as they are)",
    )
    write.add_argument(
        "--inflater",
        choices=list(GZIP_INFLATERS),
        default="auto",
        help="gzip implementation (auto: igzip when installed, else the fastest Python module)",
    )
    write.add_argument("--create", action="store_true", help="create TARGET as a regular file if it does not exist")
    write.add_argument("--json", action="store_true", help="print the result as one JSON object")
    write.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    boot_check = commands.add_parser(
        "boot-check",
        help="on boot: reconcile the state, and on a trial boot run the health checks and commit or reject",
        description="Run by ab-flasher-boot-check.service once the system has started. On a trial boot it runs "
        "the health checks (/etc/ab-flasher/health.d and systemd's state) and commits the slot when they pass; "
        "otherwise the slot is rejected and, unless configured not to, the device reboots into the committed slot.",
    )
    boot_check.add_argument("--config", default=DEFAULT_PATH, help=f"configuration file (default {DEFAULT_PATH})")
    boot_check.add_argument("--json", action="store_true", help="print the result as one JSON object")

    deadline = commands.add_parser(
        "trial-deadline",
        help="on boot: reboot into the committed slot if a trial is not committed within trial_deadline",
        description="Run by ab-flasher-trial-deadline.service early in every boot. On a normal boot it exits at "
        "once; on a trial boot it waits until trial_deadline seconds after boot and, if the trial is still not "
        "committed, records it as bad and reboots into the committed slot (forcing the reboot if it does not "
        "happen).",
    )
    deadline.add_argument("--config", default=DEFAULT_PATH, help=f"configuration file (default {DEFAULT_PATH})")

    write.add_argument("--config", default=DEFAULT_PATH,
                       help=f"configuration whose trusted keys a bundle is checked against (default {DEFAULT_PATH})")

    auto_update = commands.add_parser(
        "auto-update",
        help="one unattended update run, as far as auto_update says (ab-flasher-update.timer runs it)",
        description="Check the channel; with auto_update = download-and-install or install-and-reboot install its "
        "newest version into the other slot; with install-and-reboot wait for maintenance_window, then reboot into "
        "the trial. The outcome goes to standard output (the journal) and to abflasherctl status.",
    )
    auto_update.add_argument("--config", default=DEFAULT_PATH, help=f"configuration file (default {DEFAULT_PATH})")

    from abflasher.trust.commands import add_bundle_parser

    add_bundle_parser(commands)

    status = commands.add_parser(
        "status",
        help="the slot table, read directly (root; abflasherctl status asks the service instead)",
    )
    status.add_argument("--config", default=DEFAULT_PATH, help=f"configuration file (default {DEFAULT_PATH})")
    status.add_argument("--json", action="store_true", help="print the status as one JSON object")
    delta_cli.add_commands(commands)
    provision_cli.add_parser(commands)
    return parser


#: Stages whose progress is counted in bytes; the others are steps without a measure.
BYTE_STAGES = frozenset({"writing", "verifying"})


class ProgressPrinter:
    """A tqdm bar on a terminal; a line every few percent otherwise (logs, pipes)."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self._stream = stream
        self._enabled = enabled
        self._tty = stream.isatty()
        self._bar: Any = None
        self._stage = ""
        self._last_percent = -10

    def __call__(self, progress: Progress) -> None:
        if not self._enabled:
            return
        if progress.stage != self._stage:
            self.close()
            self._stage = progress.stage
            self._last_percent = -10
            if progress.stage not in BYTE_STAGES:
                print(f"{progress.stage}...", file=self._stream, flush=True)
                return
            if self._tty:
                from tqdm import tqdm

                self._bar = tqdm(
                    total=progress.total,
                    desc=progress.stage,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    file=self._stream,
                    leave=True,
                )
        if progress.stage not in BYTE_STAGES:
            return
        if self._bar is not None:
            self._bar.update(progress.done - self._bar.n)
            return
        percent = progress.percent
        if percent is None:
            if progress.written - self._last_percent >= 64 << 20:
                self._last_percent = progress.written
                print(f"{progress.stage}: {progress.written >> 20} MiB", file=self._stream, flush=True)
        elif percent >= self._last_percent + 10 or (percent == 100 and self._last_percent != 100):
            self._last_percent = percent
            print(f"{progress.stage}: {percent}%", file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _expected_sha256(args: argparse.Namespace) -> str | None:
    from abflasher.image import checksums

    image_name = os.path.basename(args.source.split("?", 1)[0]) if args.source != "-" else None
    if args.sha256:
        return checksums.normalize_sha256(args.sha256)
    if args.sha256_url:
        return checksums.fetch_checksum(args.sha256_url, image_name)
    if args.sha256_file:
        try:
            with open(args.sha256_file, encoding="utf-8") as handle:
                text = handle.read(1 << 20)
        except OSError as exc:
            raise errors.InvalidArgument(f"cannot read checksum file {args.sha256_file}: {exc.strerror}") from exc
        return checksums.parse_checksum_file(text, image_name)
    return None


def cancel_on_signals() -> threading.Event:
    """An event that SIGINT, SIGTERM and SIGHUP set, so a write stops cleanly (leaving the target invalid)."""
    cancel = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        cancel.set()

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    return cancel


def _write(args: argparse.Namespace) -> InstallResult:
    from abflasher.image.sources import open_source
    from abflasher.trust.commands import open_for_write
    from abflasher.write_guard import refuse_device_slot

    expected = _expected_sha256(args)
    refuse_device_slot(args.target, args.config)
    cancel = cancel_on_signals()
    printer = ProgressPrinter(sys.stderr, enabled=not args.quiet)
    opened = open_source(args.source)
    try:
        # A bundle (abflasher/trust/) carries its image and the sha256 it must have.
        source, bundle_sha256, note = open_for_write(opened, args.config)
        if note:
            print(note, file=sys.stderr)
        if bundle_sha256 is not None and expected is not None and bundle_sha256 != expected:
            raise errors.ChecksumMismatch(f"--sha256 {expected} is not the bundle's image's {bundle_sha256}")
        expected = bundle_sha256 or expected
        return install_image(
            source,
            args.target,
            expected_sha256=expected,
            image_format=None if args.format == "auto" else ImageFormat(args.format),
            gzip_impl=args.inflater,
            create=args.create,
            progress=printer,
            cancel=cancel,
        )
    finally:
        printer.close()
        opened.close()


def _boot_check(args: argparse.Namespace) -> int:
    from abflasher.systemd_watchdog import sync_mask
    from abflasher.updater import Updater

    config = load_config(args.config)
    _log_to_stderr()
    try:
        changed = sync_mask(config.runtime_watchdog, config.root_path)
    except OSError as exc:
        changed = f"could not apply runtime_watchdog = {'yes' if config.runtime_watchdog else 'no'}: {exc}"
    if changed:
        print(changed, file=sys.stderr)
    result = Updater(config).boot_check()
    if args.json:
        print(json.dumps({"trial": result.trial, "committed": result.committed, "message": result.message}))
    else:
        print(result.message)
    return 0 if result.committed or not result.trial else errors.NoTrial.exit_code


def _log_to_stderr() -> None:
    """The engine's log lines go to the journal (stderr of the boot units), without a timestamp of their own."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


def _trial_deadline(args: argparse.Namespace) -> int:
    from abflasher.deadline import enforce_trial_deadline
    from abflasher.updater import Updater

    config = load_config(args.config)
    _log_to_stderr()
    result = enforce_trial_deadline(Updater(config), config.trial_deadline, config.reboot_command)
    print(result.message)
    return 0


def _status(args: argparse.Namespace) -> int:
    from abflasher.updater import Updater

    status = Updater(load_config(args.config)).status()
    if args.json:
        print(json.dumps(dataclasses.asdict(status)))
        return 0
    print(format_status(status))
    return 0


def format_status(status: SystemStatus) -> str:
    """The slot table as people read it (``ab-flasher status``, the demo)."""
    trial = " (trial boot, not yet committed)" if status.trial_active else ""
    lines = [f"{status.layout} layout; booted slot {status.booted_slot} ({status.booted_version or '?'}){trial}"]
    headers = ("SLOT", "VERSION", "STATE", "BOOTED", "PRIMARY", "DEVICE", "INSTALLED")
    rows = [headers]
    for slot in status.slots:
        installed = slot.installed.get("result", "")
        rows.append(
            (
                slot.name,
                slot.version or "-",
                slot.state,
                "yes" if slot.booted else "",
                "yes" if slot.primary else "",
                slot.device,
                str(installed),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(headers))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "boot-check":
            return _boot_check(args)
        if args.command == "trial-deadline":
            return _trial_deadline(args)
        if args.command == "status":
            return _status(args)
        if args.command == "auto-update":
            from abflasher.autoupdate import auto_update_main

            return auto_update_main(args.config)
        if args.command == "bundle":
            from abflasher.trust.commands import run_bundle

            return run_bundle(args)
        if args.command in delta_cli.COMMANDS:
            return delta_cli.run(args)
        if args.command == "provision":
            return provision_cli.run(args)
        result = _write(args)
    except errors.AbFlasherError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"success": False, "error": exc.name, "message": str(exc)}))
        print(f"ab-flasher: {exc}", file=sys.stderr)
        return exc.exit_code
    stream = result.stream
    if args.json:
        print(
            json.dumps(
                {
                    "success": True,
                    "target": result.target,
                    "format": stream.image_format.value,
                    "inflater": stream.inflater,
                    "image_size": stream.image_size,
                    "image_sha256": stream.image_sha256,
                    "source_bytes": stream.source_bytes,
                    "source_sha256": stream.source_sha256,
                    "checksum_matched": stream.matched,
                    "verified": result.verified,
                    "seconds": round(result.seconds, 3),
                }
            )
        )
    else:
        checked = f", matches the expected sha256 of the {stream.matched}" if stream.matched else ""
        print(
            f"wrote {stream.image_size} bytes ({stream.image_format.value}) to {result.target} in "
            f"{result.seconds:.1f} s; read-back verified, sha256 {stream.image_sha256}{checked}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
