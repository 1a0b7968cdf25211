"""Download of the official OpenAI CLIP weights into a local cache.

Nothing else in calibclip opens a network connection. A download announces itself on stderr (what,
from where, to where) before connecting; ``CALIBCLIP_OFFLINE=1`` refuses every download (cached,
verified files are still used).

Files go to ``$CALIBCLIP_CACHE`` (default ``~/.cache/calibclip``). Every URL carries the file's
SHA-256 in its path; the download is streamed into ``<file>.part``, resumed with an HTTP
``Range`` request when a partial file exists, verified, then atomically renamed. A verified file
gets a small ``<file>.sha256`` marker so later loads skip re-hashing (size and hash are checked).
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from calibclip.models.pretrained import PRETRAINED
from calibclip.utils import progress_bar

#: Official OpenAI checkpoints (TorchScript archives), from the weights table `calibclip.models.pretrained`;
#: the path segment before the file name is the file's SHA-256.
OPENAI_URLS: dict[str, str] = {name: w.url for name, w in PRETRAINED.items() if w.url and w.source == "OpenAI"}

_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """``$CALIBCLIP_CACHE`` or ``~/.cache/calibclip``."""
    return Path(os.environ.get("CALIBCLIP_CACHE") or Path.home() / ".cache" / "calibclip")


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def expected_sha256(url: str) -> str:
    """The SHA-256 embedded in an OpenAI URL (the path segment before the file name)."""
    digest = url.rstrip("/").split("/")[-2]
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"URL {url} carries no SHA-256 path segment")
    return digest


def _is_verified(path: Path, digest: str) -> bool:
    marker = path.with_name(path.name + ".sha256")
    if not path.exists():
        return False
    if marker.exists():
        recorded = marker.read_text().split()
        if recorded == [digest, str(path.stat().st_size)]:
            return True
    if sha256_of(path) == digest:
        marker.write_text(f"{digest} {path.stat().st_size}\n")
        return True
    return False


def _offline_error(name: str, url: str, target: Path, digest: str, reason: object) -> RuntimeError:
    return RuntimeError(
        f"cannot download the {name} weights from {url} ({reason}). Are you offline? Either connect and retry "
        f"(a partial download resumes), copy the file to {target} (checked against SHA-256 {digest}), "
        f"or pass a local checkpoint path to create_model()."
    )


def offline() -> bool:
    """True when ``CALIBCLIP_OFFLINE`` is set to 1/true/yes: downloads are refused."""
    return os.environ.get("CALIBCLIP_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download_url(
    url: str,
    target: str | os.PathLike,
    sha256: str | None = None,
    name: str | None = None,
    timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``target`` (resuming ``target.part``) and verify its SHA-256."""
    target = Path(target)
    digest = sha256 or expected_sha256(url)
    name = name or target.name
    if _is_verified(target, digest):
        return target
    if offline():
        raise RuntimeError(
            f"the {name} weights are not in the cache ({target}) and CALIBCLIP_OFFLINE=1 forbids downloading them "
            f"from {url}: unset CALIBCLIP_OFFLINE to download, copy the file to {target} (checked against SHA-256 "
            f"{digest}), or use a local checkpoint path or the built-in model (--model starter)"
        )
    print(
        f"calibclip: downloading the {name} weights from {url} to {target} (set CALIBCLIP_OFFLINE=1 to forbid "
        "downloads)",
        file=sys.stderr,
        flush=True,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "calibclip"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code != 416:  # 416: the partial file already holds everything; verify it below
            raise RuntimeError(f"downloading {name} from {url} failed: HTTP {exc.code} {exc.reason}") from exc
        response = None
    except (TimeoutError, urllib.error.URLError, OSError) as exc:
        raise _offline_error(name, url, target, digest, getattr(exc, "reason", exc)) from exc
    if response is not None:
        with response:
            resumed = offset > 0 and response.status == 206
            if not resumed:
                offset = 0
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length is not None else None
            bar = progress_bar(total=total, desc=f"download {name}", disable=not progress, unit="B", unit_scale=True)
            bar.update(offset)
            try:
                with open(part, "ab" if resumed else "wb") as f:
                    for block in iter(lambda: response.read(_CHUNK), b""):
                        f.write(block)
                        bar.update(len(block))
            except (TimeoutError, urllib.error.URLError, OSError) as exc:
                reason = f"interrupted after {part.stat().st_size} bytes: {exc}"
                raise _offline_error(name, url, target, digest, reason) from exc
            finally:
                bar.close()
    actual = sha256_of(part)
    if actual != digest:
        part.unlink()
        raise RuntimeError(
            f"checksum mismatch for {name}: expected SHA-256 {digest}, got {actual}; the corrupt partial file was "
            "removed, run again to download it afresh"
        )
    os.replace(part, target)
    target.with_name(target.name + ".sha256").write_text(f"{digest} {target.stat().st_size}\n")
    return target


def download_pretrained(
    name: str, cache_dir: str | os.PathLike | None = None, progress: bool = True, timeout: float = 30.0
) -> Path:
    """Path to the verified official weights of ``name`` (``ViT-B/16``, ``RN50`` ...), downloading once."""
    if name not in OPENAI_URLS:
        raise ValueError(f"no official weights for {name!r}; known: {', '.join(OPENAI_URLS)}")
    url = OPENAI_URLS[name]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return download_url(url, root / url.rsplit("/", 1)[-1], name=name, timeout=timeout, progress=progress)
