"""The Debian package (issue 5): built from a clean copy of the tree, lintian-clean, installed with apt on this
machine, used from the installed files only, removed, purged and installed again; and the stdeb build.

The build runs once per module (``make deb``, ``make deb-stdeb``, both into a temp dir; the Makefile copies the
tree). The install tests change the real system, as the issue asks: they are skipped when ab-flasher (or the stdeb
package) was already installed here, and whatever they install is purged again at the end of the module, whatever
happened; the ``abflasher`` group the package creates is removed too when it did not exist before.

The bus test uses nothing from the source tree in the processes it checks: a private system-type ``dbus-daemon``
reading the stock configuration (and so the package's policy in /usr/share/dbus-1/system.d) and the real
/usr/share/dbus-1/system-services (so activation runs the installed ``Exec=/usr/bin/ab-flasherd``), with a clean
environment and ``/`` as working directory; the real ``polkitd`` with the installed actions and rules; users that run
/usr/bin/abflasherctl. The engine needs an A/B disk to answer ``status``: a simulated Pi on a loop device, named in
the installed /etc/ab-flasher/ab-flasher.conf for the duration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import grp
import json
import os
import pwd
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from abflasher import __version__
from abflasher.config import Config, parse_config

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "ab-flasher"
STDEB_PACKAGE = "python3-ab-flasher"
GROUP = "abflasher"
WEB_USER = "ab-flasher-web"
WEB_CONFFILE = Path("/etc/ab-flasher/web.conf")
WEB_UNIT_LINK = Path("/etc/systemd/system/multi-user.target.wants/ab-flasher-web.service")
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
CONFFILE = Path("/etc/ab-flasher/ab-flasher.conf")
UNIT_DIR = Path("/lib/systemd/system")
SERVICE_UNIT = UNIT_DIR / "ab-flasher.service"
BOOT_CHECK_UNIT = UNIT_DIR / "ab-flasher-boot-check.service"
BOOT_CHECK_LINK = Path("/etc/systemd/system/multi-user.target.wants/ab-flasher-boot-check.service")
DEADLINE_UNIT = UNIT_DIR / "ab-flasher-trial-deadline.service"
WEB_UNIT = UNIT_DIR / "ab-flasher-web.service"
DEADLINE_LINK = Path("/etc/systemd/system/sysinit.target.wants/ab-flasher-trial-deadline.service")
WATCHDOG_DROP_IN = Path("/usr/lib/systemd/system.conf.d/60-ab-flasher-watchdog.conf")
SITE_PACKAGES = Path("/usr/lib/python3/dist-packages")
ACTIVATION_DIR = Path("/usr/share/dbus-1/system-services")
BUS_NAME = "org.abflasher.Updater"
TIMEOUT = 120.0

#: Files the issue asks the package to install (and the purge to remove).
INSTALLED_FILES = (
    "/usr/bin/abflasherctl",
    "/usr/bin/ab-flasher",
    "/usr/bin/ab-flasherd",
    "/lib/systemd/system/ab-flasher.service",
    "/lib/systemd/system/ab-flasher-boot-check.service",
    "/lib/systemd/system/ab-flasher-trial-deadline.service",
    "/lib/systemd/system/ab-flasher-update.timer",
    "/lib/systemd/system/ab-flasher-update.service",
    "/usr/lib/systemd/system-generators/ab-flasher-generator",
    "/usr/lib/systemd/system.conf.d/60-ab-flasher-watchdog.conf",
    "/usr/share/dbus-1/system.d/org.abflasher.Updater.conf",
    "/usr/share/dbus-1/system-services/org.abflasher.Updater.service",
    "/usr/share/dbus-1/interfaces/org.abflasher.Updater1.xml",
    "/usr/share/polkit-1/actions/org.abflasher.Updater.policy",
    "/usr/share/polkit-1/rules.d/org.abflasher.Updater.rules",
    "/etc/ab-flasher/ab-flasher.conf",
    "/usr/share/man/man1/abflasherctl.1.gz",
    "/usr/share/man/man5/ab-flasher.conf.5.gz",
    "/usr/share/man/man8/ab-flasher.8.gz",
    "/usr/share/man/man8/ab-flasherd.8.gz",
    "/usr/share/bash-completion/completions/abflasherctl",
    "/usr/share/bash-completion/completions/ab-flasher",
    "/usr/share/doc/ab-flasher/copyright",
    "/usr/lib/python3/dist-packages/abflasher/__init__.py",
    # The upload page (issue 14): its command, unit, polkit rule, configuration, assets (no CDN) and documentation.
    "/usr/bin/ab-flasher-web",
    "/lib/systemd/system/ab-flasher-web.service",
    "/usr/share/polkit-1/rules.d/org.abflasher.Web.rules",
    "/etc/ab-flasher/web.conf",
    "/usr/share/man/man8/ab-flasher-web.8.gz",
    "/usr/share/doc/ab-flasher/web-api.md",
    "/usr/lib/python3/dist-packages/abflasher/web/app.py",
    "/usr/lib/python3/dist-packages/abflasher/web/static/index.html",
    "/usr/lib/python3/dist-packages/abflasher/web/static/app.js",
    "/usr/lib/python3/dist-packages/abflasher/web/static/style.css",
)
INSTALLED_DIRS = ("/etc/ab-flasher/health.d", "/var/lib/ab-flasher")

#: Everything that must be gone after a purge (beyond the package's own file list).
PURGED_PATHS = (
    "/etc/ab-flasher",
    "/var/lib/ab-flasher",
    "/run/ab-flasher",
    "/usr/lib/python3/dist-packages/abflasher",
    BOOT_CHECK_LINK.as_posix(),
    "/var/lib/systemd/deb-systemd-helper-enabled/ab-flasher-boot-check.service.dsh-also",
    "/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/ab-flasher-boot-check.service",
    DEADLINE_LINK.as_posix(),
    "/var/lib/systemd/deb-systemd-helper-enabled/ab-flasher-trial-deadline.service.dsh-also",
    "/var/lib/systemd/deb-systemd-helper-enabled/sysinit.target.wants/ab-flasher-trial-deadline.service",
    "/etc/systemd/system/multi-user.target.wants/ab-flasher-web.service",
    "/var/lib/systemd/deb-systemd-helper-enabled/ab-flasher-web.service.dsh-also",
    "/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/ab-flasher-web.service",
)

#: Runtime Depends of the release package: Debian packages only, each for something the code needs.
EXPECTED_DEPENDS = {
    "adduser",  # addgroup in postinst
    "default-dbus-system-bus | dbus-system-bus",  # the system bus the service lives on
    "dosfstools",  # mkfs.vfat (autoboot layout: a slot's boot partition)
    "e2fsprogs",  # debugfs (/.ab_version of a slot that is not mounted)
    "fdisk",  # sfdisk
    "mount",  # mount/umount of a freshly written root
    "mtools",  # FAT edits on unmounted partitions
    "openssh-client",  # ssh-keygen -Y verify / sign: signed updates (abflasher/trust/)
    "polkitd",  # authorization, and pkttyagent for abflasherctl
    "python3-aiohttp",  # the upload page (ab-flasher-web): the unit is enabled everywhere, so it is a Depends
    "python3-dbus-next",
    "python3-requests",
    "python3-tqdm",  # progress bars
    "python3-zstandard",  # zstd images
    "python3:any (>= 3.11~)",
}

#: Recommends: installed by apt by default, each making ab-flasher faster or more capable, none needed to work.
EXPECTED_RECOMMENDS = {
    "casync",  # ab-flasher make-delta
    "isal",  # igzip: gzip images inflate 4-6 times faster than with stdlib zlib
    "xz-utils",  # ab-flasher bundle --compress xz
    "zstd",  # ab-flasher bundle --compress zstd
}

#: lintian warnings that remain, with the reason they stay (also listed in docs/packaging.md).
EXPECTED_LINTIAN_WARNINGS = {
    # The changelog's first entry closes no ITP bug: the package is not uploaded to Debian.
    "initial-upload-closes-no-bugs",
}

#: Build products that must not appear in the checkout when the packages are built.
BUILD_PRODUCTS = (
    "build/deb",
    "dist/ab-flasher_{deb_version}_all.deb",
    "deb_dist",
    "ab_flasher.egg-info",
    ".pybuild",
    "debian/ab-flasher",
    "debian/.debhelper",
    "debian/files",
    "debian/debhelper-build-stamp",
    "debian/ab-flasher.substvars",
)


def clean_env(**extra: str) -> dict[str, str]:
    return {"PATH": CLEAN_PATH, "LC_ALL": "C.UTF-8", "HOME": "/root" if os.geteuid() == 0 else "/tmp", **extra}


def run(argv: Sequence[str | os.PathLike[str]], *, timeout: float = TIMEOUT, check: bool = True,
        env: dict[str, str] | None = None, cwd: str | os.PathLike[str] = "/",
        input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=timeout, check=False,
                          env=env or clean_env(), cwd=cwd, input=input_text)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} exited {done.returncode}:\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-3000:]}")
    return done


def deb_version() -> str:
    first = (REPO / "debian" / "changelog").read_text().splitlines()[0]
    match = re.match(r"^ab-flasher \(([^)]+)\) ", first)
    assert match, f"cannot parse the first line of debian/changelog: {first!r}"
    return match.group(1)


# ---------------------------------------------------------------------------------------------------------------------
# Fast checks of the packaging sources


def test_debian_changelog_is_at_the_version_in_abflasher_init() -> None:
    version = deb_version()
    upstream = version.rsplit("-", 1)[0]
    assert upstream == __version__, (
        f"debian/changelog is at {version}, abflasher/__init__.py at {__version__}: run `make changelog`"
    )


def test_conffile_lists_every_option_commented_out_with_its_default() -> None:
    text = (REPO / "debian" / "ab-flasher.conf").read_text()
    assert parse_config(text) == Config(), "the shipped file must set nothing: every option stays commented out"
    listed = re.findall(r"(?m)^#(\w+) =", text)
    options = [f.name for f in dataclasses.fields(Config) if f.name != "extra"]
    assert sorted(listed) == sorted(options), "every Config field is listed exactly once"
    uncommented = parse_config(re.sub(r"(?m)^#(\w+ =)", r"\1", text))
    assert uncommented == Config(), "the value shown for each option is its default"
    assert not uncommented.extra
    for name in options:
        block = text.split(f"\n#{name} =")[0].rsplit("\n\n", 1)[-1]
        assert block.strip().startswith("#"), f"{name} has no description above it"
        assert len(block.strip()) > 20, f"{name} has no description above it"


def test_manual_page_documents_every_option() -> None:
    page = (REPO / "man" / "ab-flasher.conf.5").read_text()
    for item in dataclasses.fields(Config):
        if item.name != "extra":
            assert re.search(rf"^\.BR {item.name} \"? \(default", page, re.MULTILINE), f"{item.name} undocumented"


def test_manual_pages_format_without_warnings() -> None:
    if shutil.which("man") is None:
        pytest.skip("man-db is not installed")
    for page in sorted((REPO / "man").iterdir()):
        done = run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", page],
                   env=clean_env(MANWIDTH="80"))
        assert not done.stderr.strip(), f"{page.name}: {done.stderr}"


BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")


def complete(program: str, line: str) -> list[str]:
    """What bash completion offers for ``line`` (the cursor at its end) with the tree's completion file."""
    script = f"""
source {BASH_COMPLETION}
source {REPO / "completion" / program}
COMP_LINE={line!r}
COMP_POINT=${{#COMP_LINE}}
read -ra COMP_WORDS <<< "$COMP_LINE"
[[ $COMP_LINE == *' ' ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
func=$(complete -p {program} | sed -E 's/.*-F ([^ ]+) .*/\\1/')
"$func" {program} "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    done = run(["bash", "--norc", "--noprofile", "-c", script], cwd=REPO)
    return sorted(word for word in done.stdout.split("\n") if word)


@pytest.mark.skipif(not BASH_COMPLETION.exists(), reason="bash-completion is not installed")
def test_bash_completion() -> None:
    assert complete("abflasherctl", "abflasherctl ") == sorted(
        ["status", "update", "check", "info", "watch", "cancel", "reboot", "mark-good", "mark-bad", "rollback"]
    )
    assert complete("abflasherctl", "abflasherctl up") == ["update"]
    assert complete("abflasherctl", "abflasherctl reboot t") == ["trial"]
    assert complete("abflasherctl", "abflasherctl --json update --a") == ["--allow-downgrade"]
    assert "--no-ask-password" in complete("abflasherctl", "abflasherctl mark-good --")
    assert complete("ab-flasher", "ab-flasher ") == ["auto-update", "boot-check", "bundle", "status",
                                                     "trial-deadline", "write"]
    assert complete("ab-flasher", "ab-flasher bundle img --compression z") == ["zstd"]
    assert complete("abflasherctl", "abflasherctl info --k") == ["--keys"]
    assert complete("ab-flasher", "ab-flasher write --format z") == ["zstd"]
    assert complete("ab-flasher", "ab-flasher write --inflater zlib") == ["zlib", "zlib-ng"]
    assert "--sha256-url" in complete("ab-flasher", "ab-flasher write img.gz --sha")
    assert complete("ab-flasher", "ab-flasher boot-check --c") == ["--config"]


# ---------------------------------------------------------------------------------------------------------------------
# The builds


@dataclass
class Builds:
    deb: Path
    stdeb_deb: Path
    products_before: dict[str, bool]
    products_after: dict[str, bool]


def _build_products() -> dict[str, bool]:
    version = deb_version()
    return {name: (REPO / name.format(deb_version=version)).exists() for name in BUILD_PRODUCTS}


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Builds:
    tools = ("make", "git", "dpkg-buildpackage", "dh", "pybuild", "lintian")
    missing = [tool for tool in tools if shutil.which(tool, path=CLEAN_PATH) is None]
    if run(["/usr/bin/python3", "-c", "import stdeb"], check=False).returncode != 0:
        missing.append("python3-stdeb")
    if missing:
        pytest.skip(f"packaging tools missing ({', '.join(missing)}): run scripts/setup-dev")
    workdir = tmp_path_factory.mktemp("packages")
    # apt reads a local .deb as the _apt user: the directory must be traversable.
    workdir.chmod(0o755)
    dist = workdir / "dist"
    before = _build_products()
    for target in ("deb", "deb-stdeb"):
        run(["make", "-C", REPO, target, f"BUILD_DIR={workdir / 'build'}", f"DIST_DIR={dist}"], timeout=600)
    after = _build_products()
    version = deb_version()
    stdeb = sorted(dist.glob(f"{STDEB_PACKAGE}_*_all.deb"))
    assert len(stdeb) == 1, stdeb
    return Builds(deb=dist / f"{PACKAGE}_{version}_all.deb", stdeb_deb=stdeb[0], products_before=before,
                  products_after=after)


def deb_field(deb: Path, name: str) -> str:
    return run(["dpkg-deb", "-f", deb, name]).stdout.strip()


def split_depends(field: str) -> set[str]:
    return {entry.strip() for entry in field.split(",") if entry.strip()}


@pytest.mark.timeout(900)
def test_build_from_a_copy_of_the_tree_leaves_the_checkout_clean(builds: Builds) -> None:
    assert builds.deb.is_file()
    assert builds.products_after == builds.products_before


def test_lintian_reports_no_errors(builds: Builds) -> None:
    done = run(["lintian", "--fail-on", "error", "--display-level", ">=warning", "--tag-display-limit", "0",
                builds.deb], check=False, timeout=300)
    tags = [line for line in done.stdout.splitlines() if re.match(r"^[EW]: ", line)]
    errors = [line for line in tags if line.startswith("E: ")]
    assert not errors, done.stdout
    assert done.returncode == 0, done.stdout + done.stderr
    warnings = {line.split()[2] for line in tags if line.startswith("W: ")}
    unexpected = warnings - EXPECTED_LINTIAN_WARNINGS
    assert not unexpected, (
        f"new lintian warnings {sorted(unexpected)}: fix them, or list them with their reason in "
        "EXPECTED_LINTIAN_WARNINGS and docs/packaging.md\n" + done.stdout
    )


def test_release_package_metadata_and_contents(builds: Builds) -> None:
    assert deb_field(builds.deb, "Package") == PACKAGE
    assert deb_field(builds.deb, "Version") == deb_version()
    assert deb_field(builds.deb, "Architecture") == "all"
    assert split_depends(deb_field(builds.deb, "Depends")) == EXPECTED_DEPENDS
    assert split_depends(deb_field(builds.deb, "Recommends")) == EXPECTED_RECOMMENDS
    contents = {line.split()[-1].removeprefix(".") for line in run(["dpkg-deb", "-c", builds.deb]).stdout.splitlines()}
    for path in INSTALLED_FILES:
        assert path in contents, f"{path} is not in the package"
    for path in INSTALLED_DIRS:
        assert path + "/" in contents, f"{path}/ is not in the package"
    assert not [path for path in contents if "__pycache__" in path or path.endswith(".pyc")]
    with tempfile.TemporaryDirectory() as control:
        run(["dpkg-deb", "-e", builds.deb, control])
        assert Path(control, "conffiles").read_text().split() == [
            "/etc/ab-flasher/ab-flasher.conf", "/etc/ab-flasher/web.conf"]


def test_every_dependency_resolves_from_debian(builds: Builds, tmp_path: Path) -> None:
    """apt plans the install on an empty system (no package installed), so every dependency, and theirs, must
    come from the configured Debian archive; none may be satisfied only by something installed here by hand."""
    empty_status = tmp_path / "status"
    empty_status.write_text("")
    done = run(["apt-get", "--simulate", "-o", f"Dir::State::status={empty_status}", "install", builds.deb],
               timeout=300)
    planned = [line for line in done.stdout.splitlines() if line.startswith("Inst ")]
    assert any(line.startswith(f"Inst {PACKAGE} ") for line in planned), done.stdout
    foreign = [line for line in planned
               if not line.startswith(f"Inst {PACKAGE} ") and not re.search(r"\(\S+ Debian[:-]", line)]
    assert not foreign, "dependencies from outside Debian:\n" + "\n".join(foreign)
    for dependency in ("python3-dbus-next", "python3-requests", "polkitd", "mtools", "dbus"):
        assert any(line.startswith(f"Inst {dependency} ") for line in planned), dependency


# ---------------------------------------------------------------------------------------------------------------------
# Installing on this machine


def package_state(name: str) -> str:
    """installed, config-files, not-installed, ... (dpkg's db:Status-Status)."""
    done = run(["dpkg-query", "-W", "-f=${db:Status-Status}", name], check=False)
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "not-installed"


def apt_get(*args: str | os.PathLike[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return run(["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=120", *args], timeout=timeout,
               env=clean_env(DEBIAN_FRONTEND="noninteractive"))


@dataclass
class Machine:
    builds: Builds
    group_existed: bool
    web_user_existed: bool = False

    def install(self, deb: Path) -> subprocess.CompletedProcess[str]:
        return apt_get("install", "--no-install-recommends", deb)

    def purge(self, name: str) -> None:
        if package_state(name) != "not-installed":
            apt_get("purge", name)

    def ensure_release_installed(self) -> None:
        self.purge(STDEB_PACKAGE)
        if package_state(PACKAGE) != "installed":
            self.install(self.builds.deb)


@pytest.fixture(scope="module")
def machine(builds: Builds) -> Iterator[Machine]:
    if os.geteuid() != 0:
        pytest.skip("installs the package: needs root (CI runs as root)")
    for name in (PACKAGE, STDEB_PACKAGE):
        if package_state(name) != "not-installed":
            pytest.skip(f"{name} is already installed on this machine; the package tests would replace and purge it")
    try:
        grp.getgrnam(GROUP)
        group_existed = True
    except KeyError:
        group_existed = False
    web_user_existed = run(["getent", "passwd", WEB_USER], check=False).returncode == 0
    state = Machine(builds, group_existed, web_user_existed)
    try:
        yield state
    finally:
        for name in (STDEB_PACKAGE, PACKAGE):
            if package_state(name) != "not-installed":
                apt_get("purge", name)
        if not web_user_existed:
            subprocess.run(["userdel", WEB_USER], capture_output=True, timeout=60, check=False)
            subprocess.run(["groupdel", WEB_USER], capture_output=True, timeout=60, check=False)
        if not group_existed:
            subprocess.run(["groupdel", GROUP], capture_output=True, timeout=60, check=False)


@pytest.fixture
def installed(machine: Machine) -> Machine:
    machine.ensure_release_installed()
    return machine


@pytest.mark.root
@pytest.mark.timeout(600)
def test_apt_installs_the_package(installed: Machine) -> None:
    assert package_state(PACKAGE) == "installed"
    for path in INSTALLED_FILES:
        assert Path(path).is_file(), path
    for path in INSTALLED_DIRS:
        assert Path(path).is_dir(), path
    assert grp.getgrnam(GROUP).gr_gid < 1000, "abflasher is a system group"
    assert CONFFILE.read_text() == (REPO / "debian" / "ab-flasher.conf").read_text()
    assert os.readlink(BOOT_CHECK_LINK) == str(BOOT_CHECK_UNIT), "the boot check is enabled"
    assert os.readlink(DEADLINE_LINK) == str(DEADLINE_UNIT), "the trial deadline is enabled, early in every boot"
    # systemd pets the hardware watchdog (the drop-in is read by PID 1 at boot): see abflasher/systemd_watchdog.py.
    assert re.search(r"^RuntimeWatchdogSec=15s$", WATCHDOG_DROP_IN.read_text(), re.MULTILINE)
    # The commands are the installed ones, on Debian's python3, without the source tree.
    version = run(["abflasherctl", "--version"]).stdout.strip()
    assert version == f"abflasherctl {__version__}"
    assert run(["ab-flasher", "--version"]).stdout.strip() == f"ab-flasher {__version__}"
    assert run(["ab-flasherd", "--version"]).stdout.strip() == f"ab-flasherd {__version__}"
    location = run(["/usr/bin/python3", "-c", "import abflasher; print(abflasher.__file__)"]).stdout.strip()
    assert location == str(SITE_PACKAGES / "abflasher" / "__init__.py")
    assert Path(run(["head", "-n1", "/usr/bin/ab-flasherd"]).stdout.strip().removeprefix("#!")) == Path(
        "/usr/bin/python3"
    )
    # The upload page: its own system user, a config only it (and root) can read, its unit enabled (it serves only
    # in update mode: its ExecCondition decides at start).
    web_user = pwd.getpwnam(WEB_USER)
    assert web_user.pw_uid < 1000, "ab-flasher-web is a system user"
    assert web_user.pw_shell in ("/usr/sbin/nologin", "/bin/false")
    conf = WEB_CONFFILE.stat()
    assert (conf.st_uid, grp.getgrgid(conf.st_gid).gr_name, conf.st_mode & 0o777) == (0, WEB_USER, 0o640)
    assert WEB_CONFFILE.read_text() == (REPO / "debian" / "web.conf").read_text()
    assert os.readlink(WEB_UNIT_LINK) == str(WEB_UNIT), "the page's unit is enabled"
    assert run(["ab-flasher-web", "--version"]).stdout.strip() == f"ab-flasher-web {__version__}"
    hashed = run(["ab-flasher-web", "--hash-password"], input_text="secret\n").stdout.strip()
    assert hashed.startswith("password_hash = scrypt$")


@pytest.mark.root
@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("systemd-analyze", path=CLEAN_PATH) is None, reason="systemd is not installed")
def test_installed_units_verify_and_keep_their_hardening(installed: Machine) -> None:
    # The units are well-formed and everything they name (binaries, man pages) is installed.
    verify = run(["systemd-analyze", "verify", SERVICE_UNIT, BOOT_CHECK_UNIT, DEADLINE_UNIT, WEB_UNIT], check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert not (verify.stdout + verify.stderr).strip()
    unit = SERVICE_UNIT.read_text()
    for setting in ("Type=dbus", "BusName=org.abflasher.Updater", "ProtectHome=yes", "PrivateTmp=yes",
                    "NoNewPrivileges=yes", "ProtectKernelTunables=yes", "RestrictAddressFamilies=AF_UNIX AF_INET",
                    "CapabilityBoundingSet=CAP_SYS_ADMIN "):
        assert re.search(rf"^{re.escape(setting)}", unit, re.MULTILINE), setting
    security = run(["systemd-analyze", "security", "--offline=true", SERVICE_UNIT], check=False)
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert exposure, security.stdout[-2000:] + security.stderr
    assert float(exposure.group(1)) <= 4.0, security.stdout[-2000:]
    # The upload page: an unprivileged user with one capability and no devices.
    web_unit = WEB_UNIT.read_text()
    for setting in ("User=ab-flasher-web", "ExecCondition=/usr/bin/ab-flasher-web --check-enabled",
                    "CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "PrivateDevices=yes", "ProtectSystem=strict",
                    "NoNewPrivileges=yes", "MemoryMax="):
        assert re.search(rf"^{re.escape(setting)}", web_unit, re.MULTILINE), setting
    security = run(["systemd-analyze", "security", "--offline=true", WEB_UNIT], check=False)
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert exposure, security.stdout[-2000:] + security.stderr
    assert float(exposure.group(1)) <= 3.0, security.stdout[-2000:]


# ---------------------------------------------------------------------------------------------------------------------
# The installed service on a bus


class InstalledSystemBus:
    """A private system-type ``dbus-daemon`` that knows only installed files: the stock system.conf (with its
    /usr/share/dbus-1/system.d, where the package's policy is) and the real system-services directory. It runs with
    a clean environment in ``/``, so the service it activates cannot see the source tree either."""

    def __init__(self, workdir: Path) -> None:
        from tests.support.bus import START_TIMEOUT, system_bus_config

        self.workdir = workdir
        self.config = workdir / "bus.conf"
        self.config.write_text(system_bus_config(workdir / "system_bus_socket", policy_dirs=[],
                                                 service_dir=ACTIVATION_DIR))
        self.log = workdir / "dbus-daemon.log"
        read_end, write_end = os.pipe()
        try:
            with open(self.log, "ab") as log:
                self.process = subprocess.Popen(
                    ["dbus-daemon", f"--config-file={self.config}", "--nofork", f"--print-address={write_end}"],
                    pass_fds=(write_end,), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    env={"PATH": CLEAN_PATH, "LC_ALL": "C.UTF-8"}, cwd="/",
                )
            os.close(write_end)
            write_end = -1
            address = b""
            deadline = time.monotonic() + START_TIMEOUT
            while not address.endswith(b"\n"):
                ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
                chunk = os.read(read_end, 4096) if ready else b""
                if not chunk:
                    self.close()
                    raise RuntimeError(f"dbus-daemon printed no address: {self.log.read_text(errors='replace')}")
                address += chunk
            self.address = address.decode().strip()
        finally:
            if write_end >= 0:
                os.close(write_end)
            os.close(read_end)

    def env(self) -> dict[str, str]:
        return {"PATH": CLEAN_PATH, "LC_ALL": "C.UTF-8", "DBUS_SYSTEM_BUS_ADDRESS": self.address}

    def close(self) -> None:
        from tests.support.bus import stop_process

        stop_process(self.process)


def run_as(user: str, argv: Sequence[str], bus: InstalledSystemBus) -> subprocess.CompletedProcess[str]:
    """``argv`` as ``user`` with nothing but PATH and the bus address, in ``/``."""
    env = {"PATH": CLEAN_PATH, "HOME": "/nonexistent", "LANG": "C.UTF-8", "DBUS_SYSTEM_BUS_ADDRESS": bus.address}
    cmd = ["runuser", "-u", user, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv]
    return run(cmd, check=False)


def bus_name_owner_pid(bus: InstalledSystemBus) -> int | None:
    from dbus_next.constants import MessageType

    from tests.support.bus import bus_call

    reply = asyncio.run(bus_call(bus.address, "GetConnectionUnixProcessID", "s", [BUS_NAME]))
    return int(reply.body[0]) if reply.message_type == MessageType.METHOD_RETURN else None


def stop_pid(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM (SIGKILL after ``timeout``) a process that is not our child, by PID; wait until it is gone."""

    def gone() -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
        except (FileNotFoundError, ProcessLookupError):
            return True

    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        if gone():
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while not gone() and time.monotonic() < deadline:
            time.sleep(0.05)


@pytest.mark.root
@pytest.mark.timeout(300)
def test_a_member_gets_status_from_the_activated_service_and_an_outsider_is_refused(installed: Machine) -> None:
    from tests.support.bus import wait_until, world_readable_tempdir
    from tests.support.polkit import PolkitDaemon
    from tests.support.serviceprocess import config_file_text
    from tests.support.simpi import SimulatedPi
    from tests.support.users import TestUsers

    workdir = world_readable_tempdir("abft-pkg-")
    original_conffile = CONFFILE.read_bytes()
    cleanups: list[Callable[[], None]] = []
    service_pid: int | None = None
    try:
        (workdir / "pi").mkdir()
        # Nothing listens on port 9 of this machine: an update that gets past polkit fails fast with a network
        # error, before anything is written.
        pi = SimulatedPi(workdir / "pi", "prefix", config={
            "image_url": "http://127.0.0.1:9/root-{version}.img", "http_retries": 0, "http_connect_timeout": 2.0,
        })
        cleanups.append(pi.close)
        CONFFILE.write_text(config_file_text(pi.config))
        users = TestUsers()
        cleanups.append(users.close)
        bus = InstalledSystemBus(workdir)
        cleanups.append(bus.close)
        polkit = PolkitDaemon(bus)  # duck-typed: it uses the bus's env(), address and workdir
        cleanups.append(polkit.close)
        assert bus_name_owner_pid(bus) is None, "nothing runs the service before it is called"

        status = run_as(users.member, ["abflasherctl", "--json", "status"], bus)
        assert status.returncode == 0, status.stderr + bus.log.read_text(errors="replace")[-3000:]
        answer = json.loads(status.stdout)
        assert answer["booted_slot"] == "a"
        assert answer["booted_version"] == "1.0.0"
        assert {slot["name"] for slot in answer["slots"]} == {"a", "b"}

        # The service was started by the bus from the installed activation file, on Debian's python3, in / with
        # no PYTHONPATH: what answered is the installed code.
        service_pid = bus_name_owner_pid(bus)
        assert service_pid is not None
        cmdline = Path(f"/proc/{service_pid}/cmdline").read_bytes().split(b"\0")[:-1]
        assert [part.decode() for part in cmdline] == ["/usr/bin/python3", "/usr/bin/ab-flasherd", "--idle-timeout",
                                                       "300"]
        environ = Path(f"/proc/{service_pid}/environ").read_bytes().split(b"\0")
        assert not [item for item in environ if item.startswith((b"PYTHONPATH=", b"PYTHONHOME=", b"VIRTUAL_ENV="))]
        assert os.readlink(f"/proc/{service_pid}/cwd") == "/"

        # Reading is open to everyone; changing needs the group (polkit rules installed by the package).
        outsider_status = run_as(users.outsider, ["abflasherctl", "status"], bus)
        assert outsider_status.returncode == 0, outsider_status.stderr
        refused = run_as(users.outsider, ["abflasherctl", "--no-ask-password", "update", "1.1.0"], bus)
        assert refused.returncode == 3, (refused.returncode, refused.stdout, refused.stderr)
        assert "not allowed" in refused.stderr, refused.stderr
        allowed = run_as(users.member, ["abflasherctl", "--no-ask-password", "update", "1.1.0"], bus)
        assert allowed.returncode == 8, ("past polkit, the download fails", allowed.returncode, allowed.stderr)
        downgrade = run_as(users.member, ["abflasherctl", "--no-ask-password", "update", "0.9.0",
                                          "--allow-downgrade"], bus)
        assert downgrade.returncode == 3, ("a downgrade needs an administrator", downgrade.stderr)
        after = json.loads(run_as(users.member, ["abflasherctl", "--json", "status"], bus).stdout)
        assert [s for s in after["slots"] if s["name"] == "b"] == [s for s in answer["slots"] if s["name"] == "b"]
        wait_until(lambda: bus_name_owner_pid(bus) == service_pid, timeout=10, what="the same service instance")
    finally:
        if service_pid is not None:
            stop_pid(service_pid)
        for cleanup in reversed(cleanups):
            cleanup()
        CONFFILE.write_bytes(original_conffile)
        subprocess.run(["rm", "-rf", "--one-file-system", str(workdir)], check=False, timeout=120)


# ---------------------------------------------------------------------------------------------------------------------
# Removing, purging, installing again


def leftovers(paths: Sequence[str]) -> list[str]:
    return [path for path in paths if os.path.lexists(path)]


@pytest.mark.root
@pytest.mark.timeout(600)
def test_remove_keeps_the_configuration_purge_removes_everything_and_reinstall_works(installed: Machine) -> None:
    owned = [line for line in run(["dpkg", "-L", PACKAGE]).stdout.splitlines() if Path(line).is_file()]
    assert str(CONFFILE) in owned
    gid = grp.getgrnam(GROUP).gr_gid
    # What a device accumulates: an edited conffile, state, a health check, a runtime directory.
    CONFFILE.write_text(CONFFILE.read_text() + "\n[ab-flasher]\nhealth_timeout = 300\n")
    Path("/var/lib/ab-flasher/state.json").write_text("{}\n")
    health_check = Path("/etc/ab-flasher/health.d/10-app")
    health_check.write_text("#!/bin/sh\nexit 0\n")
    health_check.chmod(0o755)
    Path("/run/ab-flasher").mkdir(exist_ok=True)

    apt_get("remove", PACKAGE)
    assert package_state(PACKAGE) == "config-files"
    assert CONFFILE.exists(), "remove keeps the configuration"
    assert "health_timeout = 300" in CONFFILE.read_text()
    assert not Path("/usr/bin/abflasherctl").exists()
    assert not (SITE_PACKAGES / "abflasher").exists(), "byte-compiled files go with the code"

    apt_get("purge", PACKAGE)
    assert package_state(PACKAGE) == "not-installed"
    assert leftovers(owned) == []
    assert leftovers(PURGED_PATHS) == []
    systemd_leftovers = [str(p) for root in ("/etc/systemd/system", "/var/lib/systemd")
                         for p in Path(root).rglob("*ab-flasher*")]
    assert systemd_leftovers == []
    # What stays, as Debian policy has it: the system group (files elsewhere may still carry its GID).
    assert grp.getgrnam(GROUP).gr_gid == gid
    assert run(["getent", "passwd", WEB_USER], check=False).returncode == 0, "the system user stays too"
    assert run(["dpkg-statoverride", "--list", str(WEB_CONFFILE)], check=False).stdout.strip() == ""

    installed.install(installed.builds.deb)
    assert package_state(PACKAGE) == "installed"
    assert CONFFILE.read_text() == (REPO / "debian" / "ab-flasher.conf").read_text(), "a pristine conffile"
    assert grp.getgrnam(GROUP).gr_gid == gid, "the existing group is reused"
    assert BOOT_CHECK_LINK.exists()
    assert run(["abflasherctl", "--version"]).stdout.strip() == f"abflasherctl {__version__}"


# ---------------------------------------------------------------------------------------------------------------------
# The stdeb build


@pytest.mark.root
@pytest.mark.timeout(600)
def test_the_stdeb_package_installs_too(machine: Machine) -> None:
    machine.purge(PACKAGE)
    assert deb_field(machine.builds.stdeb_deb, "Package") == STDEB_PACKAGE
    assert deb_field(machine.builds.stdeb_deb, "Version").rsplit("-", 1)[0] == __version__
    try:
        machine.install(machine.builds.stdeb_deb)
        assert package_state(STDEB_PACKAGE) == "installed"
        assert run(["abflasherctl", "--version"]).stdout.strip() == f"abflasherctl {__version__}"
        assert run(["ab-flasher", "--version"]).stdout.strip() == f"ab-flasher {__version__}"
        location = run(["/usr/bin/python3", "-c", "import abflasher.service.daemon as d; print(d.__file__)"])
        assert location.stdout.strip() == str(SITE_PACKAGES / "abflasher" / "service" / "daemon.py")
    finally:
        machine.purge(STDEB_PACKAGE)
    assert package_state(STDEB_PACKAGE) == "not-installed"
    assert not (SITE_PACKAGES / "abflasher").exists()
