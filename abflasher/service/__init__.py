"""The D-Bus transport (DESIGN §5, §6): interface.py adapts the engine, auth.py asks polkit, daemon.py is main."""
