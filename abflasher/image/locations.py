"""Where an image or a file comes from, as text: URL checks and the form of a URL fit to be shown.

Kept free of requests so that local installs, the service's state and its messages can use it without loading the
HTTP stack (which costs ~17 MB of memory and 70 ms of start-up).
"""

from __future__ import annotations

import re
import urllib.parse

from abflasher import errors

SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# user:password@ in a URL anywhere in a text, and a query string (which often carries a token).
_USERINFO_RE = re.compile(r"(?<=://)[^/?#@\s]*@")
_QUERY_RE = re.compile(r"\?[^\s'\"<>()]*")


def redact_url(url: str) -> str:
    """``url`` fit for messages, logs and the state file: no user/password, no query string or fragment."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<malformed URL>"
    if not parts.scheme:
        return url.split("?", 1)[0].split("#", 1)[0]
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def redact_text(text: str) -> str:
    """``text`` with credentials and query strings cut out of any URL in it (for messages of other libraries,
    which quote the URL they were given)."""
    return _QUERY_RE.sub("", _USERINFO_RE.sub("", text))


def check_http_url(url: str, label: str = "image") -> None:
    """Raise InvalidArgument unless ``url`` is an http:// or https:// URL with a host."""
    match = SCHEME_RE.match(url)
    if match is None:
        raise errors.InvalidArgument(f"{label} URL {redact_url(url)!r} has no scheme: use http:// or https://")
    scheme = match.group(1).lower()
    if scheme not in ("http", "https"):
        raise errors.InvalidArgument(
            f"{label} URL scheme {scheme}:// is not supported: use an http:// or https:// URL"
        )
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        _ = parts.port  # a port that is not a number raises here
    except ValueError as exc:
        # Not urllib's own words: they quote the part it could not read, which may be a password.
        raise errors.InvalidArgument(
            f"{label} URL is malformed: its host or port cannot be read (give http://host[:port]/path)"
        ) from exc
    if not host:
        raise errors.InvalidArgument(f"{label} URL {redact_url(url)!r} has no host name")
