"""ab-flasher: A/B (dual copy) OS updates for Raspberry Pi devices."""

__version__ = "0.1.0"
