"""What crosses the bus, converted: an ``a{sv}`` options dict in (checked against the types the contract gives each
option), an image fd in (adopted, so it cannot leak), and the engine's values out as Variants.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Mapping
from typing import Any

from dbus_next.signature import Variant

from abflasher import errors
from abflasher.api import SlotStatus

_INTEGER_SIGNATURES = frozenset("yqutnix")


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


def image_fd_size(fd: int) -> int | None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return None
    return max(0, st.st_size - os.lseek(fd, 0, os.SEEK_CUR))
