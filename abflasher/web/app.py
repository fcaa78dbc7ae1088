"""The upload page's HTTP application: the page, its JSON API (status, session, upload, events, reboot) and the
tus 1.0 resumable uploads (docs/web-api.md)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from importlib import resources
from typing import Any

from aiohttp import ClientPayloadError, HttpVersion11, web

from abflasher import __version__, decisions, errors
from abflasher.ctl_client import ServiceUnavailable, status_summary, unwrap
from abflasher.image.checksums import normalize_sha256
from abflasher.service.contract import REBOOT_MODES
from abflasher.web.security import CSRF_HEADER, Guard, json_error
from abflasher.web.servicelink import ServiceLink
from abflasher.web.settings import WebConfig
from abflasher.web.uploads import Upload, UploadError, Uploads

log = logging.getLogger(__name__)

TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = "creation,termination"
TUS_CONTENT_TYPE = "application/offset+octet-stream"
#: Request body chunks: small enough to keep memory flat, big enough to keep the loop's overhead low.
CHUNK = 256 * 1024

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

_ERROR_STATUS: dict[type[errors.AbFlasherError], int] = {
    errors.InvalidArgument: 400,
    errors.NotAuthorized: 403,
    errors.Busy: 409,
    errors.Incompatible: 409,
    errors.TooLarge: 413,
    ServiceUnavailable: 503,
}

def _state(request: web.Request) -> tuple[ServiceLink, Uploads, Guard]:
    app = request.app
    return app["link"], app["uploads"], app["guard"]


# ---------------------------------------------------------------------------------------------------------------------
# Status


def target_slot(slots: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The slot an upload would be written to (for the size cap and the page), chosen by the engine's own rule
    (`decisions.system_target`) from the slots the service reports; None when there is none."""
    return _target_and_refusal(slots)[0]


def _target_and_refusal(slots: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str]:
    booted = next((str(s["name"]) for s in slots if s.get("booted")), "")
    primary = next((str(s["name"]) for s in slots if s.get("primary")), "")
    views = tuple(decisions.SlotView(str(s["name"]), str(s.get("role") or decisions.SYSTEM)) for s in slots)
    try:
        name = decisions.system_target(decisions.Snapshot(views, booted, primary, None, ""))
    except errors.Busy as exc:
        return None, str(exc)
    return next(s for s in slots if s["name"] == name), ""


async def status_json(link: ServiceLink, uploads: Uploads) -> dict[str, Any]:
    status = await link.status()
    props = status["properties"]
    slots = status["slots"]
    target, refusal = _target_and_refusal(slots)
    booted = next((s for s in slots if s.get("booted")), None)
    upload = uploads.current
    return {
        **status_summary(props, slots),
        "version": __version__,
        "recovery": bool(booted and booted.get("role") == "recovery"),
        "slots": [
            {key: slot.get(key) for key in ("name", "role", "version", "booted", "primary", "state", "size", "device")}
            for slot in slots
        ],
        "target": {"slot": target["name"], "size": int(target["size"])} if target else None,
        "target_refusal": refusal,
        "upload": upload.as_json() if upload is not None else None,
    }


async def upload_limit(link: ServiceLink) -> int:
    """The largest upload accepted: the target slot's size."""
    (slots,) = await link.client.call("GetSlots")
    target, refusal = _target_and_refusal(unwrap(slots))
    if target is None:
        raise UploadError(409, f"there is no slot to install into: {refusal}")
    return int(target["size"])


# ---------------------------------------------------------------------------------------------------------------------
# Handlers: page, session, status, events, reboot


async def index(request: web.Request) -> web.StreamResponse:
    return web.Response(body=_asset("index.html"), content_type="text/html", charset="utf-8")


def _asset(name: str) -> bytes:
    return resources.files("abflasher.web").joinpath("static", name).read_bytes()


async def static_asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    kind = next((t for ext, t in types.items() if name.endswith(ext)), None)
    if kind is None or "/" in name or name.startswith("."):
        raise web.HTTPNotFound()
    try:
        body = _asset(name)
    except FileNotFoundError:
        raise web.HTTPNotFound() from None
    return web.Response(body=body, content_type=kind, headers={"Cache-Control": "no-cache"})


async def get_session(request: web.Request) -> web.StreamResponse:
    _link, _uploads, guard = _state(request)
    session = guard.session_of(request)
    cookie = None
    if session is None and not guard.config.login_required:
        cookie, session = guard.new_session()
    response = web.json_response({
        "login_required": guard.config.login_required,
        "password_set": bool(guard.config.password_hash),
        "authenticated": session is not None,
        "csrf_token": session.csrf_token if session else None,
        "csrf_header": CSRF_HEADER,
    })
    if cookie is not None:
        guard.set_cookie(response, cookie)
    return response


async def login(request: web.Request) -> web.StreamResponse:
    _link, _uploads, guard = _state(request)
    try:
        body = await request.json()
        password = str(body["password"])
    except (ValueError, KeyError, TypeError):
        return json_error(400, 'send {"password": "..."} as JSON')
    if not guard.config.password_hash and guard.config.login_required:
        return json_error(401, "no password is set: set password_hash in /etc/ab-flasher/web.conf "
                               "(ab-flasher-web --hash-password prints one)", login=True)
    if not await guard.check_password(password):
        log.warning("login refused (wrong password) from %s", request.remote)
        return json_error(401, "wrong password", login=True)
    cookie, session = guard.new_session()
    response = web.json_response({"authenticated": True, "csrf_token": session.csrf_token,
                                  "csrf_header": CSRF_HEADER})
    guard.set_cookie(response, cookie)
    log.info("login from %s", request.remote)
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    _link, _uploads, guard = _state(request)
    response = web.json_response({"authenticated": False})
    guard.end_session(request, response)
    return response


async def get_status(request: web.Request) -> web.StreamResponse:
    link, uploads, _guard = _state(request)
    return web.json_response(await status_json(link, uploads), headers={"Cache-Control": "no-store"})


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the status now, then upload progress and the service's Progress/Completed signals."""
    link, uploads, _guard = _state(request)
    queue = link.subscribe()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    try:
        await response.prepare(request)
        await _send_event(response, {"event": "status", **await status_json(link, uploads)})
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), 15)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            await _send_event(response, event)
            if event["event"] in ("completed", "service-stopped"):
                await _send_event(response, {"event": "status", **await status_json(link, uploads)})
    except ConnectionResetError:
        pass  # the reader went away
    finally:
        link.unsubscribe(queue)
    return response


async def _send_event(response: web.StreamResponse, event: dict[str, Any]) -> None:
    await response.write(f"event: {event['event']}\ndata: {json.dumps(event)}\n\n".encode())


async def reboot(request: web.Request) -> web.StreamResponse:
    link, _uploads, _guard = _state(request)
    try:
        body = await request.json()
        mode = str(body.get("mode", "normal"))
    except (ValueError, AttributeError):
        return json_error(400, 'send {"mode": "trial"} as JSON; modes: ' + ", ".join(REBOOT_MODES))
    if mode not in REBOOT_MODES:
        return json_error(400, f"unknown reboot mode {mode!r}; use one of: {', '.join(REBOOT_MODES)}")
    answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    request.app["reboots"].add(answered)
    try:
        await link.reboot(mode)
        log.info("reboot (%s) requested from %s", mode, request.remote)
        # Sent before the handler returns: the reboot stops this page too (SIGTERM), and the answer must be out.
        response = web.json_response({"rebooting": mode})
        _add_security_headers(response)
        await response.prepare(request)
        await response.write_eof()
        return response
    finally:
        request.app["reboots"].discard(answered)
        answered.set_result(None)


async def answer_reboots(app: web.Application, timeout: float) -> None:
    """On SIGTERM, before the server closes its connections: let the reboot requests in progress get their answer
    (the reboot they asked for is what stops the page)."""
    pending = list(app["reboots"])
    if pending:
        await asyncio.wait(pending, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------------------
# Uploads


def _sha256_option(value: str) -> str:
    return normalize_sha256(value) if value.strip() else ""


async def _no_automatic_continue(request: web.Request) -> None:
    """aiohttp answers ``Expect: 100-continue`` before the handler runs; the upload handlers answer it themselves
    (:func:`_chunks`), once the request has passed the checks, so a refused upload's body is never sent."""


class ClientGone(Exception):
    """The request's connection dropped before its body ended: not the end of the image."""


async def _chunks(request: web.Request) -> Any:
    if request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    while True:
        try:
            chunk = await request.content.read(CHUNK)
        except (ConnectionError, ClientPayloadError) as exc:
            raise ClientGone(str(exc)) from exc
        if not chunk:
            return
        yield chunk


async def put_upload(request: web.Request) -> web.StreamResponse:
    """PUT /api/upload: the whole image in one request (``curl -T image.img.gz``); answers when the job ends."""
    link, uploads, _guard = _state(request)
    limit = await upload_limit(link)
    length = request.content_length
    if length is not None and length > limit:
        return json_error(413, f"the image ({length} bytes) is larger than the target slot ({limit} bytes)")
    sha256 = _sha256_option(request.query.get("sha256", ""))
    upload = uploads.create(length=length, sha256=sha256, filename=request.query.get("filename", ""))
    try:
        await upload.receive(_chunks(request), limit=limit)
        if length is not None and upload.offset != length:
            raise UploadError(400, f"the upload ended after {upload.offset} of {length} bytes")
        await upload.finish()
    except UploadError as exc:
        await _cancel_soon(uploads, upload)
        return json_error(exc.status, str(exc), upload=upload.as_json())
    except (ClientGone, asyncio.CancelledError) as exc:
        # The client went away: nobody can continue a plain PUT, so the job is cancelled (and its bytes so far are
        # never taken for a whole image).
        log.info("upload %s: the client went away after %d bytes; cancelling its job", upload.id, upload.offset)
        await _cancel_soon(uploads, upload)
        if isinstance(exc, ClientGone):
            raise web.HTTPBadRequest() from None  # nobody to answer
        raise
    except BaseException:
        await _cancel_soon(uploads, upload)
        raise
    result = await upload.wait_result()
    body = {"upload": upload.as_json(), **result.as_json()}
    return web.json_response(body, status=200 if result.success else 422)


async def _cancel_soon(uploads: Uploads, upload: Upload) -> None:
    """Cancel the job in a task of its own: it must happen even when the request's task is being cancelled."""
    task = asyncio.ensure_future(uploads.cancel(upload))
    with contextlib.suppress(BaseException):
        await asyncio.shield(task)


def _tus_headers(**extra: str) -> dict[str, str]:
    return {"Tus-Resumable": TUS_VERSION, "Cache-Control": "no-store", **extra}


def _tus_error(status: int, message: str) -> web.Response:
    response = json_error(status, message)
    response.headers.update(_tus_headers())
    return response


async def tus_options(request: web.Request) -> web.StreamResponse:
    link, _uploads, _guard = _state(request)
    headers = _tus_headers(**{"Tus-Version": TUS_VERSION, "Tus-Extension": TUS_EXTENSIONS})
    with contextlib.suppress(errors.AbFlasherError, UploadError):
        headers["Tus-Max-Size"] = str(await upload_limit(link))
    return web.Response(status=204, headers=headers)


def _metadata(header: str) -> dict[str, str]:
    """tus Upload-Metadata: comma-separated ``key base64value`` pairs."""
    values = {}
    for pair in filter(None, (p.strip() for p in header.split(","))):
        key, _, encoded = pair.partition(" ")
        try:
            values[key] = base64.b64decode(encoded.strip(), validate=True).decode() if encoded else ""
        except (binascii.Error, UnicodeDecodeError):
            raise UploadError(400, f"Upload-Metadata: the value of {key!r} is not base64 text") from None
    return values


def _check_tus_version(request: web.Request) -> web.Response | None:
    if request.headers.get("Tus-Resumable") != TUS_VERSION:
        response = _tus_error(412, f"this server speaks tus {TUS_VERSION}: send Tus-Resumable: {TUS_VERSION}")
        response.headers["Tus-Version"] = TUS_VERSION
        return response
    return None


async def tus_create(request: web.Request) -> web.StreamResponse:
    """POST /api/uploads (tus creation): starts the job; the bytes follow with PATCH."""
    link, uploads, _guard = _state(request)
    if (refused := _check_tus_version(request)) is not None:
        return refused
    raw_length = request.headers.get("Upload-Length", "")
    if not raw_length.isdigit():
        return _tus_error(400, "send Upload-Length: the image's size in bytes (deferred lengths are not supported)")
    length = int(raw_length)
    limit = await upload_limit(link)
    if length > limit:
        return _tus_error(413, f"the image ({length} bytes) is larger than the target slot ({limit} bytes)")
    metadata = _metadata(request.headers.get("Upload-Metadata", ""))
    sha256 = _sha256_option(metadata.get("sha256", ""))
    upload = uploads.create(length=length, sha256=sha256, filename=metadata.get("filename", ""))
    location = f"/api/uploads/{upload.id}"
    return web.json_response({"upload": upload.as_json(), "location": location}, status=201,
                             headers=_tus_headers(Location=location, **{"Upload-Offset": "0"}))


def _find(request: web.Request) -> Upload:
    _link, uploads, _guard = _state(request)
    upload = uploads.get(request.match_info["upload_id"])
    if upload is None:
        raise UploadError(404, "no such upload (it ended, or the page's service restarted); start it again")
    return upload


async def tus_head(request: web.Request) -> web.StreamResponse:
    upload = _find(request)
    if upload.ended:
        error = upload.ended_error()
        return _tus_error(410 if error.status == 410 else 404, str(error))
    headers = _tus_headers(**{"Upload-Offset": str(upload.offset)})
    if upload.length is not None:
        headers["Upload-Length"] = str(upload.length)
    return web.Response(status=200, headers=headers)


async def tus_patch(request: web.Request) -> web.StreamResponse:
    """PATCH /api/uploads/{id}: bytes from Upload-Offset on. A dropped connection leaves the upload waiting."""
    if (refused := _check_tus_version(request)) is not None:
        return refused
    upload = _find(request)
    if request.content_type != TUS_CONTENT_TYPE:
        return _tus_error(415, f"send the bytes with Content-Type: {TUS_CONTENT_TYPE}")
    raw_offset = request.headers.get("Upload-Offset", "")
    if not raw_offset.isdigit():
        return _tus_error(400, "send Upload-Offset: where these bytes start")
    if upload.ended:
        error = upload.ended_error()
        return _tus_error(error.status, str(error))
    if int(raw_offset) != upload.offset:
        return _tus_error(409, f"Upload-Offset {raw_offset} does not match the {upload.offset} bytes received; "
                               "ask with HEAD and continue from there")
    try:
        await upload.receive(_chunks(request), limit=upload.length)
    except ClientGone:
        # Nobody to answer: the upload waits, paused, for the client to come back (HEAD, then PATCH).
        log.info("upload %s: the connection dropped at byte %d; waiting for the client", upload.id, upload.offset)
        raise web.HTTPBadRequest() from None
    if upload.length is not None and upload.offset == upload.length:
        await upload.finish()
    return web.Response(status=204, headers=_tus_headers(**{"Upload-Offset": str(upload.offset)}))


async def tus_delete(request: web.Request) -> web.StreamResponse:
    """DELETE /api/uploads/{id} (tus termination): cancels the job."""
    _link, uploads, _guard = _state(request)
    upload = _find(request)
    await uploads.cancel(upload)
    return web.Response(status=204, headers=_tus_headers())


# ---------------------------------------------------------------------------------------------------------------------
# The application


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except UploadError as exc:
        return json_error(exc.status, str(exc))
    except errors.AbFlasherError as exc:
        status = next((code for cls, code in _ERROR_STATUS.items() if isinstance(exc, cls)), 500)
        return json_error(status, str(exc) or exc.name, error_name=exc.name)
    return response


@web.middleware
async def headers_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    response: web.StreamResponse = await handler(request)
    if not response.prepared:  # else it was sent already (with them: see reboot)
        _add_security_headers(response)
    return response


def _add_security_headers(response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def make_app(config: WebConfig, link: ServiceLink) -> web.Application:
    guard = Guard(config)

    @web.middleware
    async def guard_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        return await guard.check(request, handler)

    # Uploads are streamed, never buffered: aiohttp's client_max_size only applies to read()/post()/json().
    app = web.Application(middlewares=[headers_middleware, guard_middleware, error_middleware],
                          client_max_size=64 * 1024)
    app["link"] = link
    app["uploads"] = Uploads(link)
    app["guard"] = guard
    app["reboots"] = set()
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static_asset)
    app.router.add_get("/api/session", get_session)
    app.router.add_post("/api/login", login)
    app.router.add_post("/api/logout", logout)
    app.router.add_get("/api/status", get_status)
    app.router.add_get("/api/events", events)
    app.router.add_post("/api/reboot", reboot)
    app.router.add_put("/api/upload", put_upload, expect_handler=_no_automatic_continue)
    app.router.add_route("OPTIONS", "/api/uploads", tus_options)
    app.router.add_post("/api/uploads", tus_create)
    app.router.add_route("HEAD", "/api/uploads/{upload_id}", tus_head)
    app.router.add_route("PATCH", "/api/uploads/{upload_id}", tus_patch, expect_handler=_no_automatic_continue)
    app.router.add_delete("/api/uploads/{upload_id}", tus_delete)
    return app
