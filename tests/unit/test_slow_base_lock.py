"""The QEMU tier's base root is built once when two runs share a checkout (scripts/test --slow runs the tier's
modules side by side): the second run waits for the first's lock instead of removing its half-made tree."""

from __future__ import annotations

import fcntl
import threading
from pathlib import Path

import pytest

from tests.slow import guest


def test_the_base_root_is_not_touched_while_another_run_builds_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    base = guest._base_dir(tmp_path)
    built: list[str] = []

    def fake_ensure(path: Path) -> guest.BaseRoot:
        built.append(path.name)
        return guest.BaseRoot(path / "tree", path / "vmlinuz", path / "initrd.img")

    monkeypatch.setattr(guest, "_ensure_base_root", fake_ensure)
    result: list[guest.BaseRoot] = []
    with (tmp_path / f"{base.name}.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: result.append(guest.ensure_base_root(tmp_path)), daemon=True)
        waiter.start()
        waiter.join(timeout=1.5)
        assert waiter.is_alive(), "ensure_base_root went ahead while another run held the base root's lock"
        assert built == []
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    assert built == [base.name]
    assert result[0].tree == base / "tree"
