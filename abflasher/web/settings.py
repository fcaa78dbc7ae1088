"""The upload page's configuration, ``/etc/ab-flasher/web.conf`` (INI, one ``[web]`` section), and its password
hashes. A file of its own: it holds the password hash, readable by the page's user only (root:ab-flasher-web 0640),
while ab-flasher.conf stays world-readable."""

from __future__ import annotations

import base64
import configparser
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass

from abflasher import errors
from abflasher.config import read_config_text

DEFAULT_PATH = "/etc/ab-flasher/web.conf"
SECTION = "web"
ENABLED_VALUES = ("auto", "yes", "no")

#: scrypt parameters of new hashes (16 MiB of memory per check: slow to guess, cheap for a Pi 3 to verify once).
SCRYPT_N = 1 << 14
SCRYPT_R = 8
SCRYPT_P = 1
_SCRYPT_MAXMEM = 64 << 20


@dataclass(frozen=True)
class WebConfig:
    #: auto: serve only when the booted slot's role is recovery (update mode); yes: always (a recovery image sets
    #: this); no: never.
    enabled: str = "auto"
    listen_address: str = "0.0.0.0"
    port: int = 80
    #: PEM certificate and key: serve HTTPS instead of HTTP.
    tls_certificate: str = ""
    tls_key: str = ""
    #: ``ab-flasher-web --hash-password`` prints a value for it.
    password_hash: str = ""
    #: no: anyone who reaches the port may install an image (explicitly switched off).
    login_required: bool = True
    #: Host names (besides IP addresses, localhost and this machine's host name) the page answers to; a request for
    #: any other name is refused, which defeats DNS rebinding.
    allowed_hosts: tuple[str, ...] = ()
    #: Seconds a login lasts.
    session_lifetime: float = 12 * 3600.0

    @property
    def tls(self) -> bool:
        return bool(self.tls_certificate)


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise errors.InvalidArgument(f"{name} = {raw!r}: use yes or no")


def parse_web_config(text: str, *, source: str = "<web.conf>") -> WebConfig:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=source)
    except configparser.Error as exc:
        raise errors.InvalidArgument(f"cannot parse {source}: {exc}") from exc
    values = dict(parser.items(SECTION)) if parser.has_section(SECTION) else {}
    kwargs: dict[str, object] = {}
    for key, raw in values.items():
        name = key.replace("-", "_")
        where = f"{source}: {key}"
        value = raw.strip()
        if name in ("enabled",):
            if value not in ENABLED_VALUES:
                raise errors.InvalidArgument(f"{where} = {raw!r}: use auto, yes or no")
            kwargs[name] = value
        elif name in ("listen_address", "tls_certificate", "tls_key", "password_hash"):
            kwargs[name] = value
        elif name == "port":
            if not value.isdigit() or not 0 < int(value) < 65536:
                raise errors.InvalidArgument(f"{where} = {raw!r}: use a port number (1-65535)")
            kwargs[name] = int(value)
        elif name == "login_required":
            kwargs[name] = _bool(where, value)
        elif name == "allowed_hosts":
            kwargs[name] = tuple(value.lower().split())
        elif name == "session_lifetime":
            try:
                kwargs[name] = float(value)
            except ValueError:
                raise errors.InvalidArgument(f"{where} = {raw!r}: use a number of seconds") from None
        else:
            raise errors.InvalidArgument(f"{where}: unknown option")
    config = WebConfig(**kwargs)  # type: ignore[arg-type]
    if bool(config.tls_certificate) != bool(config.tls_key):
        raise errors.InvalidArgument(f"{source}: tls_certificate and tls_key go together; set both or neither")
    if config.password_hash and not _parse_hash(config.password_hash):
        raise errors.InvalidArgument(
            f"{source}: password_hash is not a hash made by ab-flasher-web --hash-password"
        )
    return config


def load_web_config(path: str | os.PathLike[str] = DEFAULT_PATH) -> WebConfig:
    """The configuration at ``path``; a missing file means all defaults (off unless in update mode; no password,
    so no login succeeds until one is set)."""
    return parse_web_config(read_config_text(path), source=os.fspath(path))


# ---------------------------------------------------------------------------------------------------------------------
# Password hashes: scrypt$N$r$p$salt$hash (base64), the parameters stored so they can grow.


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=_SCRYPT_MAXMEM)
    encode = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${encode(salt).decode()}${encode(digest).decode()}"


def _parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes] | None:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return None
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except ValueError:
        return None
    if n < 2 or n & (n - 1) or not 0 < r <= 64 or not 0 < p <= 16 or not salt or not digest:
        return None
    return n, r, p, salt, digest


def verify_password(password: str, stored: str) -> bool:
    parsed = _parse_hash(stored)
    if parsed is None:
        return False
    n, r, p, salt, digest = parsed
    try:
        candidate = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(digest),
                                   maxmem=max(_SCRYPT_MAXMEM, 130 * n * r * p))
    except ValueError:
        return False
    return hmac.compare_digest(candidate, digest)
