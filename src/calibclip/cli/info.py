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
    add_store_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    from calibclip.index import Index

    with Index.open(args.index_dir, store_options=store_options(args)) as index:
        info = index.info()
        skipped = [{"path": s.relpath, "reason": s.reason, "message": s.message} for s in index.skipped()]
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
    if args.skipped:
        for s in skipped:
            print(f"{s['reason']:13} {s['path']}  ({s['message']})")
    return 0
