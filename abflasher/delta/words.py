"""Tables of 64-bit words kept in a temporary file and read a page at a time, so a delta install's memory stays flat
whatever the image size (docs/delta-updates.md, "Memory").

`sort_words` sorts any number of words in bounded memory (sorted runs, then merged) into a `WordFile`, which finds
the words under a key (``word >> shift == key``) by bisecting the first word of each page (kept in memory: 8 bytes
per `PAGE_WORDS` words) and then the page itself. A `WordFile` made by `write_words` is read by position.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import sys
import tempfile
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Generic, TypeVar

_Page = TypeVar("_Page")

#: Words per page: what one read brings in, and what one fence in memory stands for.
PAGE_WORDS = 256
_PAGE_BYTES = PAGE_WORDS * 8
#: Pages kept in memory per file (a read of the page cache is a few microseconds; this spares the repeats).
CACHED_PAGES = 64
#: Words sorted in memory at a time (a list of Python ints while sorting: ~40 bytes each).
RUN_WORDS = 32768
_READ_WORDS = 8192


def _words(data: bytes) -> array[int]:
    words = array("Q", data)
    if sys.byteorder != "little":
        words.byteswap()
    return words


def _raw(words: array[int]) -> bytes:
    if sys.byteorder != "little":
        words = array("Q", words)
        words.byteswap()
    return words.tobytes()


class PageCache(Generic[_Page]):
    """The last ``size`` pages ``read(number)`` made, by number (safe from any thread: at worst two threads
    read the same page)."""

    def __init__(self, read: Callable[[int], _Page], size: int = CACHED_PAGES) -> None:
        self._read = read
        self._size = size
        #: The pages by number (a caller may look one up here before calling `get`).
        self.pages: dict[int, _Page] = {}

    def get(self, number: int) -> _Page:
        page = self.pages.get(number)
        if page is None:
            page = self._read(number)
            if len(self.pages) >= self._size:
                with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                    del self.pages[next(iter(self.pages))]  # the oldest, unless another thread got there first
            self.pages[number] = page
        return page


class WordFile:
    """Words in an unlinked temporary file (it disappears when closed or when the process ends, whatever ends it)."""

    def __init__(self, handle: IO[bytes], count: int, fences: array[int]) -> None:
        self._handle = handle  # keeps the file open
        self._fd = handle.fileno()
        self._count = count
        self._fences = fences  # the first word of each page (meaningful when the words are sorted)
        self._pages = PageCache(lambda number: _words(os.pread(self._fd, _PAGE_BYTES, number * _PAGE_BYTES)))

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        self._handle.close()

    def page(self, number: int) -> array[int]:
        """Page ``number``'s words."""
        return self._pages.get(number)

    def __getitem__(self, position: int) -> int:
        if not 0 <= position < self._count:
            raise IndexError(position)
        return self.page(position // PAGE_WORDS)[position % PAGE_WORDS]

    def under(self, key: int, shift: int) -> list[int]:
        """The words ``w`` with ``w >> shift == key``, in order (the words must be sorted)."""
        low = key << shift
        fences = self._fences
        page_number = bisect_left(fences, low) - 1
        page_number = max(page_number, 0)
        cached, pages = self._pages.pages, self._pages
        found: list[int] = []
        while page_number < len(fences):
            page = cached.get(page_number) or pages.get(page_number)
            position, size = bisect_left(page, low), len(page)
            while position < size:
                word = page[position]
                if word >> shift != key:
                    return found  # the words from ``low`` on are sorted: the first one past the key ends them
                found.append(word)
                position += 1
            page_number += 1
        return found


class WordWriter:
    """Appends words to a new temporary file in ``directory``, noting the first word of each page."""

    def __init__(self, directory: str | None) -> None:
        self.handle: IO[bytes] = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 (closed by its WordFile)
        self.pending = array("Q")
        self.count = 0
        self.fences = array("Q")

    def extend(self, words: Iterable[int]) -> None:
        self.pending.extend(words)
        if len(self.pending) >= _READ_WORDS:
            self._flush()

    def append(self, word: int) -> None:
        self.pending.append(word)
        if len(self.pending) >= _READ_WORDS:
            self._flush()

    def _flush(self) -> None:
        pending = self.pending
        start = self.count
        # The fences: the first word of every page that starts among the pending words.
        first = -start % PAGE_WORDS
        self.fences.extend(pending[first::PAGE_WORDS])
        self.handle.write(_raw(pending))
        self.count += len(pending)
        self.pending = array("Q")

    def finish(self) -> WordFile:
        self._flush()
        self.handle.flush()
        return WordFile(self.handle, self.count, self.fences)

    def abandon(self) -> None:
        self.handle.close()


def write_words(words: Iterable[int], directory: str | None) -> WordFile:
    """``words`` in a temporary file in ``directory`` (None: the system's), read by position."""
    writer = WordWriter(directory)
    try:
        for word in words:
            writer.append(word)
        return writer.finish()
    except BaseException:
        writer.abandon()
        raise


def _run_words(run: WordFile, start: int, count: int) -> Iterator[int]:
    for offset in range(start, start + count, _READ_WORDS):
        size = min(_READ_WORDS, start + count - offset)
        yield from _words(os.pread(run._fd, size * 8, offset * 8))


def sort_words(batches: Iterable[Sequence[int]], directory: str | None) -> WordFile:
    """The words of ``batches`` sorted into a temporary file in ``directory``, never much more than `RUN_WORDS` of
    them in memory."""
    runs = WordWriter(directory)
    bounds: list[tuple[int, int]] = []
    try:
        run = array("Q")
        for batch in batches:
            run.extend(batch)
            if len(run) >= RUN_WORDS:
                bounds.append((runs.count + len(runs.pending), len(run)))
                runs.extend(sorted(run))
                run = array("Q")
        if run or not bounds:
            bounds.append((runs.count + len(runs.pending), len(run)))
            runs.extend(sorted(run))
        del run
        sorted_runs = runs.finish()
    except BaseException:
        runs.abandon()
        raise
    if len(bounds) == 1:
        return sorted_runs
    try:
        return write_words(heapq.merge(*(_run_words(sorted_runs, start, count) for start, count in bounds)),
                           directory)
    finally:
        sorted_runs.close()
