"""`calibclip info`: summary of an index (count, skipped files, model)."""

from __future__ import annotations

import argparse
import json

from calibclip.cli.index import add_store_options, store_options, store_spec_help


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("info", help="show an index's size, model and skipped files")
    p.add_argument("index_dir", metavar="INDEX", help="index folder or store spec (" + store_spec_help() + ")")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--skipped", action="store_true", help="list the files that could not be indexed, with reasons")
    p.add_argument(
        "--check",
        action="store_true",
        help="full verification: database integrity, every vector finite, norms, and a re-hash of a "
        "sample of the indexed files (exit 2 when the index is damaged)",
    )
    add_store_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    from calibclip.index import Index
    from calibclip.index.storage import display

    with Index.open(args.index_dir, store_options=store_options(args)) as index:
        info = index.info()
        skipped = [{"path": display(s.relpath), "reason": s.reason, "message": s.message} for s in index.skipped()]
    if args.check:
        check(args)
    if args.json:
        if args.skipped:
            info["skipped_files"] = skipped
        print(json.dumps(info, default=str))
        return 0
    for key in (
        "store",
        "backend",
        "count",
        "skipped",
        "model",
        "fingerprint",
        "dim",
        "precision",
        "vector_sets",
        "images_dir",
        "combiner",
        "disk_bytes",
    ):
        print(f"{key:12} {info[key]}")
    rr = info.get("reranker")
    if rr:
        n, w = rr["tokens"]
        print(
            f"{'reranker':12} {rr['source']} (sha256 {rr['sha256'][:12]}, "
            f"{n}x{w} fp16 tokens/image = {2 * n * w:,} bytes)"
        )
    if args.skipped:
        for s in skipped:
            print(f"{s['reason']:13} {s['path']}  ({s['message']})")
    return 0


def check(args: argparse.Namespace) -> None:
    """``--check``: print the verification verdict (stale files as notes).

    Raises:
        RuntimeError: the index is damaged (one line listing the problems and what to do).
    """
    import sys

    from calibclip.index.storage import check_index

    damage, stale = check_index(args.index_dir)
    if damage:
        raise RuntimeError(
            f"index {args.index_dir} is damaged: {'; '.join(damage)}. Rebuild it (delete the folder, then "
            f"`calibclip index IMAGES_DIR --out {args.index_dir}`) or restore it from a backup"
        )
    note = (
        f"; {len(stale)} sampled files changed since indexing (re-run `calibclip index` to update): "
        + ", ".join(stale[:3])
        if stale
        else ""
    )
    print(
        f"check: ok (database intact, every vector finite, norms match, sampled files re-hashed){note}", file=sys.stderr
    )
