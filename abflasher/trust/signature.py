"""OpenSSH signatures (``ssh-keygen -Y sign -n ab-flasher``) checked against an ``allowed_signers`` file.

The checking is done by ``ssh-keygen`` itself (``-Y find-principals`` then ``-Y verify``) as a child process: the
device accepts exactly what OpenSSH accepts (key types, FIDO2 keys, certificates, ``namespaces=``, ``valid-after`` /
``valid-before``), and a signature made by any OpenSSH tool verifies here and the other way round, by construction.
What this module parses itself (the signature's public key, the allowed_signers lines) only serves to say *why*
ssh-keygen refused: an unknown key and a trusted key outside its validity are different errors.

Times are checked at the device's time floor (``-O verify-time=``), not at the system clock, which a Pi without a
real-time clock may have set to 1970 or to a stale fake-hwclock value (see abflasher/trust/freshness.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from abflasher import errors

NAMESPACE = "ab-flasher"
SSH_KEYGEN = "ssh-keygen"
#: A signature is a few hundred bytes (a FIDO2 or RSA-4096 one under 2 KiB): anything far larger is not one.
MAX_SIGNATURE_SIZE = 16 << 10
SSH_KEYGEN_TIMEOUT = 60.0

_ARMOR_BEGIN = b"-----BEGIN SSH SIGNATURE-----"
_ARMOR_END = b"-----END SSH SIGNATURE-----"
_KEY_TYPE_RE = re.compile(r"^(ssh-|ecdsa-|sk-|rsa-)")


@dataclass(frozen=True)
class Signer:
    """Who signed: the principals allowed_signers names for the key, and the key's fingerprint."""

    principals: tuple[str, ...]
    fingerprint: str
    key_type: str

    def __str__(self) -> str:
        return f"{', '.join(self.principals)} ({self.key_type} {self.fingerprint})"


@dataclass(frozen=True)
class AllowedSigner:
    """One line of an allowed_signers file (ssh-keygen(1), ALLOWED SIGNERS)."""

    principals: str
    options: dict[str, str]
    key_type: str
    key_blob: bytes


def fingerprint(key_blob: bytes) -> str:
    """The SHA256 fingerprint OpenSSH shows (``ssh-keygen -l``)."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key_blob).digest()).decode().rstrip("=")


def _split_outside_quotes(text: str, separator: str | None) -> list[str]:
    parts: list[str] = []
    current = ""
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if not quoted and (char == separator or (separator is None and char.isspace())):
            if current:
                parts.append(current)
            current = ""
            continue
        current += char
    if current:
        parts.append(current)
    return parts


def parse_allowed_signers(text: str) -> list[AllowedSigner]:
    """The usable lines of an allowed_signers file; lines this parser cannot read are left to ssh-keygen."""
    signers = []
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        fields = _split_outside_quotes(line, None)
        if len(fields) < 3:
            continue
        options: dict[str, str] = {}
        key_at = 1
        if not _KEY_TYPE_RE.match(fields[1]):
            for option in _split_outside_quotes(fields[1], ","):
                name, _, value = option.partition("=")
                options[name.lower()] = value.strip('"')
            key_at = 2
        if len(fields) <= key_at + 1:
            continue
        try:
            blob = base64.b64decode(fields[key_at + 1], validate=True)
        except binascii.Error:
            continue
        signers.append(AllowedSigner(fields[0], options, fields[key_at], blob))
    return signers


def read_allowed_signers(path: str | os.PathLike[str]) -> list[AllowedSigner]:
    """The keys of ``path``; none when it does not exist. Unreadable is an error: silently trusting nothing would
    fall back to unsigned updates."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise errors.InvalidArgument(f"cannot read the trusted keys {os.fspath(path)}: {exc}") from exc
    return parse_allowed_signers(text)


def _ssh_string(blob: bytes, at: int) -> tuple[bytes, int]:
    if at + 4 > len(blob):
        raise ValueError("truncated")
    length = int.from_bytes(blob[at : at + 4], "big")
    end = at + 4 + length
    if end > len(blob):
        raise ValueError("truncated")
    return blob[at + 4 : end], end


@dataclass(frozen=True)
class SignatureInfo:
    """What an armored OpenSSH signature says about itself (nothing here is trusted before ssh-keygen agrees)."""

    key_blob: bytes
    key_type: str
    namespace: str

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key_blob)


def read_signature(signature: bytes) -> SignatureInfo:
    """Unpack an ``-----BEGIN SSH SIGNATURE-----`` block (PROTOCOL.sshsig); Unsigned when it is empty,
    BadSignature when it is not one."""
    text = signature.strip()
    if not text:
        raise errors.Unsigned("the update is not signed: its signature is empty")
    if len(signature) > MAX_SIGNATURE_SIZE:
        raise errors.ManifestTooLarge(
            f"the signature is {len(signature)} bytes; an OpenSSH signature is far smaller (limit "
            f"{MAX_SIGNATURE_SIZE})"
        )
    if not text.startswith(_ARMOR_BEGIN) or not text.endswith(_ARMOR_END):
        raise errors.BadSignature("the signature is not an OpenSSH signature (ssh-keygen -Y sign -n ab-flasher)")
    body = b"".join(text[len(_ARMOR_BEGIN) : -len(_ARMOR_END)].split())
    try:
        blob = base64.b64decode(body, validate=True)
        if not blob.startswith(b"SSHSIG"):
            raise ValueError("no SSHSIG magic")
        at = 6 + 4  # magic, version
        key_blob, at = _ssh_string(blob, at)
        namespace, at = _ssh_string(blob, at)
        key_type, _ = _ssh_string(key_blob, 0)
    except (binascii.Error, ValueError) as exc:
        raise errors.BadSignature(f"the signature is malformed ({exc})") from exc
    return SignatureInfo(key_blob, key_type.decode("ascii", "replace"), namespace.decode("utf-8", "replace"))


def _verify_time_option(at: float) -> str:
    return "verify-time=" + time.strftime("%Y%m%d%H%M%SZ", time.gmtime(at))


def _run_ssh_keygen(args: list[str], *, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(
            [SSH_KEYGEN, *args], input=data if data is not None else b"", capture_output=True,
            timeout=SSH_KEYGEN_TIMEOUT, check=False,
        )
    except FileNotFoundError as exc:
        raise errors.Internal("ssh-keygen is not installed (Debian package openssh-client)") from exc
    except subprocess.TimeoutExpired as exc:
        raise errors.Internal(f"ssh-keygen did not answer within {SSH_KEYGEN_TIMEOUT:g} s") from exc


def _why_not_found(info: SignatureInfo, allowed: list[AllowedSigner], at: float) -> errors.Signature:
    """The error for a key ssh-keygen found no principal for at time ``at``."""
    for entry in allowed:
        if entry.key_blob == info.key_blob:
            window = ", ".join(f"{name}={entry.options[name]}" for name in ("valid-after", "valid-before")
                               if name in entry.options)
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))
            if window:
                return errors.KeyNotValid(
                    f"the update is signed by {entry.principals}'s key {info.fingerprint}, which is trusted only "
                    f"{window} (checked at {when})"
                )
    return errors.UntrustedKey(
        f"the update is signed by an untrusted key ({info.key_type} {info.fingerprint}): it is not in the trusted "
        "keys (allowed_signers)"
    )


def verify(
    data: bytes,
    signature: bytes,
    allowed_signers: str | os.PathLike[str],
    *,
    at: float,
    workdir: str | None = None,
) -> Signer:
    """Check that ``signature`` is a valid ``ab-flasher`` signature of ``data`` by a key that allowed_signers
    trusts at time ``at``; the signer, or Unsigned / UntrustedKey / KeyNotValid / BadSignature."""
    info = read_signature(signature)
    if info.namespace != NAMESPACE:
        raise errors.BadSignature(
            f"the signature is for namespace {info.namespace!r}, not {NAMESPACE!r} (sign with -n {NAMESPACE})"
        )
    allowed = read_allowed_signers(allowed_signers)
    with tempfile.TemporaryDirectory(prefix="abflasher-sig-", dir=workdir) as tmp:
        sig_path = Path(tmp) / "manifest.sig"
        sig_path.write_bytes(signature)
        verify_time = _verify_time_option(at)
        found = _run_ssh_keygen(
            ["-Y", "find-principals", "-s", str(sig_path), "-f", os.fspath(allowed_signers), "-O", verify_time]
        )
        principals = tuple(line for line in found.stdout.decode("utf-8", "replace").splitlines() if line.strip())
        if found.returncode != 0 or not principals:
            raise _why_not_found(info, allowed, at)
        checked = _run_ssh_keygen(
            ["-Y", "verify", "-f", os.fspath(allowed_signers), "-I", principals[0], "-n", NAMESPACE,
             "-s", str(sig_path), "-O", verify_time],
            data=data,
        )
    if checked.returncode != 0:
        for entry in allowed:
            namespaces = entry.options.get("namespaces")
            if entry.key_blob == info.key_blob and namespaces is not None and NAMESPACE not in namespaces.split(","):
                raise errors.UntrustedKey(
                    f"the update is signed by {entry.principals}'s key {info.fingerprint}, which is trusted only for "
                    f"namespaces={namespaces}, not {NAMESPACE}"
                )
        raise errors.BadSignature(
            f"the signature by {principals[0]} ({info.fingerprint}) does not match the manifest: it was changed "
            "after signing, or the signature belongs to another file"
        )
    return Signer(principals, info.fingerprint, info.key_type)


def sign_file(path: str | os.PathLike[str], key: str | os.PathLike[str], *, agent: bool = False) -> bytes:
    """Sign the file ``path`` with ssh-keygen (``-Y sign -n ab-flasher``), writing ``path.sig``; returns the
    signature. ``key`` is a private key file, or with ``agent`` (or a ``.pub`` file) a public key whose private half
    the ssh agent holds (a FIDO2 key, a smart card)."""
    signature_path = Path(os.fspath(path) + ".sig")
    signature_path.unlink(missing_ok=True)
    args = ["-Y", "sign", "-n", NAMESPACE, "-f", os.fspath(key)]
    if agent:
        args.insert(2, "-U")
    args.append(os.fspath(path))
    # Not captured: ssh-keygen may ask for the key's passphrase or a touch of the hardware key on the terminal.
    try:
        done = subprocess.run([SSH_KEYGEN, *args], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=600)
    except FileNotFoundError as exc:
        raise errors.Internal("ssh-keygen is not installed (Debian package openssh-client)") from exc
    if done.returncode != 0 or not signature_path.exists():
        message = done.stderr.decode("utf-8", "replace").strip()
        raise errors.Signature(f"ssh-keygen could not sign {os.fspath(path)} with {os.fspath(key)}: {message}")
    return signature_path.read_bytes()
