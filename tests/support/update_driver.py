"""Run one update in a process of its own, so a test can SIGKILL it at a chosen moment.

``python -m tests.support.update_driver CONFIG.json IMAGE VERSION`` installs IMAGE (an fd, as UpdateFromFd does) with
the `Config` saved in CONFIG.json, and prints each new progress stage on its own line as it starts ("writing",
"verifying", "configuring"), then "done".
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
from pathlib import Path

from abflasher.api import UpdateRequest
from abflasher.config import Config
from abflasher.image.pipeline import Progress
from abflasher.updater import Updater


def save_config(config: Config, path: Path) -> None:
    path.write_text(json.dumps(dataclasses.asdict(config), default=str))


def load_config(path: Path) -> Config:
    fields = {field.name: field for field in dataclasses.fields(Config)}
    values = {name: tuple(value) if isinstance(value, list) else value
              for name, value in json.loads(path.read_text()).items() if fields[name].init}
    return Config(**values)


def main(config_path: str, image: str, version: str) -> int:
    updater = Updater(load_config(Path(config_path)))
    stages: list[str] = []

    def report(progress: Progress) -> None:
        if not stages or stages[-1] != progress.stage:
            stages.append(progress.stage)
            print(progress.stage, flush=True)

    fd = os.open(image, os.O_RDONLY)
    prepared = updater.prepare(UpdateRequest(version=version, fd=fd, size=os.fstat(fd).st_size))
    updater.run(prepared, report, threading.Event())
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
