"""Recursive folder walk for indexing: image files by extension, symlinks followed safely.

Directory symlinks are followed, but every directory is entered at most once (identified by
``(st_dev, st_ino)``), so a symlink loop (``a/loop -> ..``) cannot recurse forever. A file reached
through several links is listed once, under its first path in sorted order. Entries that cannot be
inspected (broken links, self-referencing links, permission errors) are returned as problems with
a reason, never raised.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from calibclip.data.images import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class ScannedFile:
    """An image file found by `scan_images`: ``relpath`` (POSIX, relative to the root), size and mtime."""

    relpath: str
    path: Path
    size: int
    mtime_ns: int


@dataclass
class ScanResult:
    """Files found (sorted by ``relpath``) and ``problems``: relpath -> (reason, message)."""

    root: Path
    files: list[ScannedFile] = field(default_factory=list)
    problems: dict[str, tuple[str, str]] = field(default_factory=dict)


def scan_images(root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> ScanResult:
    """Walk ``root`` recursively and list image files (case-insensitive ``extensions``)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"images folder {root} does not exist or is not a directory")
    exts = tuple(e.lower() for e in extensions)
    result = ScanResult(root=root)
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    top = root.stat()
    seen_dirs.add((top.st_dev, top.st_ino))
    stack: list[tuple[Path, str]] = [(root, "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            result.problems[prefix or "."] = ("unreadable", f"{directory}: cannot list directory ({exc.strerror})")
            continue
        subdirs: list[tuple[Path, str]] = []
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            is_image = entry.name.lower().endswith(exts)
            try:
                st = entry.stat(follow_symlinks=True)
            except OSError as exc:
                if is_image:  # broken or looping link named like an image: report it
                    why = "symlink loop" if exc.errno == 40 else (exc.strerror or str(exc))
                    result.problems[rel] = ("unreadable", f"{entry.path}: cannot stat ({why})")
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key not in seen_dirs:  # a directory reached twice (symlink loop/alias) is walked once
                    seen_dirs.add(key)
                    subdirs.append((Path(entry.path), rel + "/"))
            elif is_image:
                key = (st.st_dev, st.st_ino)
                if not stat.S_ISREG(st.st_mode):
                    result.problems[rel] = ("unreadable", f"{entry.path}: not a regular file")
                elif key not in seen_files:
                    seen_files.add(key)
                    result.files.append(ScannedFile(rel, Path(entry.path), st.st_size, st.st_mtime_ns))
        stack.extend(reversed(subdirs))
    result.files.sort(key=lambda f: f.relpath)
    return result
