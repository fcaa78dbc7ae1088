"""Signed updates: manifests, OpenSSH signatures, bundles, channels, rollback and freeze protection."""
