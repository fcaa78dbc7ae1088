"""Fixtures shared by the unit tests of the service and its client."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.bus import DBusDaemon
from tests.support.polkit import DbusmockPolkit


@pytest.fixture(scope="module")
def bus_and_polkit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DBusDaemon, DbusmockPolkit]]:
    """A private bus (no root needed) with python-dbusmock's polkitd template on it, one per test module."""
    workdir = tmp_path_factory.mktemp("bus")
    with DBusDaemon.permissive(workdir) as bus:
        polkit = DbusmockPolkit(bus.address, workdir)
        try:
            yield bus, polkit
        finally:
            polkit.close()
