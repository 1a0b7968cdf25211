"""`calibclip serve`: the web demo and JSON API over one or more indexes (uvicorn)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import tempfile
from typing import Any

from calibclip.cli.common import add_backend_argument, apply_backend
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
    add_backend_argument(p, precision=True)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per worker (default: torch's)")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=None,
        metavar="HOST",
        help="host name the server may be reached under (the Host header), repeatable; '*.example.com' "
        "allows sub-domains, '*' any host (no DNS-rebinding protection). Default: the --host address "
        "and localhost, 127.0.0.1, ::1",
    )
    g = p.add_argument_group("micro-batching of text queries (one encoder forward for concurrent searches)")
    g.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="most text queries per encoder forward (default 32; 1 turns batching off)",
    )
    g.add_argument(
        "--batch-window-ms",
        type=float,
        default=5.0,
        help="how long a batch waits for more queries after its first one (default 5 ms)",
    )
    g.add_argument(
        "--queue-size",
        type=int,
        default=256,
        help="most queries waiting for the encoder; more are answered 503 with Retry-After (default 256)",
    )
    g.add_argument(
        "--request-timeout",
        type=float,
        default=30.0,
        help="seconds a query may wait for the encoder before a 503 (default 30)",
    )
    p.add_argument(
        "--refresh-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how often (at most) a request checks whether the index was updated on disk (another "
        "`calibclip index` run) and re-opens it (default 1 s; 0: every request)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from calibclip.cli.search import check_index_model
    from calibclip.index.stores import parse_spec
    from calibclip.web.app import WebConfig, create_app

    specs = []
    apply_backend(args)
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
        check_index_model(d, args.model)
    check_port_free(args.host, args.port)
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if args.refresh_interval < 0:
        raise ValueError(f"--refresh-interval must be >= 0 seconds, got {args.refresh_interval}")
    from calibclip.web.batching import BatchSettings

    BatchSettings(args.batch_window_ms, args.batch_size, args.queue_size, args.request_timeout)  # validate early
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
        host=args.host,
        allowed_hosts=args.allowed_host,
        batch_window_ms=args.batch_window_ms,
        batch_size=args.batch_size,
        batch_queue=args.queue_size,
        request_timeout_s=args.request_timeout,
        refresh_s=args.refresh_interval,
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


def check_port_free(host: str, port: int) -> None:
    """Refuse, before anything is loaded, a port another process already listens on.

    Raises:
        OSError: the address is taken or cannot be bound (the message names the port and how to pick another).
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise OSError(f"--host {host}: cannot resolve that address ({exc.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as exc:
            raise OSError(
                f"port {port} on {host} is not available ({exc.strerror}); another server is probably using it: "
                f"pick another with --port (e.g. --port {port + 1 if port < 65535 else 8000}) or stop that server"
            ) from None


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(0)
