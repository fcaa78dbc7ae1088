"""Version strings ordered exactly as Debian's `dpkg --compare-versions` orders them.

A version is `[epoch:]upstream[-revision]`: the epoch is the digits before the first colon, the revision is what
follows the last hyphen. Upstream and revision are compared as alternating runs of non-digits (character by
character: `~` before the end of the string, the end before letters, letters before everything else) and digits
(numerically, so leading zeros do not count). See Debian policy §5.6.12 and dpkg's lib/dpkg/version.c.

We are stricter than dpkg in three ways. It only warns about an upstream part that does not start with a digit
(`v1.4` sorts after every `1.x`, which is never what a user means) and about characters outside
`[A-Za-z0-9.+~:-]` (`[A-Za-z0-9.+~]` in the revision); we refuse both. Its strtol() takes a signed epoch (`+1:2.0`);
we refuse that too. Every version we accept, dpkg parses without a warning, and the two orderings agree on them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering

from abflasher.errors import InvalidArgument

# dpkg stores the epoch in an int and refuses anything larger.
_MAX_EPOCH = 2**31 - 1
#: The longest version we accept. Real versions are a few dozen characters; the bound keeps a hostile one (from a
#: caller, an image's /.ab_version or a channel) from costing time or memory, and out of error messages.
MAX_VERSION_LENGTH = 256

_ASCII_DIGITS = frozenset("0123456789")
_ASCII_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_UPSTREAM_CHARS = _ASCII_DIGITS | _ASCII_LETTERS | frozenset(".+~:-")
_REVISION_CHARS = _ASCII_DIGITS | _ASCII_LETTERS | frozenset(".+~")

_DIGIT_RUN = re.compile(r"[0-9]+")


def _order(char: str) -> int:
    """Weight of one non-digit character; the empty string stands for the end of the part."""
    if not char:
        return 0
    if char == "~":
        return -1
    if char in _ASCII_LETTERS:
        return ord(char)
    return ord(char) + 256


def _compare_part(left: str, right: str) -> int:
    """dpkg's verrevcmp() for one upstream or revision part; returns <0, 0 or >0."""
    i = j = 0
    while i < len(left) or j < len(right):
        # Non-digit run, character by character; a finished string compares as weight 0.
        while (i < len(left) and left[i] not in _ASCII_DIGITS) or (j < len(right) and right[j] not in _ASCII_DIGITS):
            left_weight = _order(left[i] if i < len(left) and left[i] not in _ASCII_DIGITS else "")
            right_weight = _order(right[j] if j < len(right) and right[j] not in _ASCII_DIGITS else "")
            if left_weight != right_weight:
                return left_weight - right_weight
            i += 1
            j += 1
        # Digit run, numerically; an absent run is 0.
        left_match = _DIGIT_RUN.match(left, i)
        right_match = _DIGIT_RUN.match(right, j)
        order = _compare_digits(left_match.group() if left_match else "", right_match.group() if right_match else "")
        if order:
            return order
        i = left_match.end() if left_match else i
        j = right_match.end() if right_match else j
    return 0


def _compare_digits(left: str, right: str) -> int:
    """Two runs of ASCII digits compared as the numbers they spell, without converting them (Python refuses to
    convert more than 4300 digits, and a long run would cost quadratic time): without leading zeros, the longer
    number is the larger, and numbers of equal length compare as strings."""
    left = left.lstrip("0")
    right = right.lstrip("0")
    if len(left) != len(right):
        return -1 if len(left) < len(right) else 1
    if left != right:
        return -1 if left < right else 1
    return 0


def _equality_key(part: str) -> tuple[tuple[str, str], ...]:
    """A form of one part that is equal for two parts exactly when _compare_part() finds them equal."""
    pairs: list[tuple[str, str]] = []
    position = 0
    while position < len(part):
        digits = _DIGIT_RUN.search(part, position)
        if digits is None:
            pairs.append((part[position:], ""))
            break
        pairs.append((part[position : digits.start()], digits.group().lstrip("0")))
        position = digits.end()
    # Only a leading all-digit run can give ("", ""): "0" and "" are the same part.
    while pairs and pairs[-1] == ("", ""):
        pairs.pop()
    return tuple(pairs)


def _sign(value: int) -> int:
    return (value > 0) - (value < 0)


@total_ordering
@dataclass(frozen=True, eq=False)
class Version:
    """A parsed version; compares, sorts and hashes the way dpkg compares (so `1.0 == 1.00 == 0:1.0-0`)."""

    epoch: int
    upstream: str
    revision: str = ""

    def __str__(self) -> str:
        # The epoch is shown when set, or when needed to keep a colon in upstream from being read as one.
        text = f"{self.epoch}:{self.upstream}" if self.epoch or ":" in self.upstream else self.upstream
        return f"{text}-{self.revision}" if self.revision else text

    def compare(self, other: Version) -> int:
        """-1, 0 or 1 as self is older than, equal to or newer than other."""
        if self.epoch != other.epoch:
            return -1 if self.epoch < other.epoch else 1
        result = _compare_part(self.upstream, other.upstream)
        if result == 0:
            result = _compare_part(self.revision, other.revision)
        return _sign(result)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self.compare(other) == 0

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self.compare(other) < 0

    def __hash__(self) -> int:
        return hash((self.epoch, _equality_key(self.upstream), _equality_key(self.revision)))


def parse_version(text: str) -> Version:
    """Parse `[epoch:]upstream[-revision]`, ignoring surrounding whitespace (a `/.ab_version` ends in a newline).

    Raises InvalidArgument naming what is wrong for anything dpkg would reject or warn about.
    """
    if len(text) > MAX_VERSION_LENGTH and len(text.strip()) > MAX_VERSION_LENGTH:
        # Not quoted: the text may be anything up to the size of a D-Bus message.
        raise InvalidArgument(
            f"version is {len(text.strip())} characters long; at most {MAX_VERSION_LENGTH} are allowed"
        )
    stripped = text.strip()
    if not stripped:
        raise InvalidArgument("version is empty; give one like 1.4.0")
    if any(char.isspace() for char in stripped):
        raise InvalidArgument(f"version {stripped!r} contains whitespace; give one like 1.4.0")

    epoch = 0
    rest = stripped
    epoch_text, colon, after_colon = stripped.partition(":")
    if colon:
        if not epoch_text:
            raise InvalidArgument(f"version {stripped!r} has an empty epoch before ':'")
        if not set(epoch_text) <= _ASCII_DIGITS:
            raise InvalidArgument(f"version {stripped!r} has an epoch {epoch_text!r} that is not a non-negative number")
        epoch = int(epoch_text)
        if epoch > _MAX_EPOCH:
            raise InvalidArgument(f"version {stripped!r} has an epoch larger than {_MAX_EPOCH}")
        if not after_colon:
            raise InvalidArgument(f"version {stripped!r} has nothing after the epoch's ':'")
        rest = after_colon

    upstream, hyphen, revision = rest.rpartition("-")
    if not hyphen:
        upstream, revision = rest, ""
    elif not revision:
        raise InvalidArgument(f"version {stripped!r} ends in '-': the revision after it is empty")

    if not upstream:
        raise InvalidArgument(f"version {stripped!r} has an empty upstream part")
    if upstream[0] not in _ASCII_DIGITS:
        raise InvalidArgument(f"version {stripped!r} must start with a digit (after any 'epoch:'), e.g. 1.4.0")
    bad_upstream = sorted(set(upstream) - _UPSTREAM_CHARS)
    if bad_upstream:
        raise InvalidArgument(
            f"version {stripped!r} contains {''.join(bad_upstream)!r}; only letters, digits and . + ~ - : are allowed"
        )
    bad_revision = sorted(set(revision) - _REVISION_CHARS)
    if bad_revision:
        raise InvalidArgument(
            f"version {stripped!r} has {''.join(bad_revision)!r} in its revision (after the last '-'); "
            "only letters, digits and . + ~ are allowed there"
        )
    return Version(epoch=epoch, upstream=upstream, revision=revision)


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as version `a` is older than, equal to or newer than `b`, like `dpkg --compare-versions`.

    Raises InvalidArgument if either is not a valid version (see parse_version).
    """
    return parse_version(a).compare(parse_version(b))
