"""The upload page (``ab-flasher-web``): an aiohttp application, run as its own unprivileged user, that streams an
uploaded image into the service's ``UpdateFromFd`` and shows the job live. It is a D-Bus client of the service like
``abflasherctl`` and has no other way to touch a disk. docs/web-api.md describes its HTTP API.

The engine never imports this package (nor aiohttp)."""
