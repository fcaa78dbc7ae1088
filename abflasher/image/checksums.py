"""Expected SHA-256 of an image: given as text, or read from a checksum file (local text or over HTTP(S)).

Checksum files come in the shapes the usual tools write: ``sha256sum`` (``HEX  name`` / ``HEX *name``), BSD and
openssl (``SHA256 (name) = HEX``), a bare hash, and any of these inside a PGP clear-signed message (the signature
itself is not checked here). A file that cannot be read unambiguously is an error, never a skipped verification.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Unpack

from abflasher import errors

if TYPE_CHECKING:
    from abflasher.image.http import HttpOptions

MAX_CHECKSUM_FILE_BYTES = 1024 * 1024

_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
# Lengths of other digests people paste by mistake, to say what they gave instead of just "wrong".
_OTHER_DIGESTS = {32: "an MD5", 40: "a SHA-1", 56: "a SHA-224", 96: "a SHA-384", 128: "a SHA-512"}

_GNU_LINE_RE = re.compile(r"(?P<hex>[0-9A-Fa-f]+)(?:[ \t]+\*?(?P<name>.*))?")
_BSD_LINE_RE = re.compile(r"(?P<algo>[A-Za-z0-9-]+)\s*\((?P<name>.*)\)\s*=\s*(?P<hex>[0-9A-Fa-f]+)")
_SHA256_NAMES = frozenset({"sha256", "sha2-256"})


@dataclass(frozen=True)
class _Entry:
    digest: str
    name: str | None
    line: int


def normalize_sha256(text: str) -> str:
    """``text`` as 64 lowercase hex digits; InvalidArgument saying what is wrong otherwise."""
    value = text.strip()
    if not value:
        raise errors.InvalidArgument("the SHA-256 checksum is empty: give 64 hex digits")
    bad = next((ch for ch in value if ch not in _HEX_DIGITS), None)
    if bad is not None:
        raise errors.InvalidArgument(
            f"the SHA-256 checksum contains {bad!r}, which is not a hex digit: give exactly 64 hex digits"
        )
    if len(value) != 64:
        what = _OTHER_DIGESTS.get(len(value))
        hint = f" (that is the length of {what} checksum)" if what else ""
        raise errors.InvalidArgument(
            f"the SHA-256 checksum has {len(value)} hex digits{hint}; a SHA-256 checksum has exactly 64"
        )
    return value.lower()


def parse_checksum_file(
    text: str, image_name: str | None, *, origin: str = "checksum file", quote: bool = True
) -> str:
    """The lowercase SHA-256 for ``image_name`` listed in a checksum file's ``text``.

    A file with a single entry gives that entry whatever name it carries (images get renamed on mirrors); a file
    with several gives the one whose base name is the base name of ``image_name``. ``origin`` names the file in
    error messages; with ``quote`` False they never show its text (a downloaded file's content is not the service's
    to repeat to every bus client), only line numbers.
    """
    entries = _parse_entries(text, origin, quote)
    if not entries:
        raise errors.InvalidArgument(f"{origin} lists no SHA-256 checksums")
    wanted = _base_name(image_name) if image_name else None
    if wanted is not None:
        matching = [entry for entry in entries if entry.name is not None and _base_name(entry.name) == wanted]
        if matching:
            digests = {entry.digest for entry in matching}
            if len(digests) > 1:
                lines = ", ".join(str(entry.line) for entry in matching)
                raise errors.InvalidArgument(
                    f"{origin} lists {wanted} with different checksums (lines {lines}); cannot tell which is right"
                )
            return matching[0].digest
    if len({entry.digest for entry in entries}) == 1:
        return entries[0].digest
    listed = ", ".join(sorted({entry.name or "(no name)" for entry in entries}))
    if not quote:
        listed = f"{len({entry.name for entry in entries})} other names"
    if wanted is None:
        raise errors.InvalidArgument(
            f"{origin} lists {len(entries)} files ({_shorten(listed)}); name the image so the right one is used"
        )
    raise errors.InvalidArgument(f"{origin} has no entry for {wanted} (it lists {_shorten(listed)})")


def fetch_checksum(
    url: str,
    image_name: str | None,
    *,
    max_bytes: int = MAX_CHECKSUM_FILE_BYTES,
    **http_options: Unpack[HttpOptions],
) -> str:
    """Download the checksum file at ``url`` and return the SHA-256 it lists for ``image_name``.

    Every failure raises: a missing checksum file must stop the install, not turn verification off. The errors
    never quote the file (see parse_checksum_file).
    """
    # Imported here: requests costs a local install 60 ms of start-up and 17 MB it never uses.
    from abflasher.image.http import HttpSource, HttpStatusError
    from abflasher.image.locations import check_http_url, redact_url

    check_http_url(url, "checksum file")
    where = redact_url(url)
    options = http_options.copy()
    options["label"] = "checksum file"
    try:
        source = HttpSource(url, **options)
    except HttpStatusError as exc:
        if exc.status == 404:
            raise errors.Network(
                f"checksum file {where} not found (HTTP 404); refusing to install without verification"
            ) from exc
        raise
    too_big = errors.InvalidArgument(
        f"checksum file {where} is larger than {max_bytes} bytes; is the checksum URL right?"
    )
    try:
        if source.size is not None and source.size > max_bytes:
            raise too_big
        chunks: list[bytes] = []
        received = 0
        while True:
            chunk = source.read(64 * 1024)
            if not chunk:
                break
            received += len(chunk)
            if received > max_bytes:
                raise too_big
            chunks.append(chunk)
    finally:
        source.close()
    try:
        text = b"".join(chunks).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise errors.InvalidArgument(
            f"checksum file {where} is not UTF-8 text (byte {exc.start}); is the checksum URL right?"
        ) from exc
    return parse_checksum_file(text, image_name, origin=f"checksum file {where}", quote=False)


def _parse_entries(text: str, origin: str, quote: bool) -> list[_Entry]:
    entries: list[_Entry] = []
    in_signature = False
    in_armor_header = False
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        # PGP clear-signed files: skip the armor header and the signature block, undo dash-escaping.
        if line == "-----BEGIN PGP SIGNED MESSAGE-----":
            in_armor_header = True
            continue
        if in_armor_header:
            in_armor_header = bool(line)
            continue
        if line == "-----BEGIN PGP SIGNATURE-----":
            in_signature = True
            continue
        if in_signature:
            in_signature = line != "-----END PGP SIGNATURE-----"
            continue
        line = line.removeprefix("- ")
        if not line or line.startswith("#"):
            continue
        entries.append(_parse_line(line, number, origin, quote))
    return entries


def _parse_line(line: str, number: int, origin: str, quote: bool) -> _Entry:
    where = f"{origin} line {number}"
    bsd = _BSD_LINE_RE.fullmatch(line)
    if bsd is not None:
        algo = bsd.group("algo").lower()
        if algo not in _SHA256_NAMES:
            algo_shown = bsd.group("algo") if quote else "other"
            raise errors.InvalidArgument(f"{where} holds an {algo_shown} checksum; a SHA-256 one is needed")
        return _Entry(_digest(bsd.group("hex"), where), bsd.group("name"), number)
    # sha256sum marks a name holding a backslash or newline by starting the line with a backslash.
    escaped = line.startswith("\\")
    gnu = _GNU_LINE_RE.fullmatch(line[1:] if escaped else line)
    if gnu is None:
        shown = (repr(line) if len(line) <= 60 else repr(line[:57] + "...")) + " " if quote else ""
        raise errors.InvalidArgument(
            f"{where} is not a checksum line: {shown}(expected 'HEX  name' or 'SHA256 (name) = HEX')"
        )
    name = gnu.group("name")
    if name is not None:
        name = name.strip()
        if escaped:
            name = _unescape(name)
        name = name or None
    return _Entry(_digest(gnu.group("hex"), where), name, number)


def _digest(hex_text: str, where: str) -> str:
    if len(hex_text) != 64:
        what = _OTHER_DIGESTS.get(len(hex_text))
        kind = f"looks like {what} checksum" if what else "is not a SHA-256 checksum"
        raise errors.InvalidArgument(f"{where}: the {len(hex_text)}-digit hash {kind}; a SHA-256 has 64 hex digits")
    return hex_text.lower()


def _unescape(name: str) -> str:
    out: list[str] = []
    chars = iter(name)
    for ch in chars:
        if ch != "\\":
            out.append(ch)
            continue
        nxt = next(chars, "")
        out.append("\n" if nxt == "n" else "\r" if nxt == "r" else nxt)
    return "".join(out)


def _base_name(name: str) -> str:
    return posixpath.basename(name.replace("\\", "/").rstrip("/"))


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
