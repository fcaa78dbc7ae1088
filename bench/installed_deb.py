"""ab-flasher as `apt install ab-flasher` gives it, for the install benchmark: Debian packages only.

The release package (`make deb`, or one given with --deb) is unpacked into a scratch root under bench/.cache/ and
byte-compiled there, as dh-python's postinst does on a real installation; its /usr/bin/ab-flasher runs under
Debian's `/usr/bin/python3 -I` (isolated: no PYTHONPATH, no user site, so no virtualenv) with the unpacked
dist-packages first on sys.path and the system's /usr/lib/python3/dist-packages after it, where the package's Depends
are. That is the code, the interpreter and the Python modules an installed ab-flasher has; igzip is there when the
isal package is, which apt installs with ab-flasher as a Recommends. Nothing from PyPI: preparing refuses an
interpreter that can import the isal or zlib-ng Python modules.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEBIAN_PYTHON = "/usr/bin/python3"
#: Runs the package's entry script with its dist-packages first on sys.path: argv is DIST SCRIPT then the arguments.
LAUNCHER = (
    "import runpy, sys\n"
    "dist, script = sys.argv[1:3]\n"
    "sys.path.insert(0, dist)\n"
    "sys.argv = ['ab-flasher', *sys.argv[3:]]\n"
    "runpy.run_path(script, run_name='__main__')\n"
)
#: Exits non-zero when a PyPI-only module would be importable where the package runs.
NO_PYPI_CHECK = (
    "import importlib.util, sys\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "found = [m for m in ('isal', 'zlib_ng') if importlib.util.find_spec(m) is not None]\n"
    "sys.exit(f'importable from PyPI: {found}' if found else 0)\n"
)


class DebError(Exception):
    """The package could not be built, unpacked or checked."""


@dataclass(frozen=True)
class InstalledDeb:
    deb: Path
    root: Path
    dist_packages: Path
    script: Path
    igzip: str | None

    def command(self, *args: str) -> list[str]:
        return [DEBIAN_PYTHON, "-I", "-c", LAUNCHER, str(self.dist_packages), str(self.script), *args]

    def describe(self) -> dict[str, Any]:
        return {
            "deb": str(self.deb),
            "python": f"{DEBIAN_PYTHON} -I",
            "pypi_modules": False,
            "igzip": self.igzip,
            "isal_package": _package_version("isal"),
        }


def _package_version(name: str) -> str | None:
    done = subprocess.run(["dpkg-query", "-W", "-f", "${Status} ${Version}", name], capture_output=True, text=True,
                          check=False)
    fields = done.stdout.split()
    return fields[-1] if done.returncode == 0 and "installed" in fields else None


def _run(argv: list[str], what: str, **kwargs: Any) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False, **kwargs)
    if done.returncode != 0:
        raise DebError(f"{what} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}")


def prepare(repo: Path, cache: Path, deb: Path | None = None) -> InstalledDeb:
    """Build the release package from ``repo`` (unless ``deb`` is given) and unpack it into ``cache``."""
    if deb is None:
        build = cache / "deb-build"
        dist = cache / "deb-dist"
        shutil.rmtree(dist, ignore_errors=True)
        _run(["make", "-C", str(repo), "deb", f"BUILD_DIR={build}", f"DIST_DIR={dist}"], "make deb")
        debs = sorted(dist.glob("ab-flasher_*_all.deb"))
        if len(debs) != 1:
            raise DebError(f"make deb made {len(debs)} packages in {dist}")
        deb = debs[0]
    root = cache / "deb-root"
    shutil.rmtree(root, ignore_errors=True)
    _run(["dpkg-deb", "-x", str(deb), str(root)], f"unpacking {deb}")
    dist_packages = root / "usr" / "lib" / "python3" / "dist-packages"
    script = root / "usr" / "bin" / "ab-flasher"
    if not (dist_packages / "abflasher").is_dir() or not script.is_file():
        raise DebError(f"{deb} has no abflasher module or /usr/bin/ab-flasher")
    # What py3compile does in the package's postinst.
    _run([DEBIAN_PYTHON, "-I", "-m", "compileall", "-q", str(dist_packages)], "byte-compiling the package")
    _run([DEBIAN_PYTHON, "-I", "-c", NO_PYPI_CHECK, str(dist_packages)], "checking for PyPI modules",
         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    return InstalledDeb(deb, root, dist_packages, script, shutil.which("igzip"))
