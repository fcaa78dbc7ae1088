"""org.abflasher.Updater1 on the bus: a thin adapter between D-Bus and the engine (:mod:`abflasher.updater`).

Everything that may block (the engine reading slots, validating a request, streaming an image, asking the update
channel) runs in threads; the event loop only moves messages, so the service keeps answering while it installs. One
update job or boot operation runs at a time; a second mutating request gets Busy. Every mutating method asks polkit
first (:mod:`abflasher.service.auth`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import inspect
import logging
import os
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import MessageType, PropertyAccess
from dbus_next.errors import DBusError
from dbus_next.message import Message
from dbus_next.service import ServiceInterface, dbus_property, method, signal
from dbus_next.signature import Variant

from abflasher import errors
from abflasher.image.pipeline import Progress
from abflasher.service.auth import (
    ACTION_DOWNGRADE,
    ACTION_MANAGE_BOOT,
    ACTION_UPDATE,
    ACTION_UPDATE_FROM_SOURCE,
    Authorizer,
    current_caller,
    record_caller,
)
from abflasher.updater import (
    CheckResult,
    PreparedUpdate,
    ProgressCallback,
    SlotStatus,
    SystemStatus,
    UpdateOutcome,
    UpdateRequest,
)

log = logging.getLogger(__name__)

BUS_NAME = "org.abflasher.Updater"
OBJECT_PATH = "/org/abflasher/Updater"
INTERFACE_NAME = "org.abflasher.Updater1"

STATES = ("idle", "preparing", "downloading", "writing", "verifying", "configuring", "ready-to-reboot", "failed")
#: Engine progress stages that are also service states (the others only show in the Progress property/signal).
_STAGE_STATES = frozenset({"preparing", "downloading", "writing", "verifying", "configuring"})
REBOOT_MODES = ("normal", "trial", "recovery")
PROGRESS_INTERVAL = 0.1
#: How long a Cancel waits for the job to end before it says the job is still stopping.
CANCEL_TIMEOUT = 30.0
#: An update channel's answer (or failure) is reused for this long: Check() needs no authorization, and a flood of
#: calls must not become a flood of threads and requests in a root process.
CHECK_INTERVAL = 10.0
PROPERTIES_INTERFACE = "org.freedesktop.DBus.Properties"
_STANDARD_INTERFACES = frozenset(
    {PROPERTIES_INTERFACE, "org.freedesktop.DBus.Introspectable", "org.freedesktop.DBus.Peer"}
)
INTERNAL_ERROR_MESSAGE = "internal error in the ab-flasher service; its log (journalctl -u ab-flasher) has the details"

_INTEGER_SIGNATURES = frozenset("yqutnix")
#: Options of Update; type "t" accepts any unsigned-looking D-Bus integer.
UPDATE_OPTIONS: Mapping[str, str] = {
    "url": "s",
    "sha256": "s",
    "allow-downgrade": "b",
    "reboot": "b",
    "interactive": "b",
}
#: Options of UpdateFromFd: the fd is the source, so no url; the version is optional (checked against the image).
UPDATE_FROM_FD_OPTIONS: Mapping[str, str] = {
    "sha256": "s",
    "allow-downgrade": "b",
    "reboot": "b",
    "interactive": "b",
    "version": "s",
    "size": "t",
}

_T = TypeVar("_T")
_Fn = TypeVar("_Fn", bound=Callable[..., Any])


class UpdaterEngine(Protocol):
    """What the service needs from :class:`abflasher.updater.Updater` (tests pass a fake)."""

    def status(self) -> SystemStatus: ...

    def prepare(self, request: UpdateRequest) -> PreparedUpdate: ...

    def run(self, prepared: PreparedUpdate, progress: ProgressCallback, cancel: threading.Event) -> UpdateOutcome: ...

    def check(self) -> CheckResult: ...

    def mark_good(self) -> None: ...

    def mark_bad(self) -> None: ...

    def rollback(self) -> None: ...

    def reboot(self, mode: str) -> None: ...


# ---------------------------------------------------------------------------------------------------------------------
# dbus-next reads D-Bus types from annotations; these decorators give it an explicit signature instead, so the Python
# annotations stay real types that mypy checks.


def dbus_error(name: str, text: str) -> DBusError:
    return DBusError(name, text)  # type: ignore[no-untyped-call]  # dbus-next does not annotate it


def quiet_sent_dbus_errors(loop: asyncio.AbstractEventLoop) -> None:
    """dbus-next sends a method's DBusError to the caller and then lets it escape into the event loop, which would log
    a traceback for every refused call; drop those (the caller got the error; the service logged what mattered)."""
    previous = loop.get_exception_handler()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if isinstance(context.get("exception"), DBusError):
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)


def _with_dbus_types(fn: Callable[..., Any], arg_types: tuple[str, ...], returns: str) -> inspect.Signature:
    signature = inspect.signature(fn)
    self_param, *params = signature.parameters.values()
    if len(params) != len(arg_types):
        raise TypeError(f"{fn.__name__}: {len(params)} parameters but {len(arg_types)} D-Bus types")
    typed = [self_param, *(param.replace(annotation=t) for param, t in zip(params, arg_types, strict=True))]
    return signature.replace(parameters=typed, return_annotation=returns or inspect.Signature.empty)


def _name_args(member: Any, attribute: str, args_attribute: str, names: tuple[str, ...]) -> None:
    """Give introspection names to arguments dbus-next leaves unnamed (return values, signal arguments)."""
    args = [arg for arg in getattr(member.__dict__[attribute].introspection, args_attribute)]
    if names and len(names) != len(args):
        raise TypeError(f"{len(names)} names for {len(args)} arguments")
    for arg, name in zip(args, names, strict=False):
        arg.name = name


def _dbus_method(*arg_types: str, returns: str = "", out_names: tuple[str, ...] = ()) -> Callable[[_Fn], _Fn]:
    """A D-Bus method whose errors reach the caller as the hierarchy's D-Bus names and never as internals."""

    def decorate(fn: _Fn) -> _Fn:
        @functools.wraps(fn)
        async def serve(self: UpdaterInterface, *args: Any) -> Any:
            self._calls_in_progress += 1
            try:
                return await fn(self, *args)
            except DBusError:
                raise
            except errors.AbFlasherError as exc:
                raise dbus_error(exc.dbus_name, str(exc) or exc.name) from None
            except Exception:
                log.exception("%s failed unexpectedly", fn.__name__)
                raise dbus_error(errors.Internal.dbus_error_name(), INTERNAL_ERROR_MESSAGE) from None
            finally:
                self._calls_in_progress -= 1
                self._last_activity = time.monotonic()

        serve.__signature__ = _with_dbus_types(fn, arg_types, returns)  # type: ignore[attr-defined]
        exported = method()(serve)
        _name_args(exported, "__DBUS_METHOD", "out_args", out_names)
        return cast(_Fn, exported)

    return decorate


def _dbus_signal(name: str, signature: str) -> Callable[[_Fn], _Fn]:
    def decorate(fn: _Fn) -> _Fn:
        fn.__signature__ = inspect.signature(fn).replace(return_annotation=signature)  # type: ignore[attr-defined]
        exported = signal(name=name)(fn)
        _name_args(exported, "__DBUS_SIGNAL", "args", tuple(list(inspect.signature(fn).parameters)[1:]))
        return cast(_Fn, exported)

    return decorate


def _dbus_readonly_property(name: str, signature: str) -> Callable[[Callable[[Any], Any]], Any]:
    def decorate(fn: Callable[[Any], Any]) -> Any:
        fn.__signature__ = inspect.signature(fn).replace(return_annotation=signature)  # type: ignore[attr-defined]
        return dbus_property(access=PropertyAccess.READ, name=name)(fn)

    return decorate


# ---------------------------------------------------------------------------------------------------------------------
# Values in and out


def parse_options(options: Mapping[str, Variant], allowed: Mapping[str, str]) -> dict[str, Any]:
    """The plain values of an ``a{sv}`` options dict; unknown keys and wrong types are InvalidArgument."""
    values: dict[str, Any] = {}
    for key, variant in options.items():
        expected = allowed.get(key)
        if expected is None:
            raise errors.InvalidArgument(f"unknown option {key!r}; known options: {', '.join(sorted(allowed))}")
        if expected == "t" and variant.signature in _INTEGER_SIGNATURES:
            if variant.value < 0:
                raise errors.InvalidArgument(f"option {key!r} must not be negative")
        elif variant.signature != expected:
            raise errors.InvalidArgument(
                f"option {key!r} must have D-Bus type {expected!r}, not {variant.signature!r}"
            )
        values[key] = variant.value
    return values


def to_variant(value: Any) -> Variant | None:
    """A Variant for a plain value from the engine (None: leave the key out)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return Variant("b", value)
    if isinstance(value, int):
        return Variant("x", value)
    if isinstance(value, float):
        return Variant("d", value)
    if isinstance(value, str):
        return Variant("s", value)
    if isinstance(value, Mapping):
        return Variant("a{sv}", to_vardict(value))
    if isinstance(value, list | tuple):
        return Variant("av", [v for v in (to_variant(item) for item in value) if v is not None])
    return Variant("s", str(value))


def to_vardict(values: Mapping[str, Any]) -> dict[str, Variant]:
    result: dict[str, Variant] = {}
    for key, value in values.items():
        variant = to_variant(value)
        if variant is not None:
            result[str(key)] = variant
    return result


def slot_to_dbus(slot: SlotStatus) -> dict[str, Variant]:
    return {
        "name": Variant("s", slot.name),
        "role": Variant("s", slot.role),
        "device": Variant("s", slot.device),
        "partuuid": Variant("s", slot.partuuid),
        "size": Variant("t", max(0, slot.size)),
        "version": Variant("s", slot.version),
        "booted": Variant("b", slot.booted),
        "primary": Variant("b", slot.primary),
        "state": Variant("s", slot.state),
        "installed": Variant("a{sv}", to_vardict(slot.installed)),
    }


def adopt_image_fd(received: int) -> int:
    """Take ownership of an fd that arrived with a message: a non-inheritable duplicate, the original closed (so it
    cannot leak into the processes the engine starts). Raises InvalidArgument for anything but a readable regular
    file, pipe or socket."""
    try:
        fd = os.dup(received)
    except OSError as exc:
        raise errors.InvalidArgument(f"the image fd is not usable: {exc.strerror}") from exc
    finally:
        with contextlib.suppress(OSError):
            os.close(received)
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            if stat.S_ISDIR(mode):
                kind = "a directory"
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                kind = "a device"
            else:
                kind = "this kind of file"
            raise errors.InvalidArgument(f"the image fd must be a regular file or a pipe, not {kind}")
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        if flags & os.O_ACCMODE == os.O_WRONLY:
            raise errors.InvalidArgument("the image fd is open for writing only; open the image for reading")
        if flags & os.O_NONBLOCK:
            # The engine reads with plain blocking reads; a pipe handed over in non-blocking mode would fail them.
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def interactive_option(options: Mapping[str, Variant]) -> bool:
    """The ``interactive`` option as it is before the options are validated (which happens after authorization)."""
    value = options.get("interactive")
    return isinstance(value, Variant) and value.signature == "b" and bool(value.value)


def _image_fd_size(fd: int) -> int | None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return None
    return max(0, st.st_size - os.lseek(fd, 0, os.SEEK_CUR))


def release_unused_fds(message: Message) -> None:
    """Bus message handler: close every fd that came with a message, except the image of a well-formed UpdateFromFd
    call (which that method owns). dbus-next never closes received fds, so without this any local user could exhaust
    the root service's fd table by attaching fds to other calls."""
    if not message.unix_fds:
        return
    keep: int | None = None
    if (
        message.message_type == MessageType.METHOD_CALL
        and message.path == OBJECT_PATH
        and message.interface == INTERFACE_NAME
        and message.member == "UpdateFromFd"
        and message.signature == "ha{sv}"
    ):
        index = message.body[0]
        if isinstance(index, int) and 0 <= index < len(message.unix_fds):
            keep = message.unix_fds[index]
    for fd in message.unix_fds:
        if fd != keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def refuse_property_errors(message: Message, property_names: frozenset[str]) -> Message | None:
    """Bus message handler: answer the Properties calls on our object that dbus-next would answer by raising (every
    Set, since all properties are read-only; an unknown interface or property; a wrong signature). dbus-next sends
    the error too, but then logs a traceback for it, so any local user could flood the journal."""
    if (
        message.message_type != MessageType.METHOD_CALL
        or message.path != OBJECT_PATH
        or message.interface != PROPERTIES_INTERFACE
    ):
        return None
    expected = {"Get": "ss", "GetAll": "s", "Set": "ssv"}.get(message.member or "")
    if expected is None:
        return None
    if message.signature != expected:
        return Message.new_error(
            message, "org.freedesktop.DBus.Error.InvalidArgs", f"{message.member} takes arguments of type {expected}"
        )
    interface = message.body[0]
    if interface in _STANDARD_INTERFACES:
        # Interfaces without properties.
        if message.member == "GetAll":
            return Message.new_method_return(message, "a{sv}", [{}])
        return Message.new_error(message, "org.freedesktop.DBus.Error.UnknownProperty", "no such property")
    if interface != INTERFACE_NAME:
        return Message.new_error(message, "org.freedesktop.DBus.Error.UnknownInterface", "no such interface")
    if message.member == "GetAll":
        return None
    if message.body[1] not in property_names:
        return Message.new_error(message, "org.freedesktop.DBus.Error.UnknownProperty", "no such property")
    if message.member == "Set":
        return Message.new_error(
            message, "org.freedesktop.DBus.Error.PropertyReadOnly", f"the properties of {INTERFACE_NAME} are read-only"
        )
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Progress, from a worker thread to the event loop


class ProgressThrottle:
    """Hands progress reports from a worker thread to the event loop, at most one per ``interval`` seconds.

    The engine may report thousands of times a second. The loop gets the newest report when the interval has passed,
    always the last report of each stage (so every stage ends at its final count), and within a stage ``done`` never
    goes down. :meth:`flush` delivers what is left when the job ends.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, emit: Callable[[Progress], None], interval: float = PROGRESS_INTERVAL
    ) -> None:
        self._loop = loop
        self._emit = emit
        self._interval = interval
        self._lock = threading.Lock()
        self._stage_ends: list[Progress] = []
        self._latest: Progress | None = None
        self._wakeup_pending = False
        self._closed = False
        self._last_emit_time = float("-inf")
        self._last_emitted: Progress | None = None

    def report(self, progress: Progress) -> None:
        """Called from any thread."""
        with self._lock:
            if self._closed:
                return
            if self._latest is not None and self._latest.stage != progress.stage:
                self._stage_ends.append(self._latest)
            self._latest = progress
            if self._wakeup_pending:
                return
            self._wakeup_pending = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: the service is exiting
            self._loop.call_soon_threadsafe(self._deliver)

    def flush(self) -> None:
        """Called on the loop: deliver everything still pending and take no more reports."""
        with self._lock:
            self._closed = True
            due = [*self._stage_ends, *([self._latest] if self._latest is not None else [])]
            self._stage_ends.clear()
            self._latest = None
        for progress in due:
            self._send(progress)

    def _deliver(self) -> None:
        with self._lock:
            self._wakeup_pending = False
            due = list(self._stage_ends)
            self._stage_ends.clear()
            wait = self._last_emit_time + self._interval - time.monotonic()
            if self._latest is not None and (wait <= 0 or due):
                due.append(self._latest)
                self._latest = None
            elif self._latest is not None:
                self._wakeup_pending = True
                self._loop.call_later(wait, self._deliver)
        for progress in due:
            self._send(progress)

    def _send(self, progress: Progress) -> None:
        last = self._last_emitted
        if last is not None and last.stage == progress.stage and (progress.done < last.done or progress == last):
            return
        self._last_emitted = progress
        self._last_emit_time = time.monotonic()
        self._emit(progress)


def progress_tuple(progress: Progress) -> list[Any]:
    """(stage, percent, done, total) as the Progress property and signal carry it.

    ``done``/``total`` count the bytes of the current stage. A stage without a count of its own (preparing,
    configuring) reports the bytes written so far as both, so the last report of a job is the image size.
    """
    if progress.total is None:
        written = max(0, progress.written)
        return [progress.stage, 100 if written else 0, written, written]
    return [progress.stage, progress.percent or 0, max(0, progress.done), max(0, progress.total)]


# ---------------------------------------------------------------------------------------------------------------------
# The interface


@dataclass(eq=False)
class _Job:
    id: str
    prepared: PreparedUpdate
    cancel: threading.Event
    done: asyncio.Future[None]
    throttle: ProgressThrottle


class UpdaterInterface(ServiceInterface):
    """org.abflasher.Updater1. Create it on the event loop's thread; ``attach`` it to a bus."""

    def __init__(
        self,
        updater: UpdaterEngine,
        authorizer: Authorizer,
        *,
        progress_interval: float = PROGRESS_INTERVAL,
        cancel_timeout: float = CANCEL_TIMEOUT,
        check_interval: float = CHECK_INTERVAL,
    ) -> None:
        super().__init__(INTERFACE_NAME)
        self._updater = updater
        self._authorizer = authorizer
        self._progress_interval = progress_interval
        self._cancel_timeout = cancel_timeout
        self._job: _Job | None = None
        #: What holds the one-at-a-time slot: "" (nothing), "update" (preparing or running a job) or a boot operation.
        self._occupied_by = ""
        self._job_counter = 0
        self._status_call: asyncio.Future[SystemStatus] | None = None
        self._check_interval = check_interval
        self._check_call: asyncio.Future[CheckResult] | None = None
        self._check_ended = float("-inf")
        self._background: set[asyncio.Task[Any]] = set()
        self._calls_in_progress = 0
        self._last_activity = time.monotonic()
        self._properties: dict[str, Any] = {
            "State": "idle",
            "Progress": ["", 0, 0, 0],
            "LastError": "",
            "BootedSlot": "",
            "PrimarySlot": "",
            "BootedVersion": "",
            "TrialActive": False,
        }

    # --- plumbing -------------------------------------------------------------------------------------------------

    def attach(self, bus: MessageBus) -> None:
        """Export on ``bus`` (which must have been made with ``negotiate_unix_fd=True``) with the message handlers
        that record each caller and release stray fds."""
        bus.add_message_handler(record_caller)
        bus.add_message_handler(release_unused_fds)
        property_names = frozenset(self._properties)
        bus.add_message_handler(lambda message: refuse_property_errors(message, property_names))
        bus.export(OBJECT_PATH, self)

    def idle_seconds(self) -> float:
        """How long nothing has happened (0 while a call, a job or an operation is in progress)."""
        if self._occupied_by or self._calls_in_progress:
            return 0.0
        return time.monotonic() - self._last_activity

    @property
    def state(self) -> str:
        return str(self._properties["State"])

    async def refresh_status(self) -> None:
        """Re-read the slots into the properties (at start, and after anything that changes them)."""
        try:
            status = await self._status()
        except Exception as exc:
            # The service must stay up to report what is wrong; GetSlots will raise the same error to the caller.
            log.warning("cannot read the slot status: %s", exc, exc_info=not isinstance(exc, errors.AbFlasherError))
            return
        self._set_properties(
            BootedSlot=status.booted_slot,
            PrimarySlot=status.primary_slot,
            BootedVersion=status.booted_version,
            TrialActive=status.trial_active,
        )

    async def shutdown(self, timeout: float) -> None:
        """Cancel a running job and wait (at most ``timeout`` seconds) until the engine has stopped it."""
        job = self._job
        if job is None:
            return
        log.info("stopping: cancelling job %s", job.id)
        job.cancel.set()
        try:
            await asyncio.wait_for(asyncio.shield(job.done), timeout)
        except TimeoutError:
            log.error("job %s did not stop within %.0f s; exiting anyway", job.id, timeout)

    def _set_properties(self, **changes: Any) -> None:
        changed = {name: value for name, value in changes.items() if self._properties.get(name) != value}
        if not changed:
            return
        self._properties.update(changed)
        self.emit_properties_changed(changed, [])

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _in_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run blocking engine code in its own daemon thread (a hung engine call must not keep the process alive)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()

        def settle(result: _T | None, error: BaseException | None) -> None:
            if future.cancelled():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(cast(_T, result))

        def work() -> None:
            try:
                result = fn(*args)
            except BaseException as exc:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(settle, None, exc)
                return
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, result, None)

        threading.Thread(target=work, name=f"engine-{getattr(fn, '__name__', 'call')}", daemon=True).start()
        return await future

    async def _status(self) -> SystemStatus:
        """The engine's status; concurrent callers share one engine call."""
        if self._status_call is None or self._status_call.done():
            self._status_call = asyncio.ensure_future(self._in_thread(self._updater.status))
        return await asyncio.shield(self._status_call)

    async def _check(self) -> CheckResult:
        """The engine's channel check: concurrent callers share one, and its answer serves every caller for
        ``check_interval`` seconds after it ended."""
        call = self._check_call
        fresh = call is not None and (not call.done() or time.monotonic() - self._check_ended < self._check_interval)
        if call is None or not fresh:
            call = self._check_call = asyncio.ensure_future(self._in_thread(self._updater.check))
            call.add_done_callback(self._check_done)
        return await asyncio.shield(call)

    def _check_done(self, call: asyncio.Future[CheckResult]) -> None:
        self._check_ended = time.monotonic()
        if not call.cancelled():
            call.exception()  # retrieved here, so a failure nobody waited for is not logged as never retrieved

    async def _authorize(self, action: str, *, interactive: bool = False) -> None:
        await self._authorizer.authorize(current_caller(), action, interactive=interactive)

    def _claim(self, what: str) -> None:
        if self._occupied_by:
            if self._job is not None:
                raise errors.Busy(
                    f"busy: update job {self._job.id} is running; wait for it to finish or cancel it "
                    "(abflasherctl cancel)"
                )
            raise errors.Busy(f"busy: another request ({self._occupied_by}) is being handled; try again shortly")
        self._occupied_by = what

    def _release(self) -> None:
        self._occupied_by = ""
        self._last_activity = time.monotonic()

    # --- update jobs ----------------------------------------------------------------------------------------------

    async def _start_job(self, request: UpdateRequest) -> str:
        """Validate with the engine and start the job. If this raises, the engine's run() was not started."""
        self._claim("update")
        previous = {"State": self._properties["State"], "Progress": self._properties["Progress"]}
        self._set_properties(State="preparing", Progress=["preparing", 0, 0, 0])
        try:
            prepared = await self._in_thread(self._updater.prepare, request)
        except BaseException:
            # A refused request is the caller's error, not a job's: the service looks as it did before.
            self._release()
            self._set_properties(**previous)
            raise
        loop = asyncio.get_running_loop()
        self._job_counter += 1
        job_id = str(self._job_counter)
        job = _Job(
            id=job_id,
            prepared=prepared,
            cancel=threading.Event(),
            done=loop.create_future(),
            throttle=ProgressThrottle(loop, lambda p: self._emit_progress(job_id, p), self._progress_interval),
        )
        self._job = job
        self._set_properties(LastError="")
        log.info("job %s: %s", job.id, prepared.description)

        def work() -> None:
            outcome: UpdateOutcome | None = None
            failure: BaseException | None = None
            try:
                outcome = self._updater.run(prepared, job.throttle.report, job.cancel)
            except BaseException as exc:
                failure = exc
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._finish_job, job, outcome, failure)

        threading.Thread(target=work, name=f"update-job-{job.id}", daemon=True).start()
        return job.id

    def _emit_progress(self, job_id: str, progress: Progress) -> None:
        values = progress_tuple(progress)
        changes: dict[str, Any] = {"Progress": values}
        if progress.stage in _STAGE_STATES:
            changes["State"] = progress.stage
        self._set_properties(**changes)
        self._progress_signal(job_id, *values)

    def _finish_job(self, job: _Job, outcome: UpdateOutcome | None, failure: BaseException | None) -> None:
        job.throttle.flush()
        if failure is None and outcome is not None:
            success, error_name, message, state = True, "", outcome.message, "ready-to-reboot"
            log.info("job %s: done: %s", job.id, outcome.message)
        else:
            success = False
            if isinstance(failure, errors.AbFlasherError):
                error_name, message = failure.dbus_name, str(failure) or failure.name
                log.error("job %s failed: %s", job.id, message)
            else:
                log.error("job %s failed unexpectedly", job.id, exc_info=failure)
                error_name, message = errors.Internal.dbus_error_name(), INTERNAL_ERROR_MESSAGE
            state = "idle" if isinstance(failure, errors.Cancelled) else "failed"
        self._job = None
        self._release()
        self._set_properties(State=state, LastError="" if success else message)
        self._completed_signal(job.id, success, error_name, message)
        if not job.done.done():
            job.done.set_result(None)
        self._spawn(self.refresh_status())

    # --- boot operations ------------------------------------------------------------------------------------------

    async def _boot_operation(self, what: str, fn: Callable[..., None], *args: Any) -> None:
        self._claim(what)
        try:
            await self._in_thread(fn, *args)
        finally:
            self._release()
        await self.refresh_status()

    # --- methods --------------------------------------------------------------------------------------------------

    @_dbus_method(returns="aa{sv}", out_names=("slots",))
    async def GetSlots(self) -> list[dict[str, Variant]]:
        status = await self._status()
        return [slot_to_dbus(slot) for slot in status.slots]

    @_dbus_method(returns="a{sv}", out_names=("result",))
    async def Check(self) -> dict[str, Variant]:
        result = await self._check()
        return {
            "current": Variant("s", result.current),
            "available": Variant("s", result.available),
            "update-available": Variant("b", result.update_available),
        }

    @_dbus_method("s", "a{sv}", returns="s", out_names=("job",))
    async def Update(self, version: str, options: dict[str, Variant]) -> str:
        # Authorization comes before any validation: a caller who may not update learns nothing about its arguments.
        # A URL of the caller's choosing is an image of the caller's choosing: its own action.
        action = ACTION_UPDATE_FROM_SOURCE if "url" in options else ACTION_UPDATE
        interactive = interactive_option(options)
        await self._authorize(action, interactive=interactive)
        values = parse_options(options, UPDATE_OPTIONS)
        if values.get("allow-downgrade"):
            await self._authorize(ACTION_DOWNGRADE, interactive=interactive)
        if not version.strip():
            raise errors.InvalidArgument("give the version to install, e.g. 1.4.0")
        request = UpdateRequest(
            version=version.strip(),
            url=str(values.get("url", "")),
            sha256=str(values.get("sha256", "")),
            allow_downgrade=bool(values.get("allow-downgrade", False)),
            reboot=bool(values.get("reboot", False)),
        )
        return await self._start_job(request)

    @_dbus_method("h", "a{sv}", returns="s", out_names=("job",))
    async def UpdateFromFd(self, image: int, options: dict[str, Variant]) -> str:
        interactive = interactive_option(options)
        try:
            # Before the fd and the options are looked at: see Update.
            await self._authorize(ACTION_UPDATE_FROM_SOURCE, interactive=interactive)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(image)
            raise
        fd = adopt_image_fd(image)
        try:
            values = parse_options(options, UPDATE_FROM_FD_OPTIONS)
            if values.get("allow-downgrade"):
                await self._authorize(ACTION_DOWNGRADE, interactive=interactive)
            size = values.get("size")
            request = UpdateRequest(
                version=str(values.get("version", "")).strip(),
                sha256=str(values.get("sha256", "")),
                allow_downgrade=bool(values.get("allow-downgrade", False)),
                reboot=bool(values.get("reboot", False)),
                fd=fd,
                size=int(size) if size else _image_fd_size(fd),
            )
            return await self._start_job(request)
        except BaseException:
            # The engine's run() owns the fd once started; _start_job raising means it never was.
            os.close(fd)
            raise

    @_dbus_method("s")
    async def Cancel(self, job: str) -> None:
        await self._authorize(ACTION_UPDATE)
        running = self._job
        if running is None:
            raise errors.InvalidArgument("nothing to cancel: no update is running")
        if job and job != running.id:
            raise errors.InvalidArgument(f"job {job!r} is not running (job {running.id} is)")
        log.info("job %s: cancel requested by %s", running.id, current_caller().bus_name)
        running.cancel.set()
        try:
            await asyncio.wait_for(asyncio.shield(running.done), self._cancel_timeout)
        except TimeoutError:
            # Never a success for a job that still runs: the caller must not take the slot for free.
            log.warning("job %s: still stopping %.0f s after the cancel request", running.id, self._cancel_timeout)
            raise errors.Busy(
                f"job {running.id} is still stopping {self._cancel_timeout:.0f} s after the cancel request; its "
                "Completed signal will say when it has ended"
            ) from None

    @_dbus_method("s")
    async def Reboot(self, mode: str) -> None:
        await self._authorize(ACTION_MANAGE_BOOT)
        mode = mode or "normal"
        if mode not in REBOOT_MODES:
            raise errors.InvalidArgument(f"unknown reboot mode {mode!r}; use one of: {', '.join(REBOOT_MODES)}")
        await self._boot_operation(f"reboot {mode}", self._updater.reboot, mode)

    @_dbus_method()
    async def MarkGood(self) -> None:
        await self._authorize(ACTION_MANAGE_BOOT)
        await self._boot_operation("mark-good", self._updater.mark_good)

    @_dbus_method()
    async def MarkBad(self) -> None:
        await self._authorize(ACTION_MANAGE_BOOT)
        await self._boot_operation("mark-bad", self._updater.mark_bad)

    @_dbus_method()
    async def Rollback(self) -> None:
        await self._authorize(ACTION_MANAGE_BOOT)
        await self._boot_operation("rollback", self._updater.rollback)

    # --- signals --------------------------------------------------------------------------------------------------

    @_dbus_signal("Progress", "ssutt")
    def _progress_signal(self, job: str, stage: str, percent: int, done: int, total: int) -> list[Any]:
        return [job, stage, percent, done, total]

    @_dbus_signal("Completed", "sbss")
    def _completed_signal(self, job: str, success: bool, error: str, message: str) -> list[Any]:
        return [job, success, error, message]

    # --- properties -----------------------------------------------------------------------------------------------

    @_dbus_readonly_property("State", "s")
    def _state_property(self) -> str:
        return str(self._properties["State"])

    @_dbus_readonly_property("Progress", "(sutt)")
    def _progress_property(self) -> list[Any]:
        return list(self._properties["Progress"])

    @_dbus_readonly_property("LastError", "s")
    def _last_error_property(self) -> str:
        return str(self._properties["LastError"])

    @_dbus_readonly_property("BootedSlot", "s")
    def _booted_slot_property(self) -> str:
        return str(self._properties["BootedSlot"])

    @_dbus_readonly_property("PrimarySlot", "s")
    def _primary_slot_property(self) -> str:
        return str(self._properties["PrimarySlot"])

    @_dbus_readonly_property("BootedVersion", "s")
    def _booted_version_property(self) -> str:
        return str(self._properties["BootedVersion"])

    @_dbus_readonly_property("TrialActive", "b")
    def _trial_active_property(self) -> bool:
        return bool(self._properties["TrialActive"])


def method_names(interface: ServiceInterface) -> list[str]:
    """The D-Bus names of the methods ``interface`` exports (for the authorization-coverage test and tools)."""
    methods = ServiceInterface._get_methods(interface)  # type: ignore[no-untyped-call]
    return [m.name for m in methods if not m.disabled]
