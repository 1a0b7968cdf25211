"""Uploaded reference images: size-limited, decoded by the project's one decoder, re-encoded,
and stored outside the served tree (a private temporary directory) with expiry.

The store is purely on disk (one ``<id>.jpg`` file per upload, expiry by modification time),
so several server worker processes can share it through the same directory.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import shutil
import tempfile
import time
import weakref
from pathlib import Path

from PIL import Image

from calibclip.data.images import ImageError, load_image

#: Upload ids are ``u-`` followed by 32 lowercase hex digits; nothing else is ever looked up.
UPLOAD_ID_RE = re.compile(r"^u-[0-9a-f]{32}$")


class UploadError(ValueError):
    """An upload that was refused. ``status`` is the HTTP status the API answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class UploadStore:
    """Private store of re-encoded uploads.

    max_bytes:   largest accepted upload (encoded size).
    max_pixels:  largest accepted decoded size (width * height); bigger files, including
                 decompression bombs, are refused before their pixels are decoded.
    max_side:    uploads are downscaled so that their longest side is at most this.
    ttl_s:       uploads older than this are deleted (lazily, on the next upload or lookup).
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        max_bytes: int = 10 * 1024 * 1024,
        max_pixels: int = 40_000_000,
        max_side: int = 1024,
        ttl_s: float = 3600.0,
    ):
        self._owned = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="calibclip-uploads-"))
        self.root.mkdir(parents=True, exist_ok=True)
        # an owned folder is removed by close(), or at the latest when the store is collected / at exit
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.root), True) if self._owned else None
        os.chmod(self.root, 0o700)
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.max_side = max_side
        self.ttl_s = ttl_s

    def add(self, data: bytes) -> str:
        """Validate ``data`` by decoding it, re-encode it as JPEG and return its new id."""
        if len(data) > self.max_bytes:
            raise UploadError(413, f"upload is {len(data):,} bytes; the limit is {self.max_bytes:,} bytes")
        try:
            img = load_image(data, max_pixels=self.max_pixels)
        except ImageError as exc:
            status = 413 if exc.reason == "too_large" else 400
            raise UploadError(status, f"not a usable image ({exc.reason}): {exc}".replace("<bytes>: ", "")) from exc
        img.thumbnail((self.max_side, self.max_side), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=92)
        upload_id = "u-" + secrets.token_hex(16)
        tmp = self.root / f".{upload_id}.tmp"
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, self.root / f"{upload_id}.jpg")
        self.expire()
        return upload_id

    def path(self, upload_id: str) -> Path | None:
        """Stored file of a live upload, or None (unknown, malformed or expired id)."""
        if not isinstance(upload_id, str) or not UPLOAD_ID_RE.match(upload_id):
            return None
        path = self.root / f"{upload_id}.jpg"
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            return None
        if age > self.ttl_s:
            path.unlink(missing_ok=True)
            return None
        return path

    def size(self, upload_id: str) -> tuple[int, int]:
        """``(width, height)`` of a live upload (our own re-encoded JPEG).

        Raises:
            FileNotFoundError: unknown or expired id.
        """
        path = self.path(upload_id)
        if path is None:
            raise FileNotFoundError(f"upload {upload_id!r} not found (expired?)")
        with Image.open(path) as img:
            return img.size

    def expire(self) -> int:
        """Delete uploads older than ``ttl_s``; returns how many were removed."""
        removed = 0
        cutoff = time.time() - self.ttl_s
        for path in self.root.glob("u-*.jpg"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except OSError:
                continue
        return removed

    def close(self) -> None:
        """Remove the store's directory if this object created it."""
        if self._cleanup is not None:
            self._cleanup()
