"""The table of vector-store backends and the parser for store specs.

A *store spec* names where an index lives:

- ``DIR`` or ``local:DIR``: the local format (fp16 memory maps + SQLite + FAISS) in folder DIR;
- ``milvus:PATH.db``: Milvus Lite, embedded, one file, no server;
- ``milvus:http(s)://HOST:PORT[/DB]``: a Milvus server or cluster (token: ``options["token"]``, else
  the ``CALIBCLIP_MILVUS_TOKEN`` environment variable);
- ``SCHEME:LOCATION`` for any other backend registered with `register_store`.

Every consumer (CLI choices, web index list, `Index.open`) reads this table; nothing repeats it.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from typing import Any

from calibclip.index.stores.base import AUTO_THRESHOLD, VectorStore

__all__ = [
    "AUTO_THRESHOLD",
    "VectorStore",
    "ann_choices",
    "backend_table",
    "get_store_class",
    "open_store",
    "parse_spec",
    "read_store_meta",
    "register_store",
    "store_schemes",
]

#: scheme -> backend class, or "module:Class" imported on first use (optional dependencies).
_STORES: dict[str, type[VectorStore] | str] = {
    "local": "calibclip.index.stores.local:LocalStore",
    "milvus": "calibclip.index.stores.milvus:MilvusStore",
}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9_+.-]+):(.*)$")


def register_store(scheme: str, backend: type[VectorStore] | str) -> None:
    """Register a backend class (or ``"module:Class"``) under ``scheme`` (replacing one of that name).

    Raises:
        ValueError: a scheme that is not a word of 2+ characters (one letter would read as a drive).
    """
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_+.-]+", scheme):
        raise ValueError(f"store scheme {scheme!r} must be a word of at least 2 characters (letters, digits, _+.-)")
    _STORES[scheme] = backend


def store_schemes() -> list[str]:
    """Registered schemes, in registration order."""
    return list(_STORES)


def get_store_class(scheme: str) -> type[VectorStore]:
    """The backend class for ``scheme`` (imported on first use).

    Raises:
        ValueError: unknown scheme, or a backend whose optional dependency is missing.
    """
    if scheme not in _STORES:
        raise ValueError(f"unknown store scheme {scheme!r}: registered schemes are {', '.join(_STORES)}")
    backend = _STORES[scheme]
    if isinstance(backend, str):
        module, _, name = backend.partition(":")
        backend = getattr(importlib.import_module(module), name)
        _STORES[scheme] = backend
    return backend  # type: ignore[return-value]


def parse_spec(spec: str | os.PathLike) -> tuple[str, str]:
    """``(scheme, location)`` of a store spec; a plain path (no registered ``SCHEME:``) is ``local``.

    Raises:
        ValueError: ``WORD:...`` with an unregistered WORD that is not an existing path.
    """
    text = os.fspath(spec)
    m = _SCHEME.match(text)
    if m is None:
        return "local", text
    scheme, location = m.group(1), m.group(2)
    if scheme in _STORES:
        if not location:
            raise ValueError(f"store spec {text!r} names no location after {scheme!r}:")
        return scheme, location
    if os.path.exists(text):
        return "local", text
    raise ValueError(
        f"store spec {text!r}: unknown scheme {scheme!r} (registered: {', '.join(_STORES)}); "
        f"for a folder of that name write ./{text}"
    )


def open_store(
    spec: str | os.PathLike, writable: bool = False, options: Mapping[str, Any] | None = None
) -> VectorStore:
    """Open the store named by ``spec`` (see the module docstring).

    Args:
        spec: a folder path or ``SCHEME:LOCATION``.
        writable: open as the single writer, creating the store when it does not exist.
        options: backend options (Milvus: ``token``).
    """
    scheme, location = parse_spec(spec)
    return get_store_class(scheme).open(location, writable=writable, options=options)


def read_store_meta(spec: str | os.PathLike, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The metadata of the store at ``spec`` (``{}`` when it does not exist yet)."""
    scheme, location = parse_spec(spec)
    return get_store_class(scheme).read_meta(location, options)


def ann_choices() -> list[str]:
    """Search kinds any registered backend accepts (``auto`` first), for CLI/web choices."""
    kinds = ["auto"]
    for scheme in _STORES:
        try:
            cls = get_store_class(scheme)
        except (ImportError, ValueError):
            continue
        kinds += [k for k in cls.ann_kinds if k not in kinds]
    return kinds


def backend_table() -> list[dict[str, Any]]:
    """One entry per registered backend: scheme, description, search kinds with their per-call
    parameters, and whether its optional dependencies are importable (for the web and ``--help``)."""
    out = []
    for scheme in _STORES:
        try:
            cls = get_store_class(scheme)
        except (ImportError, ValueError) as exc:
            out.append({"scheme": scheme, "available": False, "error": str(exc)})
            continue
        available, error = True, None
        check = getattr(cls, "dependency_error", None)
        if check is not None and (error := check()) is not None:
            available = False
        out.append(
            {
                "scheme": scheme,
                "description": cls.description,
                "available": available,
                "error": error,
                "ann": {k: list(v) for k, v in cls.ann_kinds.items()},
                "default_ann": cls.default_ann,
            }
        )
    return out
