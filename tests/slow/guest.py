"""The slow tier's machinery: a Debian guest with the `.deb` installed, a prefix-layout Pi disk, and a boot loop
that asks the firmware model what boots and runs it in QEMU.

x86 has no Pi firmware, so the host plays it between boots: before each boot `tests/pifirmware.py`
decides, from the bytes of the disk image, which prefix folder (kernel, initrd, ``cmdline.txt``) boots; QEMU then
runs that kernel with that cmdline (``-no-reboot``: a guest reboot ends QEMU, like a reset hands control back to
the firmware). The one-shot ``reboot '0 tryboot'`` argument is the one thing x86 loses: a unit in the guest copies
``/run/systemd/reboot-param`` to the data partition at shutdown, and the host consumes it (reads, then deletes it)
for the next boot only, as the firmware does with its flag.

The guest is driven by ``abtest-driver.service`` (no login): on every boot it waits for
``ab-flasher-boot-check.service`` to finish, prints ``ABTEST <key> <value>`` lines on the serial console (what
booted, the boot-check's outcome, ``state.json``), then runs the update named in ``/data/abtest/request`` (which it
deletes first) with ``abflasherctl update --file ... --reboot``, or powers off.

Everything big is made once and kept under ``tests/slow/.cache/`` (the debootstrap tree, the kernel and initrd);
the `.deb` is built from the working tree on every run. Booting it (`QemuPi`, `GuestBoot`) is tests/slow/qemu.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.pidisk import (
    DEFAULT_SIGNATURE,
    IMAGE_BUILD_SIGNATURE,
    MIB,
    PiDisk,
    build_pi_disk,
    fat_write,
    fstab_text,
    mbr_partuuid,
    prefix_config_text,
)

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(__file__).resolve().parent / ".cache"

SUITE = "bookworm"
MIRROR = os.environ.get("ABTEST_MIRROR", "http://deb.debian.org/debian")
# systemd as init, with what a systemd guest needs (udev, kmod) and what polkitd needs (libpam-systemd); then the
# .deb's Depends, so installing it needs no network; then a kernel (initramfs-tools makes the initrd).
GUEST_PACKAGES = (
    "systemd", "systemd-sysv", "udev", "kmod", "dbus", "polkitd", "libpam-systemd",
    "adduser", "dosfstools", "e2fsprogs", "fdisk", "mount", "mtools",
    "python3", "python3-dbus-next", "python3-requests", "python3-tqdm", "python3-zstandard", "python3-aiohttp",
    "openssh-client",
    # python3-zstandard depends on a virtual package (python3-cffi-backend-api-*) that debootstrap cannot resolve.
    "python3-cffi-backend",
    "linux-image-amd64",
)
# Bump when the recipe of the cached base tree changes: it names the cache directory.
BASE_RECIPE = "2"

# Kernel modules the guest keeps (the initrd is made before pruning and keeps what it took): file systems, virtio
# and the libraries they use. The rest (GPU, sound, network cards, ...) is 300 MiB the guest never loads.
KEPT_MODULE_DIRS = ("kernel/fs", "kernel/lib", "kernel/crypto", "kernel/arch", "kernel/block", "kernel/mm",
                    "kernel/drivers/virtio", "kernel/drivers/block", "kernel/drivers/char", "kernel/drivers/md",
                    "kernel/drivers/watchdog",
                    # virtio-net and what it needs, for the recovery scenario's upload over QEMU's user network.
                    "kernel/drivers/net", "kernel/net")

# The Pi firmware starts its hardware watchdog before the kernel when the config it read arms it
# (kernel_watchdog_timeout, tests/pifirmware.py rule 6). QEMU's emulated i6300esb has no firmware to start it, so
# the host passes the model's decision on the cmdline (abtest.firmware_watchdog=N) and this initramfs script starts
# the watchdog first thing, with nobody petting it: like on the Pi, the boot is reset unless systemd opens
# /dev/watchdog0 in time (the package's RuntimeWatchdogSec drop-in).
_FIRMWARE_WATCHDOG_HOOK = r"""#!/bin/sh
PREREQ="udev"
prereqs() { echo "$PREREQ"; }
case "$1" in prereqs) prereqs; exit 0 ;; esac
timeout=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in abtest.firmware_watchdog=*) timeout="${arg#*=}" ;; esac
done
[ -n "$timeout" ] || exit 0
modprobe i6300esb heartbeat="$timeout" || { echo "ABTEST firmware-watchdog-failed modprobe"; exit 0; }
for wait in 1 2 3 4 5 6 7 8 9 10; do [ -c /dev/watchdog0 ] && break; sleep 0.2; done
# Opening starts it; closing without the magic 'V' leaves it running ("watchdog did not stop!").
if : > /dev/watchdog0; then echo "ABTEST firmware-watchdog ${timeout}"
else echo "ABTEST firmware-watchdog-failed open"; fi
"""

SIGNATURE = DEFAULT_SIGNATURE
BOOT_MB = 128
ROOT_MB = 448
IMAGE_MB = 416  # the update images are a little smaller than a slot, as a real image may be
DATA_MB = 384

MARKER = "ABTEST"
SHARED_STATE_DIR = "/data/ab-flasher-state"


class GuestError(RuntimeError):
    """Building or booting the guest failed; the message says which step and carries the tool's output."""


def run(args: list[str], *, timeout: float, env: Mapping[str, str] | None = None,
        cwd: Path | None = None) -> str:
    """Run a tool; raise `GuestError` with its output tail when it fails."""
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-3000:]
        raise GuestError(f"{' '.join(args)} failed with exit code {proc.returncode}:\n{tail}")
    return proc.stdout


@dataclass
class Timings:
    """Wall time of each phase, for the report (`scripts/test-slow` prints them)."""

    phases: list[tuple[str, float]] = field(default_factory=list)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.phases.append((name, time.monotonic() - started))

    def report(self) -> str:
        return "\n".join(f"  {seconds:7.1f} s  {name}" for name, seconds in self.phases)

    def save(self, path: Path, config: pytest.Config) -> None:
        """Write the report to ``path`` and have this session print it at its end (tests/slow/conftest.py): each run
        shows the wall times of the modules it ran, also when two runs share the cache (scripts/test --slow)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.report() + "\n")
        shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        config.stash.setdefault(TIMINGS_REPORTS, []).append((shown, self.report()))


#: The wall-time reports of the modules this session ran: (file, report).
TIMINGS_REPORTS = pytest.StashKey[list[tuple[Path, str]]]()


# --------------------------------------------------------------------------------------------------- base root


@dataclass(frozen=True)
class BaseRoot:
    """The cached debootstrap tree (no kernel in /boot) and the kernel and initrd taken out of it."""

    tree: Path
    kernel: Path
    initrd: Path


def _base_dir(cache_dir: Path) -> Path:
    key = hashlib.sha256(" ".join((BASE_RECIPE, SUITE, *GUEST_PACKAGES, *KEPT_MODULE_DIRS)).encode()).hexdigest()
    return cache_dir / f"base-{SUITE}-{key[:12]}"


@contextlib.contextmanager
def _base_lock(base: Path) -> Iterator[None]:
    """Held while making or checking ``base``: two runs from one checkout (scripts/test --slow runs the tier's
    modules side by side) build it once, the second waits for the first instead of removing its work. The wait is
    bounded by the waiting test's own timeout (pytest-timeout)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    with (base.parent / f"{base.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def ensure_base_root(cache_dir: Path = CACHE_DIR) -> BaseRoot:
    """The debootstrapped guest root, made on first use (a few minutes) and then reused from the cache."""
    base = _base_dir(cache_dir)
    with _base_lock(base):
        return _ensure_base_root(base)


def _ensure_base_root(base: Path) -> BaseRoot:
    result = BaseRoot(base / "tree", base / "vmlinuz", base / "initrd.img")
    if (base / "complete").exists():
        return result
    wip = base / "tree.wip"
    bootstrapped = base / "debootstrap-done"
    if not bootstrapped.exists():
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        run(["debootstrap", "--variant=minbase", f"--include={','.join(GUEST_PACKAGES)}", SUITE, str(wip),
             MIRROR], timeout=3600)
        bootstrapped.touch()
    hook = wip / "etc/initramfs-tools/scripts/init-top/abtest-firmware-watchdog"
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text(_FIRMWARE_WATCHDOG_HOOK)
    hook.chmod(0o755)
    modules = wip / "etc/initramfs-tools/modules"
    if "i6300esb" not in modules.read_text():
        modules.write_text(modules.read_text() + "i6300esb\n")
    run(["chroot", str(wip), "update-initramfs", "-u", "-k", "all"], timeout=900,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    kernels = sorted((wip / "boot").glob("vmlinuz-*"))
    initrds = sorted((wip / "boot").glob("initrd.img-*"))
    if len(kernels) != 1 or len(initrds) != 1:
        raise GuestError(f"expected one kernel and one initrd in {wip}/boot, found {kernels} and {initrds}")
    shutil.copyfile(kernels[0], result.kernel)
    shutil.copyfile(initrds[0], result.initrd)
    _slim(wip, kernels[0].name.removeprefix("vmlinuz-"))
    wip.rename(result.tree)
    (base / "complete").write_text(f"{SUITE} {' '.join(GUEST_PACKAGES)}\n")
    return result


def _slim(tree: Path, kernel_release: str) -> None:
    """Drop what the guest never uses, so the slot images (and the writes inside the slow guest) stay small."""
    for child in (tree / "boot").iterdir():
        child.unlink()  # the kernel and initrd live in the FAT boot folders, as on a Pi
    for rel in ("var/cache/apt/archives", "usr/share/doc", "usr/share/man", "usr/share/locale", "var/lib/apt/lists"):
        shutil.rmtree(tree / rel, ignore_errors=True)
    (tree / "var/cache/apt/archives/partial").mkdir(parents=True)
    modules = tree / "usr/lib/modules" / kernel_release
    kept = {modules / rel for rel in KEPT_MODULE_DIRS}
    for path in sorted(modules.glob("kernel/**/*"), reverse=True):
        if path.is_file() and not any(parent in kept for parent in path.parents):
            path.unlink()
    run(["chroot", str(tree), "depmod", "-a", kernel_release], timeout=300)


# --------------------------------------------------------------------------------------------------- the .deb


def build_deb(out_dir: Path) -> Path:
    """`make deb` of the working tree into ``out_dir``; the path of the package."""
    run(["make", "-C", str(REPO), "deb", f"BUILD_DIR={out_dir / 'build'}", f"DIST_DIR={out_dir / 'dist'}"],
        timeout=900)
    debs = sorted((out_dir / "dist").glob("ab-flasher_*_all.deb"))
    if len(debs) != 1:
        raise GuestError(f"make deb left {debs} in {out_dir / 'dist'}, expected one ab-flasher_*_all.deb")
    return debs[0]


# --------------------------------------------------------------------------------------------------- the guest


_DRIVER = r"""#!/bin/sh
# abtest driver: report this boot on the serial console, then run the requested update or power off.
say() { echo "ABTEST $*"; }
one_line() { tr '\n' ' '; }

deadline=$(( $(date +%s) + 900 ))
while :; do
    case "$(systemctl show -p ActiveState --value ab-flasher-boot-check.service)" in
        activating|active|reloading|deactivating) ;;
        *) break ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then say "boot-check-timeout"; break; fi
    sleep 1
done
say "version $(cat /.ab_version)"
say "cmdline $(cat /proc/cmdline)"
unit=ab-flasher-boot-check.service
say "boot-check-result $(systemctl show -p Result --value $unit) exit=$(systemctl show -p ExecMainStatus --value $unit)"
journalctl -b -o cat -u ab-flasher-boot-check.service | sed 's/^/ABTEST boot-check-log /'
say "system $(systemctl is-system-running)"
systemctl --failed --plain --no-legend | sed 's/^/ABTEST failed-unit /'
state_dir=$(sed -n 's/^state_dir *= *//p' /etc/ab-flasher/ab-flasher.conf | tail -n 1)
say "state $(cat "${state_dir:-/var/lib/ab-flasher}/state.json" 2>/dev/null | one_line)"
say "status $(ab-flasher status --json 2>&1 | one_line)"
say "ctl-status $(abflasherctl status --json --no-ask-password 2>&1 | one_line)"
say "watchdog $(systemctl show -p RuntimeWatchdogUSec --value) $(cat /sys/class/watchdog/watchdog0/state 2>/dev/null)"
say "root-options $(findmnt -no OPTIONS /)"
if [ -f /data/abtest/request-recovery ]; then
    # Update mode, as the companion app asks for it over D-Bus (Reboot('recovery')).
    rm -f /data/abtest/request-recovery
    sync
    say "reboot-recovery"
    abflasherctl reboot recovery --no-ask-password 2>&1 | sed 's/^/ABTEST reboot-log /'
    sleep 300
    say "reboot-did-not-happen"
fi
if [ -f /etc/ab-flasher/abtest-recovery ]; then
    # The recovery system: the host uploads through the page, which reboots the guest into the trial; wait.
    for wait in $(seq 1 300); do
        systemctl -q is-active ab-flasher-web.service && break
        sleep 1
    done
    say "web $(systemctl is-active ab-flasher-web.service)"
    journalctl -b -o cat -u ab-flasher-web.service | tail -n 5 | sed 's/^/ABTEST web-log /'
    say "recovery-ready"
    sleep 1800
    say "recovery-timeout"
fi
if [ -f /data/abtest/request ]; then
    read -r image sha256 < /data/abtest/request
    rm -f /data/abtest/request
    sync
    say "update-start $image"
    abflasherctl update --file "$image" --sha256 "$sha256" --reboot --no-ask-password 2>&1 \
        | tr '\r' '\n' | tail -n 5 | sed 's/^/ABTEST update-log /' &
    # Tell the host when the image is being written, so a power cut can be aimed at the write itself.
    while kill -0 $! 2>/dev/null; do
        case "$(busctl get-property org.abflasher.Updater /org/abflasher/Updater org.abflasher.Updater1 State \
                2>/dev/null)" in
            *'"writing"'*) say "update-writing"; break ;;
        esac
        sleep 0.2
    done
    wait
    # On success the service is rebooting the guest into the trial, which ends this script: until then, wait.
    sleep 300
    say "update-did-not-reboot"
fi
say "poweroff"
systemctl poweroff
"""

_DRIVER_UNIT = """[Unit]
Description=abtest: report this boot on the console, then run the requested update or power off
After=multi-user.target ab-flasher-boot-check.service

[Service]
# Not a oneshot: `is-system-running --wait` in the boot-check must see the boot finish without waiting for us.
Type=exec
ExecStart=/usr/local/sbin/abtest-driver
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
"""

_REBOOT_PARAM = """#!/bin/sh
# At shutdown: hand `systemctl reboot ARG`'s argument to the host, which plays the Pi firmware's one-shot flag.
mkdir -p /data/abtest
if [ -f /run/systemd/reboot-param ]; then
    cp /run/systemd/reboot-param /data/abtest/reboot-param
else
    rm -f /data/abtest/reboot-param
fi
sync
"""

_REBOOT_PARAM_UNIT = """[Unit]
Description=abtest: hand the reboot argument (tryboot) to the host at shutdown
RequiresMountsFor=/data

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true
ExecStop=/usr/local/sbin/abtest-reboot-param

[Install]
WantedBy=multi-user.target
"""

# The boot-check's verdict (and the trial deadline's) also goes to the serial console: a failed trial reboots before
# the driver can report.
_BOOT_CHECK_CONSOLE = """[Service]
StandardOutput=journal+console
StandardError=journal+console
"""

FAILING_HEALTH_CHECK = "#!/bin/sh\necho 'abtest: this image is bad on purpose' >&2\nexit 1\n"
# A health check that never returns, and whose child holds its output open (what subprocess.run waited for).
HANGING_HEALTH_CHECK = ("#!/bin/sh\necho 'ABTEST health-hang-start' > /dev/console\n(sleep 100000; echo never) &\n"
                        "sleep 100000\n")
# An init that hangs before systemd starts (the kernel and initramfs came up; userspace never does).
HANGING_INIT = "#!/bin/sh\necho 'ABTEST hang-start' > /dev/console\nwhile :; do sleep 3600; done\n"


def make_guest_tree(base: BaseRoot, deb: Path, dest: Path, *, state_dir: str | None = None) -> Path:
    """A copy of the base tree with the package installed (as `apt install ./deb` would, offline) and the driver.

    The package's configuration is used as shipped, except that ``state_dir`` (when given) moves the state out of
    the root file system, with a drop-in that lets the sandboxed service write there (a diagnostic mode: see
    docs/slow-tier.md).
    """
    if dest.exists():
        shutil.rmtree(dest)
    run(["cp", "-a", str(base.tree), str(dest)], timeout=600)
    shutil.copyfile(deb, dest / "tmp" / deb.name)
    # Every Depends is in the base tree already (GUEST_PACKAGES), so dpkg alone installs it; a new Depends shows
    # up here as a dpkg dependency error naming the package to add to GUEST_PACKAGES.
    run(["chroot", str(dest), "dpkg", "-i", f"/tmp/{deb.name}"], timeout=600,
        env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    (dest / "tmp" / deb.name).unlink()
    files = {
        "usr/local/sbin/abtest-driver": (_DRIVER, 0o755),
        "usr/local/sbin/abtest-reboot-param": (_REBOOT_PARAM, 0o755),
        "etc/systemd/system/abtest-driver.service": (_DRIVER_UNIT, 0o644),
        "etc/systemd/system/abtest-reboot-param.service": (_REBOOT_PARAM_UNIT, 0o644),
        "etc/hostname": ("abtest\n", 0o644),
        "etc/systemd/system/ab-flasher-boot-check.service.d/abtest-console.conf": (_BOOT_CHECK_CONSOLE, 0o644),
        "etc/systemd/system/ab-flasher-trial-deadline.service.d/abtest-console.conf": (_BOOT_CHECK_CONSOLE, 0o644),
    }
    if state_dir is not None:
        conf = dest / "etc/ab-flasher/ab-flasher.conf"
        conf.write_text(conf.read_text() + f"\n# abtest: state shared by both slots\nstate_dir = {state_dir}\n")
        files["etc/systemd/system/ab-flasher.service.d/abtest-state.conf"] = (
            f"[Service]\nReadWritePaths=-{state_dir}\n", 0o644)
    for rel, (text, mode) in files.items():
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
    wants = dest / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for unit in ("abtest-driver.service", "abtest-reboot-param.service"):
        link = wants / unit
        if not link.is_symlink():
            link.symlink_to(f"/etc/systemd/system/{unit}")
    for mount_point in ("boot/firmware", "data"):
        (dest / mount_point).mkdir(parents=True, exist_ok=True)
    return dest


@contextlib.contextmanager
def root_variant(tree: Path, version: str, *, fstab: str, health_checks: Mapping[str, str] | None = None,
                 replaced: Mapping[str, str] | None = None, config: str = "") -> Iterator[Path]:
    """``tree`` as the root of ``version``: ``/.ab_version``, fstab, extra health checks, ``replaced`` files (path in
    the tree: new executable content) and ``config`` lines added to ab-flasher.conf; undone afterwards."""
    (tree / ".ab_version").write_text(version + "\n")
    (tree / "etc/fstab").write_text(fstab)
    conf = "etc/ab-flasher/ab-flasher.conf"
    changes = {rel: (text, 0o755) for rel, text in {**(replaced or {}), **{
        f"etc/ab-flasher/health.d/{name}": text for name, text in (health_checks or {}).items()}}.items()}
    if config:
        changes[conf] = ((tree / conf).read_text() + f"\n# abtest\n{config}", 0o644)
    saved: list[tuple[Path, Path | None]] = []
    with tempfile.TemporaryDirectory(prefix="abtest-variant-", dir=tree.parent) as stash:
        try:
            for number, (rel, (text, mode)) in enumerate(changes.items()):
                path = tree / rel
                keep = Path(stash, str(number)) if path.exists() or path.is_symlink() else None
                if keep is not None:
                    os.rename(path, keep)  # a symlink (/usr/sbin/init) stays a symlink
                saved.append((path, keep))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                path.chmod(mode)
            yield tree
        finally:
            for path, keep in reversed(saved):
                if keep is None:
                    path.unlink()
                else:
                    os.replace(keep, path)


@dataclass(frozen=True)
class UpdateImage:
    """An update image on the data partition: its path in the guest, its sha256, what it carries."""

    guest_path: str
    sha256: str
    version: str


def make_update_image(tree: Path, dest: Path, version: str, *, health_checks: Mapping[str, str] | None = None,
                      replaced: Mapping[str, str] | None = None, config: str = "") -> str:
    """Write ``dest`` (gzip'd ext4 root of ``version``, built on another machine's disk id); its sha256."""
    raw = dest.with_suffix("")
    with raw.open("wb") as handle:
        handle.truncate(IMAGE_MB * MIB)
    with root_variant(tree, version, fstab=fstab_text(IMAGE_BUILD_SIGNATURE, root=2, boot=1, data=4),
                      health_checks=health_checks, replaced=replaced, config=config):
        _make_ext4(raw, 0, IMAGE_MB * MIB, tree, label="rootfs", uuid="deadbeef-0000-4000-8000-000000000001")
    digest = hashlib.sha256()
    with raw.open("rb") as source, gzip.open(dest, "wb", compresslevel=1) as sink:
        while chunk := source.read(4 * MIB):
            sink.write(chunk)
            digest.update(chunk)
    raw.unlink()
    return digest.hexdigest()


def _make_ext4(img: Path, offset: int, size_bytes: int, source: Path, *, label: str, uuid: str) -> None:
    # pidisk's make_ext4 gives mkfs a minute, which is plenty for its toy trees; a Debian root needs longer.
    run(["mkfs.ext4", "-q", "-F", "-L", label, "-U", uuid, "-d", str(source), "-E", f"offset={offset}",
         str(img), f"{size_bytes // 1024}k"], timeout=900)


def guest_cmdline(root_partition: int) -> str:
    return (f"console=ttyS0,115200 root=PARTUUID={mbr_partuuid(SIGNATURE, root_partition)} rootfstype=ext4 "
            "rootwait panic=5 systemd.show_status=1\n")


def build_e2e_disk(path: Path, tree: Path, base: BaseRoot, images: Mapping[str, Path],
                   request: UpdateImage | None) -> PiDisk:
    """A prefix-layout disk: p1 FAT with ``a/`` (kernel8.img = the x86 kernel, initrd.img, cmdline.txt), p2 root
    A = ``tree`` at 1.0.0, p3 empty, p4 data holding ``images`` under ``/`` and the driver's request."""
    disk = build_pi_disk(path, "prefix", version_a=None, version_b=None, boot_mb=BOOT_MB, root_mb=ROOT_MB,
                         size_mb=1 + BOOT_MB + 2 * ROOT_MB + DATA_MB, slot_b_boot_files=False,
                         signature=SIGNATURE)
    boot = disk.by_role("boot")
    # build_pi_disk left fake Pi kernels in a/: the firmware model boots whatever a/kernel8.img is, here the x86 one.
    fat_write(path, boot.offset, "a/kernel8.img", base.kernel.read_bytes())
    fat_write(path, boot.offset, "a/initrd.img", base.initrd.read_bytes())
    fat_write(path, boot.offset, "a/cmdline.txt", guest_cmdline(disk.root("a").number))
    fat_write(path, boot.offset, "config.txt", prefix_config_text("a") + "initramfs initrd.img followkernel\n")
    root_a = disk.root("a")
    fstab = fstab_text(SIGNATURE, root=root_a.number, boot=boot.number, data=disk.by_role("data").number)
    with root_variant(tree, "1.0.0", fstab=fstab):
        _make_ext4(path, root_a.offset, root_a.size_bytes, tree, label="roota",
                   uuid=f"{SIGNATURE:08x}-0000-4000-8000-000000000001")
    data = disk.by_role("data")
    with tempfile.TemporaryDirectory(prefix="abtest-data-") as tmp:
        data_tree = Path(tmp)
        (data_tree / "abtest").mkdir()
        # Where the diagnostic mode of make_guest_tree keeps the state: the service may only write what exists.
        (data_tree / SHARED_STATE_DIR.removeprefix("/data/")).mkdir()
        for name, image in images.items():
            # mkfs.ext4 -d copies the files anyway: a hard link saves copying a few hundred MiB first.
            try:
                os.link(image, data_tree / name)
            except OSError:
                shutil.copyfile(image, data_tree / name)
        if request is not None:
            (data_tree / "abtest" / "request").write_text(f"{request.guest_path} {request.sha256}\n")
        _make_ext4(path, data.offset, data.size_bytes, data_tree, label="data",
                   uuid=f"{SIGNATURE:08x}-0000-4000-8000-{0xDA7A:012x}")
    return disk
