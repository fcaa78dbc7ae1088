"""Fixtures the service and upload-page modules share: each module gets its own bus, polkitd and service rig."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.service_rig import Rig, service_rig
from tests.support.webrig import granted_web_user


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    yield from service_rig()


@pytest.fixture(scope="module")
def web_user(rig: Rig) -> Iterator[str]:
    yield from granted_web_user()
