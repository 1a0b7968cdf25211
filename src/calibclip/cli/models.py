"""`calibclip models`: list the registered models."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("models", help="list registered model names")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    return p


def run(args: argparse.Namespace) -> int:
    from calibclip.models.registry import list_models

    entries = list_models()
    if args.json:
        print(json.dumps([{"name": e.name, "pretrained": e.pretrained, "description": e.description} for e in entries]))
        return 0
    width = max(len(e.name) for e in entries)
    for e in entries:
        print(f"{e.name:<{width}}  {e.pretrained:<9}  {e.description}")
    return 0
