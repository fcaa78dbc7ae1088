"""Real block devices for tests: a disk image attached with losetup, partition nodes made by partx.

This machine's kernel does not scan partition tables by itself, so `partx -a` creates the pNN nodes. Everything
attached here is detached in ``close()``, which the fixtures call whatever the test did.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import TracebackType


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout


class LoopDisk:
    """A disk image attached as /dev/loopN with its partitions as /dev/loopNpM."""

    def __init__(self, image: str | os.PathLike[str]) -> None:
        self.image = Path(image)
        self.device = _run("losetup", "--find", "--show", "--sector-size", "512", str(self.image)).strip()
        try:
            self.rescan()
        except BaseException:
            self.close()
            raise

    def rescan(self) -> None:
        """Recreate the partition nodes after the table changed."""
        subprocess.run(["partx", "-d", self.device], capture_output=True, timeout=60, check=False)
        table = _run("sfdisk", "--dump", self.device) if self.image.stat().st_size else ""
        if "start=" in table:
            _run("partx", "-a", self.device)

    def partition(self, number: int) -> str:
        node = f"{self.device}p{number}"
        if not os.path.exists(node):
            raise FileNotFoundError(f"{node} was not created by partx")
        return node

    def close(self) -> None:
        if not self.device:
            return
        subprocess.run(["partx", "-d", self.device], capture_output=True, timeout=60, check=False)
        subprocess.run(["losetup", "-d", self.device], capture_output=True, timeout=60, check=False)
        self.device = ""

    def __enter__(self) -> LoopDisk:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def make_disk_image(path: str | os.PathLike[str], size_mb: int, sfdisk_script: str) -> Path:
    """A sparse disk image with a partition table written by sfdisk from ``sfdisk_script``."""
    path = Path(path)
    with open(path, "wb") as handle:
        handle.truncate(size_mb << 20)
    subprocess.run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)],
        input=sfdisk_script,
        text=True,
        check=True,
        capture_output=True,
        timeout=60,
    )
    return path
