"""Fixtures shared by the unit tests of the service and its client."""

from __future__ import annotations

import asyncio
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


@pytest.fixture
def address(bus_and_polkit: tuple[DBusDaemon, DbusmockPolkit]) -> str:
    return bus_and_polkit[0].address


@pytest.fixture
def polkit(bus_and_polkit: tuple[DBusDaemon, DbusmockPolkit]) -> Iterator[DbusmockPolkit]:
    """The mock polkitd, denying every action before and after the test."""
    polkit = bus_and_polkit[1]
    asyncio.run(asyncio.wait_for(polkit.set_allowed([]), 45.0))
    yield polkit
    asyncio.run(asyncio.wait_for(polkit.set_allowed([]), 45.0))
