"""The client's Python for unprivileged users: a venv made with /usr/bin/python3 in a world-readable directory
(not under /root), with a copy of the source and ``abflasherctl``/``ab-flasherd`` scripts, so test users can run
the client.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.support.bus import REPO

_SCRIPT = """#!{python}
import sys
from {module} import main
sys.exit(main())
"""


class ClientVenv:
    """``/usr/bin/python3 -m venv --system-site-packages`` in ``workdir`` with a world-readable copy of the source
    (abflasher/ and tests/) on its path and ``abflasherctl``/``ab-flasherd`` scripts in its bin/."""

    def __init__(self, workdir: Path, repo: Path = REPO) -> None:
        self.root = workdir / "venv"
        self.src = workdir / "src"
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".cache", "data")
        for package in ("abflasher", "tests"):
            shutil.copytree(repo / package, self.src / package, ignore=ignore)
        for extra in ("dbus", "polkit"):
            shutil.copytree(repo / extra, self.src / extra)
        subprocess.run(
            ["/usr/bin/python3", "-m", "venv", "--system-site-packages", "--without-pip", str(self.root)],
            check=True, capture_output=True, timeout=120,
        )
        self.python = self.root / "bin" / "python"
        site = subprocess.run(
            [str(self.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout.strip()
        Path(site, "ab-flasher-src.pth").write_text(f"{self.src}\n")
        for name, module in (("abflasherctl", "abflasher.ctl"), ("ab-flasherd", "abflasher.service.daemon")):
            script = self.root / "bin" / name
            script.write_text(_SCRIPT.format(python=self.python, module=module))
            script.chmod(0o755)
        subprocess.run(["chmod", "-R", "a+rX", str(workdir)], check=True, timeout=60)
        # Compile as root now, so the users' runs do not each recompile what they cannot cache.
        subprocess.run([str(self.python), "-m", "compileall", "-q", str(self.src)], check=False, timeout=300,
                       capture_output=True)

    @property
    def ctl(self) -> Path:
        return self.root / "bin" / "abflasherctl"

    @property
    def daemon(self) -> Path:
        return self.root / "bin" / "ab-flasherd"
