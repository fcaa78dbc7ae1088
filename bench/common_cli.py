"""The command line the benchmarks share: the image size (``--size-mb``, ``--quick``), the interpreter they run
(``--python``, the repo's .venv by default), the checks of ``--size-mb`` and ``--repeat``, and ``main``'s frame: the
root check before anything runs, and a failed step reported in one line (exit 1) rather than as a traceback.

Each benchmark imports it as a sibling: ``python bench/NAME.py`` has bench/ on its path.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICK_SIZE_MB = 256
#: The smallest image whose recipe (install_bench's file tree) fits.
MIN_SIZE_MB = 64


class BenchError(Exception):
    """A step of the benchmark failed (not a missed target): the run is not a valid measurement."""


def add_image_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size-mb", type=int, default=1024, help="image size in MiB (default 1024)")
    parser.add_argument("--quick", action="store_true", help=f"a {QUICK_SIZE_MB} MiB image, for a fast try")


def add_python(parser: argparse.ArgumentParser, role: str) -> None:
    """``--python``: the interpreter ``role`` ("that runs ab-flasher"); the repo's .venv when there is one."""
    default_python = REPO / ".venv" / "bin" / "python"
    parser.add_argument("--python", default=str(default_python if default_python.exists() else sys.executable),
                        help=f"interpreter {role} (default: the repo's .venv)")


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None, *, check: bool = False) -> argparse.Namespace:
    """The arguments, ``--quick`` applied; with ``check``, a ``--size-mb`` below MIN_SIZE_MB or a ``--repeat`` below 1
    is a usage error."""
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mb = QUICK_SIZE_MB
    if check:
        if args.size_mb < MIN_SIZE_MB:
            parser.error(f"--size-mb must be at least {MIN_SIZE_MB}")
        if args.repeat < 1:
            parser.error("--repeat must be at least 1")
    return args


def run_as_root(
    args: argparse.Namespace, bench: Callable[[argparse.Namespace], int], *, name: str, not_root: str
) -> int:
    """``bench(args)``'s exit status; 2 (saying ``not_root``) without root, 1 (saying why) when a step failed."""
    if os.geteuid() != 0:
        print(not_root, file=sys.stderr, flush=True)
        return 2
    try:
        return bench(args)
    except BenchError as exc:
        print(f"{name}: {exc}", file=sys.stderr, flush=True)
        return 1
