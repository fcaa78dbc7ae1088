"""The command-line side of signed updates: ``ab-flasher bundle`` (publish), bundles given to ``ab-flasher write``,
and ``abflasherctl info FILE`` (inspect a bundle without installing it, like ``rauc info``)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from abflasher import errors
from abflasher.config import Config, load_config
from abflasher.image.pipeline import read_head
from abflasher.image.sources import FileSource, ImageSource, PrefixedSource
from abflasher.trust.bundle import BundleReader, bundle_members, is_bundle
from abflasher.trust.manifest import format_time, parse_time
from abflasher.trust.publish import COMPRESSORS, Release, publish
from abflasher.trust.updates import VerifiedManifest, trusted_keys, verify_manifest

DAY = 86400


def add_bundle_parser(commands: Any) -> None:
    bundle = commands.add_parser(
        "bundle",
        help="publish a release: compressed image, signed manifest (a channel) and a bundle",
        description="Write into OUTPUT_DIR the compressed image, the optional boot artifact, manifest.json and its "
        "OpenSSH signature manifest.json.sig (serve the directory as a channel from any web server), and "
        "NAME-VERSION.bundle.tar (the same, as one file for a USB stick or the upload page). See docs/publishing.md.",
    )
    bundle.add_argument("image", metavar="IMAGE", type=Path, help="the root file system image, raw or compressed")
    bundle.add_argument("--version", dest="release_version", required=True, help="the release's version, e.g. 1.4.0")
    bundle.add_argument("--compatible", required=True, help="the devices it is for (their compatible= string)")
    bundle.add_argument("--key", required=True, help="signing key: a private key file, or a public key (.pub) whose "
                        "private half is in the ssh agent (a FIDO2 key, a smart card)")
    bundle.add_argument("--agent", action="store_true", help="sign with the ssh agent's key matching --key")
    bundle.add_argument("-o", "--output-dir", type=Path, default=Path("."), help="where to write (default: here)")
    bundle.add_argument("--boot-artifact", type=Path, help="the slot's boot files: a tar (prefix layout) or a FAT "
                        "image (autoboot layout)")
    bundle.add_argument("--compression", choices=[*COMPRESSORS, "none"], default="xz",
                        help="how to compress a raw image (default xz; a compressed image is kept as it is)")
    bundle.add_argument("--name", default="update", help="file name prefix (default: update)")
    expiry = bundle.add_mutually_exclusive_group()
    expiry.add_argument("--expires", help="expiry time, RFC 3339 (e.g. 2027-03-01T00:00:00Z)")
    expiry.add_argument("--expires-in-days", type=int, help="expiry, in days from now")
    bundle.add_argument("--created", help="creation time, RFC 3339 (default: now)")
    bundle.add_argument("--min-version", default="", help="the oldest version this one may be installed over")
    bundle.add_argument("--release-notes", type=Path, help="a text file of release notes")
    bundle.add_argument("--delta", action="store_true",
                        help="also publish the chunked form for delta updates (casync index NAME-VERSION.caibx, chunks "
                        "added to OUTPUT_DIR/default.castr, shared by the releases published there) and list it in "
                        "the channel's manifest")
    bundle.add_argument("--json", action="store_true", help="print what was written as one JSON object")


def run_bundle(args: argparse.Namespace) -> int:
    created = parse_time(args.created, "--created") if args.created else int(time.time())
    expires = parse_time(args.expires, "--expires") if args.expires else None
    if args.expires_in_days is not None:
        expires = created + args.expires_in_days * DAY
    notes = ""
    if args.release_notes is not None:
        try:
            notes = args.release_notes.read_text(encoding="utf-8")
        except OSError as exc:
            raise errors.InvalidArgument(f"cannot read {args.release_notes}: {exc.strerror}") from exc
    if not args.image.is_file():
        raise errors.InvalidArgument(f"image {args.image} is not a file")
    published = publish(Release(
        image=args.image, version=args.release_version, compatible=args.compatible, output_dir=args.output_dir,
        key=args.key, agent=args.agent, boot_artifact=args.boot_artifact, compression=args.compression,
        name=args.name, created=created, expires=expires, min_version=args.min_version, release_notes=notes,
        delta=args.delta,
    ))
    if args.json:
        print(json.dumps({"manifest": str(published.manifest), "signature": str(published.signature),
                          "bundle": str(published.bundle), "artifacts": [str(p) for p in published.artifacts],
                          "delta_index": str(published.delta_index) if published.delta_index else None,
                          "delta_store": str(published.delta_store) if published.delta_store else None}))
    else:
        print(f"bundle:  {published.bundle}")
        print(f"channel: {published.manifest}, {published.signature.name}, "
              f"{', '.join(p.name for p in published.artifacts)} (serve these files from one directory)")
        if published.delta_index is not None and published.delta_store is not None:
            print(f"delta:   {published.delta_index.name} and {published.delta_store.name}/ (serve them next to "
                  "the manifest; keep the store and earlier indexes there)")
    return 0


def open_for_write(spec_source: ImageSource, config_path: str) -> tuple[ImageSource, str | None, str]:
    """``ab-flasher write``'s source: a bundle's verified image and its sha256, or the plain image; and a note for
    the output."""
    config = load_config(config_path)
    head = read_head(spec_source)
    if not is_bundle(head):
        if trusted_keys(config) is not None:
            raise errors.Unsigned(
                f"{spec_source.description} is not a signed bundle and trusted keys are configured "
                f"({config.trusted_keys})"
            )
        return PrefixedSource(spec_source, head), None, ""
    reader = BundleReader(spec_source, head, f"the bundle {spec_source.description}")
    raw, signature = reader.read_manifest()
    verified = verify_manifest(config, raw, signature, at=time.time())
    image = bundle_members(verified.manifest)[0]
    note = f"bundle version {verified.manifest.version} for {verified.manifest.compatible}, " + (
        f"signed by {verified.signer}" if verified.signer else "signature not checked (no trusted keys configured)")
    if verified.manifest.boot() is not None:
        note += "; its boot artifact is not written (only an update installs a slot's boot files)"
    return reader.artifact(image), image.sha256, note


def describe(verified: VerifiedManifest, signature_error: str) -> dict[str, Any]:
    manifest = verified.manifest
    return {
        "version": manifest.version,
        "compatible": manifest.compatible,
        "created": format_time(manifest.created),
        "expires": format_time(manifest.expires) if manifest.expires is not None else None,
        "min_version": manifest.min_version or None,
        "signer": str(verified.signer) if verified.signer else None,
        "signature": "valid" if verified.signer else signature_error,
        "release_notes": manifest.release_notes,
        "artifacts": [a.to_json() for a in manifest.artifacts],
    }


def inspect_bundle(path: str, keys: str) -> dict[str, Any]:
    """What ``abflasherctl info`` shows: the manifest of the bundle at ``path`` and whether ``keys`` (an
    allowed_signers file) trusts its signature. Reads the manifest and signature only, never the image."""
    source = FileSource(path)
    try:
        head = read_head(source)
        if not is_bundle(head):
            raise errors.BadBundle(f"{path} is not a bundle (a tar file made by `ab-flasher bundle`)")
        reader = BundleReader(source, head, f"the bundle {path}")
        raw, signature = reader.read_manifest()
    finally:
        source.close()
    error = ""
    try:
        verified = verify_manifest(Config(trusted_keys=keys), raw, signature, at=time.time())
        if verified.signer is None:
            error = f"not checked: no trusted keys in {keys}"
    except errors.Signature as exc:
        error = f"NOT TRUSTED: {exc}"
        verified = verify_manifest(Config(trusted_keys=""), raw, signature, at=time.time())
    info = describe(verified, error)
    info["bundle"] = os.fspath(path)
    info["bundle_size"] = os.path.getsize(path)
    return info


def print_info(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(info))
        return
    print(f"bundle:     {info['bundle']} ({info['bundle_size']} bytes)")
    print(f"version:    {info['version']}")
    print(f"compatible: {info['compatible']}")
    print(f"created:    {info['created']}" + (f", expires {info['expires']}" if info["expires"] else ""))
    if info["min_version"]:
        print(f"installs over: {info['min_version']} or newer")
    print(f"signature:  {info['signature']}" + (f" ({info['signer']})" if info["signer"] else ""))
    for artifact in info["artifacts"]:
        compressed = artifact.get("compressed_size")
        print(f"artifact:   {artifact['name']}: {artifact['url']} ({artifact['format']}, {artifact['size']} bytes"
              + (f", {compressed} compressed" if compressed is not None else "") + f", sha256 {artifact['sha256']})")
    if info["release_notes"]:
        print("release notes:")
        for line in str(info["release_notes"]).splitlines():
            print(f"  {line}")

