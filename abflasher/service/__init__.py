"""The D-Bus transport (docs/dbus-api.md): interface.py adapts the engine, auth.py asks polkit, daemon.py is main."""
