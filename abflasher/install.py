"""The library entry point every front end uses: install one image into one target and prove it landed."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from abflasher import errors
from abflasher.disk.blockdev import ReadbackVerifier, open_target
from abflasher.image.destinations import TargetWriter
from abflasher.image.formats import ImageFormat
from abflasher.image.pipeline import Progress, ProgressCallback, StreamResult, stream_image
from abflasher.image.sources import ImageSource


@dataclass(frozen=True)
class InstallResult:
    target: str
    stream: StreamResult
    verified: bool
    seconds: float

    @property
    def image_size(self) -> int:
        return self.stream.image_size

    @property
    def sha256(self) -> str:
        return self.stream.image_sha256


def install_image(
    source: ImageSource,
    target: str | os.PathLike[str],
    *,
    expected_sha256: str | None = None,
    image_format: ImageFormat | None = None,
    gzip_impl: str = "auto",
    source_size: int | None = None,
    verify: bool = True,
    create: bool = False,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    mountinfo: str = "/proc/self/mountinfo",
    sys_root: str = "/sys",
) -> InstallResult:
    """Stream ``source`` into ``target``, then read the target back and compare sha256.

    Succeeds only when the read-back matches what was decoded (and, when given, ``expected_sha256`` matched the image
    or its compressed file). On failure the target is untouched (the image was rejected before any write) or its
    first block reads as zeros (see image.pipeline), and the exception says which error class it was.
    """
    started = time.monotonic()
    with open_target(target, mountinfo=mountinfo, sys_root=sys_root, create=create) as opened:
        # The exclusive fd stays open while verifying so nobody else can open the device for writing meanwhile.
        verifier = ReadbackVerifier(opened.path, cancel=cancel) if verify else None
        try:
            result = stream_image(
                source,
                TargetWriter(opened),
                expected_sha256=expected_sha256,
                image_format=image_format,
                gzip_impl=gzip_impl,
                source_size=source_size,
                progress=progress,
                cancel=cancel,
                verifier=verifier,
            )
            if verifier is not None:
                size = result.image_size

                def report(done: int) -> None:
                    if progress is not None:
                        progress(Progress("verifying", done, size, size))

                actual = verifier.finish(size, report)
                if actual != result.image_sha256:
                    raise errors.ChecksumMismatch(
                        f"read-back verification of {opened.path} failed: the device holds {actual} for the first "
                        f"{size} bytes, {result.image_sha256} was written (failing medium?)"
                    )
        finally:
            if verifier is not None:
                verifier.close()
    return InstallResult(os.fspath(target), result, verify, time.monotonic() - started)
