"""``ab-flasher-web``: serve the upload page (docs/web-api.md).

``ab-flasher-web [--config PATH]`` serves until SIGTERM; ``--check-enabled`` only says (exit status 0 or 1) whether
the configuration lets it serve now (the systemd unit's ExecCondition); ``--hash-password`` reads a password and
prints the ``password_hash`` line for web.conf.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence

from abflasher import __version__, errors
from abflasher.ctl_client import unwrap
from abflasher.web.servicelink import ServiceLink
from abflasher.web.settings import DEFAULT_PATH, WebConfig, hash_password, load_web_config

#: How long SIGTERM waits for reboot requests in progress to get their answer (the service answers within seconds).
REBOOT_ANSWER_TIMEOUT = 30.0

log = logging.getLogger("abflasher.web")


async def booted_role(link: ServiceLink) -> str:
    (slots,) = await link.client.call("GetSlots")
    return next((str(s.get("role", "")) for s in unwrap(slots) if s.get("booted")), "")


async def enabled_reason(config: WebConfig, link: ServiceLink | None) -> tuple[bool, str]:
    if config.enabled == "yes":
        return True, "enabled = yes"
    if config.enabled == "no":
        return False, "enabled = no"
    if link is None:
        link = await ServiceLink.connect()
        try:
            role = await booted_role(link)
        finally:
            link.close()
    else:
        role = await booted_role(link)
    if role == "recovery":
        return True, "the booted slot is the recovery system (update mode)"
    return False, "enabled = auto and the booted slot is not the recovery system"


async def serve(config: WebConfig) -> int:
    # Imported only to serve: `--check-enabled` runs on every boot (the unit's ExecCondition), and importing aiohttp
    # took 6 s of a Pi-class boot for a page that is off outside update mode.
    from aiohttp import web

    from abflasher.web.app import CHUNK, answer_reboots, make_app
    from abflasher.web.uploads import Uploads

    link = await ServiceLink.connect()
    try:
        enabled, why = await enabled_reason(config, link)
        if not enabled:
            log.info("not serving: %s (set enabled = yes in web.conf to serve anyway)", why)
            return 0
        if config.login_required and not config.password_hash:
            log.warning("no password_hash in web.conf: nobody can log in until one is set "
                        "(ab-flasher-web --hash-password prints one)")
        if not config.login_required:
            log.warning("login_required = no: anyone who reaches the page may install an image")
        app = make_app(config, link)

        async def cancel_upload(app: web.Application) -> None:
            uploads: Uploads = app["uploads"]
            upload = uploads.current
            if upload is not None and not upload.ended:
                log.info("stopping: cancelling the upload's update job %s", upload.job)
                try:
                    await asyncio.wait_for(uploads.cancel(upload), 30)
                except (TimeoutError, errors.AbFlasherError) as exc:
                    log.warning("could not cancel job %s: %s", upload.job, exc)

        app.on_shutdown.append(cancel_upload)
        ssl_context = None
        if config.tls:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(config.tls_certificate, config.tls_key)
        # read_bufsize: aiohttp stops reading the socket once twice this much of a body waits to be read; one chunk
        # of it is what the upload handlers take at a time.
        runner = web.AppRunner(app, access_log=None, handle_signals=False, read_bufsize=CHUNK)
        await runner.setup()
        site = web.TCPSite(runner, config.listen_address, config.port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:
            log.error("cannot listen on %s port %d: %s", config.listen_address, config.port, exc.strerror)
            await runner.cleanup()
            return 1
        scheme = "https" if ssl_context else "http"
        log.info("ab-flasher-web %s serving %s://%s:%d/", __version__, scheme, config.listen_address, config.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("stopping on signal")
        await answer_reboots(app, REBOOT_ANSWER_TIMEOUT)
        await runner.cleanup()
        return 0
    finally:
        link.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ab-flasher-web", description="Serve ab-flasher's upload page.")
    parser.add_argument("--version", action="version", version=f"ab-flasher-web {__version__}")
    parser.add_argument("--config", default=DEFAULT_PATH, metavar="PATH", help=f"configuration file ({DEFAULT_PATH})")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--check-enabled", action="store_true",
                        help="exit 0 when the configuration lets the page serve now, 1 when not")
    action.add_argument("--hash-password", action="store_true",
                        help="read a password (standard input, or a prompt) and print its password_hash line")
    parser.add_argument("--debug", action="store_true", help="log debug messages")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    fmt = "%(levelname)s %(name)s: %(message)s"
    if "JOURNAL_STREAM" not in os.environ:
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format=fmt, stream=sys.stderr)
    if args.hash_password:
        if sys.stdin.isatty():
            password = getpass.getpass("password: ")
            if getpass.getpass("again: ") != password:
                print("ab-flasher-web: the passwords differ", file=sys.stderr)
                return 2
        else:
            password = sys.stdin.readline().rstrip("\n")
        if not password:
            print("ab-flasher-web: the password is empty", file=sys.stderr)
            return 2
        print(f"password_hash = {hash_password(password)}")
        return 0
    try:
        config = load_web_config(args.config)
        if args.check_enabled:
            enabled, why = asyncio.run(enabled_reason(config, None))
            print(f"ab-flasher-web: {'enabled' if enabled else 'disabled'}: {why}", file=sys.stderr)
            return 0 if enabled else 1
        return asyncio.run(serve(config))
    except errors.AbFlasherError as exc:
        log.error("%s", exc)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
