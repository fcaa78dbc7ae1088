"""``abflasherctl``: the command-line client of the ab-flasher service.

It only talks D-Bus to ``org.abflasher.Updater``; the service decides (with polkit) what the caller may do. Exit
codes: 0 success, each error class its own (``abflasher.errors``: 2 invalid argument, 3 not authorized, 4 busy, ...),
69 when the service cannot be reached, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import stat
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from dbus_next.signature import Variant

from abflasher import __version__, errors
from abflasher.ctl_client import (
    EXIT_INTERRUPTED,
    Event,
    Interrupted,
    PolkitAgent,
    ServiceClient,
    ServiceUnavailable,
    human_bytes,
    status_summary,
    unwrap,
)
from abflasher.image.sources import open_image_file
from abflasher.service.contract import (
    REBOOT_MODES,
    RUNNING_STATES,
)

# ---------------------------------------------------------------------------------------------------------------------
# Output


class Output:
    """Everything printed: human text, or JSON (one object, or one per line for event streams)."""

    def __init__(self, stream: TextIO, *, as_json: bool) -> None:
        self.stream = stream
        self.as_json = as_json
        self.tty = stream.isatty() and not as_json

    def text(self, line: str) -> None:
        if not self.as_json:
            print(line, file=self.stream, flush=True)

    def json(self, value: Any) -> None:
        if self.as_json:
            print(json.dumps(value, sort_keys=True), file=self.stream, flush=True)


class ProgressView:
    """A tqdm bar per stage on a terminal; otherwise a line per stage and per 10 percent; JSON lines with --json."""

    def __init__(self, out: Output) -> None:
        self._out = out
        self._bar: Any = None
        self._stage = ""
        self._last_decile = -1
        self._last_done = 0

    def update(self, job: str, stage: str, percent: int, done: int, total: int) -> None:
        if self._out.as_json:
            self._out.json({"event": "progress", "job": job, "stage": stage, "percent": percent, "done": done,
                            "total": total})
            return
        if stage != self._stage:
            self.close()
            self._stage = stage
            self._last_decile = -1
            self._last_done = 0
            if self._out.tty:
                from tqdm import tqdm

                self._bar = tqdm(total=total or None, desc=stage, unit="B", unit_scale=True, unit_divisor=1000,
                                 file=self._out.stream, leave=True, dynamic_ncols=True)
        if self._bar is not None:
            if total and self._bar.total != total:
                self._bar.total = total
            self._bar.update(max(0, done - self._last_done))
            self._last_done = done
            return
        decile = percent // 10 if total else done // (100 * 1000 * 1000)
        if decile != self._last_decile:
            self._last_decile = decile
            amount = f"{human_bytes(done)} of {human_bytes(total)}" if total else human_bytes(done)
            self._out.text(f"{stage}: {percent}% ({amount})" if total else f"{stage}: {amount}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ---------------------------------------------------------------------------------------------------------------------
# Commands


async def follow_job(client: ServiceClient, events: asyncio.Queue[Event], job: str | None, out: Output,
                     *, cancel_on_interrupt: bool, interrupted: asyncio.Event) -> int:
    """Show a job's progress until its Completed signal; ``job`` None follows whichever job reports."""
    view = ProgressView(out)
    cancelling = False
    try:
        while True:
            getter = asyncio.ensure_future(events.get())
            waiter = asyncio.ensure_future(interrupted.wait())
            done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                waiter.cancel()
                if not cancel_on_interrupt or job is None:
                    raise Interrupted("stopped watching; the update goes on (abflasherctl watch shows it again)")
                if cancelling:
                    raise Interrupted("stopped waiting; the update is being cancelled (abflasherctl watch shows it)")
                cancelling = True
                interrupted.clear()
                view.close()
                out.text("cancelling the update...")
                await client.call("Cancel", "s", [job], mutating=True)
                continue
            waiter.cancel()
            event = getter.result()
            if event.kind == "vanished":
                raise ServiceUnavailable(
                    "the ab-flasher service stopped during the update; see journalctl -u ab-flasher"
                )
            event_job = str(event.args[0])
            if job is not None and event_job != job:
                continue
            if event.kind == "progress":
                _job, stage, percent, done_bytes, total = event.args
                view.update(event_job, stage, percent, done_bytes, total)
                continue
            view.close()
            _job, success, error_name, message = event.args
            out.json({"event": "completed", "job": event_job, "success": success, "error": error_name,
                      "message": message})
            if success:
                out.text(message)
                return 0
            raise errors.from_dbus_name(error_name, message)
    finally:
        view.close()


async def cmd_status(client: ServiceClient, args: argparse.Namespace, out: Output) -> int:
    slots_reply, props = await asyncio.gather(client.call("GetSlots"), client.properties())
    slots: list[dict[str, Any]] = unwrap(slots_reply[0])
    if out.as_json:
        out.json(status_summary(props, slots))
        return 0
    trial = " (trial boot: run `abflasherctl mark-good` once it works)" if props.get("TrialActive") else ""
    out.text(f"booted: slot {props.get('BootedSlot') or '?'}, version {props.get('BootedVersion') or '?'}{trial}")
    out.text(f"state:  {props.get('State', '?')}")
    if props.get("LastError"):
        out.text(f"last error: {props['LastError']}")
    if props.get("AutoUpdate"):
        out.text(f"auto-update: {props['AutoUpdate']}")
    headers = ("SLOT", "ROLE", "VERSION", "STATE", "BOOTED", "PRIMARY", "SIZE", "DEVICE")
    rows = [
        (
            str(slot.get("name", "")),
            str(slot.get("role", "")),
            str(slot.get("version", "")) or "-",
            str(slot.get("state", "")),
            "yes" if slot.get("booted") else "",
            "yes" if slot.get("primary") else "",
            human_bytes(int(slot.get("size", 0))),
            str(slot.get("device", "")),
        )
        for slot in slots
    ]
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    out.text("")
    for row in [headers, *rows]:
        out.text("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _update_options(args: argparse.Namespace, *, from_file: bool) -> dict[str, Variant]:
    options: dict[str, Variant] = {}
    if args.sha256:
        options["sha256"] = Variant("s", args.sha256)
    if args.allow_downgrade:
        options["allow-downgrade"] = Variant("b", True)
    if args.reboot:
        options["reboot"] = Variant("b", True)
    if not from_file and args.url:
        options["url"] = Variant("s", args.url)
    if not from_file and getattr(args, "store", None):
        options["store"] = Variant("s", args.store)
    return options


def _open_image(path: str) -> tuple[int, bool]:
    """An fd for the image (the caller's own permissions apply); whether we opened it (so must close it)."""
    if path == "-":
        return sys.stdin.fileno(), False
    fd = open_image_file(path)
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise errors.InvalidArgument(f"{path} is a directory; give the image file")
    return fd, True


async def cmd_update(client: ServiceClient, args: argparse.Namespace, out: Output,
                     interrupted: asyncio.Event) -> int:
    if args.file and args.url:
        raise errors.InvalidArgument("--url and --file exclude each other")
    events = await client.subscribe()
    if args.file:
        fd, opened = _open_image(args.file)
        try:
            options = _update_options(args, from_file=True)
            if args.version:
                options["version"] = Variant("s", args.version)
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                options["size"] = Variant("t", max(0, st.st_size - os.lseek(fd, 0, os.SEEK_CUR)))
            (job,) = await client.call("UpdateFromFd", "ha{sv}", [0, options], fds=[fd], mutating=True)
        finally:
            if opened:
                os.close(fd)
    else:
        # No version: the channel's newest.
        (job,) = await client.call("Update", "sa{sv}", [args.version or "", _update_options(args, from_file=False)],
                                   mutating=True)
    out.json({"event": "job", "job": job})
    if args.detach:
        out.text(f"started update job {job}; `abflasherctl watch` shows its progress")
        return 0
    out.text(f"update job {job} started")
    return await follow_job(client, events, str(job), out, cancel_on_interrupt=True, interrupted=interrupted)


async def cmd_watch(client: ServiceClient, args: argparse.Namespace, out: Output, interrupted: asyncio.Event) -> int:
    events = await client.subscribe()
    props = await client.properties()
    state = str(props.get("State", ""))
    if state not in RUNNING_STATES:
        out.json({"event": "idle", "state": state, "last_error": props.get("LastError", "")})
        out.text(f"no update is running (state: {state})")
        if props.get("LastError"):
            out.text(f"last error: {props['LastError']}")
        return 0
    return await follow_job(client, events, None, out, cancel_on_interrupt=False, interrupted=interrupted)


async def cmd_check(client: ServiceClient, args: argparse.Namespace, out: Output) -> int:
    (result,) = await client.call("Check")
    values = unwrap(result)
    current, available = values.get("current", ""), values.get("available", "")
    update_available = bool(values.get("update-available", False))
    release = {key.replace("-", "_"): value for key, value in values.items()
               if key not in ("current", "available", "update-available")}
    out.json({"current": current, "available": available, "update_available": update_available, **release})
    if update_available:
        out.text(f"update available: {available} (running {current}); install it: abflasherctl update {available}")
    else:
        out.text(f"up to date: running {current}" + (f" (newest is {available})" if available else ""))
    if release:
        out.text(f"signed by: {release.get('signer', '')}")
        out.text(f"for: {release.get('compatible', '')}; image {human_bytes(int(release.get('size', 0)))}, "
                 f"download {human_bytes(int(release.get('download_size', 0)))}")
        notes = str(release.get("release_notes", "")).strip()
        if notes:
            out.text("release notes:")
            for line in notes.splitlines():
                out.text(f"  {line}")
    return 0


async def cmd_simple(client: ServiceClient, args: argparse.Namespace, out: Output) -> int:
    """cancel, reboot, mark-good, mark-bad, rollback."""
    command = args.command
    if command == "cancel":
        await client.call("Cancel", "s", [args.job or ""], mutating=True)
        message = f"cancelled job {args.job}" if args.job else "cancelled the running update"
        message += "; its target slot is left marked incomplete"
    elif command == "reboot":
        await client.call("Reboot", "s", [args.mode], mutating=True)
        message = {"normal": "rebooting", "trial": "rebooting into the new slot once (a failed boot returns here)",
                   "recovery": "rebooting into the recovery (update mode) slot"}[args.mode]
    else:
        member = {"mark-good": "MarkGood", "mark-bad": "MarkBad", "rollback": "Rollback"}[command]
        await client.call(member, mutating=True)
        message = {
            "mark-good": "the booted slot is now the committed one",
            "mark-bad": "the booted slot was rejected; the next boot returns to the committed slot",
            "rollback": "the other slot is now primary; it boots next time",
        }[command]
    out.json({"ok": True, "command": command, "message": message})
    out.text(message)
    return 0


MUTATING_COMMANDS = frozenset({"update", "cancel", "reboot", "mark-good", "mark-bad", "rollback"})


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON (one object, or one per line while following an update)")
    common.add_argument("--no-ask-password", action="store_true", default=argparse.SUPPRESS,
                        help="never ask for a password (no polkit agent)")
    parser = argparse.ArgumentParser(
        prog="abflasherctl", parents=[common],
        description="Control ab-flasher, the A/B update service: see the slots, install updates, manage booting.",
    )
    parser.add_argument("--version", action="version", version=f"abflasherctl {__version__}")
    parser.add_argument("--session", action="store_true", help="use the session bus (development)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("status", parents=[common], help="show the slots and what the service is doing")
    update = commands.add_parser(
        "update", parents=[common], help="install a version (or an image file) into the other slot",
        description="Install VERSION (from the configured channel, or --url) or the image --file into the slot that "
        "is not running, verify it and arm a trial boot. Follows the progress until done; Ctrl-C cancels.",
    )
    update.add_argument("version", metavar="VERSION", nargs="?",
                        help="version to install, e.g. 1.4.0 (default: the channel's newest)")
    update.add_argument("--file", metavar="IMAGE", help="install this image file ('-' reads standard input)")
    update.add_argument("--url", help="download the image from this http(s) URL")
    update.add_argument("--store", help="a delta update's chunk store (with --url naming a .caibx casync index)")
    update.add_argument("--sha256", metavar="HEX", help="expected sha256 of the image")
    update.add_argument("--reboot", action="store_true", help="reboot into the trial when done")
    update.add_argument("--allow-downgrade", action="store_true", help="allow installing an older version")
    update.add_argument("--detach", action="store_true", help="start the update and return at once")
    commands.add_parser("check", parents=[common], help="ask the update channel whether a newer version exists")
    info = commands.add_parser("info", parents=[common], help="inspect a bundle without installing it",
                               description="Show a bundle's version, compatible string, sizes and whether its "
                               "signature is trusted, without reading its image or asking the service.")
    info.add_argument("bundle", metavar="FILE", help="the bundle (.bundle.tar)")
    info.add_argument("--keys", metavar="ALLOWED_SIGNERS", default="/etc/ab-flasher/allowed_signers",
                      help="trusted keys to check the signature against (default: the device's)")
    commands.add_parser("watch", parents=[common], help="follow the running update until it completes")
    cancel = commands.add_parser("cancel", parents=[common], help="stop the running update")
    cancel.add_argument("job", nargs="?", default="", help="job id (default: the running one)")
    reboot = commands.add_parser("reboot", parents=[common], help="reboot: normal, trial (try the new slot) or "
                                 "recovery (update mode)")
    reboot.add_argument("mode", nargs="?", default="normal", choices=REBOOT_MODES)
    commands.add_parser("mark-good", parents=[common], help="commit the booted trial slot")
    commands.add_parser("mark-bad", parents=[common], help="reject the booted trial slot")
    commands.add_parser("rollback", parents=[common], help="make the other good slot primary")
    return parser


def cmd_info(args: argparse.Namespace) -> int:
    from abflasher.trust.commands import inspect_bundle, print_info

    print_info(inspect_bundle(args.bundle, args.keys), args.json)
    return 0


async def _run(args: argparse.Namespace, out: Output) -> int:
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    loop.add_signal_handler(signal.SIGTERM, interrupted.set)
    client = await ServiceClient.connect(session=args.session)
    agent = PolkitAgent()
    try:
        if args.command in MUTATING_COMMANDS and not args.no_ask_password and sys.stdin.isatty():
            client.interactive = agent.start()
        if args.command == "status":
            return await cmd_status(client, args, out)
        if args.command == "update":
            return await cmd_update(client, args, out, interrupted)
        if args.command == "watch":
            return await cmd_watch(client, args, out, interrupted)
        if args.command == "check":
            return await cmd_check(client, args, out)
        return await _interruptible(cmd_simple(client, args, out), interrupted)
    finally:
        agent.stop()
        client.close()


async def _interruptible(coro: Any, interrupted: asyncio.Event) -> int:
    task = asyncio.ensure_future(coro)
    waiter = asyncio.ensure_future(interrupted.wait())
    done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task in done:
        result: int = task.result()
        return result
    task.cancel()
    raise Interrupted("interrupted")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    args.no_ask_password = getattr(args, "no_ask_password", False)
    out = Output(sys.stdout, as_json=args.json)
    try:
        if args.command == "info":
            return cmd_info(args)
        return asyncio.run(_run(args, out))
    except errors.AbFlasherError as exc:
        message = str(exc) or exc.name
        out.json({"event": "error", "error": exc.name, "message": message})
        print(f"abflasherctl: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("abflasherctl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (abflasherctl status | head): stop quietly, and keep the interpreter's final flush
        # from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # a bug here: still one line, with what a bug report needs
        print(f"abflasherctl: unexpected error ({type(exc).__name__}: {exc}); please report it", file=sys.stderr)
        return errors.Internal.exit_code


if __name__ == "__main__":
    sys.exit(main())
