"""Shared fixtures and the test tiers.

- unit tests run anywhere, unprivileged;
- ``@pytest.mark.root`` tests need root (loop devices, system-type buses, users) and are skipped without it; CI runs
  as root, so there they always run;
- ``@pytest.mark.slow`` is the QEMU tier, run only with ``--slow``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.loopdev import LoopDisk, make_disk_image


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", default=False, help="also run the slow (QEMU) tier")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_root = pytest.mark.skip(reason="needs root (CI runs as root)")
    skip_slow = pytest.mark.skip(reason="slow tier: run with --slow")
    for item in items:
        if "root" in item.keywords and os.geteuid() != 0:
            item.add_marker(skip_root)
        if "slow" in item.keywords and not config.getoption("--slow"):
            item.add_marker(skip_slow)


@pytest.fixture
def loop_disk(tmp_path: Path) -> Iterator[LoopDisk]:
    """A 64 MiB MBR disk on a loop device: p1 8 MiB FAT-type, p2/p3 24 MiB Linux, p4 the rest (data)."""
    image = make_disk_image(
        tmp_path / "disk.img",
        72,
        "label: dos\nlabel-id: 0x1234abcd\n,8M,c\n,24M,L\n,24M,L\n,,L\n",
    )
    with LoopDisk(image) as disk:
        yield disk
