"""The properties of org.abflasher.Updater1: the table of their current values, their declarations with D-Bus types,
and the PropertiesChanged signal a change emits. All are read-only and answered from the table; the interface
(:class:`abflasher.service.interface.UpdaterInterface`) changes them with ``_set_properties``.
"""

from __future__ import annotations

from typing import Any

from abflasher.service.contract import INTERFACE_NAME
from abflasher.service.dbus_adapter import GuardedInterface, dbus_cached_property


class UpdaterProperties(GuardedInterface):
    """The property half of org.abflasher.Updater1 (docs/dbus-api.md names each one's meaning)."""

    def __init__(self) -> None:
        super().__init__(INTERFACE_NAME)
        self._properties: dict[str, Any] = {
            "State": "idle",
            "Progress": ["", 0, 0, 0],
            "LastError": "",
            "BootedSlot": "",
            "PrimarySlot": "",
            "BootedVersion": "",
            "TrialActive": False,
            "AutoUpdate": "",
            "Transferred": [0, 0],
        }

    @property
    def property_names(self) -> frozenset[str]:
        return frozenset(self._properties)

    @property
    def state(self) -> str:
        return str(self._properties["State"])

    def _set_properties(self, **changes: Any) -> None:
        """Change the table and emit one PropertiesChanged with what really changed (nothing: no signal)."""
        changed = {name: value for name, value in changes.items() if self._properties.get(name) != value}
        if not changed:
            return
        self._properties.update(changed)
        self.emit_properties_changed(changed, [])

    _state_property = dbus_cached_property("State", "s", str)
    _progress_property = dbus_cached_property("Progress", "(sutt)", list)
    _last_error_property = dbus_cached_property("LastError", "s", str)
    _booted_slot_property = dbus_cached_property("BootedSlot", "s", str)
    _primary_slot_property = dbus_cached_property("PrimarySlot", "s", str)
    _booted_version_property = dbus_cached_property("BootedVersion", "s", str)
    _trial_active_property = dbus_cached_property("TrialActive", "b", bool)
    _auto_update_property = dbus_cached_property("AutoUpdate", "s", str)
    _transferred_property = dbus_cached_property("Transferred", "(tt)", list)
