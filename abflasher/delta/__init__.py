"""Delta updates: an image published as a casync blob index (``.caibx``) and chunk store (``.castr``), installed by
building the target slot from chunks the device already has and fetching only the rest (docs/delta-updates.md)."""
