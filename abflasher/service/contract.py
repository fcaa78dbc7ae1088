"""The D-Bus contract of ab-flasher, declared once: names, states, reboot modes, options, polkit actions, error prefix.

The service (:mod:`abflasher.service.interface`), the client (:mod:`abflasher.ctl`) and the tests all take these from
here; docs/dbus-api.md describes them for people, and ``dbus/org.abflasher.Updater1.xml`` is the introspection data
(a test compares it with the running service). Which polkit action each method needs is declared on the method
itself, in the interface.
"""

from __future__ import annotations

from collections.abc import Mapping

from abflasher.errors import DBUS_ERROR_PREFIX

BUS_NAME = "org.abflasher.Updater"
OBJECT_PATH = "/org/abflasher/Updater"
INTERFACE_NAME = "org.abflasher.Updater1"
PROPERTIES_INTERFACE = "org.freedesktop.DBus.Properties"
#: Errors are ``ERROR_PREFIX + <name>``, one name per class of :mod:`abflasher.errors`.
ERROR_PREFIX = DBUS_ERROR_PREFIX

#: Values of the State property.
STATES = ("idle", "preparing", "downloading", "writing", "verifying", "configuring", "ready-to-reboot", "failed")
#: The states of a running job (engine stages that are also states; the others only show in Progress).
RUNNING_STATES = frozenset({"preparing", "downloading", "writing", "verifying", "configuring"})
#: Reboot(mode).
REBOOT_MODES = ("normal", "trial", "recovery")

#: Options of Update and their D-Bus types; type "t" accepts any unsigned-looking D-Bus integer.
UPDATE_OPTIONS: Mapping[str, str] = {
    "url": "s",
    "sha256": "s",
    "allow-downgrade": "b",
    "reboot": "b",
    "interactive": "b",
    "store": "s",
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

# polkit actions (polkit/org.abflasher.Updater.policy).
#: Install a version from the configured channel (image_url), or cancel an update.
ACTION_UPDATE = "org.abflasher.update"
#: Install an image the caller chose: from a URL it names (Update's ``url`` option) or from a file it hands over
#: (UpdateFromFd). Whoever may do this can run any code as root on the next boot, so the shipped rules keep it for
#: administrators.
ACTION_UPDATE_FROM_SOURCE = "org.abflasher.update-from-source"
#: Update's options that name where the bytes come from, and so need ACTION_UPDATE_FROM_SOURCE.
SOURCE_OPTION_ACTIONS: Mapping[str, str] = {"url": ACTION_UPDATE_FROM_SOURCE, "store": ACTION_UPDATE_FROM_SOURCE}
#: In addition, for an update with ``allow-downgrade``.
ACTION_DOWNGRADE = "org.abflasher.downgrade"
ACTION_MANAGE_BOOT = "org.abflasher.manage-boot"

#: The system group the shipped polkit rules let install channel updates and manage boot without a password.
GROUP = "abflasher"
