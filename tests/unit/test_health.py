"""Health checks run in their own process group, which is killed at the timeout and when the check exits."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from abflasher.health import run_check


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead: only its parent (init, here) still has to reap it.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pid: int, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _script(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "check"
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)
    return path


@pytest.mark.timeout(60)
def test_a_check_whose_child_keeps_the_output_open_times_out_with_its_whole_group(tmp_path: Path) -> None:
    # subprocess.run(timeout=) kills only the check itself: its background sleep lived on after the boot-check.
    pid_file = tmp_path / "child.pid"
    check = _script(tmp_path, f"sleep 3600 &\necho $! > {pid_file}\necho started\nwait\n")
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as raised:
        run_check([str(check)], 1.0)
    assert time.monotonic() - started < 30, "the timeout did not end the check"
    assert raised.value.output == "started\n"
    assert _wait_gone(int(pid_file.read_text())), "the check's background child outlived its timeout"


@pytest.mark.timeout(60)
def test_a_check_that_exits_leaves_nothing_running_and_is_not_held_up_by_its_child(tmp_path: Path) -> None:
    # subprocess.run reads the pipes to their end: the child holding them made a check that had exited 3 at once
    # look like one that timed out, after the whole timeout.
    pid_file = tmp_path / "child.pid"
    check = _script(tmp_path, f"sleep 3600 &\necho $! > {pid_file}\necho fine\necho warn >&2\nexit 3\n")
    done = run_check([str(check)], 30.0)
    assert (done.returncode, done.stdout, done.stderr) == (3, "fine\n", "warn\n")
    assert _wait_gone(int(pid_file.read_text())), "a process the check left behind is still running"


@pytest.mark.timeout(60)
def test_output_is_kept_to_its_tail(tmp_path: Path) -> None:
    check = _script(tmp_path, "head -c 200000 /dev/zero | tr '\\0' x\necho last\n")
    done = run_check([str(check)], 30.0)
    assert done.returncode == 0
    assert done.stdout.endswith("xlast\n")
    assert len(done.stdout) == 64 * 1024


def test_a_check_that_cannot_start_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        run_check([str(tmp_path / "missing")], 5.0)
