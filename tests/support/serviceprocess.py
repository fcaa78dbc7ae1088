"""The service as a process of its own, started as root on a private bus; its configuration file; its memory."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support.bus import BUS_NAME, DBusDaemon, stop_process, wait_for_name


class ServiceProcess:
    """The service started as root: ``argv`` run with the bus's address; ready once it owns the name."""

    def __init__(self, argv: Sequence[str | os.PathLike[str]], bus: DBusDaemon, *, cwd: Path | None = None,
                 log_name: str = "service.log") -> None:
        self.log = bus.workdir / log_name
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                list(map(str, argv)), env=bus.env(), cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        try:
            wait_for_name(bus.address, BUS_NAME, process=self.process, log=self.log)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        stop_process(self.process)

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def config_file_text(config: Any) -> str:
    """An ab-flasher.conf that load_config() turns back into ``config`` (an abflasher.config.Config)."""
    import dataclasses
    import shlex

    lines = ["[ab-flasher]"]
    for item in dataclasses.fields(config):
        if item.name == "extra":
            continue
        value = getattr(config, item.name)
        if isinstance(value, bool):
            text = "yes" if value else "no"
        elif isinstance(value, tuple):
            text = shlex.join(value)
        else:
            text = str(value)
        lines.append(f"{item.name} = {text}")
    return "\n".join(lines) + "\n"


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]
