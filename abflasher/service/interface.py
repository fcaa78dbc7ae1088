"""org.abflasher.Updater1 on the bus: a thin adapter between D-Bus and the engine (:mod:`abflasher.updater`).

Everything that may block (the engine reading slots, validating a request, streaming an image, asking the update
channel) runs in threads; the event loop only moves messages, so the service keeps answering while it installs. One
update job or boot operation runs at a time; a second mutating request gets Busy. Every method declares the polkit
action it needs, which is asked (:mod:`abflasher.service.auth`) before the method looks at its arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

from dbus_next.aio.message_bus import MessageBus
from dbus_next.signature import Variant

from abflasher import errors
from abflasher.api import (
    CheckResult,
    PreparedUpdate,
    ProgressCallback,
    SystemStatus,
    UpdateOutcome,
    UpdateRequest,
)
from abflasher.image.pipeline import Progress
from abflasher.service.auth import Authorizer, current_caller, record_caller
from abflasher.service.contract import (
    ACTION_DOWNGRADE,
    ACTION_MANAGE_BOOT,
    ACTION_UPDATE,
    ACTION_UPDATE_FROM_SOURCE,
    OBJECT_PATH,
    REBOOT_MODES,
    RUNNING_STATES,
    SOURCE_OPTION_ACTIONS,
    UPDATE_FROM_FD_OPTIONS,
    UPDATE_OPTIONS,
)
from abflasher.service.dbus_adapter import (
    INTERNAL_ERROR_MESSAGE,
    dbus_method,
    dbus_signal,
    method_guards,
    refuse_property_errors,
    release_unused_fds,
)
from abflasher.service.progress import PROGRESS_INTERVAL, ProgressThrottle, progress_tuple
from abflasher.service.properties import UpdaterProperties
from abflasher.service.values import adopt_image_fd, image_fd_size, parse_options, slot_to_dbus

log = logging.getLogger(__name__)

#: How long a Cancel waits for the job to end before it says the job is still stopping.
CANCEL_TIMEOUT = 30.0
#: An update channel's answer (or failure) is reused for this long: Check() needs no authorization, and a flood of
#: calls must not become a flood of threads and requests in a root process.
CHECK_INTERVAL = 10.0

_T = TypeVar("_T")


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
# The interface


@dataclass(eq=False)
class _Job:
    id: str
    prepared: PreparedUpdate
    cancel: threading.Event
    done: asyncio.Future[None]
    throttle: ProgressThrottle


class UpdaterInterface(UpdaterProperties):
    """org.abflasher.Updater1: its methods and signals, the jobs and boot operations behind them (its properties are
    :class:`UpdaterProperties`). Create it on the event loop's thread; ``attach`` it to a bus."""

    def __init__(
        self,
        updater: UpdaterEngine,
        authorizer: Authorizer,
        *,
        progress_interval: float = PROGRESS_INTERVAL,
        cancel_timeout: float = CANCEL_TIMEOUT,
        check_interval: float = CHECK_INTERVAL,
    ) -> None:
        super().__init__()
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

    # --- plumbing -------------------------------------------------------------------------------------------------

    def attach(self, bus: MessageBus) -> None:
        """Export on ``bus`` (which must have been made with ``negotiate_unix_fd=True``) with the message handlers
        that record each caller and release stray fds."""
        bus.add_message_handler(record_caller)
        bus.add_message_handler(release_unused_fds)
        property_names = self.property_names
        bus.add_message_handler(lambda message: refuse_property_errors(message, property_names))
        bus.export(OBJECT_PATH, self)

    def idle_seconds(self) -> float:
        """How long nothing has happened (0 while a call, a job or an operation is in progress)."""
        if self._occupied_by or self._calls_in_progress:
            return 0.0
        return time.monotonic() - self._last_activity

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
            AutoUpdate=status.auto_update,
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

    async def authorize(self, action: str, *, interactive: bool = False) -> None:
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
        previous = {name: self._properties[name] for name in ("State", "Progress", "Transferred")}
        self._set_properties(State="preparing", Progress=["preparing", 0, 0, 0], Transferred=[0, 0])
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
        # Bytes received and bytes written so far, of the whole job (a delta update downloads and writes only part).
        changes: dict[str, Any] = {"Progress": values, "Transferred": [progress.downloaded, max(0, progress.written)]}
        if progress.stage in RUNNING_STATES:
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

    # Each method names the polkit action it needs; the guard asks polkit before the body runs (dbus_adapter).

    @dbus_method(action=None, returns="aa{sv}", out_names=("slots",))
    async def GetSlots(self) -> list[dict[str, Variant]]:
        status = await self._status()
        return [slot_to_dbus(slot) for slot in status.slots]

    @dbus_method(action=None, returns="a{sv}", out_names=("result",))
    async def Check(self) -> dict[str, Variant]:
        result = await self._check()
        reply = {
            "current": Variant("s", result.current),
            "available": Variant("s", result.available),
            "update-available": Variant("b", result.update_available),
        }
        if result.signer:
            # A signed channel's release: who signed it and what it is (docs/dbus-api.md).
            reply.update({
                "signer": Variant("s", result.signer),
                "compatible": Variant("s", result.compatible),
                "created": Variant("t", result.created),
                "expires": Variant("t", result.expires),
                "size": Variant("t", result.size),
                "download-size": Variant("t", result.download_size),
                "release-notes": Variant("s", result.release_notes),
            })
        return reply

    # A URL of the caller's choosing is an image of the caller's choosing: its own action (and so is a chunk store).
    @dbus_method("s", "a{sv}", action=ACTION_UPDATE, option_actions=SOURCE_OPTION_ACTIONS, returns="s",
                 out_names=("job",))
    async def Update(self, version: str, options: dict[str, Variant]) -> str:
        values = parse_options(options, UPDATE_OPTIONS)
        # An empty version: the channel's newest.
        return await self._submit(values, version=version.strip(), url=str(values.get("url", "")))

    @dbus_method("h", "a{sv}", action=ACTION_UPDATE_FROM_SOURCE, returns="s", out_names=("job",))
    async def UpdateFromFd(self, image: int, options: dict[str, Variant]) -> str:
        fd = adopt_image_fd(image)
        try:
            values = parse_options(options, UPDATE_FROM_FD_OPTIONS)
            size = values.get("size")
            return await self._submit(
                values,
                version=str(values.get("version", "")).strip(),
                fd=fd,
                size=int(size) if size else image_fd_size(fd),
            )
        except BaseException:
            # The engine's run() owns the fd once started; _submit raising means it never was.
            os.close(fd)
            raise

    async def _submit(
        self, values: Mapping[str, Any], *, version: str, url: str = "", fd: int | None = None, size: int | None = None
    ) -> str:
        """The one path of Update and UpdateFromFd from validated options to a started job."""
        if values.get("allow-downgrade"):
            await self.authorize(ACTION_DOWNGRADE, interactive=bool(values.get("interactive", False)))
        request = UpdateRequest(
            version=version,
            url=url,
            sha256=str(values.get("sha256", "")),
            allow_downgrade=bool(values.get("allow-downgrade", False)),
            reboot=bool(values.get("reboot", False)),
            fd=fd,
            size=size,
            store=str(values.get("store", "")),
        )
        return await self._start_job(request)

    @dbus_method("s", action=ACTION_UPDATE)
    async def Cancel(self, job: str) -> None:
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

    @dbus_method("s", action=ACTION_MANAGE_BOOT)
    async def Reboot(self, mode: str) -> None:
        mode = mode or "normal"
        if mode not in REBOOT_MODES:
            raise errors.InvalidArgument(f"unknown reboot mode {mode!r}; use one of: {', '.join(REBOOT_MODES)}")
        await self._boot_operation(f"reboot {mode}", self._updater.reboot, mode)

    @dbus_method(action=ACTION_MANAGE_BOOT)
    async def MarkGood(self) -> None:
        await self._boot_operation("mark-good", self._updater.mark_good)

    @dbus_method(action=ACTION_MANAGE_BOOT)
    async def MarkBad(self) -> None:
        await self._boot_operation("mark-bad", self._updater.mark_bad)

    @dbus_method(action=ACTION_MANAGE_BOOT)
    async def Rollback(self) -> None:
        await self._boot_operation("rollback", self._updater.rollback)

    # --- signals --------------------------------------------------------------------------------------------------

    @dbus_signal("Progress", "ssutt")
    def _progress_signal(self, job: str, stage: str, percent: int, done: int, total: int) -> list[Any]:
        return [job, stage, percent, done, total]

    @dbus_signal("Completed", "sbss")
    def _completed_signal(self, job: str, success: bool, error: str, message: str) -> list[Any]:
        return [job, success, error, message]


#: Every method of org.abflasher.Updater1 and the polkit action it needs (Update with a ``url`` option needs
#: ACTION_UPDATE_FROM_SOURCE instead), derived from the declarations above; READ_ONLY_METHODS need none.
_GUARDS = method_guards(UpdaterInterface)
METHOD_ACTIONS: Mapping[str, str] = {
    name: guard.action for name, guard in _GUARDS.items() if guard is not None and guard.action is not None
}
READ_ONLY_METHODS: frozenset[str] = frozenset(
    name for name, guard in _GUARDS.items() if guard is not None and guard.action is None
)
