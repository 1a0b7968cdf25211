"""`calibclip serve`: the web demo and JSON API over one or more indexes (uvicorn)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
from typing import Any

from calibclip.cli.index import store_spec_help


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        help="serve the web demo and JSON API over indexes",
        description="Serve the web demo (text, calibrated and composed search) and its JSON API "
        "(OpenAPI document at /openapi.json) over one or more indexes built with `calibclip index`.",
    )
    p.add_argument(
        "index_dirs",
        nargs="+",
        metavar="INDEX",
        help="index folder(s) or store spec(s) (" + store_spec_help() + "); the first is the default",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000, help="TCP port (default 5000)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes (default 1); each loads the model and indexes (memory x N)",
    )
    p.add_argument("--model", default=None, help="model name or checkpoint (default: the one the index records)")
    p.add_argument(
        "--captions",
        default=None,
        metavar="FILE",
        help="annotations JSON (CIRR/CSS or FashionIQ style) giving suggested modifications and "
        "ground-truth targets for the first index (default: captions/cap.*.json found in or "
        "beside the indexed folder, the CIRR / CSS / FashionIQ layout)",
    )
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload in MiB (default 10)")
    p.add_argument("--upload-ttl", type=float, default=3600.0, help="seconds an upload is kept (default 3600)")
    p.add_argument("--device", default="cpu", help="device for the model: cpu, cuda or auto (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per worker (default: torch's)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from calibclip.index.stores import parse_spec
    from calibclip.web.app import WebConfig, create_app

    specs = []
    for d in args.index_dirs:
        scheme, location = parse_spec(d)
        if scheme == "local":
            if not os.path.isdir(d):
                raise FileNotFoundError(
                    f"index folder {d} does not exist; build one with `calibclip index IMAGES --out {d}`"
                )
            specs.append(os.path.abspath(d))
        else:
            specs.append(d)  # opened (and checked) by the web app through the store table
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    upload_dir = tempfile.mkdtemp(prefix="calibclip-uploads-")
    config = WebConfig(
        index_dirs=specs,
        model=args.model,
        captions=os.path.abspath(args.captions) if args.captions else None,
        upload_dir=upload_dir,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        upload_ttl_s=args.upload_ttl,
        device=args.device,
        threads=args.threads,
    )
    common = dict(
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=5,
    )
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler in place
    # before it started: make that handler an exit that runs the clean-up below.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        if args.workers == 1:
            uvicorn.run(create_app(config), **common)
        else:
            os.environ["CALIBCLIP_WEB_CONFIG"] = config.to_json()
            uvicorn.run("calibclip.web.app:app_from_env", factory=True, workers=args.workers, **common)
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(upload_dir, ignore_errors=True)
    return 0


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(0)
