"""Everything that depends on how dbus-next works inside, in one place (a move to dbus-fast, its maintained fork,
touches this module): method, signal and property declarations with explicit D-Bus types, the polkit guard declared
on each method, and the bus message handlers that work around dbus-next's handling of fds and property errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from dbus_next.constants import MessageType, PropertyAccess
from dbus_next.errors import DBusError
from dbus_next.message import Message
from dbus_next.service import ServiceInterface, dbus_property, method, signal
from dbus_next.signature import Variant

from abflasher import errors
from abflasher.service.contract import INTERFACE_NAME, OBJECT_PATH, PROPERTIES_INTERFACE

log = logging.getLogger("abflasher.service.interface")

INTERNAL_ERROR_MESSAGE = "internal error in the ab-flasher service; its log (journalctl -u ab-flasher) has the details"
_STANDARD_INTERFACES = frozenset(
    {PROPERTIES_INTERFACE, "org.freedesktop.DBus.Introspectable", "org.freedesktop.DBus.Peer"}
)
_GUARD = "__abflasher_guard__"

_Fn = TypeVar("_Fn", bound=Callable[..., Any])


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


@dataclass(frozen=True)
class Guard:
    """What a method needs from polkit: ``action`` (None: it changes nothing and needs nothing), or the action of an
    option it was given (``option_actions``, e.g. a URL of the caller's choosing)."""

    action: str | None
    option_actions: Mapping[str, str] = field(default_factory=dict)

    def action_for(self, args: tuple[Any, ...]) -> str | None:
        for arg in args:
            if isinstance(arg, Mapping):
                for option, action in self.option_actions.items():
                    if option in arg:
                        return action
        return self.action


class GuardedInterface(ServiceInterface):
    """A ServiceInterface whose methods are declared with :func:`dbus_method`: each names its polkit action, and is
    authorized by it before its body runs (so a caller without the right learns nothing about its arguments)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._calls_in_progress = 0
        self._last_activity = time.monotonic()

    @property
    def calls_in_progress(self) -> int:
        return self._calls_in_progress

    async def authorize(self, action: str, *, interactive: bool) -> None:
        """Return when the caller of the method being served may perform ``action``; raise NotAuthorized if not."""
        raise NotImplementedError


def dbus_method(
    *arg_types: str,
    action: str | None,
    option_actions: Mapping[str, str] | None = None,
    returns: str = "",
    out_names: tuple[str, ...] = (),
) -> Callable[[_Fn], _Fn]:
    """A D-Bus method guarded by the polkit ``action`` (None: read-only), whose errors reach the caller as the
    hierarchy's D-Bus names and never as internals. A call that is refused has the fds it brought closed."""
    guard = Guard(action, dict(option_actions or {}))

    def decorate(fn: _Fn) -> _Fn:
        @functools.wraps(fn)
        async def serve(self: GuardedInterface, *args: Any) -> Any:
            self._calls_in_progress += 1
            try:
                needed = guard.action_for(args)
                if needed is not None:
                    try:
                        await self.authorize(needed, interactive=any(interactive_option(a) for a in args))
                    except BaseException:
                        for kind, value in zip(arg_types, args, strict=True):
                            if kind == "h":
                                with contextlib.suppress(OSError):
                                    os.close(value)
                        raise
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
        exported.__dict__[_GUARD] = guard
        _name_args(exported, "__DBUS_METHOD", "out_args", out_names)
        return cast(_Fn, exported)

    return decorate


def method_guards(cls: type[ServiceInterface]) -> dict[str, Guard | None]:
    """Each D-Bus method of ``cls`` and its guard (None for a method not declared with dbus_method)."""
    guards: dict[str, Guard | None] = {}
    for klass in reversed(cls.__mro__):
        for member in vars(klass).values():
            info = getattr(member, "__dict__", {}).get("__DBUS_METHOD")
            if info is not None and not info.disabled:
                guards[info.name] = member.__dict__.get(_GUARD)
    return guards


def dbus_signal(name: str, signature: str) -> Callable[[_Fn], _Fn]:
    def decorate(fn: _Fn) -> _Fn:
        fn.__signature__ = inspect.signature(fn).replace(return_annotation=signature)  # type: ignore[attr-defined]
        exported = signal(name=name)(fn)
        _name_args(exported, "__DBUS_SIGNAL", "args", tuple(list(inspect.signature(fn).parameters)[1:]))
        return cast(_Fn, exported)

    return decorate


def dbus_readonly_property(name: str, signature: str) -> Callable[[Callable[[Any], Any]], Any]:
    def decorate(fn: Callable[[Any], Any]) -> Any:
        fn.__signature__ = inspect.signature(fn).replace(return_annotation=signature)  # type: ignore[attr-defined]
        return dbus_property(access=PropertyAccess.READ, name=name)(fn)

    return decorate


def dbus_cached_property(name: str, signature: str, convert: Callable[[Any], Any]) -> Any:
    """A read-only D-Bus property ``name`` answered from the service object's ``_properties[name]``; assign it to the
    class attribute ``_<name in snake case>_property`` (dbus-next looks the getter up by its function's name)."""
    def getter(self: Any) -> Any:
        return convert(self._properties[name])

    getter.__name__ = getter.__qualname__ = "_" + re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower() + "_property"
    return dbus_readonly_property(name, signature)(getter)


def interactive_option(options: object) -> bool:
    """Whether ``options`` (a call's a{sv} argument, or any other argument) asks for interactive authorization, as it
    is before the options are validated (which happens after authorization)."""
    if not isinstance(options, Mapping):
        return False
    value = options.get("interactive")
    return isinstance(value, Variant) and value.signature == "b" and bool(value.value)


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


def method_names(interface: ServiceInterface) -> list[str]:
    """The D-Bus names of the methods ``interface`` exports (for the authorization-coverage test and tools)."""
    methods = ServiceInterface._get_methods(interface)  # type: ignore[no-untyped-call]
    return [m.name for m in methods if not m.disabled]
