"""On-disk layout of an index and its crash-safe, atomic per-batch commits.

::

    INDEX_DIR/
      meta.sqlite                    metadata (images, skipped files, model identity, counters)
      vectors/<set>.g<gen>.f16       raw float16 rows [rows, dim], C order, memory-mappable
      vectors/<set>.g<gen>.norm.f32  float32 L2 norm of each row (for normalised search)
      vectors/<tok>.g<gen>.tok.f16   optional token sets: float16 rows [rows, *shape] (the trained
                                     re-ranker's projected image tokens, ``token_sets`` in the metadata)
      reranker.json / .safetensors   the re-ranker those tokens were projected with (a copy)
      ann/                           FAISS files built lazily by searches (see ann.py)
      combiner.pt / .safetensors     optional Combiner checkpoint for composed queries
      .lock                          locked (lockf) by the one process writing the index

Every vector set (``raw``, optionally ``calibrated``) and token set (optionally ``rerank``) has the
same row order. A batch is committed by (1) writing its rows at the committed end of every vector
and token file and fsyncing, then
(2) one SQLite transaction that inserts the image rows and advances ``rows``. A process killed
between (1) and (2) leaves an uncommitted tail that readers ignore and the next writer
truncates, so every image is stored exactly once. Removed/changed images leave dead rows (rows
no image points to); `Storage.compact` rewrites the vector files under a new generation number
and switches to it in one transaction.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
META_FILE = "meta.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    row INTEGER NOT NULL UNIQUE,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    width INTEGER,
    height INTEGER
);
CREATE TABLE IF NOT EXISTS skipped (
    path TEXT PRIMARY KEY,
    size INTEGER,
    mtime_ns INTEGER,
    reason TEXT NOT NULL,
    message TEXT NOT NULL
);
"""


class IndexStateError(RuntimeError):
    """A problem with an index folder (missing, locked, inconsistent, incompatible)."""


@dataclass(frozen=True)
class ImageRecord:
    """One indexed image. ``path`` is absolute (root / relpath)."""

    id: int
    relpath: str
    path: Path
    size: int
    mtime_ns: int
    sha256: str
    width: int | None
    height: int | None


@dataclass(frozen=True)
class SkippedFile:
    """A file that could not be indexed and why (``reason``: corrupt, not_an_image, too_large,
    unreadable, empty, missing)."""

    relpath: str
    reason: str
    message: str


def db_path(relpath: str) -> str | bytes:
    """How a relative path is stored: as TEXT when it is valid UTF-8, else as the file name's raw bytes (a
    BLOB; names from Latin-1 disks or SMB shares arrive from `os.fsdecode` as lone surrogates, which SQLite's
    UTF-8 text cannot hold). Lossless: `py_path` gives the same string back."""
    try:
        relpath.encode("utf-8")
        return relpath
    except UnicodeEncodeError:
        return os.fsencode(relpath)


def py_path(value: str | bytes) -> str:
    """Inverse of `db_path` (bytes -> the `os.fsdecode` string that opens the file)."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


def display(text: str) -> str:
    """``text`` printable on one line as UTF-8: bytes that are not UTF-8 (lone surrogates) shown as ``\\xNN``,
    control characters (newline, tab, escape ...) as their ``\\n`` / ``\\x1b`` escapes."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def is_index_dir(directory: str | os.PathLike) -> bool:
    return (Path(directory) / META_FILE).is_file()


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The metadata of an index folder ({} when there is none yet, e.g. a run killed before its
    first commit), without format checks or locks."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        return {}
    try:
        db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT key, value FROM meta").fetchall()
        except sqlite3.OperationalError as exc:  # no meta table yet (a run killed before its first commit)
            if "no such table" not in str(exc):
                raise
            rows = []
        finally:
            db.close()
        return {k: json.loads(v) for k, v in rows}
    except (sqlite3.DatabaseError, ValueError) as exc:
        raise IndexStateError(
            f"index {directory} is damaged: {META_FILE} cannot be read ({exc}). Nothing was changed; rebuild it "
            "(delete the folder, then `calibclip index IMAGES_DIR --out DIR`) or restore it from a backup"
        ) from None


class Storage:
    """Metadata + vector files of one index folder. ``writable=True`` takes the writer lock."""

    def __init__(self, directory: str | os.PathLike, writable: bool = False):
        self.directory = Path(directory)
        self.writable = writable
        self._lock = threading.RLock()
        self._lock_fd: int | None = None
        if writable:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / "vectors").mkdir(exist_ok=True)
            self._lock_fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:  # a POSIX record lock: released when this process dies, not inherited by forked workers
                fcntl.lockf(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(self._lock_fd)
                raise IndexStateError(
                    f"index {self.directory} is being written by another process; wait for it to finish"
                ) from exc
        elif not is_index_dir(self.directory):
            raise FileNotFoundError(
                f"{self.directory} is not an index (no {META_FILE}); build one there first (Index.build, "
                "`calibclip index`)"
            )
        uri = (self.directory / META_FILE).resolve().as_uri() + ("" if writable else "?mode=ro")
        self._files: dict[str, Any] = {}
        try:
            self.db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None, timeout=30)
            if writable:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                self.db.executescript(_SCHEMA)
                if self._meta_raw("format") is not None:
                    self._check_format()
                    self.validate()
                    self._recover()
            else:
                self._check_format()
                self.validate()
        except sqlite3.DatabaseError as exc:
            self._release()
            raise self.damaged(f"{META_FILE} cannot be read ({exc})") from None
        except IndexStateError:
            self._release()
            raise

    # --- metadata ------------------------------------------------------------------------
    def _meta_raw(self, key: str) -> str | None:
        with self._lock:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def get(self, key: str, default: Any = None) -> Any:
        raw = self._meta_raw(key)
        return default if raw is None else json.loads(raw)

    def meta(self) -> dict[str, Any]:
        with self._lock:
            rows = self.db.execute("SELECT key, value FROM meta").fetchall()
        return {k: json.loads(v) for k, v in rows}

    def _set(self, values: dict[str, Any]) -> None:
        self.db.executemany(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [(k, json.dumps(v, sort_keys=True)) for k, v in values.items()],
        )

    def set_meta(self, values: dict[str, Any]) -> None:
        """Update metadata keys in one transaction."""
        with self._lock, self._transaction():
            self._set(values)

    def damaged(self, problem: str) -> IndexStateError:
        """The error for a damaged index: what is wrong and what to do."""
        root = self.get_safe("root")
        again = f"calibclip index {root or 'IMAGES_DIR'} --out {self.directory}"
        return IndexStateError(
            f"index {self.directory} is damaged: {problem}. Nothing was changed; rebuild it (delete the folder, "
            f"then `{again}`) or restore it from a backup"
        )

    def get_safe(self, key: str) -> Any:
        """``get`` that returns None instead of raising on a damaged database."""
        try:
            return self.get(key)
        except (sqlite3.Error, ValueError):
            return None

    def validate(self) -> None:
        """Cheap consistency checks on open (no full scan): metadata types, vector file sizes against
        ``rows`` x ``dim``, image rows inside the committed rows.

        Raises:
            IndexStateError: the index is damaged (the message says what and what to do).
        """
        meta = self.meta()
        sets = meta.get("vector_sets")
        for key in ("dim", "rows", "generation"):
            value = meta.get(key, 0 if key == "generation" else None)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "dim" else 0):
                least = " >= 1" if key == "dim" else ""
                raise self.damaged(f"metadata {key!r} is {value!r}, not a whole number{least}")
        if not isinstance(sets, list) or "raw" not in sets or not all(isinstance(n, str) for n in sets):
            raise self.damaged(f"metadata 'vector_sets' is {sets!r}")
        tsets = meta.get("token_sets") or {}
        if not isinstance(tsets, dict) or not all(
            isinstance(shape, list)
            and shape
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in shape)
            for shape in tsets.values()
        ):
            raise self.damaged(f"metadata 'token_sets' is {tsets!r}")
        dim, rows = int(meta["dim"]), int(meta["rows"])
        with self._lock:
            top, live = self.db.execute("SELECT MAX(row), COUNT(*) FROM images").fetchone()
        if top is not None and top >= rows:
            raise self.damaged(f"images point at vector row {top} but only {rows} rows are committed")
        if not self.writable:  # a writer truncates uncommitted tails; a reader needs every committed byte
            for path, width in self._row_files(sets, tsets):
                size = path.stat().st_size if path.exists() else -1
                if rows and size < rows * width:
                    have = "is missing" if size < 0 else f"holds {size} bytes"
                    raise self.damaged(
                        f"{path.relative_to(self.directory)} {have}, the index committed "
                        f"{rows} rows of {width} bytes ({rows * width})"
                    )
        if dim and live and live > rows:
            raise self.damaged(f"{live} images but {rows} committed rows")

    def _check_format(self) -> None:
        fmt = self.get("format")
        if fmt != FORMAT_VERSION:
            raise IndexStateError(
                f"index {self.directory} has format {fmt!r}, this calibclip reads format {FORMAT_VERSION}; "
                "rebuild it with `calibclip index`"
            )

    def initialise(self, dim: int, vector_sets: Sequence[str], meta: dict[str, Any]) -> None:
        """Set up an empty index (or reset one whose vector sets or model changed) in one transaction."""
        with self._lock, self._transaction():
            gen = int(self.get("generation", -1)) + 1
            self.db.execute("DELETE FROM images")
            self._set(
                {
                    "format": FORMAT_VERSION,
                    "dim": int(dim),
                    "vector_sets": list(vector_sets),
                    "rows": 0,
                    "generation": gen,
                    "version": int(self.get("version", 0)) + 1,
                    "created": self.get("created", time.time()),
                    "updated": time.time(),
                    **meta,
                }
            )
        self._close_files()
        self._remove_stale_files()

    # --- transactions and recovery ---------------------------------------------------------
    class _Tx:
        def __init__(self, db: sqlite3.Connection):
            self.db = db

        def __enter__(self) -> None:
            self.db.execute("BEGIN IMMEDIATE")

        def __exit__(self, exc_type: Any, *_: Any) -> None:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def _transaction(self) -> Storage._Tx:
        return Storage._Tx(self.db)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads inside see one consistent state, even while another process commits batches."""
        with self._lock:
            self.db.execute("BEGIN")
            try:
                yield
            finally:
                self.db.execute("COMMIT")

    @property
    def dim(self) -> int:
        return int(self.get("dim"))

    @property
    def rows(self) -> int:
        return int(self.get("rows", 0))

    @property
    def generation(self) -> int:
        return int(self.get("generation", 0))

    @property
    def vector_sets(self) -> list[str]:
        return list(self.get("vector_sets", []))

    def vector_path(self, name: str, generation: int | None = None) -> Path:
        gen = self.generation if generation is None else generation
        return self.directory / "vectors" / f"{name}.g{gen}.f16"

    def norm_path(self, name: str, generation: int | None = None) -> Path:
        gen = self.generation if generation is None else generation
        return self.directory / "vectors" / f"{name}.g{gen}.norm.f32"

    @property
    def token_sets(self) -> dict[str, tuple[int, ...]]:
        """Token set name -> per-image shape (e.g. ``{"rerank": (49, 256)}``); ``{}`` when none."""
        return {k: tuple(int(x) for x in v) for k, v in (self.get("token_sets") or {}).items()}

    def token_path(self, name: str, generation: int | None = None) -> Path:
        gen = self.generation if generation is None else generation
        return self.directory / "vectors" / f"{name}.g{gen}.tok.f16"

    def _row_files(
        self, sets: Sequence[str] | None = None, tsets: dict[str, Any] | None = None, generation: int | None = None
    ) -> list[tuple[Path, int]]:
        """(file, bytes per row) of every per-row file: vectors, norms, token sets."""
        sets = self.vector_sets if sets is None else sets
        tsets = self.token_sets if tsets is None else tsets
        dim = self.dim
        out = []
        for n in sets:
            out += [(self.vector_path(n, generation), dim * 2), (self.norm_path(n, generation), 4)]
        for n, shape in tsets.items():
            out.append((self.token_path(n, generation), int(np.prod(shape)) * 2))
        return out

    def _expected_files(self) -> set[Path]:
        return {p for p, _ in self._row_files()}

    def _remove_stale_files(self) -> None:
        keep = self._expected_files()
        for p in (self.directory / "vectors").glob("*"):
            if p not in keep:
                p.unlink(missing_ok=True)

    def _recover(self) -> None:
        """Drop uncommitted tails and files of abandoned generations (after a crash)."""
        self._remove_stale_files()
        rows = self.rows
        for path, width in self._row_files():
            nbytes = rows * width
            size = path.stat().st_size if path.exists() else 0
            if size < nbytes:
                raise IndexStateError(
                    f"{path} holds {size} bytes but the index committed {nbytes}: the index is damaged; "
                    "delete the folder and rebuild it"
                )
            if size > nbytes:
                with open(path, "r+b") as f:
                    f.truncate(nbytes)

    # --- writing ----------------------------------------------------------------------------
    def _file(self, path: Path) -> Any:
        f = self._files.get(str(path))
        if f is None:
            if not path.exists():
                path.touch()
            f = self._files[str(path)] = open(path, "r+b")
        return f

    def _close_files(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def commit_batch(
        self,
        vectors: dict[str, np.ndarray],
        records: Sequence[dict[str, Any]],
        skipped: Sequence[tuple[str, int | None, int | None, str, str]] = (),
        removed: Iterable[str] = (),
        tokens: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Atomically add ``records`` (dicts with path, size, mtime_ns, sha256, width, height) whose
        vectors are ``vectors[name][i]`` (and token rows ``tokens[name][i]`` of every token set), record
        ``skipped`` files (path, size, mtime_ns, reason, message) and remove the images at ``removed``
        paths. An existing image at a record's or skipped file's path is replaced."""
        if not self.writable:
            raise IndexStateError("storage opened read-only")
        n = len(records)
        tokens = tokens or {}
        if set(vectors) != set(self.vector_sets) and n:
            raise ValueError(f"batch has vector sets {sorted(vectors)}, index stores {self.vector_sets}")
        tsets = self.token_sets
        if set(tokens) != set(tsets) and (n or tokens):
            raise ValueError(f"batch has token sets {sorted(tokens)}, index stores {sorted(tsets)}")
        with self._lock:
            rows, dim = self.rows, self.dim
            if n:
                for name, shape in tsets.items():
                    tok = np.asarray(tokens[name])
                    if tok.shape != (n, *shape):
                        raise ValueError(f"token set {name!r}: expected shape {(n, *shape)}, got {tok.shape}")
                    with np.errstate(over="ignore", invalid="ignore"):
                        half_tok = tok.astype(np.float16)
                    if not np.isfinite(half_tok).all():
                        raise ValueError(f"token set {name!r}: non-finite values (once stored as float16)")
                    f = self._file(self.token_path(name))
                    width = int(np.prod(shape)) * 2
                    f.seek(rows * width)
                    f.write(np.ascontiguousarray(half_tok).tobytes())
                    f.truncate()
                    f.flush()
                    os.fsync(f.fileno())
                for name in self.vector_sets:
                    arr = np.asarray(vectors[name], dtype=np.float32)
                    if arr.shape != (n, dim):
                        raise ValueError(f"vector set {name!r}: expected shape {(n, dim)}, got {arr.shape}")
                    if not np.isfinite(arr).all():
                        raise ValueError(f"vector set {name!r}: the encoder produced non-finite values")
                    half = arr.astype(np.float16)
                    norms = np.linalg.norm(half.astype(np.float32), axis=1).astype(np.float32)  # of the stored values
                    parts = ((self.vector_path(name), half, dim * 2), (self.norm_path(name), norms, 4))
                    for path, data, width in parts:
                        f = self._file(path)
                        f.seek(rows * width)
                        f.write(np.ascontiguousarray(data).tobytes())
                        f.truncate()
                        f.flush()
                        os.fsync(f.fileno())
            replaced = [db_path(p) for p in [r["path"] for r in records] + [s[0] for s in skipped] + list(removed)]
            with self._transaction():
                self.db.executemany("DELETE FROM images WHERE path = ?", [(p,) for p in replaced])
                self.db.executemany("DELETE FROM skipped WHERE path = ?", [(p,) for p in replaced])
                self.db.executemany(
                    "INSERT INTO images(row, path, size, mtime_ns, sha256, width, height) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            rows + i,
                            db_path(r["path"]),
                            r["size"],
                            r["mtime_ns"],
                            r["sha256"],
                            r.get("width"),
                            r.get("height"),
                        )
                        for i, r in enumerate(records)
                    ],
                )
                self.db.executemany(
                    "INSERT INTO skipped(path, size, mtime_ns, reason, message) VALUES (?, ?, ?, ?, ?)",
                    [(db_path(p), size, mtime, reason, display(msg)) for p, size, mtime, reason, msg in skipped],
                )
                changes = {"rows": rows + n, "updated": time.time()}
                if n or replaced:
                    changes["version"] = int(self.get("version", 0)) + 1
                self._set(changes)

    def touch_images(self, updates: Sequence[tuple[str, int, int]]) -> None:
        """Record a new (size, mtime_ns) for images whose content hash did not change."""
        with self._lock, self._transaction():
            self.db.executemany(
                "UPDATE images SET size = ?, mtime_ns = ? WHERE path = ?", [(s, m, db_path(p)) for p, s, m in updates]
            )

    def compact(self) -> None:
        """Rewrite the vector files without dead rows under a new generation (atomic switch)."""
        with self._lock:
            live = np.asarray([r[0] for r in self.db.execute("SELECT row FROM images ORDER BY row")], dtype=np.int64)
            if len(live) == self.rows:
                return
            new_gen, dim = self.generation + 1, self.dim
            for name in self.vector_sets:
                for src, dst, width, dtype in (
                    (self.vector_path(name), self.vector_path(name, new_gen), dim, np.float16),
                    (self.norm_path(name), self.norm_path(name, new_gen), 1, np.float32),
                ):
                    old = np.memmap(src, dtype=dtype, mode="r", shape=(self.rows, width)) if self.rows else None
                    with open(dst, "wb") as f:
                        for s in range(0, len(live), 65536):
                            f.write(np.ascontiguousarray(old[live[s : s + 65536]]).tobytes())  # type: ignore[index]
                        f.flush()
                        os.fsync(f.fileno())
                    del old
            for name, shape in self.token_sets.items():
                width = int(np.prod(shape))
                src_mm = (
                    np.memmap(self.token_path(name), dtype=np.float16, mode="r", shape=(self.rows, width))
                    if self.rows
                    else None
                )
                with open(self.token_path(name, new_gen), "wb") as f:
                    for s in range(0, len(live), 4096):
                        f.write(np.ascontiguousarray(src_mm[live[s : s + 4096]]).tobytes())  # type: ignore[index]
                    f.flush()
                    os.fsync(f.fileno())
                del src_mm
            with self._transaction():
                # new row = rank of the old row; ascending order never collides with the UNIQUE constraint
                self.db.executemany(
                    "UPDATE images SET row = ? WHERE row = ?", [(i, int(r)) for i, r in enumerate(live)]
                )
                self._set({"rows": len(live), "generation": new_gen, "version": int(self.get("version", 0)) + 1})
            self._close_files()
            self._remove_stale_files()

    # --- reading ------------------------------------------------------------------------------
    def vectors(self, name: str, rows: int | None = None) -> np.ndarray:
        """Memory-mapped ``[rows, dim]`` float16 view of the committed rows of vector set ``name``."""
        if name not in self.vector_sets:
            raise KeyError(name)
        rows = self.rows if rows is None else rows
        if rows == 0:
            return np.zeros((0, self.dim), dtype=np.float16)
        return np.memmap(self.vector_path(name), dtype=np.float16, mode="r", shape=(rows, self.dim))

    def tokens(self, name: str, rows: int | None = None) -> np.ndarray:
        """Memory-mapped ``[rows, *shape]`` float16 view of the committed rows of token set ``name``."""
        shape = self.token_sets.get(name)
        if shape is None:
            raise KeyError(name)
        rows = self.rows if rows is None else rows
        if rows == 0:
            return np.zeros((0, *shape), dtype=np.float16)
        return np.memmap(self.token_path(name), dtype=np.float16, mode="r", shape=(rows, *shape))

    def norms(self, name: str, rows: int | None = None) -> np.ndarray:
        rows = self.rows if rows is None else rows
        if rows == 0:
            return np.zeros(0, dtype=np.float32)
        return np.fromfile(self.norm_path(name), dtype=np.float32, count=rows)

    def row_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, ids)`` of live images, sorted by row."""
        with self._lock:
            data = self.db.execute("SELECT row, id FROM images ORDER BY row").fetchall()
        arr = np.asarray(data, dtype=np.int64).reshape(-1, 2)
        return arr[:, 0], arr[:, 1]

    def count(self) -> int:
        with self._lock:
            return int(self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def skipped_count(self) -> int:
        with self._lock:
            return int(self.db.execute("SELECT COUNT(*) FROM skipped").fetchone()[0])

    def images_state(self) -> dict[str, tuple[int, int, str, int]]:
        """path -> (size, mtime_ns, sha256, id) of every live image."""
        with self._lock:
            rows = self.db.execute("SELECT path, size, mtime_ns, sha256, id FROM images").fetchall()
        return {py_path(p): (s, m, h, i) for p, s, m, h, i in rows}

    def skipped_state(self) -> dict[str, tuple[int | None, int | None]]:
        with self._lock:
            rows = self.db.execute("SELECT path, size, mtime_ns FROM skipped").fetchall()
        return {py_path(p): (s, m) for p, s, m in rows}

    def skipped(self) -> list[SkippedFile]:
        with self._lock:
            rows = self.db.execute("SELECT path, reason, message FROM skipped ORDER BY path").fetchall()
        return [SkippedFile(py_path(p), reason, message) for p, reason, message in rows]

    def records(self, ids: Sequence[int]) -> dict[int, tuple]:
        """id -> (id, path, size, mtime_ns, sha256, width, height, row) for the given ids."""
        out: dict[int, tuple] = {}
        ids = [int(i) for i in ids]
        with self._lock:
            for s in range(0, len(ids), 500):
                chunk = ids[s : s + 500]
                q = ",".join("?" * len(chunk))
                for r in self.db.execute(
                    f"SELECT id, path, size, mtime_ns, sha256, width, height, row FROM images WHERE id IN ({q})", chunk
                ):
                    out[int(r[0])] = (r[0], py_path(r[1]), *r[2:])
        return out

    def lookup_path(self, relpath: str) -> int | None:
        with self._lock:
            row = self.db.execute("SELECT id FROM images WHERE path = ?", (db_path(relpath),)).fetchone()
        return None if row is None else int(row[0])

    def _release(self) -> None:
        """Close the database and the writer lock (after a failed open)."""
        db = getattr(self, "db", None)
        if db is not None:
            db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def close(self) -> None:
        self._close_files()
        with self._lock:
            self.db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def check_index(directory: str | os.PathLike, sample: int = 64, seed: int = 0) -> tuple[list[str], list[str]]:
    """Full verification of an index folder (``calibclip info --check``): the database's integrity check,
    every committed live vector finite, the stored norms equal to the vectors' norms, and a re-hash of a
    sample of the indexed files.

    Args:
        directory: the index folder.
        sample: how many indexed files to re-hash (0: none).
        seed: which sample.

    Returns:
        ``(damage, stale)``: problems of the index itself, and indexed files that changed or vanished since
        (a re-run of ``calibclip index`` updates those).

    Raises:
        IndexStateError: damage that the cheap checks on open already find.
    """
    import hashlib

    storage = Storage(directory, writable=False)
    damage: list[str] = []
    stale: list[str] = []
    try:
        with storage.snapshot():
            meta = storage.meta()
            rows, ids = storage.row_ids()
            (verdict,) = storage.db.execute("PRAGMA integrity_check(5)").fetchone()
        if verdict != "ok":
            damage.append(f"{META_FILE} integrity check: {verdict}")
        committed = int(meta["rows"])
        for name in storage.vector_sets:
            vecs, norms = storage.vectors(name, committed), storage.norms(name, committed)
            bad_rows, bad_norms = 0, 0
            for s in range(0, len(rows), 65536):
                block = np.asarray(vecs[rows[s : s + 65536]], dtype=np.float32)
                finite = np.asarray(np.isfinite(block).all(axis=1), dtype=bool)
                bad_rows += int((~finite).sum())
                stored = norms[rows[s : s + 65536]]
                actual = np.linalg.norm(np.where(finite[:, None], block, 0), axis=1)
                bad_norms += int((finite & ~np.isclose(stored, actual, rtol=1e-3, atol=1e-6)).sum())
            if bad_rows:
                damage.append(f"vector set {name!r}: {bad_rows} of {len(rows)} vectors hold non-finite values")
            if bad_norms:
                damage.append(f"vector set {name!r}: {bad_norms} stored norms do not match their vectors")
        root = Path(meta.get("root") or "")
        if sample and len(ids):
            picked = np.random.default_rng(seed).choice(len(ids), size=min(sample, len(ids)), replace=False)
            recs = storage.records(ids[np.sort(picked)].tolist())
            for _, rel, *_rest in recs.values():
                sha = _rest[2]
                path = root / rel
                try:
                    h = hashlib.sha256()
                    with open(path, "rb") as f:
                        for block_bytes in iter(lambda: f.read(1 << 20), b""):  # noqa: B023
                            h.update(block_bytes)
                    if h.hexdigest() != sha:
                        stale.append(f"{display(rel)} changed since it was indexed")
                except OSError:
                    stale.append(f"{display(rel)} is gone")
    finally:
        storage.close()
    return damage, stale
