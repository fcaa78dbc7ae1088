"""Real OpenSSH keys and signed releases for the tests of signed updates (abflasher/trust/)."""

from __future__ import annotations

import io
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from abflasher.trust.bundle import MANIFEST_MEMBER, SIGNATURE_MEMBER

NAMESPACE = "ab-flasher"


@dataclass(frozen=True)
class Key:
    private: Path
    principal: str

    @property
    def public(self) -> Path:
        return Path(f"{self.private}.pub")

    def allowed_line(self, options: str = "") -> str:
        key_type, blob = self.public.read_text().split()[:2]
        return " ".join(part for part in (self.principal, options, key_type, blob) if part)

    def sign(self, data: bytes, workdir: Path, namespace: str = NAMESPACE) -> bytes:
        """A signature made by ssh-keygen itself, as an owner would."""
        path = workdir / "to-sign"
        path.write_bytes(data)
        Path(f"{path}.sig").unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-Y", "sign", "-n", namespace, "-f", str(self.private), str(path)],
                       check=True, capture_output=True, timeout=60)
        return Path(f"{path}.sig").read_bytes()


def make_key(directory: Path, principal: str, key_type: str = "ed25519") -> Key:
    directory.mkdir(parents=True, exist_ok=True)
    private = directory / f"{principal}-{key_type}"
    subprocess.run(["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", principal, "-f", str(private)],
                   check=True, capture_output=True, timeout=60)
    return Key(private, principal)


def write_allowed_signers(path: Path, *lines: str) -> Path:
    path.write_text("# trusted keys of the tests\n" + "".join(f"{line}\n" for line in lines))
    return path


def tar_members(members: list[tuple[str, bytes]]) -> bytes:
    """A tar of ``members`` in this order, made with tarfile (ustar)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def bundle_of(manifest: bytes, signature: bytes, *artifacts: tuple[str, bytes]) -> bytes:
    return tar_members([(MANIFEST_MEMBER, manifest), (SIGNATURE_MEMBER, signature), *artifacts])
