"""The D-Bus transport: contract.py declares the names, states, options and polkit actions (shared with the client
and the tests), interface.py adapts the engine, dbus_adapter.py holds what depends on dbus-next, auth.py asks polkit,
daemon.py is main."""
